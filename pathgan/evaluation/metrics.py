"""Sample-quality statistics on feature tensors: Fréchet distance, KID, k-NN precision/recall.

Every function takes two float tensors of features, ``real (n, D)`` and ``fake (m, D)``, made by
the same encoder (Path Foundation, a timm backbone, or Inception for the classic FID), and
knows nothing of images, generators or ranks (:mod:`pathgan.evaluation` does that part):

- :func:`frechet_distance`: the Fréchet distance between Gaussians fitted to both sets
  (FID when the features are Inception's); the same formula as torchmetrics'
  ``FrechetInceptionDistance`` (a test checks they agree) through a symmetric eigensolver,
  since its ``eigvals`` of a non-symmetric product takes minutes at D = 2048 on a CPU.
- :func:`kernel_inception_distance`: the unbiased squared MMD with the polynomial kernel
  ``(x.y / D + 1) ** 3``, averaged over random subsets (Bińkowski et al. 2018); torchmetrics'
  ``KernelInceptionDistance``, with a seeded subset draw so that a figure can be reproduced.
- :func:`precision_recall`: improved precision and recall (Kynkäänniemi et al. 2019): a sample is
  inside a set's manifold when it lies within the distance from some member to that member's
  k-th nearest neighbour. Precision: share of fake samples inside the real manifold (fidelity);
  recall: share of real samples inside the fake manifold (coverage).

- :func:`sliced_wasserstein_distance`: SWD on Laplacian-pyramid descriptors (Karras et al. 2018,
  "Progressive Growing of GANs", section 5 and appendix D): a quality measure on pixels that needs
  no downloaded weights. :func:`laplacian_descriptors` turns images into its features: 7x7
  neighbourhoods of every pyramid level from 224 px down to the coarsest level of at least 16 px.
- :func:`upsampling_artefact`: on images too; how far their mean power spectrum peaks at a
  generator's resampling periods (2 to 32 px), the lattice a transposed convolution draws.

Lower FD, KID and SWD are better (0: same distribution); higher precision and recall are better.
FD, KID and precision/recall are computed in float64 on the features' device.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DEFAULT_K", "DEFAULT_SUBSET_SIZE", "DEFAULT_SUBSETS", "compare_features",
           "frechet_distance", "frechet_distance_from_statistics", "gaussian_statistics",
           "kernel_inception_distance", "laplacian_descriptors", "precision_recall",
           "pyramid_sizes", "sliced_wasserstein_distance"]

DEFAULT_SUBSETS = 100
DEFAULT_SUBSET_SIZE = 1000
DEFAULT_K = 3
_ROWS_PER_BLOCK = 4096  # rows of a distance matrix computed at once (bounds memory)


class _Precomputed(nn.Module):
    """The 'feature extractor' handed to torchmetrics when the features are already computed."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def _check(real: torch.Tensor, fake: torch.Tensor, minimum: int = 2) -> tuple:
    real, fake = torch.as_tensor(real), torch.as_tensor(fake)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected features (n, D) and (m, D), got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    if len(real) < minimum or len(fake) < minimum:
        raise ValueError(f"need at least {minimum} samples per side, got {len(real)} real and "
                         f"{len(fake)} fake")
    fake = fake.to(real.device)
    return real.double(), fake.double()


def gaussian_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D) of features (n, D), in float64."""
    features = torch.as_tensor(features).double()
    mean = features.mean(dim=0)
    centred = features - mean
    return mean, centred.T @ centred / (len(features) - 1)


def frechet_distance_from_statistics(mean1: torch.Tensor, cov1: torch.Tensor,
                                     mean2: torch.Tensor, cov2: torch.Tensor) -> float:
    """``||m1 - m2||^2 + Tr(C1) + Tr(C2) - 2 Tr((C1 C2)^(1/2))``.

    The trace of the root is taken from the eigenvalues of ``C1^(1/2) C2 C1^(1/2)`` (symmetric,
    positive semi-definite, the same eigenvalues as ``C1 C2``) with ``eigh``: the same value as
    torchmetrics' ``eigvals(C1 @ C2)``, 10-100x faster at D = 1024-2048 on a CPU and stable when
    the covariances are singular (fewer samples than dimensions).
    """
    values, vectors = torch.linalg.eigh(cov1)
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    middle = root @ cov2 @ root
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mean1 - mean2).square().sum() + cov1.trace() + cov2.trace() - 2 * trace_root
    return float(distance)


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``real`` (n, D) and ``fake`` (m, D); 0 (up
    to rounding) for identical sets. FID when the features are Inception's."""
    real, fake = _check(real, fake)
    return frechet_distance_from_statistics(*gaussian_statistics(real),
                                            *gaussian_statistics(fake))


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor,
                              subsets: int = DEFAULT_SUBSETS,
                              subset_size: int = DEFAULT_SUBSET_SIZE,
                              seed: int = 0) -> tuple[float, float]:
    """KID (polynomial-kernel MMD², unbiased) as ``(mean, std)`` over ``subsets`` random subsets
    of ``subset_size`` samples per side (half the smaller set when that set is not larger).
    ~0 (can be slightly negative) for one distribution; grows as the sets differ. ``seed`` fixes
    the subset draw.
    """
    from torchmetrics.image.kid import KernelInceptionDistance  # here: slow to import

    real, fake = _check(real, fake)
    smaller = min(len(real), len(fake))
    # Subsets as large as a whole set would all be that set: the std would be 0, meaningless.
    subset_size = int(subset_size) if subset_size < smaller else max(2, smaller // 2)
    with warnings.catch_warnings():  # "will save all extracted features in buffer": we know
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subsets=subsets,
                                         subset_size=subset_size, sync_on_compute=False)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # the subsets are drawn with the global CPU RNG
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def _kth_neighbour_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each sample to its k-th nearest neighbour in the same set (self excluded)."""
    radii = []
    for block in features.split(_ROWS_PER_BLOCK):
        distances = torch.cdist(block, features)
        # the k+1-th smallest: the sample itself is at distance 0
        radii.append(distances.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _inside_manifold(queries: torch.Tensor, support: torch.Tensor,
                     radii: torch.Tensor) -> torch.Tensor:
    """For each query: is it within ``radii[j]`` of some ``support[j]``?"""
    inside = []
    for block in queries.split(_ROWS_PER_BLOCK):
        inside.append((torch.cdist(block, support) <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: torch.Tensor, fake: torch.Tensor,
                     k: int = DEFAULT_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN manifolds.

    Returns ``(precision, recall)`` in [0, 1]: 1 and 1 for identical sets, 0 and 0 for sets far
    apart. Each set needs more than ``k`` samples.
    """
    real, fake = _check(real, fake, minimum=k + 1)
    real_radii = _kth_neighbour_radii(real, k)
    fake_radii = _kth_neighbour_radii(fake, k)
    precision = _inside_manifold(fake, real, real_radii).double().mean()
    recall = _inside_manifold(real, fake, fake_radii).double().mean()
    return float(precision), float(recall)


def compare_features(real: torch.Tensor, fake: torch.Tensor, *,
                     subsets: int = DEFAULT_SUBSETS, subset_size: int = DEFAULT_SUBSET_SIZE,
                     k: int = DEFAULT_K, seed: int = 0) -> dict:
    """Every statistic at once: ``{"fd", "kid_mean", "kid_std", "precision", "recall", "n",
    "n_real"}`` (``n``: fake samples, ``n_real``: real samples)."""
    real, fake = _check(real, fake, minimum=k + 1)
    kid_mean, kid_std = kernel_inception_distance(real, fake, subsets, subset_size, seed)
    precision, recall = precision_recall(real, fake, k)
    return {"fd": frechet_distance(real, fake), "kid_mean": kid_mean, "kid_std": kid_std,
            "precision": precision, "recall": recall, "n": len(fake), "n_real": len(real)}


# -- sliced Wasserstein distance on Laplacian pyramids -------------------------------------------
SWD_NEIGHBOURHOOD = 7  # descriptor: a 7x7 neighbourhood of one pyramid level, 3 channels
SWD_MIN_LEVEL_SIZE = 16  # the coarsest level kept is the last one at least this many pixels
SWD_DESCRIPTORS_PER_LEVEL = 65536  # per set: caps memory; Karras et al. drew 128 per image
SWD_MAX_PER_IMAGE = 128
SWD_DIRECTIONS = 512  # random projections per level (Karras et al.: 4 repeats x 128)
SWD_SCALE = 1e3  # reported x 1000, as in Karras et al.
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0  # cv2.pyrDown's 5-tap filter


def pyramid_sizes(image_size: int) -> list[int]:
    """Sizes of the pyramid levels: halving from ``image_size`` while at least 16 pixels."""
    sizes = [image_size]
    while sizes[-1] // 2 >= SWD_MIN_LEVEL_SIZE:
        sizes.append(sizes[-1] // 2)
    return sizes


def _blur(images: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """5x5 binomial filter with mirrored borders (``scipy``'s mode='mirror'), as two separable
    5-tap passes of shifted sums (faster on CPUs than a one-channel convolution)."""
    taps = (_BINOMIAL * gain ** 0.5).tolist()
    padded = F.pad(images, (2, 2, 2, 2), mode="reflect")
    height, width = images.shape[-2:]
    rows = sum(tap * padded[..., :, k:k + width] for k, tap in enumerate(taps))
    return sum(tap * rows[..., k:k + height, :] for k, tap in enumerate(taps))


def _pyramid_down(images: torch.Tensor) -> torch.Tensor:
    return _blur(images)[:, :, ::2, ::2]


def _pyramid_up(images: torch.Tensor) -> torch.Tensor:
    n, c, h, w = images.shape
    spread = images.new_zeros((n, c, 2 * h, 2 * w))
    spread[:, :, ::2, ::2] = images
    return _blur(spread, gain=4.0)


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Band-pass levels, finest first; the last level is the low-pass residual."""
    pyramid = [images.float()]
    for _ in range(1, levels):
        pyramid.append(_pyramid_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - _pyramid_up(pyramid[-1])
    return pyramid


def descriptors_per_image(count: int) -> int:
    """Neighbourhoods drawn per image and level for a set of ``count`` images."""
    return max(1, min(SWD_MAX_PER_IMAGE, SWD_DESCRIPTORS_PER_LEVEL // max(count, 1)))


def neighbourhood_centres(index: int, level: int, size: int, per_image: int,
                          seed: int) -> torch.Tensor:
    """Neighbourhood centres (per_image, 2) of image ``index`` at one level: a function of
    (seed, index, level) alone, so the descriptors do not depend on batching or ranks."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 16 + level)
    half = SWD_NEIGHBOURHOOD // 2
    return torch.randint(half, size - half, (per_image, 2), generator=generator)


def laplacian_descriptors(images: torch.Tensor, indices, per_image: int,
                          seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] (N, 3, H, W) -> SWD descriptors, one row per image:
    ``(N, levels * per_image * 3 * 7 * 7)`` float32. ``indices`` are the images' positions in
    their set (they seed where the neighbourhoods are drawn)."""
    sizes = pyramid_sizes(images.shape[-1])
    pyramid = laplacian_pyramid(images, len(sizes))
    half = SWD_NEIGHBOURHOOD // 2
    offsets = torch.arange(-half, half + 1)
    rows = []
    for level, band in enumerate(pyramid):
        centres = torch.stack([
            neighbourhood_centres(int(i), level, band.shape[-1], per_image, seed)
            for i in indices]).to(band.device)  # (N, P, 2): y, x
        ys = (centres[..., 0, None, None] + offsets[:, None].to(band.device))  # (N, P, 7, 1)
        xs = (centres[..., 1, None, None] + offsets[None, :].to(band.device))  # (N, P, 1, 7)
        batch = torch.arange(len(band), device=band.device)[:, None, None, None]
        patches = band.permute(0, 2, 3, 1)[batch, ys, xs]  # (N, P, 7, 7, 3)
        rows.append(patches.permute(0, 1, 4, 2, 3).reshape(len(band), -1))
    return torch.cat(rows, dim=1)


def _level_descriptors(rows: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Per-image descriptor rows -> one (N * per_image, 3, 7, 7) tensor per level."""
    size = 3 * SWD_NEIGHBOURHOOD ** 2
    per_level = rows.reshape(len(rows), levels, -1, size)
    return [per_level[:, level].reshape(-1, 3, SWD_NEIGHBOURHOOD, SWD_NEIGHBOURHOOD)
            for level in range(levels)]


def _sliced_wasserstein(real: torch.Tensor, fake: torch.Tensor, directions: int,
                        generator: torch.Generator) -> float:
    """Mean over random unit directions of the 1-D Wasserstein distance of the projections."""
    count = min(len(real), len(fake))  # the sorted projections are compared rank by rank
    real = real[torch.randperm(len(real), generator=generator)[:count]]
    fake = fake[torch.randperm(len(fake), generator=generator)[:count]]
    unit = torch.randn(real.shape[1], directions, generator=generator, dtype=torch.float64)
    unit = (unit / unit.norm(dim=0, keepdim=True)).to(real)
    # (directions, count), contiguous: sorting along the last dimension is the fast one
    projected_real = torch.sort((real @ unit).T.contiguous(), dim=1).values
    projected_fake = torch.sort((fake @ unit).T.contiguous(), dim=1).values
    return float((projected_real - projected_fake).abs().mean())


def sliced_wasserstein_distance(real: torch.Tensor, fake: torch.Tensor, image_size: int = 224,
                                *, directions: int = SWD_DIRECTIONS, seed: int = 0) -> dict:
    """SWD between two sets of :func:`laplacian_descriptors` rows (same per-image count).

    Each level's descriptors are normalised per channel with the *real* set's mean and standard
    deviation (applied to both sets, so that a colour shift counts), flattened to 147-d, and
    compared along ``directions`` seeded random directions. Returns ``{"swd": mean over levels,
    "swd_levels": {level size: value}}``, both x 1000 as in Karras et al.; 0 for identical sets.
    """
    real, fake = torch.as_tensor(real).float(), torch.as_tensor(fake).float().to(real.device)
    if real.ndim != 2 or real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"expected descriptor rows of one shape, got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    sizes = pyramid_sizes(image_size)
    generator = torch.Generator().manual_seed(seed)
    levels = {}
    for size, real_level, fake_level in zip(sizes, _level_descriptors(real, len(sizes)),
                                            _level_descriptors(fake, len(sizes)), strict=True):
        mean = real_level.mean(dim=(0, 2, 3), keepdim=True)
        std = real_level.std(dim=(0, 2, 3), correction=0, keepdim=True).clamp_min(1e-8)
        normalised = [((level - mean) / std).flatten(1) for level in (real_level, fake_level)]
        levels[size] = SWD_SCALE * _sliced_wasserstein(*normalised, directions, generator)
    return {"swd": sum(levels.values()) / len(levels), "swd_levels": levels}


def swd_descriptor_dim(image_size: int, per_image: int) -> int:
    return len(pyramid_sizes(image_size)) * per_image * 3 * SWD_NEIGHBOURHOOD ** 2


# --- the upsampling-artefact figure ------------------------------------------------------
# How far the mean power spectrum of a set of images peaks at
# the periods a generator resamples at, against the spectrum around those frequencies.
#
# A generator that doubles its resolution five times (7 -> 224 px) with strided transposed
# convolutions repeats a pattern every 2, 4, 8, 16 and 32 pixels (Odena et al. 2016): its samples'
# power spectrum has sharp peaks at the frequencies ``k * size / period``. Real patches have a
# smooth spectrum there. Per period, the figure is the largest ratio, over that period's peak
# frequencies, of the mean power at the peak to the median power of the ring of frequencies
# around it; the set's figure is the largest over the periods. Real patches are the floor (1.5
# to 2 for 64 patches: the largest of a few hundred ratios of one frequency to its ring's median);
# a visible lattice is hundreds or thousands. A period's own frequencies are those that a lattice
# of half that period does not have; a lattice also has harmonics at the frequencies of the
# shorter periods, so the period named is where the strongest peak is, which for dots smaller
# than the lattice's spacing may be a shorter period than the lattice's own.
#
# Images are made zero-mean and multiplied by a 2-D Hann window before the FFT, so that the
# border's discontinuity (the FFT sees the image as tiled) does not smear power along the axes;
# a windowed pure tone then spreads over its bin and the adjacent ones, which the ring leaves out.


RESAMPLING_PERIODS = (2, 4, 8, 16, 32)  # pixels: five 2x upsamplings, 7 -> 224 px
RING = (2, 4)  # the neighbourhood: frequencies 2 to 4 bins away (Chebyshev distance)


def mean_power_spectrum(images: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W), any range -> the power spectrum averaged over images and channels,
    (H, W), zero frequency at [0, 0]."""
    images = images.double()
    images = images - images.mean(dim=(-2, -1), keepdim=True)
    height, width = images.shape[-2:]
    window = torch.outer(torch.hann_window(height, periodic=False, dtype=torch.float64),
                         torch.hann_window(width, periodic=False, dtype=torch.float64))
    power = torch.fft.fft2(images * window.to(images.device)).abs().square()
    return power.mean(dim=(0, 1)).cpu()


def peak_frequencies(size: int, period: int) -> list[tuple[int, int]]:
    """Frequency bins (row, column) of a lattice of ``period`` pixels that no lattice of half
    the period has: ``(a, b) * size / period`` with ``a`` or ``b`` odd. One of each pair of
    mirrored frequencies (a real image's spectrum is symmetric)."""
    step = size / period
    peaks = set()
    for a in range(period):
        for b in range(period):
            if a % 2 or b % 2:
                row, column = round(a * step) % size, round(b * step) % size
                mirror = ((-row) % size, (-column) % size)
                if mirror not in peaks:
                    peaks.add((row, column))
    return sorted(peaks)


def peak_ratio(spectrum: torch.Tensor, row: int, column: int) -> float:
    """Power at one frequency over the median power of its ring (periodic in both axes)."""
    size_y, size_x = spectrum.shape
    inner, outer = RING
    offsets = [(dy, dx) for dy in range(-outer, outer + 1) for dx in range(-outer, outer + 1)
               if max(abs(dy), abs(dx)) >= inner]
    ring = torch.stack([spectrum[(row + dy) % size_y, (column + dx) % size_x]
                        for dy, dx in offsets])
    return float(spectrum[row, column] / ring.median().clamp_min(1e-300))


def upsampling_artefact(images: torch.Tensor,
                        periods: tuple[int, ...] = RESAMPLING_PERIODS) -> dict:
    """``{"peak": the largest ratio, "period": where it is, "periods": {period: ratio}}`` of a
    set of square images (N, C, H, W)."""
    size = images.shape[-1]
    if images.ndim != 4 or images.shape[-2] != size:
        raise ValueError(f"expected square images (N, C, H, W), got {tuple(images.shape)}")
    spectrum = mean_power_spectrum(images)
    figures = {period: max(peak_ratio(spectrum, row, column)
                           for row, column in peak_frequencies(size, period))
               for period in periods if period <= size}
    worst = max(figures, key=figures.get)
    return {"peak": figures[worst], "period": worst, "periods": figures}
