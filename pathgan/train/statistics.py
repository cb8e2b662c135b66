"""Statistics of the training run, measured over a logging window and read across ranks.

What the loop logs besides the losses: means of per-step figures (:class:`WindowStats`) and, for
an embedding discriminator, how far fake embeddings are from real ones (:class:`EmbeddingGap`).
The comparisons of ``pathgan eval`` are :mod:`pathgan.evaluation.metrics`; these are cheaper running
figures, reduced across ranks only when a log line is written.
"""

import time

import torch
from accelerate import Accelerator


class WindowStats:
    """Sums of per-step statistics between two log lines, averaged across ranks when read.

    A statistic is averaged over the steps that reported it: the R1/R2 penalties are measured
    only on the steps that take them (every ``train.penalty_every``-th, on every rank alike)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        # per figure, the steps whose value counts (a device tensor once a step was skipped);
        # some figures come on some steps only (the modern GAN's penalties)
        self.taken: dict[str, torch.Tensor | float] = {}
        self.steps = 0
        self.data_wait = 0.0  # seconds the host waited for real batches
        self.started = time.perf_counter()

    def waited(self, seconds: float) -> None:
        """Time the host spent waiting for a real batch (it queues no work meanwhile)."""
        self.data_wait += seconds

    def add(self, stats: dict[str, torch.Tensor], taken: torch.Tensor | float = 1.0) -> None:
        """One step's figures; ``taken`` 0 (a device tensor: no host read) leaves them out, as
        for a step whose updates were skipped because a loss was not finite."""
        for name, value in stats.items():
            value = value.detach().float()
            if isinstance(taken, torch.Tensor):
                value = torch.where(taken > 0, value, torch.zeros_like(value))
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.taken[name] = self.taken.get(name, 0.0) + taken
        self.steps += 1

    def read(self, accelerator: Accelerator, global_batch: int) -> dict[str, float]:
        """The window's means across ranks (every rank calls it); a new window starts."""
        names = sorted(self.sums)
        # a figure no step of the window took is NaN (0 / 0)
        means = torch.stack([self.sums[n] / torch.as_tensor(
            self.taken[n], dtype=torch.float32, device=self.sums[n].device) for n in names])
        means = accelerator.reduce(means, reduction="mean")
        elapsed = time.perf_counter() - self.started
        values = dict(zip(names, means.tolist(), strict=True))
        values["step_time"] = elapsed / max(self.steps, 1)
        values["data_wait_share"] = self.data_wait / max(elapsed, 1e-9)
        values["images_per_s"] = global_batch * self.steps / max(elapsed, 1e-9)
        if torch.cuda.is_available():
            values["gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.reset()
        return values


class SkippedUpdates:
    """Updates skipped for a non-finite loss, counted on the device and read at log lines.

    The skip flags are all-reduced before use, so every rank counts the same.
    """

    def __init__(self, device: torch.device) -> None:
        self.window = torch.zeros(2, device=device)  # D and G updates skipped since the read
        self.in_a_row = torch.zeros((), device=device)  # steps in a row with a skipped update

    def add(self, d_skipped: torch.Tensor, g_skipped: torch.Tensor) -> None:
        self.window += torch.stack([d_skipped, g_skipped])
        self.in_a_row.add_(1.0).mul_(torch.maximum(d_skipped, g_skipped))

    def read(self) -> dict[str, int]:
        """The counts (one host read); the window starts again."""
        d, g, in_a_row = torch.cat([self.window, self.in_a_row[None]]).tolist()
        self.window.zero_()
        return {"skipped_updates_d": int(d), "skipped_updates_g": int(g),
                "nonfinite_in_a_row": int(in_a_row)}


class EmbeddingGap:
    """How far fake embeddings are from real ones over a logging window (all ranks).

    ``emb_mean_dist``: distance between the mean embeddings; ``emb_cov_dist``: Frobenius
    distance between the covariances, relative to the real covariance's norm. Both fall as the
    generator closes the gap.
    """

    MAX_ROWS = 4096  # per rank and side; bounds memory on long windows

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.real: list[torch.Tensor] = []
        self.fake: list[torch.Tensor] = []
        self.rows = 0

    def add(self, real: torch.Tensor, fake: torch.Tensor) -> None:
        if self.rows < self.MAX_ROWS:
            self.real.append(real.detach().float())
            self.fake.append(fake.detach().float())
            self.rows += len(real)

    def read(self, accelerator: Accelerator) -> dict[str, float]:
        """The gap over the window, all ranks' rows together (every rank calls it); a new
        window starts."""
        real = accelerator.gather(torch.cat(self.real))
        fake = accelerator.gather(torch.cat(self.fake))
        self.reset()
        finite = torch.isfinite(real).all(1) & torch.isfinite(fake).all(1)  # skipped steps'
        real, fake = real[finite], fake[finite]
        real_cov, fake_cov = torch.cov(real.T), torch.cov(fake.T)
        return {
            "emb_mean_dist": float((real.mean(0) - fake.mean(0)).norm()),
            "emb_cov_dist": float((real_cov - fake_cov).norm() / real_cov.norm().clamp_min(1e-12)),
        }
