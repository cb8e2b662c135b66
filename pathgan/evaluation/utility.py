"""Downstream utility: would a generator's labelled patches train a tissue classifier?

The Classification Accuracy Score protocol (Ravuri & Vinyals 2019) with one small, fixed
classifier: a frozen encoder (any encoder spec, as for ``pathgan eval``) and a linear softmax
head fitted by L-BFGS on standardised features with a fixed L2 penalty. It is trained three ways,
and each is tested on the real **val** split, whose groups never fed the generator:

- ``real``: the real train split;
- ``synthetic``: generated patches only, as many per class as the real train split has (CAS);
- ``real+synthetic``: both together.

One more figure answers "are the generated classes recognisable?": the ``real`` classifier
tested on the generated patches (GAN-test, Shmelkov et al. 2018).

Seeds: each seed draws a bootstrap of the real train split (per class, so proportions stay) and
a new synthetic set. The head's loss is convex, so the same data gives the same head: the spread
over seeds is that of the data the classifier saw, not of its optimisation.
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_accuracy,
    multiclass_auroc,
)

L2_PENALTY = 1e-3  # on the mean cross-entropy; features are standardised
LBFGS_STEPS = 200
WAYS = ("real", "synthetic", "real+synthetic")


@dataclass
class LinearHead:
    """A softmax classifier on standardised features."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (D, classes)
    bias: torch.Tensor

    @torch.no_grad()
    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        logits = ((features - self.mean) / self.std) @ self.weight + self.bias
        return logits.softmax(dim=1)


def fit_linear_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                    l2_penalty: float = L2_PENALTY, steps: int = LBFGS_STEPS) -> LinearHead:
    """The L2-penalised softmax regression of ``labels`` on ``features`` (float32 (N, D)),
    fitted to convergence by full-batch L-BFGS: deterministic for given data."""
    features = features.double()
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    inputs = (features - mean) / std
    weight = torch.zeros(inputs.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = functional.cross_entropy(inputs @ weight + bias, labels)
        loss = loss + l2_penalty * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return LinearHead(mean.float(), std.float(), weight.detach().float(), bias.detach().float())


def classification_scores(probabilities: torch.Tensor, labels: torch.Tensor,
                          num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy (the mean of per-class recalls) and AUROC (of the second
    class for two classes, else the macro one-vs-rest mean) of predicted class probabilities."""
    accuracy = (probabilities.argmax(1) == labels).float().mean()
    balanced = multiclass_accuracy(probabilities, labels, num_classes, average="macro")
    if num_classes == 2:
        auroc = binary_auroc(probabilities[:, 1], labels)
    else:
        auroc = multiclass_auroc(probabilities, labels, num_classes, average="macro")
    return {"accuracy": float(accuracy), "balanced_accuracy": float(balanced),
            "auroc": float(auroc)}


def bootstrap_rows(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """Row indices of a bootstrap draw made per class (each class keeps its count)."""
    rng = np.random.default_rng(seed)
    rows = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten().numpy()
        rows.append(rng.choice(members, size=len(members), replace=True))
    return torch.from_numpy(np.sort(np.concatenate(rows)))


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max of a figure over seeds."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "min": float(array.min()),
            "max": float(array.max())}
