"""The modern GAN's pieces on their own: networks (pathgan.models.r3gan), the relativistic loss
with R1/R2 (pathgan.train.objective) and the schedules (pathgan.train.schedules)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pathgan.models.r3gan import (
    Downsample,
    R3Discriminator,
    R3Generator,
    ResidualBlock,
    Upsample,
    binomial_kernel,
    noise_seeds,
    pixel_noise,
    stage_widths,
)
from pathgan.train.objective import discriminator_loss, gradient_penalty, relativistic_loss
from pathgan.train.schedules import Schedule, cosine_ramp

TINY = {"width": 2, "max_width": 8, "blocks": 1, "expansion": 2, "group_width": 2}


def tiny_networks(seed: int = 0) -> tuple[R3Generator, R3Discriminator]:
    torch.manual_seed(seed)
    return R3Generator(nz=8, **TINY), R3Discriminator(**TINY)


def test_generator_draws_224px_images_in_tanh_range_and_the_discriminator_one_logit_each():
    generator, discriminator = tiny_networks()
    images = generator(torch.randn(3, 8))
    assert images.shape == (3, 3, 224, 224)
    assert images.abs().max() <= 1.0 and images.std() > 0.01
    assert discriminator(images).shape == (3,)
    # widths double as the size halves, capped: 224 px first in the discriminator
    assert stage_widths(2, 8) == [8, 8, 8, 8, 4, 2]


def test_every_block_starts_as_the_identity():
    generator, discriminator = tiny_networks()
    blocks = [m for net in (generator, discriminator) for m in net.modules()
              if isinstance(m, ResidualBlock)]
    assert len(blocks) == 12  # one per stage, six stages each
    for block in blocks:
        x = torch.randn(2, block.branch[0].in_channels, 7, 7)
        assert torch.equal(block(x), x)
        assert not torch.equal(block.branch[0].weight, torch.zeros_like(block.branch[0].weight))


def test_blocks_use_grouped_convolutions_and_nothing_is_a_transposed_convolution():
    generator = R3Generator(nz=8, width=8, max_width=64, group_width=8)
    discriminator = R3Discriminator(width=8, max_width=64, group_width=8)
    for network in (generator, discriminator):
        kinds = {type(m) for m in network.modules()}
        assert not kinds & {nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d}
        assert not any(issubclass(k, nn.modules.batchnorm._NormBase) for k in kinds)
        grouped = [m.branch[2] for m in network.modules() if isinstance(m, ResidualBlock)]
        assert all(conv.kernel_size == (3, 3) and conv.in_channels // conv.groups == 8
                   for conv in grouped)


def test_a_sample_is_a_function_of_its_noise_row_alone():
    generator, _ = tiny_networks()
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    together = generator(z)
    assert torch.equal(generator(z[2:]), together[2:])  # another batch, the same images
    assert torch.equal(generator(z.flip(0)), together.flip(0))
    assert not torch.equal(together[0], together[1])


def test_pixel_noise_has_unit_variance_and_differs_between_samples_and_sizes():
    seeds = noise_seeds(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))
    assert seeds.dtype == torch.int64 and len(set(seeds.tolist())) == 3
    noise = pixel_noise(seeds, 224, torch.float32)
    assert noise.shape == (3, 1, 224, 224)
    assert abs(noise.mean().item()) < 0.01 and abs(noise.var().item() - 1.0) < 0.01
    assert abs(torch.corrcoef(noise.flatten(1))[0, 1].item()) < 0.01  # samples independent
    coarse = pixel_noise(seeds, 112, torch.float32)
    assert abs(torch.corrcoef(torch.stack([noise[0, 0, :112, :112].flatten(),
                                           coarse[0, 0].flatten()]))[0, 1].item()) < 0.02
    assert torch.equal(pixel_noise(seeds[1:], 224, torch.float32), noise[1:])


def test_upsampling_is_zero_insertion_then_the_binomial_low_pass_filter():
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(0))
    spread = torch.zeros(2, 3, 18, 18)
    spread[..., ::2, ::2] = x
    # zero insertion keeps a quarter of the samples: the filter's gain is 4
    reference = F.conv2d(F.pad(spread, (2, 1, 2, 1)), 4 * binomial_kernel(3), groups=3)
    upsampled = Upsample()(x)
    assert upsampled.shape == (2, 3, 18, 18)
    # away from the border (where interpolation repeats edge values) they are the same
    assert torch.allclose(upsampled[..., 2:-2, 2:-2], reference[..., 2:-2, 2:-2], atol=1e-5)


def test_downsampling_keeps_a_constant_and_removes_the_checkerboard():
    constant = torch.full((1, 2, 16, 16), 0.7)
    assert torch.allclose(Downsample(2)(constant), constant[..., ::2, ::2])
    rows, cols = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checkerboard = ((rows + cols) % 2 * 2 - 1).float().expand(1, 2, 16, 16)
    assert Downsample(2)(checkerboard)[..., 1:-1, 1:-1].abs().max() < 1e-6


def test_relativistic_loss_on_known_logits():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    assert relativistic_loss(real, fake).item() == pytest.approx(
        (softplus(-2.0) + softplus(0.0)) / 2)
    assert relativistic_loss(fake, real).item() == pytest.approx(
        (softplus(2.0) + softplus(0.0)) / 2)
    # only the difference of each pair counts: a common offset changes nothing
    assert relativistic_loss(real + 5, fake + 5).item() == pytest.approx(
        relativistic_loss(real, fake).item())


def test_gradient_penalty_is_the_squared_input_gradient_and_is_differentiated_again():
    weight = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    inputs = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 1.0], [-1.0, 2.0]]]],
                          requires_grad=True)  # (2, 1, 2, 2)
    logits = (inputs.squeeze(1) ** 2 * weight).sum(dim=(1, 2))  # sum of w * x^2 per sample
    penalty = gradient_penalty(logits, inputs)
    expected = ((2 * inputs.detach().squeeze(1) * weight.detach()) ** 2).sum(dim=(1, 2))
    assert torch.allclose(penalty, expected)
    # d/dw of sum_n sum (2 w x)^2 = 8 w x^2 summed over samples: the double backward
    penalty.sum().backward()
    assert torch.allclose(weight.grad, 8 * weight.detach() * (inputs.detach() ** 2).sum(
        dim=(0, 1)))
    # a loss scale (fp16) changes nothing but the precision
    scaled = gradient_penalty((inputs.squeeze(1) ** 2 * weight).sum(dim=(1, 2)), inputs,
                              output_scale=1024.0)
    assert torch.allclose(scaled, expected)


def test_discriminator_loss_adds_half_gamma_times_both_penalties():
    _, discriminator = tiny_networks()
    real = torch.rand(2, 3, 224, 224, requires_grad=True)
    fake = torch.rand(2, 3, 224, 224, requires_grad=True)
    real_logits, fake_logits = discriminator(real), discriminator(fake)
    total, stats = discriminator_loss(real_logits, fake_logits, real, fake, gamma=4.0)
    assert set(stats) == {"relativistic", "R1", "R2"}
    assert total.item() == pytest.approx(
        (stats["relativistic"] + 2.0 * (stats["R1"] + stats["R2"])).item(), rel=1e-5)
    total.backward()  # through the double backward into every parameter
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in discriminator.parameters())
    lazy, lazy_stats = discriminator_loss(real_logits.detach(), fake_logits.detach(), None, None,
                                          gamma=4.0)
    assert set(lazy_stats) == {"relativistic"}


def test_penalty_under_bf16_autocast_is_close_to_fp32():
    _, discriminator = tiny_networks(seed=1)
    images = torch.rand(2, 3, 224, 224) * 2 - 1

    def penalty(autocast: bool) -> torch.Tensor:
        inputs = images.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = discriminator(inputs)
        return gradient_penalty(logits, inputs)

    assert torch.allclose(penalty(True), penalty(False), rtol=0.1)


def test_schedules_go_from_start_to_end_along_half_a_cosine():
    assert cosine_ramp(0.0, 4.0, 1.0) == 4.0
    assert cosine_ramp(0.5, 4.0, 1.0) == pytest.approx(2.5)
    assert cosine_ramp(1.0, 4.0, 1.0) == pytest.approx(1.0)
    assert cosine_ramp(3.0, 4.0, 1.0) == pytest.approx(1.0)  # constant after the run's end
    schedule = Schedule(total_images=1000, lr=(2e-4, 5e-5), gamma=(2.0, 0.2),
                        beta2=(0.9, 0.99))
    start, middle, end = schedule.at(0), schedule.at(500), schedule.at(1000)
    assert start == {"lr": 2e-4, "gamma": 2.0, "beta2": 0.9}
    assert middle["gamma"] == pytest.approx(1.1)
    assert end["lr"] == pytest.approx(5e-5) and end["beta2"] == pytest.approx(0.99)


def test_projected_heads_give_one_logit_per_level_and_only_the_discriminators_learn():
    from pathgan.models.projected import ProjectedHeads

    torch.manual_seed(0)
    heads = ProjectedHeads(channels=[16, 32, 64], sizes=[56, 28, 14], projected=8, width=8)
    features = [torch.randn(2, 16, 56, 56), torch.randn(2, 32, 28, 28),
                torch.randn(2, 64, 14, 14)]
    logits = heads(features)
    assert logits.shape == (2, 3)
    trainable = {name.split(".")[0] for name, _ in heads.named_parameters()}
    assert trainable == {"discriminators"}  # the projections are fixed buffers
    again = ProjectedHeads(channels=[16, 32, 64], sizes=[56, 28, 14], projected=8, width=8)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(heads.projections,
                                                               again.projections, strict=True))
    # R1 against the heads' inputs: the projected features
    projected = [level.detach().requires_grad_(True) for level in heads.project(features)]
    penalty = gradient_penalty(heads.judge(projected).sum(dim=1), projected[0])
    assert penalty.shape == (2,) and torch.isfinite(penalty).all()
    with pytest.raises(ValueError, match="3 feature levels"):
        heads(features[:2])
