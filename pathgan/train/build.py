"""Config -> the networks of a GAN and its objective (no Accelerate, no data files)."""

from dataclasses import dataclass

import torch
from torch import nn

from pathgan.config import Config
from pathgan.core.errors import PathganError
from pathgan.models import Discriminator, EmbeddingDiscriminator, Generator
from pathgan.models.augment import DiffAugment
from pathgan.train.objective import EMBEDDINGS, IMAGES, GANObjective


@dataclass
class GAN:
    generator: Generator
    discriminators: dict[str, nn.Module]  # feature name -> discriminator
    weights: dict[str, float]
    encoder: nn.Module | None
    augment: DiffAugment

    @property
    def encoder_id(self) -> str | None:
        return self.encoder.encoder_id if self.encoder is not None else None

    def objective(self, discriminators: dict[str, nn.Module]) -> GANObjective:
        """The objective over the (prepared, possibly DDP-wrapped) discriminators."""
        return GANObjective(discriminators, self.weights, self.encoder, self.augment)


def to_device(network: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``network`` on ``device``, its convolution weights channels_last when asked, except in
    modules marked ``keep_contiguous`` (a convolution on a 1x1 input: with a channels_last
    weight, torch.compile on CUDA stops at cuDNN's contiguous weight gradient with
    "expected stride ... Error in op: aten.convolution_backward", seen with torch 2.11)."""
    network = network.to(device)
    if channels_last:
        network.to(memory_format=torch.channels_last)
        for module in network.modules():
            if getattr(module, "keep_contiguous", False):
                module.to(memory_format=torch.contiguous_format)
    return network


def set_encoder_precision(encoder: nn.Module, precision: str) -> None:
    """Run ``encoder`` in ``precision``; TensorFlow encoders only run in fp32."""
    if hasattr(encoder, "set_precision"):
        encoder.set_precision(precision)
    elif precision != "fp32":
        raise PathganError(f"{encoder.encoder_id} runs in fp32 only (TensorFlow), not "
                           f"{precision}: set model.encoder_precision=fp32")


def build_gan(config: Config, device: torch.device) -> GAN:
    model = config.model
    generator = Generator(model.nz, model.ngf, model.channels)
    discriminators: dict[str, nn.Module] = {}
    weights: dict[str, float] = {}
    encoder = None
    if model.kind == "dcgan" or model.hybrid:
        discriminators[IMAGES] = Discriminator(model.ndf, model.channels)
        weights[IMAGES] = model.pixel_weight if model.hybrid else 1.0
    if model.kind == "embgan":
        from pathgan.encoders import load_encoder

        # Frozen and never given to accelerator.prepare: no DDP, no optimizer, eval mode.
        encoder = load_encoder(model.encoder, device=device)
        discriminators[EMBEDDINGS] = EmbeddingDiscriminator(
            encoder.embed_dim, model.disc_hidden, model.disc_dropout, model.spectral_norm,
            model.minibatch_std,
        )
        weights[EMBEDDINGS] = model.embedding_weight
    return GAN(generator, discriminators, weights, encoder, DiffAugment(config.train.augment or ""))
