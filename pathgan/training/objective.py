"""What differs between the two GANs: which features a discriminator sees, and the losses.

A *feature* is what a discriminator judges: ``"images"`` (the DCGAN's pixel discriminator)
or ``"embeddings"`` (the Embedding GAN's ``Linear`` discriminator on a frozen encoder's output).
Real features come from the data; fake features are computed from ``G(z)`` once per step and
reused: detached for the discriminator step, attached for the generator step, so the encoder
runs forward once per step. The hybrid objective simply has both discriminators.
"""

import torch
import torch.nn.functional as F
from torch import nn


def bce_logits(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Binary cross-entropy on logits (the sigmoid + BCELoss form is unsafe under autocast)."""
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(),
                                                                              target))


class GANObjective:
    """Non-saturating GAN losses summed over weighted discriminators, one per feature."""

    def __init__(self, discriminators: dict[str, nn.Module], weights: dict[str, float],
                 encoder: nn.Module | None = None) -> None:
        if "embeddings" in discriminators and encoder is None:
            raise ValueError("an embedding discriminator needs an encoder")
        self.discriminators = discriminators
        self.weights = weights
        self.encoder = encoder

    def _stat_name(self, name: str, feature: str) -> str:
        return name if len(self.discriminators) == 1 else f"{name}/{feature}"

    def fake_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = {}
        if "images" in self.discriminators:
            features["images"] = images
        if "embeddings" in self.discriminators:
            # The encoder is frozen but differentiable: G learns through it.
            features["embeddings"] = self.encoder(images)
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
