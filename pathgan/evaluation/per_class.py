"""Per-class scores of a conditional generator (``pathgan eval`` on a run whose ``generator.json``
lists classes).

The generated set is drawn in the real draw's class proportions (:func:`class_matched_labels`),
so the overall figures compare like with like, and each class's generated samples are scored
against the real samples of that class (:func:`per_class_scores`): FD, KID, precision/recall in
the encoder's space and SWD on pixels, the same statistics as the overall ones. A class with
fewer than ``k + 1`` samples on a side gets its counts and a note instead.
"""

import torch

from pathgan.evaluation.evaluator import score_features
from pathgan.evaluation.features import ENCODER, SWD
from pathgan.models.generation import class_shares


def class_matched_labels(real_labels: list, classes: list[str], n: int) -> torch.Tensor | None:
    """Class codes of ``n`` generated samples in the proportions of the real draw's labels (in
    blocks of one class), or None when no real sample has one of the generator's classes."""
    counts = [sum(label == name for label in real_labels) for name in classes]
    if not any(counts):
        return None
    return torch.cat([torch.full((share,), code, dtype=torch.long)
                      for code, share in enumerate(class_shares(n, counts))])


def per_class_scores(real: dict, real_labels: list, fake: dict, fake_labels: torch.Tensor,
                     classes: list[str], state, *, k: int, subsets: int, subset_size: int,
                     seed: int) -> dict:
    """``{class: scores}`` for each class (``scores`` as :func:`score_features` gives them,
    with ``n`` and ``n_real``; or only the counts and a ``note`` when a side has too few)."""
    found = {}
    for code, name in enumerate(classes):
        real_rows = torch.tensor([i for i, label in enumerate(real_labels) if label == name],
                                 dtype=torch.long)
        fake_rows = torch.nonzero(fake_labels == code).flatten()
        if min(len(real_rows), len(fake_rows)) < k + 1:
            found[name] = {"n": len(fake_rows), "n_real": len(real_rows),
                           "note": f"fewer than {k + 1} samples on a side: not scored"}
            continue
        found[name] = score_features(
            {view: real[view][real_rows] for view in (ENCODER, SWD)},
            {view: fake[view][fake_rows] for view in (ENCODER, SWD)}, state, k=k,
            subsets=subsets, subset_size=subset_size, seed=seed)
    return found
