"""The upsampling-artefact figure: how far the mean power spectrum of a set of images peaks at
the periods a generator resamples at, against the spectrum around those frequencies.

A generator that doubles its resolution five times (7 -> 224 px) with strided transposed
convolutions repeats a pattern every 2, 4, 8, 16 and 32 pixels (Odena et al. 2016): its samples'
power spectrum has sharp peaks at the frequencies ``k * size / period``. Real patches have a
smooth spectrum there. Per period, the figure is the largest ratio, over that period's peak
frequencies, of the mean power at the peak to the median power of the ring of frequencies
around it; the set's figure is the largest over the periods. Real patches are the floor (1.5
to 2 for 64 patches: the largest of a few hundred ratios of one frequency to its ring's median);
a visible lattice is hundreds or thousands. A period's own frequencies are those that a lattice
of half that period does not have; a lattice also has harmonics at the frequencies of the
shorter periods, so the period named is where the strongest peak is, which for dots smaller
than the lattice's spacing may be a shorter period than the lattice's own.

Images are made zero-mean and multiplied by a 2-D Hann window before the FFT, so that the
border's discontinuity (the FFT sees the image as tiled) does not smear power along the axes;
a windowed pure tone then spreads over its bin and the adjacent ones, which the ring leaves out.
"""

import torch

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
