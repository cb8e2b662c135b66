"""Random access to the samples of shards: an index of member offsets, and a Dataset.

``pathgan embed`` and ``pathgan eval`` read exactly the samples they need, decoded in DataLoader
workers, without streaming whole shards through WebDataset.
"""

import json
import re
import tarfile
from pathlib import Path

import torch

from pathgan.core.errors import PathganError
from pathgan.core.images import hwc_to_chw
from pathgan.shards.format import IMAGE_SIDE, decode_sample, shard_paths

# WebDataset's rule: the key is the member name up to the first dot of its last component.
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


def index_shard(path: str | Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {extension: (offset, size)})] in tar order, from the headers only."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                match = _MEMBER.match(member.name)
                if match is None:
                    continue
                key, extension = match.groups()
                samples.setdefault(key, {})[extension.lower()] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise PathganError(f"{path} is not a readable tar ({error})") from error
    return list(samples.items())


def iter_tar_samples(path: str | Path):
    """Yield ``(key, {extension: bytes})`` of every sample of a shard, in order."""
    entries = index_shard(path)
    with open(path, "rb") as handle:
        for key, members in entries:
            data = {}
            for extension, (offset, size) in members.items():
                handle.seek(offset)
                data[extension] = handle.read(size)
            yield key, data


def shard_keys(path: str | Path) -> list[str]:
    return [key for key, _ in index_shard(path)]


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
    decode is returned with its error instead of raising, so the job can list it as missing.
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

    def __getitem__(self, index: int):
        shard, key, members = self.items[index]
        try:
            raw = {"__key__": key}
            for extension, (offset, size) in members.items():
                raw[extension] = self._read(shard, offset, size)
            _, image, _ = decode_sample(raw)
            if image.shape[:2] != (IMAGE_SIDE, IMAGE_SIDE):
                raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, not 224x224")
            return index, hwc_to_chw(image).contiguous(), None
        except Exception as error:  # a corrupt sample is reported, never fatal
            return index, None, f"{type(error).__name__}: {error}"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}
        return state

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()


def collate_samples(items):
    """``ShardSamples`` items -> (indices decoded, uint8 batch or None, [(index, error)])."""
    good = [(index, image) for index, image, _ in items if image is not None]
    bad = [(index, error) for index, _, error in items if error is not None]
    images = torch.stack([image for _, image in good]) if good else None
    return [index for index, _ in good], images, bad
