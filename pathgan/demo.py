"""``pathgan demo``: the whole pipeline on the bundled slide, on a CPU, with no key or login.

pack -> embed -> train the DCGAN -> train the Embedding GAN -> evaluate both -> report.
The pack is the bundled slide's labelled patches (epidermis and dermis, ``shards/README.md``) with
a held-out region as the val split; the DCGAN is class-conditional (a grid per class), and
``pathgan utility`` says whether its patches would train a tissue classifier.
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
from pathgan.runs import EvalDir, RunDir, safe_class_folder

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "shards" / "cmu_small_region.svs"
CLASSES = ("dermis", "epidermis")  # the groups of shards/cmu_small_region.xml
RANDOM_ENCODER = "timm:vit_tiny_patch16_224:random"


@dataclass
class DemoSize:
    dcgan_steps: int
    embgan_steps: int
    eval_samples: int
    ngf: int
    utility_seeds: int


SIZES = {
    # The conditional DCGAN's classes look alike at 300 steps and apart from about 450.
    "full": DemoSize(dcgan_steps=450, embgan_steps=300, eval_samples=128, ngf=16,
                     utility_seeds=3),
    "small": DemoSize(dcgan_steps=6, embgan_steps=4, eval_samples=16, ngf=8,
                      utility_seeds=2),  # for tests
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
    evaluation = EvalDir(out_dir / "eval")
    widths = [f"model.ngf={sizes.ngf}", f"model.ndf={sizes.ngf}", "data.num_workers=1"]
    common = ["log.wandb=true", *widths]
    dcgan_config = ["--config", REPO / "configs" / "dcgan-smoke.yaml", f"data.shards={shards}",
                    "model.conditional=true"]
    timings = {
        "pack": run_stage("Pack the bundled slide's epidermis and dermis, one region held out", [
            "shards", "pack", SLIDE, "--out", shards, "--annotations", REPO / "shards",
            "--label-fraction", "0.7", "--labelled-only", "--patch-sizes", "224",
            "--overlap", "0.75", "--region-groups", "1100", "--val-fraction", "0.2",
            "--max-count", "64", "--workers", "2"]),
        "show": run_stage("Show random training patches", [
            "shards", "show", shards, "--out", out_dir / "training-patches.png", "-n", "36"]),
        **{f"show {name}": run_stage(f"Show real {name} patches", [
            "shards", "show", shards, "--label", name, "--out", real_class_grid(out_dir, name),
            "-n", "16"]) for name in CLASSES},
        "embed": run_stage("Embed every patch", [
            "embed", shards, "--encoder", encoder_spec, "--batch-size", "16"]),
        "untrained": run_stage("The untrained generator, exported as a baseline (0 steps)", [
            "train", *dcgan_config, f"run.dir={untrained}", "train.max_steps=0", *widths,
            "log.wandb=false"]),
        "dcgan": run_stage("Conditional DCGAN training (epidermis, dermis)", [
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
        "eval": run_stage("Evaluation: untrained vs trained generators", [
            "eval", untrained, dcgan, embgan, "--real", shards, "-n", sizes.eval_samples,
            "--encoder", encoder_spec, "--out", evaluation.path]),
        "utility": run_stage("Downstream utility: a tissue classifier trained on real, "
                             "synthetic, both", [
            "utility", dcgan, "--real", shards, "--seeds", sizes.utility_seeds,
            "--out", evaluation.path]),
    }
    print_learning(evaluation.read_result(), encoder_spec)
    print("\n== Where to look")
    for label, path in [
        ("training patches grid", out_dir / "training-patches.png"),
        ("DCGAN samples (classes in blocks)", RunDir(dcgan).samples_dir),
        *[(f"DCGAN {name} grid / real {name} patches",
           f"{RunDir(dcgan).samples_dir / safe_class_folder(name)} / "
           f"{real_class_grid(out_dir, name)}") for name in CLASSES],
        ("DCGAN loss plot", RunDir(dcgan).loss_plot),
        ("Embedding GAN samples", RunDir(embgan).samples_dir),
        ("Embedding GAN loss plot", RunDir(embgan).loss_plot),
        ("evaluation report (grids side by side)", evaluation.report_path),
        ("evaluation figures", evaluation.result_path),
        ("downstream utility (table and figure)", evaluation.path / EvalDir.UTILITY_REPORT),
        ("W&B offline runs (wandb sync DIR to upload)", RunDir(runs / "*").wandb_dir),
    ]:
        print(f"  {label:45s} {path}")
    print("  stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return timings


def real_class_grid(out_dir: Path, name: str) -> Path:
    return out_dir / f"training-patches-{safe_class_folder(name)}.png"


def print_learning(result: dict, encoder_spec: str) -> None:
    """What training changed, by SWD on pixels (no model involved), against the untrained
    generator of the same architecture and seed."""
    runs = {run["name"]: run for run in result["runs"]}
    baseline = runs["untrained"]["swd"]
    print(f"\n== Did they learn? SWD on the pixels' Laplacian pyramids (lower is closer to real "
          f"patches; n = {result['n']} generated vs {result['real']['n']} real "
          f"{result['real']['split']} patches)")
    print(f"  untrained generator   SWD {baseline:8.1f}")
    for name, label in (("dcgan", "DCGAN"), ("embgan", "Embedding GAN")):
        swd = runs[name]["swd"]
        print(f"  {label:21s} SWD {swd:8.1f}  ({(swd - baseline) / baseline:+.0%} vs untrained)")
    if encoder_spec == RANDOM_ENCODER:
        print("  The Embedding GAN's encoder here is a RANDOM-INIT ViT, not a pathology encoder: "
              "its embeddings\n  (and FD/KID/precision/recall in its space) say nothing about "
              "tissue. A random embedding alone is\n  matched by one repeated pattern; the "
              "pixel discriminator beside it (the hybrid objective) keeps\n  the samples on "
              "varied tissue colours and texture. Use Path Foundation (README: Path Foundation\n"
              "  access) for real runs.")
