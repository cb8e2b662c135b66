"""What differs between the two GANs: which view of a sample a discriminator judges; the losses.

A *view* is what a discriminator judges: :data:`IMAGES` (the DCGAN's pixel discriminator)
or :data:`EMBEDDINGS` (the Embedding GAN's ``Linear`` discriminator on a frozen encoder's
output). Fake views are computed from ``G(z)`` once per step and reused: detached for the
discriminator step, attached for the generator step, so the encoder runs forward once per step.
The hybrid objective simply has both discriminators. (The *features* of ``pathgan eval`` are
another thing: an evaluation encoder's outputs, :mod:`pathgan.evaluation.features`.)

Real views come from the data: images, or embeddings precomputed by ``pathgan embed``. With
differentiable augmentation the real embeddings cannot be precomputed (the augmentation is
drawn afresh every step), so real images go through the same augmentation and encoder as fake
ones. The encoder always runs outside the trainer's autocast, in its own precision: the one the
precomputed real embeddings were made in, so real and fake embeddings never differ by rounding.

Conditional runs: a view's class labels travel beside it, under :func:`labels_key` (the real
batch brings them, the fake views get the labels G drew for), and each discriminator is called
``D(view, labels)``; an unconditional run has no labels and calls ``D(view)``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from pathgan.models.augment import DiffAugment

IMAGES = "images"
EMBEDDINGS = "embeddings"
LABELS = "labels"  # each real sample's class index (the decoded-patch cache carries them)
VIEWS = (IMAGES, EMBEDDINGS)


def labels_key(view: str) -> str:
    """Where a view's class labels are kept in a batch of views: ``"images.labels"``."""
    return f"{view}.labels"


def bce_logits(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Binary cross-entropy on logits (the sigmoid + BCELoss form is unsafe under autocast)."""
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(),
                                                                              target))


class GANObjective:
    """Non-saturating GAN losses summed over weighted discriminators, one per view."""

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

    def _stat_name(self, name: str, view: str) -> str:
        return name if len(self.discriminators) == 1 else f"{name}/{view}"

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        # The encoder's own precision, never the trainer's autocast (see the module docstring).
        with torch.autocast(images.device.type, enabled=False):
            return self.encoder(images.float())

    def _views(self, images: torch.Tensor, labels: torch.Tensor | None,
               encode: bool = True) -> dict[str, torch.Tensor]:
        images = self.augment(images)
        views = {}
        if IMAGES in self.discriminators:
            views[IMAGES] = images
        if EMBEDDINGS in self.discriminators and encode:
            # The encoder is frozen but differentiable: G learns through it.
            views[EMBEDDINGS] = self._encode(images)
        if labels is not None:
            views.update({labels_key(view): labels for view in list(views)})
        return views

    def fake_views(self, images: torch.Tensor,
                   labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Generated images (in [-1, 1]) -> each discriminator's input, attached to G; with the
        classes G drew them for, in a conditional run."""
        return self._views(images, labels)

    @torch.no_grad()
    def real_views(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A real batch (images in [-1, 1] and/or precomputed embeddings, and their labels in a
        conditional run) -> D's inputs."""
        views = {}
        if IMAGES in batch:
            views = self._views(batch[IMAGES], batch.get(labels_key(IMAGES)),
                                encode=EMBEDDINGS not in batch)
        if EMBEDDINGS in batch:
            views[EMBEDDINGS] = batch[EMBEDDINGS]
            if labels_key(EMBEDDINGS) in batch:
                views[labels_key(EMBEDDINGS)] = batch[labels_key(EMBEDDINGS)]
        return views

    @staticmethod
    def _judge(discriminator: nn.Module, views: dict, view: str, detach: bool = False):
        """``D(view)``, or ``D(view, labels)`` when the view has labels (a conditional run)."""
        inputs = views[view].detach() if detach else views[view]
        labels = views.get(labels_key(view))
        return discriminator(inputs) if labels is None else discriminator(inputs, labels)

    def d_loss(self, real: dict, fake: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, stats = 0.0, {}
        for view, discriminator in self.discriminators.items():
            real_logits = self._judge(discriminator, real, view)
            fake_logits = self._judge(discriminator, fake, view, detach=True)
            loss = bce_logits(real_logits, 1.0) + bce_logits(fake_logits, 0.0)
            total = total + self.weights[view] * loss
            stats[self._stat_name("D(x)", view)] = torch.sigmoid(real_logits.float()).mean()
            stats[self._stat_name("D(G(z))", view)] = torch.sigmoid(fake_logits.float()).mean()
        return total, stats

    def g_loss(self, fake: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, stats = 0.0, {}
        for view, discriminator in self.discriminators.items():
            logits = self._judge(discriminator, fake, view)
            total = total + self.weights[view] * bce_logits(logits, 1.0)
            stats[self._stat_name("D(G(z))_after", view)] = torch.sigmoid(logits.float()).mean()
        return total, stats
