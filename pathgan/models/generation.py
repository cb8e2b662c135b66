"""Drawing images from a generator: the one way the training loop's grids, ``pathgan eval`` and
``pathgan sample`` do it.

Noise row ``i`` of a seeded matrix makes sample ``i`` (:func:`noise_batch`), so the same seed
gives the same samples in any process and any batch size. A conditional generator is also given
each sample's class (``labels``); without them it draws classes in its own mix
(:func:`label_batch`), row ``i``'s class again depending only on (seed, row). Images are drawn
in eval mode (BatchNorm running statistics, as the exported generator is meant to be used),
without autograd, in batches; a generator in training mode is put back in it afterwards.
"""

from collections.abc import Iterator

import torch
from torch import nn

CALIBRATION_BATCHES = 4
CALIBRATION_BATCH_SIZE = 32


def noise_batch(count: int, nz: int, seed: int) -> torch.Tensor:
    """Generator inputs that depend only on (seed, row): sample ``i`` is the same everywhere."""
    return torch.randn(count, nz, generator=torch.Generator().manual_seed(seed))


def is_conditional(generator: nn.Module) -> bool:
    return getattr(generator, "num_classes", None) is not None


def label_batch(count: int, mix: torch.Tensor, seed: int) -> torch.Tensor:
    """``count`` class codes drawn in proportions ``mix``; row ``i``'s depends only on (seed,
    row), like :func:`noise_batch`'s (a uniform draw per row, through the mix's cumulative sum)."""
    draws = torch.rand(count, generator=torch.Generator().manual_seed(seed + 1))
    cumulative = torch.cumsum(mix.detach().cpu().double(), 0)
    return torch.searchsorted(cumulative / cumulative[-1], draws.double(), right=True).clamp_(
        max=len(mix) - 1)


def class_shares(count: int, weights: list[float]) -> list[int]:
    """``count`` split in proportion to ``weights``, rounded so the shares add up (largest
    remainders first, ties to the earlier)."""
    total = sum(weights)
    exact = [count * weight / total for weight in weights]
    floors = [int(share) for share in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (floors[i] - exact[i], i))
    for i in by_remainder[:count - sum(floors)]:
        floors[i] += 1
    return floors


def _labels_for(generator: nn.Module, labels: torch.Tensor | None, count: int,
                seed: int) -> torch.Tensor | None:
    """The class codes a batch of ``count`` is drawn with: None for an unconditional
    generator, ``labels`` when given, else the generator's own mix."""
    if not is_conditional(generator):
        return None
    return labels if labels is not None else label_batch(count, generator.class_mix, seed)


@torch.no_grad()
def generated_batches(generator: torch.nn.Module, noise: torch.Tensor, batch_size: int,
                      labels: torch.Tensor | None = None, seed: int = 0
                      ) -> Iterator[torch.Tensor]:
    """Float images in [-1, 1] of each ``batch_size`` rows of ``noise`` (and of ``labels`` for a
    conditional generator: given, else drawn in its mix with ``seed``), moved to the
    generator's device, in eval mode."""
    device = next(generator.parameters()).device
    labels = _labels_for(generator, labels, len(noise), seed)
    was_training = generator.training
    generator.eval()
    try:
        for start in range(0, len(noise), batch_size):  # no batch at all for no noise
            z = noise[start:start + batch_size].to(device)
            if labels is None:
                yield generator(z).float()
            else:
                yield generator(z, labels[start:start + batch_size].to(device)).float()
    finally:
        generator.train(was_training)


def generate(generator: torch.nn.Module, noise: torch.Tensor, batch_size: int,
             labels: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`generated_batches` in one tensor."""
    return torch.cat(list(generated_batches(generator, noise, batch_size, labels)))


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
        count = CALIBRATION_BATCHES * CALIBRATION_BATCH_SIZE
        noise = noise_batch(count, nz, seed)
        # A conditional generator's statistics are those of its training batches' class mix.
        labels = _labels_for(generator, None, count, seed)
        device = next(generator.parameters()).device
        for start in range(0, count, CALIBRATION_BATCH_SIZE):
            chunk = noise[start:start + CALIBRATION_BATCH_SIZE].to(device)
            if labels is None:
                generator(chunk)
            else:
                generator(chunk, labels[start:start + CALIBRATION_BATCH_SIZE].to(device))
    finally:
        for norm, momentum in zip(norms, momenta, strict=True):
            norm.momentum = momentum
        generator.train(was_training)
    return generator
