"""Config -> the networks of a GAN, its encoder ready to train with, and its objective.

No Accelerate and no data here: of the shard set, only the precision its precomputed embeddings
were computed in is read, since the encoder must run in it (:func:`resolve_encoder_precision`),
and, for a conditional run (``model.conditional``), its classes (:mod:`pathgan.train.classes`).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pathgan.config import Config
from pathgan.core.errors import PathganError
from pathgan.encoders import Encoder, load_encoder
from pathgan.models import Discriminator, EmbeddingDiscriminator
from pathgan.models.augment import DiffAugment
from pathgan.models.conditional import (
    ConditionalDiscriminator,
    ConditionalEmbeddingDiscriminator,
    ConditionalR3Discriminator,
)
from pathgan.models.projected import ProjectedHeads
from pathgan.models.r3gan import R3Discriminator
from pathgan.runs import build_generator, generator_config
from pathgan.shards.embedding_files import embedded_encoders, embeddings_dir, stored_precision
from pathgan.train.classes import Classes, training_classes
from pathgan.train.objective import (
    EMBEDDINGS,
    FEATURES,
    IMAGES,
    GANObjective,
    RelativisticObjective,
)


@dataclass
class GAN:
    generator: nn.Module
    discriminators: dict[str, nn.Module]  # view name -> discriminator
    weights: dict[str, float]
    encoder: Encoder | None
    augment: DiffAugment
    relativistic: bool = False  # the modern GAN's loss (with R1/R2) instead of cross-entropy
    penalty_every: int = 1
    ramp_steps: int = 0  # the modern GAN's encoder heads reach their weight over these steps
    feature_levels: int | list[int] = 4  # the encoder depths its projected head judges
    classes: Classes | None = None  # a conditional GAN's

    @property
    def encoder_id(self) -> str | None:
        return self.encoder.encoder_id if self.encoder is not None else None

    def objective(self, discriminators: dict[str, nn.Module],
                  penalty_discriminators: dict[str, nn.Module] | None = None,
                  loss_scale: Callable[[], float] = lambda: 1.0) -> GANObjective:
        """The objective over the (prepared, possibly DDP-wrapped and compiled) discriminators;
        the relativistic one takes its R1/R2 steps with ``penalty_discriminators`` (the same,
        never compiled) and scales the penalty's gradient by ``loss_scale()`` (fp16)."""
        if self.relativistic:
            return RelativisticObjective(discriminators, self.weights, self.encoder, self.augment,
                                         penalty_discriminators=penalty_discriminators,
                                         penalty_every=self.penalty_every,
                                         ramp_steps=self.ramp_steps,
                                         feature_levels=self.feature_levels,
                                         loss_scale=loss_scale)
        return GANObjective(discriminators, self.weights, self.encoder, self.augment)

    @property
    def real_inputs(self) -> set[str]:
        """What the real data must provide (:attr:`GANObjective.real_inputs`)."""
        return self.objective(self.discriminators).real_inputs


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


def require_embeddings(shards_dir: str, encoder_id: str) -> None:
    """Refuse, in one line, a shard set without embeddings of ``encoder_id`` (those of another
    encoder, or none): the first thing the Embedding GAN checks of its data."""
    folder = embeddings_dir(shards_dir, encoder_id)
    if folder.is_dir():
        return
    found = embedded_encoders(shards_dir)
    if found:
        raise PathganError(
            f"the embeddings in {folder.parent} come from {', '.join(found)}, not from the "
            f"configured encoder {encoder_id}; run `pathgan embed {shards_dir} --encoder "
            "SPEC` with model.encoder's spec"
        )
    raise PathganError(f"{shards_dir} has no precomputed embeddings; run `pathgan embed "
                       f"{shards_dir} --encoder SPEC` first")


def resolve_encoder_precision(config: Config, inputs: set[str], encoder_id: str) -> str:
    """The precision the encoder runs in during training: that of the precomputed real
    embeddings, so that real and fake embeddings are rounded alike (``model.encoder_precision``
    may name it, but not differ from it); fp32 unless asked when real images are encoded in the
    loop."""
    requested = config.model.encoder_precision
    if EMBEDDINGS not in inputs:
        return "fp32" if requested == "auto" else requested
    require_embeddings(config.data.shards, encoder_id)
    stored = stored_precision(config.data.shards, encoder_id, config.data.split)
    if requested not in ("auto", stored):
        raise PathganError(
            f"model.encoder_precision is {requested} but the real embeddings of {encoder_id} "
            f"were computed in {stored}: the discriminator would learn the rounding difference. "
            f"Set model.encoder_precision={stored}, or rerun `pathgan embed --precision "
            f"{requested}`"
        )
    return stored


def set_encoder_precision(encoder: Encoder, precision: str) -> None:
    """Run ``encoder`` in ``precision``; TensorFlow encoders only run in fp32."""
    if hasattr(encoder, "set_precision"):
        encoder.set_precision(precision)
    elif precision != "fp32":
        raise PathganError(f"{encoder.encoder_id} runs in fp32 only (TensorFlow), not "
                           f"{precision}: set model.encoder_precision=fp32")


def build_networks(config: Config, device: torch.device,
                   classes: Classes | None = None) -> GAN:
    """The networks a config describes; the Embedding GAN's encoder frozen on ``device``, in its
    default precision (``pathgan arch`` draws them; training takes :func:`build_gan`). A
    conditional config needs its ``classes``."""
    model = config.model
    if model.conditional and classes is None:
        raise ValueError("a conditional GAN is built for its classes")
    count = len(classes.names) if model.conditional else None
    generator = build_generator(generator_config(model, classes=classes if count else None))
    if count:
        generator.class_mix.copy_(torch.tensor(classes.mix))
    discriminators: dict[str, nn.Module] = {}
    weights: dict[str, float] = {}
    encoder = None
    if model.kind == "r3gan":
        return build_r3gan(config, generator, device, classes if count else None)
    if model.kind == "dcgan" or model.hybrid:
        discriminators[IMAGES] = (ConditionalDiscriminator(model.ndf, model.channels, count)
                                  if count else Discriminator(model.ndf, model.channels))
        weights[IMAGES] = model.pixel_weight if model.hybrid else 1.0
    if model.kind == "embgan":
        # Frozen and never given to accelerator.prepare: no DDP, no optimizer, eval mode.
        encoder = load_encoder(model.encoder, device=device)
        discriminators[EMBEDDINGS] = embedding_discriminator(model, encoder.embed_dim, count)
        weights[EMBEDDINGS] = model.embedding_weight
    return GAN(generator, discriminators, weights, encoder,
               DiffAugment(config.train.augment or ""), classes=classes if count else None)


def embedding_discriminator(model, embed_dim: int, count: int | None) -> nn.Module:
    """The discriminator on encoder embeddings ``model`` describes; with a class projection when
    the run has ``count`` classes."""
    shape = (embed_dim, model.disc_hidden, model.disc_dropout, model.spectral_norm,
             model.minibatch_std)
    return (ConditionalEmbeddingDiscriminator(*shape, count) if count
            else EmbeddingDiscriminator(*shape))


#: model.heads' names -> the view each head judges (objective.py)
HEAD_VIEWS = {"pixels": IMAGES, "projected": FEATURES, "embedding": EMBEDDINGS}


def build_r3gan(config: Config, generator: nn.Module, device: torch.device,
                classes: Classes | None = None) -> GAN:
    """The modern GAN: its generator and the heads ``model.heads`` names, with their weights;
    the frozen encoder, when a head judges its output, on ``device``. A conditional one's pixel
    and embedding heads judge the class by projection (the projected head is unconditional:
    config validation refuses it with ``model.conditional``)."""
    model = config.model
    encoder = load_encoder(model.encoder, device=device) if model.encoder else None
    levels = model.head_levels or 4
    count = len(classes.names) if classes else None
    discriminators: dict[str, nn.Module] = {}
    for head in model.heads:
        if head == "pixels":
            shape = dict(max_width=model.max_width, blocks=model.blocks,
                         expansion=model.expansion, group_width=model.group_width,
                         channels=model.channels)
            discriminators[IMAGES] = (
                ConditionalR3Discriminator(model.ndf, num_classes=count, **shape) if count
                else R3Discriminator(model.ndf, **shape))
        elif head == "projected":
            # The levels' shapes, from one blank image (an error here names the levels asked).
            example = torch.zeros(1, model.channels, model.image_size, model.image_size,
                                  device=device)
            maps = encoder.features(example, levels)
            discriminators[FEATURES] = ProjectedHeads([m.shape[1] for m in maps],
                                                      [m.shape[-1] for m in maps])
        else:
            discriminators[EMBEDDINGS] = embedding_discriminator(model, encoder.embed_dim, count)
    weights = {HEAD_VIEWS[head]: weight for head, weight in model.heads.items()}
    return GAN(generator, discriminators, weights, encoder,
               DiffAugment(config.train.augment or ""), relativistic=True,
               penalty_every=config.train.penalty_every,
               ramp_steps=model.head_warmup // config.train.batch_size, feature_levels=levels,
               classes=classes)


def build_gan(config: Config, device: torch.device) -> GAN:
    """The GAN to train: :func:`build_networks` (for the shard set's classes when conditional,
    checked first: :func:`~pathgan.train.classes.training_classes`), its encoder set to run in
    the precision of the shard set's real embeddings (:func:`resolve_encoder_precision`)."""
    classes = training_classes(config) if config.model.conditional else None
    gan = build_networks(config, device, classes)
    if gan.encoder is not None:
        set_encoder_precision(gan.encoder,
                              resolve_encoder_precision(config, gan.real_inputs, gan.encoder_id))
    return gan
