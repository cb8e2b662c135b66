"""Training images/s: pathgan's loop vs a plain fp32 eager single-process loop, and vs its own
networks alone.

Both loops train the same DCGAN networks at the same batch on the same device. The plain loop is
the reference's: fp32, eager, contiguous tensors, default Adam, sigmoid-free BCE-with-logits, fed
from an in-memory batch (so data loading costs it nothing). pathgan's loop runs for real
(``train()`` on packed shards, its data included: the decoded-patch cache or the stream, as
``data.cache`` says) with each variant's overrides, each variant in a fresh process
(Accelerate's precision is fixed once per process; the peak GPU memory is then each variant's
own). The data stream alone (``data_stream_images_per_s``) is the bound the stream puts on the
loop; the networks alone (``networks_alone_images_per_s``: pathgan's networks, objective and
fused Adam stepped on a batch already on the device, in ``--networks-precision`` with
channels_last, compiled with ``--networks-compile``) are the bound the networks put on it. Each
variant also reports the share of its step time the host waited for data (``data_wait_share``,
from the loop's own log). Rates are medians over timed windows after warm-up; one JSON object
out::

    .venv/bin/python bench/train_throughput.py                      # CPU: small widths
    .venv/bin/python bench/train_throughput.py --variants cache-host,stream   # CPU: data wait
    .venv/bin/python bench/train_throughput.py --ngf 64 --ndf 64 --batch-size 128 \
        --networks-precision bf16 --networks-compile \
        --variants fp32,bf16-channels-last-compile-cache,bf16-channels-last-compile-stream
"""

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from pathgan.config import load_config
from pathgan.models import Discriminator, Generator
from pathgan.runs import RunDir
from pathgan.shards.pack import PackOptions, pack
from pathgan.shards.stream import make_image_stream
from pathgan.train.loop import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rates import images_per_second  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "default": [],  # what a user gets: auto precision, auto compile, channels_last, fused Adam
    # 'no' quoted: unquoted, YAML reads it as false, which the config turns into 'off'
    "fp32": ["train.mixed_precision='no'", "train.channels_last=off", "train.compile=off"],
    "bf16": ["train.mixed_precision=bf16", "train.channels_last=off", "train.compile=off"],
    "bf16-channels-last": ["train.mixed_precision=bf16", "train.channels_last=on",
                           "train.compile=off"],
    "bf16-channels-last-compile": ["train.mixed_precision=bf16", "train.channels_last=on",
                                   "train.compile=on"],
    "fp32-contiguous": ["train.channels_last=off"],
    # with the decoded-patch cache on the device, and streaming instead: uncompiled...
    "bf16-channels-last-cache": ["train.mixed_precision=bf16", "train.channels_last=on",
                                 "train.compile=off", "data.cache=device"],
    "bf16-channels-last-stream": ["train.mixed_precision=bf16", "train.channels_last=on",
                                  "train.compile=off", "data.cache=off"],
    # ... and the GPU defaults (compiled)
    "bf16-channels-last-compile-cache": ["train.mixed_precision=bf16", "train.channels_last=on",
                                         "train.compile=on", "data.cache=device"],
    "bf16-channels-last-compile-stream": ["train.mixed_precision=bf16",
                                          "train.channels_last=on", "train.compile=on",
                                          "data.cache=off"],
    # the CPU defaults with the cache in host memory, and streaming instead
    "cache-host": ["data.cache=host"],
    "stream": ["data.cache=off"],
}


def peak_memory() -> dict:
    """This process's peak GPU memory (MiB): held by tensors, and reserved by the allocator."""
    if not torch.cuda.is_available():
        return {}
    return {"peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20),
            "peak_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20)}


def plain_loop_rate(args, device: torch.device) -> float:
    """The reference loop: no autocast, no compile, no channels_last, plain Adam."""
    generator = Generator(args.nz, args.ngf).to(device)
    discriminator = Discriminator(args.ndf).to(device)
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    real = torch.rand(args.batch_size, 3, 224, 224, device=device) * 2 - 1
    ones = torch.ones(args.batch_size, device=device)
    zeros = torch.zeros(args.batch_size, device=device)

    def step():
        fake = generator(torch.randn(args.batch_size, args.nz, device=device))
        d_optimizer.zero_grad()
        d_loss = (F.binary_cross_entropy_with_logits(discriminator(real), ones)
                  + F.binary_cross_entropy_with_logits(discriminator(fake.detach()), zeros))
        d_loss.backward()
        d_optimizer.step()
        g_optimizer.zero_grad()
        F.binary_cross_entropy_with_logits(discriminator(fake), ones).backward()
        g_optimizer.step()

    return timed_rate(step, args, device)


def networks_alone_rate(args, device: torch.device) -> float:
    """pathgan's networks, objective and optimizer stepped without the loop (``PlainGAN``), on
    one batch already on the device: what the loop could reach if nothing else cost time."""
    from plain_gan import PlainGAN

    config = load_config(REPO / "configs" / "dcgan.yaml",
                         [f"model.nz={args.nz}", f"model.ngf={args.ngf}", f"model.ndf={args.ndf}",
                          "train.channels_last=true"])
    dtype = {"fp32": None, "bf16": torch.bfloat16}[args.networks_precision]
    backend = "inductor" if args.networks_compile else None
    gan = PlainGAN.build(config, device, compile_backend=backend, autocast_dtype=dtype)
    real = {"images": (torch.rand(args.batch_size, 3, 224, 224, device=device) * 2 - 1
                       ).contiguous(memory_format=torch.channels_last)}

    def step():
        gan.step(real, torch.randn(args.batch_size, args.nz, device=device))

    return timed_rate(step, args, device)


def timed_rate(step, args, device: torch.device) -> float:
    """Median images/s of ``step`` over ``args.windows`` windows, after warm-up steps."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup_steps):
        step()
    rates = []
    for _ in range(args.windows):
        sync()
        start = time.perf_counter()
        for _ in range(args.window_steps):
            step()
        sync()
        rates.append(args.batch_size * args.window_steps / (time.perf_counter() - start))
    return statistics.median(rates)


def stream_rate(args, shards: Path) -> float:
    """Images/s of the training stream alone (as the loop reads it: uint8, pinned with CUDA),
    the bound that data puts on pathgan's loop on this machine."""
    stream = make_image_stream(shards, batch_size=args.batch_size, num_workers=args.workers,
                               as_uint8=True)
    try:
        return images_per_second(stream, args.windows * args.window_steps, args.warmup_steps,
                                 windows=1)
    finally:
        stream.close()


def pathgan_rate(args, shards: Path, variant: str, scratch: Path) -> dict:
    # Run as `pathgan train` runs: a spawned process would start the loader's workers by spawn
    # too, and they would have to pickle the pipeline.
    multiprocessing.set_start_method("fork", force=True)
    steps = args.warmup_steps + args.windows * args.window_steps
    overrides = [
        f"data.shards={shards}", f"run.dir={scratch / variant}", f"model.nz={args.nz}",
        f"model.ngf={args.ngf}", f"model.ndf={args.ndf}", f"train.batch_size={args.batch_size}",
        f"train.max_steps={steps}", f"log.every={args.window_steps}", "log.wandb=false",
        f"log.sample_every={steps * 10}", f"ckpt.every={steps * 10}", "train.ema=false",
        f"data.num_workers={args.workers}", *VARIANTS[variant],
    ]
    train(load_config(REPO / "configs" / "dcgan.yaml", overrides))
    rows = RunDir(scratch / variant).read_metrics()
    # Windows end every window_steps; the first warmup_steps belong to warm-up.
    timed = [row for row in rows if row["step"] > args.warmup_steps]
    return {"images_per_s": round(statistics.median(r["images_per_s"] for r in timed), 2),
            "data_wait_share": round(statistics.median(r["data_wait_share"] for r in timed), 4),
            **peak_memory()}


def pathgan_rate_in_own_process(args, shards: Path, variant: str, scratch: Path) -> dict:
    """``pathgan_rate`` in a fresh process (Accelerate fixes the precision once per process).
    A variant that fails is reported as its error, so that the others' figures still come out."""
    started = time.perf_counter()
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            result = pool.submit(pathgan_rate, args, shards, variant, scratch).result()
    except Exception as error:  # one variant failing must not lose the figures of the others
        traceback.print_exc()
        result = {"error": f"{type(error).__name__}: {error}"[:500]}
    result["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(f"train_throughput: {variant}: {json.dumps(result)}", file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--ndf", type=int, default=16)
    parser.add_argument("--nz", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--window-steps", type=int, default=4)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--variants", default="default",
                        help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--networks-precision", choices=["fp32", "bf16"], default="fp32",
                        help="autocast of the networks-alone figure (bf16: the GPU default)")
    parser.add_argument("--networks-compile", action="store_true",
                        help="compile the networks-alone figure's networks (inductor)")
    parser.add_argument("--shards", type=Path, default=None,
                        help="a packed shard set (default: pack the bundled slide, which needs "
                             "tiffslide)")
    args = parser.parse_args()
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {unknown}")
    for overrides in VARIANTS.values():  # a bad override of any variant must not cost a GPU run
        load_config(REPO / "configs" / "dcgan.yaml", overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory() as scratch:
        shards = args.shards
        if shards is None:
            shards = Path(scratch) / "shards"
            pack([str(REPO / "shards" / "cmu_small_region.svs")], shards,
                 PackOptions(workers=1, overlap=0.5))
        baseline = plain_loop_rate(args, device)
        plain_fp32_memory = peak_memory()
        print(f"train_throughput: plain fp32 eager loop: {baseline:.2f} images/s, "
              f"{json.dumps(plain_fp32_memory)}", file=sys.stderr, flush=True)
        stream = stream_rate(args, shards)
        print(f"train_throughput: the data stream alone: {stream:.2f} images/s",
              file=sys.stderr, flush=True)
        alone = networks_alone_rate(args, device)
        print(f"train_throughput: the networks alone: {alone:.2f} images/s",
              file=sys.stderr, flush=True)
        results = {v: pathgan_rate_in_own_process(args, shards, v, Path(scratch))
                   for v in variants}

    rates = {v: r["images_per_s"] for v, r in results.items() if "images_per_s" in r}
    print(json.dumps({
        "benchmark": "train_throughput",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "device_memory_mb": (round(torch.cuda.get_device_properties(device).total_memory
                                   / 2**20) if device.type == "cuda" else None),
        "batch_size": args.batch_size, "ngf": args.ngf, "ndf": args.ndf,
        "plain_fp32_images_per_s": round(baseline, 2),
        "plain_fp32_memory": plain_fp32_memory,
        "data_stream_images_per_s": round(stream, 2),
        "networks_alone_images_per_s": round(alone, 2),
        "networks_alone": {"precision": args.networks_precision,
                           "compiled": args.networks_compile, "channels_last": True},
        "variants": {v: {**r, **({"speedup": round(rates[v] / baseline, 2),
                                  "vs_networks_alone": round(rates[v] / alone, 2)}
                                 if v in rates else {})} for v, r in results.items()},
        "speedup": round(rates[variants[0]] / baseline, 2) if variants[0] in rates else None,
        "fastest_variant": max(rates, key=rates.get) if rates else None,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
