"""Whole-slide images: opening, microns per pixel, tissue detection and the patch grid.

``openslide`` is used when it is installed (it reads more vendor formats); ``tiffslide``
(pure Python, a required dependency) otherwise. Both expose the same API.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pathgan.errors import PathganError

SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")
TIFF_EXTENSIONS = (".tif", ".tiff")
# A .tif at most this many pixels on its longer side is treated as a patch image, not a slide.
MAX_PATCH_IMAGE_SIDE = 4096
THUMBNAIL_MAX_SIDE = 8192


def open_slide(path: str | Path):
    """Open a slide with openslide when available, else tiffslide; raises on failure."""
    try:
        import openslide

        return openslide.OpenSlide(str(path))
    except ImportError:
        pass
    except Exception:  # openslide refuses some TIFFs that tiffslide reads
        pass
    import tiffslide

    return tiffslide.TiffSlide(str(path))


def slide_mpp(slide, override: float | None = None) -> tuple[float | None, str]:
    """Microns per pixel at level 0 and where the figure came from."""
    if override:
        return float(override), "--slide-mpp"
    for prefix in ("openslide", "tiffslide"):
        value = slide.properties.get(f"{prefix}.mpp-x")
        if value:
            return float(value), f"{prefix}.mpp-x"
    return None, "unknown"


@dataclass(frozen=True)
class PatchWindow:
    """One patch of a slide: level-0 position and size, and the level to read it from."""

    x: int
    y: int
    size: int  # level-0 pixels on a side
    level: int
    read_size: int  # pixels on a side at ``level``
    tissue_fraction: float


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of a uint8 array (maximises the between-class variance)."""
    histogram = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    weight_low = np.cumsum(histogram)
    weight_high = weight_low[-1] - weight_low
    cumulative_mean = np.cumsum(histogram * np.arange(256))
    mean_low = cumulative_mean / np.maximum(weight_low, 1)
    mean_high = (cumulative_mean[-1] - cumulative_mean) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(np.argmax(between[:-1]))


def tissue_mask(thumbnail: Image.Image, min_saturation: int = 20) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: Otsu on the HSV saturation channel.

    H&E tissue is coloured; glass background is grey-white (low saturation). The floor on the
    threshold keeps a nearly empty slide from splitting its background noise in two.
    """
    saturation = np.asarray(thumbnail.convert("HSV"))[..., 1]
    threshold = max(otsu_threshold(saturation), float(min_saturation))
    return saturation > threshold


def _box_sums(mask: np.ndarray) -> np.ndarray:
    """Summed-area table with a zero row and column, for O(1) box sums."""
    table = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    return table


def best_level_for(slide, downsample: float) -> int:
    """The highest pyramid level whose downsample does not exceed ``downsample``."""
    levels = [i for i, d in enumerate(slide.level_downsamples) if d <= downsample * 1.001]
    return max(levels) if levels else 0


def patch_windows(
    slide,
    sizes_level0: list[int],
    output_size: int,
    overlap: float,
    min_tissue: float,
    min_saturation: int = 20,
) -> tuple[list[PatchWindow], np.ndarray, float]:
    """The tissue patches of a slide for each level-0 patch size.

    Returns the windows, the thumbnail tissue mask and the thumbnail's downsample.
    """
    width, height = slide.dimensions
    downsample = max(1.0, min(sizes_level0) / 16.0, max(width, height) / THUMBNAIL_MAX_SIDE)
    thumbnail = slide.get_thumbnail((int(width / downsample), int(height / downsample)))
    mask = tissue_mask(thumbnail.convert("RGB"), min_saturation)
    scale_x, scale_y = mask.shape[1] / width, mask.shape[0] / height
    table = _box_sums(mask)
    windows = []
    for size in sizes_level0:
        stride = max(1, int(round(size * (1.0 - overlap))))
        level = best_level_for(slide, size / output_size)
        read_size = int(round(size / slide.level_downsamples[level]))
        for y in range(0, height - size + 1, stride):
            for x in range(0, width - size + 1, stride):
                x0, x1 = int(x * scale_x), max(int((x + size) * scale_x), int(x * scale_x) + 1)
                y0, y1 = int(y * scale_y), max(int((y + size) * scale_y), int(y * scale_y) + 1)
                inside = table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]
                fraction = float(inside) / ((x1 - x0) * (y1 - y0))
                if fraction >= min_tissue:
                    windows.append(PatchWindow(x, y, size, level, read_size, round(fraction, 4)))
    return windows, mask, downsample


def read_patch(slide, window: PatchWindow, output_size: int) -> np.ndarray:
    """Read one window and resize it to ``output_size`` (antialiased); HxWx3 uint8."""
    region = slide.read_region((window.x, window.y), window.level, (window.read_size,) * 2)
    region = region.convert("RGB")
    if region.size != (output_size, output_size):
        region = region.resize((output_size, output_size), Image.Resampling.LANCZOS)
    return np.asarray(region)


def level0_sizes(
    patch_sizes: list[int], target_mpp: float | None, mpp: float | None, path: Path
) -> list[int]:
    """Patch sizes in level-0 pixels: as given, or scaled from ``target_mpp`` to the slide's."""
    if target_mpp is None:
        return list(patch_sizes)
    if mpp is None:
        raise PathganError(
            f"{path.name}: the slide records no microns per pixel; pass --slide-mpp to tile "
            "at --target-mpp"
        )
    return [int(round(size * target_mpp / mpp)) for size in patch_sizes]
