"""``pathgan shards verify`` and ``pathgan shards show``: read a shard set back."""

import random
import tarfile
from pathlib import Path

import numpy as np

from pathgan.data.format import IMAGE_EXTENSIONS, decode_image, load_manifest
from pathgan.fileio import sha256_file


def iter_tar_samples(path: Path):
    """Yield (key, {extension: bytes}) from one shard, in order; raises on a truncated tar."""
    current_key, members = None, {}
    with tarfile.open(path, "r") as archive:
        for member in archive:
            if not member.isfile():
                continue
            key, _, extension = member.name.partition(".")
            if key != current_key and current_key is not None:
                yield current_key, members
                members = {}
            current_key = key
            members[extension] = archive.extractfile(member).read()
    if current_key is not None:
        yield current_key, members


def _decode_members(members: dict) -> np.ndarray:
    for extension in IMAGE_EXTENSIONS:
        if extension in members:
            return decode_image(members[extension], extension)
    raise ValueError("no image member")


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
                    _decode_members(members)
                except Exception as error:
                    problems.append(f"{shard['name']}: sample {key} does not decode ({error})")
                count += 1
        except (tarfile.TarError, OSError, EOFError) as error:
            problems.append(f"{shard['name']}: unreadable tar ({error})")
        if count != shard["samples"]:
            problems.append(f"{shard['name']}: {count} samples, manifest says {shard['samples']}")
        listed += count
    if listed != manifest["total_samples"] and not problems:
        problems.append(f"{listed} samples in shards, manifest says {manifest['total_samples']}")
    return problems


def random_samples(shards_dir: str | Path, count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` random images of a shard set (reservoir sampling over every shard)."""
    shards_dir = Path(shards_dir)
    rng = random.Random(seed)
    reservoir: list[np.ndarray] = []
    seen = 0
    for shard in load_manifest(shards_dir)["shards"]:
        for _, members in iter_tar_samples(shards_dir / shard["name"]):
            seen += 1
            slot = len(reservoir) if len(reservoir) < count else rng.randrange(seen)
            if slot < count:
                image = _decode_members(members)
                if slot == len(reservoir):
                    reservoir.append(image)
                else:
                    reservoir[slot] = image
    return reservoir


def summary_lines(manifest: dict) -> list[str]:
    splits = ", ".join(
        f"{name} {info['samples']} in {info['shards']} shards"
        for name, info in manifest.get("splits", {}).items()
    )
    lines = [
        f"samples: {manifest['total_samples']} ({splits})",
        f"sources: {len(manifest.get('sources', []))}, skipped inputs: {len(manifest['skipped'])}",
    ]
    if manifest.get("labels"):
        lines.append("labels: " + ", ".join(f"{k} {v}" for k, v in manifest["labels"].items()))
    return lines
