"""Images/s delivered to a trainer: the shard pipeline vs torchvision ImageFolder, and what one
loader worker delivers against its codec's own single-core decode rate.

The baseline is the reference study's way: 512 px patch files in an ImageFolder, resized to
224 on the fly (Resize, ToTensor, Normalize). pathgan reads the same patches packed into
shards at 224. Same batch size and worker count, one run, one JSON object out::

    .venv/bin/python bench/data_throughput.py [--workers 2] [--batches 15]
    .venv/bin/python bench/data_throughput.py --shards DIR   # only one worker vs its codec

``one_worker`` holds, on the same shards in the same run (alternating rounds, medians): the
codec's rate (the library call alone, on one core, over the shards' image members already in
memory), one loader worker of ``make_image_stream`` (uint8, as training reads it: reading the
tars, shuffling, decoding, handing batches to the main process) and ``pathgan embed``'s reader
(its Dataset in one DataLoader worker), with each one's ratio to the codec.
"""

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import psutil
import torch
from PIL import Image

from pathgan.shards.format import image_member, load_manifest, shard_paths
from pathgan.shards.reading import ShardSamples, collate_samples, index_shard, tar_samples
from pathgan.shards.stream import make_image_stream

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rates import images_per_second  # noqa: E402

SLIDE = Path(__file__).resolve().parents[1] / "shards" / "cmu_small_region.svs"
#: each member type's decoder as its library gives it, the reference for a worker's rate
CODECS = {
    "png": ("imagecodecs.png_decode (libpng)", imagecodecs.png_decode),
    "jpg": ("imagecodecs.jpeg8_decode (libjpeg-turbo)", imagecodecs.jpeg8_decode),
    "npy": ("numpy.load", lambda data: np.load(io.BytesIO(data), allow_pickle=False)),
}


def write_patch_folder(root: Path, patch_size: int) -> int:
    """The slide's tissue patches as ``patch_size`` PNG files, ImageFolder layout."""
    import tiffslide

    from pathgan.shards.slides import patch_windows

    slide = tiffslide.TiffSlide(SLIDE)
    windows, _, _ = patch_windows(slide, [patch_size], patch_size, overlap=0.75, min_tissue=0.3)
    (root / "tissue").mkdir(parents=True)
    for index, window in enumerate(windows):
        region = slide.read_region((window.x, window.y), 0, (patch_size, patch_size))
        region.convert("RGB").save(root / "tissue" / f"patch_{index:05d}.png", compress_level=1)
    return len(windows)


class FirstItem:
    """ImageFolder yields (image, label); a trainer needs the images."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for images, _ in self.loader:
            yield images


class EmbedImages:
    """``pathgan embed``'s reader (ShardSamples in DataLoader workers, as embed.py runs it)
    as a source of image batches, over and over."""

    def __init__(self, shards_dir: Path, batch_size: int, workers: int) -> None:
        shards = [(path, index_shard(path)) for path in shard_paths(shards_dir)]
        self.loader = torch.utils.data.DataLoader(
            ShardSamples(shards), batch_size=batch_size, num_workers=workers,
            collate_fn=collate_samples, persistent_workers=workers > 0, drop_last=True,
            prefetch_factor=4 if workers else None)

    def __iter__(self):
        while True:
            for _, images, _ in self.loader:
                yield images


def image_members(shards_dir: Path) -> tuple[str, list[bytes]]:
    """The member type and the encoded images of a shard set's train split, in memory."""
    samples = [sample for path in shard_paths(shards_dir, "train") for sample in
               tar_samples(path)]
    extension = image_member(samples[0])
    return extension, [sample[extension] for sample in samples]


@dataclass
class Rate:
    """Images per second of wall-clock time, and per CPU second of the processes that did the
    work: on a shared machine the second holds steady when other jobs take the cores."""

    wall: float
    cpu: float


def worker_cpu_seconds() -> dict[int, float]:
    """CPU seconds used so far by each live child process (the loader workers), by pid."""
    seconds = {}
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            seconds[child.pid] = times.user + times.system
    return seconds


def cpu_used_since(before: dict[int, float]) -> float:
    """CPU seconds the processes of ``before`` that still live have used since then."""
    now = worker_cpu_seconds()
    return sum(now[pid] - seconds for pid, seconds in before.items() if pid in now)


def decode_rate(decode, members: list[bytes], seconds: float = 1.0) -> Rate:
    """``decode`` over ``members`` on this thread, passes repeated for at least ``seconds``."""
    decoded, started, cpu_started = 0, time.perf_counter(), time.thread_time()
    while True:
        for data in members:
            decode(data)
        decoded += len(members)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return Rate(decoded / elapsed, decoded / (time.thread_time() - cpu_started))


def loader_rate(source, batches: int, warmup: int = 3) -> Rate:
    """``source``'s batches after ``warmup``, its loader workers' CPU time counted."""
    iterator = iter(source)
    for _ in range(warmup):
        next(iterator)
    started, cpu_started, images = time.perf_counter(), worker_cpu_seconds(), 0
    for _ in range(batches):
        images += next(iterator).shape[0]
    cpu = cpu_used_since(cpu_started)
    rate = Rate(images / (time.perf_counter() - started), images / max(cpu, 1e-9))
    iterator.close()
    return rate


def pillow_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def one_worker_vs_codec(shards_dir: Path, batch_size: int, batches: int,
                        rounds: int = 3) -> dict:
    """Codec, one stream worker and one embed-reader worker on the same shards, alternating
    ``rounds`` times (the machine's load drifts); medians and ratios to the codec."""
    extension, members = image_members(shards_dir)
    codec_name, codec = CODECS[extension]
    rates = {"codec": [], "pillow": [], "stream_worker": [], "embed_reader": []}
    for _ in range(rounds):
        rates["codec"].append(decode_rate(codec, members))
        if extension != "npy":
            rates["pillow"].append(decode_rate(pillow_decode, members))
        stream = make_image_stream(shards_dir, batch_size=batch_size, num_workers=1,
                                   as_uint8=True)
        try:
            rates["stream_worker"].append(loader_rate(stream_epochs(stream), batches))
        finally:
            stream.close()
        rates["embed_reader"].append(loader_rate(
            EmbedImages(shards_dir, batch_size, workers=1), batches))
    wall = {name: round(statistics.median(r.wall for r in values), 1)
            for name, values in rates.items() if values}
    cpu = {name: round(statistics.median(r.cpu for r in values), 1)
           for name, values in rates.items() if values}
    manifest = load_manifest(shards_dir)
    figures = {
        "format": extension, "codec": codec_name, "patches": len(members),
        "bytes_per_patch": round(sum(s["bytes"] for s in manifest["shards"])
                                 / manifest["total_samples"]),
        "batch_size": batch_size, "rounds": rounds,
        "images_per_s": wall, "images_per_cpu_s": cpu,
    }
    for reader in ("stream_worker", "embed_reader"):
        figures[f"{reader}_vs_codec"] = round(wall[reader] / wall["codec"], 2)
        figures[f"{reader}_vs_codec_per_cpu_s"] = round(cpu[reader] / cpu["codec"], 2)
    return figures


def stream_epochs(stream):
    """A stream's batches, epoch after epoch."""
    while True:
        yield from stream


def imagefolder_vs_shards(args, scratch: Path) -> tuple[dict, Path]:
    """The reference's ImageFolder loader against the shard stream, same patches; returns the
    figures and the shard set packed for them."""
    from torchvision import datasets, transforms

    from pathgan.shards.pack import PackOptions, pack

    folder, shards = scratch / "folder", scratch / "shards"
    count = write_patch_folder(folder, args.patch_size)
    pack([str(folder)], shards, PackOptions(workers=max(1, args.workers), max_count=64))
    baseline = torch.utils.data.DataLoader(
        datasets.ImageFolder(folder, transforms.Compose([
            transforms.Resize(224),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ])),
        batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
        persistent_workers=args.workers > 0, drop_last=True,
    )
    stream = make_image_stream(shards, batch_size=args.batch_size, num_workers=args.workers)
    warmup = 3
    baseline_rate = images_per_second(FirstItem(baseline), args.batches, warmup)
    shard_rate = images_per_second(stream, args.batches, warmup)
    stream.close()
    return {
        "patches": count,
        "source_patch_px": args.patch_size,
        "imagefolder_images_per_s": round(baseline_rate, 1),
        "shards_images_per_s": round(shard_rate, 1),
        "speedup": round(shard_rate / baseline_rate, 2),
    }, shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=15, help="batches per timed window")
    parser.add_argument("--patch-size", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of codec and one worker (median)")
    parser.add_argument("--shards", type=Path, default=None,
                        help="measure one worker vs its codec on this shard set only")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loaders' workers do the work; keep the main process quiet

    result = {"benchmark": "data_throughput", "batch_size": args.batch_size,
              "workers": args.workers}
    with tempfile.TemporaryDirectory() as scratch:
        shards = args.shards
        if shards is None:
            figures, shards = imagefolder_vs_shards(args, Path(scratch))
            result.update(figures)
        result["one_worker"] = one_worker_vs_codec(shards, args.batch_size, args.batches,
                                                   args.rounds)
    result.update({"cpu_count": os.cpu_count(), "torch": torch.__version__})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
