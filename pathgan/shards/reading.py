"""Reading the samples of shards: streamed in order, or at their offsets (an index).

``pathgan shards verify`` and ``convert`` read whole shards in order (:func:`tar_samples`); the
training stream, ``pathgan embed`` and ``pathgan eval`` read the members they need at offsets
found from the headers (:func:`index_shard`, :func:`image_refs`, :class:`MemberReader`), decoded
in DataLoader workers (:class:`ShardSamples` for the jobs).

Tar headers are parsed here, not by Python's ``tarfile``: it decodes every field of every
header, and the pax header that each member of a pathgan shard carries, in Python; in a profile
of one training worker that took as long as decoding the PNG (BENCHMARKS.md, "One loader worker
against its codec"). Only regular files, their names (ustar, pax or GNU long names) and sizes
matter here; a header whose checksum is wrong or data that ends early is an error, as it is for
``tarfile``.
"""

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from pathgan.core.errors import PathganError
from pathgan.core.images import hwc_to_chw
from pathgan.shards.format import IMAGE_EXTENSIONS, IMAGE_SIDE, decode_sample_image, shard_paths

# WebDataset's rule: the key is the member name up to the first dot of its last component.
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
_WEBDATASET_META = re.compile(r"__[^/]*__($|/)")  # members webdataset's reader passes over
BLOCK = 512
_END_BLOCK = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")  # regular file types (7: contiguous)


class TarFormatError(ValueError):
    """A damaged header or data that ends early."""


@dataclass(frozen=True)
class TarMember:
    name: str
    offset: int  # of its data in the file
    size: int


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or base-256 (GNU) when its first bit is set."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad number {text!r} in a tar header") from None


def _checksum_ok(header: bytes) -> bool:
    try:
        stored = _number(header[148:156])
    except TarFormatError:
        return False
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the field counts as 8 spaces
    if stored == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 8 * 32
    return stored == signed  # what some old writers computed


def _pax_records(data: bytes) -> dict[str, str]:
    """``"%d %s=%s\\n"`` records of a pax extended header."""
    records, position = {}, 0
    while position < len(data) and data[position:position + 1] not in (b"", b"\0"):
        space = data.index(b" ", position)
        length = int(data[position:space])
        key, _, value = data[space + 1:position + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        position += length
    return records


def _header_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _read_exactly(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise TarFormatError(f"unexpected end of data ({len(data)} of {size} bytes)")
    return data


def tar_members(handle: BinaryIO, with_data: bool) -> Iterator[tuple[TarMember, bytes | None]]:
    """The regular files of a tar opened for reading at its start, in order, with their bytes
    when ``with_data`` (else the data is skipped by seeking). Raises :class:`TarFormatError`."""
    position, long_name, pax = 0, None, {}
    start = handle.tell()
    length = handle.seek(0, os.SEEK_END) - start  # seeking past a cut never fails: check sizes
    handle.seek(start)
    while True:
        header = handle.read(BLOCK)
        if not header or header == _END_BLOCK:
            return  # an archive may end without its end blocks (tarfile accepts that too)
        if len(header) < BLOCK or not _checksum_ok(header):
            raise TarFormatError(f"damaged tar header at byte {position}")
        kind = header[156:157]
        size = int(pax["size"]) if "size" in pax else _number(header[124:136])
        data_at = position + BLOCK
        if data_at + size > length:
            raise TarFormatError(f"the archive ends inside a member ({max(length - data_at, 0)} "
                                 f"of {size} bytes)")
        position = data_at + (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in (b"x", b"L"):  # a pax header or a GNU long name: about the next member
            data = _read_exactly(handle, size)
            pax, long_name = ((_pax_records(data), None) if kind == b"x"
                              else ({}, data.split(b"\0", 1)[0].decode("utf-8",
                                                                      "surrogateescape")))
        elif kind in _REGULAR:
            name = pax.get("path") or long_name or _header_name(header)
            pax, long_name = {}, None
            yield TarMember(name, data_at, size), _read_exactly(handle, size) if with_data else None
        else:  # directories, links, global pax headers: nothing to read
            pax, long_name = {}, None
        handle.seek(position)


def member_key(name: str) -> tuple[str, str] | None:
    """A member name -> (sample key, lower-case extension) by webdataset's rule; None for
    members that are not part of a sample."""
    if _WEBDATASET_META.search(name):
        return None
    match = _MEMBER.match(name)
    if match is None:
        return None
    key, extension = match.groups()
    return key, extension.lower()


def tar_samples(path: str | Path) -> Iterator[dict]:
    """The samples of a shard in order, as webdataset's reader gives them: ``{"__key__": key,
    "__url__": path, extension: bytes, ...}``. A damaged shard raises once the samples before
    the damage have been given."""
    current = None
    with open(path, "rb") as handle:
        for member, data in tar_members(handle, with_data=True):
            parts = member_key(member.name)
            if parts is None:
                continue
            key, extension = parts
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": str(path)}
            current[extension] = data
    if current is not None:
        yield current


def index_shard(path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {extension: (offset, size)})] in tar order, from the headers only."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with open(path, "rb") as handle:
            for member, _ in tar_members(handle, with_data=False):
                parts = member_key(member.name)
                if parts is not None:
                    samples.setdefault(parts[0], {})[parts[1]] = (member.offset, member.size)
    except (TarFormatError, OSError) as error:
        raise PathganError(f"{path} is not a readable tar ({error})") from error
    return list(samples.items())


@dataclass(frozen=True)
class ImageRef:
    """Where a sample's image member lies: what the training stream shuffles (a few dozen
    bytes) before it reads and decodes the image (:class:`MemberReader`)."""

    key: str
    url: str
    extension: str
    offset: int
    size: int
    label: str | None = None  # its metadata's label, when asked for (:func:`image_refs`)


def image_refs(path: str | Path, labels: bool = False) -> Iterator[ImageRef]:
    """The image member of every sample of a shard, from its headers (:func:`index_shard`);
    samples without one are passed over. With ``labels``, each carries its metadata's label
    (:func:`sample_labels`: the ``.json`` members are read, nothing else). Raises PathganError
    when the shard is unreadable."""
    url = str(path)
    entries = index_shard(path)
    found = sample_labels(path, entries) if labels else [None] * len(entries)
    for (key, members), label in zip(entries, found, strict=True):
        for extension in IMAGE_EXTENSIONS:
            if extension in members:
                yield ImageRef(key, url, extension, *members[extension], label)
                break


class MemberReader:
    """Reads members at their offsets, keeping the last few shards open (one ``pread`` each)."""

    def __init__(self, keep_open: int = 4) -> None:
        self.keep_open = keep_open
        self._open: dict[str, int] = {}  # url -> file descriptor, oldest first

    def read(self, ref: ImageRef) -> bytes:
        descriptor = self._open.pop(ref.url, None)
        if descriptor is None:
            descriptor = os.open(ref.url, os.O_RDONLY)
            if len(self._open) >= self.keep_open:
                os.close(self._open.pop(next(iter(self._open))))
        self._open[ref.url] = descriptor  # now the newest
        data = os.pread(descriptor, ref.size, ref.offset)
        if len(data) != ref.size:
            raise TarFormatError(f"the shard ends inside this member ({len(data)} of "
                                 f"{ref.size} bytes)")
        return data

    def close(self) -> None:
        for descriptor in self._open.values():
            os.close(descriptor)
        self._open.clear()


def iter_tar_samples(path: str | Path):
    """Yield ``(key, {extension: bytes})`` of every sample of a shard, in order."""
    try:
        for sample in tar_samples(path):
            yield sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")}
    except (TarFormatError, OSError) as error:
        raise PathganError(f"{path} is not a readable tar ({error})") from error


def shard_keys(path: str | Path) -> list[str]:
    return [key for key, _ in index_shard(path)]


def image_batch_buffer(count: int) -> torch.Tensor:
    """An uninitialised uint8 ``(count, 224, 224, 3)`` batch for decoders to write into.

    Height, width, channels: what image codecs write, so no pixel is moved after decoding; seen
    as ``(count, 3, 224, 224)`` (:func:`as_chw`) it is a channels_last batch, the layout the
    trainer runs in. Inside a DataLoader worker it lies in shared memory from the start, so
    handing it to the main process copies nothing (what torch's default collate does too).
    """
    shape = (count, IMAGE_SIDE, IMAGE_SIDE, 3)
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


def as_chw(batch_hwc: torch.Tensor) -> torch.Tensor:
    """``(N, H, W, 3)`` -> the same memory seen as ``(N, 3, H, W)`` (channels_last)."""
    return batch_hwc.permute(0, 3, 1, 2)


@dataclass
class DecodedBatch:
    """What :meth:`ShardSamples.__getitems__` gives the DataLoader: the items decoded, their
    images (uint8 ``(N, 3, 224, 224)``, channels_last; None when none decoded) and the items
    that failed, with why."""

    indices: list[int]
    images: torch.Tensor | None
    failures: list[tuple[int, str]]

    def __iter__(self):  # unpacks as (indices, images, failures)
        return iter((self.indices, self.images, self.failures))

    def pin_memory(self) -> "DecodedBatch":
        """What a DataLoader with ``pin_memory=True`` calls (in its pinning thread)."""
        images = self.images.pin_memory() if self.images is not None else None
        return DecodedBatch(self.indices, images, self.failures)


def sample_labels(path: str | Path, entries: list) -> list[str | None]:
    """The ``label`` in each sample's metadata (``entries`` from :func:`index_shard`), read from
    the ``.json`` members alone; None for a sample without one."""
    labels = []
    with open(path, "rb") as handle:
        for _, members in entries:
            label = None
            if "json" in members:
                offset, size = members["json"]
                handle.seek(offset)
                try:
                    label = json.loads(handle.read(size)).get("label")
                except (ValueError, AttributeError):
                    label = None  # unreadable metadata: the sample is as good as unlabelled
            labels.append(None if label is None else str(label))
    return labels


def split_entries(shards_dir: str | Path, split: str | None = None) -> list[tuple[Path, list]]:
    """``(path, index_shard(path))`` of every shard of a split (all splits: None)."""
    return [(path, index_shard(path)) for path in shard_paths(shards_dir, split)]


def labelled_items(shards: list[tuple[Path, list]]) -> list[tuple[int, int, str | None]]:
    """``(shard, entry, label)`` of every sample of ``shards`` (from :func:`split_entries`)."""
    return [(shard, entry, label) for shard, (path, entries) in enumerate(shards)
            for entry, label in enumerate(sample_labels(path, entries))]


class ShardSamples(torch.utils.data.Dataset):
    """Samples of several shards as one map-style dataset, decoded in DataLoader workers.

    Item ``i`` -> ``(i, 3x224x224 uint8 tensor or None, error or None)``; a sample that does not
    decode is returned with its error instead of raising, so the job can list it as missing. A
    DataLoader with a batch size takes whole batches (:meth:`__getitems__`, with
    ``collate_fn=collate_samples``): each image is decoded straight into its batch's memory.
    Only image members are read (metadata is not needed to embed or evaluate).
    """

    def __init__(self, shards: list[tuple[Path, list]]) -> None:
        self.paths = [path for path, _ in shards]
        self.items = [(s, key, members) for s, (_, entries) in enumerate(shards)
                      for key, members in entries]
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open(self.paths[shard], "rb")  # noqa: SIM115
        handle.seek(offset)
        return handle.read(size)

    def _decode(self, index: int, out: np.ndarray | None = None) -> np.ndarray:
        shard, key, members = self.items[index]
        raw = {"__key__": key}
        for extension, (offset, size) in members.items():
            if extension in IMAGE_EXTENSIONS:
                raw[extension] = self._read(shard, offset, size)
        image = decode_sample_image(raw, out)
        if image.shape[:2] != (IMAGE_SIDE, IMAGE_SIDE):
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, not 224x224")
        return image

    def __getitem__(self, index: int):
        try:
            return index, hwc_to_chw(self._decode(index)).contiguous(), None
        except Exception as error:  # a corrupt sample is reported, never fatal
            return index, None, f"{type(error).__name__}: {error}"

    def __getitems__(self, indices: list[int]) -> DecodedBatch:
        batch = image_batch_buffer(len(indices))
        pixels = batch.numpy()
        decoded, failures = [], []
        for index in indices:
            try:
                self._decode(index, pixels[len(decoded)])
                decoded.append(index)
            except Exception as error:  # a corrupt sample is reported, never fatal
                failures.append((index, f"{type(error).__name__}: {error}"))
        images = as_chw(batch[:len(decoded)]) if decoded else None
        return DecodedBatch(decoded, images, failures)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def collate_samples(batch: DecodedBatch) -> DecodedBatch:
    """The DataLoader's ``collate_fn`` for :class:`ShardSamples`: its ``__getitems__`` has
    formed the batch already (unpacks as ``(indices decoded, uint8 batch or None, [(index,
    error)])``)."""
    return batch
