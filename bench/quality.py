"""Sample quality by SWD: the original study's DCGAN recipe vs pathgan's defaults
(``--compare recipes``), or pathgan's three GANs at the same wall-clock (``--compare gans``).

Both train the same networks (pathgan's Generator and Discriminator, 224x224) from the same
seed for the same number of images, on the same patches (the bundled slide, packed as the demo
packs it), then draw ``-n`` samples that are compared with real patches by the sliced
Wasserstein distance on Laplacian pyramids (pixels; no downloaded weights).

- *original*: the reference recipe as the original study ran it (the PyTorch DCGAN tutorial's
  loop): the patches as an ``ImageFolder`` of PNGs with ``Resize(224)``, ``ToTensor()``,
  ``Normalize(0.5, 0.5, 0.5)`` and a shuffling ``DataLoader``; a ``Sigmoid`` on D's output with
  ``BCELoss``; no EMA, no augmentation. Sampled both with BatchNorm running statistics (eval
  mode) and with batch statistics (train mode, as the tutorial's grids are drawn); the better of
  the two is the baseline.
- *pathgan*: ``pathgan.train.loop.train`` with ``configs/dcgan.yaml`` (widths, batch and
  steps set by the flags below, plus any ``--override``), sampling its exported generator.

One JSON object out; ``swd_ratio`` is pathgan's SWD over the original's (lower is better; the
target at demo scale is <= 0.8). Grids of both go to ``--out``::

    .venv/bin/python bench/quality.py                       # demo scale on a CPU, ~10 min
    .venv/bin/python bench/quality.py --ngf 64 --batch-size 128 --steps 5000 -n 1024 \
        --shards shards/camelyon16                          # reference size on a GPU

``--compare gans``: the DCGAN, the hybrid Embedding GAN and the modern GAN (r3gan) through
``pathgan.train.loop.train`` on the same patches for the same wall-clock of training steps (set-up
and export not counted): the DCGAN trains ``--steps`` steps and its time is the budget (or
``--minutes``); each other GAN's step time is measured by a short probe run first and it gets as
many steps as fit (its schedules then span exactly its run). Reported per GAN: SWD and per-level
SWD of ``-n`` samples, the spectral peak (``pathgan eval``'s upsampling-artefact figure) of 64,
with the real patches' as the floor, and ratios to the DCGAN; grids to ``--out``::

    OMP_NUM_THREADS=1 .venv/bin/python bench/quality.py --compare gans     # CPU, ~15 min
    .venv/bin/python bench/quality.py --compare gans --scale reference --minutes 30 -n 1024 \
        --shards shards/camelyon16                          # reference configs on a GPU
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from pathgan.config import load_config
from pathgan.core.images import save_image_grid, signed_to_uint8
from pathgan.evaluation import fake_features, make_state, real_features, select_real, swd_extractor
from pathgan.evaluation.metrics import sliced_wasserstein_distance, upsampling_artefact
from pathgan.models import Discriminator, Generator, noise_batch
from pathgan.runs import RunDir, load_generator
from pathgan.shards.format import shard_paths
from pathgan.shards.pack import PackOptions, pack
from pathgan.shards.reading import ShardSamples, index_shard
from pathgan.train.loop import train

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "shards" / "cmu_small_region.svs"
CONFIGS = REPO / "configs"
RANDOM_ENCODER = "timm:vit_tiny_patch16_224:random"
PROBE_STEPS, PROBE_WINDOW = 12, 4  # a probe logs 3 windows of step times; the first is warm-up
SPECTRUM_SAMPLES = 64


def pack_demo_shards(out: Path) -> Path:
    """The bundled slide packed exactly as ``make demo`` packs it."""
    pack([str(SLIDE)], out, PackOptions(patch_sizes=[224, 512], overlap=0.5, max_count=64,
                                        workers=1))
    return out


def export_image_folder(shards: Path, out: Path) -> Path:
    """The training patches as PNG files in one class folder, as the original study read them."""
    from PIL import Image

    folder = out / "patches"
    folder.mkdir(parents=True)
    samples = ShardSamples([(path, index_shard(path)) for path in shard_paths(shards, "train")])
    for index in range(len(samples)):
        _, image, _ = samples[index]
        if image is not None:
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{index:06d}.png")
    return out


def train_original(args, image_root: Path, device: torch.device) -> Generator:
    """The original recipe: the PyTorch DCGAN tutorial's loop on an ImageFolder."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    torch.manual_seed(args.seed)
    generator = Generator(args.nz, args.ngf).to(device)
    discriminator = nn.Sequential(Discriminator(args.ndf), nn.Sigmoid()).to(device)
    transform = T.Compose([T.Resize(224), T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    loader = torch.utils.data.DataLoader(
        ImageFolder(str(image_root), transform=transform), batch_size=args.batch_size,
        shuffle=True, drop_last=True, num_workers=1,
        generator=torch.Generator().manual_seed(args.seed))
    criterion = nn.BCELoss()
    g_optimizer = torch.optim.Adam(generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    d_optimizer = torch.optim.Adam(discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    step = 0
    while step < args.steps:
        for real, _ in loader:
            real = real.to(device)
            ones = torch.ones(len(real), device=device)
            zeros = torch.zeros(len(real), device=device)
            discriminator.zero_grad()
            criterion(discriminator(real), ones).backward()
            fake = generator(torch.randn(len(real), args.nz, device=device))
            criterion(discriminator(fake.detach()), zeros).backward()
            d_optimizer.step()
            generator.zero_grad()
            criterion(discriminator(fake), ones).backward()
            g_optimizer.step()
            step += 1
            if step == args.steps:
                break
    return generator


def train_pathgan(args, shards: Path, run_dir: Path) -> Generator:
    overrides = [
        f"data.shards={shards}", f"run.dir={run_dir}", f"run.seed={args.seed}",
        f"model.nz={args.nz}", f"model.ngf={args.ngf}", f"model.ndf={args.ndf}",
        f"train.batch_size={args.batch_size}", f"train.max_steps={args.steps}",
        "data.num_workers=1", "log.wandb=false", f"log.sample_every={args.steps}",
        f"ckpt.every={args.steps}", *args.override,
    ]
    train(load_config(REPO / "configs" / "dcgan.yaml", overrides))
    return load_generator(run_dir, "cpu")[0]


def swd_of(generator: Generator, real_rows, args, state, train_mode: bool = False) -> dict:
    generator.train(train_mode)
    if train_mode:  # fake_features switches to eval mode; batch statistics need a wrapper
        generator = _BatchStatistics(generator)
    extractor = swd_extractor(args.n, args.seed)
    fake = fake_features(generator, args.n, [extractor], state, nz=args.nz, seed=args.seed,
                         batch_size=args.batch_size)
    return sliced_wasserstein_distance(real_rows["swd"], fake["swd"], seed=args.seed)


class _BatchStatistics(nn.Module):
    """Runs a generator with BatchNorm batch statistics whatever mode it is put in."""

    def __init__(self, generator: Generator) -> None:
        super().__init__()
        self.inner = generator
        self.nz = generator.nz

    def forward(self, noise):
        self.inner.train()
        with torch.no_grad():
            return self.inner(noise)


def save_grid(generator: nn.Module, path: Path, nz: int, seed: int) -> None:
    with torch.no_grad():
        images = generator(noise_batch(36, nz, seed))
    save_image_grid(signed_to_uint8(images), path, nrow=6)


def gan_recipe(name: str, scale: str) -> tuple[Path, list[str]]:
    """The config and overrides of each GAN: as ``make demo`` trains it (``demo``: 16-channel
    DCGAN networks, the hybrid Embedding GAN on a random ViT-Tiny, the modern GAN's smoke
    config), or the reference configs (the Embedding GAN with its config's encoder, hybrid)."""
    if scale == "demo":
        widths = ["model.ngf=16", "model.ndf=16"]
        return {"dcgan": (CONFIGS / "dcgan-smoke.yaml", widths),
                "embgan": (CONFIGS / "embgan-smoke.yaml",
                           [*widths, f"model.encoder={RANDOM_ENCODER}", "model.hybrid=true",
                            "train.augment=color,translation"]),
                "r3gan": (CONFIGS / "r3gan-smoke.yaml", [])}[name]
    return {"dcgan": (CONFIGS / "dcgan.yaml", []),
            "embgan": (CONFIGS / "embgan.yaml", ["model.hybrid=true",
                                                  "train.augment=color,translation"]),
            "r3gan": (CONFIGS / "r3gan.yaml", [])}[name]


def loop_seconds(run_dir: Path) -> float:
    """Seconds the run's training steps took, from its logged windows' step times (set-up,
    checkpoints between windows and export not counted)."""
    seconds, previous = 0.0, 0
    for row in RunDir(run_dir).read_metrics():
        if "step_time" in row:
            seconds += row["step_time"] * (row["step"] - previous)
            previous = row["step"]
    return seconds


def train_gan(name: str, args, shards: Path, run_dir: Path, steps: int, log_every: int) -> Path:
    config, overrides = gan_recipe(name, args.scale)
    train(load_config(config, [
        *overrides, f"data.shards={shards}", f"run.dir={run_dir}", f"run.seed={args.seed}",
        f"train.max_steps={steps}", f"log.every={log_every}", f"log.sample_every={steps}",
        f"ckpt.every={steps}", "log.wandb=false", "data.num_workers=1", *args.override]))
    return run_dir


def probe_step_seconds(name: str, args, shards: Path, work: Path) -> float:
    """A GAN's seconds a step, from a short run (its first window, warm-up, left out)."""
    run_dir = train_gan(name, args, shards, work / f"probe-{name}", PROBE_STEPS, PROBE_WINDOW)
    times = [row["step_time"] for row in RunDir(run_dir).read_metrics() if "step_time" in row]
    return sum(times[1:]) / len(times[1:])


def judge_generator(run_dir: Path, real_rows, real_spectrum: dict, args, state) -> dict:
    generator = load_generator(run_dir, "cpu")[0]
    swd = swd_of(generator, real_rows, args, state)
    with torch.no_grad():
        images = generator(noise_batch(SPECTRUM_SAMPLES, generator.nz, args.seed))
    artefact = upsampling_artefact(images)
    save_grid(generator, args.out / f"{run_dir.name}.png", generator.nz, args.seed)
    return {**swd, "spectral_peak": artefact["peak"], "spectral_period": artefact["period"],
            "spectral_peak_over_real": artefact["peak"] / real_spectrum["peak"]}


def compare_gans(args, shards: Path, work: Path, real, real_rows, state) -> dict:
    """The three GANs at the DCGAN's wall-clock of training steps (or ``--minutes``)."""
    real_images = torch.stack([real.dataset[i][1] for i in range(min(SPECTRUM_SAMPLES,
                                                                   len(real)))])
    real_spectrum = upsampling_artefact(real_images.float())
    runs: dict[str, dict] = {}
    budget = args.minutes * 60 if args.minutes else None
    if budget is None:  # the DCGAN's own steps set the budget
        dcgan = train_gan("dcgan", args, shards, work / "dcgan", args.steps, 10)
        budget = loop_seconds(dcgan)
        runs["dcgan"] = {"steps": args.steps, "train_seconds": round(budget, 1)}
    for name in ("dcgan", "embgan", "r3gan"):
        if name in runs:
            continue
        per_step = probe_step_seconds(name, args, shards, work)
        steps = max(1, round(budget / per_step))
        run_dir = train_gan(name, args, shards, work / name, steps, 10)
        runs[name] = {"steps": steps, "probe_step_seconds": round(per_step, 3),
                      "train_seconds": round(loop_seconds(run_dir), 1)}
    for name, entry in runs.items():
        entry.update(judge_generator(work / name, real_rows, real_spectrum, args, state))
    dcgan = runs["dcgan"]
    for entry in runs.values():
        entry["swd_ratio_to_dcgan"] = entry["swd"] / dcgan["swd"]
        entry["spectral_peak_ratio_to_dcgan"] = entry["spectral_peak"] / dcgan["spectral_peak"]
    return {"benchmark": "quality-gans", "scale": args.scale, "n": args.n, "n_real": len(real),
            "real_split": real.split, "seed": args.seed, "budget_seconds": round(budget, 1),
            "real_spectral_peak": real_spectrum["peak"],
            "real_spectral_period": real_spectrum["period"], "overrides": args.override,
            "runs": runs, "grids": [str(args.out / f"{name}.png") for name in runs],
            "gpu_command": "bench/quality.py --compare gans --scale reference --minutes 30 "
                           "-n 1024 --shards shards/camelyon16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", choices=("recipes", "gans"), default="recipes",
                        help="the original DCGAN recipe vs pathgan's (default), or the three "
                        "GANs at the same wall-clock")
    parser.add_argument("--scale", choices=("demo", "reference"), default="demo",
                        help="--compare gans: the demo's settings or the reference configs")
    parser.add_argument("--minutes", type=float, help="--compare gans: the budget of training "
                        "steps per GAN (default: the DCGAN's time for --steps)")
    parser.add_argument("--shards", type=Path, help="a shard set (default: the demo's packing "
                        "of the bundled slide)")
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--ndf", type=int, default=16)
    parser.add_argument("--nz", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("-n", type=int, default=128, help="samples compared by SWD")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--override", action="append", default=[], metavar="key=value",
                        help="a pathgan config override (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("bench-quality"),
                        help="where the grids go")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = make_state()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        shards = args.shards or pack_demo_shards(work / "shards")
        real = select_real(shards, args.n, args.seed)
        real_rows = real_features(real, [swd_extractor(args.n, args.seed)], state)
        if args.compare == "gans":
            print(json.dumps(compare_gans(args, shards, work, real, real_rows, state),
                             indent=2))
            return

        started = time.perf_counter()
        original = train_original(args, export_image_folder(shards, work / "folder"), device)
        original_seconds = time.perf_counter() - started
        original = original.cpu()
        original_eval = swd_of(original, real_rows, args, state)
        original_batch = swd_of(original, real_rows, args, state, train_mode=True)
        save_grid(original.eval(), args.out / "original.png", args.nz, args.seed)

        started = time.perf_counter()
        pathgan_generator = train_pathgan(args, shards, work / "run")
        pathgan_seconds = time.perf_counter() - started
        pathgan_swd = swd_of(pathgan_generator, real_rows, args, state)
        save_grid(pathgan_generator.eval(), args.out / "pathgan.png", args.nz, args.seed)

    baseline = min(original_eval["swd"], original_batch["swd"])
    print(json.dumps({
        "benchmark": "quality", "feature_space": "Laplacian-pyramid 7x7 neighbourhoods (pixels)",
        "n": args.n, "n_real": len(real), "real_split": real.split, "ngf": args.ngf,
        "ndf": args.ndf, "batch_size": args.batch_size, "steps": args.steps,
        "images_seen": args.steps * args.batch_size, "seed": args.seed,
        "overrides": args.override, "device": str(device),
        "original": {"swd_eval_mode": original_eval, "swd_batch_statistics": original_batch,
                     "seconds": round(original_seconds, 1)},
        "pathgan": {**pathgan_swd, "seconds": round(pathgan_seconds, 1)},
        "swd_ratio": pathgan_swd["swd"] / baseline,
        "grids": [str(args.out / "original.png"), str(args.out / "pathgan.png")],
    }, indent=2))


if __name__ == "__main__":
    main()
