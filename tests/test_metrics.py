"""The statistics of pathgan.evaluation.metrics on synthetic feature sets (no images, no models)."""

import pytest
import torch

from pathgan.evaluation.metrics import (
    compare_features,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)

DIM = 16


def gaussian(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)) + shift


@pytest.fixture(scope="module")
def real():
    return gaussian(400, seed=0)


def test_frechet_distance_of_a_set_with_itself_is_zero(real):
    assert abs(frechet_distance(real, real)) < 1e-8


def test_frechet_distance_grows_with_a_mean_shift(real):
    distances = [frechet_distance(real, gaussian(400, seed=1, shift=s)) for s in (0, .25, .5, 1, 2)]
    assert distances == sorted(distances) and distances[0] < distances[-1]
    # a pure mean shift adds ||shift||^2 = DIM * s^2 to the distance
    shift = frechet_distance(real, real + 1.0)
    assert shift == pytest.approx(DIM, rel=1e-6)


def test_kid_is_near_zero_for_one_distribution_and_agrees_in_sign(real):
    same, same_std = kernel_inception_distance(real, gaussian(400, seed=1), subsets=20,
                                               subset_size=100)
    shifted, _ = kernel_inception_distance(real, gaussian(400, seed=1, shift=1.0), subsets=20,
                                           subset_size=100)
    further, _ = kernel_inception_distance(real, gaussian(400, seed=1, shift=2.0), subsets=20,
                                           subset_size=100)
    assert abs(same) < 0.05 and same_std >= 0
    assert 0 < shifted < further and shifted > 10 * abs(same)


def test_kid_subsets_are_reproducible(real):
    fake = gaussian(400, seed=2, shift=0.5)
    first = kernel_inception_distance(real, fake, subsets=10, subset_size=50, seed=3)
    assert kernel_inception_distance(real, fake, subsets=10, subset_size=50, seed=3) == first
    # a subset larger than the sets is not an error; it shrinks to half the smaller set, so
    # that subsets differ and the std means something
    mean, std = kernel_inception_distance(real[:30], fake[:40], subsets=10, subset_size=1000)
    assert mean > 0 and std > 0


def test_precision_recall_identical_disjoint_and_partial(real):
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # the fake set covers only half of the real one: high precision, recall about one half
    half = real[real[:, 0] > 0]
    precision, recall = precision_recall(real, half)
    assert precision > 0.95 and 0.2 < recall < 0.8


def test_compare_features_keys_and_shape_checks(real):
    result = compare_features(real, gaussian(300, seed=4), subsets=5, subset_size=50)
    assert set(result) == {"fd", "kid_mean", "kid_std", "precision", "recall", "n", "n_real"}
    assert result["n"] == 300 and result["n_real"] == 400
    with pytest.raises(ValueError):
        frechet_distance(real, torch.zeros(10, DIM + 1))
    with pytest.raises(ValueError):
        precision_recall(real, real[:3], k=3)


def test_frechet_distance_agrees_with_torchmetrics():
    from torchmetrics.image.fid import FrechetInceptionDistance

    from pathgan.evaluation.metrics import _Precomputed

    real, fake = gaussian(200, seed=5), gaussian(150, seed=6, shift=0.3) * 1.5
    metric = FrechetInceptionDistance(feature=_Precomputed(DIM)).set_dtype(torch.float64)
    metric.update(real.double(), real=True)
    metric.update(fake.double(), real=False)
    assert frechet_distance(real, fake) == pytest.approx(float(metric.compute()), rel=1e-6)
    # fewer samples than dimensions (singular covariances) still gives about 0 for a set itself
    few = torch.randn(10, 64, generator=torch.Generator().manual_seed(7))
    assert abs(frechet_distance(few, few)) < 1e-6 * frechet_distance(few, few + 1.0)
