"""Embedding GAN training speed vs the DCGAN on the same device, and where the time goes.

One step of each GAN (D update + G update, the shared objective and optimizer, no Accelerate so
that only the networks are timed: ``plain_gan.PlainGAN``), at the same batch and generator
width. The Embedding GAN runs with a torch ViT-S/16 (timm, random init; ``--torch-encoder``
names another) and with a ViT-S/16-sized Keras SavedModel in Path Foundation's layout through
the TensorFlow bridge (``--encoders torch`` leaves TensorFlow out). The breakdown times the
parts of a generator step alone: generator forward+backward, encoder forward, encoder forward +
input gradient. ``--precision bf16`` runs the networks under bf16 autocast, as the loop does on
a GPU, and the torch encoder in bf16 (the TensorFlow one stays fp32). JSON out::

    .venv/bin/python bench/embgan_throughput.py [--batch-size 8] [--ngf 16] [--tf-depth 12]
    .venv/bin/python bench/embgan_throughput.py --batch-size 128 --ngf 64 --precision bf16 \
        --encoders torch                                               # on a GPU
"""

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from plain_gan import PlainGAN

from pathgan.config import load_config
from pathgan.encoders import load_encoder

REPO = Path(__file__).resolve().parents[1]
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def median_seconds(function, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def autocast(args, device):
    dtype = AUTOCAST_DTYPES[args.precision]
    return (torch.autocast(device.type, dtype=dtype) if dtype is not None
            else contextlib.nullcontext())


def gan_step_seconds(config_name: str, overrides: list[str], args, device,
                     encoder_precision: str | None = None) -> float:
    config = load_config(REPO / "configs" / config_name, overrides)
    gan = PlainGAN.build(config, device, autocast_dtype=AUTOCAST_DTYPES[args.precision],
                         encoder_precision=encoder_precision)
    real = {"images": torch.rand(args.batch_size, 3, 224, 224, device=device) * 2 - 1}
    if gan.embed_dim is not None:
        real = {"embeddings": torch.randn(args.batch_size, gan.embed_dim, device=device)}
    return median_seconds(lambda: gan.step(real, torch.randn(args.batch_size, config.model.nz,
                                                             device=device)), args.repeats)


def breakdown(encoder, args, device) -> dict:
    from pathgan.models import Generator

    generator = Generator(ngf=args.ngf).to(device)
    noise = torch.randn(args.batch_size, 100, device=device)
    images = (torch.rand(args.batch_size, 3, 224, 224, device=device) * 2 - 1)

    def generator_forward_backward():
        with autocast(args, device):
            output = generator(noise).float().mean()
        output.backward()

    def encoder_forward():
        with torch.no_grad():
            encoder(images)

    def encoder_input_gradient():
        leaf = images.clone().requires_grad_(True)
        encoder(leaf).sum().backward()

    return {name: round(median_seconds(fn, args.repeats), 4) for name, fn in [
        ("generator_fwd_bwd_s", generator_forward_backward),
        ("encoder_fwd_s", encoder_forward),
        ("encoder_fwd_input_grad_s", encoder_input_gradient),
    ]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tf-depth", type=int, default=12, help="blocks of the Keras ViT")
    parser.add_argument("--encoders", default="torch,tf",
                        help="torch, tf or both: the Embedding GAN's encoders (tf: TensorFlow)")
    parser.add_argument("--torch-encoder", default="timm:vit_small_patch16_224:random",
                        help="spec of the torch encoder (default: ViT-S/16, random init)")
    parser.add_argument("--precision", choices=list(AUTOCAST_DTYPES), default="fp32",
                        help="autocast dtype of every forward pass (default fp32)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The configs' other settings (channels_last, the optimizer) as the loop would use them
    common = [f"model.ngf={args.ngf}", f"model.ndf={args.ngf}"]
    encoders = {}

    with tempfile.TemporaryDirectory() as scratch:
        if "torch" in args.encoders:
            encoders["torch"] = args.torch_encoder
        if "tf" in args.encoders:
            from embed_throughput import build_tf_vit

            tf_dir = Path(scratch) / "path-foundation-vits"
            build_tf_vit(tf_dir, depth=args.tf_depth)
            encoders["tf_bridge"] = f"path-foundation:{tf_dir}"
        # --precision applies to the torch encoder; the TensorFlow bridge runs in fp32 only
        precisions = {"torch": args.precision, "tf_bridge": None}
        seconds = {"dcgan": gan_step_seconds("dcgan.yaml", common, args, device)}
        for name, spec in encoders.items():
            seconds[f"embgan_{name}"] = gan_step_seconds(
                "embgan.yaml", [*common, f"model.encoder={spec}"], args, device,
                encoder_precision=precisions[name])
        parts = {name: breakdown(load_encoder(spec, device=device, precision=precisions[name]),
                                 args, device) for name, spec in encoders.items()}

    rates = {name: args.batch_size / s for name, s in seconds.items()}
    print(json.dumps({
        "benchmark": "embgan_throughput",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "batch_size": args.batch_size, "ngf": args.ngf, "precision": args.precision,
        "encoders": {name: spec if name == "torch" else f"ViT-S/16-sized SavedModel, depth "
                     f"{args.tf_depth}" for name, spec in encoders.items()},
        "images_per_s": {name: round(rate, 2) for name, rate in rates.items()},
        "relative_to_dcgan": {name: round(rate / rates["dcgan"], 3)
                              for name, rate in rates.items()},
        "breakdown": parts,
        # the first encoder's (torch when measured)
        "speedup": round(rates[f"embgan_{next(iter(encoders))}"] / rates["dcgan"], 3),
    }))


if __name__ == "__main__":
    main()
