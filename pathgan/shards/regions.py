"""Regions of a slide as split groups (``--region-groups SIZE``): held-out tissue from one slide.

With one slide, or a few, a split by slide leaves nothing (or one slide) to validate on. Cutting
each slide into squares of ``SIZE`` pixels (level 0, or at ``--target-mpp``) and making every
square a split group, ``<slide group>@x<column>y<row>``, gives the validation split whole
regions of tissue instead. A patch belongs to the square that holds its centre; the split of a
square is decided like any group's (a hash of its name against ``--val-fraction``). A patch
whose pixels reach into a square on the other side of the split is left out, so that no pixel is
in both splits (overlapping patches would otherwise carry the same tissue across). Patches that
only reach into squares of their own side are kept.

What this holds out is a region of the same slide: same patient, stain and scanner, tissue next
to what was trained on. It measures whether a model generalises across a slide, not across
slides; with several slides, prefer groups of slides or patients.
"""

import dataclasses

import numpy as np

from pathgan.shards.options import PackOptions
from pathgan.shards.sources import Source, is_validation_group


def region_side(options: PackOptions, mpp: float | None) -> int:
    """``--region-groups`` in level-0 pixels (converted from ``--target-mpp`` pixels, as patch
    sizes are)."""
    if options.target_mpp and mpp:
        return max(1, round(options.region_groups * options.target_mpp / mpp))
    return options.region_groups


def region_name(group: str, column: int, row: int) -> str:
    return f"{group}@x{column}y{row}"


def _validation_grid(group: str, columns: int, rows: int, val_fraction: float) -> np.ndarray:
    """1 where a square (column, row) goes to validation, else 0: an int array (columns, rows)."""
    return np.array([[is_validation_group(region_name(group, column, row), val_fraction)
                      for row in range(rows)] for column in range(columns)], dtype=np.int64)


def _block_sums(grid: np.ndarray, first: tuple, last: tuple) -> np.ndarray:
    """Sum of ``grid`` over the blocks [first, last] (inclusive, per window), by prefix sums."""
    table = np.zeros((grid.shape[0] + 1, grid.shape[1] + 1), dtype=np.int64)
    table[1:, 1:] = grid.cumsum(0).cumsum(1)
    (c0, r0), (c1, r1) = first, (last[0] + 1, last[1] + 1)
    return table[c1, r1] - table[c0, r1] - table[c1, r0] + table[c0, r0]


def split_slide_plan(source: Source, plan, options: PackOptions) -> list[tuple[Source, object]]:
    """A slide's (source, plan) as one (source, plan) per square that keeps patches."""
    side = region_side(options, plan.mpp)
    windows = plan.windows
    x, y, size = windows["x"], windows["y"], windows["size"]
    column, row = (x + size // 2) // side, (y + size // 2) // side
    first, last = (x // side, y // side), ((x + size - 1) // side, (y + size - 1) // side)
    grid = _validation_grid(source.group, int(last[0].max()) + 1, int(last[1].max()) + 1,
                            options.val_fraction)
    touched_val = _block_sums(grid, first, last)
    touched = (last[0] - first[0] + 1) * (last[1] - first[1] + 1)
    own_val = grid[column, row].astype(bool)
    keep = np.where(own_val, touched_val == touched, touched_val == 0)
    pieces = []
    for cell in sorted({(int(c), int(r)) for c, r in zip(column[keep], row[keep], strict=True)}):
        members = keep & (column == cell[0]) & (row == cell[1])
        pieces.append((dataclasses.replace(source, group=region_name(source.group, *cell)),
                       dataclasses.replace(plan, windows=windows[members])))
    return pieces


def split_by_region(sources: list[Source], plans: list, options: PackOptions
                    ) -> tuple[list[Source], list]:
    """Every slide's (source, plan) cut into its squares (``--region-groups``); other sources,
    and slides that were skipped or have no patch, pass through as they are."""
    if not options.region_groups:
        return sources, plans
    pairs = []
    for source, plan in zip(sources, plans, strict=True):
        if source.kind == "slide" and not plan.skipped and len(plan):
            pairs += split_slide_plan(source, plan, options)
        else:
            pairs.append((source, plan))
    return [source for source, _ in pairs], [plan for _, plan in pairs]
