"""The training pipeline: shards -> mixed, decoded batches, the same count on every rank.

Each DataLoader worker of each rank walks the split's shards in its own random order, pass after
pass, and stops nowhere: an epoch is a fixed number of batches (``batches_per_epoch``), so ranks
never run out of data at different times (a rank with fewer batches hangs DDP) whatever the
shard count. The order comes from ``seed``, the rank and the worker alone, so a stream can be
replayed; webdataset 1.0's own resampling ignores its ``seed=`` argument, hence
:class:`ShardOrder`.

A worker reads one shard at a time, and shards of one slide hold neighbouring patches, so a batch
formed inside one worker would be a strip of one slide at one magnification. Workers therefore
only decode; the main process unbatches what they send, mixes samples of every worker in a
shuffle buffer and forms the batches, stacking each into pinned memory (with CUDA) for a fast
uint8 host-to-device copy.

Unreadable data is skipped with a warning and counted. When nothing but failures come in a row
(``MAX_CONSECUTIVE_FAILURES`` across the rank's workers: every shard unreadable, every sample
corrupt), the stream stops with one clear error instead of skipping for ever.

The loader is a ``wds.WebLoader`` and must *not* go through ``accelerator.prepare`` (that would
dispatch every batch from rank 0).

**Labels.** Given the class names of a conditional run (``classes=``), each sample is decoded
with its label, as the class's index in ``classes`` (a sample whose label is not one of them
is skipped like a corrupt one), and every stage carries the pair: worker batches, the mixing
buffer and the main process's batches are ``(images, labels)``, uint8 (B, 3, 224, 224) and
int64 (B,). That pair is all a consumer (``train/real_data.py``, or a device-side cache of
decoded patches) needs to keep labels with their images.
"""

import gc
import itertools
import multiprocessing
import queue
import random
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from pathgan.core.errors import PathganError
from pathgan.core.images import hwc_to_chw, uint8_to_signed
from pathgan.shards.format import decode_sample, load_manifest, shard_paths

#: failures in a row (unreadable shards, corrupt samples) after which a rank's stream stops
MAX_CONSECUTIVE_FAILURES = 100
#: batches of every worker that the main process's mixing buffer holds
MIXED_BATCHES_PER_WORKER = 2


class FailureCounter:
    """Skipped inputs and failures in a row, shared by a rank's DataLoader workers.

    Any good sample, in any worker, ends a run of failures; a run of ``limit`` stops the stream.
    """

    def __init__(self, limit: int, stop_message: str) -> None:
        context = multiprocessing.get_context("fork")
        self._skipped = context.Value("q", 0)
        self._in_a_row = context.RawValue("q", 0)  # updated under _skipped's lock
        self._stopped = context.RawValue("b", 0)
        self.limit = limit
        self.stop_message = stop_message

    def failed(self, what: str, error: Exception) -> None:
        with self._skipped.get_lock():
            self._skipped.value += 1
            self._in_a_row.value += 1
            in_a_row = self._in_a_row.value
        warnings.warn(f"skipping {what}: {error}", stacklevel=2)
        if in_a_row >= self.limit:
            self._stopped.value = 1
            raise PathganError(self.stop_message)

    def succeeded(self) -> None:
        if self._in_a_row.value:  # read first: a good sample then costs no lock
            with self._skipped.get_lock():
                self._in_a_row.value = 0

    @property
    def count(self) -> int:
        """Samples and shard reads skipped so far."""
        return int(self._skipped.value)

    @property
    def stopped(self) -> bool:
        """Whether a worker stopped the stream (a good sample elsewhere does not undo that)."""
        return bool(self._stopped.value)


def worker_random(seed: int, rank: int, purpose: str) -> random.Random:
    """A random generator of this rank's current DataLoader worker, the same in every replay.

    String seeds are hashed with SHA-512, not Python's salted ``hash``: stable across runs.
    """
    worker = torch.utils.data.get_worker_info()
    return random.Random(f"{purpose}/{seed}/{rank}/{worker.id if worker else 0}")


class ShardOrder(torch.utils.data.IterableDataset):
    """Every shard once per pass, in a fresh random order each pass, for ever; one order per
    rank and worker, reproducible from the seed."""

    def __init__(self, urls: list[str], seed: int, rank: int) -> None:
        super().__init__()
        self.urls = list(urls)
        self.seed = seed
        self.rank = rank

    def __iter__(self) -> Iterator[dict]:
        rng = worker_random(self.seed, self.rank, "shards")
        while True:
            for url in rng.sample(self.urls, len(self.urls)):
                yield {"url": url}


@dataclass
class WorkerShuffle:
    """webdataset's sample shuffle buffer, seeded per rank and worker when the worker starts."""

    size: int
    seed: int
    rank: int

    def __call__(self, samples: Iterable) -> Iterator:
        rng = worker_random(self.seed, self.rank, "samples")
        return wds.shuffle(self.size, rng=rng)(samples)


class DecodeSample:
    """Raw sample -> image tensor (uint8 CHW, or float in [-1, 1]), or ``(image, class index)``
    when ``classes`` are given; None when corrupt (or its label is not one of the classes)."""

    def __init__(self, failures: FailureCounter, as_uint8: bool,
                 classes: list[str] | None = None) -> None:
        self.failures = failures
        self.as_uint8 = as_uint8
        self.codes = {name: code for code, name in enumerate(classes)} if classes else None

    def __call__(self, sample: dict):
        try:
            _, image, metadata = decode_sample(sample)
            code = self._code(metadata) if self.codes is not None else None
        except Exception as error:
            self.failures.failed(f"corrupt sample {sample.get('__key__')}", error)
            return None
        self.failures.succeeded()
        pixels = hwc_to_chw(image)
        pixels = pixels if self.as_uint8 else uint8_to_signed(pixels)
        return pixels if code is None else (pixels, code)

    def _code(self, metadata: dict) -> int:
        label = metadata.get("label")
        if label is None or str(label) not in self.codes:
            raise ValueError(f"label {label!r} is not one of {', '.join(self.codes)}")
        return self.codes[str(label)]


def collate(samples: list):
    """A worker's batch: stacked images, or (stacked images, int64 labels) of labelled ones."""
    if isinstance(samples[0], tuple):
        images, labels = zip(*samples, strict=True)
        return torch.stack(images), torch.tensor(labels, dtype=torch.int64)
    return torch.stack(samples)


def skip_unreadable_shard(failures: FailureCounter):
    """webdataset's error handler: count, warn, go on (until too many failures in a row)."""

    def handler(error: Exception) -> bool:
        failures.failed("unreadable shard data", error)
        return True

    return handler


def unbatch(batches: Iterable) -> Iterator:
    """Batches -> samples; a labelled batch (images, labels) -> (image, label) pairs. (The
    DataLoader hands a worker's tuple over as a list.)"""
    for batch in batches:
        yield from (zip(*batch, strict=True) if isinstance(batch, (tuple, list)) else batch)


@dataclass
class Batches:
    """Samples -> batches of ``size``, each stacked straight into pinned memory when ``pin``.

    A batch leaves as soon as it is full (webdataset's ``batched`` waits for one sample more).
    The copy is numpy's, on one thread: ``torch.stack`` runs one OpenMP-parallel copy per
    sample, and while the loader workers keep every core busy each of those waits for threads
    that are not running. On an H200 node that cost 290 ms per batch of 128 (cProfile): bf16
    training ran at 531 images/s where its networks alone run 4678. ``bench/batch_stacking.py``
    measures both ways.
    """

    size: int
    pin: bool

    def __call__(self, samples: Iterable) -> Iterator:
        batch = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.size:
                yield self._stack(batch)
                batch = []

    def _stack(self, batch: list):
        if isinstance(batch[0], tuple):  # (image, label) pairs: labels stay with their images
            images, labels = zip(*batch, strict=True)
            return stack_samples(list(images), self.pin), torch.stack(list(labels))
        return stack_samples(batch, self.pin)


def stack_samples(samples: list[torch.Tensor], pin: bool = False) -> torch.Tensor:
    """Same-shaped CPU tensors -> one batch (in pinned memory when ``pin``), copied by numpy
    without torch's thread pool (see :class:`Batches`)."""
    out = torch.empty((len(samples), *samples[0].shape), dtype=samples[0].dtype, pin_memory=pin)
    np.stack([sample.numpy() for sample in samples], out=out.numpy())
    return out


class BackgroundBatches:
    """Takes batches from an iterator in a thread, ``depth`` ahead of the consumer.

    The main process's share of the pipeline (receiving the workers' batches, mixing them,
    stacking each batch into pinned memory) runs here, overlapping the GPU steps instead of
    standing between them (numpy's copies release the GIL). An error in the thread is raised in
    the consumer.
    """

    _END = object()

    def __init__(self, batches: Iterator, depth: int = 2) -> None:
        self._batches = batches
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, name="pathgan-batches", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self) -> None:
        try:
            for batch in self._batches:
                if not self._put(batch):
                    return
            self._put(self._END)
        except BaseException as error:  # handed to the consumer, who raises it
            self._put(error)

    def __iter__(self) -> "BackgroundBatches":
        return self

    def __next__(self) -> torch.Tensor:
        item = self._queue.get()
        if item is self._END:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)  # at most one batch in flight; never hang an exit
        self._batches = None


@dataclass
class ImageStream:
    """An endless stream of batches cut into epochs of ``batches_per_epoch`` batches.

    Iterating an ``ImageStream`` yields one epoch (a :class:`pathgan.train.real_data.RealStream`).
    The worker processes and their shuffle buffers live across epochs: restarting them each
    epoch would refill every buffer.
    """

    loader: wds.WebLoader
    batches_per_epoch: int
    skipped: FailureCounter
    _batches: BackgroundBatches | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self._batches is None:
            self._batches = BackgroundBatches(iter(self.loader))
        try:
            yield from itertools.islice(self._batches, self.batches_per_epoch)
        except Exception:
            # A worker's error arrives wrapped in its traceback: say it in one line instead.
            if self.skipped.stopped:
                raise PathganError(self.skipped.stop_message) from None
            raise

    @property
    def skipped_samples(self) -> int:
        """Unreadable samples (and shard reads) skipped so far by this rank's workers."""
        return self.skipped.count

    def close(self) -> None:
        """Stop the batch thread and the worker processes (they would otherwise prefetch until
        exit)."""
        if self._batches is not None:
            self._batches.close()
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
    max_consecutive_failures: int = MAX_CONSECUTIVE_FAILURES,
    classes: list[str] | None = None,
) -> ImageStream:
    """Batches of ``batch_size`` images (per rank) from a shard set's ``split``; with
    ``classes``, ``(images, labels)`` batches (see the module docstring).

    One epoch is the split's sample count divided by the global batch (at least one batch),
    identical on every rank. The same ``seed``, rank and ``num_workers`` give the same batches.
    ``as_uint8`` keeps pixels as uint8 so that the host-to-device copy moves 4x fewer bytes; the
    trainer then converts on the device with ``uint8_to_signed``.
    """
    urls = [str(path) for path in shard_paths(shards_dir, split)]
    if not urls:
        raise PathganError(f"{shards_dir} has no {split} shards")
    batches_per_epoch = max(1, train_samples(shards_dir, split) // (batch_size * world_size))
    failures = FailureCounter(max_consecutive_failures, (
        f"no readable sample in {max_consecutive_failures} tries in a row from the {split} "
        f"shards of {shards_dir} (rank {rank}): check them with `pathgan shards verify "
        f"{shards_dir}` (the warnings above say what failed)"))
    decoded = wds.DataPipeline(
        ShardOrder(urls, seed, rank),
        wds.tarfile_to_samples(handler=skip_unreadable_shard(failures)),
        WorkerShuffle(shuffle_buffer, seed, rank),
        wds.map(DecodeSample(failures, as_uint8, classes)),
        wds.select(lambda sample: sample is not None),
        wds.batched(batch_size, collation_fn=collate, partial=False),  # for the transfer
    )
    loader = wds.WebLoader(
        decoded,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=4 if num_workers > 0 else None,
        # The failure counter lives in fork-shared memory: fork, whatever the platform's
        # default start method (spawn on macOS, forkserver from Python 3.14 on Linux).
        multiprocessing_context=multiprocessing.get_context("fork") if num_workers else None,
    )
    stages = [unbatch]
    if num_workers > 1:  # a lone worker's samples are mixed by its own shuffle buffer
        mixing = batch_size * num_workers * MIXED_BATCHES_PER_WORKER
        stages.append(wds.shuffle(mixing, initial=mixing,
                                  rng=random.Random(f"mixing/{seed}/{rank}")))
    stages.append(Batches(batch_size, pin=torch.cuda.is_available()))
    return ImageStream(loader.compose(*stages), batches_per_epoch, failures)
