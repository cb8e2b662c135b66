"""Patch tables: parquet data sets read row by row, for ``pathgan shards pack``.

A table is a local ``.parquet`` file, a folder of them (searched recursively, in name order), or
``hf-dataset:ORG/NAME[@REVISION]``: a Hub data set already in the local Hugging Face cache
(``hf download ORG/NAME --repo-type dataset``; nothing is downloaded here). Files are read with
pyarrow a batch of rows at a time, so memory stays bounded whatever the table's size.

Columns: ``image`` (encoded image bytes, or the Hugging Face ``Image`` struct
``{bytes, path}``), and optionally a label, a group (the unit of the train/validation split) and
a precomputed embedding (a list of numbers). Each row comes out as a :class:`TableRow` with the
image decoded and resized to 224x224 RGB exactly as pack resizes patch images. Every file's
columns and the first image are checked when the table is opened, so a wrong column or an
encoding PIL cannot read is a one-line error before any work; a corrupt image further down is
handed on with the reason (``skipped``), for pack to count and report.

A :class:`TableFile` reads any range of one file's rows (pack's workers read their units so) and
whole label or group columns as compact codes (pack's plan reads them so).
"""

import bisect
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pathgan.core.errors import PathganError
from pathgan.shards.format import IMAGE_SIDE, safe_key_part
from pathgan.shards.patches import read_patch_image, skip_reason

DATASET_SPEC = re.compile(r"hf-dataset:(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
DEFAULT_BATCH_ROWS = 256
#: Read column chunks through a 1 MiB stream rather than pre-buffering whole row groups (made
#: for object stores): on a local file that keeps pyarrow's memory near one row group's size.
READ_OPTIONS = {"pre_buffer": False, "buffer_size": 1 << 20}


@dataclass(frozen=True)
class TableColumns:
    image: str = "image"
    label: str | None = None
    group: str | None = None
    embedding: str | None = None

    def named(self) -> list[str]:
        """The columns to read, each once (a label may also be the group)."""
        names = (self.image, self.label, self.group, self.embedding)
        return list(dict.fromkeys(name for name in names if name))


@dataclass
class TableRow:
    row_id: str  # "<file key>-r<row>": stable for a given table, usable in a shard key
    image: np.ndarray | None  # 224x224x3 uint8; None when it could not be decoded
    label: str | None
    group: str | None
    embedding: np.ndarray | None  # float32 (D,)
    original_size: tuple[int, int] | None = None  # width, height before the resize
    skipped: str | None = None  # why ``image`` is None


def _pyarrow():
    try:
        import pyarrow  # the optional [parquet] extra
        import pyarrow.parquet
    except ImportError as error:
        raise PathganError("reading parquet needs pyarrow: pip install 'pathgan[parquet]'"
                           ) from error
    return pyarrow


# -- where the files are -----------------------------------------------------------------------
def cached_dataset(spec: str) -> Path:
    """The local snapshot of ``hf-dataset:ORG/NAME[@REVISION]``; never downloads."""
    match = DATASET_SPEC.fullmatch(spec)
    if not match:
        raise PathganError(f"{spec!r} is not a Hub data set: use hf-dataset:ORG/NAME or "
                           "hf-dataset:ORG/NAME@REVISION")
    # here: huggingface_hub takes 0.7 s to import, and the pack's workers import this module
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = match["repo"], match["revision"]
    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision,
                                      local_files_only=True))
    except LocalEntryNotFoundError as error:
        raise PathganError(
            f"{spec} is not in the local Hugging Face cache: download it first with `hf download "
            f"{repo} --repo-type dataset" + (f" --revision {revision}" if revision else "")
            + "` (gated data sets: accept their terms on the Hub and `hf auth login` first)"
        ) from error


def table_files(source: str) -> tuple[Path, list[Path]]:
    """The root a table's row ids are relative to, and its parquet files in name order."""
    root = cached_dataset(source) if source.startswith("hf-dataset:") else Path(source)
    if not root.exists():
        raise PathganError(f"table {source}: no such file or folder")
    if root.is_file():
        return root.parent, [root]
    files = sorted(path for path in root.rglob("*.parquet") if path.is_file())
    if not files:
        raise PathganError(f"table {source}: no .parquet files in it")
    return root, files


# -- checking the columns ----------------------------------------------------------------------
def _check_columns(path: Path, schema, columns: TableColumns) -> None:
    missing = [name for name in columns.named() if name not in schema.names]
    if missing:
        raise PathganError(f"{path.name} has no column {missing[0]!r} (its columns: "
                           f"{', '.join(schema.names)})")
    pa = _pyarrow()
    image_type = schema.field(columns.image).type
    if not (_is_binary(image_type) or (pa.types.is_struct(image_type)
                                        and _struct_has_bytes(image_type))):
        raise PathganError(f"unsupported image encoding in {path.name}: column "
                           f"{columns.image!r} holds {image_type}, not encoded image bytes "
                           "(binary, or the Hugging Face Image struct {bytes, path})")
    for name in (columns.label, columns.group):
        if name and pa.types.is_nested(schema.field(name).type):
            raise PathganError(f"column {name!r} of {path.name} holds "
                               f"{schema.field(name).type}, not one label or group per row")
    if columns.embedding:
        kind = schema.field(columns.embedding).type
        lists = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
        if not (any(test(kind) for test in lists) and (pa.types.is_floating(kind.value_type)
                                                       or pa.types.is_integer(kind.value_type))):
            raise PathganError(f"column {columns.embedding!r} of {path.name} holds {kind}, not a "
                               "list of numbers (an embedding per row)")


def _is_binary(kind) -> bool:
    pa = _pyarrow()
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _struct_has_bytes(kind) -> bool:
    index = kind.get_field_index("bytes")
    return index >= 0 and _is_binary(kind.field(index).type)


def _class_names(schema, column: str | None) -> list[str] | None:
    """The names of a Hugging Face ``ClassLabel`` column (stored as integers), if it is one."""
    if not column or not schema.metadata or b"huggingface" not in schema.metadata:
        return None
    try:
        features = json.loads(schema.metadata[b"huggingface"])["info"]["features"]
    except (KeyError, TypeError, ValueError):
        return None
    feature = features.get(column) or {}
    return feature.get("names") if feature.get("_type") == "ClassLabel" else None


# -- decoding ----------------------------------------------------------------------------------
def _image_bytes(value) -> bytes | None:
    return value.get("bytes") if isinstance(value, dict) else value


def decode_patch(data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
    """Encoded image bytes -> 224x224x3 uint8, resized like pack's patch images, and the
    original (width, height)."""
    return read_patch_image(io.BytesIO(data), IMAGE_SIDE)


def _reason_without_address(error: Exception) -> str:
    """:func:`skip_reason`, less the address PIL names an in-memory file by: reasons are then
    reproducible."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", skip_reason(error))


def _first_image(files: list[Path], column: str) -> tuple[Path, bytes] | None:
    pq = _pyarrow().parquet
    for path in files:
        with pq.ParquetFile(path, **READ_OPTIONS) as parquet_file:
            for batch in parquet_file.iter_batches(batch_size=16, columns=[column]):
                values = map(_image_bytes, batch.column(0).to_pylist())
                data = next((value for value in values if value is not None), None)
                if data is not None:
                    return path, data
    return None


def _check_first_image(files: list[Path], column: str) -> None:
    """A column of bytes PIL cannot read fails here, at once, rather than row by row."""
    first = _first_image(files, column)
    if first is None:
        return
    path, data = first
    try:
        decode_patch(data)
    except Exception as error:
        raise PathganError(f"unsupported image encoding in {path.name}, column {column!r}: its "
                           f"first image cannot be decoded ({_reason_without_address(error)})"
                           ) from error


@dataclass(frozen=True)
class TableFile:
    """One parquet file of a table: its rows, or any range of them, and its columns as codes.

    ``key`` starts its rows' ids; ``name`` is its path inside the table (``data/train-0.parquet``),
    the same on every machine. Nothing is checked here: :class:`PatchTable` checks when opened.
    """

    path: Path
    columns: TableColumns
    key: str = ""
    name: str = ""

    def num_rows(self) -> int:
        return self.row_group_bounds()[-1]

    def row_group_bounds(self) -> list[int]:
        """The first row of every row group, then the number of rows."""
        with _pyarrow().parquet.ParquetFile(self.path, **READ_OPTIONS) as parquet_file:
            return _row_group_bounds(parquet_file.metadata)

    def rows(self, start: int = 0, stop: int | None = None,
             batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[TableRow]:
        """Rows ``start`` to ``stop`` (default: the end), read from the row group holding
        ``start`` on: a worker reads its own range without reading the file before it."""
        pq = _pyarrow().parquet
        with pq.ParquetFile(self.path, **READ_OPTIONS) as parquet_file:
            names = {column: _class_names(parquet_file.schema_arrow, column)
                     for column in (self.columns.label, self.columns.group)}
            bounds = _row_group_bounds(parquet_file.metadata)
            stop = bounds[-1] if stop is None else min(stop, bounds[-1])
            first_group = bisect.bisect_right(bounds, start) - 1  # the one holding ``start``
            index = bounds[first_group]
            groups = range(first_group, len(bounds) - 1)
            for batch in parquet_file.iter_batches(batch_size=batch_rows, row_groups=groups,
                                                   columns=self.columns.named()):
                begin, end = max(start - index, 0), min(stop - index, batch.num_rows)
                if begin < end:
                    values = {name: batch.column(name).slice(begin, end - begin).to_pylist()
                              for name in batch.schema.names}
                    for offset in range(end - begin):
                        row_id = f"{self.key}-r{index + begin + offset:08d}"
                        yield self._row(row_id, values, offset, names)
                index += batch.num_rows
                if index >= stop:
                    return

    def column_codes(self, column: str) -> tuple[np.ndarray, list[str]]:
        """A column as text, compactly: an int32 code per row (-1: no value) and the texts."""
        pa = _pyarrow()
        with pa.parquet.ParquetFile(self.path, **READ_OPTIONS) as parquet_file:
            names = _class_names(parquet_file.schema_arrow, column)
            values = parquet_file.read(columns=[column]).column(0).combine_chunks()
        encoded = values.dictionary_encode()
        texts = [_text(value, names) for value in encoded.dictionary.to_pylist()]
        unique = sorted({text for text in texts if text is not None})
        code_of = {text: code for code, text in enumerate(unique)}
        recode = np.array([code_of.get(text, -1) for text in texts] + [-1],
                          dtype=np.int32)  # the last entry serves rows with no value
        indices = encoded.indices.fill_null(len(texts)).to_numpy(zero_copy_only=False)
        return recode[indices], unique

    def _row(self, row_id: str, values: dict, offset: int, names: dict) -> TableRow:
        columns = self.columns
        label, group = (_text(values[column][offset], names[column]) if column else None
                        for column in (columns.label, columns.group))
        embedding = values[columns.embedding][offset] if columns.embedding else None
        row = TableRow(row_id, None, label, group,
                       None if embedding is None else np.asarray(embedding, dtype=np.float32))
        data = _image_bytes(values[columns.image][offset])
        if data is None:
            row.skipped = "no image bytes in this row"
            return row
        try:
            row.image, row.original_size = decode_patch(data)
        except Exception as error:  # a corrupt image is handed on, counted by the caller
            row.skipped = _reason_without_address(error)
        return row


def _text(value, class_names: list[str] | None) -> str | None:
    """A label or group value as text; a ``ClassLabel`` integer as its name (-1: no value)."""
    if class_names is not None and isinstance(value, int):
        return class_names[value] if 0 <= value < len(class_names) else None
    return None if value is None else str(value)


def _row_group_bounds(metadata) -> list[int]:
    sizes = [metadata.row_group(group).num_rows for group in range(metadata.num_row_groups)]
    return np.cumsum([0, *sizes]).tolist()


class PatchTable:
    """A parquet table of patches, checked when opened; :meth:`rows` reads it batch by batch."""

    def __init__(self, source: str, columns: TableColumns = TableColumns()) -> None:
        pq = _pyarrow().parquet
        self.source, self.columns = source, columns
        self.root, paths = table_files(source)
        self.num_rows = 0
        for path in paths:
            try:
                with pq.ParquetFile(path, **READ_OPTIONS) as parquet_file:
                    _check_columns(path, parquet_file.schema_arrow, columns)
                    self.num_rows += parquet_file.metadata.num_rows
            except _pyarrow().ArrowException as error:
                raise PathganError(f"{path} is not a readable parquet file "
                                   f"({_reason_without_address(error)})") from error
        _check_first_image(paths, columns.image)
        self.files = [TableFile(path, columns, _file_key(path, self.root),
                                path.relative_to(self.root).as_posix()) for path in paths]

    def rows(self, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[TableRow]:
        for table_file in self.files:
            yield from table_file.rows(batch_rows=batch_rows)


def spread_rows(files: list[TableFile], count: int) -> list[TableRow]:
    """``count`` rows spread evenly over ``files`` taken as one table (every row when fewer):
    a sample that sees every part of a table, not only its first file."""
    sizes = [table_file.num_rows() for table_file in files]
    starts = np.cumsum([0, *sizes])
    picks = np.unique(np.linspace(0, starts[-1] - 1, min(count, starts[-1])).round())
    rows = []
    for pick in picks.astype(int).tolist():
        number = int(np.searchsorted(starts, pick, side="right")) - 1
        row = pick - int(starts[number])
        rows.extend(files[number].rows(row, row + 1))
    return rows


def _file_key(path: Path, root: Path) -> str:
    return safe_key_part(str(path.relative_to(root).with_suffix("")))


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
