"""Embedding GAN training speed vs the DCGAN on the same device, and where the time goes.

One step of each GAN (D update + G update, the shared objective, no Accelerate so that only the
networks are timed), at the same batch and generator width. The Embedding GAN runs with a torch
ViT-S/16 (timm, random init) and with a ViT-S/16-sized Keras SavedModel in Path Foundation's
layout through the TensorFlow bridge. The breakdown times the parts of a generator step alone:
generator forward+backward, encoder forward, encoder forward + input gradient. JSON out::

    .venv/bin/python bench/embgan_throughput.py [--batch-size 8] [--ngf 16] [--tf-depth 12]
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pathgan.config import load_config
from pathgan.encoders import load_encoder
from pathgan.training.build import build_gan

REPO = Path(__file__).resolve().parents[1]


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


def gan_step_seconds(config_name: str, overrides: list[str], args, device) -> float:
    config = load_config(REPO / "configs" / config_name, overrides)
    gan = build_gan(config, device)
    generator = gan.generator.to(device)
    discriminators = {k: d.to(device) for k, d in gan.discriminators.items()}
    objective = gan.objective(discriminators)
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=2e-4)
    d_optimizer = torch.optim.Adam([p for d in discriminators.values() for p in d.parameters()],
                                   lr=2e-4)
    real = {"images": torch.rand(args.batch_size, 3, 224, 224, device=device) * 2 - 1}
    if gan.encoder is not None:
        real = {"embeddings": torch.randn(args.batch_size, gan.encoder.embed_dim, device=device)}

    def step():
        fake = objective.fake_features(generator(torch.randn(args.batch_size, config.model.nz,
                                                             device=device)))
        d_loss, _ = objective.d_loss(real, fake)
        d_optimizer.zero_grad()
        d_loss.backward()
        d_optimizer.step()
        g_loss, _ = objective.g_loss(fake)
        g_optimizer.zero_grad()
        g_loss.backward()
        g_optimizer.step()

    return median_seconds(step, args.repeats)


def breakdown(encoder, args, device) -> dict:
    from pathgan.models import Generator

    generator = Generator(ngf=args.ngf).to(device)
    noise = torch.randn(args.batch_size, 100, device=device)
    images = (torch.rand(args.batch_size, 3, 224, 224, device=device) * 2 - 1)

    def generator_forward_backward():
        generator(noise).mean().backward()

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
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    common = [f"model.ngf={args.ngf}", f"model.ndf={args.ngf}"]
    torch_vit = "timm:vit_small_patch16_224:random"

    with tempfile.TemporaryDirectory() as scratch:
        from embed_throughput import build_tf_vit

        tf_dir = Path(scratch) / "path-foundation-vits"
        build_tf_vit(tf_dir, depth=args.tf_depth)
        tf_spec = f"path-foundation:{tf_dir}"
        seconds = {
            "dcgan": gan_step_seconds("dcgan.yaml", common, args, device),
            "embgan_torch_vit_s16": gan_step_seconds(
                "embgan.yaml", [*common, f"model.encoder={torch_vit}"], args, device),
            "embgan_tf_bridge_vit_s16": gan_step_seconds(
                "embgan.yaml", [*common, f"model.encoder={tf_spec}"], args, device),
        }
        parts = {"torch_vit_s16": breakdown(load_encoder(torch_vit, device=device), args, device),
                 "tf_bridge_vit_s16": breakdown(load_encoder(tf_spec, device=device), args,
                                                device)}

    rates = {name: args.batch_size / s for name, s in seconds.items()}
    print(json.dumps({
        "benchmark": "embgan_throughput",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "batch_size": args.batch_size, "ngf": args.ngf,
        "images_per_s": {name: round(rate, 2) for name, rate in rates.items()},
        "relative_to_dcgan": {name: round(rate / rates["dcgan"], 3)
                              for name, rate in rates.items()},
        "breakdown": parts,
        "speedup": round(rates["embgan_torch_vit_s16"] / rates["dcgan"], 3),
    }))


if __name__ == "__main__":
    main()
