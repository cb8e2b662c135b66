"""ASAP XML annotations (the CAMELYON16 format): polygons -> a label per patch.

An annotation's ``PartOfGroup`` says what its polygon holds. Two conventions:

- **CAMELYON16 tumours**: groups ``Tumor``, ``_0``, ``_1`` (or ``metastases``) are tumour
  regions and ``_2`` is normal tissue cut out of a tumour region. A patch is ``tumor`` when it
  lies in tumour polygons (outside exclusions), else ``normal``; a slide without a file is all
  ``normal``.
- **Named classes** (any other group name, e.g. ``epidermis`` and ``dermis``; lower-cased): each
  group is a class. A patch takes the class of the polygons it lies in; a patch in no class
  polygon has no label, and neither has a slide without a file. ``_2`` / ``exclusion`` polygons
  are cut out of every class.

"Lies in": the share of the patch inside the class's polygons, measured on an 8x8 grid of
points, reaches a threshold (the class with the largest share wins when several do); a
threshold of 0 means "its centre does".
"""

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.path import Path as PolygonPath

TUMOR_GROUPS = {"tumor", "_0", "_1", "metastases"}
EXCLUSION_GROUPS = {"_2", "exclusion", "normal"}
TUMOR, NORMAL = "tumor", "normal"
SAMPLES_PER_SIDE = 8  # a patch's class fractions are measured on an 8x8 grid of points


def group_class(group: str) -> str | None:
    """The class an annotation group stands for; None for an exclusion group."""
    group = group.strip().lower()
    if group in EXCLUSION_GROUPS:
        return None
    return TUMOR if group in TUMOR_GROUPS else group


@dataclass
class SlideAnnotations:
    """One slide's class polygons, its exclusions, and the label of a patch in no class
    polygon (``normal`` under CAMELYON16's convention, else None)."""

    classes: dict[str, list[PolygonPath]] = field(default_factory=dict)
    exclusion: list[PolygonPath] = field(default_factory=list)
    outside: str | None = None

    def _inside(self, polygons: list[PolygonPath], points: np.ndarray) -> np.ndarray:
        inside = np.zeros(len(points), dtype=bool)
        for polygon in polygons:
            inside |= polygon.contains_points(points)
        for polygon in self.exclusion:
            inside &= ~polygon.contains_points(points)
        return inside

    def class_fractions(self, x: int, y: int, size: int) -> dict[str, float]:
        """The share of the patch at (x, y) of side ``size`` inside each class's polygons."""
        offsets = (np.arange(SAMPLES_PER_SIDE) + 0.5) * size / SAMPLES_PER_SIDE
        grid_x, grid_y = np.meshgrid(x + offsets, y + offsets)
        points = np.column_stack([grid_x.ravel(), grid_y.ravel()])
        return {name: float(self._inside(polygons, points).mean())
                for name, polygons in self.classes.items()}

    def label(self, x: int, y: int, size: int, min_fraction: float) -> str | None:
        if min_fraction <= 0:
            centre = np.array([[x + size / 2.0, y + size / 2.0]])
            for name, polygons in self.classes.items():
                if self._inside(polygons, centre)[0]:
                    return name
            return self.outside
        fractions = self.class_fractions(x, y, size)
        best = max(fractions, key=fractions.get, default=None)
        return best if best is not None and fractions[best] >= min_fraction else self.outside


def read_groups(path: str | Path) -> list[tuple[str, np.ndarray]]:
    """(group, polygon vertices) of every polygon of an ASAP XML file, in file order."""
    polygons = []
    for element in ElementTree.parse(path).getroot().iter("Annotation"):
        group = (element.get("PartOfGroup") or element.get("Name") or "").strip().lower()
        points = [
            (float(c.get("X")), float(c.get("Y")))
            for c in sorted(element.iter("Coordinate"), key=lambda c: int(c.get("Order", 0)))
        ]
        if len(points) >= 3:
            polygons.append((group, np.array(points)))
    return polygons


def is_camelyon16(classes: set[str]) -> bool:
    """CAMELYON16's convention: tumour polygons only (outside them, tissue is normal)."""
    return classes <= {TUMOR}


def read_asap_xml(path: str | Path) -> SlideAnnotations:
    """Parse an ASAP annotation file into class and exclusion polygons."""
    annotations = SlideAnnotations()
    for group, points in read_groups(path):
        polygon = PolygonPath(points, closed=False)
        name = group_class(group)
        if name is None:
            annotations.exclusion.append(polygon)
        else:
            annotations.classes.setdefault(name, []).append(polygon)
    annotations.outside = NORMAL if is_camelyon16(set(annotations.classes)) else None
    return annotations


def folder_classes(annotations_dir: Path) -> set[str]:
    """Every class named by the ASAP files of a folder."""
    return {name for path in sorted(annotations_dir.glob("*.xml"))
            for group, _ in read_groups(path) if (name := group_class(group)) is not None}


def unannotated_label(annotations_dir: Path | None) -> str | None:
    """The label of a slide without an annotation file: ``normal`` when the folder follows
    CAMELYON16's convention, None (no label) when its files name other classes."""
    if annotations_dir is None:
        return None
    return NORMAL if is_camelyon16(folder_classes(annotations_dir)) else None


def find_annotation(annotations_dir: Path | None, slide_path: Path) -> Path | None:
    """The ``<slide stem>.xml`` in ``annotations_dir``, if any."""
    if annotations_dir is None:
        return None
    candidate = annotations_dir / f"{slide_path.stem}.xml"
    return candidate if candidate.is_file() else None
