"""The EMA generator's warm-up and DiffAugment (pathgan.train.ema, .augment)."""

import pytest
import torch

from pathgan.models import Generator
from pathgan.models.augment import DiffAugment, cutout, parse_policy, translation
from pathgan.train.ema import GeneratorEMA


def trained_copy(generator: Generator, seed: int) -> Generator:
    """The same network with other weights and BatchNorm statistics, as after some steps."""
    other = Generator(nz=8, ngf=4)
    other.load_state_dict(generator.state_dict())
    with torch.no_grad():
        for tensor in [*other.parameters(), *other.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(
                    seed)) * 0.1)
    return other


def test_first_update_copies_the_generator_and_the_horizon_ramps_up():
    start = Generator(nz=8, ngf=4)
    ema = GeneratorEMA(start, half_life_kimg=10.0, rampup=0.05)
    assert ema.decay(0, 8) == 0.0  # nothing seen yet: the average is the generator itself
    trained = trained_copy(start, seed=1)
    ema.update(trained, images_seen=0, batch_size=8)
    for mine, theirs in zip(ema.module.state_dict().values(), trained.state_dict().values(),
                            strict=True):
        assert torch.equal(mine, theirs)
    # warm-up: half-life = min(10 kimg, 5% of the images seen)
    assert ema.decay(8000, 8) == pytest.approx(0.5 ** (8 / 400))
    assert ema.decay(10 ** 7, 8) == pytest.approx(0.5 ** (8 / 10000))
    assert GeneratorEMA(start, 10.0, None).decay(0, 8) == pytest.approx(0.5 ** (8 / 10000))


def test_parameters_are_averaged_and_batchnorm_statistics_copied():
    start = Generator(nz=8, ngf=4)
    ema = GeneratorEMA(start, half_life_kimg=1.0, rampup=None)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    trained = trained_copy(start, seed=2)
    ema.update(trained, images_seen=10 ** 6, batch_size=500)  # decay 0.5 ** 0.5
    decay = 0.5 ** 0.5
    state, raw = ema.module.state_dict(), trained.state_dict()
    weight = "main.0.weight"
    assert torch.allclose(state[weight], decay * before[weight] + (1 - decay) * raw[weight],
                          atol=1e-6)
    for name in ("main.1.running_mean", "main.1.running_var", "main.1.num_batches_tracked"):
        assert torch.equal(state[name], raw[name])  # copied, never averaged
    restored = GeneratorEMA(start, 1.0, None)
    restored.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.module.state_dict().values(),
                                                 state.values(), strict=True))


def images(n: int = 4, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8


def test_policy_parsing():
    assert parse_policy("") == ()
    assert parse_policy("color, cutout") == ("color", "cutout")
    with pytest.raises(ValueError, match="unknown augmentation 'flip'"):
        parse_policy("color,flip")
    x = images()
    assert torch.equal(DiffAugment("")(x), x) and not DiffAugment("")


def test_augmentations_are_differentiable_and_random_per_image():
    torch.manual_seed(0)
    x = images().requires_grad_(True)
    out = DiffAugment("color,translation,cutout")(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.manual_seed(1)
    same = images(8).repeat(1, 1, 1, 1)
    same[:] = same[0]
    changed = DiffAugment("color")(same)
    assert not torch.allclose(changed[0], changed[1])  # fresh parameters for every image


def shifted_by(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[y, x] = image[y + dy, x + dx]``, 0 where that falls outside the image."""
    out = torch.zeros_like(image)
    size = image.shape[-1]
    for y in range(size):
        for x in range(size):
            if 0 <= y + dy < size and 0 <= x + dx < size:
                out[:, y, x] = image[:, y + dy, x + dx]
    return out


def test_translation_shifts_content_and_fills_with_zero():
    torch.manual_seed(3)
    x = images(6, size=16)
    shifts = []
    for original, moved in zip(x, translation(x), strict=True):
        # up to 1/8 of 16 = 2 pixels each way
        found = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(moved, shifted_by(original, dy, dx))]
        assert len(found) == 1
        shifts.append(found[0])
    assert len(set(shifts)) > 1  # a shift of its own for each image


def test_cutout_zeroes_one_square_of_half_the_size_at_most():
    torch.manual_seed(4)
    x = images(32) + 2.0  # no zero pixels before
    holes = (cutout(x) == 0).all(dim=1)
    for hole in holes:
        rows, cols = hole.any(dim=1).nonzero(), hole.any(dim=0).nonzero()
        height, width = len(rows), len(cols)
        assert 0 < height <= 16 and 0 < width <= 16
        assert hole.sum() == height * width  # one rectangle (clipped at the border)
