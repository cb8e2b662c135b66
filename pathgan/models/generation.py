"""Drawing images from a generator: the one way the training loop's grids, ``pathgan eval`` and
``pathgan sample`` do it.

Noise row ``i`` of a seeded matrix makes sample ``i`` (:func:`noise_batch`), so the same seed
gives the same samples in any process and any batch size. Images are drawn in eval mode
(BatchNorm running statistics, as the exported generator is meant to be used), without autograd,
in batches; a generator in training mode is put back in it afterwards.
"""

from collections.abc import Iterator

import torch
from torch import nn

CALIBRATION_BATCHES = 4
CALIBRATION_BATCH_SIZE = 32


def noise_batch(count: int, nz: int, seed: int) -> torch.Tensor:
    """Generator inputs that depend only on (seed, row): sample ``i`` is the same everywhere."""
    return torch.randn(count, nz, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def generated_batches(generator: torch.nn.Module, noise: torch.Tensor,
                      batch_size: int) -> Iterator[torch.Tensor]:
    """Float images in [-1, 1] of each ``batch_size`` rows of ``noise`` (moved to the
    generator's device), in eval mode."""
    device = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    try:
        for start in range(0, len(noise), batch_size):  # no batch at all for no noise
            yield generator(noise[start:start + batch_size].to(device)).float()
    finally:
        generator.train(was_training)


def generate(generator: torch.nn.Module, noise: torch.Tensor, batch_size: int) -> torch.Tensor:
    """:func:`generated_batches` in one tensor."""
    return torch.cat(list(generated_batches(generator, noise, batch_size)))


@torch.no_grad()
def calibrate_batchnorm(generator: nn.Module, nz: int, seed: int = 0) -> nn.Module:
    """Recompute the generator's BatchNorm running statistics for its current weights: the exact
    average over a few seeded batches drawn in training mode.

    Running statistics trail the weights (momentum 0.1), and those of an averaged (EMA)
    generator were never computed with its own weights: early in training, eval-mode samples
    were then flat grey while training-mode ones were not. Call it on every rank (it runs
    forward passes, which SyncBatchNorm makes collective) before drawing or exporting samples.
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    was_training = generator.training
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the calibration batches
    generator.train()
    try:
        noise = noise_batch(CALIBRATION_BATCHES * CALIBRATION_BATCH_SIZE, nz, seed)
        for chunk in noise.split(CALIBRATION_BATCH_SIZE):
            generator(chunk.to(next(generator.parameters()).device))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        generator.train(was_training)
    return generator
