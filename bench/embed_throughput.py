"""Embeddings/s of ``pathgan embed`` versus a plain loop (one image at a time, same encoder).

Prints one JSON object. ``speedup`` (top level) is the Path Foundation-layout encoder's:
``pathgan embed`` at its best batch size over the plain loop (each mode: best of ``--repeats``
runs, alternated); each encoder has its own ``speedup`` too.

Encoders measured, both built here with no download:
- ``tf-vit-s16``: a ViT-S/16-sized Keras model (patch 16, width 384, 6 heads, MLP 1536,
  ``--tf-depth`` blocks, 12 like Path Foundation by default) exported as a SavedModel in the Hub
  layout with Path Foundation's signature and loaded by the real ``path-foundation:/dir`` path;
- ``timm-vit_small_patch16_224``: timm's ViT-S/16, random init (``timm:...:random``;
  ``--timm-model`` names another, e.g. a smaller one for a quick check).

The plain loop is what the original study did: decode a sample, convert it, run the encoder on
a batch of one. ``pathgan embed`` reads the same shards with DataLoader workers and batches.

The timm encoder is also held against the device's compute bound: its forward pass alone on
batches already on the device (``forward_only``, no data loading), over the FLOP/s that a
square matrix product of ``--precision`` reaches on the same device divided by the encoder's
FLOPs per image, counted by torch (2 per multiply-add: ViT-S/16 at 224 is about 8.5 GFLOP, the
4.6 "GFLOPs" often quoted for it being multiply-adds).

    python bench/embed_throughput.py --quick             # a couple of minutes on 2 CPU cores
    python bench/embed_throughput.py --device cuda --precision bf16 --images 4096 \
        --plain-images 512 --batch-sizes 64,128,256,512 --encoders timm    # on a GPU
"""

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build_tf_vit(directory: Path, depth: int, width: int = 384, heads: int = 6) -> None:
    """A ViT-S/16-sized Keras model with Path Foundation's serving signature, in Hub layout."""
    from pathgan.encoders.path_foundation import import_tensorflow

    import_tensorflow()
    import keras
    from keras import layers

    class ClassTokenAndPosition(layers.Layer):
        def build(self, input_shape):
            self.token = self.add_weight(shape=(1, 1, width), initializer="zeros")
            self.position = self.add_weight(shape=(1, 197, width), initializer="random_normal")

        def call(self, tokens):
            batch = keras.ops.shape(tokens)[0]
            cls = keras.ops.broadcast_to(self.token, (batch, 1, width))
            return keras.ops.concatenate([cls, tokens], axis=1) + self.position

    keras.utils.set_random_seed(0)
    inputs = keras.Input((224, 224, 3))
    x = layers.Conv2D(width, 16, strides=16)(inputs)
    x = ClassTokenAndPosition()(layers.Reshape((196, width))(x))
    for _ in range(depth):
        y = layers.LayerNormalization(epsilon=1e-6)(x)
        x = x + layers.MultiHeadAttention(heads, width // heads)(y, y)
        y = layers.LayerNormalization(epsilon=1e-6)(x)
        x = x + layers.Dense(width)(layers.Dense(4 * width, activation="gelu")(y))
    x = layers.LayerNormalization(epsilon=1e-6)(x)
    model = keras.Model(inputs, x[:, 0])
    model.export(str(directory), format="tf_saved_model", verbose=False)


def make_shards(directory: Path, images: int, per_shard: int) -> None:
    """Random-texture 224x224 PNG patches in WebDataset shards with a manifest."""
    import webdataset as wds
    from PIL import Image

    from pathgan.core.fileio import sha256_file

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    shards = []
    for start in range(0, images, per_shard):
        name = f"train-{start // per_shard:06d}.tar"
        count = min(per_shard, images - start)
        with wds.TarWriter(str(directory / name)) as writer:
            for i in range(start, start + count):
                low = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
                image = Image.fromarray(low).resize((224, 224), Image.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, format="PNG", compress_level=1)
                writer.write({"__key__": f"p{i:06d}", "png": buffer.getvalue(), "json": "{}"})
        shards.append({"name": name, "split": "train", "samples": count,
                       "sha256": sha256_file(directory / name)})
    manifest = {"shards": shards, "total_samples": images}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def plain_loop(shards_dir: Path, encoder, device, limit: int | None) -> tuple[int, float]:
    """One image at a time: read, decode, convert, embed (what the original study did), for the
    first ``limit`` images (all when None): its rate does not depend on how many."""
    import torch
    import webdataset as wds

    from pathgan.core.images import hwc_to_chw, uint8_to_signed
    from pathgan.shards.format import decode_sample, shard_paths

    count, started = 0, time.perf_counter()
    for path in shard_paths(shards_dir):
        for raw in wds.WebDataset(str(path), shardshuffle=False):
            if count == limit:
                return count, time.perf_counter() - started
            _, image, _ = decode_sample(raw)
            with torch.no_grad():
                x = uint8_to_signed(hwc_to_chw(image).to(device))[None]
                encoder(x).cpu().numpy()
            count += 1
    return count, time.perf_counter() - started


def measure(name: str, encoder, shards_dir: Path, args, device) -> dict:
    import shutil

    import torch

    from pathgan.embed import embed_shards
    from pathgan.shards.embedding_files import embeddings_dir

    with torch.no_grad():  # warm up both shapes (TensorFlow traces, cuDNN picks kernels)
        encoder(torch.zeros(1, 3, 224, 224, device=device))
        encoder(torch.zeros(max(args.batch_sizes), 3, 224, 224, device=device))
    # Alternate the two modes and keep each one's best of --repeats runs: a shared 2-core machine
    # drifts by tens of percent from one minute to the next.
    plain, batched = [], {batch_size: [] for batch_size in args.batch_sizes}
    for _ in range(args.repeats):
        count, seconds = plain_loop(shards_dir, encoder, device, args.plain_images)
        plain.append(count / seconds)
        for batch_size in args.batch_sizes:
            shutil.rmtree(embeddings_dir(shards_dir, encoder.encoder_id), ignore_errors=True)
            started = time.perf_counter()
            summary = embed_shards(shards_dir, encoder, batch_size=batch_size,
                                   num_workers=args.num_workers, precision=args.precision,
                                   device=device, progress=False, log=lambda message: None)
            seconds = time.perf_counter() - started
            assert summary["images"] == args.images and not summary.get("error"), summary
            batched[batch_size].append(args.images / seconds)
            print(f"{name}: batch {batch_size}: {args.images / seconds:.2f} images/s "
                  f"(plain loop {plain[-1]:.2f})", file=sys.stderr, flush=True)
    result = {"name": name, "encoder_id": encoder.encoder_id, "embed_dim": encoder.embed_dim,
              "images": args.images,
              "plain_loop": {"images": count, "images_per_s": round(max(plain), 2),
                             "runs": [round(r, 2) for r in plain]},
              "pathgan_embed": [{"batch_size": b, "images_per_s": round(max(rates), 2),
                                 "runs": [round(r, 2) for r in rates]}
                                for b, rates in batched.items()]}
    best = max(result["pathgan_embed"], key=lambda r: r["images_per_s"])
    result["best_batch_size"] = best["batch_size"]
    result["speedup"] = round(best["images_per_s"] / result["plain_loop"]["images_per_s"], 2)
    return result


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(device, precision: str, size: int, repeats: int = 50) -> float:
    """FLOP/s of a ``size``-cubed matrix product in ``precision`` (random data, after warm-up:
    a GPU raises its clocks under load)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(10):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def flop_per_image(encoder, device) -> float:
    """FLOPs of one image's forward pass as torch counts them (2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoder(torch.zeros(1, 3, 224, 224, device=device))
    return float(counter.get_total_flops())


def forward_only(encoder, batch_sizes, device, iterations: int) -> list[dict]:
    """Images/s of the encoder's forward pass alone, on batches already on the device."""
    import torch

    rates = []
    for batch_size in batch_sizes:
        images = torch.rand(batch_size, 3, 224, 224, device=device) * 2 - 1
        with torch.no_grad():
            encoder(images)  # warm-up: kernels chosen for this shape
            synchronize(device)
            started = time.perf_counter()
            for _ in range(iterations):
                encoder(images)
            synchronize(device)
        rate = batch_size * iterations / (time.perf_counter() - started)
        rates.append({"batch_size": batch_size, "images_per_s": round(rate, 2)})
    return rates


def against_compute_bound(encoder, args, device) -> dict:
    """The forward-only sweep and the share of the device's compute bound it reaches, eager
    (what ``pathgan embed`` runs) and, at the best batch size, compiled (fused elementwise
    work between the matrix products: what compiling would gain)."""
    import torch

    flops = matmul_flops(device, args.precision, args.matmul_size)
    per_image = flop_per_image(encoder, device)
    rates = forward_only(encoder, args.batch_sizes, device, args.forward_iterations)
    best = max(rates, key=lambda r: r["images_per_s"])
    bound = flops / per_image
    result = {"forward_only": rates,
              "compute_bound": {"matmul_size": args.matmul_size, "precision": args.precision,
                                "matmul_flop_per_s": round(flops), "flop_per_image": per_image,
                                "images_per_s": round(bound, 2)},
              "forward_best_batch_size": best["batch_size"],
              "fraction_of_compute_bound": round(best["images_per_s"] / bound, 4)}
    if args.compile_backend != "none":
        compiled = torch.compile(encoder, backend=args.compile_backend)
        (rate,) = forward_only(compiled, [best["batch_size"]], device, args.forward_iterations)
        result["compiled_forward_only"] = {**rate, "backend": args.compile_backend,
                                           "fraction_of_compute_bound":
                                               round(rate["images_per_s"] / bound, 4)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small run for 2 CPU cores: 24 images, batch sizes 8,24")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--plain-images", type=int, default=None,
                        help="images of the one-at-a-time loop (default: all); `pathgan embed` "
                             "needs thousands for a steady rate (worker start-up, the last "
                             "batches), the plain loop's rate is steady from the start")
    parser.add_argument("--per-shard", type=int, default=None, help="default: images / 2")
    parser.add_argument("--batch-sizes", default="16,32,96")
    parser.add_argument("--tf-depth", type=int, default=12, help="transformer blocks (12 = ViT-S)")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--device", default=None)
    parser.add_argument("--encoders", default="tf,timm", help="tf, timm or both")
    parser.add_argument("--timm-model", default="vit_small_patch16_224",
                        help="the timm encoder (random init; default vit_small_patch16_224)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each mode; best is kept")
    parser.add_argument("--matmul-size", type=int, default=None,
                        help="side of the matrix product that measures the device's FLOP/s "
                             "(default: 8192 on a GPU, 1024 on a CPU)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled forward-only figure "
                             "(default: inductor on a GPU, aot_eager on a CPU, where inductor "
                             "builds C++ for minutes; none: skip it)")
    parser.add_argument("--forward-iterations", type=int, default=10,
                        help="timed forward passes per batch size in the forward-only sweep")
    args = parser.parse_args()
    if args.quick:
        args.images, args.batch_sizes = 24, "8,24"
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.per_shard = args.per_shard or max(1, args.images // 2)

    from pathgan.encoders.path_foundation import import_tensorflow

    tf = import_tensorflow() if "tf" in args.encoders else None  # triton before TF, see there
    import torch

    from pathgan.encoders import load_encoder

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    args.compile_backend = args.compile_backend or (
        "inductor" if device.type == "cuda" else "aot_eager")
    results = []
    with tempfile.TemporaryDirectory(prefix="pathgan-bench-") as work:
        work = Path(work)
        make_shards(work / "shards", args.images, args.per_shard)
        if "tf" in args.encoders:
            build_tf_vit(work / "tf-vit", args.tf_depth)
            encoder = load_encoder(f"path-foundation:{work / 'tf-vit'}", device=device)
            results.append(measure(f"tf-vit-s16-depth{args.tf_depth}", encoder,
                                   work / "shards", args, device))
            del encoder
        if "timm" in args.encoders:
            encoder = load_encoder(f"timm:{args.timm_model}:random", device=device,
                                   precision=args.precision)
            results.append({**measure(f"timm-{args.timm_model}", encoder, work / "shards",
                                      args, device),
                            **against_compute_bound(encoder, args, device)})
    report = {
        "benchmark": "embed_throughput",
        "speedup": results[0]["speedup"],
        "speedup_of": results[0]["name"],
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "tensorflow": tf.__version__ if tf is not None else None,
        "precision": args.precision,
        "images": args.images,
        "per_shard": args.per_shard,
        "encoders": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
