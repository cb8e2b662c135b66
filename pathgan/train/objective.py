"""What differs between the two GANs: which features a discriminator sees, and the losses.

A *feature* is what a discriminator judges: :data:`IMAGES` (the DCGAN's pixel discriminator)
or :data:`EMBEDDINGS` (the Embedding GAN's ``Linear`` discriminator on a frozen encoder's
output). Fake features are computed from ``G(z)`` once per step and reused: detached for the
discriminator step, attached for the generator step, so the encoder runs forward once per step.
The hybrid objective simply has both discriminators.

Real features come from the data: images, or embeddings precomputed by ``pathgan embed``. With
differentiable augmentation the real embeddings cannot be precomputed (the augmentation is
drawn afresh every step), so real images go through the same augmentation and encoder as fake
ones. The encoder always runs outside the trainer's autocast, in its own precision: the one the
precomputed real embeddings were made in, so real and fake embeddings never differ by rounding.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pathgan.models.augment import DiffAugment

IMAGES = "images"
EMBEDDINGS = "embeddings"
LABELS = "labels"  # each real sample's class index (the decoded-patch cache carries them)
FEATURES = (IMAGES, EMBEDDINGS)


def bce_logits(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Binary cross-entropy on logits (the sigmoid + BCELoss form is unsafe under autocast)."""
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(),
                                                                              target))


class GANObjective:
    """Non-saturating GAN losses summed over weighted discriminators, one per feature."""

    def __init__(self, discriminators: dict[str, nn.Module], weights: dict[str, float],
                 encoder: nn.Module | None = None, augment: DiffAugment | None = None) -> None:
        if EMBEDDINGS in discriminators and encoder is None:
            raise ValueError("an embedding discriminator needs an encoder")
        self.discriminators = discriminators
        self.weights = weights
        self.encoder = encoder
        self.augment = augment or DiffAugment(())

    @property
    def real_inputs(self) -> set[str]:
        """What the data must provide: images, precomputed embeddings, or both."""
        needed = set()
        if IMAGES in self.discriminators:
            needed.add(IMAGES)
        if EMBEDDINGS in self.discriminators:
            needed.add(IMAGES if self.augment else EMBEDDINGS)
        return needed

    def _stat_name(self, name: str, feature: str) -> str:
        return name if len(self.discriminators) == 1 else f"{name}/{feature}"

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        # The encoder's own precision, never the trainer's autocast (see the module docstring).
        with torch.autocast(images.device.type, enabled=False):
            return self.encoder(images.float())

    def _features(self, images: torch.Tensor, encode: bool = True) -> dict[str, torch.Tensor]:
        images = self.augment(images)
        features = {}
        if IMAGES in self.discriminators:
            features[IMAGES] = images
        if EMBEDDINGS in self.discriminators and encode:
            # The encoder is frozen but differentiable: G learns through it.
            features[EMBEDDINGS] = self._encode(images)
        return features

    def fake_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._features(images)

    @torch.no_grad()
    def real_features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A real batch (images in [-1, 1] and/or precomputed embeddings) -> D's inputs."""
        features = {}
        if IMAGES in batch:
            features = self._features(batch[IMAGES], encode=EMBEDDINGS not in batch)
        if EMBEDDINGS in batch:
            features[EMBEDDINGS] = batch[EMBEDDINGS]
        return features

    def d_loss(self, real: dict, fake: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, stats = 0.0, {}
        for feature, discriminator in self.discriminators.items():
            real_logits = discriminator(real[feature])
            fake_logits = discriminator(fake[feature].detach())
            loss = bce_logits(real_logits, 1.0) + bce_logits(fake_logits, 0.0)
            total = total + self.weights[feature] * loss
            stats[self._stat_name("D(x)", feature)] = torch.sigmoid(real_logits.float()).mean()
            stats[self._stat_name("D(G(z))", feature)] = torch.sigmoid(fake_logits.float()).mean()
        return total, stats

    def g_loss(self, fake: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, stats = 0.0, {}
        for feature, discriminator in self.discriminators.items():
            logits = discriminator(fake[feature])
            total = total + self.weights[feature] * bce_logits(logits, 1.0)
            stats[self._stat_name("D(G(z))_after", feature)] = torch.sigmoid(logits.float()).mean()
        return total, stats
