"""Shared fixtures: the bundled slide and small shard sets packed from it once per session."""

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SLIDE = REPO / "shards" / "cmu_small_region.svs"

# No test may touch the network or a real W&B account.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def run_cli(*args: str) -> int:
    """Run ``pathgan ARGS`` in this process; returns its exit code."""
    from pathgan.cli import main

    return main([str(a) for a in args])


def cli_command(*args: str) -> list[str]:
    """The argv that runs ``pathgan ARGS`` in a fresh interpreter."""
    return [sys.executable, "-m", "pathgan", *map(str, args)]


@pytest.fixture(scope="session")
def slide_path() -> Path:
    assert SLIDE.is_file(), "the bundled sample slide is missing"
    return SLIDE


@pytest.fixture(scope="session")
def slide_shards(tmp_path_factory, slide_path) -> Path:
    """The bundled slide packed at 224 px into several small shards (about 40 patches)."""
    out = tmp_path_factory.mktemp("slide_shards")
    code = run_cli("shards", "pack", slide_path, "--out", out, "--max-count", "12",
                   "--workers", "1")
    assert code == 0
    return out


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache with HF_HUB_OFFLINE=1: no network is ever touched."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


BATCHNORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def assert_same_weights(exported: dict, saved: dict) -> None:
    """The learned tensors of two generator state dicts are equal. BatchNorm buffers are left
    out: the exported generator's are recomputed for its weights (calibrate_batchnorm)."""
    assert exported.keys() == saved.keys()
    for name, tensor in saved.items():
        if not name.endswith(BATCHNORM_BUFFERS):
            assert torch.equal(exported[name], tensor), name


@pytest.fixture(scope="session")
def labelled_shards(tmp_path_factory, slide_path) -> Path:
    """The bundled slide's epidermis and dermis patches (its ASAP polygons), labelled only, the
    slide cut into square regions of which one is the val split (about 190 patches)."""
    out = tmp_path_factory.mktemp("labelled_shards")
    assert run_cli("shards", "pack", slide_path, "--out", out, "--annotations", REPO / "shards",
                   "--label-fraction", "0.7", "--labelled-only", "--overlap", "0.5",
                   "--region-groups", "1100", "--val-fraction", "0.2", "--workers", "1") == 0
    return out
