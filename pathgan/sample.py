"""``pathgan sample``: patches from a trained generator, as PNG files or WebDataset shards.

Shards use the packing format (``<key>.png`` + ``<key>.json``, ``manifest.json``), with
``"synthetic": true`` in every sample's metadata, so synthetic sets can be verified, shown,
embedded and mixed with real ones by the same tools.
"""

import itertools
import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pathgan.data.format import (
    MANIFEST,
    SHARDS_FORMAT,
    encode_image,
    shard_entry,
    shard_name,
    shard_writer,
)
from pathgan.errors import PathganError
from pathgan.fileio import atomic_path, write_json
from pathgan.images import signed_to_uint8
from pathgan.models import noise_batch
from pathgan.training.checkpoint import load_generator


def generated_batches(generator, nz: int, count: int, batch_size: int, seed: int,
                      device: torch.device):
    """uint8 NHWC batches; sample ``i`` always comes from the same noise (seed, i)."""
    noise = noise_batch(count, nz, seed)
    with torch.inference_mode():
        for start in range(0, count, batch_size):
            images = generator(noise[start:start + batch_size].to(device))
            yield start, signed_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def indexed_images(batches):
    for start, batch in batches:
        for offset, image in enumerate(batch):
            yield start + offset, image


def write_pngs(batches, out_dir: Path, progress) -> None:
    from PIL import Image

    for index, image in indexed_images(batches):
        with atomic_path(out_dir / f"sample_{index:07d}.png") as temporary:
            Image.fromarray(image).save(temporary, format="PNG")
        progress.update()


def write_sample_shard(path: Path, images, run_dir: Path, seed: int, progress) -> dict:
    count = 0
    with shard_writer(path) as sink:
        for index, image in images:
            metadata = {"synthetic": True, "run": str(run_dir), "seed": seed, "index": index,
                        "source_type": "generated"}
            sink.write({"__key__": f"synthetic-s{seed}-{index:07d}",
                        "png": encode_image(image, "png"),
                        "json": json.dumps(metadata).encode()})
            count += 1
            progress.update()
    return shard_entry(path, "train", count)


def write_shards(batches, out_dir: Path, run_dir: Path, seed: int, per_shard: int,
                 progress) -> list[dict]:
    images, shards = indexed_images(batches), []
    while (first := next(images, None)) is not None:
        chunk = itertools.chain([first], itertools.islice(images, per_shard - 1))
        path = out_dir / shard_name("train", len(shards))
        shards.append(write_sample_shard(path, chunk, run_dir, seed, progress))
    return shards


def sample(run_dir: str | Path, count: int, out_dir: str | Path, image_format: str = "png",
           batch_size: int = 64, seed: int = 0, device: str | None = None,
           per_shard: int = 1000) -> Path:
    for flag, value in (("-n", count), ("--batch-size", batch_size), ("--per-shard", per_shard)):
        if value <= 0:
            raise PathganError(f"{flag} must be positive, not {value}")
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator, config = load_generator(run_dir, device)
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = generated_batches(generator, config["nz"], count, batch_size, seed, device)
    with tqdm(total=count, desc="sampling", unit="patch") as progress:
        if image_format == "png":
            write_pngs(batches, out_dir, progress)
            return out_dir
        shards = write_shards(batches, out_dir, run_dir, seed, per_shard, progress)
    write_json(out_dir / MANIFEST, {
        "format": SHARDS_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "synthetic": True,
        "total_samples": count,
        "splits": {"train": {"samples": count, "shards": len(shards)},
                   "val": {"samples": 0, "shards": 0}},
        "shards": shards,
        "skipped": [],
        "config": {"run": str(run_dir), "seed": seed, "generator": config},
    })
    return out_dir
