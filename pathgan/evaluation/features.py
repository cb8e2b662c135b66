"""What an evaluation compares: features of real and of generated patches.

An :class:`Extractor` turns generator-space images into features: the frozen encoder's
embeddings, the Laplacian-pyramid descriptors of the SWD, or Inception-v3's pool features. The
real side is a seeded draw of a shard set's split (:func:`select_real`), whose encoder features
come from precomputed embeddings (``pathgan embed``) when they exist for the same encoder id,
else from the shard images; the fake side is ``n`` samples of a generator, sample ``i`` from
noise row ``i`` of one seeded matrix (and class ``labels[i]`` for a conditional generator).
Either way each rank computes its slice and every rank ends with the whole set, in index order
(:mod:`pathgan.evaluation.ranks`). The real draw keeps each sample's label, for per-class scores.
"""

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pathgan.core.errors import PathganError
from pathgan.core.images import signed_to_uint8, uint8_to_signed
from pathgan.evaluation.metrics import (
    descriptors_per_image,
    laplacian_descriptors,
    swd_descriptor_dim,
)
from pathgan.evaluation.ranks import gather_rows, progress_bar, rank_slice
from pathgan.models import generated_batches, noise_batch
from pathgan.shards.embedding_files import read_embeddings, stored_precision
from pathgan.shards.format import IMAGE_SIDE, load_manifest
from pathgan.shards.reading import ShardSamples, collate_samples, index_shard, sample_labels

MIN_SAMPLES = 4  # k-NN precision/recall with k = 3 needs k + 1 samples a side
DEFAULT_BATCH_SIZE = 64
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 + INCEPTION_WEIGHTS)
#: extractor names: the keys of every feature dict
ENCODER, SWD, INCEPTION = "encoder", "swd", "inception"


# -- feature extractors ------------------------------------------------------------------------
@dataclass
class Extractor:
    """Generator-space images (float NCHW in [-1, 1]) and their indices in the set -> float32
    features (N, dim). Only the SWD descriptors depend on the indices."""

    name: str  # ENCODER, SWD or INCEPTION
    dim: int
    forward: object  # (images, indices) -> features
    id: str
    encoder: object = None  # the Encoder behind an ENCODER extractor

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, indices) -> torch.Tensor:
        return self.forward(images, indices).float()


def encoder_extractor(encoder) -> Extractor:
    return Extractor(ENCODER, int(encoder.embed_dim), lambda images, _: encoder(images),
                     encoder.encoder_id, encoder)


def swd_extractor(n: int, seed: int = 0) -> Extractor:
    """Laplacian-pyramid descriptors of every image, for the SWD of a set of ``n`` images."""
    per_image = descriptors_per_image(n)
    return Extractor(
        SWD, swd_descriptor_dim(IMAGE_SIDE, per_image),
        lambda images, indices: laplacian_descriptors(images, indices, per_image, seed),
        f"laplacian-pyramid-7x7-{per_image}-per-image")


def resolve_inception_weights(path: str | Path | None = None) -> Path:
    """The local file of torch-fidelity's Inception weights (``--inception-weights`` or the torch
    hub cache); a one-line error saying where to put it when it is not there. Never downloads."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise PathganError(f"--inception-weights {path}: no such file (get it from "
                               f"{INCEPTION_URL})")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not cached.is_file():
        raise PathganError(f"Inception FID needs {INCEPTION_WEIGHTS} locally: download "
                           f"{INCEPTION_URL} to {cached} (or pass --inception-weights FILE)")
    return cached


def inception_extractor(weights: str | Path | None = None, device=None) -> Extractor:
    """torchmetrics' FID Inception-v3 (2048-d pool features, the torch-fidelity port of the
    TensorFlow FID network) from a local weights file; fed uint8 images as FID expects."""
    path = resolve_inception_weights(weights)
    try:  # the file must be plain tensors: refuse anything else before torch-fidelity loads it
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PathganError(f"{path} is not an Inception weights file ({type(error).__name__})"
                           ) from error
    try:
        # here: torchmetrics is slow to import, and its Inception needs torch-fidelity
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, normalize=False,
                                          feature_extractor_weights_path=str(path))
    except ModuleNotFoundError as error:
        raise PathganError("Inception FID needs torch-fidelity: pip install torch-fidelity"
                           ) from error
    network = metric.inception.to(device or "cpu").eval()
    return Extractor(INCEPTION, 2048, lambda images, _: network(signed_to_uint8(images)),
                     "inception-v3-compat--" + INCEPTION_WEIGHTS.removesuffix(".pth"))


# -- the real side -----------------------------------------------------------------------------
def real_split(shards_dir: str | Path) -> str:
    """``val`` when the shard set has validation samples, else ``train``."""
    shards = load_manifest(shards_dir)["shards"]
    has_val = any(s["split"] == "val" and s["samples"] > 0 for s in shards)
    return "val" if has_val else "train"


@dataclass
class RealSet:
    """The real samples an evaluation compares against: a seeded draw of one split."""

    shards_dir: Path
    split: str
    keys: list[str]
    dataset: object  # pathgan.shards.reading.ShardSamples over exactly these keys, in this order
    available: int  # samples in the split
    note: str = ""
    source: dict = field(default_factory=dict)  # extractor name -> "embeddings" | "images"
    labels: list = field(default_factory=list)  # each sample's label (None: unlabelled)

    def __len__(self) -> int:
        return len(self.keys)


def select_real(shards_dir: str | Path, n: int, seed: int = 0,
                split: str | None = None) -> RealSet:
    """Draw ``min(n, available)`` real samples of ``split`` (default: :func:`real_split`) with a
    seeded generator, kept in shard order."""
    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir)
    note = ""
    if split is None:
        split = real_split(shards_dir)
        if split == "train":
            note = "no val split: real samples drawn from train (seen in training)"
    shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        raise PathganError(f"{shards_dir} has no {split} shards")
    entries = [(shards_dir / s["name"], index_shard(shards_dir / s["name"])) for s in shards]
    flat = [(i, j) for i, (_, items) in enumerate(entries) for j in range(len(items))]
    if len(flat) < MIN_SAMPLES:
        raise PathganError(f"{shards_dir} has {len(flat)} {split} samples; need at least "
                           f"{MIN_SAMPLES}")
    count = min(n, len(flat))
    chosen = sorted(np.random.default_rng(seed).choice(len(flat), count, replace=False))
    picked: dict[int, list] = {}
    for position in chosen:
        i, j = flat[position]
        picked.setdefault(i, []).append(entries[i][1][j])
    chosen_shards = [(entries[i][0], items) for i, items in sorted(picked.items())]
    dataset = ShardSamples(chosen_shards)
    keys = [key for _, key, _ in dataset.items]
    labels = [label for path, items in chosen_shards for label in sample_labels(path, items)]
    if count < n:
        extra = f"only {count} {split} samples (asked for {n})"
        note = f"{note}; {extra}" if note else extra
    return RealSet(shards_dir, split, keys, dataset, len(flat), note, labels=labels)


def _precomputed(real: RealSet, encoder) -> torch.Tensor | None:
    """Rows of precomputed embeddings for ``real``'s keys, or None when they do not all exist
    or were computed in another precision than the encoder's (the generated side would then
    differ from the real one by rounding alone)."""
    try:
        if stored_precision(real.shards_dir, encoder.encoder_id, real.split) != encoder.precision:
            return None
        keys, array = read_embeddings(real.shards_dir, encoder.encoder_id, real.split)
    except (PathganError, OSError):
        return None
    row = {key: i for i, key in enumerate(keys)}
    rows = [row[key] for key in real.keys if key in row]
    if len(rows) < len(real.keys) * 0.95:  # many keys missing: embeddings of another packing
        return None
    return torch.from_numpy(array[rows])


def real_features(real: RealSet, extractors: list[Extractor], state, *,
                  batch_size: int = DEFAULT_BATCH_SIZE, num_workers: int = 0) -> dict:
    """``{extractor name: float32 (n_real, D)}`` on every rank, rows in ``real.keys`` order
    (corrupt samples dropped). The encoder's come from precomputed embeddings when possible."""
    features: dict[str, torch.Tensor] = {}
    todo = []
    for extractor in extractors:
        found = _precomputed(real, extractor.encoder) if extractor.name == ENCODER else None
        if found is not None:
            features[extractor.name] = found
            real.source[extractor.name] = "embeddings"
        else:
            todo.append(extractor)
            real.source[extractor.name] = "images"
    if not todo:
        return features

    mine = rank_slice(len(real), state.process_index, state.num_processes)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(real.dataset, list(mine)), batch_size=batch_size,
        num_workers=num_workers, collate_fn=collate_samples,
    )
    indices, rows, errors = [], {e.name: [] for e in todo}, []
    with progress_bar(state, len(mine), "real features") as bar:
        for batch_indices, images, bad in loader:
            errors.extend(error for _, error in bad)
            bar.update(len(batch_indices) + len(bad))
            if images is None:
                continue
            images = uint8_to_signed(images.to(state.device))
            indices.extend(batch_indices)
            for extractor in todo:
                rows[extractor.name].append(extractor(images, batch_indices))
    if errors:
        print(f"pathgan eval: {len(errors)} real samples could not be decoded and were left "
              f"out (first: {errors[0]})", file=sys.stderr, flush=True)
    indices = torch.tensor(indices, dtype=torch.long)
    return {**features, **_gathered(indices, rows, todo, len(real), state)}


# -- the fake side -----------------------------------------------------------------------------
def fake_features(generator: torch.nn.Module, n: int, extractors: list[Extractor], state, *,
                  nz: int | None = None, seed: int = 0,
                  batch_size: int = DEFAULT_BATCH_SIZE,
                  labels: torch.Tensor | None = None) -> dict:
    """``{extractor name: float32 (n, D)}`` of ``n`` generated samples, on every rank; this rank
    generates its slice of the sample indices (of classes ``labels``, for a conditional
    generator: else drawn in its mix). The generator is put in eval mode for the call
    (BatchNorm running statistics) and restored afterwards."""
    nz = nz or getattr(generator, "nz", None) or getattr(
        getattr(generator, "module", None), "nz", None)
    if nz is None:
        raise ValueError("cannot tell the generator's nz: pass nz=")
    mine = rank_slice(n, state.process_index, state.num_processes)
    batches = generated_batches(generator, noise_batch(n, nz, seed)[mine.start:mine.stop],
                                batch_size,
                                labels[mine.start:mine.stop] if labels is not None else None,
                                seed=seed)
    rows = {e.name: [] for e in extractors}
    with progress_bar(state, len(mine), "generated features") as bar:
        for start, images in zip(range(mine.start, mine.stop, batch_size), batches, strict=True):
            for extractor in extractors:
                rows[extractor.name].append(extractor(images, range(start, start + len(images))))
            bar.update(len(images))
    indices = torch.arange(mine.start, mine.stop, dtype=torch.long)
    return _gathered(indices, rows, extractors, n, state)


def _gathered(indices: torch.Tensor, rows: dict, extractors: list[Extractor], total: int,
              state) -> dict:
    """This rank's rows of each extractor (``rows[name]``: batches, ``indices``: their sample
    indices) joined with every other rank's: the whole set of ``total``, in index order."""
    per_rank = math.ceil(total / state.num_processes)
    features = {}
    for extractor in extractors:
        mine = (torch.cat(rows[extractor.name]) if rows[extractor.name]
                else torch.zeros((0, extractor.dim)))
        _, features[extractor.name] = gather_rows(indices, mine, per_rank, state)
    return features


