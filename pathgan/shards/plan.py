"""Planning: every patch of every source as a sample record, before anything is read.

``plan_slide`` finds a slide's tissue windows (in a worker process) and turns them into sample
records, each tagged with its *read unit*: the level-aligned region of the slide it is read with
(``slides.region_cell``). Patch images are grouped into units of ``IMAGES_PER_UNIT``; the rows of
a parquet table (``tables.py``) into ranges of consecutive rows of a file (``table_units``), which
a worker reads in one streaming pass from the row group that holds the first one. A plan keeps
compact rows (a slide's windows in a numpy array); records (dicts) are made one at a time, when a
unit or a shard needs them.

Workers are spawned processes, and a spawned process imports the module of every function it
runs: this module imports neither torch nor webdataset (importing torch costs about 1.1 s of CPU
per worker, a tenth of the work on a gigapixel slide); the output size comes from the caller.
"""

import hashlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pathgan.shards import annotations as annotation_io
from pathgan.shards import slides
from pathgan.shards.format import safe_key_part
from pathgan.shards.options import PackOptions
from pathgan.shards.patches import skip_reason
from pathgan.shards.sources import Source
from pathgan.shards.tables import row_groups

IMAGES_PER_UNIT = 64
# A unit of table rows has at least this many rows (small row groups are joined), so that
# opening the file and reading its footer is paid once per this many patches ...
TABLE_ROWS_PER_UNIT = 256
# ... and a row group is cut into at most this many units: pyarrow reads a row group from its
# start, so each unit reads the rows before its own again (measured: 4 ms per 1000 rows of 28 kB
# images), which finer cuts of a big row group would pay many times over.
UNITS_PER_ROW_GROUP = 16
# Record fields that steer the pack and are not written into a sample's metadata.
PLAN_FIELDS = ("key", "unit")


def source_hash(path: str) -> str:
    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]


def key_prefix(path: str) -> str:
    """What the keys of a file's samples start with: its name, and a hash of its path."""
    return f"{safe_key_part(Path(path).stem)}-{source_hash(path)}"


# --- slides ---------------------------------------------------------------------------------------


# A slide's windows, one row each (about 70 bytes, where a dict record takes 2 KB): a pack of
# millions of patches keeps its whole plan in memory.
WINDOW_ROW = np.dtype([("x", "i8"), ("y", "i8"), ("size", "i8"), ("level", "i8"),
                       ("read_size", "i8"), ("tissue_fraction", "f8"), ("column", "i8"),
                       ("row", "i8"), ("label", "i1")])
LABELS = (None, "normal", "tumor")  # CAMELYON16's; a slide with named classes has its own


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
    label_names: tuple = LABELS  # what the windows' label codes stand for
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
            "label": self.label_names[label],
            "tissue_fraction": tissue_fraction,
        }


def slide_labels(source: Source, options: PackOptions):
    """A function (window -> label) for a slide, and the label names it can return: the classes
    of its annotation file, or ``source.label`` (what a slide without a file is, see
    ``sources.discover_sources``) for every window."""
    annotation_file = annotation_io.find_annotation(
        Path(options.annotations) if options.annotations else None, Path(source.path))
    if annotation_file is None:
        return (lambda window: source.label), (None, source.label)
    annotations = annotation_io.read_asap_xml(annotation_file)

    def label(window: slides.PatchWindow) -> str | None:
        return annotations.label(window.x, window.y, window.size, options.label_fraction)

    return label, (None, *sorted({*annotations.classes, annotations.outside} - {None}))


def label_names_of(names: tuple) -> tuple:
    """CAMELYON16's codes when they suffice (its plans stay as they were), else ``names``."""
    names = tuple(dict.fromkeys(names))  # unique, in order
    return LABELS if set(names) <= set(LABELS) else names


def plan_slide(source: Source, options: PackOptions, output_size: int) -> SlidePlan:
    """All tissue windows of one slide (those with a label only, under ``--labelled-only``),
    or the reason it was skipped."""
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
        label_of, names = slide_labels(source, options)
        slide.close()
    except Exception as error:  # an unreadable slide is skipped and reported, never fatal
        return SlidePlan(source.path, skipped=skip_reason(error))
    names = label_names_of(names)
    rows = []
    for window, (_, column, row) in zip(windows, cells, strict=True):
        label = label_of(window)
        if label is not None or not options.labelled_only:
            rows.append((window.x, window.y, window.size, window.level, window.read_size,
                         window.tissue_fraction, column, row, names.index(label)))
    return SlidePlan(source.path, prefix=key_prefix(source.path), mpp=mpp,
                     mpp_source=mpp_source, output_size=output_size,
                     windows=np.array(rows, dtype=WINDOW_ROW), label_names=names)


# --- patch images ---------------------------------------------------------------------------------


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


# --- tables ---------------------------------------------------------------------------------------


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
        if options.labelled_only:
            rows = rows[labels[rows] >= 0]
        plans.append(TablePlan(source.path, source.group, key_prefix(source.path), rows,
                               labels[rows], label_names, units))
    return plans
