"""How varied a grid's patches are, against a grid of real patches: a quick read of collapse
within a class (one picture for every z) from the PNGs a run already wrote.

Each grid (``make_grid`` layout: 224-px tiles, 2-px padding) is cut into its tiles, each tile
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

TILE, PADDING, SMALL = 224, 2, 28


def tiles(path: str) -> list[np.ndarray]:
    grid = np.asarray(Image.open(path).convert("RGB"))
    stride = TILE + PADDING
    rows, cols = (grid.shape[0] - PADDING) // stride, (grid.shape[1] - PADDING) // stride
    if rows * cols < 2:
        raise SystemExit(f"{path}: not a grid of {TILE}-px tiles")
    return [grid[PADDING + r * stride:PADDING + r * stride + TILE,
                 PADDING + c * stride:PADDING + c * stride + TILE]
            for r in range(rows) for c in range(cols)]


def variety(path: str) -> float:
    small = [np.asarray(Image.fromarray(tile).resize((SMALL, SMALL), Image.BILINEAR), np.float32)
             for tile in tiles(path)]
    return float(np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(small, 2)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real", required=True, help="grid of real patches (the baseline)")
    parser.add_argument("grids", nargs="+", help="generated grids")
    args = parser.parse_args()
    real = variety(args.real)
    print(json.dumps({"real": {"grid": args.real, "variety": round(real, 2)},
                      "grids": [{"grid": path, "variety": round(value, 2),
                                 "ratio_to_real": round(value / real, 3)}
                                for path, value in ((p, variety(p)) for p in args.grids)]},
                     indent=1))


if __name__ == "__main__":
    main()
