"""Real samples for the discriminators: dict batches, for ever, the same count on every rank.

``{IMAGES: uint8 (B, 3, 224, 224)}`` from the patch cache (:mod:`pathgan.train.cache`,
with the embeddings of the same samples when the run uses them) or the training image stream
(:class:`~pathgan.shards.stream.ImageStream`), ``{EMBEDDINGS: (B, D)}`` from the precomputed
embeddings (:class:`EmbeddingStream`, held in memory: 1.5 kB a patch for Path Foundation), or
both for the hybrid objective. ``B`` is the per-rank batch. Which of them a run gets is what its
objective's discriminators need (``GANObjective.real_inputs``). Both streams are
:class:`RealStream` objects; :class:`RealData` zips them and never ends: the loop stops on its step
and derives the epoch from it, as stylegan2-ada's ``InfiniteSampler`` does. The loop moves
batches to the device. Whether the embeddings fit the encoder was checked when the GAN was built
(:func:`pathgan.train.build.build_gan`); this module only streams.
"""

import itertools
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch

from pathgan.config import Config
from pathgan.shards.embedding_files import read_embeddings
from pathgan.shards.stream import make_image_stream
from pathgan.train.cache import build_cache
from pathgan.train.objective import EMBEDDINGS, IMAGES


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
                 seed: int) -> None:
        self.embeddings = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
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
            yield self.embeddings[rows]

    def close(self) -> None:
        """Nothing runs in the background: the embeddings are in memory."""


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
                merged = {}
                for name, batch in zip(names, batches, strict=True):
                    # a stream of one kind gives tensors; the cache gives every kind at once
                    merged.update(batch if isinstance(batch, dict) else {name: batch})
                yield merged

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


def build_real_data(config: Config, inputs: set[str], accelerator, encoder_id: str | None,
                    start_step: int) -> RealData:
    """The real ``inputs`` an objective needs (``GANObjective.real_inputs``): from the patch
    cache when ``data.cache`` and memory allow (:mod:`pathgan.train.cache`), else streamed
    from the shards. ``start_step``: the step the run starts (or resumes) at."""
    cache = build_cache(config, inputs, accelerator, encoder_id, start_step)
    if cache is not None:
        return RealData({"cache": cache})
    world, rank = accelerator.num_processes, accelerator.process_index
    # Streams are seeded with the step: a resumed run does not replay their first epochs.
    seed = config.run.seed + start_step
    per_rank = config.train.batch_size // world
    streams: dict[str, RealStream] = {}
    if IMAGES in inputs:
        streams[IMAGES] = make_image_stream(
            config.data.shards, batch_size=per_rank, world_size=world, rank=rank,
            num_workers=config.data.num_workers, seed=seed,
            split=config.data.split, shuffle_buffer=config.data.shuffle_buffer, as_uint8=True,
            max_consecutive_failures=config.data.max_consecutive_failures,
        )
    if EMBEDDINGS in inputs:
        _, embeddings = read_embeddings(config.data.shards, encoder_id, config.data.split)
        streams[EMBEDDINGS] = EmbeddingStream(embeddings, per_rank, world, rank, seed)
    return RealData(streams)
