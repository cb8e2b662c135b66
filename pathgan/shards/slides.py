"""Whole-slide images: opening, microns per pixel, tissue detection and the patch grid.

``openslide`` is used when it is installed (it reads more vendor formats); ``tiffslide``
(pure Python, a required dependency) otherwise. Both expose the same API.
"""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pathgan.core.errors import PathganError

SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")
TIFF_EXTENSIONS = (".tif", ".tiff")
# A .tif at most this many pixels on its longer side is treated as a patch image, not a slide.
MAX_PATCH_IMAGE_SIDE = 4096
THUMBNAIL_MAX_SIDE = 8192
# Windows are read in level-aligned regions of this many pixels on a side at their level: big
# enough that few tiles are decoded twice (by two regions), small enough to bound a worker's
# memory (the tiles of a region: at most 9 x 9 tiles of 512 px, 64 MB) whatever the slide.
REGION_SIDE = 4096


def open_slide(path: str | Path):
    """Open a slide with openslide when available, else tiffslide; raises on failure."""
    try:
        import openslide  # the optional [openslide] extra

        return openslide.OpenSlide(str(path))
    except ImportError:
        pass
    except Exception:  # openslide refuses some TIFFs that tiffslide reads
        pass
    import tiffslide  # here: 1.8 s to import; workers reading no slide skip it

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


def level_origin(slide, x: int, y: int, level: int) -> tuple[int, int]:
    """The pixel of ``level`` where ``read_region((x, y), level, ...)`` starts: the level-0
    location divided by the level's downsample and truncated, as tiffslide does."""
    downsample = slide.level_downsamples[level]
    return int(x / downsample), int(y / downsample)


def region_cell(slide, window: PatchWindow) -> tuple[int, int, int]:
    """The level-aligned region a window is read with: (level, column, row) of its top-left
    pixel on a grid of ``REGION_SIDE`` pixels at the window's level."""
    x, y = level_origin(slide, window.x, window.y, window.level)
    return window.level, x // REGION_SIDE, y // REGION_SIDE


def resize_patch(pixels: np.ndarray, output_size: int) -> np.ndarray:
    """An RGB patch resized to ``output_size`` on a side (Lanczos, antialiased); HxWx3 uint8."""
    if pixels.shape[:2] == (output_size, output_size):
        return pixels
    image = Image.fromarray(pixels).resize((output_size, output_size), Image.Resampling.LANCZOS)
    return np.asarray(image)


class TiffTiles:
    """The pixels of one level of a tiled TIFF read through tiffslide, tile by tile with
    tifffile: the same tiles, decoded by the same function as ``read_region`` (zarr), without
    zarr's overhead (measured: 1 ms a 512-px JPEG tile instead of 3), each decoded once."""

    def __init__(self, slide, level: int):
        series = slide.ts_tifffile.series[slide.properties["tiffslide.series-index"]]
        self.page = series.levels[level].keyframe
        self.handle = slide.ts_tifffile.filehandle
        self.width, self.height = slide.level_dimensions[level]
        self.tile_width, self.tile_height = self.page.tilewidth, self.page.tilelength
        self.columns = -(-self.width // self.tile_width)
        self.tiles: dict[tuple[int, int], np.ndarray | Exception] = {}

    @staticmethod
    def supports(slide, level: int) -> bool:
        """A plain tiled RGB level (no composite series, no separate planes)."""
        try:
            if slide.zarr_group.attrs.get("tiffslide.series-composition") is not None:
                return False
            series = slide.ts_tifffile.series[slide.properties["tiffslide.series-index"]]
            page = series.levels[level].keyframe
            return (page.is_tiled and page.planarconfig == 1 and page.samplesperpixel == 3
                    and page.dtype == np.uint8 and len(series.levels[level].pages) == 1
                    and (page.imagewidth, page.imagelength) == slide.level_dimensions[level])
        except Exception:  # not a TiffSlide, or a layout tifffile exposes differently
            return False

    def tile(self, column: int, row: int) -> np.ndarray:
        """One decoded tile, zero beyond the image; a tile that fails raises every time."""
        if (column, row) not in self.tiles:
            try:
                self.tiles[column, row] = self._decode(row * self.columns + column)
            except Exception as error:
                self.tiles[column, row] = error
        tile = self.tiles[column, row]
        if isinstance(tile, Exception):
            raise tile
        return tile

    def _decode(self, index: int) -> np.ndarray:
        tile = np.zeros((self.tile_height, self.tile_width, 3), dtype=np.uint8)
        offset, count = self.page.dataoffsets[index], self.page.databytecounts[index]
        if count == 0:  # a missing tile reads as zeros, as in read_region
            return tile
        with self.handle.lock:
            self.handle.seek(offset)
            data = self.handle.read(count)
        decoded, _, _ = self.page.decode(data, index, jpegtables=self.page.jpegtables,
                                         jpegheader=self.page.jpegheader)
        decoded = decoded.reshape(decoded.shape[-3:])
        tile[: decoded.shape[0], : decoded.shape[1]] = decoded
        return tile

    def window(self, x: int, y: int, size: int) -> np.ndarray:
        """``size`` x ``size`` pixels from (x, y) of the level; zero outside the image."""
        out = np.zeros((size, size, 3), dtype=np.uint8)
        right, bottom = min(x + size, self.width), min(y + size, self.height)
        for row in range(max(y, 0) // self.tile_height, -(-bottom // self.tile_height)):
            for column in range(max(x, 0) // self.tile_width, -(-right // self.tile_width)):
                tile_x, tile_y = column * self.tile_width, row * self.tile_height
                left, top = max(x, tile_x), max(y, tile_y)
                width = min(right, tile_x + self.tile_width) - left
                height = min(bottom, tile_y + self.tile_height) - top
                out[top - y : top - y + height, left - x : left - x + width] = self.tile(
                    column, row)[top - tile_y : top - tile_y + height,
                                 left - tile_x : left - tile_x + width]
        return out


class RegionPixels:
    """The pixels of a few windows of one level from any slide reader: their bounding box read
    once with ``read_region`` and cut; each window alone when that read fails (a corrupt tile
    then costs only the windows on it)."""

    def __init__(self, slide, level: int, windows: list[PatchWindow]):
        self.slide, self.level = slide, level
        self.origins = [level_origin(slide, w.x, w.y, level) for w in windows]
        self.left = min(x for x, _ in self.origins)
        self.top = min(y for _, y in self.origins)
        right = max(x + w.read_size for (x, _), w in zip(self.origins, windows, strict=True))
        bottom = max(y + w.read_size for (_, y), w in zip(self.origins, windows, strict=True))
        # min(level-0 x) lands on min(level x): the level mapping is monotonic.
        anchor = (min(w.x for w in windows), min(w.y for w in windows))
        try:
            region = slide.read_region(anchor, level, (right - self.left, bottom - self.top))
            self.region = np.asarray(region.convert("RGB"))
        except Exception:
            self.region = None

    def window(self, window: PatchWindow) -> np.ndarray:
        if self.region is None:
            region = self.slide.read_region((window.x, window.y), self.level,
                                            (window.read_size,) * 2)
            return np.asarray(region.convert("RGB"))
        x, y = level_origin(self.slide, window.x, window.y, self.level)
        x, y = x - self.left, y - self.top
        return self.region[y : y + window.read_size, x : x + window.read_size]


def read_windows(slide, windows: list[PatchWindow],
                 output_size: int) -> Iterator[np.ndarray | Exception]:
    """The pixels of windows of one level, each resized to ``output_size``, in order; a window
    that cannot be read yields its error instead. A tile shared by neighbouring windows is
    decoded once, and every window has exactly the pixels ``read_region`` gives it alone.
    """
    (level,) = {window.level for window in windows}
    if TiffTiles.supports(slide, level):
        tiles = TiffTiles(slide, level)

        def pixels(window: PatchWindow) -> np.ndarray:
            x, y = level_origin(slide, window.x, window.y, level)
            return tiles.window(x, y, window.read_size)
    else:
        pixels = RegionPixels(slide, level, windows).window
    for window in windows:
        try:
            yield resize_patch(pixels(window), output_size)
        except Exception as error:  # a corrupt tile: this window is skipped and reported
            yield error


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
