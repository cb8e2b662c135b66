"""Patches/s of ``pathgan shards pack`` vs a plain per-patch loop, on a CAMELYON16-layout slide.

The slide is built here (once, then reused from ``--cache``): a pyramidal TIFF of the bundled
slide's texture, 512-px JPEG tiles, one page per level, µm/px only in the resolution tags (in
centimetres), like CAMELYON16's; ``--width`` x ``--height`` at level 0, by default 2.7
gigapixels so that per-slide fixed costs do not dominate. Both contenders cut the same windows
(pathgan's tissue windows at ``--patch-sizes`` and ``--target-mpp``):

* the plain loop, one process, what a user writes first: ``read_region`` at the best level,
  Lanczos resize to 224, ``save`` as PNG (Pillow's default level), one file per patch;
* ``pathgan shards pack`` as a user runs it (a subprocess, start-up included), per
  ``--workers`` value.

Each is timed by wall clock and by CPU seconds (all its processes); per core means patches/s
divided by the worker count, or patches per CPU second. Peak memory is the largest resident
set of any one process, sampled. ``reading`` compares, without encoding, reading each window
alone in a shard's mixed order with pathgan's region-batched reading; ``--encodings N`` adds
the size and speed of lossless encodings on N of the packed patches; ``--profile`` the
milliseconds per patch of each step of both. One JSON object out::

    .venv/bin/python bench/pack_throughput.py [--width 65536 --height 40960] [--workers 1,2]
        [--encodings 100] [--profile]
"""

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
TEXTURE = REPO / "shards" / "cmu_small_region.svs"
OUTPUT_SIZE = 224


def build_slide(args) -> Path:
    """The CAMELYON16-layout slide for these arguments, built once and cached."""
    import tiffslide

    from pathgan.shards.synthetic_slide import write_camelyon16_layout

    path = Path(args.cache) / f"camelyon16-layout-{args.width}x{args.height}-L{args.levels}.tif"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tiffslide.TiffSlide(TEXTURE) as texture_slide:
            texture = np.asarray(texture_slide.read_region((0, 0), 0, texture_slide.dimensions)
                                 .convert("RGB"))
            texture_mpp = float(texture_slide.properties["tiffslide.mpp-x"])
        started = time.perf_counter()
        write_camelyon16_layout(path, texture, texture_mpp, args.width, args.height, args.levels)
        print(f"built {path.name} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


def plan_windows(slide_path: Path, args) -> tuple[list, dict]:
    """pathgan's tissue windows of the slide, and what the slide's tags say."""
    import tiffslide

    from pathgan.shards import slides

    with tiffslide.TiffSlide(slide_path) as slide:
        mpp, mpp_source = slides.slide_mpp(slide)
        sizes = slides.level0_sizes(args.patch_sizes, args.target_mpp, mpp, slide_path)
        windows, _, _ = slides.patch_windows(slide, sizes, OUTPUT_SIZE, args.overlap, 0.5)
        info = {"path": str(slide_path), "dimensions": list(slide.dimensions),
                "gigapixels": round(slide.dimensions[0] * slide.dimensions[1] / 1e9, 2),
                "levels": slide.level_count, "mpp": mpp, "mpp_source": mpp_source,
                "tile": slide.properties.get("tiffslide.level[0].tile-width"),
                "level0_patch_sizes": sizes, "windows": len(windows)}
    return windows, info


def reading_costs(slide_path: Path, windows: list, sample: int = 300) -> dict:
    """Milliseconds per window (read and resize, no encoding) of the two ways a packer can
    read: each window alone in a shard's mixed order, or region by region as pathgan does."""
    import random

    import tiffslide

    from pathgan.shards import slides

    with tiffslide.TiffSlide(slide_path) as slide:
        mixed = random.Random(0).sample(windows, min(sample, len(windows)))
        started = time.perf_counter()
        for window in mixed:
            slides.resize_patch(np.asarray(slide.read_region(
                (window.x, window.y), window.level, (window.read_size,) * 2).convert("RGB")),
                OUTPUT_SIZE)
        per_window = (time.perf_counter() - started) / len(mixed) * 1000
        units: dict[tuple, list] = {}
        for window in windows:
            units.setdefault(slides.region_cell(slide, window), []).append(window)
        started = time.perf_counter()
        for unit in units.values():
            for _ in slides.read_windows(slide, unit, OUTPUT_SIZE):
                pass
        batched = (time.perf_counter() - started) / len(windows) * 1000
    return {"per_window_mixed_order_ms": round(per_window, 2),
            "region_batched_ms": round(batched, 2), "units": len(units)}


def plain_stages(slide_path: Path, windows: list, sample: int = 200) -> dict:
    """Milliseconds per patch of each step of the plain loop, on a sample of the windows."""
    import random

    import tiffslide
    from PIL import Image

    totals = dict.fromkeys(("read_region", "resize", "png_default_level", "png_level_1"), 0.0)
    chosen = random.Random(0).sample(windows, min(sample, len(windows)))
    with tiffslide.TiffSlide(slide_path) as slide:
        for window in chosen:
            started = time.perf_counter()
            region = slide.read_region((window.x, window.y), window.level,
                                       (window.read_size,) * 2).convert("RGB")
            read = time.perf_counter()
            patch = region.resize((OUTPUT_SIZE, OUTPUT_SIZE), Image.Resampling.LANCZOS)
            resized = time.perf_counter()
            patch.save(io.BytesIO(), format="PNG")
            encoded = time.perf_counter()
            patch.save(io.BytesIO(), format="PNG", compress_level=1)
            for name, elapsed in zip(totals, (read - started, resized - read, encoded - resized,
                                              time.perf_counter() - encoded), strict=True):
                totals[name] += elapsed
    return {name: round(total / len(chosen) * 1000, 2) for name, total in totals.items()}


# pathgan's steps, by the function that does each (pstats: file name, function name).
PATHGAN_STEPS = {
    "tissue_detection": ("plan.py", "plan_slide"),
    "tile_decoding": ("slides.py", "_decode"),
    "resize": ("slides.py", "resize_patch"),
    "encoding": ("format.py", "encode_image"),
    "spooling_all": ("spool.py", "spool_unit"),
    "shard_assembly": ("pack.py", "assemble_shards"),
    "whole_pack": ("pack.py", "pack"),
}


def pathgan_stages(slide_path: Path, args, work: Path) -> dict:
    """Milliseconds per patch of each step of pathgan's pack (one process, profiled)."""
    import contextlib
    import cProfile
    import pstats

    from pathgan.shards.pack import PackOptions, pack

    options = PackOptions(patch_sizes=args.patch_sizes, target_mpp=args.target_mpp,
                          overlap=args.overlap, workers=1)
    profiler = cProfile.Profile()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        manifest = profiler.runcall(pack, [str(slide_path)], work / "profiled", options)
    stats = pstats.Stats(profiler).stats
    patches = manifest["total_samples"]
    steps = {}
    for step, (file_name, function) in PATHGAN_STEPS.items():
        cumulative = sum(entry[3] for (path, _, name), entry in stats.items()
                         if path.endswith(file_name) and name == function)
        steps[step] = round(cumulative / patches * 1000, 2)
    return steps


def plain_loop(slide_path: str, windows_path: str, out_dir: str) -> None:
    """The baseline (run in its own process): one window after another."""
    import tiffslide
    from PIL import Image

    windows = json.loads(Path(windows_path).read_text())
    slide = tiffslide.TiffSlide(slide_path)
    for index, (x, y, level, read_size) in enumerate(windows):
        region = slide.read_region((x, y), level, (read_size, read_size)).convert("RGB")
        patch = region.resize((OUTPUT_SIZE, OUTPUT_SIZE), Image.Resampling.LANCZOS)
        patch.save(Path(out_dir) / f"patch_{index:07d}.png")


class PeakMemory:
    """Samples the resident set of a process tree; the peak of its root and of any child."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.root = psutil.Process(pid)
        self.peaks: dict[int, int] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self.thread.start()

    def _sample(self, interval: float) -> None:
        while not self.stopped.is_set():
            try:
                for process in [self.root, *self.root.children(recursive=True)]:
                    rss = process.memory_info().rss
                    self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), rss)
            except psutil.Error:
                pass
            self.stopped.wait(interval)

    def stop(self) -> dict:
        self.stopped.set()
        self.thread.join()
        children = [rss for pid, rss in self.peaks.items() if pid != self.root.pid]
        return {"main_mb": round(self.peaks.get(self.root.pid, 0) / 2**20),
                "worker_mb": round(max(children) / 2**20) if children else None}


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(command: list[str]) -> dict:
    """Run a command to the end; wall and CPU seconds (all its processes), peak memory."""
    cpu_before, started = children_cpu_seconds(), time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    memory = PeakMemory(process.pid)
    _, stderr = process.communicate()
    wall = time.perf_counter() - started
    peaks = memory.stop()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed:\n{stderr.decode()[-2000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(children_cpu_seconds() - cpu_before, 2),
            "peak_memory": peaks}


def with_rates(run: dict, patches: int) -> dict:
    return {"patches": patches, **run, "patches_per_s": round(patches / run["wall_s"], 1),
            "patches_per_cpu_s": round(patches / run["cpu_s"], 1)}


def folder_bytes(folder: Path, pattern: str) -> int:
    return sum(path.stat().st_size for path in folder.glob(pattern))


def run_plain(slide_path: Path, windows: list, work: Path) -> dict:
    windows_path = work / "windows.json"
    windows_path.write_text(json.dumps([[w.x, w.y, w.level, w.read_size] for w in windows]))
    out_dir = work / "plain"
    out_dir.mkdir()
    result = with_rates(timed_run([sys.executable, __file__, "plain-loop", str(slide_path),
                                   str(windows_path), str(out_dir)]), len(windows))
    result["bytes_per_patch"] = round(folder_bytes(out_dir, "*.png") / len(windows))
    shutil.rmtree(out_dir)
    return result


def run_pathgan(slide_path: Path, args, workers: int, work: Path) -> dict:
    out_dir = work / f"pathgan-w{workers}"
    command = [sys.executable, "-m", "pathgan", "shards", "pack", str(slide_path),
               "--out", str(out_dir), "--patch-sizes", ",".join(map(str, args.patch_sizes)),
               "--target-mpp", str(args.target_mpp), "--overlap", str(args.overlap),
               "--workers", str(workers)]
    run = timed_run(command)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    patches = manifest["total_samples"]
    return {"workers": workers, **with_rates(run, patches),
            "patches_per_s_per_worker": round(patches / run["wall_s"] / workers, 1),
            "bytes_per_patch": round(folder_bytes(out_dir, "*.tar") / patches),
            "shard_sha256": [shard["sha256"][:12] for shard in manifest["shards"]]}


def encoders() -> dict:
    """Lossless encodings a shard could hold: Pillow's PNG at its levels, libpng (imagecodecs)
    with one filter and a fast zlib strategy, and lossless WebP."""
    import imagecodecs
    from PIL import Image

    png = imagecodecs.PNG

    def pillow(format_name: str, **options):
        def encode(pixels: np.ndarray) -> bytes:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format=format_name, **options)
            return buffer.getvalue()
        return encode

    def libpng(strategy, png_filter):
        return lambda pixels: imagecodecs.png_encode(pixels, 1, strategy=strategy,
                                                     filter=png_filter)

    return {
        "png pillow level 6 (default)": pillow("PNG"),
        "png pillow level 1 (pathgan today)": pillow("PNG", compress_level=1),
        "png pillow level 0": pillow("PNG", compress_level=0),
        "png libpng level 1, filter up": libpng(png.STRATEGY.DEFAULT, png.FILTER.UP),
        "png libpng level 1, huffman-only, filter up": libpng(png.STRATEGY.HUFFMAN_ONLY,
                                                              png.FILTER.UP),
        "png libpng level 1, huffman-only, filter paeth": libpng(png.STRATEGY.HUFFMAN_ONLY,
                                                                 png.FILTER.PAETH),
        "png libpng level 1, rle, filter paeth": libpng(png.STRATEGY.RLE, png.FILTER.PAETH),
        "webp lossless, method 0": lambda pixels: imagecodecs.webp_encode(
            pixels, 0, lossless=True, method=0),
        "webp lossless, method 1": lambda pixels: imagecodecs.webp_encode(
            pixels, 50, lossless=True, method=1),
    }


def measure_encodings(shards_dir: Path, count: int) -> list[dict]:
    """Encode and decode (with Pillow, as the training pipeline does) ``count`` patches."""
    from PIL import Image

    from pathgan.shards.format import decode_sample
    from pathgan.shards.reading import iter_tar_samples

    patches = []
    for shard in sorted(shards_dir.glob("*.tar")):
        for key, members in iter_tar_samples(shard):
            patches.append(decode_sample({"__key__": key, **members})[1])
            if len(patches) == count:
                break
    raw = patches[0].nbytes
    rows = []
    for name, encode in encoders().items():
        started = time.perf_counter()
        encoded = [encode(pixels) for pixels in patches]
        encode_ms = (time.perf_counter() - started) / len(patches) * 1000
        started = time.perf_counter()
        decoded = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in encoded]
        decode_ms = (time.perf_counter() - started) / len(patches) * 1000
        rows.append({"encoding": name, "encode_ms": round(encode_ms, 2),
                     "decode_ms": round(decode_ms, 2),
                     "size_of_raw": round(statistics.mean(len(e) for e in encoded) / raw, 3),
                     "lossless": all(np.array_equal(a, b)
                                     for a, b in zip(patches, decoded, strict=True))})
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "plain-loop":
        plain_loop(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=65536)
    parser.add_argument("--height", type=int, default=40960)
    parser.add_argument("--levels", type=int, default=7)
    parser.add_argument("--patch-sizes", default="224,512,1024")
    parser.add_argument("--target-mpp", type=float, default=0.5)
    parser.add_argument("--overlap", type=float, default=0.0)
    parser.add_argument("--workers", default="1,2", help="pathgan worker counts to time")
    parser.add_argument("--encodings", type=int, default=100,
                        help="patches for the encoding table (0: skip it)")
    parser.add_argument("--profile", action="store_true",
                        help="also time each step of both (pathgan in one process, profiled)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "pathgan-bench"),
                        help="folder that keeps the built slide between runs")
    args = parser.parse_args()
    args.patch_sizes = [int(size) for size in args.patch_sizes.split(",")]
    started = time.perf_counter()
    slide_path = build_slide(args)
    windows, slide_info = plan_windows(slide_path, args)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        reading = reading_costs(slide_path, windows)
        plain = run_plain(slide_path, windows, work)
        runs = [run_pathgan(slide_path, args, int(w), work) for w in args.workers.split(",")]
        encodings = measure_encodings(work / f"pathgan-w{runs[0]['workers']}",
                                      args.encodings) if args.encodings else None
        profile = {"plain_loop_ms_per_patch": plain_stages(slide_path, windows),
                   "pathgan_ms_per_patch": pathgan_stages(slide_path, args, work)
                   } if args.profile else None
    for run in runs:
        if run["patches"] != plain["patches"]:
            raise SystemExit(f"pathgan packed {run['patches']} patches, the plain loop "
                             f"{plain['patches']}: not the same windows")
        run["per_core_vs_plain"] = round(run["patches_per_s_per_worker"]
                                         / plain["patches_per_s"], 2)
        run["per_cpu_second_vs_plain"] = round(run["patches_per_cpu_s"]
                                               / plain["patches_per_cpu_s"], 2)
    print(json.dumps({
        "slide": slide_info,
        "options": {"patch_sizes": args.patch_sizes, "target_mpp": args.target_mpp,
                    "overlap": args.overlap},
        "reading": reading,
        "plain_loop": plain,
        "pathgan": runs,
        "reproducible": len({tuple(run["shard_sha256"]) for run in runs}) == 1,
        "encodings": encodings,
        "profile": profile,
        "bench_seconds": round(time.perf_counter() - started),
    }, indent=2))


if __name__ == "__main__":
    main()
