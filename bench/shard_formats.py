"""What each shard image format costs and gains, measured in one run on the same patches.

A PNG shard set (``--shards``, or the bundled slide cut at ``--stride`` and packed) is converted
by ``pathgan shards convert`` to JPEG (q95, 4:4:4) and raw ``.npy`` pixels. For each format:
bytes per patch, how far its pixels are from the PNG's (mean absolute difference, 0-255), its
codec's single-core decode rate, what one loader worker of the training stream delivers and
``pathgan embed``'s reader in one worker (each with its ratio to the codec: the rounds
alternate formats and readers, medians; ``bench/data_throughput.py``'s measurement), and with
``--train`` the training loop's images/s streaming from that format (``data.cache=off``: what
a shard set too big for the cache gets; bf16 and channels_last on a GPU, uncompiled so that it
fits the GPU check's time, ``--workers`` loader workers). JSON out::

    .venv/bin/python bench/shard_formats.py                      # 2-3 min on 2 CPU cores
    .venv/bin/python bench/shard_formats.py --shards DIR --train --workers 15    # on a GPU
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pathgan.shards.convert import convert
from pathgan.shards.format import decode_sample_image, shard_paths
from pathgan.shards.pack import PackOptions, pack
from pathgan.shards.reading import tar_samples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_throughput import one_worker_vs_codec  # noqa: E402
from gpu_data import SLIDE, cut_slide  # noqa: E402

FORMATS = ("png", "jpg", "npy")  # npy: `--format raw` on the command line


def pixels(shards_dir: Path) -> dict[str, np.ndarray]:
    return {sample["__key__"]: decode_sample_image(sample)
            for path in shard_paths(shards_dir) for sample in tar_samples(path)}


def mean_abs_difference(one: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> float:
    return float(np.mean([np.abs(one[k].astype(np.int16) - other[k]).mean() for k in one]))


def loop_rate(shards: Path, args, scratch: Path) -> dict:
    """The training loop's rate streaming from ``shards`` (``train_throughput``'s way: a fresh
    process, GPU defaults, the cache off)."""
    import train_throughput

    options = argparse.Namespace(nz=100, ngf=args.ngf, ndf=args.ngf, batch_size=args.batch_size,
                                 workers=args.workers, warmup_steps=5, window_steps=5, windows=3)
    variant = "bf16-channels-last-stream" if torch.cuda.is_available() else "stream"
    return {"variant": variant, **train_throughput.pathgan_rate_in_own_process(
        options, shards, variant, scratch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, help="a PNG shard set (default: pack the slide)")
    parser.add_argument("--stride", type=int, default=112,
                        help="pixels between the slide's patches when packing it (450 patches)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=15, help="timed batches per reader")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train", action="store_true",
                        help="also the training loop's rate on each format (a GPU run)")
    parser.add_argument("--ngf", type=int, default=64, help="with --train")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="loader workers of the loop (--train) and of the conversion")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the readers' workers do the work; keep the main process quiet

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        sets = {"png": args.shards}
        if sets["png"] is None:
            cut_slide(SLIDE, scratch / "patches", args.stride)
            sets["png"] = scratch / "png"
            pack([str(scratch / "patches")], sets["png"],
                 PackOptions(workers=args.workers, max_count=64))
        for image_format in FORMATS[1:]:
            started = time.perf_counter()
            sets[image_format] = scratch / image_format
            convert(sets["png"], sets[image_format], image_format, workers=args.workers)
            print(f"shard_formats: converted to {image_format} in "
                  f"{time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        reference = pixels(sets["png"])
        results = {}
        for image_format, shards in sets.items():
            figures = one_worker_vs_codec(shards, args.batch_size, args.batches, args.rounds)
            figures["mean_abs_difference_to_png"] = round(
                mean_abs_difference(pixels(shards), reference), 3)
            if args.train:  # a run folder of its own per format
                figures["loop"] = loop_rate(shards, args, scratch / f"runs-{image_format}")
            results["raw" if image_format == "npy" else image_format] = figures
            print(f"shard_formats: {image_format}: {json.dumps(figures)}", file=sys.stderr,
                  flush=True)
    png_bytes = results["png"]["bytes_per_patch"]
    print(json.dumps({
        "benchmark": "shard_formats",
        "formats": results,
        "bytes_vs_png": {name: round(r["bytes_per_patch"] / png_bytes, 3)
                         for name, r in results.items()},
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
