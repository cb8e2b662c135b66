"""What ``pathgan shards pack`` runs in its worker processes: planning slides, spooling patches.

Workers are spawned processes, and a spawned process imports the module of every function it
runs. This module therefore imports neither torch nor webdataset (importing torch costs about
1.1 s of CPU per worker, a tenth of the work on a gigapixel slide); the output size comes from
the caller.

*Plan.* ``plan_slide`` finds a slide's tissue windows and turns them into sample records, each
tagged with its *read unit*: the level-aligned region of the slide it is read with
(``slides.region_cell``). Patch images are grouped into units of ``IMAGES_PER_UNIT``; the rows of
a parquet table (``tables.py``) into ranges of consecutive rows of a file (``table_units``), which
a worker reads in one streaming pass from the row group that holds the first one.

*Spool.* ``spool_unit`` reads a unit once (each tile of its region decoded once), resizes and
encodes every patch, and writes ``<unit>.spool``: the encoded patches one after another, then
a JSON index (key -> offset and length, or the reason the patch could not be read), then the
index's length (8 bytes, little-endian). A table row's precomputed embedding (float32) follows
its patch, and the index says where. One file per unit, landed atomically (one fsync);
spools depend only on the plan, so their bytes are deterministic and a rerun keeps every spool
already written. ``SpoolReader`` reads them back for shard assembly (``pack.py``).
"""

import hashlib
import itertools
import json
import os
import re
import struct
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from pathgan.core.errors import PathganError
from pathgan.core.fileio import atomic_path
from pathgan.shards import annotations as annotation_io
from pathgan.shards import slides
from pathgan.shards.format import encode_image, safe_key_part
from pathgan.shards.tables import TableColumns, TableFile

IMAGES_PER_UNIT = 64
# A unit of table rows has at least this many rows (small row groups are joined), so that
# opening the file and reading its footer is paid once per this many patches ...
TABLE_ROWS_PER_UNIT = 256
# ... and a row group is cut into at most this many units: pyarrow reads a row group from its
# start, so each unit reads the rows before its own again (measured: 4 ms per 1000 rows of 28 kB
# images), which finer cuts of a big row group would pay many times over.
UNITS_PER_ROW_GROUP = 16
PRECISIONS = ("fp32", "bf16", "fp16")
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
    # Parquet tables (``tables.py``): the columns read, and who made the embedding column.
    image_column: str = "image"
    label_column: str | None = None
    group_column: str | None = None  # the split unit; default: one group per file
    embedding_column: str | None = None
    encoder: str | None = None  # the spec (or id) of the encoder that made the embeddings
    embedding_precision: str = "fp32"  # what the data set's embeddings were computed in
    embedding_tolerance: float = 1e-2  # median relative L2 against a recomputed sample

    def table_columns(self) -> TableColumns:
        return TableColumns(self.image_column, self.label_column, self.group_column,
                            self.embedding_column)

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
            "--embedding-tolerance": self.embedding_tolerance > 0,
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
        if bool(self.embedding_column) != bool(self.encoder):
            raise PathganError("--embedding-column and --encoder go together: the column's "
                               "embeddings and the encoder that made them")
        if self.embedding_precision not in PRECISIONS:
            raise PathganError(f"--embedding-precision must be one of {', '.join(PRECISIONS)}")


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # "slide" | "image" | "table" (a parquet file, or one group's rows of it)
    label: str | None
    group: str  # the unit of the train/validation split
    table: TableFile | None = None  # kind "table": the file, its columns and its name


def reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def source_hash(path: str) -> str:
    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]


def key_prefix(path: str) -> str:
    """What the keys of a file's samples start with: its name, and a hash of its path."""
    return f"{safe_key_part(Path(path).stem)}-{source_hash(path)}"


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
    return SlidePlan(source.path, prefix=key_prefix(source.path), mpp=mpp,
                     mpp_source=mpp_source, output_size=output_size,
                     windows=np.array(rows, dtype=WINDOW_ROW))


def plan_images(sources: list[Source]) -> list[ImagePlan]:
    """One record per patch image, in units of ``IMAGES_PER_UNIT`` images in source order."""
    plans = []
    for index, source in enumerate(sources):
        plans.append(ImagePlan(source.path, {
            "key": key_prefix(source.path),
            "unit": f"images-{index // IMAGES_PER_UNIT:06d}",
            "source": source.path,
            "source_type": "image",
            "level": 0,
            "x": 0,
            "y": 0,
            "label": source.label,
        }))
    return plans


@dataclass
class TablePlan:
    """The rows of one parquet file that belong to one split group (every row, without a group
    column), with their labels as codes; records are made one at a time, like a slide's."""

    source: str
    group: str
    prefix: str
    rows: np.ndarray  # int64 row numbers in the file, ascending
    labels: np.ndarray  # int32 per row into ``label_names``; -1: no label
    label_names: list[str]
    unit_starts: np.ndarray  # the first row of every read unit of the file (``table_units``)
    skipped: str | None = None
    kind = "table"

    def __len__(self) -> int:
        return len(self.rows)

    def key(self, index: int) -> str:
        return f"{self.prefix}-r{self.rows[index]:08d}"

    def _unit(self, number: int) -> str:
        return f"{self.prefix}-u{number:06d}"

    def _unit_numbers(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.unit_starts, rows, side="right") - 1

    def unit_of(self, index: int) -> str:
        return self._unit(int(self._unit_numbers(self.rows[index])))

    def units(self) -> Iterator[tuple[str, np.ndarray]]:
        """(unit, indices of its rows) for every unit, in row order."""
        numbers = self._unit_numbers(self.rows)
        unique, starts = np.unique(numbers, return_index=True)
        bounds = [*starts.tolist(), len(self.rows)]
        for number, start, end in zip(unique.tolist(), bounds[:-1], bounds[1:], strict=True):
            yield self._unit(number), np.arange(start, end)

    def record(self, index: int) -> dict:
        code = int(self.labels[index])
        return {
            "key": self.key(index),
            "unit": self.unit_of(index),
            "source": self.source,
            "source_type": "table",
            "row": int(self.rows[index]),
            "group": self.group,
            "label": self.label_names[code] if code >= 0 else None,
        }


def row_groups(table_file: TableFile, group_column: str | None) -> tuple[np.ndarray, list[str]]:
    """The split group of every row of a file, as codes into group names: the group column's
    value, or the file's name (inside its table) without a group column or a value."""
    if group_column is None:
        return np.zeros(table_file.num_rows(), np.int32), [table_file.name]
    codes, names = table_file.column_codes(group_column)
    if (codes < 0).any():
        if table_file.name not in names:
            names = [*names, table_file.name]
        codes = np.where(codes < 0, names.index(table_file.name), codes)
    return codes, names


def table_units(row_group_bounds: list[int]) -> np.ndarray:
    """The first row of every read unit of a file: consecutive small row groups joined until a
    unit holds ``TABLE_ROWS_PER_UNIT`` rows, a big one cut into at most ``UNITS_PER_ROW_GROUP``
    units of at least that many."""
    starts, open_start = [], None
    for begin, end in itertools.pairwise(row_group_bounds):
        if end - begin > TABLE_ROWS_PER_UNIT:
            piece = max(TABLE_ROWS_PER_UNIT, -(-(end - begin) // UNITS_PER_ROW_GROUP))
            starts.extend(range(begin, end, piece))
            open_start = None
        elif open_start is None or begin - open_start >= TABLE_ROWS_PER_UNIT:
            starts.append(begin)
            open_start = begin
    return np.array(starts or [0], dtype=np.int64)


def plan_table(sources: list[Source], options: PackOptions) -> list[TablePlan]:
    """The plans of a parquet file's sources (one per split group), in their order."""
    table_file = sources[0].table
    groups, group_names = row_groups(table_file, options.group_column)
    if options.label_column:
        labels, label_names = table_file.column_codes(options.label_column)
    else:
        labels, label_names = np.full(len(groups), -1, np.int32), []
    units = table_units(table_file.row_group_bounds())
    order = np.argsort(groups, kind="stable")  # the rows of each group together, ascending
    bounds = np.searchsorted(groups[order], np.arange(len(group_names) + 1))
    code_of = {name: code for code, name in enumerate(group_names)}
    plans = []
    for source in sources:
        code = code_of[source.group]
        rows = order[bounds[code]:bounds[code + 1]]
        plans.append(TablePlan(source.path, source.group, key_prefix(source.path), rows,
                               labels[rows], label_names, units))
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


class ReadPatch(NamedTuple):
    """A patch as read: its pixels, what reading it taught (metadata), its table embedding."""

    pixels: np.ndarray
    learnt: dict
    embedding: np.ndarray | None = None


def read_patch_image(file, output_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A patch image (a path or a binary stream) as RGB pixels at ``output_size``, the one
    resize of every patch image and table row, and its (width, height) before."""
    with Image.open(file) as image:
        image.load()
        size = image.size
        pixels = np.asarray(image.convert("RGB"))
    return slides.resize_patch(pixels, output_size), size


def _learnt_from_size(width: int, height: int) -> dict:
    return {"patch_size": max(width, height), "original_size": [width, height]}


# Unit readers yield (record, the patch or why it could not be read) for every record of a unit.


def _read_slide_unit(job: UnitJob) -> Iterator[tuple[dict, ReadPatch | str]]:
    try:
        slide = _slide(job.records[0]["source"])
    except Exception as error:  # readable when planned, not now: its patches are skipped
        yield from ((record, reason(error)) for record in job.records)
        return
    windows = [_window(record) for record in job.records]
    for record, pixels in zip(job.records, slides.read_windows(slide, windows, job.output_size),
                              strict=True):
        yield record, reason(pixels) if isinstance(pixels, Exception) else ReadPatch(pixels, {})


def _read_image_unit(job: UnitJob) -> Iterator[tuple[dict, ReadPatch | str]]:
    for record in job.records:
        try:
            pixels, size = read_patch_image(record["source"], job.output_size)
        except Exception as error:  # a corrupt image is skipped and reported
            yield record, reason(error)
            continue
        yield record, ReadPatch(pixels, _learnt_from_size(*size))


def _read_table_unit(job: UnitJob) -> Iterator[tuple[dict, ReadPatch | str]]:
    """The unit's rows in one streaming pass over its range of the file, in row order (its
    records come from several group plans), decoded by the table reader at the shards' size."""
    options = job.options
    table_file = TableFile(Path(job.records[0]["source"]),
                           TableColumns(options.image_column, embedding=options.embedding_column))
    records = deque(sorted(job.records, key=lambda record: record["row"]))
    first, last = records[0]["row"], records[-1]["row"]
    for number, row in enumerate(table_file.rows(first, last + 1), start=first):
        patch = row.skipped or ReadPatch(row.image, _learnt_from_size(*row.original_size),
                                         row.embedding)
        while records and records[0]["row"] == number:
            yield records.popleft(), patch
    for record in records:  # the file lost rows since the plan was made
        yield record, f"row {record['row']} is no longer in {table_file.path.name}"


UNIT_READERS = {"slide": _read_slide_unit, "image": _read_image_unit, "table": _read_table_unit}


def spool_unit(job: UnitJob) -> int:
    """Read, resize and encode every patch of a unit into its spool; returns the patch count."""
    entries, metadata, embeddings, skipped = {}, {}, {}, {}
    offset = 0
    read = UNIT_READERS[job.records[0]["source_type"]](job)
    with atomic_path(spool_path(job.spool_dir, job.unit)) as temporary, \
            open(temporary, "wb") as spool:
        for record, patch in read:
            key = record["key"]
            if isinstance(patch, str):  # why it could not be read
                skipped[key] = patch
                continue
            try:
                data = encode_image(patch.pixels, job.options.image_format,
                                    job.options.jpeg_quality)
            except Exception as error:
                skipped[key] = reason(error)
                continue
            entries[key] = [offset, len(data)]
            offset += spool.write(data)
            if patch.learnt:
                metadata[key] = patch.learnt
            if patch.embedding is not None:
                vector = np.ascontiguousarray(patch.embedding, dtype=np.float32).tobytes()
                embeddings[key] = [offset, len(vector)]
                offset += spool.write(vector)
        index = json.dumps({"fingerprint": job.fingerprint, "entries": entries,
                            "metadata": metadata, "embeddings": embeddings,
                            "skipped": skipped}).encode()
        spool.write(index + TRAILER.pack(len(index)))
    return len(job.records)


class SpooledPatch(NamedTuple):
    image_bytes: bytes  # encoded in the shard's image format
    learnt: dict  # metadata learnt reading it
    embedding: np.ndarray | None  # float32, from a table's embedding column


class SpoolReader:
    """Encoded patches out of spools, by record: the bytes, the metadata learnt reading it and
    its table embedding.

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

    def read(self, record: dict) -> SpooledPatch:
        """Raises ``ValueError`` with the reason when the patch could not be read."""
        unit, key = record["unit"], record["key"]
        handle = self._file(unit)
        if unit not in self.indexes:
            self.indexes[unit] = read_spool_index(handle)
        index = self.indexes[unit]
        if key in index["skipped"]:
            raise ValueError(index["skipped"][key])
        offset, length = index["entries"][key]
        embedding = None
        if key in index["embeddings"]:
            vector_offset, vector_length = index["embeddings"][key]
            embedding = np.frombuffer(os.pread(handle, vector_length, vector_offset), np.float32)
        return SpooledPatch(os.pread(handle, length, offset), index["metadata"].get(key, {}),
                            embedding)

    def _file(self, unit: str) -> int:
        if unit in self.files:
            self.files.move_to_end(unit)
        else:
            if len(self.files) >= self.max_open:
                os.close(self.files.popitem(last=False)[1])
            self.files[unit] = os.open(spool_path(self.spool_dir, unit), os.O_RDONLY)
        return self.files[unit]
