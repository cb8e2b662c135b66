"""The training pipeline: shards -> mixed, decoded batches, the same count on every rank.

Each DataLoader worker of each rank walks the split's shards in its own random order, pass after
pass, and stops nowhere: an epoch is a fixed number of batches (``batches_per_epoch``), so ranks
never run out of data at different times (a rank with fewer batches hangs DDP) whatever the
shard count. The order comes from ``seed``, the rank and the worker alone, so a stream can be
replayed; webdataset 1.0's own resampling ignores its ``seed=`` argument, hence
:class:`ShardOrder`.

A worker reads one shard at a time, and shards of one slide hold neighbouring patches, so a batch
formed inside one worker would be a strip of one slide at one magnification. Workers therefore
only decode, each image straight into a slot of a ring of batches that the main process mapped
before they forked (:class:`BatchRing`), and send the slot's number; the main process takes one
batch from every worker, permutes their images together, and copies them out as the batches it
hands on (into pinned memory with CUDA, for a fast uint8 host-to-device copy), freeing the slots.
Pixels are copied once after the codec, in the main process, and no shared memory is made per
batch (torch's default for a worker's batch: a fresh shared-memory file, whose first touch cost a
fifth of what decoding a PNG costs; BENCHMARKS.md, "One loader worker against its codec").

Unreadable data is skipped with a warning and counted. When nothing but failures come in a row
(``MAX_CONSECUTIVE_FAILURES`` across the rank's workers: every shard unreadable, every sample
corrupt), the stream stops with one clear error instead of skipping for ever.

The loader is a ``wds.WebLoader`` and must *not* go through ``accelerator.prepare`` (that would
dispatch every batch from rank 0).

**Labels.** Given the class names of a conditional run (``classes=``), each image reference
carries its label, read with the shard's headers (the ``.json`` members only), as the class's
index in ``classes`` (a sample whose label is not one of them is skipped like a corrupt one);
the ring holds a label beside each image row, the main process permutes images and labels
together, and its batches are ``(images, labels)``, uint8 (B, 3, 224, 224) and int64 (B,).
That pair is all a consumer (``train/real_data.py``) needs to keep labels with their images;
the decoded-patch cache (``train/cache.py``) carries them the same way.
"""

import gc
import itertools
import mmap
import multiprocessing
import os
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
from pathgan.core.images import uint8_to_signed
from pathgan.shards.format import IMAGE_SIDE, decode_image, load_manifest, shard_paths
from pathgan.shards.reading import (
    ImageRef,
    MemberReader,
    as_chw,
    image_batch_buffer,
    image_refs,
)

#: failures in a row (unreadable shards, corrupt samples) after which a rank's stream stops
MAX_CONSECUTIVE_FAILURES = 100


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


def index_shards(failures: FailureCounter, classes: list[str] | None = None):
    """Shard urls -> where each sample's image lies (:class:`~pathgan.shards.reading.ImageRef`),
    from the tar headers alone. The shuffle buffer then holds these references, not the bytes:
    a buffer of encoded images (118 MB per worker for 1000 PNG patches) cost 12% of a worker's
    time in memory traffic, and every image is now read just before it is decoded. An
    unreadable shard is counted, warned about and left for the next. With ``classes``, each
    reference carries its label, and one that is not among them is skipped as corrupt."""

    def stage(sources: Iterable[dict]) -> Iterator[ImageRef]:
        for source in sources:
            try:
                refs = list(image_refs(source["url"], labels=classes is not None))
            except PathganError as error:
                failures.failed("unreadable shard", error)
                continue
            for ref in refs:
                if classes is None or ref.label in classes:
                    yield ref
                else:
                    failures.failed(f"sample {ref.key} of {ref.url}", ValueError(
                        f"label {ref.label!r} is not one of {', '.join(classes)}"))

    return stage


class BatchRing:
    """Loader workers' batches in memory that the main process shares with them.

    One ring of ``slots`` batches (uint8 ``(size, 224, 224, 3)``) per worker, in anonymous
    shared memory mapped before the workers fork (no ``/dev/shm`` file, whose size containers
    limit). A worker takes a free slot (:meth:`acquire`), decodes into it and sends its number;
    the main process copies the images out and frees it (:meth:`release`). A semaphore per
    worker counts its free slots, so a worker never overwrites a batch not yet copied.
    """

    def __init__(self, workers: int, slots: int, size: int) -> None:
        context = multiprocessing.get_context("fork")
        self.shape = (workers, slots, size, IMAGE_SIDE, IMAGE_SIDE, 3)
        self._memory = mmap.mmap(-1, int(np.prod(self.shape)))  # MAP_SHARED | MAP_ANONYMOUS
        self.pixels = torch.frombuffer(self._memory, dtype=torch.uint8).view(self.shape)
        self._label_memory = mmap.mmap(-1, 8 * workers * slots * size)
        self.labels = torch.frombuffer(self._label_memory, dtype=torch.int64).view(
            workers, slots, size)  # each image row's class code (conditional runs)
        self._free = [context.Semaphore(slots) for _ in range(workers)]
        self._next = [0] * workers  # each worker's next slot (in its own process)
        self._closed = context.Event()
        self._parent = os.getpid()

    def acquire(self, worker: int) -> int | None:
        """A free slot of ``worker``'s ring (waiting for the main process to free one), or None
        when the stream is closing or the main process is gone."""
        while not self._free[worker].acquire(timeout=0.1):
            if self._closed.is_set() or os.getppid() != self._parent:
                return None
        slot = self._next[worker]
        self._next[worker] = (slot + 1) % self.shape[1]
        return slot

    def batch(self, worker: int, slot: int) -> torch.Tensor:
        return self.pixels[worker, slot]

    def batch_labels(self, worker: int, slot: int) -> torch.Tensor:
        return self.labels[worker, slot]

    def release(self, worker: int) -> None:
        self._free[worker].release()

    def close(self) -> None:
        """Let waiting workers go (the stream stops)."""
        self._closed.set()


@dataclass(frozen=True)
class RingBatch:
    """What a worker sends for a full batch: where it lies in the ring."""

    worker: int
    slot: int


@dataclass
class DecodeBatches:
    """Image references -> full batches of ``size`` images, each read and decoded straight into
    its row (channels last, no copy after the codec): into a slot of the ``ring`` in a loader
    worker (sending a :class:`RingBatch`), into a batch of its own in the main process (sending
    ``(images, labels)``). Corrupt samples are counted and skipped. With ``classes``, each
    row's class code (its reference's label) is written beside it; no other metadata is read."""

    size: int
    failures: FailureCounter
    ring: BatchRing | None
    classes: list[str] | None = None

    def __call__(self, refs: Iterable[ImageRef]) -> Iterator[RingBatch | tuple]:
        worker = torch.utils.data.get_worker_info()
        ring = self.ring if worker is not None else None
        codes = {name: code for code, name in enumerate(self.classes or ())}
        reader = MemberReader()
        batch = None
        try:
            for ref in refs:
                if batch is None:
                    slot = ring.acquire(worker.id) if ring is not None else None
                    if ring is not None and slot is None:
                        return  # the stream is closing
                    batch, labels = ((ring.batch(worker.id, slot),
                                      ring.batch_labels(worker.id, slot)) if ring is not None
                                     else (image_batch_buffer(self.size),
                                           torch.empty(self.size, dtype=torch.int64)))
                    filled = 0
                try:
                    decode_image(reader.read(ref), ref.extension, batch.numpy()[filled])
                except Exception as error:
                    self.failures.failed(f"corrupt sample {ref.key} of {ref.url}", error)
                    continue
                self.failures.succeeded()
                if codes:
                    labels[filled] = codes[ref.label]
                filled += 1
                if filled == self.size:
                    yield (RingBatch(worker.id, slot) if ring is not None
                           else (as_chw(batch), labels if codes else None))
                    batch = None
        finally:
            reader.close()


@dataclass
class HandOver:
    """Main process: the workers' batches -> the trainer's, each a copy of its own (in pinned
    memory when ``pin``), uint8 or float in [-1, 1].

    With ``mix``, one batch of every worker is taken at a time and their images are permuted
    together before they are cut into batches again, so each batch draws from every worker's
    shards; ring slots are freed as soon as their images are copied. With ``labelled``, each
    batch is ``(images, labels)``, the labels permuted with their images. The copies are numpy's,
    on one thread: ``torch.stack`` runs one OpenMP-parallel copy per sample, and while the
    loader workers keep every core busy each of those waits for threads that are not running.
    On an H200 node that cost 290 ms per batch of 128 (cProfile): bf16 training ran at 531
    images/s where its networks alone run 4678. ``bench/batch_stacking.py`` measures both ways.
    """

    ring: BatchRing | None
    workers: int
    mix: random.Random | None
    pin: bool
    as_uint8: bool
    labelled: bool = False

    def __call__(self, items: Iterable[RingBatch | tuple]) -> Iterator:
        group = []
        for item in items:
            group.append(item)
            if self.mix is None or len(group) == self.workers:
                yield from self._batches(group)
                group = []

    def _batches(self, group: list[RingBatch | tuple]) -> list:
        batches = [(as_chw(self.ring.batch(item.worker, item.slot)),
                    self.ring.batch_labels(item.worker, item.slot))
                   if isinstance(item, RingBatch) else item for item in group]
        images = [image for batch, _ in batches for image in batch]
        order = list(range(len(images)))
        if self.mix is not None:
            self.mix.shuffle(order)
        size = len(batches[0][0])
        out = [stack_samples([images[i] for i in order[start:start + size]], self.pin)
               for start in range(0, len(images), size)]
        if self.labelled:  # copied out with their images, in the same order
            codes = torch.cat([labels for _, labels in batches])[order]
            labels = list(codes.split(size))
        for item in group:  # every image is copied out: the slots may be refilled
            if isinstance(item, RingBatch):
                self.ring.release(item.worker)
        out = out if self.as_uint8 else [uint8_to_signed(batch) for batch in out]
        return list(zip(out, labels, strict=True)) if self.labelled else out


def stack_samples(samples: list[torch.Tensor], pin: bool = False) -> torch.Tensor:
    """Same-shaped CPU tensors -> one batch (in pinned memory when ``pin``), copied by numpy
    without torch's thread pool (see :class:`HandOver`). Images that are channels_last views
    (``(3, H, W)`` over ``(H, W, 3)`` memory, as the stream decodes them) give a channels_last
    batch: each is one plain copy, none is transposed."""
    first = samples[0]
    channels_last = first.dim() == 3 and first.permute(1, 2, 0).is_contiguous()
    if channels_last:
        samples = [sample.permute(1, 2, 0) for sample in samples]
    out = torch.empty((len(samples), *samples[0].shape), dtype=first.dtype, pin_memory=pin)
    np.stack([sample.numpy() for sample in samples], out=out.numpy())
    return as_chw(out) if channels_last else out


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
    ring: BatchRing | None = None
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
        if self.ring is not None:
            self.ring.close()  # workers waiting for a free slot stop waiting
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
    # Slots per worker: the batches the loader may have asked it for (prefetch), one being
    # mixed, one being filled.
    prefetch = 2
    ring = BatchRing(num_workers, prefetch + 2, batch_size) if num_workers else None
    decoded = wds.DataPipeline(
        ShardOrder(urls, seed, rank),
        index_shards(failures, classes),
        WorkerShuffle(shuffle_buffer, seed, rank),
        DecodeBatches(batch_size, failures, ring, classes),
    )
    loader = wds.WebLoader(
        decoded,
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch if num_workers > 0 else None,
        # The ring and the failure counter live in memory shared by fork: fork, whatever the
        # platform's default start method (spawn on macOS, forkserver from Python 3.14 on Linux).
        multiprocessing_context=multiprocessing.get_context("fork") if num_workers else None,
    )
    # A lone worker's samples are mixed by its own shuffle buffer.
    mix = random.Random(f"mixing/{seed}/{rank}") if num_workers > 1 else None
    hand_over = HandOver(ring, num_workers, mix, pin=torch.cuda.is_available(),
                         as_uint8=as_uint8, labelled=classes is not None)
    return ImageStream(loader.compose(hand_over), batches_per_epoch, failures, ring)
