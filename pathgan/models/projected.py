"""Projected discriminator heads: small discriminators on several levels of a frozen encoder's
features, each seen through a fixed random projection (after Sauer et al. 2021, "Projected GANs
Converge Faster"; written from the paper).

A frozen encoder (a timm CNN's stages, or a ViT's token maps from several blocks) gives feature
maps ``(N, C_l, S_l, S_l)``, one per level. Each level goes through a random 1x1 convolution
that is never trained (the paper's cross-channel mixing: it spreads the encoder's few dominant
features over all channels, so that a head cannot latch onto one of them), then through its own
small discriminator: [3x3 convolution, leaky ReLU, low-pass downsampling] until the map is at
most 8 px, then a 1x1 convolution to a map of logits whose mean is the level's logit. The seed's
``Linear`` embedding discriminator is the one-level, pooled case.

The module knows nothing of the encoder: it takes the list of feature maps and returns logits
``(N, levels)``, one column per level, so that a loss can treat each level as its own head.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pathgan.models.r3gan import LEAK, Downsample, he_init

SMALLEST_MAP = 8  # a level's discriminator stops downsampling at this size or below
PROJECTION_SEED = 1234  # the projections are a function of the shapes alone: every rank agrees


class RandomProjection(nn.Module):
    """A fixed random 1x1 convolution ``C_in -> C_out`` (a buffer: never trained, never in an
    optimizer), variance-preserving, drawn from a fixed seed."""

    def __init__(self, in_channels: int, out_channels: int, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        weight = torch.randn(out_channels, in_channels, 1, 1, generator=generator)
        self.register_buffer("weight", weight / in_channels ** 0.5)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.conv2d(features, self.weight.to(features.dtype))


class LevelDiscriminator(nn.Module):
    """(N, C, S, S) projected features -> (N,) logits."""

    def __init__(self, channels: int, size: int, width: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = channels
        while size > SMALLEST_MAP:
            layers += [he_init(nn.Conv2d(in_channels, width, 3, padding=1)),
                       nn.LeakyReLU(LEAK), Downsample(width)]
            in_channels, size = width, size // 2
        layers += [he_init(nn.Conv2d(in_channels, width, 3, padding=1)), nn.LeakyReLU(LEAK),
                   he_init(nn.Conv2d(width, 1, 1))]
        self.main = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.main(features).mean(dim=(1, 2, 3))


class ProjectedHeads(nn.Module):
    """One fixed projection and one small discriminator per feature level.

    ``channels`` and ``sizes``: each level's channels and (square) size, as the encoder gives
    them; ``projected``: channels after the projection; ``width``: the discriminators' width.
    """

    def __init__(self, channels: list[int], sizes: list[int], projected: int = 64,
                 width: int = 64) -> None:
        super().__init__()
        if len(channels) != len(sizes) or not channels:
            raise ValueError(f"one size per level: got channels {channels} and sizes {sizes}")
        self.projections = nn.ModuleList(
            RandomProjection(c, projected, PROJECTION_SEED + level)
            for level, c in enumerate(channels))
        self.discriminators = nn.ModuleList(
            LevelDiscriminator(projected, size, width) for size in sizes)

    def project(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """The heads' inputs: what the R1/R2 penalties differentiate against."""
        if len(features) != len(self.projections):
            raise ValueError(f"expected {len(self.projections)} feature levels, "
                             f"got {len(features)}")
        return [projection(level) for projection, level in zip(self.projections, features,
                                                               strict=True)]

    def judge(self, projected: list[torch.Tensor]) -> torch.Tensor:
        """Projected features -> logits (N, levels)."""
        return torch.stack([discriminator(level) for discriminator, level
                            in zip(self.discriminators, projected, strict=True)], dim=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.judge(self.project(features))
