"""A GAN's networks, optimizers and objective stepped without Accelerate.

The update order is the training loop's (D on real and detached fake, then G through D on the
same fake batch, the encoder run once per step), with pathgan's own networks, objective and
optimizer; what the loop adds (DDP, GradScaler, logging, checkpoints) is left out, so that
benchmarks time the networks alone and tests can compare two ways of running them on one batch.
"""

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from pathgan.config import Config
from pathgan.core.devices import switch_on
from pathgan.train.build import build_networks, to_device
from pathgan.train.loop import make_optimizer
from pathgan.train.objective import GANObjective


@dataclass
class PlainGAN:
    generator: nn.Module
    objective: GANObjective
    g_optimizer: torch.optim.Optimizer
    d_optimizer: torch.optim.Optimizer
    embed_dim: int | None  # of the encoder, for an Embedding GAN
    autocast_dtype: torch.dtype | None = None

    @classmethod
    def build(cls, config: Config, device: torch.device, *, compile_backend: str | None = None,
              autocast_dtype: torch.dtype | None = None,
              encoder_precision: str | None = None) -> "PlainGAN":
        """The loop's set-up: seeded weights, ``train.channels_last``, ``make_optimizer``, and
        each network compiled alone when ``compile_backend`` is given (``inductor`` is what
        ``train.compile`` uses). ``encoder_precision`` (fp32, bf16, fp16) is the precision of a
        timm encoder, which runs in its own precision whatever the autocast around it."""
        torch.manual_seed(config.run.seed)
        gan = build_networks(config, device)
        if encoder_precision is not None:
            gan.encoder.set_precision(encoder_precision)
        generator = to_device(gan.generator, device, switch_on(config.train.channels_last))
        discriminators = {k: to_device(d, device, switch_on(config.train.channels_last))
                          for k, d in gan.discriminators.items()}
        g_optimizer = make_optimizer([generator], config, device)
        d_optimizer = make_optimizer(discriminators.values(), config, device)
        if compile_backend is not None:
            generator = torch.compile(generator, backend=compile_backend)
            discriminators = {k: torch.compile(d, backend=compile_backend)
                              for k, d in discriminators.items()}
        embed_dim = gan.encoder.embed_dim if gan.encoder is not None else None
        return cls(generator, gan.objective(discriminators), g_optimizer, d_optimizer, embed_dim,
                   autocast_dtype)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.generator.parameters()).device.type
        return torch.autocast(device_type, dtype=self.autocast_dtype)

    def losses_and_gradients(self, real: dict[str, torch.Tensor], noise: torch.Tensor):
        """(D loss, G loss, D's gradients, G's gradients) at the current weights, no update: what
        a compiled and an eager network must agree on (after an update they drift apart, as Adam
        turns rounding-sized gradient differences into step-sized ones). One forward pass per
        loss: a compiled backward cannot keep its graph for a second one."""
        discriminators = [p for d in self.objective.discriminators.values()
                          for p in d.parameters()]
        with self.autocast():
            fake = self.objective.fake_views(self.generator(noise))
            d_loss, _ = self.objective.d_loss(real, fake)
        d_gradients = torch.autograd.grad(d_loss, discriminators)
        with self.autocast():
            g_loss, _ = self.objective.g_loss(self.objective.fake_views(self.generator(noise)))
        g_gradients = torch.autograd.grad(g_loss, list(self.generator.parameters()))
        return d_loss.detach(), g_loss.detach(), d_gradients, g_gradients

    def step(self, real: dict[str, torch.Tensor],
             noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One D update and one G update; returns (D loss, G loss), not synchronised."""
        with self.autocast():
            fake = self.objective.fake_views(self.generator(noise))
            d_loss, _ = self.objective.d_loss(real, fake)
        self.d_optimizer.zero_grad(set_to_none=True)
        d_loss.backward()
        self.d_optimizer.step()
        with self.autocast():
            g_loss, _ = self.objective.g_loss(fake)
        self.g_optimizer.zero_grad(set_to_none=True)
        g_loss.backward()
        self.g_optimizer.step()
        return d_loss.detach(), g_loss.detach()
