"""Decoded patches held where the training step reaches them: on the GPU, or in host memory.

``data.cache`` (``auto | device | host | off``). At the start each rank decodes its share of
the split once, with the loader workers (``pathgan embed``'s reader: each image decoded straight
into a shared batch), a progress bar, and corrupt samples skipped and counted, into one uint8
tensor ``(N, 224, 224, 3)`` (channels last, as the codecs write and the trainer runs): on the
GPU when it fits in ``data.cache_fraction`` of the device's free memory, else in host memory
(pinned with CUDA) when it fits in that share of what the node's ranks can have, else the run
streams from the shards as without a cache. Every batch is then an index gather from a
permutation drawn per epoch from the seed, the epoch and the rank: no decoding, no
host-to-device copy with the device cache, and no Python per sample in a step. The same seed
replays the same batches, and a run resumed at step ``s`` continues epoch ``s //
batches_per_epoch`` of the same permutation where it stopped. The real embeddings of a run
that uses them, and the class code of each patch in a conditional run (``train/classes.py``),
travel in the same cache, row for row with their images; its batches carry the codes under
``labels_key(view)`` of each view, as the stream's do. With ``data.class_balance: balanced``
an epoch's rows are drawn with replacement, each class of the rank's share equally likely
(the stream's :class:`~pathgan.train.real_data.ClassBalancedStream` does the same from pools).

Rank shares are disjoint and cover the split: its samples in shard order, cut into one run per
rank (lengths differ by one at most; a rank reads only the shards its run touches). Every rank
yields the same number of batches per epoch: the smallest share's, in whole batches (a split
with fewer samples than one batch per rank is refused). The ranks agree on one mode: when
one of them cannot cache, they all stream (their epochs would otherwise differ in length).

At CAMELYON16 scale (a million 224-px patches, 150 GB of uint8) an 8-GPU node holds about 19 GB
per GPU; memory figures per GPU count are in BENCHMARKS.md ("Scale-out").
"""

import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from tqdm.auto import tqdm

from pathgan.core.errors import PathganError
from pathgan.shards.embedding_files import embedding_path, read_embedding_file
from pathgan.shards.format import IMAGE_SIDE, load_manifest
from pathgan.shards.reading import ShardSamples, collate_samples, index_shard, sample_labels
from pathgan.train.classes import Classes
from pathgan.train.objective import EMBEDDINGS, IMAGES, labels_key

IMAGE_BYTES = IMAGE_SIDE * IMAGE_SIDE * 3
CACHE_MODES = ("auto", "device", "host", "off")
PLACES = ("off", "host", "device")  # in order of preference: ranks agree on the lowest
FILL_BATCH = 64  # images per batch of the fill's loader


@dataclass(frozen=True)
class ShareItem:
    """One sample of a rank's share: its shard (index in the split) and place in it."""

    shard: int
    sample: int


def rank_shares(counts: list[int], world: int) -> list[list[ShareItem]]:
    """What each rank caches, from the split's shard sizes alone (every rank computes the same):
    the split's samples in shard order cut into ``world`` runs whose lengths differ by one at
    most, so a rank reads only the shards its run touches (its own, and at most two it shares
    with a neighbour)."""
    items = [ShareItem(shard, sample) for shard, count in enumerate(counts)
             for sample in range(count)]
    bounds = [len(items) * rank // world for rank in range(world + 1)]
    return [items[bounds[rank]:bounds[rank + 1]] for rank in range(world)]


@dataclass
class Placement:
    """Where a rank's cache goes, and the line that says why when it is not where asked."""

    place: str  # device | host | off
    note: str | None = None


def cache_bytes(samples: int, embedding_dim: int = 0) -> int:
    return samples * (IMAGE_BYTES + 4 * embedding_dim)


def choose_place(requested: str, need: int, device: torch.device, fraction: float,
                 ranks_on_node: int) -> Placement:
    """The best place for ``need`` bytes that ``requested`` allows: the device when it has a
    ``fraction`` of its free memory to spare, else host memory when the node's available
    memory, shared by its ranks, has that fraction to spare, else none (stream)."""
    if requested == "off":
        return Placement("off")
    notes = []
    if requested in ("auto", "device"):
        if device.type != "cuda":
            if requested == "device":
                notes.append(f"data.cache=device: {device} is not a GPU")
        else:
            free, _ = torch.cuda.mem_get_info(device)
            if need <= fraction * free:
                return Placement("device")
            notes.append(f"data.cache={requested}: {gigabytes(need)} do not fit in "
                         f"{fraction:g} of the {gigabytes(free)} free on {device}")
    available = psutil.virtual_memory().available / max(ranks_on_node, 1)
    if need <= fraction * available:
        note = "; ".join(notes) + "; caching in host memory instead" if notes else None
        return Placement("host", note)
    notes.append(f"{gigabytes(need)} do not fit in {fraction:g} of this rank's share of the "
                 f"host's available memory ({gigabytes(available)})")
    return Placement("off", "; ".join(notes) + "; streaming from the shards instead")


def gigabytes(count: int | float) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e8 else f"{count / 1e6:.1f} MB"


def allocate(place: str, shape: tuple, device: torch.device) -> torch.Tensor | None:
    """An uninitialised uint8 tensor at ``place``; None when the memory cannot be had (never
    an out-of-memory error: the caller falls back)."""
    try:
        if place == "device":
            return torch.empty(shape, dtype=torch.uint8, device=device)
        return torch.empty(shape, dtype=torch.uint8, pin_memory=device.type == "cuda")
    except (torch.OutOfMemoryError, RuntimeError, MemoryError):
        return None


def place_images(requested: str, count: int, need: int, device: torch.device,
                 fraction: float) -> tuple[torch.Tensor | None, Placement]:
    """The images tensor of a share of ``count`` samples (``need`` bytes with what travels
    with them) where :func:`choose_place` puts it, falling back when the allocation fails."""
    ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    shape = (count, IMAGE_SIDE, IMAGE_SIDE, 3)
    placement = choose_place(requested, need, device, fraction, ranks_on_node)
    if placement.place == "device":
        images = allocate("device", shape, device)
        if images is not None:
            return images, placement
        placement = choose_place("host", need, device, fraction, ranks_on_node)
        placement.note = (f"data.cache={requested}: {gigabytes(need)} could not be allocated "
                          f"on {device}; " + (placement.note or "caching in host memory"))
    if placement.place == "host":
        images = allocate("host", shape, device)
        if images is not None:
            return images, placement
        placement = Placement("off", f"data.cache={requested}: {gigabytes(need)} could not be "
                                     "allocated in host memory; streaming from the shards")
    return None, placement


class PatchCache:
    """A rank's share of the split, decoded, as a real-data stream of dict batches.

    Iterating yields one epoch: ``batches_per_epoch`` batches of ``batch_size`` samples, drawn
    without replacement from a permutation of the rank's samples seeded by (``seed``, epoch,
    rank); the first epoch starts at ``start_step``'s place in it. ``images`` (uint8 ``(N, 224,
    224, 3)``) and ``embeddings`` live on the device or in host memory; batches are on
    ``device`` either way, images as ``(B, 3, 224, 224)`` channels_last views.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], valid: torch.Tensor, batch_size: int,
                 batches_per_epoch: int, seed: int, rank: int, start_step: int,
                 device: torch.device, skipped: int, weights: torch.Tensor | None = None) -> None:
        self.tensors = tensors
        self.valid = valid  # int64 slots that hold a decoded sample (CPU)
        self.weights = weights  # per valid slot, for draws with replacement (balanced classes)
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed, self.rank, self.device = seed, rank, device
        self.epoch, self._first = divmod(start_step, batches_per_epoch)
        self.skipped_samples = skipped

    def order(self, epoch: int) -> torch.Tensor:
        """The epoch's permutation of this rank's slots (drawn on the CPU: the same on every
        device), every slot once; with ``weights``, the epoch's slots drawn with replacement."""
        generator = torch.Generator().manual_seed(
            hash_seed(self.seed, epoch, self.rank))
        if self.weights is not None:
            draws = self.batches_per_epoch * self.batch_size
            return self.valid[torch.multinomial(self.weights, draws, replacement=True,
                                                generator=generator)]
        return self.valid[torch.randperm(len(self.valid), generator=generator)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        order = self.order(self.epoch)
        first, self._first = self._first, 0
        self.epoch += 1
        on_device = {name: t.device == self.device for name, t in self.tensors.items()}
        slots = {True: order.to(self.device), False: order}  # one copy per epoch
        for index in range(first, self.batches_per_epoch):
            rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
            batch = {}
            for name, tensor in self.tensors.items():
                picked = slots[on_device[name]][rows]
                batch[name] = self._gather(tensor, picked, on_device[name])
            batch[IMAGES] = batch[IMAGES].permute(0, 3, 1, 2)  # channels_last (B, 3, H, W)
            yield batch

    def _gather(self, tensor: torch.Tensor, picked: torch.Tensor,
                on_device: bool) -> torch.Tensor:
        if on_device:
            return tensor.index_select(0, picked)
        # Host cache: gather into pinned memory (with CUDA), then one asynchronous copy; the
        # caching host allocator keeps that memory until the copy is done.
        out = torch.empty((len(picked), *tensor.shape[1:]), dtype=tensor.dtype,
                          pin_memory=self.device.type == "cuda")
        torch.index_select(tensor, 0, picked, out=out)
        return out.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Let the memory go."""
        self.tensors = {}


def hash_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (a permutation per seed, epoch and rank)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) % (1 << 63)
    return value


@dataclass
class ShareReader:
    """A rank's share as ``pathgan embed``'s reader sees samples: a Dataset whose item ``i``
    is the share's slot ``i``, and the keys of the slots."""

    dataset: ShardSamples
    keys: list[str]
    shards: list[str]  # the shard name of each slot
    parts: list[tuple[Path, list]]  # each shard's path and the entries of its slots, in order


def share_reader(shards_dir: Path, shards: list[dict], share: list[ShareItem]) -> ShareReader:
    """Index the shards the share touches (headers only) and keep the share's samples."""
    wanted: dict[int, list[int]] = {}
    for item in share:
        wanted.setdefault(item.shard, []).append(item.sample)
    parts, keys, names = [], [], []
    for shard, samples in wanted.items():
        path = shards_dir / shards[shard]["name"]
        entries = index_shard(path)
        if len(entries) != shards[shard]["samples"]:
            raise PathganError(f"{path} holds {len(entries)} samples, its manifest says "
                               f"{shards[shard]['samples']}: check the set with `pathgan "
                               f"shards verify {shards_dir}`")
        chosen = [entries[sample] for sample in samples]
        parts.append((path, chosen))
        keys += [key for key, _ in chosen]
        names += [shards[shard]["name"]] * len(chosen)
    return ShareReader(ShardSamples(parts), keys, names, parts)


def fill_images(images: torch.Tensor, reader: ShareReader, workers: int, progress: bool,
                max_in_a_row: int, label: str) -> tuple[torch.Tensor, int]:
    """Decode every sample of the share into its slot of ``images`` (loader workers, a
    progress bar); returns a mask of the slots filled and the number of corrupt samples
    skipped (each warned about). Stops with one line after ``max_in_a_row`` failures in a row.
    """
    filled = torch.zeros(len(reader.keys), dtype=torch.bool)
    loader = torch.utils.data.DataLoader(
        reader.dataset, batch_size=FILL_BATCH, num_workers=workers,
        collate_fn=collate_samples, prefetch_factor=2 if workers else None)
    skipped = in_a_row = 0
    with tqdm(total=len(reader.keys), desc=label, unit="patch", disable=not progress,
              file=sys.stdout, dynamic_ncols=True, mininterval=1.0) as bar:
        for indices, batch, failures in loader:
            if batch is not None:
                slots = torch.tensor(indices)
                images.index_copy_(0, slots.to(images.device),
                                   batch.permute(0, 2, 3, 1).to(images.device))
                filled[slots] = True
                in_a_row = 0
            for index, error in failures:
                warnings.warn(f"skipping corrupt sample {reader.keys[index]}: {error}",
                              stacklevel=2)
                skipped += 1
                in_a_row += 1
                if in_a_row >= max_in_a_row:
                    raise PathganError(
                        f"no readable sample in {max_in_a_row} tries in a row while caching "
                        f"(last: {reader.keys[index]} of {reader.shards[index]}): check the "
                        "shards with `pathgan shards verify`")
            bar.update(len(indices) + len(failures))
    reader.dataset.close()
    return filled, skipped


def share_labels(reader: ShareReader, names: tuple[str, ...]) -> torch.Tensor:
    """Each slot's class: the index in ``names`` of its metadata's ``label``, -1 for none (a
    conditional run's split has none: ``train/classes.py`` refuses it first)."""
    code_of = {name: code for code, name in enumerate(names)}
    labels = [code_of.get(label, -1) for path, entries in reader.parts
              for label in sample_labels(path, entries)]
    return torch.tensor(labels, dtype=torch.int64)


def share_embeddings(shards_dir: Path, encoder_id: str, reader: ShareReader
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The precomputed embedding of every slot (float32 rows, zeros where missing) and which
    slots have one (a sample that was corrupt when embedded has none)."""
    rows: dict[str, np.ndarray] = {}
    for name in dict.fromkeys(reader.shards):
        data = read_embedding_file(embedding_path(shards_dir, encoder_id, name))
        rows.update(zip(data["keys"], data["embeddings"], strict=True))
    dim = len(next(iter(rows.values()))) if rows else 0
    table = np.zeros((len(reader.keys), dim), dtype=np.float32)
    present = torch.zeros(len(reader.keys), dtype=torch.bool)
    for slot, key in enumerate(reader.keys):
        if key in rows:
            table[slot] = rows[key]
            present[slot] = True
    return torch.from_numpy(table), present


def balanced_weights(labels: torch.Tensor, classes: Classes, rank: int) -> torch.Tensor:
    """Per slot, 1 / its class's count in the share: each class of the share equally likely.
    A class that the rank's share lacks cannot be drawn there (one line says so)."""
    counts = torch.bincount(labels, minlength=len(classes.names))
    missing = [name for name, count in zip(classes.names, counts.tolist(), strict=True)
               if not count]
    if missing:
        print(f"rank {rank}: data cache: its share has no sample of class(es) "
              f"{', '.join(missing)}; balanced batches draw the others", flush=True)
    return 1.0 / counts[labels].double()


def build_cache(config, inputs: set[str], accelerator, encoder_id: str | None,
                start_step: int, classes: Classes | None = None) -> PatchCache | None:
    """The rank's :class:`PatchCache` as ``data.cache`` asks and memory allows; None when the
    run streams instead (``off``, or some rank cannot hold its share: every rank then
    streams). Every rank calls it (the ranks agree where to cache and on the epoch).
    ``classes``: those of a conditional run, whose codes the batches carry."""
    if config.data.cache == "off" or IMAGES not in inputs:
        return None
    shards_dir = Path(config.data.shards)
    manifest = load_manifest(shards_dir)
    shards = [s for s in manifest["shards"] if s["split"] == config.data.split]
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = config.train.batch_size // world
    shares = rank_shares([s["samples"] for s in shards], world)
    sizes = [len(share) for share in shares]
    if min(sizes) < per_rank:
        raise PathganError(
            f"the {config.data.split} split of {shards_dir} has {sum(sizes)} samples: the "
            f"smallest share of its {world} rank(s) is {min(sizes)}, fewer than one batch of "
            f"{per_rank} per rank (train.batch_size {config.train.batch_size}); lower "
            "train.batch_size or add data")
    reader = share_reader(shards_dir, shards, shares[rank])
    extra: dict[str, torch.Tensor] = {}
    present = torch.ones(len(reader.keys), dtype=torch.bool)
    if EMBEDDINGS in inputs:
        extra[EMBEDDINGS], present = share_embeddings(shards_dir, encoder_id, reader)
    if classes is not None:
        labels = share_labels(reader, classes.names)
        extra.update({labels_key(view): labels for view in (IMAGES, EMBEDDINGS)
                      if view in inputs})
    need = cache_bytes(len(reader.keys), extra[EMBEDDINGS].shape[1] if EMBEDDINGS in extra
                       else 0)
    images, placement = place_images(config.data.cache, len(reader.keys), need,
                                     accelerator.device, config.data.cache_fraction)
    if placement.note:
        print(f"rank {rank}: {placement.note}", flush=True)
    agreed = _lowest_place(accelerator, placement.place)
    if agreed == "off":
        if placement.place != "off":
            accelerator.print("data cache: a rank cannot hold its share; every rank streams "
                              "from the shards instead")
        return None
    filled, skipped = fill_images(
        images, reader, config.data.num_workers, accelerator.is_main_process,
        config.data.max_consecutive_failures, f"caching {config.data.split} patches")
    valid = torch.nonzero(filled & present).flatten()
    counts = accelerator.gather(torch.tensor([len(valid)], device=accelerator.device))
    batches_per_epoch = int(counts.min()) // per_rank
    if batches_per_epoch == 0:
        raise PathganError(f"after skipping corrupt samples a rank holds {int(counts.min())} "
                           f"samples, fewer than one batch of {per_rank}")
    tensors = {IMAGES: images, **{name: t.to(images.device) for name, t in extra.items()}}
    where = (f"the memory of {images.device}" if images.device.type == "cuda" else
             "pinned host memory" if images.is_pinned() else "host memory")
    accelerator.print(
        f"data cache: {len(valid)} {config.data.split} patches of rank {rank} "
        f"({gigabytes(need)}) in {where}; {int(counts.sum())} patches on {world} rank(s); "
        f"{skipped} corrupt skipped; {batches_per_epoch} batches per epoch")
    weights = (balanced_weights(labels[valid], classes, rank)
               if classes is not None and classes.balance == "balanced" else None)
    return PatchCache(tensors, valid, per_rank, batches_per_epoch, config.run.seed, rank,
                      start_step, accelerator.device, skipped, weights)


def _lowest_place(accelerator, place: str) -> str:
    """The place every rank can cache in: the lowest of the ranks' places."""
    mine = torch.tensor([PLACES.index(place)], device=accelerator.device)
    return PLACES[int(accelerator.gather(mine).min())]
