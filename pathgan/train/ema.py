"""An exponential moving average of the generator that is never worse than the raw one.

As stylegan2-ada-pytorch does (``ema_kimg``, ``ema_rampup``): the averaging horizon is a
half-life counted in images, and during warm-up it grows with the images seen
(``min(ema_kimg * 1000, images_seen * ema_rampup)``), so a short run, or the first thousands of
steps of a long one, export a generator close to the trained weights instead of one that is
mostly its random initialisation. BatchNorm running statistics are copied from the raw
generator, not averaged: averaged statistics do not match averaged weights (they made the
exported generator draw flat grey). Before the average draws, is evaluated or is exported, the
loop recomputes its statistics for its own weights (``models.generation.calibrate_batchnorm``).
"""

import copy

import torch
from torch import nn


class GeneratorEMA:
    """``ema.module`` follows a generator; ``update`` after every generator step.

    It has ``state_dict``/``load_state_dict`` (the averaged module's, plain keys), so it is saved
    and restored with the checkpoint (``accelerator.register_for_checkpointing``).
    """

    def __init__(self, generator: nn.Module, half_life_kimg: float,
                 rampup: float | None) -> None:
        self.module = copy.deepcopy(generator).eval().requires_grad_(False)
        self.half_life_kimg = half_life_kimg
        self.rampup = rampup

    def decay(self, images_seen: int, batch_size: int) -> float:
        """The weight of the average at this update: 0 at the first one (a copy of G)."""
        half_life = self.half_life_kimg * 1000.0
        if self.rampup is not None:
            half_life = min(half_life, images_seen * self.rampup)
        return 0.5 ** (batch_size / max(half_life, 1e-8))

    @torch.no_grad()
    def update(self, generator: nn.Module, images_seen: int, batch_size: int,
               skip: torch.Tensor | None = None) -> None:
        """``images_seen``: images the generator had been trained on before this step.
        ``skip``: a device tensor, 1.0 when the generator's update was skipped: the average
        then stays as it was (decided on the device, without a host read)."""
        weight = 1.0 - self.decay(images_seen, batch_size)
        if skip is not None:
            weight = (1.0 - skip) * weight
        averaged = list(self.module.parameters())
        current = [p.detach() for p in generator.parameters()]
        torch._foreach_lerp_(averaged, current, weight)
        for mine, theirs in zip(self.module.buffers(), generator.buffers(), strict=True):
            mine.copy_(theirs if skip is None else torch.where(skip > 0, mine, theirs))

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
