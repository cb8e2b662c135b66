"""Synthetic patches from a trained generator, as PNG files or WebDataset shards.

What ``pathgan sample`` runs. The generator is a run folder or a Hub repo
(``hf-hub:ORG/NAME[@REVISION]``, see :func:`pathgan.core.hub.resolve_generator`); what made the
patches is recorded with them, a Hub generator pinned to its commit: in ``sample.json`` beside
PNG files, in ``manifest.json`` and every sample's metadata for shards.

Shards use the packing format (``<key>.png`` + ``<key>.json``, ``manifest.json``), with
``"synthetic": true`` in every sample's metadata, so synthetic sets can be verified, shown,
embedded and mixed with real ones by the same tools.
"""

import itertools
import json
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from pathgan.core.devices import default_device
from pathgan.core.errors import PathganError
from pathgan.core.fileio import atomic_path, timestamp, write_json
from pathgan.core.hub import resolve_generator
from pathgan.core.images import signed_to_uint8
from pathgan.models import generated_batches, noise_batch
from pathgan.runs import GENERATOR_FILES, load_generator
from pathgan.shards.format import (
    MANIFEST,
    encode_image,
    make_manifest,
    shard_entry,
    shard_name,
    shard_writer,
)

SAMPLE_RECORD = "sample.json"  # beside PNG files: what made them (shards: the manifest)


def uint8_batches(generator, noise: torch.Tensor, batch_size: int):
    """``(index of the first sample, uint8 NHWC batch)``; sample ``i`` always comes from the
    same noise row ``i``."""
    batches = generated_batches(generator, noise, batch_size)
    for start, images in zip(range(0, len(noise), batch_size), batches, strict=True):
        yield start, signed_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def indexed_images(batches):
    for start, batch in batches:
        for offset, image in enumerate(batch):
            yield start + offset, image


def write_pngs(batches, out_dir: Path, progress) -> None:
    for index, image in indexed_images(batches):
        with atomic_path(out_dir / f"sample_{index:07d}.png") as temporary:
            Image.fromarray(image).save(temporary, format="PNG")
        progress.update()


def write_sample_shard(path: Path, images, generator: str, seed: int, progress) -> dict:
    count = 0
    with shard_writer(path) as sink:
        for index, image in images:
            metadata = {"synthetic": True, "run": generator, "seed": seed, "index": index,
                        "source_type": "generated"}
            sink.write({"__key__": f"synthetic-s{seed}-{index:07d}",
                        "png": encode_image(image, "png"),
                        "json": json.dumps(metadata).encode()})
            count += 1
            progress.update()
    return shard_entry(path, "train", count)


def write_sample_shards(batches, out_dir: Path, generator: str, seed: int, per_shard: int,
                 progress) -> list[dict]:
    images, shards = indexed_images(batches), []
    while (first := next(images, None)) is not None:
        chunk = itertools.chain([first], itertools.islice(images, per_shard - 1))
        path = out_dir / shard_name("train", len(shards))
        shards.append(write_sample_shard(path, chunk, generator, seed, progress))
    return shards


def sample(generator_spec: str | Path, count: int, out_dir: str | Path,
           image_format: str = "png", batch_size: int = 64, seed: int = 0,
           device: str | None = None, per_shard: int = 1000) -> Path:
    """Write ``count`` patches of a run folder's or a Hub repo's generator into ``out_dir``."""
    for flag, value in (("-n", count), ("--batch-size", batch_size), ("--per-shard", per_shard)):
        if value <= 0:
            raise PathganError(f"{flag} must be positive, not {value}")
    out_dir = Path(out_dir)
    device = default_device(device)
    source = resolve_generator(generator_spec, GENERATOR_FILES)
    generator, config = load_generator(source.folder, device)
    # What made these patches: a Hub generator is pinned to the commit that was downloaded.
    origin = {"run": source.pinned, **({"hub": source.hub} if source.hub else {}),
              "seed": seed, "generator": config}
    created = timestamp()
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = uint8_batches(generator, noise_batch(count, config["nz"], seed), batch_size)
    with tqdm(total=count, desc="sampling", unit="patch") as progress:
        if image_format == "png":
            write_pngs(batches, out_dir, progress)
            write_json(out_dir / SAMPLE_RECORD, {"created": created, "count": count, **origin})
            return out_dir
        shards = write_sample_shards(batches, out_dir, source.pinned, seed, per_shard, progress)
    write_json(out_dir / MANIFEST, make_manifest(shards, origin, created=created, synthetic=True))
    return out_dir
