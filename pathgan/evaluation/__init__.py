"""How close generated patches are to held-out real ones, in an encoder's space and on pixels.

Used by ``pathgan eval`` (:mod:`~pathgan.evaluation.job`) and by the training loop every
``eval.every`` steps (:class:`~pathgan.evaluation.evaluator.InLoopEvaluator`). The metric math
is :mod:`pathgan.evaluation.metrics`; here, in the order the work flows:

- :mod:`~pathgan.evaluation.ranks`: which rank does which samples, gathering their rows,
  broadcasting rank 0's figures;
- :mod:`~pathgan.evaluation.features`: feature extractors (encoder, SWD descriptors, Inception),
  the real set and its features (precomputed embeddings when they exist), generated features;
- :mod:`~pathgan.evaluation.evaluator`: scoring two feature sets, and the in-loop evaluator;
- :mod:`~pathgan.evaluation.job`: ``pathgan eval`` itself, runs in, ``eval.json`` and grids out;
- :mod:`~pathgan.evaluation.report`: ``eval.json`` and ``report.md`` from the figures.

The names below are the package's public interface.
"""

from pathgan.evaluation.evaluator import (
    DEFAULT_ENCODER,
    InLoopEvaluator,
    eval_encoder_spec,
    score_features,
)
from pathgan.evaluation.features import (
    RealSet,
    fake_features,
    inception_extractor,
    real_features,
    real_split,
    resolve_inception_weights,
    select_real,
    swd_extractor,
)
from pathgan.evaluation.job import FORMAT, default_encoder_spec, evaluate_runs
from pathgan.evaluation.ranks import make_state, rank_slice

__all__ = ["DEFAULT_ENCODER", "FORMAT", "InLoopEvaluator", "RealSet", "default_encoder_spec",
           "eval_encoder_spec", "evaluate_runs", "fake_features", "inception_extractor",
           "make_state", "rank_slice", "real_features", "real_split", "resolve_inception_weights",
           "score_features", "select_real", "swd_extractor"]
