"""Rank-0 logging: metrics.jsonl, sample grids, the loss plot, and W&B through Accelerate.

``metrics.jsonl`` has one JSON object per logged step (``{"step": N, ...}``), appended as the run
goes; the run folder reads it back (:meth:`pathgan.runs.RunDir.read_metrics`) for the loss plot,
``pathgan eval`` and the model card.
"""

import json
import math
from pathlib import Path

import torch

from pathgan.core.fileio import atomic_path
from pathgan.core.images import save_image_grid, signed_to_uint8
from pathgan.core.plots import plot_losses
from pathgan.runs import RunDir
from pathgan.train.tracking import first_line


class Logbook:
    """Writes what a run shows; every method is a no-op on ranks other than 0."""

    def __init__(self, accelerator, run: RunDir, use_wandb: bool) -> None:
        self.accelerator = accelerator
        self.run = run
        self.use_wandb = use_wandb

    @property
    def active(self) -> bool:
        return self.accelerator.is_main_process

    def metrics(self, step: int, values: dict) -> None:
        """One JSON line per logged step (appended and flushed), and the same to W&B."""
        if not self.active:
            return
        row = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.run.metrics_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        self._to_wandb(row, step)

    def samples(self, step: int, images: torch.Tensor, label: str | None = None) -> Path | None:
        """A grid of generated images ([-1, 1]) as PNG, and as a W&B image; ``label``: a
        conditional run's grid of that class."""
        if not self.active:
            return None
        path = self.run.sample_grid(step) if label is None else \
            self.run.class_sample_grid(step, label)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image_grid(signed_to_uint8(images).cpu(), path,
                        nrow=max(1, int(math.sqrt(images.shape[0]))))
        if self.use_wandb:
            import wandb  # here: a second to import, and unused with log.wandb false

            key = "samples" if label is None else f"samples/{label}"
            self._to_wandb({key: wandb.Image(str(path))}, step)
        return path

    def _to_wandb(self, values: dict, step: int) -> None:
        """Log to W&B; one that fails (service unreachable, process gone) is reported once and
        left: training goes on, and metrics.jsonl keeps every metric."""
        if not self.use_wandb:
            return
        try:
            self.accelerator.log(values, step=step)
        except Exception as error:
            self.use_wandb = False
            self.accelerator.trackers.clear()  # nor at the end (end_training finishes them)
            print(f"W&B: logging failed at step {step} ({first_line(error)}); training goes on "
                  "without W&B (metrics.jsonl has every metric)", flush=True)

    def loss_plot(self) -> None:
        if self.active:
            plot_losses(self.run.read_metrics(), self.run.loss_plot)

    def truncate_after(self, step: int) -> None:
        """On resume, drop metric lines newer than the checkpoint (they will be redone)."""
        if not self.active or not self.run.metrics_path.is_file():
            return
        kept = [row for row in self.run.read_metrics() if row["step"] <= step]
        with atomic_path(self.run.metrics_path) as temporary:
            temporary.write_text("".join(json.dumps(row) + "\n" for row in kept))


def _plain(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else str(value)
    return value
