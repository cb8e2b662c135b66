"""Real samples for the discriminators: dict batches, for ever, the same count on every rank.

``{IMAGES: uint8 (B, 3, 224, 224)}`` from the patch cache (:mod:`pathgan.train.cache`,
with the embeddings and labels of the same samples when the run uses them) or the training
image stream
(:class:`~pathgan.shards.stream.ImageStream`), ``{EMBEDDINGS: (B, D)}`` from the precomputed
embeddings (:class:`EmbeddingStream`, held in memory: 1.5 kB a patch for Path Foundation), or
both for the hybrid objective. ``B`` is the per-rank batch. Which of them a run gets is what its
objective's discriminators need (``GANObjective.real_inputs``). Both streams are
:class:`RealStream` objects; :class:`RealData` zips them and never ends: the loop stops on its step
and derives the epoch from it, as stylegan2-ada's ``InfiniteSampler`` does. The loop moves
batches to the device. Whether the embeddings fit the encoder was checked when the GAN was built
(:func:`pathgan.train.build.build_gan`); this module only streams.

**Labels** (conditional runs). Each stream then yields ``(samples, labels)``: int64 class codes
(``train/classes.py``) that travel with their samples from where they are read (the image
stream decodes them with the images; the embedding stream keeps them beside the embeddings),
and :class:`RealData` puts them in the batch under ``labels_key(view)`` (``"images.labels"``,
``"embeddings.labels"``): each discriminator judges its real samples against their own labels.
With ``data.class_balance: balanced``, :class:`ClassBalancedStream` redraws each stream's
batches so that every class is equally likely.
"""

import itertools
import random
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from pathgan.config import Config
from pathgan.shards.embedding_files import read_embeddings
from pathgan.shards.reading import sample_labels, split_entries
from pathgan.shards.stream import make_image_stream, stack_samples
from pathgan.train.cache import build_cache
from pathgan.train.classes import Classes
from pathgan.train.objective import EMBEDDINGS, IMAGES, labels_key


class RealStream(Protocol):
    """Per-rank batches of one kind of real sample; iterating yields one epoch of them."""

    batches_per_epoch: int  # the same on every rank

    def __iter__(self) -> Iterator[torch.Tensor]: ...

    @property
    def skipped_samples(self) -> int:
        """Unreadable samples skipped so far (in every worker of this rank)."""

    def close(self) -> None:
        """Stop what the stream runs in the background."""


class EmbeddingStream:
    """Per-rank batches of precomputed embeddings; a fresh permutation every epoch."""

    skipped_samples = 0  # corrupt samples were left out when the embeddings were computed

    def __init__(self, embeddings: np.ndarray, batch_size: int, world_size: int, rank: int,
                 seed: int, labels: np.ndarray | None = None) -> None:
        self.embeddings = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
        self.labels = torch.from_numpy(labels).long() if labels is not None else None
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.batches_per_epoch = max(1, len(self.embeddings) // (batch_size * world_size))

    def __iter__(self) -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + 7919 * self.epoch + self.rank)
        self.epoch += 1
        order = torch.randperm(len(self.embeddings), generator=generator)
        for index in range(self.batches_per_epoch):
            # a random draw per rank; with replacement across batches when the set is small
            rows = order[(index * self.batch_size + torch.arange(self.batch_size))
                         % len(order)]
            if self.labels is None:
                yield self.embeddings[rows]
            else:
                yield self.embeddings[rows], self.labels[rows]

    def close(self) -> None:
        """Nothing runs in the background: the embeddings are in memory."""


class ClassBalancedStream:
    """A labelled stream's batches redrawn so that every class is equally likely.

    The stream's samples go into a pool per class (``capacity`` each; when full, a new sample
    replaces a random one); each batch draws its classes uniformly, then a random sample of the
    class's pool, with replacement. Rare classes are drawn again, common ones replaced before
    every sample was drawn: over-sampling and under-sampling at once, for one stream read. The
    first batches wait until every class has been seen; an epoch still has the stream's
    ``batches_per_epoch`` batches (read on into its next epoch when needed), the same count on
    every rank.
    """

    def __init__(self, stream: RealStream, num_classes: int, capacity: int, seed: int) -> None:
        self.stream = stream
        self.batches_per_epoch = stream.batches_per_epoch
        self.pools: list[list[torch.Tensor]] = [[] for _ in range(num_classes)]
        self.capacity = capacity
        self.rng = random.Random(f"balance/{seed}")

    @property
    def skipped_samples(self) -> int:
        return self.stream.skipped_samples

    def _keep(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        for sample, label in zip(*batch, strict=True):
            pool = self.pools[int(label)]
            if len(pool) < self.capacity:
                pool.append(sample)
            else:
                pool[self.rng.randrange(self.capacity)] = sample

    def _draw(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = [self.rng.randrange(len(self.pools)) for _ in range(size)]
        samples = [self.rng.choice(self.pools[label]) for label in labels]
        return stack_samples(samples), torch.tensor(labels, dtype=torch.int64)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        drawn = 0
        while True:
            for batch in self.stream:
                self._keep(batch)
                if all(self.pools):
                    yield self._draw(len(batch[1]))
                    drawn += 1
                    if drawn == self.batches_per_epoch:
                        return

    def close(self) -> None:
        self.pools = [[] for _ in self.pools]
        self.stream.close()


class RealData:
    """The streams a GAN needs, zipped into dict batches, epoch after epoch, without end.

    An epoch is the shortest stream's: ``batches_per_epoch`` batches, the same on every rank.
    """

    def __init__(self, streams: dict[str, RealStream]) -> None:
        self.streams = streams
        self.batches_per_epoch = min(s.batches_per_epoch for s in streams.values())
        self._batches = self._epochs()

    def _epochs(self) -> Iterator[dict[str, torch.Tensor]]:
        names = list(self.streams)
        while True:
            epoch = zip(*(self.streams[name] for name in names), strict=False)  # cut below
            for batches in itertools.islice(epoch, self.batches_per_epoch):
                batch = {}
                for name, part in zip(names, batches, strict=True):
                    if isinstance(part, dict):  # the cache gives every view (and labels) at once
                        batch.update(part)
                    elif isinstance(part, tuple):  # (samples, labels) of a conditional run
                        batch[name], batch[labels_key(name)] = part
                    else:
                        batch[name] = part
                yield batch

    def __iter__(self) -> "RealData":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return next(self._batches)

    @property
    def skipped(self) -> int:
        return sum(stream.skipped_samples for stream in self.streams.values())

    def close(self) -> None:
        self._batches.close()  # lets go of the streams' current epochs, then stop the streams
        for stream in self.streams.values():
            stream.close()


def embedding_labels(config: Config, keys: list[str], classes: Classes) -> np.ndarray:
    """The class code of each precomputed embedding's sample, from the samples' metadata."""
    label_of = {}
    for path, entries in split_entries(config.data.shards, config.data.split):
        label_of.update(zip((key for key, _ in entries), sample_labels(path, entries),
                            strict=True))
    code_of = {name: code for code, name in enumerate(classes.names)}
    return np.array([code_of[label_of[key]] for key in keys], dtype=np.int64)


def build_real_data(config: Config, inputs: set[str], accelerator, encoder_id: str | None,
                    start_step: int, classes: Classes | None = None) -> RealData:
    """The real ``inputs`` an objective needs (``GANObjective.real_inputs``), labelled with
    ``classes`` when the run is conditional: from the patch cache when ``data.cache`` and
    memory allow (:mod:`pathgan.train.cache`), else streamed from the shards. ``start_step``:
    the step the run starts (or resumes) at."""
    cache = build_cache(config, inputs, accelerator, encoder_id, start_step, classes)
    if cache is not None:
        return RealData({"cache": cache})
    world_size, rank = accelerator.num_processes, accelerator.process_index
    # Streams are seeded with the step: a resumed run does not replay their first epochs.
    seed = config.run.seed + start_step
    per_rank = config.train.batch_size // world_size
    names = list(classes.names) if classes is not None else None
    streams: dict[str, RealStream] = {}
    if IMAGES in inputs:
        streams[IMAGES] = make_image_stream(
            config.data.shards, batch_size=per_rank, world_size=world_size, rank=rank,
            num_workers=config.data.num_workers, seed=seed,
            split=config.data.split, shuffle_buffer=config.data.shuffle_buffer, as_uint8=True,
            max_consecutive_failures=config.data.max_consecutive_failures, classes=names,
        )
    if EMBEDDINGS in inputs:
        keys, embeddings = read_embeddings(config.data.shards, encoder_id, config.data.split)
        labels = embedding_labels(config, keys, classes) if classes is not None else None
        streams[EMBEDDINGS] = EmbeddingStream(embeddings, per_rank, world_size, rank, seed,
                                              labels)
    if classes is not None and classes.balance == "balanced":
        capacity = max(per_rank, config.data.shuffle_buffer // len(classes.names))
        streams = {name: ClassBalancedStream(stream, len(classes.names), capacity,
                                             seed + 7919 * rank)
                   for name, stream in streams.items()}
    return RealData(streams)
