"""Synthetic patches from a trained generator, as PNG files or WebDataset shards.

What ``pathgan sample`` runs. The generator is a run folder or a Hub repo
(``hf-hub:ORG/NAME[@REVISION]``, see :func:`pathgan.core.hub.resolve_generator`); what made the
patches is recorded with them, a Hub generator pinned to its commit: in ``sample.json`` beside
PNG files, in ``manifest.json`` and every sample's metadata for shards.

Shards use the packing format (``<key>.png`` + ``<key>.json``, ``manifest.json``), with
``"synthetic": true`` in every sample's metadata, so synthetic sets can be verified, shown,
embedded and mixed with real ones by the same tools.

**Classes.** A conditional generator (its ``generator.json`` lists ``classes``) draws the
classes asked for: ``labels=[...]`` (``-n`` shared equally, the first classes taking the
remainder), ``labels_like=SHARDS`` (``-n`` shared in the proportions of that set's training
split), or, with neither, classes drawn in the mix it was trained on. Each sample's metadata then
has its ``label``, the manifest its samples per label (like a packed set's), and PNG files go to
one folder per class (``OUT/<class>/``: what ``pathgan shards pack`` reads as class folders).
"""

import itertools
import json
from collections import Counter
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
from pathgan.models.generation import class_shares, label_batch
from pathgan.runs import GENERATOR_FILES, generator_classes, load_generator, safe_class_folder
from pathgan.shards.format import (
    MANIFEST,
    UNLABELLED,
    encode_image,
    load_manifest,
    make_manifest,
    shard_entry,
    shard_name,
    shard_writer,
    split_labels,
)

SAMPLE_RECORD = "sample.json"  # beside PNG files: what made them (shards: the manifest)


def uint8_batches(generator, noise: torch.Tensor, batch_size: int,
                  labels: torch.Tensor | None = None):
    """``(index of the first sample, uint8 NHWC batch)``; sample ``i`` always comes from the
    same noise row ``i`` (and class ``labels[i]``, for a conditional generator)."""
    batches = generated_batches(generator, noise, batch_size, labels)
    for start, images in zip(range(0, len(noise), batch_size), batches, strict=True):
        yield start, signed_to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()


def indexed_images(batches):
    for start, batch in batches:
        for offset, image in enumerate(batch):
            yield start + offset, image


def write_pngs(batches, out_dir: Path, progress, names: list[str] | None = None) -> None:
    """``sample_NNNNNNN.png`` files; with ``names`` (each sample's class), in class folders."""
    for index, image in indexed_images(batches):
        folder = out_dir / safe_class_folder(names[index]) if names else out_dir
        folder.mkdir(exist_ok=True)
        with atomic_path(folder / f"sample_{index:07d}.png") as temporary:
            Image.fromarray(image).save(temporary, format="PNG")
        progress.update()


def write_sample_shard(path: Path, images, generator: str, seed: int, progress,
                       names: list[str] | None = None) -> dict:
    """One shard of ``(index, image)`` pairs; with ``names``, each sample labelled with its
    class and the entry counting them (``labels``, as a packed shard's)."""
    labels = Counter()
    count = 0
    with shard_writer(path) as sink:
        for index, image in images:
            metadata = {"synthetic": True, "run": generator, "seed": seed, "index": index,
                        "source_type": "generated"}
            if names:
                metadata["label"] = names[index]
                labels[names[index]] += 1
            sink.write({"__key__": f"synthetic-s{seed}-{index:07d}",
                        "png": encode_image(image, "png"),
                        "json": json.dumps(metadata).encode()})
            count += 1
            progress.update()
    entry = shard_entry(path, "train", count)
    return {**entry, "labels": dict(sorted(labels.items()))} if names else entry


def write_sample_shards(batches, out_dir: Path, generator: str, seed: int, per_shard: int,
                        progress, names: list[str] | None = None) -> list[dict]:
    images, shards = indexed_images(batches), []
    while (first := next(images, None)) is not None:
        chunk = itertools.chain([first], itertools.islice(images, per_shard - 1))
        path = out_dir / shard_name("train", len(shards))
        shards.append(write_sample_shard(path, chunk, generator, seed, progress, names))
    return shards


def proportions_like(shards_dir: str | Path) -> dict[str, int]:
    """Samples per class of a real shard set's training split (of the whole set, for a manifest
    written before labels were counted per split)."""
    manifest = load_manifest(shards_dir)
    counts = split_labels(manifest, "train") or manifest.get("labels") or {}
    counts = {name: found for name, found in counts.items() if name != UNLABELLED and found}
    if not counts:
        raise PathganError(f"--labels-like {shards_dir}: its training split has no labelled "
                           "samples")
    return counts


def requested_classes(known: list[str] | None, count: int, labels: list[str] | None,
                      labels_like: str | Path | None) -> list[str] | None:
    """Each sample's class name, in sample order (blocks of one class), or None to let the
    generator draw its own mix. One-line errors for asking classes of an unconditional
    generator or classes it does not know."""
    if labels and labels_like:
        raise PathganError("give --label or --labels-like, not both")
    if not (labels or labels_like):
        return None
    if known is None:
        raise PathganError("this generator is unconditional: it has no classes to draw "
                           "(--label / --labels-like need a run trained with "
                           "model.conditional=true)")
    weights = dict.fromkeys(labels, 1.0) if labels else proportions_like(labels_like)
    unknown = [name for name in weights if name not in known]
    if unknown:
        raise PathganError(f"class {unknown[0]!r} is not one this generator draws "
                           f"({', '.join(known)})")
    names = []
    for name, share in zip(weights, class_shares(count, list(weights.values())), strict=True):
        names += [name] * share
    return names


def sample_classes(generator, config: dict, count: int, seed: int, labels: list[str] | None,
                   labels_like: str | Path | None) -> list[str] | None:
    """Each sample's class: as asked (:func:`requested_classes`), else drawn in the mix the
    generator was trained with (its ``class_mix``, as
    :func:`~pathgan.models.generation.label_batch` draws it); None when it is unconditional."""
    known = generator_classes(config)
    names = requested_classes(known, count, labels, labels_like)
    if names is not None or known is None:
        return names
    return [known[code] for code in label_batch(count, generator.class_mix, seed).tolist()]


def sample(generator_spec: str | Path, count: int, out_dir: str | Path,
           image_format: str = "png", batch_size: int = 64, seed: int = 0,
           device: str | None = None, per_shard: int = 1000,
           labels: list[str] | None = None, labels_like: str | Path | None = None) -> Path:
    """Write ``count`` patches of a run folder's or a Hub repo's generator into ``out_dir``
    (of the classes asked for, for a conditional generator: module docstring)."""
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
    names = sample_classes(generator, config, count, seed, labels, labels_like)
    codes = (torch.tensor([config["classes"].index(name) for name in names])
             if names is not None else None)
    counts = dict(sorted(Counter(names).items())) if names is not None else None
    created = timestamp()
    out_dir.mkdir(parents=True, exist_ok=True)
    batches = uint8_batches(generator, noise_batch(count, config["nz"], seed), batch_size, codes)
    with tqdm(total=count, desc="sampling", unit="patch") as progress:
        if image_format == "png":
            write_pngs(batches, out_dir, progress, names)
            write_json(out_dir / SAMPLE_RECORD, {"created": created, "count": count, **origin,
                                                 **({"labels": counts} if counts else {})})
            return out_dir
        shards = write_sample_shards(batches, out_dir, source.pinned, seed, per_shard, progress,
                                     names)
    write_json(out_dir / MANIFEST, make_manifest(shards, origin, created=created, labels=counts,
                                                 synthetic=True))
    return out_dir
