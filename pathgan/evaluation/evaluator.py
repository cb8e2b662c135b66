"""Scoring: two feature sets -> the statistics of :mod:`pathgan.evaluation.metrics`, the same on
every rank.

:func:`score_features` computes (on rank 0, then broadcast) the figures that ``pathgan eval``
reports (:mod:`pathgan.evaluation.report`) and the training loop logs; it writes nothing.
:class:`InLoopEvaluator` is the evaluation of the training loop: the real features are computed
once, then each call scores a generator module.
"""

import math
from pathlib import Path

import torch

from pathgan.core.errors import PathganError
from pathgan.encoders import Encoder, load_encoder
from pathgan.evaluation.features import (
    DEFAULT_BATCH_SIZE,
    ENCODER,
    INCEPTION,
    SWD,
    RealSet,
    encoder_extractor,
    fake_features,
    real_features,
    select_real,
    swd_extractor,
)
from pathgan.evaluation.metrics import (
    compare_features,
    frechet_distance,
    sliced_wasserstein_distance,
)
from pathgan.evaluation.ranks import broadcast, make_state

DEFAULT_ENCODER = "timm:vit_small_patch16_224"
INCEPTION_KEY = "fid_inception"


def eval_encoder_spec(eval_encoder: str | None, model_encoder: str | None,
                      default: str | None = DEFAULT_ENCODER) -> str | None:
    """The encoder an evaluation uses: ``eval.encoder``, else ``model.encoder``, else default."""
    return eval_encoder or model_encoder or default


def load_eval_encoder(spec_or_encoder, device, state):
    """The encoder of an evaluation: given, or loaded (downloaded once, by the main process)."""
    if isinstance(spec_or_encoder, Encoder):
        return spec_or_encoder
    with state.main_process_first():  # one download into the cache, the others read it
        return load_encoder(str(spec_or_encoder), device=device)


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def score_features(real: dict, fake: dict, state, *, k: int, subsets: int, subset_size: int,
                   seed: int) -> dict:
    """Statistics of every extractor's features, computed on rank 0 and sent to every rank
    (non-finite figures as None)."""
    result, error = None, None
    if state.is_main_process:
        try:
            result = compare_features(real[ENCODER], fake[ENCODER], k=k, subsets=subsets,
                                      subset_size=subset_size, seed=seed)
            result.update(sliced_wasserstein_distance(real[SWD], fake[SWD], seed=seed))
            if INCEPTION in real:
                result[INCEPTION_KEY] = frechet_distance(real[INCEPTION], fake[INCEPTION])
            result = {key: _finite(value) for key, value in result.items()}
            result["swd_levels"] = {size: _finite(value)
                                    for size, value in result["swd_levels"].items()}
        except ValueError as problem:  # too few samples: every rank must hear of it, not hang
            error = str(problem)
    result, error = broadcast((result, error), state)
    if error:
        raise PathganError(f"cannot score the samples: {error}")
    return result


class InLoopEvaluator:
    """Scores a generator against cached real features, for evaluation every N training steps.

    ``evaluator = InLoopEvaluator(shards_dir, split=None, encoder=spec_or_Encoder, n=256,
    device=accelerator.device)``; then ``metrics = evaluator(generator)`` on **every** rank (the
    work is split across ranks and gathered; all ranks get the same dict):
    ``{"fd", "kid_mean", "kid_std", "precision", "recall", "swd", "swd_levels", "n", "n_real",
    "encoder", "real_split"}``. Pass the unwrapped (or EMA) generator; its train/eval mode is
    restored.
    The real features are computed on the first call (or by :meth:`prepare`) and kept; the
    fake noise is the same at every call, so successive figures are comparable.
    """

    def __init__(self, real_shards: str | Path, split: str | None = None, encoder=None,
                 n: int = 256, device=None, *, seed: int = 0,
                 batch_size: int = DEFAULT_BATCH_SIZE, k: int = 3, subsets: int = 100,
                 subset_size: int = 1000, num_workers: int = 0) -> None:
        self.state = make_state()
        self.device = torch.device(device) if device is not None else self.state.device
        self.real_shards = Path(real_shards)
        self.requested_split = split
        self.encoder = load_eval_encoder(encoder or DEFAULT_ENCODER, self.device, self.state)
        self.n, self.seed, self.batch_size = int(n), int(seed), int(batch_size)
        self.k, self.subsets, self.subset_size = k, subsets, subset_size
        self.num_workers = num_workers
        self.extractors = [encoder_extractor(self.encoder), swd_extractor(self.n, self.seed)]
        self.real: RealSet | None = None
        self._real_features: dict | None = None

    def prepare(self) -> "InLoopEvaluator":
        """Draw the real samples and compute (or read) their features, once."""
        if self._real_features is None:
            self.real = select_real(self.real_shards, self.n, self.seed, self.requested_split)
            self._real_features = real_features(self.real, self.extractors, self.state,
                                                batch_size=self.batch_size,
                                                num_workers=self.num_workers)
        return self

    def __call__(self, generator: torch.nn.Module) -> dict:
        self.prepare()
        fake = fake_features(generator, self.n, self.extractors, self.state, seed=self.seed,
                             batch_size=self.batch_size)
        result = score_features(self._real_features, fake, self.state, k=self.k,
                                subsets=self.subsets, subset_size=self.subset_size,
                                seed=self.seed)
        return {**result, "encoder": self.encoder.encoder_id, "real_split": self.real.split}


