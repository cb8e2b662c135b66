"""What differs between the GANs: which view of a sample a discriminator judges; the losses.

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

The losses: the seed's GANs use the non-saturating binary cross-entropy (:class:`GANObjective`);
the modern GAN (``model.kind: r3gan``) the relativistic pairing loss with R1 and R2 gradient
penalties (:class:`RelativisticObjective`, after R3GAN, Huang et al. 2025).

Conditional runs: a view's class labels travel beside it, under :func:`labels_key` (the real
batch brings them, the fake views get the labels G drew for), and each discriminator is called
``D(view, labels)``; an unconditional run has no labels and calls ``D(view)``. The relativistic
loss pairs each real sample with a fake one, so there G draws each fake for its pair's class
(:attr:`GANObjective.pairs_classes`); the cross-entropy losses judge the sets apart and G draws
its classes in the real batches' mix.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pathgan.models.augment import DiffAugment

IMAGES = "images"
EMBEDDINGS = "embeddings"
FEATURES = "features"  # the modern GAN's projected head: feature maps of several encoder depths
VIEWS = (IMAGES, EMBEDDINGS, FEATURES)
ENCODER_VIEWS = (EMBEDDINGS, FEATURES)


def labels_key(view: str) -> str:
    """Where a view's class labels are kept in a batch of views: ``"images.labels"``."""
    return f"{view}.labels"


def batch_labels(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """A real batch's class labels (whichever view brought them), None when it has none."""
    return next((batch[labels_key(view)] for view in VIEWS if labels_key(view) in batch), None)


def bce_logits(logits: torch.Tensor, target: float) -> torch.Tensor:
    """Binary cross-entropy on logits (the sigmoid + BCELoss form is unsafe under autocast)."""
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(),
                                                                              target))


class GANObjective:
    """Non-saturating GAN losses summed over weighted discriminators, one per view."""

    def __init__(self, discriminators: dict[str, nn.Module], weights: dict[str, float],
                 encoder: nn.Module | None = None, augment: DiffAugment | None = None,
                 feature_levels: int | list[int] = 4) -> None:
        if set(ENCODER_VIEWS) & set(discriminators) and encoder is None:
            raise ValueError("an embedding or feature discriminator needs an encoder")
        self.discriminators = discriminators
        self.weights = weights
        self.encoder = encoder
        self.augment = augment or DiffAugment(())
        self.feature_levels = feature_levels

    @property
    def real_inputs(self) -> set[str]:
        """What the data must provide: images, precomputed embeddings, or both."""
        needed = set()
        if IMAGES in self.discriminators:
            needed.add(IMAGES)
        if FEATURES in self.discriminators:
            needed.add(IMAGES)  # feature maps are not precomputed: real images are encoded...
        if EMBEDDINGS in self.discriminators:  # ... and so embeddings need not be either
            needed.add(IMAGES if self.augment or FEATURES in self.discriminators
                       else EMBEDDINGS)
        return needed

    #: whether fake sample ``i`` is judged against real sample ``i`` (then drawn for its class)
    pairs_classes = False

    def start_step(self, step: int, gamma: float) -> None:
        """Per-step settings from the run's schedule (``train.gamma``...): the cross-entropy
        losses have none."""

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
        if FEATURES in self.discriminators:
            with torch.autocast(images.device.type, enabled=False):  # as _encode
                views[FEATURES] = self.encoder.features(images.float(), self.feature_levels)
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
    def _judge(discriminator: nn.Module, views: dict, view: str, detach: bool = False,
               inputs=None):
        """``D(view)``, or ``D(view, labels)`` when the view has labels (a conditional run);
        ``inputs`` in place of the view's own (the penalty's fresh leaves)."""
        if inputs is None:
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


# --- the relativistic pairing loss with R1 and R2 (R3GAN) -----------------------------------
# Each real sample is paired with a fake one and the discriminator judges the pair: its loss is
# ``softplus(-(D(real) - D(fake)))``, the generator's the same with the roles swapped. A
# discriminator that separates the two sets only by a constant offset gains nothing from it, and
# every fake sample is pushed towards the real one it is paired with, which is what keeps the
# pairing loss from dropping modes (Sun et al. 2020). On its own it does not converge; with
# zero-centred gradient penalties on both the real data (R1, Mescheder et al. 2018) and the fake
# data (R2) it does, locally (the paper's theorem), without normalisation layers or other tricks.
#
# The penalty is ``||grad_x D(x)||^2`` per sample, added as ``gamma / 2 * (R1 + R2)``. It is a
# gradient of the discriminator's output with respect to its *input*, taken with
# ``create_graph=True`` so that the final backward differentiates it again (a double backward):
# the inputs must require gradients, and the discriminator must support double backward (plain
# convolutions, interpolation and leaky ReLUs do; ``torch.compile`` does not).


def relativistic_loss(preferred: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean of ``softplus(-(preferred - other))`` over the pairs: the discriminator's loss with
    ``preferred`` = real logits, the generator's with ``preferred`` = fake logits. Computed in
    float32 (logits from autocast may be bf16)."""
    return F.softplus(other.float() - preferred.float()).mean()


def gradient_penalty(logits: torch.Tensor, inputs: torch.Tensor | list[torch.Tensor],
                     output_scale: float = 1.0) -> torch.Tensor:
    """Per-sample squared norm of the gradient of ``logits`` with respect to ``inputs`` (which
    must require gradients and be what ``logits`` were computed from; a list of them, as the
    feature maps of a projected head, counts as one input), kept in the graph.

    Samples are independent (no batch statistics), so the gradient of the summed logits gives
    each sample its own gradient. ``output_scale``: a loss scale (fp16's GradScaler) by which the
    logits are multiplied before differentiating, so that small gradients do not underflow in
    half precision; the gradient is divided by it again before squaring.
    """
    gradients = torch.autograd.grad(logits.float().sum() * output_scale,
                                    inputs if isinstance(inputs, list) else [inputs],
                                    create_graph=True)
    return sum((gradient.float() / output_scale).square().flatten(1).sum(dim=1)
               for gradient in gradients)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor,
                       real_inputs: torch.Tensor | None, fake_inputs: torch.Tensor | None,
                       gamma: float, output_scale: float = 1.0,
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The regularised discriminator loss and its parts: ``relativistic + gamma / 2 * (R1 +
    R2)``. Without inputs (``None``, or ``gamma`` 0) a penalty is left out: lazy regularisation
    takes it every few steps only."""
    adversarial = relativistic_loss(real_logits, fake_logits)
    stats = {"relativistic": adversarial.detach()}
    total = adversarial
    for name, logits, inputs in (("R1", real_logits, real_inputs),
                                 ("R2", fake_logits, fake_inputs)):
        if inputs is not None and gamma > 0:
            penalty = gradient_penalty(logits, inputs, output_scale).mean()
            total = total + gamma / 2 * penalty
            stats[name] = penalty.detach()
    return total, stats


class RelativisticObjective(GANObjective):
    """The relativistic pairing loss over weighted discriminators, R1 and R2 every
    ``penalty_every``-th step (lazy regularisation, as StyleGAN2: gamma times ``penalty_every``
    on the steps that take it, so the average pull is the same).

    ``penalty_discriminators``: the same discriminators, never compiled (``torch.compile``
    refuses the penalty's double backward): the penalty steps run them, the other steps the
    possibly compiled ones. ``loss_scale``: the fp16 GradScaler's current scale (1 otherwise),
    by which the penalty's inner gradient is scaled against underflow.

    The generator's pairs are judged against the real logits of the same step's discriminator
    pass (before its update), kept from :meth:`d_loss`: one discriminator pass on the real batch
    a step instead of two, the same pairing.

    ``ramp_steps``: the heads on an encoder (embedding, projected features) start at weight 0
    and reach theirs linearly over that many steps, so that the pixel head shapes the images
    before a frozen network's features pull on them (0: full weight from the start).
    """

    pairs_classes = True

    def __init__(self, discriminators: dict[str, nn.Module], weights: dict[str, float],
                 encoder: nn.Module | None = None, augment: DiffAugment | None = None, *,
                 penalty_discriminators: dict[str, nn.Module] | None = None,
                 penalty_every: int = 1, ramp_steps: int = 0, feature_levels: int | list[int] = 4,
                 loss_scale: Callable[[], float] = lambda: 1.0) -> None:
        super().__init__(discriminators, weights, encoder, augment, feature_levels)
        self.full_weights = dict(weights)
        self.ramp_steps = ramp_steps
        self.penalty_discriminators = penalty_discriminators or discriminators
        self.penalty_every = penalty_every
        self.loss_scale = loss_scale
        self.gamma = 0.0  # this step's penalty weight: 0 on the steps without one
        self.real_logits: dict[str, torch.Tensor] = {}

    def start_step(self, step: int, gamma: float) -> None:
        self.gamma = gamma * self.penalty_every if step % self.penalty_every == 0 else 0.0
        ramp = min(1.0, step / self.ramp_steps) if self.ramp_steps else 1.0
        self.weights = {view: weight * (ramp if view in ENCODER_VIEWS else 1.0)
                        for view, weight in self.full_weights.items()}

    def d_loss(self, real: dict, fake: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, stats = 0.0, {}
        penalise = self.gamma > 0
        scale = self.loss_scale() if penalise else 1.0
        for view, discriminator in self.discriminators.items():
            # Fresh leaves: the penalty differentiates with respect to exactly these inputs.
            real_inputs = _leaves(real[view], penalise)
            fake_inputs = _leaves(fake[view], penalise)
            if penalise:
                discriminator = self.penalty_discriminators[view]
            real_logits = self._judge(discriminator, real, view, inputs=real_inputs)
            fake_logits = self._judge(discriminator, fake, view, inputs=fake_inputs)
            loss, parts = discriminator_loss(real_logits, fake_logits,
                                             real_inputs if penalise else None,
                                             fake_inputs if penalise else None,
                                             self.gamma, scale)
            self.real_logits[view] = real_logits.detach()
            total = total + self.weights[view] * loss
            if self.ramp_steps and view in ENCODER_VIEWS:  # the head's ramped weight
                stats[f"weight/{view}"] = torch.tensor(self.weights[view],
                                                       device=real_logits.device)
            stats[self._stat_name("D(x)-D(G(z))", view)] = (real_logits.detach().float()
                                                          - fake_logits.detach().float()).mean()
            stats.update({self._stat_name(name, view): value for name, value in parts.items()
                          if name != "relativistic"})
        return total, stats

    def g_loss(self, fake: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, stats = 0.0, {}
        for view, discriminator in self.discriminators.items():
            logits = self._judge(discriminator, fake, view)
            total = total + self.weights[view] * relativistic_loss(logits,
                                                                   self.real_logits[view])
        return total, stats


def _leaves(view: torch.Tensor | list[torch.Tensor],
            requires_grad: bool) -> torch.Tensor | list[torch.Tensor]:
    """A view (a tensor, or a list of feature maps) cut from its graph, as new leaves."""
    if isinstance(view, list):
        return [level.detach().requires_grad_(requires_grad) for level in view]
    return view.detach().requires_grad_(requires_grad)
