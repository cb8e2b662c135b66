"""How varied a grid's patches are, against a grid of real patches: a quick read of collapse
within a class (one picture for every z) from the PNGs a run already wrote.

Each grid (as ``save_image_grid`` writes it, 224-px tiles) is cut into its tiles, each tile
shrunk to 28 px (so that layout counts, not grain), and the mean L1 distance between every pair
of tiles is taken (0-255 scale). One JSON object out: each grid's figure and its ratio to the
real grid's (1 is as varied as real patches; a collapsed generator is far below)::

    .venv/bin/python bench/grid_variety.py --real demo/training-patches-dermis.png \\
        RUN/samples/dermis/step_003000.png
"""
from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
from PIL import Image

from pathgan.core.images import grid_tiles
from pathgan.shards.format import IMAGE_SIDE

SMALL = 28  # tiles are compared at this side, so that layout counts, not grain


def variety(path: str) -> float:
    tiles = grid_tiles(np.asarray(Image.open(path).convert("RGB")), IMAGE_SIDE)
    if len(tiles) < 2:
        raise SystemExit(f"{path}: not a grid of {IMAGE_SIDE}-px tiles")
    small = [np.asarray(Image.fromarray(tile).resize((SMALL, SMALL), Image.BILINEAR), np.float32)
             for tile in tiles]
    return float(np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(small, 2)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", required=True, help="grid of real patches (the baseline)")
    parser.add_argument("grids", nargs="+", help="generated grids")
    args = parser.parse_args()
    real = variety(args.real)
    grids = []
    for path in args.grids:
        value = variety(path)
        grids.append({"grid": path, "variety": round(value, 2),
                      "ratio_to_real": round(value / real, 3)})
    print(json.dumps({"real": {"grid": args.real, "variety": round(real, 2)}, "grids": grids},
                     indent=1))


if __name__ == "__main__":
    main()
