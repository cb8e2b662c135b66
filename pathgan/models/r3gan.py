"""The modern GAN's networks, after R3GAN (Huang, Gokaslan, Kuleshov, Tompkin 2025, "The GAN is
dead; long live the GAN! A Modern GAN Baseline", arXiv 2501.05441), at 224x224.

Written from the paper; the authors' code has no licence. Both networks are plain ResNets:

- **Residual bottleneck blocks**: 1x1 convolution widening the channels by ``expansion``, a
  grouped 3x3 convolution (``group_width`` channels per group), a 1x1 convolution back; a
  biased leaky ReLU after each of the first two. No normalisation layer anywhere: the
  relativistic loss with R1 and R2 penalties keeps training stable without one.
- **Fix-up initialisation**: each block's last convolution starts at zero, so every block is
  the identity at the start and the network is as deep as it needs to be; the other
  convolutions are He-initialised with their gain scaled down by the number of blocks
  (``blocks ** -1/4`` for three layers a block), so the residual sum's variance stays bounded.
- **Resampling by interpolation with a low-pass filter**, never a learned transposed
  convolution: the generator doubles the size by bilinear interpolation (zero insertion
  followed by the separable [1, 3, 3, 1] binomial filter), the discriminator halves it with
  that filter at stride 2. Transposed convolutions draw a lattice at their stride's periods
  (Odena et al. 2016); these resamplers do not.
- Stage widths double as the size halves, from ``width`` at 224 px up to ``max_width``.
- **Per-pixel noise** (StyleGAN's noise inputs, Karras et al. 2019), added after each upsampling
  from ``noise_from`` px up, one field a stage scaled by a learned strength per channel. Not in
  R3GAN: interpolation and zero-initialised blocks give a generator no source of fine detail
  but slowly learned sharp nonlinearities, and on a short run (the CPU demo) its samples stayed
  blurred blobs whatever the loss settings (SWD of the finest pyramid levels as far from real
  patches as a flat image); noise gives the blocks grain to shape from the first step. The
  noise is a hash of ``z`` and the pixel's position (:func:`pixel_noise`), not a draw from a
  random generator, so that ``G(z)`` is a function of ``z`` alone: the same noise row draws the
  same image in any batch, process or device, as the other generators do.

Generator: ``z`` -> a learned 7x7 basis, one channel per output of a linear map of ``z``
(R3GAN's "generative basis") -> blocks at 7 px -> [1x1 channel change, upsample, noise,
blocks] x 5 -> 1x1 to RGB -> Tanh, so that its output is in [-1, 1] like the other
generators'. Its only input is the noise vector; the conditional one
(:class:`~pathgan.models.conditional.ConditionalR3Generator`) joins a class embedding to ``z``
before the basis, as R3GAN does.
Discriminator: the mirror image, from a 1x1 RGB convolution to blocks and downsampling stages
down to 7 px, then a learned depthwise 7x7 "discriminative basis" and a linear layer to one
**logit** per image.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

BASE_SIZE = 7
RESAMPLING_STAGES = 5  # 7 * 2**5 = 224
LEAK = 0.2
# The gain that keeps a leaky ReLU's output variance equal to its input's (He et al. 2015).
LEAKY_RELU_GAIN = math.sqrt(2.0 / (1.0 + LEAK ** 2))
LAYERS_PER_BLOCK = 3
BINOMIAL_TAPS = (1.0, 3.0, 3.0, 1.0)  # [1, 2, 1] convolved with [1, 1]: R3GAN's filter
# Odd multipliers below 2**31 (lowbias32's first one, then another): a 32-bit value times one
# stays below 2**63, so the hash below never overflows int64.
HASH_MULTIPLIERS = (0x7FEB352D, 0x68E31DA5)
MASK32 = 0xFFFFFFFF


def stage_widths(width: int, max_width: int) -> list[int]:
    """Channels of each stage from 7 px to 224 px: ``width`` at 224 px, doubling each time the
    size halves, never above ``max_width``."""
    return [min(width * 2 ** (RESAMPLING_STAGES - stage), max_width)
            for stage in range(RESAMPLING_STAGES + 1)]


def he_init(layer: nn.Module, gain: float = 1.0) -> nn.Module:
    """Weights ~ N(0, gain^2 / fan_in), bias zero; a gain of 0 gives a zero layer."""
    fan_in = layer.weight[0].numel()
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(fan_in))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def conv(in_channels: int, out_channels: int, kernel: int, groups: int = 1,
         gain: float = 1.0) -> nn.Conv2d:
    """A same-size convolution without bias (the following activation carries the bias)."""
    return he_init(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2,
                             groups=groups, bias=False), gain)


class BiasedLeakyReLU(nn.Module):
    """A per-channel bias then a leaky ReLU: the convolutions themselves have no bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x + self.bias.view(1, -1, 1, 1).to(x.dtype), LEAK)


class ResidualBlock(nn.Module):
    """``x + conv1x1(act(grouped conv3x3(act(conv1x1(x)))))``, the last convolution zero."""

    def __init__(self, channels: int, expansion: int, group_width: int,
                 total_blocks: int) -> None:
        super().__init__()
        wide = channels * expansion
        groups = max(1, wide // group_width)
        if wide % groups:
            raise ValueError(f"{wide} channels do not split into groups of {group_width}")
        # Fix-up: the branch's gain shrinks with depth so that the sum of all residual
        # branches keeps its variance whatever the number of blocks.
        gain = LEAKY_RELU_GAIN * total_blocks ** (-1.0 / (2 * LAYERS_PER_BLOCK - 2))
        self.branch = nn.Sequential(
            conv(channels, wide, 1, gain=gain),
            BiasedLeakyReLU(wide),
            conv(wide, wide, 3, groups=groups, gain=gain),
            BiasedLeakyReLU(wide),
            conv(wide, channels, 1, gain=0.0),  # zero: the block starts as the identity
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


def binomial_kernel(channels: int) -> torch.Tensor:
    """The separable 4x4 [1, 3, 3, 1] low-pass filter, summing to 1, one per channel."""
    taps = torch.tensor(BINOMIAL_TAPS)
    kernel = torch.outer(taps, taps)
    return (kernel / kernel.sum()).expand(channels, 1, 4, 4).contiguous()


class Upsample(nn.Module):
    """Twice the size by bilinear interpolation: zero insertion then the [1, 3, 3, 1] low-pass
    filter, with the border's values repeated. Nothing learned, so no lattice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)


class Downsample(nn.Module):
    """Half the size: the [1, 3, 3, 1] low-pass filter at stride 2, border repeated. A fixed
    depthwise convolution (a buffer, not a parameter), so R1 and R2 can differentiate it twice.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("kernel", binomial_kernel(channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return F.conv2d(padded, self.kernel.to(x.dtype), stride=2, groups=x.shape[1])


def mix32(values: torch.Tensor) -> torch.Tensor:
    """An integer hash (lowbias32-style xor-shift-multiply) of int64 values in [0, 2**32)."""
    for multiplier in HASH_MULTIPLIERS:
        values = values ^ (values >> 16)
        values = (values * multiplier) & MASK32
    return values ^ (values >> 16)


def noise_seeds(z: torch.Tensor) -> torch.Tensor:
    """One 32-bit seed per row of ``z`` (N,), a hash of the bits of every value in the row."""
    bits = z.detach().float().contiguous().view(torch.int32).long() & MASK32
    positions = mix32(torch.arange(1, z.shape[1] + 1, device=z.device))
    return mix32(mix32(bits ^ positions).sum(dim=1) & MASK32)


def pixel_noise(seeds: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """(N, 1, size, size) noise of mean 0 and variance 1, uniform, a function of each row's seed
    and the pixel's position only (a counter-based generator: hash(seed, size, pixel))."""
    pixels = torch.arange(size * size, device=seeds.device) + size * 1_000_003
    uniform = mix32(seeds[:, None] ^ mix32(pixels)[None, :]) >> 8  # 24 bits
    noise = ((uniform.to(torch.float32) + 0.5) / 2 ** 24 - 0.5) * math.sqrt(12.0)
    return noise.to(dtype).view(len(seeds), 1, size, size)


class NoiseInjection(nn.Module):
    """``x + strength * noise``: one noise field per sample (:func:`pixel_noise` of the sample's
    seed), a learned strength per channel."""

    def __init__(self, channels: int, strength: float) -> None:
        super().__init__()
        self.strength = nn.Parameter(torch.full((channels,), strength))

    def forward(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        noise = pixel_noise(seeds, x.shape[-1], x.dtype)
        return x + self.strength.view(1, -1, 1, 1).to(x.dtype) * noise


class GenerativeBasis(nn.Module):
    """``z`` -> (N, C, 7, 7): a learned 7x7 pattern per channel, scaled by a linear map of z."""

    def __init__(self, nz: int, channels: int) -> None:
        super().__init__()
        self.basis = nn.Parameter(torch.randn(channels, BASE_SIZE, BASE_SIZE))
        self.linear = he_init(nn.Linear(nz, channels, bias=False))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.basis.unsqueeze(0) * self.linear(z)[:, :, None, None]


class DiscriminativeBasis(nn.Module):
    """(N, C, 7, 7) -> ``outputs`` values a sample (one logit, or what a conditional
    discriminator projects on its class embedding): a learned depthwise 7x7 filter, then
    linear."""

    def __init__(self, channels: int, outputs: int = 1) -> None:
        super().__init__()
        self.basis = he_init(nn.Conv2d(channels, channels, BASE_SIZE, groups=channels,
                                       bias=False))
        self.linear = he_init(nn.Linear(channels, outputs, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.basis(x).flatten(1))


def _blocks(count: int, channels: int, expansion: int, group_width: int,
            total_blocks: int) -> list[nn.Module]:
    return [ResidualBlock(channels, expansion, group_width, total_blocks) for _ in range(count)]


class R3Generator(nn.Module):
    """``z`` (N, nz) -> images (N, 3, 224, 224) in [-1, 1]."""

    def __init__(self, nz: int = 100, width: int = 16, max_width: int = 256,
                 blocks: int = 1, expansion: int = 2, group_width: int = 8,
                 noise_from: int = 28, noise_strength: float = 0.1,
                 channels: int = 3) -> None:
        super().__init__()
        self.nz = nz
        widths = stage_widths(width, max_width)
        total = blocks * len(widths)
        layers: list[nn.Module] = [GenerativeBasis(nz, widths[0]),
                                   *_blocks(blocks, widths[0], expansion, group_width, total)]
        size = BASE_SIZE
        for before, after in zip(widths[:-1], widths[1:], strict=True):  # 7 -> 14 -> ... -> 224
            size *= 2
            if before != after:
                layers.append(conv(before, after, 1))
            layers.append(Upsample())
            if noise_from and size >= noise_from:
                layers.append(NoiseInjection(after, noise_strength))
            layers += _blocks(blocks, after, expansion, group_width, total)
        layers += [conv(widths[-1], channels, 1), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.view(z.shape[0], self.nz)
        return self.synthesise(z, noise_seeds(z))

    def synthesise(self, basis_input: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """The generative basis's input (``z``, and a class embedding in a conditional
        generator) and the noise seeds -> images."""
        x = basis_input
        for layer in self.main:
            x = layer(x, seeds) if isinstance(layer, NoiseInjection) else layer(x)
        return x


class R3Discriminator(nn.Module):
    """Images (N, 3, 224, 224) -> logits (N,)."""

    def __init__(self, width: int = 16, max_width: int = 256, blocks: int = 1,
                 expansion: int = 2, group_width: int = 8, channels: int = 3) -> None:
        super().__init__()
        widths = stage_widths(width, max_width)[::-1]  # 224 px first
        total = blocks * len(widths)
        layers: list[nn.Module] = [conv(channels, widths[0], 1)]
        for before, after in zip(widths[:-1], widths[1:], strict=True):  # 224 -> 112 -> ... -> 7
            layers += [*_blocks(blocks, before, expansion, group_width, total),
                       Downsample(before)]
            if before != after:
                layers.append(conv(before, after, 1))
        layers += [*_blocks(blocks, widths[-1], expansion, group_width, total),
                   DiscriminativeBasis(widths[-1])]
        self.main = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.main(images).flatten()
