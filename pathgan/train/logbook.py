"""Rank-0 logging: metrics.jsonl, sample grids, the loss plot, and W&B through Accelerate.

``metrics.jsonl`` has one JSON object per logged step (``{"step": N, ...}``), appended as the run
goes; :func:`read_metrics` reads it back, for the loss plot, ``pathgan eval`` and the model card.
"""

import json
import math
from pathlib import Path

import torch

from pathgan.core.fileio import atomic_path
from pathgan.core.images import save_image_grid, signed_to_uint8
from pathgan.core.plots import plot_losses

METRICS = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a line torn by a kill mid-append is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


class Logbook:
    """Writes what a run shows; every method is a no-op on ranks other than 0."""

    def __init__(self, accelerator, run_dir: Path, use_wandb: bool) -> None:
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.use_wandb = use_wandb
        self.metrics_path = run_dir / METRICS
        self.samples_dir = run_dir / "samples"

    @property
    def active(self) -> bool:
        return self.accelerator.is_main_process

    def metrics(self, step: int, values: dict) -> None:
        """One JSON line per logged step (appended and flushed), and the same to W&B."""
        if not self.active:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        self.accelerator.log(row, step=step)

    def samples(self, step: int, images: torch.Tensor) -> Path | None:
        """A grid of generated images ([-1, 1]) as PNG, and as a W&B image."""
        if not self.active:
            return None
        path = self.samples_dir / f"step_{step:06d}.png"
        save_image_grid(signed_to_uint8(images).cpu(), path,
                        nrow=max(1, int(math.sqrt(images.shape[0]))))
        if self.use_wandb:
            import wandb

            self.accelerator.log({"samples": wandb.Image(str(path))}, step=step)
        return path

    def loss_plot(self) -> None:
        if self.active:
            plot_losses(read_metrics(self.metrics_path), self.run_dir / "loss.png")

    def truncate_after(self, step: int) -> None:
        """On resume, drop metric lines newer than the checkpoint (they will be redone)."""
        if not self.active or not self.metrics_path.is_file():
            return
        kept = [row for row in read_metrics(self.metrics_path) if row["step"] <= step]
        with atomic_path(self.metrics_path) as temporary:
            temporary.write_text("".join(json.dumps(row) + "\n" for row in kept))


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else str(value)
    return value
