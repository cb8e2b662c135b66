"""The on-disk format of a shard set, in one place.

A shard set is a folder::

    DIR/manifest.json            totals, every shard with its count and sha256, skipped inputs
                                 (:func:`make_manifest`)
    DIR/train-000000.tar ...     WebDataset tars; each sample is three tar members:
    DIR/val-000000.tar ...           <key>.png | <key>.jpg | <key>.npy   224x224 RGB uint8
                                     <key>.json                          metadata

Keys are built from ``[A-Za-z0-9_-]`` only (a dot would split the key in WebDataset).
"""

import contextlib
import io
import json
import math
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image

from pathgan.core.errors import PathganError
from pathgan.core.fileio import atomic_path, read_json, sha256_file, timestamp

MANIFEST = "manifest.json"
SHARDS_FORMAT = "pathgan-shards/1"  # the manifest's "format"
IMAGE_EXTENSIONS = ("png", "jpg", "npy")
IMAGE_SIDE = 224  # every image of a shard set is IMAGE_SIDE x IMAGE_SIDE RGB
SPLITS = ("train", "val")
UNLABELLED = "None"  # the key of samples without a label in a manifest's label counts


SHARD_NAME = re.compile(r"(train|val)-\d{6}\.tar")  # what shard_name makes


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


@contextlib.contextmanager
def shard_writer(path: Path) -> Iterator:
    """A WebDataset ``TarWriter`` (bytes in) whose tar appears at ``path`` only when complete.

    mtime=0 makes a shard byte-for-byte reproducible: a redone shard has the same sha256.
    """
    import webdataset as wds  # here: pack's workers import this module; webdataset imports torch

    with atomic_path(path) as temporary, open(temporary, "wb") as stream, \
            wds.TarWriter(stream, encoder=False, mtime=0.0) as sink:
        yield sink


def shard_entry(path: Path, split: str, samples: int) -> dict:
    """A written shard as the manifest lists it."""
    return {"name": path.name, "split": split, "samples": samples,
            "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def make_manifest(shards: list[dict], config: dict, *, created: str | None = None,
                  fingerprint: str | None = None, groups: dict[str, int] | None = None,
                  sources: list[dict] | None = None, labels: dict[str, int] | None = None,
                  skipped: list[dict] | None = None, **extra) -> dict:
    """The ``manifest.json`` of a shard set; every writer of one (pack, merge, sample) calls this.

    ``shards``: the entries of :func:`shard_entry` (more keys allowed), in manifest order; the
    totals and per-split counts are computed from them, and each split's ``labels`` (samples per
    label, :data:`UNLABELLED` for those without) when every entry of the split has its own.
    ``groups``: split groups with samples, per split. ``config``: what made the set. ``extra``
    keys come last (``synthetic``, ``merged_from``, ``embeddings``). Optional parts are left out
    when not given.
    """
    splits = {}
    for split in SPLITS:
        members = [shard for shard in shards if shard["split"] == split]
        splits[split] = {"samples": sum(shard["samples"] for shard in members),
                         "shards": len(members),
                         **({"groups": groups[split]} if groups is not None else {})}
        if all("labels" in shard for shard in members):
            counts = Counter()
            for shard in members:
                counts.update(shard["labels"])
            splits[split]["labels"] = dict(sorted(counts.items()))
    optional = {"sources": sources, "labels": labels}
    return {
        "format": SHARDS_FORMAT,
        "created": created or timestamp(),
        **({"fingerprint": fingerprint} if fingerprint is not None else {}),
        "total_samples": sum(shard["samples"] for shard in shards),
        "splits": splits,
        "shards": shards,
        **{key: value for key, value in optional.items() if value is not None},
        "skipped": skipped or [],
        "config": config,
        **extra,
    }


def split_labels(manifest: dict, split: str) -> dict[str, int] | None:
    """Samples per label of one split (:data:`UNLABELLED` for those without), or None when the
    manifest does not say (written before it recorded labels per split)."""
    return manifest["splits"].get(split, {}).get("labels")


def class_names(manifest: dict) -> list[str]:
    """The labels a shard set's samples carry, sorted: the classes of a conditional GAN."""
    names = set()
    for split in SPLITS:
        names |= set(split_labels(manifest, split) or {})
    return sorted(names - {UNLABELLED})


def safe_key_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def encode_image(image: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """HxWx3 uint8 -> bytes in the shard's image format (png lossless, jpg, or raw npy)."""
    buffer = io.BytesIO()
    if image_format == "npy":
        np.save(buffer, np.ascontiguousarray(image, dtype=np.uint8), allow_pickle=False)
    elif image_format == "png":
        # zlib level 1, Huffman coding only, the Up filter: on H&E patches 3x faster to encode
        # and faster to decode than Pillow's level 1, 8% larger (BENCHMARKS.md, "Packing").
        return imagecodecs.png_encode(np.ascontiguousarray(image, dtype=np.uint8), 1,
                                      strategy=imagecodecs.PNG.STRATEGY.HUFFMAN_ONLY,
                                      filter=imagecodecs.PNG.FILTER.UP)
    elif image_format == "jpg":
        # Chroma at full resolution (4:4:4): Pillow's default 4:2:0 made q95 H&E patches 5x
        # further from their pixels (mean absolute error 5.5 levels against 1.1) for 30% fewer
        # bytes (BENCHMARKS.md, "Shard formats").
        Image.fromarray(image).save(buffer, format="JPEG", quality=jpeg_quality, subsampling=0)
    else:
        raise PathganError(f"unknown image format {image_format!r}: use png, jpg or raw")
    return buffer.getvalue()


#: the library call that decodes each compressed member type: libpng and libjpeg-turbo through
#: imagecodecs decode 1.3x (PNG) to 1.7x (JPEG) faster than Pillow on one core, the same pixels
#: (BENCHMARKS.md, "Shard formats"); Pillow stays the fallback for what they refuse.
_CODECS = {"png": imagecodecs.png_decode, "jpg": imagecodecs.jpeg8_decode}


def decode_image(data: bytes, extension: str, out: np.ndarray | None = None) -> np.ndarray:
    """Bytes from a shard member -> HxWx3 uint8 array; raises on corrupt data.

    ``out``: an HxWx3 uint8 array to decode into (a slot of a batch), returned filled; it saves
    the training stream a copy per image. Images that are not 8-bit RGB (grey, palette, RGBA,
    16-bit) are converted to it, as Pillow's ``convert("RGB")`` does.
    """
    if extension == "npy":
        array = _load_npy(data, copy=out is None)  # a view when it is copied into out
    else:
        codec = _CODECS.get(extension)
        if codec is None:
            raise ValueError(f"unknown image member type {extension!r}")
        try:
            return _checked(codec(data, out=out))
        except ValueError:  # not 8-bit RGB, or not of out's shape (or corrupt: Pillow says)
            with Image.open(io.BytesIO(data)) as image:
                array = np.asarray(image.convert("RGB"))
    _checked(array)
    if out is None:
        return array
    if out.shape != array.shape:
        raise ValueError(f"image is {array.shape[1]}x{array.shape[0]}, not "
                         f"{out.shape[1]}x{out.shape[0]}")
    out[...] = array
    return out


def _checked(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {array.dtype} {array.shape}")
    return array


#: npy headers seen (bytes -> (shape, dtype, values, data offset)): a shard set's raw members
#: share one header, and parsing it (``np.load``'s ``literal_eval``) cost more than copying the
#: pixels
_NPY_HEADERS: dict[bytes, tuple[tuple, np.dtype, int, int]] = {}


def _load_npy(data: bytes, copy: bool = True) -> np.ndarray:
    """An ``.npy`` member (no pickles) -> its array: a writable copy, or a read-only view of
    ``data`` when ``copy`` is false."""
    view = memoryview(data)
    if bytes(view[:6]) != b"\x93NUMPY" or len(view) < 10:
        raise ValueError("not an .npy member")
    header_length = (int.from_bytes(view[8:10], "little") + 10 if view[6] == 1
                     else int.from_bytes(view[8:12], "little") + 12)
    header = bytes(view[:header_length])
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        stream = io.BytesIO(header)
        read_header = (np.lib.format.read_array_header_1_0
                       if np.lib.format.read_magic(stream) == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(stream)
        if fortran or dtype.hasobject:
            raise ValueError("expected a C-ordered array of numbers")
        parsed = (shape, dtype, math.prod(shape), header_length)
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[header] = parsed
    shape, dtype, count, offset = parsed
    if len(view) - offset < count * dtype.itemsize:
        raise ValueError(f"truncated .npy member: {len(view) - offset} bytes for {shape}")
    array = np.frombuffer(view, dtype, count, offset).reshape(shape)
    return array.copy() if copy else array


def decode_sample(sample: dict) -> tuple[str, np.ndarray, dict]:
    """A raw WebDataset sample (key -> bytes) -> (key, HxWx3 uint8 image, metadata)."""
    metadata = json.loads(sample["json"]) if "json" in sample else {}
    return sample["__key__"], decode_sample_image(sample), metadata


def image_member(sample: dict) -> str:
    """The extension of a raw sample's image member; raises when it has none."""
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return extension
    raise ValueError(f"sample {sample.get('__key__')} has no image member")


def decode_sample_image(sample: dict, out: np.ndarray | None = None) -> np.ndarray:
    """A raw sample's image alone (its metadata is not parsed), into ``out`` when given."""
    extension = image_member(sample)
    return decode_image(sample[extension], extension, out)


def load_manifest(shards_dir: str | Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    if not path.is_file():
        raise PathganError(f"{shards_dir} is not a shard set: {MANIFEST} is missing")
    return read_json(path)


def shard_paths(shards_dir: str | Path, split: str | None = None) -> list[Path]:
    """The shards a manifest lists (optionally one split), as paths, in manifest order."""
    manifest = load_manifest(shards_dir)
    return [
        Path(shards_dir) / shard["name"]
        for shard in manifest["shards"]
        if split is None or shard["split"] == split
    ]
