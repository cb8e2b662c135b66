"""``pathgan shards verify`` and ``pathgan shards show``: read a shard set back."""

import math
import random
from pathlib import Path

import torch

from pathgan.core.errors import PathganError
from pathgan.core.fileio import sha256_file
from pathgan.core.images import save_image_grid
from pathgan.shards.format import class_names, decode_sample, load_manifest
from pathgan.shards.reading import ShardSamples, iter_tar_samples, labelled_items, split_entries


def verify_shards(shards_dir: str | Path) -> list[str]:
    """Every mismatch between the shard files and the manifest, as readable lines."""
    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir)
    problems = []
    listed = 0
    for shard in manifest["shards"]:
        path = shards_dir / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']}: missing")
            continue
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 differs from the manifest")
        count = 0
        try:
            for key, members in iter_tar_samples(path):
                try:
                    decode_sample({"__key__": key, **members})
                except Exception as error:
                    problems.append(f"{shard['name']}: sample {key} does not decode ({error})")
                count += 1
        except PathganError as error:
            problems.append(f"{shard['name']}: {error}")
        if count != shard["samples"]:
            problems.append(f"{shard['name']}: {count} samples, manifest says {shard['samples']}")
        listed += count
    if listed != manifest["total_samples"] and not problems:
        problems.append(f"{listed} samples in shards, manifest says {manifest['total_samples']}")
    return problems


def random_samples(shards_dir: str | Path, count: int, seed: int = 0,
                   label: str | None = None) -> torch.Tensor:
    """``count`` random images of a shard set (those labelled ``label`` only, when given) as
    uint8 (N, 3, 224, 224); only they are decoded."""
    shards = split_entries(shards_dir)
    dataset = ShardSamples(shards)
    candidates = range(len(dataset))
    if label is not None:
        candidates = [index for index, (*_, found) in enumerate(labelled_items(shards))
                      if found == label]
        if not candidates:
            raise PathganError(f"{shards_dir} has no sample labelled {label!r} (labels: "
                               f"{', '.join(class_names(load_manifest(shards_dir))) or 'none'})")
    chosen = random.Random(seed).sample(list(candidates), min(count, len(candidates)))
    images = [image for _, image, _ in map(dataset.__getitem__, sorted(chosen))
              if image is not None]
    dataset.close()
    if not images:
        raise PathganError(f"{shards_dir} holds no readable samples")
    return torch.stack(images)


def save_samples_grid(shards_dir: str | Path, out_path: str | Path, count: int,
                      seed: int = 0, label: str | None = None) -> int:
    """The reference's "training images" figure: a grid of random samples (of one label, when
    given); returns the count."""
    images = random_samples(shards_dir, count, seed, label)
    save_image_grid(images, out_path, nrow=math.ceil(math.sqrt(len(images))))
    return len(images)


def summary_lines(manifest: dict) -> list[str]:
    splits = ", ".join(
        f"{name} {info['samples']} in {info['shards']} shards"
        + (f" from {info['groups']} groups" if "groups" in info else "")
        for name, info in manifest.get("splits", {}).items()
    )
    lines = [
        f"samples: {manifest['total_samples']} ({splits})",
        f"sources: {len(manifest.get('sources', []))}, skipped inputs: {len(manifest['skipped'])}",
    ]
    if manifest.get("labels"):
        lines.append("labels: " + ", ".join(f"{k} {v}" for k, v in manifest["labels"].items()))
    for name, info in manifest.get("splits", {}).items():
        if info.get("labels") and info["samples"]:
            lines.append(f"labels in {name}: "
                         + ", ".join(f"{k} {v}" for k, v in info["labels"].items()))
    return lines
