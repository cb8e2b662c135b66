"""A CAMELYON16-layout whole-slide image made from a small texture, for benchmarks and tests.

CAMELYON16's slides are pyramidal TIFFs: one page per level (each level half the size of the
one above), 512-px JPEG tiles, and their microns per pixel only in the TIFF resolution tags,
in centimetres (``ResolutionUnit=CENTIMETER``, ``XResolution`` = pixels per cm). This writes a
slide of any size in that layout: tissue is the bundled slide's texture, laid out as a few
large blobs on white glass, at the physical scale of the texture (the texture's µm/px is
resampled to the slide's own at every level), so that a packer sees what it would see in
CAMELYON16: large slides, mostly background, pyramid levels read at several downsamples.

Tiles are generated one at a time, so memory stays small whatever the slide's size.
"""

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pathgan.core.fileio import atomic_path

CAMELYON16_MPP = 0.243  # µm/px at level 0, as in CAMELYON16's Radboud and Utrecht slides
TILE = 512
GLASS = (242, 242, 244)  # the near-white, unsaturated background that tissue detection drops
MASK_CELL = 256  # level-0 pixels per cell of the blob mask


def tissue_blobs(cells_x: int, cells_y: int, tissue_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of overlapping ellipses covering about ``tissue_fraction`` of the area."""
    rng = np.random.default_rng(seed)
    grid_y, grid_x = np.mgrid[0:cells_y, 0:cells_x].astype(np.float32)
    mask = np.zeros((cells_y, cells_x), dtype=bool)
    while mask.mean() < tissue_fraction:
        centre_x, centre_y = rng.uniform(0, cells_x), rng.uniform(0, cells_y)
        radius_x = rng.uniform(0.05, 0.2) * cells_x
        radius_y = rng.uniform(0.1, 0.3) * cells_y
        mask |= ((grid_x - centre_x) / radius_x) ** 2 + ((grid_y - centre_y) / radius_y) ** 2 <= 1
    return mask


def level_texture(texture: np.ndarray, scale: float, level: int) -> np.ndarray:
    """The texture at a level's pixel size; ``scale`` = texture µm/px over level-0 µm/px."""
    image = Image.fromarray(texture)
    factor = scale / 2**level
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS))


def periodic_texture(texture: np.ndarray) -> np.ndarray:
    """The texture mirrored 2x2 (a seamless period), padded by one tile so that any tile-sized
    window of the endless mirrored plane is a plain slice of it."""
    period = np.concatenate([texture, texture[::-1]], axis=0)
    period = np.concatenate([period, period[:, ::-1]], axis=1)
    return np.pad(period, ((0, TILE), (0, TILE), (0, 0)), mode="wrap")


def level_tiles(texture: np.ndarray, mask: np.ndarray, level: int, width: int,
                height: int) -> Iterator[np.ndarray]:
    """The 512x512 tiles of one level, row by row (what tifffile expects)."""
    plane = periodic_texture(texture)
    period_y, period_x = 2 * texture.shape[0], 2 * texture.shape[1]
    cell = MASK_CELL / 2**level  # mask cells in this level's pixels
    glass = np.empty((TILE, TILE, 3), dtype=np.uint8)
    glass[:] = GLASS
    for tile_y in range(0, height, TILE):
        mask_rows = np.minimum((np.arange(tile_y, tile_y + TILE) / cell).astype(int),
                               mask.shape[0] - 1)
        for tile_x in range(0, width, TILE):
            mask_cols = np.minimum((np.arange(tile_x, tile_x + TILE) / cell).astype(int),
                                   mask.shape[1] - 1)
            inside = mask[mask_rows[0] : mask_rows[-1] + 1, mask_cols[0] : mask_cols[-1] + 1]
            if not inside.any():
                yield glass
                continue
            y0, x0 = tile_y % period_y, tile_x % period_x
            tissue = plane[y0 : y0 + TILE, x0 : x0 + TILE]
            if inside.all():
                yield tissue
            else:
                yield np.where(mask[np.ix_(mask_rows, mask_cols)][..., None], tissue, glass)


def write_camelyon16_layout(path: str | Path, texture: np.ndarray, texture_mpp: float,
                            width: int, height: int, levels: int = 7,
                            mpp: float = CAMELYON16_MPP, tissue_fraction: float = 0.3,
                            jpeg_quality: int = 80, seed: int = 0) -> Path:
    """Write a ``width`` x ``height`` CAMELYON16-layout slide at ``mpp`` to ``path``."""
    import tifffile  # here: only writing a synthetic slide needs it (0.5 s to import)

    path = Path(path)
    mask = tissue_blobs(-(-width // MASK_CELL), -(-height // MASK_CELL), tissue_fraction, seed)
    pixels_per_cm = 10_000.0 / mpp
    with atomic_path(path) as temporary, tifffile.TiffWriter(temporary, bigtiff=True) as tiff:
        for level in range(levels):
            level_width, level_height = width // 2**level, height // 2**level
            tiff.write(
                level_tiles(level_texture(texture, texture_mpp / mpp, level), mask, level,
                            level_width, level_height),
                shape=(level_height, level_width, 3), dtype=np.uint8, tile=(TILE, TILE),
                photometric="rgb", compression="jpeg", compressionargs={"level": jpeg_quality},
                resolution=(pixels_per_cm / 2**level, pixels_per_cm / 2**level),
                resolutionunit="CENTIMETER", subfiletype=1 if level else 0, metadata=None,
            )
    return path
