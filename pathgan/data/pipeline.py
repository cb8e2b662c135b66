"""The training pipeline: shards -> shuffled, decoded batches, the same count on every rank.

Each rank draws shards at random with replacement (``resampled=True``) and stops after a fixed
number of batches per epoch (``with_epoch``), so ranks never run out of data at different times
(a rank with fewer batches hangs DDP) whatever the shard count. Rank and worker seeds differ,
so ranks see different samples. A corrupt sample is skipped with a warning and counted.

The loader is a ``wds.WebLoader`` and must *not* go through ``accelerator.prepare`` (that would
dispatch every batch from rank 0).
"""

import gc
import itertools
import multiprocessing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import webdataset as wds

from pathgan.data.format import decode_sample, load_manifest, shard_paths
from pathgan.errors import PathganError
from pathgan.images import hwc_to_chw, uint8_to_signed


class SkipCounter:
    """Counts skipped samples across DataLoader worker processes (shared memory)."""

    def __init__(self) -> None:
        self._value = multiprocessing.get_context("fork").Value("q", 0)

    def add(self) -> None:
        with self._value.get_lock():
            self._value.value += 1

    @property
    def count(self) -> int:
        return int(self._value.value)


class DecodeSample:
    """Raw sample -> image tensor (uint8 CHW, or float in [-1, 1]); None when corrupt."""

    def __init__(self, counter: SkipCounter, as_uint8: bool) -> None:
        self.counter = counter
        self.as_uint8 = as_uint8

    def __call__(self, sample: dict):
        try:
            _, image, _ = decode_sample(sample)
        except Exception as error:
            self.counter.add()
            warnings.warn(f"skipping corrupt sample {sample.get('__key__')}: {error}",
                          stacklevel=1)
            return None
        pixels = hwc_to_chw(image)
        return pixels if self.as_uint8 else uint8_to_signed(pixels)


def _warn_and_count(counter: SkipCounter):
    def handler(error: Exception) -> bool:
        counter.add()
        warnings.warn(f"skipping unreadable shard data: {error}", stacklevel=1)
        return True

    return handler


@dataclass
class ImageStream:
    """An endless stream of batches cut into epochs of ``batches_per_epoch`` batches.

    Iterating an ``ImageStream`` yields one epoch. The worker processes and their shuffle
    buffers live across epochs: restarting them each epoch would refill every buffer.
    """

    loader: wds.WebLoader
    batches_per_epoch: int
    skipped: SkipCounter
    _batches: Iterator | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._batches is None:
            self._batches = iter(self.loader)
        return itertools.islice(self._batches, self.batches_per_epoch)

    def close(self) -> None:
        """Stop the worker processes (they would otherwise prefetch until exit)."""
        self._batches = None
        gc.collect()  # the loader's iterator shuts its workers down when it is collected


def train_samples(shards_dir: str | Path, split: str = "train") -> int:
    manifest = load_manifest(shards_dir)
    return sum(s["samples"] for s in manifest["shards"] if s["split"] == split)


def make_image_stream(
    shards_dir: str | Path,
    batch_size: int,
    world_size: int = 1,
    num_workers: int = 2,
    seed: int = 0,
    rank: int = 0,
    split: str = "train",
    shuffle_buffer: int = 1000,
    as_uint8: bool = False,
) -> ImageStream:
    """Batches of ``batch_size`` images (per rank) from a shard set's ``split``.

    One epoch is the split's sample count divided by the global batch (at least one batch),
    identical on every rank. ``as_uint8`` keeps pixels as uint8 so that the host-to-device copy
    moves 4x fewer bytes; the trainer then converts on the device with ``uint8_to_signed``.
    """
    urls = [str(path) for path in shard_paths(shards_dir, split)]
    if not urls:
        raise PathganError(f"{shards_dir} has no {split} shards")
    batches_per_epoch = max(1, train_samples(shards_dir, split) // (batch_size * world_size))
    counter = SkipCounter()
    dataset = (
        wds.WebDataset(
            urls,
            resampled=True,
            shardshuffle=False,  # ignored when resampling; set to silence the warning
            nodesplitter=None,  # resampling draws shards per rank; nothing to split
            handler=_warn_and_count(counter),
            seed=seed + 1000 * rank,
            empty_check=False,
        )
        .shuffle(shuffle_buffer)
        .map(DecodeSample(counter, as_uint8))
        .select(lambda image: image is not None)
        .batched(batch_size, collation_fn=torch.stack, partial=False)
    )
    loader = wds.WebLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
    )
    return ImageStream(loader, batches_per_epoch, counter)
