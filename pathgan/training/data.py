"""Real samples for the discriminators, as epochs of dict batches of equal length on every rank.

``{"images": uint8 (B, 3, 224, 224)}`` from the shard pipeline, ``{"embeddings": (B, D)}`` from
the precomputed embeddings (held in memory: 1.5 kB a patch for Path Foundation), or both for
the hybrid objective. ``B`` is the per-rank batch. The loop moves batches to the device.
"""

from collections.abc import Iterator

import numpy as np
import torch

from pathgan.config import Config
from pathgan.data.embeddings import (
    embedded_encoders,
    embeddings_dir,
    read_embeddings,
    stored_precision,
)
from pathgan.data.pipeline import ImageStream, make_image_stream
from pathgan.errors import PathganError
from pathgan.training.objective import EMBEDDINGS, IMAGES


class EmbeddingStream:
    """Per-rank batches of precomputed embeddings; a fresh permutation every epoch."""

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


class RealData:
    """Zips the streams a GAN needs into dict batches; iterating yields one epoch."""

    def __init__(self, streams: dict[str, object]) -> None:
        self.streams = streams
        self.batches_per_epoch = min(s.batches_per_epoch for s in streams.values())

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        names = list(self.streams)
        iterators = [iter(self.streams[name]) for name in names]
        for _, batches in zip(range(self.batches_per_epoch), zip(*iterators, strict=False),
                              strict=False):
            yield dict(zip(names, batches, strict=True))

    @property
    def skipped(self) -> int:
        return sum(s.skipped.count for s in self.streams.values() if isinstance(s, ImageStream))

    def close(self) -> None:
        for stream in self.streams.values():
            if isinstance(stream, ImageStream):
                stream.close()


def load_real_embeddings(shards_dir: str, encoder_id: str, split: str) -> np.ndarray:
    """Precomputed embeddings of ``encoder_id``; refuses embeddings of another encoder."""
    folder = embeddings_dir(shards_dir, encoder_id)
    if not folder.is_dir():
        found = embedded_encoders(shards_dir)
        if found:
            raise PathganError(
                f"the embeddings in {folder.parent} come from {', '.join(found)}, not from the "
                f"configured encoder {encoder_id}; run `pathgan embed {shards_dir} --encoder "
                "SPEC` with model.encoder's spec"
            )
        raise PathganError(f"{shards_dir} has no precomputed embeddings; run `pathgan embed "
                           f"{shards_dir} --encoder SPEC` first")
    _, embeddings = read_embeddings(shards_dir, encoder_id, split)
    return embeddings


def resolve_encoder_precision(config: Config, inputs: set[str], encoder_id: str) -> str:
    """The precision the encoder runs in during training: that of the precomputed real
    embeddings, so that real and fake embeddings are rounded alike (``model.encoder_precision``
    may name it, but not differ from it); fp32 unless asked when real images are encoded in the
    loop."""
    requested = config.model.encoder_precision
    if EMBEDDINGS not in inputs:
        return "fp32" if requested == "auto" else requested
    stored = stored_precision(config.data.shards, encoder_id, config.data.split)
    if requested not in ("auto", stored):
        raise PathganError(
            f"model.encoder_precision is {requested} but the real embeddings of {encoder_id} "
            f"were computed in {stored}: the discriminator would learn the rounding difference. "
            f"Set model.encoder_precision={stored}, or rerun `pathgan embed --precision "
            f"{requested}`"
        )
    return stored


def build_real_data(config: Config, inputs: set[str], world_size: int, rank: int,
                    encoder_id: str | None, seed: int) -> RealData:
    """The streams of the real ``inputs`` an objective needs (``GANObjective.real_inputs``)."""
    per_rank = config.train.batch_size // world_size
    streams: dict[str, object] = {}
    if IMAGES in inputs:
        streams[IMAGES] = make_image_stream(
            config.data.shards, batch_size=per_rank, world_size=world_size, rank=rank,
            num_workers=config.data.num_workers, seed=seed,
            split=config.data.split, shuffle_buffer=config.data.shuffle_buffer, as_uint8=True,
            max_consecutive_failures=config.data.max_consecutive_failures,
        )
    if EMBEDDINGS in inputs:
        embeddings = load_real_embeddings(config.data.shards, encoder_id, config.data.split)
        streams[EMBEDDINGS] = EmbeddingStream(embeddings, per_rank, world_size, rank, seed)
    return RealData(streams)
