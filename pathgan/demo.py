"""``pathgan demo``: the whole pipeline on the bundled slide, on a CPU, with no key or login.

pack -> embed -> train the DCGAN -> train the Embedding GAN -> train the modern GAN ->
evaluate the three -> report.
Each stage runs as the command a user would type (printed before it runs), in its own process.
W&B runs are written offline unless the user set ``WANDB_MODE``.
"""

import importlib.util
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub

from pathgan.core.errors import PathganError
from pathgan.runs import EvalDir, RunDir

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "shards" / "cmu_small_region.svs"
#: How the demo packs the bundled slide (the README's packing section gives the same command):
#: two patch sizes, half-overlapping tiles, shards of at most 64 patches (several shards, so that
#: loader workers and ranks each get some).
PACK_OPTIONS = ("--patch-sizes", "224,512", "--overlap", "0.5", "--max-count", "64",
                "--workers", "2")
RANDOM_ENCODER = "timm:vit_tiny_patch16_224:random"


@dataclass
class DemoSize:
    dcgan_steps: int
    embgan_steps: int
    r3gan_steps: int  # the modern GAN's steps cost about twice the DCGAN's (its R1/R2 penalties)
    eval_samples: int
    ngf: int


SIZES = {
    "full": DemoSize(dcgan_steps=300, embgan_steps=300, r3gan_steps=150, eval_samples=128,
                     ngf=16),  # ~9 min
    "small": DemoSize(dcgan_steps=6, embgan_steps=4, r3gan_steps=4, eval_samples=16,
                      ngf=8),  # for tests
}


def path_foundation_available() -> bool:
    """True when Path Foundation is already in the local Hugging Face cache (no network)."""
    try:
        huggingface_hub.snapshot_download("google/path-foundation", local_files_only=True)
    except Exception:
        return False
    return importlib.util.find_spec("tensorflow") is not None  # the optional extra


def choose_encoder(requested: str | None) -> tuple[str, str]:
    if requested:
        return requested, "as requested"
    if path_foundation_available():
        return "path-foundation", "Path Foundation found in the Hugging Face cache"
    return RANDOM_ENCODER, ("a RANDOM-INIT torch ViT: embeddings and metrics only show that the "
                            "pipeline works. For real figures, get Path Foundation access "
                            "(README) and rerun with --encoder path-foundation")


def run_stage(title: str, args: list[str]) -> float:
    """Run ``pathgan ARGS`` in a fresh process, printing the command; returns seconds taken.

    The stage's output (progress bars included) goes straight to the terminal.
    """
    print(f"\n== {title}\n$ pathgan {shlex.join(map(str, args))}", flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pathgan", *map(str, args)])
    if result.returncode != 0:
        raise PathganError(f"demo stage '{title}' failed (exit {result.returncode}); "
                           "its output is above")
    return time.perf_counter() - started


def run_demo(out_dir: str | Path = "demo", size: str = "full",
             encoder: str | None = None) -> dict:
    out_dir = Path(out_dir).resolve()
    sizes = SIZES[size]
    out_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    encoder_spec, why = choose_encoder(encoder)
    print(f"pathgan demo in {out_dir}\nencoder: {encoder_spec} ({why})", flush=True)
    shards, runs = out_dir / "shards", out_dir / "runs"
    untrained, dcgan, embgan = runs / "untrained", runs / "dcgan", runs / "embgan"
    r3gan = runs / "r3gan"
    evaluation = EvalDir(out_dir / "eval")
    widths = [f"model.ngf={sizes.ngf}", f"model.ndf={sizes.ngf}", "data.num_workers=1"]
    common = ["log.wandb=true", *widths]
    dcgan_config = ["--config", REPO / "configs" / "dcgan-smoke.yaml", f"data.shards={shards}"]
    timings = {
        "pack": run_stage("Pack the bundled slide into shards", [
            "shards", "pack", SLIDE, "--out", shards, *PACK_OPTIONS]),
        "show": run_stage("Show random training patches", [
            "shards", "show", shards, "--out", out_dir / "training-patches.png", "-n", "36"]),
        "embed": run_stage("Embed every patch", [
            "embed", shards, "--encoder", encoder_spec, "--batch-size", "16"]),
        "untrained": run_stage("The untrained generator, exported as a baseline (0 steps)", [
            "train", *dcgan_config, f"run.dir={untrained}", "train.max_steps=0", *widths,
            "log.wandb=false"]),
        "dcgan": run_stage("DCGAN training", [
            "train", *dcgan_config, f"run.dir={dcgan}", f"train.max_steps={sizes.dcgan_steps}",
            f"log.sample_every={max(1, sizes.dcgan_steps // 3)}",
            f"ckpt.every={sizes.dcgan_steps}", *common]),
        # With a random encoder the embedding discriminator alone drives the generator to one
        # encoder-fooling pattern (measured: BENCHMARKS.md, "What the demo's settings came
        # from"); the pixel discriminator beside it (the hybrid objective) and DiffAugment keep
        # it on varied tissue texture, given as many steps as the DCGAN (at 200, both are alike).
        "embgan": run_stage("Embedding GAN training (hybrid: + the pixel discriminator)", [
            "train", "--config", REPO / "configs" / "embgan-smoke.yaml", f"data.shards={shards}",
            f"run.dir={embgan}", f"model.encoder={encoder_spec}", "model.hybrid=true",
            "train.augment=color,translation",
            f"train.max_steps={sizes.embgan_steps}",
            f"log.sample_every={max(1, sizes.embgan_steps // 3)}",
            f"ckpt.every={sizes.embgan_steps}", *common]),
        # Its own widths (4 channels at 224 px): at the DCGAN's, a step would take 4 s here.
        "r3gan": run_stage("Modern GAN training (R3GAN-style, relativistic loss with R1/R2)", [
            "train", "--config", REPO / "configs" / "r3gan-smoke.yaml", f"data.shards={shards}",
            f"run.dir={r3gan}", f"train.max_steps={sizes.r3gan_steps}",
            f"log.sample_every={max(1, sizes.r3gan_steps // 3)}",
            f"ckpt.every={sizes.r3gan_steps}", "log.wandb=true", "data.num_workers=1"]),
        "eval": run_stage("Evaluation: untrained vs trained generators", [
            "eval", untrained, dcgan, embgan, r3gan, "--real", shards, "-n", sizes.eval_samples,
            "--encoder", encoder_spec, "--out", evaluation.path]),
    }
    print_learning(evaluation.read_result(), encoder_spec)
    print("\n== Where to look")
    for label, path in [
        ("training patches grid", out_dir / "training-patches.png"),
        ("DCGAN samples", RunDir(dcgan).samples_dir), ("DCGAN loss plot", RunDir(dcgan).loss_plot),
        ("Embedding GAN samples", RunDir(embgan).samples_dir),
        ("Embedding GAN loss plot", RunDir(embgan).loss_plot),
        ("modern GAN samples", RunDir(r3gan).samples_dir),
        ("modern GAN loss plot", RunDir(r3gan).loss_plot),
        ("evaluation report (grids side by side)", evaluation.report_path),
        ("evaluation figures", evaluation.result_path),
        ("W&B offline runs (wandb sync DIR to upload)", RunDir(runs / "*").wandb_dir),
    ]:
        print(f"  {label:45s} {path}")
    print("  stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return timings


def print_learning(result: dict, encoder_spec: str) -> None:
    """What training changed, by SWD on pixels (no model involved), against the untrained
    generator of the DCGAN's architecture and seed; and the upsampling lattice of each, by the
    spectral peak of its samples against the real patches'."""
    runs = {run["name"]: run for run in result["runs"]}
    baseline = runs["untrained"]["swd"]
    print(f"\n== Did they learn? SWD on the pixels' Laplacian pyramids (lower is closer to real "
          f"patches; n = {result['n']} generated vs {result['real']['n']} real "
          f"{result['real']['split']} patches)")
    print(f"  untrained generator   SWD {baseline:8.1f}")
    for name, label in (("dcgan", "DCGAN"), ("embgan", "Embedding GAN"), ("r3gan", "modern GAN")):
        swd = runs[name]["swd"]
        print(f"  {label:21s} SWD {swd:8.1f}  ({(swd - baseline) / baseline:+.0%} vs untrained)"
              f"   spectral peak {runs[name]['spectral_peak']:7.1f} at "
              f"{runs[name]['spectral_period']} px")
    print(f"  (real patches' spectral peak: {result['real']['spectral_peak']:.1f}; a dot lattice "
          "from transposed convolutions is hundreds)")
    if encoder_spec == RANDOM_ENCODER:
        print("  The Embedding GAN's encoder here is a RANDOM-INIT ViT, not a pathology encoder: "
              "its embeddings\n  (and FD/KID/precision/recall in its space) say nothing about "
              "tissue. A random embedding alone is\n  matched by one repeated pattern; the "
              "pixel discriminator beside it (the hybrid objective) keeps\n  the samples on "
              "varied tissue colours and texture. Use Path Foundation (README: Path Foundation\n"
              "  access) for real runs.")
