"""The upsampling-artefact figure (pathgan.evaluation.spectrum) and the grid-variety read
(bench/grid_variety.py) on synthetic images."""

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from PIL import Image

from pathgan.core.images import grid_tiles, save_image_grid, signed_to_uint8
from pathgan.evaluation.metrics import peak_frequencies, upsampling_artefact

SIZE = 224


def smooth_images(count: int = 32, seed: int = 0) -> torch.Tensor:
    """Tissue-like stand-ins: white noise blurred at several scales (a smooth spectrum)."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 3, SIZE, SIZE)
    for scale in (2, 8, 32):
        noise = torch.randn(count, 3, SIZE // scale + 2, SIZE // scale + 2, generator=generator)
        images += F.interpolate(noise, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    return torch.tanh(images / 3)


def dot_lattice(period: int) -> torch.Tensor:
    """A dot every ``period`` pixels in both directions, as a transposed convolution draws it:
    Gaussian dots (sigma 1 px), so that the fundamental frequency is the strongest."""
    offsets = (torch.arange(SIZE) % period - period // 2).float()
    profile = torch.exp(-offsets ** 2 / 2)
    return torch.outer(profile, profile)


def test_peak_frequencies_are_the_lattice_bins_that_half_the_period_does_not_have():
    assert peak_frequencies(SIZE, 2) == [(0, 112), (112, 0), (112, 112)]
    four = peak_frequencies(SIZE, 4)
    assert (0, 56) in four and (56, 56) in four and (112, 112) not in four
    assert len(four) == 6  # 12 bins with an odd coordinate, each with its mirror image
    assert all(row % 28 == 0 and column % 28 == 0 for row, column in peak_frequencies(SIZE, 8))


def test_smooth_images_sit_near_the_floor():
    figure = upsampling_artefact(smooth_images())
    assert figure["peak"] < 3.0
    assert set(figure["periods"]) == {2, 4, 8, 16, 32}


@pytest.mark.parametrize("period", [4, 8])
def test_a_faint_planted_lattice_stands_out_at_its_period(period):
    images = smooth_images()
    with_lattice = images + 0.2 * dot_lattice(period)  # dots of 10% of the range
    clean, marked = upsampling_artefact(images), upsampling_artefact(with_lattice)
    assert marked["period"] == period
    assert marked["peak"] > 20 * clean["peak"]
    assert marked["periods"][period] > 20 * clean["periods"][period]


def test_a_lattice_is_found_whatever_its_phase_and_images_must_be_square():
    shifted = smooth_images(8) + 0.1 * torch.roll(dot_lattice(8), shifts=(3, 5), dims=(0, 1))
    assert upsampling_artefact(shifted)["period"] == 8
    with pytest.raises(ValueError, match="square"):
        upsampling_artefact(torch.zeros(2, 3, 224, 112))


def test_grid_variety_is_zero_for_one_picture_and_reads_the_runs_grid_layout(tmp_path):
    """grid_tiles gives back the tiles save_image_grid wrote, and bench/grid_variety.py reads them:
    one picture repeated is no variety at all, varied pictures are."""
    sys.path.insert(0, str(REPO / "bench"))
    from grid_variety import variety

    varied = signed_to_uint8(smooth_images(16))
    save_image_grid(varied, tmp_path / "varied.png", nrow=4)
    save_image_grid(varied[:1].expand(16, -1, -1, -1), tmp_path / "collapsed.png", nrow=4)
    tiles = grid_tiles(np.asarray(Image.open(tmp_path / "varied.png")), SIZE)
    assert len(tiles) == 16
    assert all(np.array_equal(tile, image.permute(1, 2, 0).numpy())
               for tile, image in zip(tiles, varied, strict=True))
    assert variety(str(tmp_path / "collapsed.png")) == 0
    assert variety(str(tmp_path / "varied.png")) > 5
