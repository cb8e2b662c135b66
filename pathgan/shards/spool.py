"""Reading and spooling: each read unit's patches read once, resized, encoded into a spool file.

``spool_unit`` (run in worker processes) reads a unit once (each tile of its region decoded
once), resizes and encodes every patch, and writes ``<unit>.spool``: the encoded patches one
after another, then a JSON index (key -> offset and length, or the reason the patch could not be
read), then the index's length (8 bytes, little-endian). A table row's precomputed embedding
(float32) follows its patch, and the index says where. One file per unit, landed atomically (one
fsync); spools depend only on the plan, so their bytes are deterministic and a rerun keeps every
spool already written. ``SpoolReader`` reads them back for shard assembly (``assemble.py``).

Like ``plan.py``, this module is imported by the worker processes: it imports no torch.
"""

import json
import os
import struct
from collections import OrderedDict, defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pathgan.core.fileio import atomic_path
from pathgan.shards import slides
from pathgan.shards.format import IMAGE_SIDE, encode_image
from pathgan.shards.options import PackOptions
from pathgan.shards.patches import read_patch_image, skip_reason
from pathgan.shards.tables import TableColumns, TableFile

TRAILER = struct.Struct("<Q")  # a spool ends with the length of its index


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


def _learnt_from_size(width: int, height: int) -> dict:
    return {"patch_size": max(width, height), "original_size": [width, height]}


def _read_slide_unit(job: UnitJob) -> Iterator[tuple[dict, ReadPatch | str]]:
    try:
        slide = _slide(job.records[0]["source"])
    except Exception as error:  # readable when planned, not now: its patches are skipped
        yield from ((record, skip_reason(error)) for record in job.records)
        return
    windows = [_window(record) for record in job.records]
    for record, pixels in zip(job.records, slides.read_windows(slide, windows, job.output_size),
                              strict=True):
        yield record, (skip_reason(pixels) if isinstance(pixels, Exception)
                       else ReadPatch(pixels, {}))


def _read_image_unit(job: UnitJob) -> Iterator[tuple[dict, ReadPatch | str]]:
    for record in job.records:
        try:
            pixels, size = read_patch_image(record["source"], job.output_size)
        except Exception as error:  # a corrupt image is skipped and reported
            yield record, skip_reason(error)
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
                skipped[key] = skip_reason(error)
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


# --- what to spool --------------------------------------------------------------------------------


def units_to_read(plans: list, pending: list) -> dict[str, list[tuple]]:
    """unit -> [(plan, rows)] of every unit a pending shard draws from, slide by slide (a
    worker then mostly finds its slide already open); a unit of patch images spans plans."""
    needed = {plans[plan].unit_of(row) for job in pending for plan, row in job.members.tolist()}
    parts = defaultdict(list)
    for plan in plans:
        for unit, rows in plan.units():
            if unit in needed:
                parts[unit].append((plan, rows))
    return parts


def units_to_spool(plans: list, pending: list, spool_dir: Path, fingerprint: str
                   ) -> tuple[list[tuple], int, int]:
    """The units a pending shard draws from whose spool is not complete yet, as (unit, parts);
    the patches the pending shards draw in all, and how many of them are spooled already."""
    todo, done, total = [], 0, 0
    for unit, parts in units_to_read(plans, pending).items():
        count = sum(len(rows) for _, rows in parts)
        total += count
        if spool_is_complete(spool_dir, unit, fingerprint):
            done += count
        else:
            todo.append((unit, parts))
    return todo, done, total


def unit_jobs(todo: list[tuple], spool_dir: Path, fingerprint: str, options: PackOptions
              ) -> Iterator[UnitJob]:
    """The job of each unit to spool; a unit's records are made only when its job is sent."""
    for unit, parts in todo:
        records = [plan.record(row) for plan, rows in parts for row in rows]
        yield UnitJob(unit, records, str(spool_dir), fingerprint, options, IMAGE_SIDE)
