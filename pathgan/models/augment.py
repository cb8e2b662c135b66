"""Differentiable augmentation (DiffAugment, Zhao et al. 2020) of discriminator inputs.

The same random policy is applied to real and fake images before every discriminator (and
before the frozen encoder of the Embedding GAN), and it is differentiable, so the generator
learns through it. A discriminator then cannot memorise a small data set, and a generator
cannot win by drawing patterns that only fool one fixed view of the encoder.

Policies, on images in [-1, 1] (N, 3, H, W), each with fresh random parameters per image:

- ``color``: brightness (+ U(-0.5, 0.5)), saturation (x U(0, 2) around the pixel's grey),
  contrast (x U(0.5, 1.5) around the image mean);
- ``translation``: a shift of up to 1/8 of the size in x and y, the border filled with 0;
- ``cutout``: a square of half the size set to 0 at a random place.
"""

import torch

POLICIES = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5


def parse_policy(text: str) -> tuple[str, ...]:
    """``"color,translation"`` -> ``("color", "translation")``; ``""`` -> no augmentation."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in POLICIES]
    if unknown:
        raise ValueError(f"unknown augmentation {unknown[0]!r} (use {', '.join(POLICIES)})")
    return names


def _uniform(images: torch.Tensor) -> torch.Tensor:
    """One U(0, 1) value per image, shaped to broadcast over (C, H, W)."""
    return torch.rand(images.shape[0], 1, 1, 1, dtype=images.dtype, device=images.device)


def color(images: torch.Tensor) -> torch.Tensor:
    images = images + (_uniform(images) - 0.5)
    grey = images.mean(dim=1, keepdim=True)
    images = (images - grey) * (_uniform(images) * 2.0) + grey
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    return (images - mean) * (_uniform(images) + 0.5) + mean


def translation(images: torch.Tensor) -> torch.Tensor:
    n, _, height, width = images.shape
    shift_y, shift_x = int(height * TRANSLATION_RATIO + 0.5), int(width * TRANSLATION_RATIO + 0.5)
    device = images.device
    dy = torch.randint(-shift_y, shift_y + 1, (n, 1, 1), device=device)
    dx = torch.randint(-shift_x, shift_x + 1, (n, 1, 1), device=device)
    rows = torch.arange(height, device=device).view(1, height, 1) + dy + 1
    cols = torch.arange(width, device=device).view(1, 1, width) + dx + 1
    # a 1-pixel zero border: every index that falls outside the image reads it
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    rows = rows.clamp(0, height + 1).expand(n, height, width)
    cols = cols.clamp(0, width + 1).expand(n, height, width)
    batch = torch.arange(n, device=device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def cutout(images: torch.Tensor) -> torch.Tensor:
    n, _, height, width = images.shape
    size_y, size_x = int(height * CUTOUT_RATIO + 0.5), int(width * CUTOUT_RATIO + 0.5)
    device = images.device
    top = torch.randint(0, height + (1 - size_y % 2), (n, 1, 1), device=device) - size_y // 2
    left = torch.randint(0, width + (1 - size_x % 2), (n, 1, 1), device=device) - size_x // 2
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    hole = (rows >= top) & (rows < top + size_y) & (cols >= left) & (cols < left + size_x)
    return images * (~hole).unsqueeze(1).to(images.dtype)


_FUNCTIONS = {"color": color, "translation": translation, "cutout": cutout}


class DiffAugment:
    """``augment(images)`` applies the policy's transforms in order; an empty policy is the
    identity."""

    def __init__(self, policy: str | tuple[str, ...]) -> None:
        self.policy = parse_policy(policy) if isinstance(policy, str) else tuple(policy)

    def __bool__(self) -> bool:
        return bool(self.policy)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        for name in self.policy:
            images = _FUNCTIONS[name](images)
        return images


def flip_rotate(images: torch.Tensor) -> torch.Tensor:
    """Each square image (N, C, H, H) turned into one of the 8 symmetries of the square at
    random: transposed or not, then flipped up-down and left-right or not (every turn by a
    multiple of 90 degrees and every mirror image). Drawn on the images' device, no host read.

    Not DiffAugment: it changes only real patches, as they come (``data.flip_rotate``), since
    tissue has no up or left; StyleGAN2-ADA's ``--mirror`` is the precedent.
    """
    n = images.shape[0]
    bits = torch.randint(0, 2, (3, n, 1, 1, 1), device=images.device, dtype=torch.bool)
    images = torch.where(bits[0], images.transpose(2, 3), images)
    images = torch.where(bits[1], images.flip(2), images)
    return torch.where(bits[2], images.flip(3), images)
