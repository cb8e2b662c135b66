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
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        for name, value in stats.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
            self.counts[name] = self.counts.get(name, 0) + 1
        self.steps += 1

    def read(self, accelerator: Accelerator, global_batch: int) -> dict[str, float]:
        """The window's means across ranks (every rank calls it); a new window starts."""
        names = sorted(self.sums)
        means = torch.stack([self.sums[n] / self.counts[n] for n in names])
        means = accelerator.reduce(means, reduction="mean")
        elapsed = time.perf_counter() - self.started
        values = dict(zip(names, means.tolist(), strict=True))
        values["step_time"] = elapsed / max(self.steps, 1)
        values["images_per_s"] = global_batch * self.steps / max(elapsed, 1e-9)
        if torch.cuda.is_available():
            values["gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        self.reset()
        return values


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
        real_cov, fake_cov = torch.cov(real.T), torch.cov(fake.T)
        return {
            "emb_mean_dist": float((real.mean(0) - fake.mean(0)).norm()),
            "emb_cov_dist": float((real_cov - fake_cov).norm() / real_cov.norm().clamp_min(1e-12)),
        }
