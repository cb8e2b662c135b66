"""Shards in mixed order: every shard holds patches of many positions and of every size."""

import json

from conftest import run_cli

from pathgan.shards.format import load_manifest, shard_paths
from pathgan.shards.reading import iter_tar_samples


def shard_metadata(shards_dir) -> list[list[dict]]:
    return [[json.loads(members["json"]) for _, members in iter_tar_samples(path)]
            for path in shard_paths(shards_dir)]


def test_every_shard_mixes_positions_and_patch_sizes(tmp_path, slide_path):
    out = tmp_path / "mixed"
    assert run_cli("shards", "pack", slide_path, "--out", out, "--patch-sizes", "224,320",
                   "--max-count", "16", "--workers", "1") == 0
    shards = shard_metadata(out)
    assert len(shards) >= 3

    def span(samples: list[dict], axis: str) -> int:
        return max(m[axis] for m in samples) - min(m[axis] for m in samples)

    every = [m for samples in shards for m in samples]
    for samples in shards[:-1]:  # the last shard may be a short remainder
        assert {m["patch_size"] for m in samples} == {224, 320}
        # Raster order would give one or two rows of one size: here most of the tissue.
        for axis in ("x", "y"):
            assert span(samples, axis) > span(every, axis) / 2


def test_the_seed_changes_the_order_not_the_samples(tmp_path, slide_path):
    orders = {}
    for seed in ("0", "1"):
        out = tmp_path / f"seed{seed}"
        assert run_cli("shards", "pack", slide_path, "--out", out, "--seed", seed,
                       "--max-count", "16", "--workers", "1") == 0
        orders[seed] = [key for path in shard_paths(out) for key, _ in iter_tar_samples(path)]
    assert orders["0"] != orders["1"] and sorted(orders["0"]) == sorted(orders["1"])
    assert load_manifest(tmp_path / "seed1")["config"]["seed"] == 1
