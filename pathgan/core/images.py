"""The one place where images change range or layout.

The generator's Tanh output, the training pipeline, the encoders and every PNG writer go
through these functions, so a patch means the same thing at every stage (the original study
mapped Tanh outputs with ``clamp(0, 1)``; that bug cannot recur if nobody converts by hand).
"""

import numpy as np
import torch
from PIL import Image

from pathgan.core.fileio import atomic_path


def uint8_to_signed(images: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) in [0, 255] -> float32 in [-1, 1]: ToTensor + Normalize(0.5, 0.5)."""
    return images.float().div_(127.5).sub_(1.0)


def signed_to_unit(images: torch.Tensor) -> torch.Tensor:
    """Generator space [-1, 1] -> [0, 1], what Path Foundation and torchvision grids expect."""
    return (images + 1.0) * 0.5


def signed_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (N, 3, H, W) -> uint8 in [0, 255], rounded, for PNGs and shards."""
    return signed_to_unit(images.detach().float()).clamp_(0.0, 1.0).mul_(255.0).round_().to(
        torch.uint8
    )


def hwc_to_chw(array: np.ndarray) -> torch.Tensor:
    """A decoded HxWx3 uint8 array -> a 3xHxW uint8 tensor (no copy of the pixels)."""
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


GRID_PADDING = 2  # white pixels around every tile of a saved grid


def save_image_grid(images: torch.Tensor, path, nrow: int = 8) -> None:
    """Save uint8 (N, 3, H, W) images as one PNG grid, written atomically."""
    from torchvision.utils import make_grid  # torchvision is slow to import; only here

    grid = make_grid(images, nrow=nrow, padding=GRID_PADDING, pad_value=255)
    with atomic_path(path) as temporary:
        Image.fromarray(grid.permute(1, 2, 0).cpu().numpy()).save(temporary, format="PNG")


def grid_tiles(grid: np.ndarray, side: int) -> list[np.ndarray]:
    """The ``side``-px HxWx3 tiles of a grid :func:`save_image_grid` wrote, row by row (empty
    when the grid holds no tile of that side)."""
    stride = side + GRID_PADDING
    rows, cols = ((length - GRID_PADDING) // stride for length in grid.shape[:2])
    return [grid[GRID_PADDING + r * stride:GRID_PADDING + r * stride + side,
                 GRID_PADDING + c * stride:GRID_PADDING + c * stride + side]
            for r in range(rows) for c in range(cols)]
