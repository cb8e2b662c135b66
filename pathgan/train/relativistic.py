"""The relativistic pairing loss with R1 and R2 penalties (R3GAN, Huang et al. 2025).

Each real sample is paired with a fake one and the discriminator judges the pair: its loss is
``softplus(-(D(real) - D(fake)))``, the generator's the same with the roles swapped. A
discriminator that separates the two sets only by a constant offset gains nothing from it, and
every fake sample is pushed towards the real one it is paired with, which is what keeps the
pairing loss from dropping modes (Sun et al. 2020). On its own it does not converge; with
zero-centred gradient penalties on both the real data (R1, Mescheder et al. 2018) and the fake
data (R2) it does, locally (the paper's theorem), without normalisation layers or other tricks.

The penalty is ``||grad_x D(x)||^2`` per sample, added as ``gamma / 2 * (R1 + R2)``. It is a
gradient of the discriminator's output with respect to its *input*, taken with
``create_graph=True`` so that the final backward differentiates it again (a double backward):
the inputs must require gradients, and the discriminator must support double backward
(plain convolutions, interpolation and leaky ReLUs do; ``torch.compile`` does not).
"""

import torch
import torch.nn.functional as F


def relativistic_loss(preferred: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Mean of ``softplus(-(preferred - other))`` over the pairs: the discriminator's loss with
    ``preferred`` = real logits, the generator's with ``preferred`` = fake logits. Computed in
    float32 (logits from autocast may be bf16)."""
    return F.softplus(other.float() - preferred.float()).mean()


def gradient_penalty(logits: torch.Tensor, inputs: torch.Tensor,
                     output_scale: float = 1.0) -> torch.Tensor:
    """Per-sample squared norm of the gradient of ``logits`` with respect to ``inputs`` (which
    must require gradients and be what ``logits`` were computed from), kept in the graph.

    Samples are independent (no batch statistics), so the gradient of the summed logits gives
    each sample its own gradient. ``output_scale``: a loss scale (fp16's GradScaler) by which the
    logits are multiplied before differentiating, so that small gradients do not underflow in
    half precision; the gradient is divided by it again before squaring.
    """
    (gradient,) = torch.autograd.grad(logits.float().sum() * output_scale, inputs,
                                      create_graph=True)
    gradient = gradient.float() / output_scale
    return gradient.square().flatten(1).sum(dim=1)


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
