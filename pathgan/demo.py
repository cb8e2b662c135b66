"""``pathgan demo``: the whole pipeline on the bundled slide, on a CPU, with no key or login.

pack (the slide's epidermis and dermis, one region held out) -> embed -> train the DCGAN, the
Embedding GAN and the class-conditional modern GAN -> evaluate the three -> downstream utility
of the conditional one's patches -> report.
Each stage runs as the command a user would type (printed before it runs), in its own process.
The three trainings run side by side in two lanes of one thread each where the machine has the
cores for it (:func:`run_side_by_side`): on 2 cores, one thread a process does about 1.5 times
the work of two threads in one (small convolutions scale badly across threads), so the lanes
finish sooner than the same runs one after another.
W&B runs are written offline unless the user set ``WANDB_MODE``.
"""

import importlib.util
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub

from pathgan.core.errors import PathganError
from pathgan.runs import EvalDir, RunDir, safe_class_folder

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "shards" / "cmu_small_region.svs"
#: How the demo packs the bundled slide (the README's packing section gives the same command):
#: the patches inside its epidermis and dermis polygons (``shards/cmu_small_region.xml``; at
#: least 70 % of a patch in one), 224 px tiles overlapping by three quarters, the slide cut into
#: 1100 px square regions of which one is the val split (held out from every generator and
#: classifier), shards of at most 64 patches (several shards, so that loader workers and ranks
#: each get some).
PACK_OPTIONS = ("--annotations", REPO / "shards", "--label-fraction", "0.7", "--labelled-only",
                "--patch-sizes", "224", "--overlap", "0.75", "--region-groups", "1100",
                "--val-fraction", "0.2", "--max-count", "64", "--workers", "2")
CLASSES = ("dermis", "epidermis")  # the groups of shards/cmu_small_region.xml
RANDOM_ENCODER = "timm:vit_tiny_patch16_224:random"


@dataclass
class DemoSize:
    dcgan_steps: int
    embgan_steps: int
    r3gan_steps: int  # the modern GAN's steps cost about twice the DCGAN's (R1/R2, noise)
    eval_samples: int
    ngf: int
    utility_seeds: int


SIZES = {
    # The modern GAN's 225 steps fill its lane while the Embedding GAN's 300 run (at 150 its
    # classes were the right colours but confetti: BENCHMARKS.md, "The demo's time and figures").
    "full": DemoSize(dcgan_steps=300, embgan_steps=300, r3gan_steps=225, eval_samples=128,
                     ngf=16, utility_seeds=3),
    "small": DemoSize(dcgan_steps=6, embgan_steps=4, r3gan_steps=4, eval_samples=16,
                      ngf=8, utility_seeds=2),  # for tests
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


@dataclass
class Stage:
    name: str
    title: str
    args: list
    run_dir: Path | None = None  # a training stage's run folder: its progress is read from it
    steps: int = 0
    log: Path | None = field(default=None, repr=False)  # where its output went, side by side

    @property
    def command(self) -> str:
        return f"pathgan {shlex.join(map(str, self.args))}"

    def run(self, env: dict | None = None) -> float:
        """Run ``pathgan ARGS`` in a fresh process; returns the seconds taken. Its output goes to
        the terminal, or to ``log`` when set."""
        started = time.perf_counter()
        command = [sys.executable, "-m", "pathgan", *map(str, self.args)]
        if self.log is None:
            result = subprocess.run(command, env=env)
        else:
            with open(self.log, "w") as log:
                result = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            where = f"its output is in {self.log}" if self.log else "its output is above"
            raise PathganError(f"demo stage '{self.title}' failed (exit {result.returncode}); "
                               f"{where}")
        return time.perf_counter() - started


def run_stage(stage: Stage) -> float:
    """Run one stage in the foreground, printing its command first."""
    print(f"\n== {stage.title}\n$ {stage.command}", flush=True)
    return stage.run()


def lane_environment(lanes: int) -> dict:
    """The environment of a lane's processes: this machine's cores shared out between the
    lanes, one thread each on 2 cores (PyTorch sizes its thread pool from
    ``OMP_NUM_THREADS``)."""
    threads = max(1, (os.cpu_count() or 1) // lanes)
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_side_by_side(lanes: list[list[Stage]], logs: Path, every: float = 20.0) -> dict:
    """Run the lanes at once, each lane's stages one after another, their output to
    ``logs/<stage>.log``; print each training's step every ``every`` seconds. With one core,
    or one lane, the stages simply run one after another in the foreground. Returns each
    stage's seconds; a failed stage stops its lane, and raises once the others are done."""
    if len(lanes) == 1 or (os.cpu_count() or 1) < len(lanes):
        return {stage.name: run_stage(stage) for lane in lanes for stage in lane}
    logs.mkdir(parents=True, exist_ok=True)
    print(f"\n== Side by side, {len(lanes)} lanes (output in {logs}/)", flush=True)
    env = lane_environment(len(lanes))
    timings, failures = {}, []

    def run_lane(lane: list[Stage]) -> None:
        try:
            for stage in lane:
                timings[stage.name] = stage.run(env)
        except PathganError as error:
            failures.append(error)

    for number, lane in enumerate(lanes, start=1):
        for stage in lane:
            stage.log = logs / f"{stage.name}.log"
            print(f"  lane {number}: {stage.title}\n    $ {stage.command}", flush=True)
    threads = [threading.Thread(target=run_lane, args=(lane,)) for lane in lanes]
    for thread in threads:
        thread.start()
    while True:
        deadline = time.monotonic() + every
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        if not any(thread.is_alive() for thread in threads):
            break
        print("  " + " · ".join(progress(stage, timings) for lane in lanes for stage in lane
                                 if stage.run_dir), flush=True)
    if failures:
        raise failures[0]
    return timings


def progress(stage: Stage, timings: dict) -> str:
    """``name step/steps`` of a training stage, ``name done`` once it has finished."""
    if stage.name in timings:
        return f"{stage.name} done ({timings[stage.name]:.0f} s)"
    return f"{stage.name} {RunDir(stage.run_dir).last_logged_step() or 0}/{stage.steps}"


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
    timings = {"pack": run_stage(Stage(
        "pack", "Pack the bundled slide's epidermis and dermis, one region held out",
        ["shards", "pack", SLIDE, "--out", shards, *PACK_OPTIONS]))}
    trainings = training_stages(sizes, shards, encoder_spec, dcgan, embgan, r3gan)
    # The Embedding GAN encodes its real patches in the loop (DiffAugment), so it needs no
    # precomputed embeddings: it starts at once, and its steps, the longest chain, cost about
    # what everything else before the evaluation costs together.
    lanes = [[trainings["embgan"]], [
        Stage("show", "Random training patches", [
            "shards", "show", shards, "--out", out_dir / "training-patches.png", "-n", "36"]),
        *[Stage(f"show-{name}", f"Real {name} patches", [
            "shards", "show", shards, "--label", name, "--out", real_class_grid(out_dir, name),
            "-n", "16"]) for name in CLASSES],
        Stage("embed", "Embed every patch (the evaluation's real features)",
              ["embed", shards, "--encoder", encoder_spec, "--batch-size", "16"]),
        Stage("untrained", "The untrained generator, exported as a baseline", [
            "train", *dcgan_config(shards, sizes), f"run.dir={untrained}", "train.max_steps=0",
            "log.wandb=false"]),
        trainings["dcgan"], trainings["r3gan"],
        Stage("utility", "Downstream utility of the modern GAN's patches: a tissue classifier "
              "trained on real, synthetic, both; tested on the held-out region", [
                  "utility", r3gan, "--real", shards, "--seeds", sizes.utility_seeds,
                  "--out", evaluation.path]),
    ]]
    timings |= run_side_by_side(lanes, out_dir / "logs")
    timings["eval"] = run_stage(Stage(
        "eval", "Evaluation: untrained vs trained generators, against the held-out region", [
            "eval", untrained, dcgan, embgan, r3gan, "--real", shards, "-n", sizes.eval_samples,
            "--encoder", encoder_spec, "--out", evaluation.path]))
    print_learning(evaluation.read_result(), encoder_spec)
    print_utility(evaluation.path / EvalDir.UTILITY_REPORT)
    print("\n== Where to look")
    for label, path in [
        ("training patches grid", out_dir / "training-patches.png"),
        ("DCGAN samples", RunDir(dcgan).samples_dir), ("DCGAN loss plot", RunDir(dcgan).loss_plot),
        ("Embedding GAN samples", RunDir(embgan).samples_dir),
        ("Embedding GAN loss plot", RunDir(embgan).loss_plot),
        ("modern GAN samples (classes in blocks)", RunDir(r3gan).samples_dir),
        *[(f"modern GAN {name} / real {name}",
           f"{RunDir(r3gan).samples_dir / safe_class_folder(name)}/ "
           f"{real_class_grid(out_dir, name)}") for name in CLASSES],
        ("modern GAN loss plot", RunDir(r3gan).loss_plot),
        ("evaluation report (grids side by side)", evaluation.report_path),
        ("evaluation figures", evaluation.result_path),
        ("downstream utility (table and figure)", evaluation.path / EvalDir.UTILITY_REPORT),
        ("W&B offline runs (wandb sync DIR to upload)", RunDir(runs / "*").wandb_dir),
    ]:
        print(f"  {label:45s} {path}")
    print("  stage times: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return timings


def dcgan_config(shards: Path, sizes: DemoSize) -> list:
    return ["--config", REPO / "configs" / "dcgan-smoke.yaml", f"data.shards={shards}",
            f"model.ngf={sizes.ngf}", f"model.ndf={sizes.ngf}", "data.num_workers=1"]


def training_stages(sizes: DemoSize, shards: Path, encoder_spec: str, dcgan: Path,
                    embgan: Path, r3gan: Path) -> dict[str, Stage]:
    def schedule(steps: int) -> list[str]:
        return [f"train.max_steps={steps}", f"log.sample_every={max(1, steps // 3)}",
                f"ckpt.every={steps}", "log.wandb=true"]

    return {
        "dcgan": Stage("dcgan", "DCGAN training", [
            "train", *dcgan_config(shards, sizes), f"run.dir={dcgan}",
            *schedule(sizes.dcgan_steps)], dcgan, sizes.dcgan_steps),
        # With a random encoder the embedding discriminator alone drives the generator to one
        # encoder-fooling pattern (measured: BENCHMARKS.md, "What the demo's settings came
        # from"); the pixel discriminator beside it (the hybrid objective) and DiffAugment keep
        # it on varied tissue texture, given as many steps as the DCGAN (at 200, both are alike).
        "embgan": Stage("embgan", "Embedding GAN training (hybrid: + the pixel discriminator)", [
            "train", "--config", REPO / "configs" / "embgan-smoke.yaml", f"data.shards={shards}",
            f"run.dir={embgan}", f"model.encoder={encoder_spec}", "model.hybrid=true",
            "train.augment=color,translation", f"model.ngf={sizes.ngf}",
            f"model.ndf={sizes.ngf}", "data.num_workers=1", *schedule(sizes.embgan_steps)],
            embgan, sizes.embgan_steps),
        # Its own widths (4 channels at 224 px): at the DCGAN's, a step would take 4 s here.
        # Conditional: a grid per class, and patches with labels for the utility stage.
        "r3gan": Stage("r3gan", "Modern GAN training (R3GAN-style, class-conditional)", [
            "train", "--config", REPO / "configs" / "r3gan-smoke.yaml", f"data.shards={shards}",
            f"run.dir={r3gan}", "model.conditional=true", "data.num_workers=1",
            *schedule(sizes.r3gan_steps)], r3gan, sizes.r3gan_steps),
    }


def real_class_grid(out_dir: Path, name: str) -> Path:
    return out_dir / f"training-patches-{safe_class_folder(name)}.png"


def print_utility(report: Path) -> None:
    """The utility table of ``pathgan utility``'s report and what it says of it."""
    print(f"\n== Would the modern GAN's patches train a tissue classifier? (tested on the "
          f"held-out region; {report})")
    lines = report.read_text().splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("| trained on"))
    for line in lines[table:]:
        if line and not line.startswith("!["):
            print(f"  {line}")


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
