"""SWD on Laplacian pyramids (pathgan.evaluation.metrics) against a direct reference written
here."""

import numpy as np
import pytest
import torch

from pathgan.evaluation.metrics import (
    SWD_NEIGHBOURHOOD,
    laplacian_descriptors,
    neighbourhood_centres,
    pyramid_sizes,
    sliced_wasserstein_distance,
)

SIZE = 64  # small images keep the reference loops fast; pyramid 64, 32, 16
PER_IMAGE = 16


def tissue_like(n: int, seed: int) -> torch.Tensor:
    """Smooth random colour fields with fine texture, in [-1, 1]."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 8, 8, generator=generator) * 1.6 - 0.8
    fine = torch.randn(n, 3, SIZE, SIZE, generator=generator) * 0.1
    images = torch.nn.functional.interpolate(coarse, size=SIZE, mode="bilinear") + fine
    return images.clamp(-1, 1)


def swd(real: torch.Tensor, fake: torch.Tensor) -> dict:
    rows = [laplacian_descriptors(x, range(len(x)), PER_IMAGE, seed=3) for x in (real, fake)]
    return sliced_wasserstein_distance(*rows, image_size=SIZE, directions=64, seed=5)


@pytest.fixture(scope="module")
def real():
    return tissue_like(24, seed=0)


def test_levels_go_from_the_image_size_down_to_16_px():
    assert pyramid_sizes(224) == [224, 112, 56, 28]
    assert pyramid_sizes(64) == [64, 32, 16]


def test_identical_sets_are_at_zero(real):
    result = swd(real, real.clone())
    assert result["swd"] == pytest.approx(0.0, abs=1e-9)
    assert list(result["swd_levels"]) == [64, 32, 16]


def test_a_colour_shift_and_a_blur_each_raise_it(real):
    other = tissue_like(24, seed=1)  # same distribution, other samples
    baseline = swd(real, other)["swd"]
    redder = other.clone()
    redder[:, 0] = (redder[:, 0] + 0.3).clamp(-1, 1)
    blurred = torch.nn.functional.avg_pool2d(other, 5, stride=1, padding=2,
                                             count_include_pad=False)
    assert swd(real, redder)["swd"] > 1.5 * baseline
    finest = SIZE
    assert swd(real, blurred)["swd_levels"][finest] > 1.5 * swd(real, other)["swd_levels"][finest]


def test_it_is_seeded_and_deterministic(real):
    other = tissue_like(24, seed=1)
    assert swd(real, other) == swd(real, other)


# -- a direct reference: loops and numpy, following Karras et al.'s published code -----------
KERNEL = np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256.0


def convolve_mirror(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """2-D convolution of one channel with mirrored borders (scipy.ndimage mode='mirror')."""
    padded = np.pad(image, 2, mode="reflect")
    out = np.zeros_like(image)
    for dy in range(5):
        for dx in range(5):
            out += kernel[dy, dx] * padded[dy:dy + image.shape[0], dx:dx + image.shape[1]]
    return out


def reference_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    pyramid = [image.astype(np.float64)]
    for _ in range(1, levels):
        low = np.stack([convolve_mirror(c, KERNEL)[::2, ::2] for c in pyramid[-1]])
        spread = np.zeros_like(pyramid[-1])
        spread[:, ::2, ::2] = low
        up = np.stack([convolve_mirror(c, KERNEL * 4) for c in spread])
        pyramid[-1] = pyramid[-1] - up
        pyramid.append(low)
    return pyramid


def reference_swd(real: torch.Tensor, fake: torch.Tensor, directions: int, seed: int) -> dict:
    sizes = pyramid_sizes(SIZE)
    half = SWD_NEIGHBOURHOOD // 2
    sets = []
    for images in (real, fake):
        per_level = [[] for _ in sizes]
        for index, image in enumerate(images.double().numpy()):
            for level, band in enumerate(reference_pyramid(image, len(sizes))):
                centres = neighbourhood_centres(index, level, band.shape[-1], PER_IMAGE, 3)
                for y, x in centres.tolist():
                    per_level[level].append(band[:, y - half:y + half + 1, x - half:x + half + 1])
        sets.append([np.stack(level) for level in per_level])
    generator = torch.Generator().manual_seed(seed)
    levels = {}
    for size, real_level, fake_level in zip(sizes, *sets, strict=True):
        mean = real_level.mean(axis=(0, 2, 3), keepdims=True)
        std = real_level.std(axis=(0, 2, 3), keepdims=True)
        a = ((real_level - mean) / std).reshape(len(real_level), -1)
        b = ((fake_level - mean) / std).reshape(len(fake_level), -1)
        # the same seeded draws as the implementation: subset order, then the directions
        count = min(len(a), len(b))
        a = a[torch.randperm(len(a), generator=generator)[:count].numpy()]
        b = b[torch.randperm(len(b), generator=generator)[:count].numpy()]
        unit = torch.randn(a.shape[1], directions, generator=generator,
                           dtype=torch.float64).numpy()
        unit /= np.sqrt((unit ** 2).sum(axis=0, keepdims=True))
        distances = [np.abs(np.sort(a @ unit[:, j]) - np.sort(b @ unit[:, j])).mean()
                     for j in range(directions)]
        levels[size] = 1e3 * float(np.mean(distances))
    return {"swd": sum(levels.values()) / len(levels), "swd_levels": levels}


def test_matches_the_direct_reference(real):
    fake = tissue_like(20, seed=2)  # unequal counts: compared on a seeded common subset
    ours = swd(real, fake)
    reference = reference_swd(real, fake, directions=64, seed=5)
    assert ours["swd"] == pytest.approx(reference["swd"], rel=1e-4)
    for size, value in reference["swd_levels"].items():
        assert ours["swd_levels"][size] == pytest.approx(value, rel=1e-4)
