"""Images/s delivered to a trainer: the shard pipeline vs torchvision ImageFolder.

The baseline is the reference study's way: 512 px patch files in an ImageFolder, resized to
224 on the fly (Resize, ToTensor, Normalize). pathgan reads the same patches packed into
shards at 224. Same batch size and worker count, one run, one JSON object out::

    .venv/bin/python bench/data_throughput.py [--workers 2] [--batches 60]
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import tiffslide
import torch
from torchvision import datasets, transforms

from pathgan.shards.pack import PackOptions, pack
from pathgan.shards.slides import patch_windows
from pathgan.shards.stream import make_image_stream

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rates import images_per_second  # noqa: E402

SLIDE = Path(__file__).resolve().parents[1] / "shards" / "cmu_small_region.svs"


def write_patch_folder(root: Path, patch_size: int) -> int:
    """The slide's tissue patches as ``patch_size`` PNG files, ImageFolder layout."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=15, help="batches per timed window")
    parser.add_argument("--patch-size", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loaders' workers do the work; keep the main process quiet

    with tempfile.TemporaryDirectory() as scratch:
        folder, shards = Path(scratch) / "folder", Path(scratch) / "shards"
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
        stream = make_image_stream(shards, batch_size=args.batch_size,
                                   num_workers=args.workers)
        warmup = 3
        baseline_rate = images_per_second(FirstItem(baseline), args.batches, warmup)
        shard_rate = images_per_second(stream, args.batches, warmup)
        stream.close()

    print(json.dumps({
        "benchmark": "data_throughput",
        "patches": count,
        "source_patch_px": args.patch_size,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "imagefolder_images_per_s": round(baseline_rate, 1),
        "shards_images_per_s": round(shard_rate, 1),
        "speedup": round(shard_rate / baseline_rate, 2),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
