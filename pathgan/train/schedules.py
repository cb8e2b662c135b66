"""Hyperparameters that change over a run, as R3GAN schedules them (Huang et al. 2025).

Every schedule is a half cosine from a start value to an end value over the run's length in
images, then constant: the learning rate decays (2e-4 -> 5e-5 in the paper), the R1/R2 weight
gamma decays tenfold and Adam's beta2 rises (0.9 -> 0.99). The paper decays over a fixed 20
million images (its runs are about that long); here the horizon is the run's own length, so a
1,200-image CPU run and a multi-day GPU run both go the whole way from start to end. (The
paper's EMA half-life also grows from 0: the EMA's warm-up, ``train.ema_rampup``, does that.)

The values depend on the images seen alone, so a resumed run continues the same schedule. The
config's keys: ``train.lr`` -> ``train.lr_end``, ``train.gamma`` -> ``train.gamma_end``,
``train.beta2`` -> ``train.beta2_end`` (an end of null: constant).
"""

import math
from dataclasses import dataclass


def cosine_ramp(progress: float, start: float, end: float) -> float:
    """``start`` at progress 0, ``end`` at progress 1 and after, along half a cosine."""
    progress = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """The values of one step, from the images seen before it and the run's total images."""

    total_images: int
    lr: tuple[float, float] = (2e-4, 5e-5)
    gamma: tuple[float, float] = (1.0, 0.1)
    beta2: tuple[float, float] = (0.9, 0.99)

    def at(self, images_seen: int) -> dict[str, float]:
        progress = images_seen / max(self.total_images, 1)
        return {name: cosine_ramp(progress, *getattr(self, name))
                for name in ("lr", "gamma", "beta2")}

    @classmethod
    def of(cls, train, total_steps: int) -> "Schedule":
        """The schedule of a run's ``train`` config section over ``total_steps`` steps."""
        def span(start: float, end: float | None) -> tuple[float, float]:
            return (start, start if end is None else end)

        return cls(total_steps * train.batch_size, lr=span(train.lr, train.lr_end),
                   gamma=span(train.gamma, train.gamma_end),
                   beta2=span(train.beta2, train.beta2_end))
