"""CAMELYON16 tumour annotations: ASAP XML polygons -> a label per patch.

CAMELYON16 groups its polygons as ``Tumor``, ``_0`` and ``_1`` (tumour regions) and ``_2``
(normal tissue cut out of a tumour region). A patch is ``tumor`` when the fraction of it inside
tumour polygons, and outside exclusions, reaches a threshold; a threshold of 0 means "its
centre lies inside". Slides without an annotation file are all ``normal``.
"""

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.path import Path as PolygonPath

TUMOR_GROUPS = {"tumor", "_0", "_1", "metastases"}
EXCLUSION_GROUPS = {"_2", "exclusion", "normal"}
SAMPLES_PER_SIDE = 8  # a patch's tumour fraction is measured on an 8x8 grid of points


@dataclass
class SlideAnnotations:
    tumor: list[PolygonPath] = field(default_factory=list)
    exclusion: list[PolygonPath] = field(default_factory=list)

    def _inside(self, points: np.ndarray) -> np.ndarray:
        inside = np.zeros(len(points), dtype=bool)
        for polygon in self.tumor:
            inside |= polygon.contains_points(points)
        for polygon in self.exclusion:
            inside &= ~polygon.contains_points(points)
        return inside

    def tumor_fraction(self, x: int, y: int, size: int) -> float:
        offsets = (np.arange(SAMPLES_PER_SIDE) + 0.5) * size / SAMPLES_PER_SIDE
        grid_x, grid_y = np.meshgrid(x + offsets, y + offsets)
        return float(self._inside(np.column_stack([grid_x.ravel(), grid_y.ravel()])).mean())

    def label(self, x: int, y: int, size: int, min_fraction: float) -> str:
        if min_fraction <= 0:
            centre = np.array([[x + size / 2.0, y + size / 2.0]])
            return "tumor" if self._inside(centre)[0] else "normal"
        return "tumor" if self.tumor_fraction(x, y, size) >= min_fraction else "normal"


def read_asap_xml(path: str | Path) -> SlideAnnotations:
    """Parse an ASAP annotation file (the CAMELYON16 format) into tumour/exclusion polygons."""
    annotations = SlideAnnotations()
    for element in ElementTree.parse(path).getroot().iter("Annotation"):
        group = (element.get("PartOfGroup") or element.get("Name") or "").strip().lower()
        points = [
            (float(c.get("X")), float(c.get("Y")))
            for c in sorted(element.iter("Coordinate"), key=lambda c: int(c.get("Order", 0)))
        ]
        if len(points) < 3:
            continue
        polygon = PolygonPath(np.array(points), closed=False)
        if group in EXCLUSION_GROUPS:
            annotations.exclusion.append(polygon)
        elif group in TUMOR_GROUPS:
            annotations.tumor.append(polygon)
    return annotations


def find_annotation(annotations_dir: Path | None, slide_path: Path) -> Path | None:
    """The ``<slide stem>.xml`` in ``annotations_dir``, if any."""
    if annotations_dir is None:
        return None
    candidate = annotations_dir / f"{slide_path.stem}.xml"
    return candidate if candidate.is_file() else None
