"""What ``pathgan shards pack`` runs in its worker processes: planning slides, spooling patches.

Workers are spawned processes, and a spawned process imports the module of every function it
runs. This module therefore imports neither torch nor webdataset (importing torch costs about
1.1 s of CPU per worker, a tenth of the work on a gigapixel slide); the output size comes from
the caller.

*Plan.* ``plan_slide`` finds a slide's tissue windows and turns them into sample records, each
tagged with its *read unit*: the level-aligned region of the slide it is read with
(``slides.region_cell``). Patch images are grouped into units of ``IMAGES_PER_UNIT``.

*Spool.* ``spool_unit`` reads a unit once (each tile of its region decoded once), resizes and
encodes every patch, and writes ``<unit>.spool``: the encoded patches one after another, then
a JSON index (key -> offset and length, or the reason the patch could not be read), then the
index's length (8 bytes, little-endian). One file per unit, landed atomically (one fsync);
spools depend only on the plan, so their bytes are deterministic and a rerun keeps every spool
already written. ``SpoolReader`` reads them back for shard assembly (``pack.py``).
"""

import hashlib
import json
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pathgan.data import annotations as annotation_io
from pathgan.data import slides
from pathgan.data.format import encode_image, safe_key_part
from pathgan.errors import PathganError
from pathgan.fileio import atomic_path

IMAGES_PER_UNIT = 64
TRAILER = struct.Struct("<Q")  # a spool ends with the length of its index
# Record fields that steer the pack and are not written into a sample's metadata.
PLAN_FIELDS = ("key", "unit")


@dataclass
class PackOptions:
    patch_sizes: list[int] = field(default_factory=lambda: [224])
    image_format: str = "png"  # png | jpg | npy ("raw" on the command line)
    jpeg_quality: int = 95
    workers: int = 2
    val_fraction: float = 0.0
    target_mpp: float | None = None  # tile at this µm/px instead of level-0 pixels
    slide_mpp: float | None = None  # override the slide's own level-0 µm/px
    overlap: float = 0.0
    min_tissue: float = 0.5
    min_saturation: int = 20
    annotations: str | None = None
    tumor_fraction: float = 0.0  # 0: a patch is tumour when its centre is inside a polygon
    group_pattern: str | None = None  # regex on file names; group 1 = the split group
    seed: int = 0  # the order of samples in the shards
    max_count: int = 1000
    max_bytes: int = 1 << 30
    max_skipped_fraction: float = 0.1

    def validate(self) -> None:
        if not self.patch_sizes or min(self.patch_sizes) < 8:
            raise PathganError("--patch-sizes must list sizes of at least 8 pixels")
        if self.image_format not in ("png", "jpg", "npy"):
            raise PathganError(f"--format must be png, jpg or raw, not {self.image_format!r}")
        checks = {
            "--val-fraction": 0.0 <= self.val_fraction < 1.0,
            "--overlap": 0.0 <= self.overlap < 1.0,
            "--min-tissue": 0.0 <= self.min_tissue <= 1.0,
            "--tumor-fraction": 0.0 <= self.tumor_fraction <= 1.0,
            "--workers": self.workers >= 1,
            "--max-count": self.max_count >= 1,
            "--jpeg-quality": 1 <= self.jpeg_quality <= 100,
            "--target-mpp": self.target_mpp is None or self.target_mpp > 0,
        }
        for flag, ok in checks.items():
            if not ok:
                raise PathganError(f"{flag} is out of range")
        if self.annotations and not Path(self.annotations).is_dir():
            raise PathganError(f"--annotations {self.annotations}: no such folder")
        if self.group_pattern:
            try:
                re.compile(self.group_pattern)
            except re.error as error:
                raise PathganError(f"--group-pattern is not a valid regex: {error}") from None


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # "slide" | "image"
    label: str | None
    group: str  # the unit of the train/validation split


def reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def source_hash(path: str) -> str:
    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]


# --- plan -----------------------------------------------------------------------------------


# A slide's windows, one row each (about 70 bytes, where a dict record takes 2 KB): a pack of
# millions of patches keeps its whole plan in memory.
WINDOW_ROW = np.dtype([("x", "i8"), ("y", "i8"), ("size", "i8"), ("level", "i8"),
                       ("read_size", "i8"), ("tissue_fraction", "f8"), ("column", "i8"),
                       ("row", "i8"), ("label", "i1")])
LABELS = (None, "normal", "tumor")


@dataclass
class SlidePlan:
    """The tissue windows of one slide, with the fields its samples share, or why it was
    skipped. Sample records (dicts) are made one at a time, when a unit or a shard needs them."""

    source: str
    skipped: str | None = None
    prefix: str = ""
    mpp: float | None = None
    mpp_source: str = "unknown"
    output_size: int = 0
    windows: np.ndarray = field(default_factory=lambda: np.empty(0, WINDOW_ROW))
    kind = "slide"

    def __len__(self) -> int:
        return len(self.windows)

    def key(self, index: int) -> str:
        window = self.windows[index]
        return f"{self.prefix}-s{window['size']}-x{window['x']}-y{window['y']}"

    def _unit(self, level: int, column: int, row: int) -> str:
        return f"{self.prefix}-L{level}-c{column}-r{row}"

    def unit_of(self, index: int) -> str:
        window = self.windows[index]
        return self._unit(window["level"], window["column"], window["row"])

    def units(self) -> Iterator[tuple[str, np.ndarray]]:
        """(unit, indices of its windows) for every read unit, in (level, column, row) order."""
        cells = self.windows[["level", "column", "row"]]
        unique, inverse = np.unique(cells, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.searchsorted(inverse[order], np.arange(len(unique) + 1))
        for cell, start, end in zip(unique.tolist(), bounds[:-1], bounds[1:], strict=True):
            yield self._unit(*cell), order[start:end]

    def record(self, index: int) -> dict:
        window = self.windows[index].tolist()
        x, y, size, level, read_size, tissue_fraction, column, row, label = window
        return {
            "key": f"{self.prefix}-s{size}-x{x}-y{y}",
            "unit": self._unit(level, column, row),
            "source": self.source,
            "source_type": "slide",
            "level": level,
            "x": x,
            "y": y,
            "patch_size": size,
            "read_size": read_size,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "output_mpp": self.mpp * size / self.output_size if self.mpp else None,
            "label": LABELS[label],
            "tissue_fraction": tissue_fraction,
        }


@dataclass
class ImagePlan:
    """One patch image: its one record."""

    source: str
    fields: dict
    skipped: str | None = None
    kind = "image"

    def __len__(self) -> int:
        return 1

    def key(self, index: int) -> str:
        return self.fields["key"]

    def unit_of(self, index: int) -> str:
        return self.fields["unit"]

    def units(self) -> Iterator[tuple[str, list[int]]]:
        yield self.fields["unit"], [0]

    def record(self, index: int) -> dict:
        return dict(self.fields)


def _label_code(window: slides.PatchWindow, tumors, options: PackOptions) -> int:
    if tumors:
        return LABELS.index(tumors.label(window.x, window.y, window.size,
                                         options.tumor_fraction))
    # With annotations, a slide that has no annotation file has no tumour.
    return LABELS.index("normal") if options.annotations else LABELS.index(None)


def plan_slide(source: Source, options: PackOptions, output_size: int) -> SlidePlan:
    """All tissue windows of one slide, or the reason it was skipped."""
    path = Path(source.path)
    try:
        slide = slides.open_slide(path)
        mpp, mpp_source = slides.slide_mpp(slide, options.slide_mpp)
        sizes = slides.level0_sizes(options.patch_sizes, options.target_mpp, mpp, path)
        windows, _, _ = slides.patch_windows(
            slide, sizes, output_size, options.overlap, options.min_tissue,
            options.min_saturation
        )
        cells = [slides.region_cell(slide, window) for window in windows]
        annotation_file = annotation_io.find_annotation(
            Path(options.annotations) if options.annotations else None, path
        )
        tumors = annotation_io.read_asap_xml(annotation_file) if annotation_file else None
        slide.close()
    except Exception as error:  # an unreadable slide is skipped and reported, never fatal
        return SlidePlan(source.path, skipped=reason(error))
    rows = [(w.x, w.y, w.size, w.level, w.read_size, w.tissue_fraction, column, row,
             _label_code(w, tumors, options))
            for w, (_, column, row) in zip(windows, cells, strict=True)]
    return SlidePlan(source.path, prefix=f"{safe_key_part(path.stem)}-{source_hash(source.path)}",
                     mpp=mpp, mpp_source=mpp_source, output_size=output_size,
                     windows=np.array(rows, dtype=WINDOW_ROW))


def plan_images(sources: list[Source]) -> list[ImagePlan]:
    """One record per patch image, in units of ``IMAGES_PER_UNIT`` images in source order."""
    plans = []
    for index, source in enumerate(sources):
        path = Path(source.path)
        plans.append(ImagePlan(source.path, {
            "key": f"{safe_key_part(path.stem)}-{source_hash(source.path)}",
            "unit": f"images-{index // IMAGES_PER_UNIT:06d}",
            "source": source.path,
            "source_type": "image",
            "level": 0,
            "x": 0,
            "y": 0,
            "label": source.label,
        }))
    return plans


# --- spool ----------------------------------------------------------------------------------


@dataclass
class UnitJob:
    unit: str
    records: list[dict]  # every record of the unit, in plan order
    spool_dir: str
    fingerprint: str
    options: PackOptions
    output_size: int


def spool_path(spool_dir: str | Path, unit: str) -> Path:
    return Path(spool_dir) / f"{unit}.spool"


def read_spool_index(handle: int) -> dict:
    """The index at the end of an open spool file."""
    size = os.fstat(handle).st_size
    (length,) = struct.unpack("<Q", os.pread(handle, TRAILER.size, size - TRAILER.size))
    return json.loads(os.pread(handle, length, size - TRAILER.size - length))


def spool_is_complete(spool_dir: str | Path, unit: str, fingerprint: str) -> bool:
    """A spool written by this same plan."""
    try:
        handle = os.open(spool_path(spool_dir, unit), os.O_RDONLY)
    except OSError:
        return False
    try:
        return read_spool_index(handle)["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError, struct.error):
        return False
    finally:
        os.close(handle)


_open_slides: OrderedDict[str, object] = OrderedDict()


def _slide(path: str):
    """Slides stay open across units (a worker takes a slide's units one after another)."""
    if path in _open_slides:
        _open_slides.move_to_end(path)
    else:
        if len(_open_slides) >= 4:
            _open_slides.popitem(last=False)[1].close()
        _open_slides[path] = slides.open_slide(path)
    return _open_slides[path]


def _window(record: dict) -> slides.PatchWindow:
    return slides.PatchWindow(record["x"], record["y"], record["patch_size"], record["level"],
                              record["read_size"], record["tissue_fraction"])


def _read_image(record: dict, output_size: int) -> tuple[np.ndarray, dict]:
    """A patch image's pixels at ``output_size`` and what reading it taught about it."""
    with Image.open(record["source"]) as image:
        image.load()
        width, height = image.size
        pixels = np.asarray(image.convert("RGB"))
    return (slides.resize_patch(pixels, output_size),
            {"patch_size": max(width, height), "original_size": [width, height]})


def _read_unit(job: UnitJob) -> Iterator:
    """(pixels, metadata learnt reading them) or the error, for every record of the unit."""
    if job.records[0]["source_type"] == "slide":
        try:
            slide = _slide(job.records[0]["source"])
        except Exception as error:  # readable when planned, not now: its patches are skipped
            yield from (error for _ in job.records)
            return
        windows = [_window(record) for record in job.records]
        for pixels in slides.read_windows(slide, windows, job.output_size):
            yield pixels if isinstance(pixels, Exception) else (pixels, {})
        return
    for record in job.records:
        try:
            yield _read_image(record, job.output_size)
        except Exception as error:  # a corrupt image is skipped and reported
            yield error


def spool_unit(job: UnitJob) -> int:
    """Read, resize and encode every patch of a unit into its spool; returns the patch count."""
    entries, metadata, skipped = {}, {}, {}
    offset = 0
    with atomic_path(spool_path(job.spool_dir, job.unit)) as temporary, \
            open(temporary, "wb") as spool:
        for record, result in zip(job.records, _read_unit(job), strict=True):
            try:
                if isinstance(result, Exception):
                    raise result
                pixels, learnt = result
                data = encode_image(pixels, job.options.image_format, job.options.jpeg_quality)
            except Exception as error:
                skipped[record["key"]] = reason(error)
                continue
            spool.write(data)
            entries[record["key"]] = [offset, len(data)]
            if learnt:
                metadata[record["key"]] = learnt
            offset += len(data)
        index = json.dumps({"fingerprint": job.fingerprint, "entries": entries,
                            "metadata": metadata, "skipped": skipped}).encode()
        spool.write(index + TRAILER.pack(len(index)))
    return len(job.records)


class SpoolReader:
    """Encoded patches out of spools, by record: the bytes and the metadata learnt reading it.

    One reader serves one shard: it reads each unit's index once and keeps a bounded number of
    spool files open (a shard mixes patches of many units), so its memory is bounded by the
    shard, not by the slide set.
    """

    def __init__(self, spool_dir: str | Path, max_open: int = 64):
        self.spool_dir = Path(spool_dir)
        self.max_open = max_open
        self.indexes: dict[str, dict] = {}
        self.files: OrderedDict[str, int] = OrderedDict()

    def __enter__(self) -> "SpoolReader":
        return self

    def __exit__(self, *exc) -> None:
        for descriptor in self.files.values():
            os.close(descriptor)
        self.files.clear()

    def read(self, record: dict) -> tuple[bytes, dict]:
        """Raises ``ValueError`` with the reason when the patch could not be read."""
        unit, key = record["unit"], record["key"]
        handle = self._file(unit)
        if unit not in self.indexes:
            self.indexes[unit] = read_spool_index(handle)
        index = self.indexes[unit]
        if key in index["skipped"]:
            raise ValueError(index["skipped"][key])
        offset, length = index["entries"][key]
        return os.pread(handle, length, offset), index["metadata"].get(key, {})

    def _file(self, unit: str) -> int:
        if unit in self.files:
            self.files.move_to_end(unit)
        else:
            if len(self.files) >= self.max_open:
                os.close(self.files.popitem(last=False)[1])
            self.files[unit] = os.open(spool_path(self.spool_dir, unit), os.O_RDONLY)
        return self.files[unit]
