"""``pathgan embed``: fan-out over ranks/tasks, resume, corrupt samples, verify, read back."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pathgan import embed as embed_module
from pathgan.cli import main as cli_main
from pathgan.core.fileio import sha256_file
from pathgan.core.images import hwc_to_chw, uint8_to_signed
from pathgan.embed import assigned_shards, embed_shards, worker_assignment
from pathgan.encoders import load_encoder
from pathgan.shards.embedding_files import (
    embedding_path,
    read_embedding_file,
    read_embeddings,
    verify_embeddings,
)
from pathgan.shards.format import decode_sample, load_manifest
from pathgan.shards.reading import shard_keys

try:
    from tinymodels import make_tiny_path_foundation
except ImportError:  # tests/ as a package
    from tests.tinymodels import make_tiny_path_foundation

ROOT = Path(__file__).resolve().parents[1]
SLIDE = ROOT / "shards" / "cmu_small_region.svs"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The bundled slide packed into small shards (>= 2) by `pathgan shards pack`."""
    out = tmp_path_factory.mktemp("packed") / "set"
    command = [sys.executable, "-m", "pathgan", "shards", "pack", str(SLIDE), "--out", str(out),
               "--patch-sizes", "512", "--max-count", "2", "--workers", "1"]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, timeout=300)
    assert len(load_manifest(out)["shards"]) >= 3
    return out


@pytest.fixture
def shard_set(packed, tmp_path):
    copy = tmp_path / "set"
    shutil.copytree(packed, copy)
    return copy


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_path_foundation(tmp_path_factory.mktemp("pf") / "path-foundation")


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return load_encoder(f"path-foundation:{tiny_dir}", device="cpu")


def _all_keys(shards_dir: Path) -> list[str]:
    return [key for shard in load_manifest(shards_dir)["shards"]
            for key in shard_keys(shards_dir / shard["name"])]


def _raw_samples(shards_dir: Path) -> dict:
    import webdataset as wds

    samples = {}
    for shard in load_manifest(shards_dir)["shards"]:
        for raw in wds.WebDataset(str(shards_dir / shard["name"]), shardshuffle=False):
            samples[raw["__key__"]] = raw
    return samples


def test_worker_assignment_from_env():
    assert worker_assignment(env={}) == (0, 1)
    assert worker_assignment(1, 3, env={}) == (1, 3)
    assert worker_assignment(env={"RANK": "1", "WORLD_SIZE": "2"}) == (1, 2)
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4",
             "SLURM_ARRAY_TASK_COUNT": "3"}
    assert worker_assignment(env=slurm) == (1, 3)
    # a SLURM array task running `accelerate launch` on 2 GPUs
    assert worker_assignment(env={**slurm, "RANK": "1", "WORLD_SIZE": "2"}) == (3, 6)
    # explicit flags win over SLURM
    assert worker_assignment(0, 2, env=slurm) == (0, 2)
    with pytest.raises(Exception, match="both"):
        worker_assignment(1, None, env={})
    with pytest.raises(Exception, match="not in"):
        worker_assignment(3, 3, env={})
    shards = [{"name": str(i)} for i in range(7)]
    parts = [assigned_shards(shards, w, 3) for w in range(3)]
    names = [s["name"] for part in parts for s in part]
    assert sorted(names) == sorted(s["name"] for s in shards) and len(names) == 7


def test_embed_matches_the_encoder_in_the_loop(shard_set, encoder):
    summary = embed_shards(shard_set, encoder, batch_size=3, num_workers=1, progress=False)
    assert not summary.get("error") and summary["shards_written"] == 3
    keys, array = read_embeddings(shard_set, encoder.encoder_id)
    assert keys == _all_keys(shard_set) and array.shape == (len(keys), 384)
    assert array.dtype == np.float32
    # exactly what the trainer's pipeline would feed the encoder
    raw = _raw_samples(shard_set)
    images = torch.stack([uint8_to_signed(hwc_to_chw(decode_sample(raw[k])[1])) for k in keys])
    with torch.no_grad():
        np.testing.assert_allclose(encoder(images).numpy(), array, rtol=1e-5, atol=1e-6)
    # file layout: numpy alone, no pickle
    data = np.load(embedding_path(shard_set, encoder.encoder_id, "train-000000.tar"),
                   allow_pickle=False)
    meta = json.loads(str(data["meta"]))
    assert meta["encoder_id"] == encoder.encoder_id and meta["dim"] == 384
    assert meta["dtype"] == "float32" and meta["shard"] == "train-000000.tar"
    assert meta["source_sha256"] == load_manifest(shard_set)["shards"][0]["sha256"]
    assert data["missing_keys"].shape == (0,)
    assert verify_embeddings(shard_set, encoder)["complete"]
    assert verify_embeddings(shard_set, f"path-foundation:{encoder.source}")["complete"]


def test_task_index_split_and_resume_after_interrupt(shard_set, encoder, monkeypatch):
    names = [s["name"] for s in load_manifest(shard_set)["shards"]]
    first = embed_shards(shard_set, encoder, task_index=0, num_tasks=2, num_workers=0,
                         progress=False)
    out = embedding_path(shard_set, encoder.encoder_id, "x").parent
    assert sorted(p.name for p in out.glob("*.npz")) == ["train-000000.npz", "train-000002.npz"]
    assert first["shards_assigned"] == 2 and first["shards_written"] == 2

    # task 1 is interrupted after writing nothing: its partial file never takes the final name
    real_write = embed_module._write_output

    def interrupted(item, *args):
        with open(item.output.with_name(f".{item.output.name}.tmp-424242"), "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(embed_module, "_write_output", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed_shards(shard_set, encoder, task_index=1, num_tasks=2, num_workers=0,
                     progress=False)
    assert not embedding_path(shard_set, encoder.encoder_id, names[1]).exists()
    assert not verify_embeddings(shard_set, encoder)["complete"]

    monkeypatch.setattr(embed_module, "_write_output", real_write)
    again = embed_shards(shard_set, encoder, num_workers=0, progress=False)  # one worker: all
    assert again["shards_skipped"] == 2 and again["shards_written"] == 1
    assert not list(out.glob(".*tmp-*"))
    assert verify_embeddings(shard_set, encoder)["complete"]
    once_more = embed_shards(shard_set, encoder, num_workers=0, progress=False)
    assert once_more["shards_skipped"] == 3 and once_more["shards_written"] == 0

    # a damaged output is detected by verify and recomputed by the next run
    damaged = embedding_path(shard_set, encoder.encoder_id, names[2])
    damaged.write_bytes(damaged.read_bytes()[:100])
    assert cli_main(["embed", "verify", str(shard_set), "--encoder", encoder.encoder_id]) == 1
    fixed = embed_shards(shard_set, encoder, num_workers=0, progress=False)
    assert fixed["shards_written"] == 1 and verify_embeddings(shard_set, encoder)["complete"]


def _png(color) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((224, 224, 3), color, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def corrupt_set(tmp_path):
    """Two shards written with webdataset's TarWriter; one sample's PNG is garbage."""
    import webdataset as wds

    out = tmp_path / "corrupt"
    out.mkdir()
    shards = []
    for index in range(2):
        name = f"train-{index:06d}.tar"
        with wds.TarWriter(str(out / name)) as writer:
            for j in range(3):
                key = f"s{index}_{j}"
                image = b"\x89PNG not really" if (index, j) == (1, 1) else _png(40 * j + index)
                writer.write({"__key__": key, "png": image, "json": json.dumps({"k": key})})
        shards.append({"name": name, "split": "train", "samples": 3,
                       "sha256": sha256_file(out / name)})
    (out / "manifest.json").write_text(json.dumps({"shards": shards, "total_samples": 6}))
    return out


def test_corrupt_sample_is_listed_as_missing(corrupt_set, encoder, capsys):
    spec = f"path-foundation:{encoder.source}"
    # above the threshold: outputs are written, the command fails loudly in one line
    code = cli_main(["embed", str(corrupt_set), "--encoder", spec, "--batch-size", "2",
                     "--num-workers", "0", "--max-missing", "0.1", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    assert "corrupt sample s1_1" in captured.err
    assert "1 of 6 samples could not be decoded" in captured.err
    assert "missing: train-000001.tar s1_1" in captured.out
    data = read_embedding_file(embedding_path(corrupt_set, encoder.encoder_id, "train-000001.tar"))
    assert data["keys"] == ["s1_0", "s1_2"] and data["missing_keys"] == ["s1_1"]
    assert "s1_1" in data["meta"]["missing_reasons"]
    assert data["embeddings"].shape == (2, 384)
    # the file is complete and aligned: keys + missing_keys are the shard's keys
    assert cli_main(["embed", "verify", str(corrupt_set), "--encoder", spec]) == 0
    keys, array = read_embeddings(corrupt_set, encoder.encoder_id)
    assert keys == ["s0_0", "s0_1", "s0_2", "s1_0", "s1_2"] and array.shape == (5, 384)
    # under the default threshold (5% would fail: 1/6), a looser one passes
    shutil.rmtree(corrupt_set / "embeddings")
    assert cli_main(["embed", str(corrupt_set), "--encoder", spec, "--num-workers", "1",
                     "--max-missing", "0.5", "--no-progress"]) == 0


def test_changed_shard_is_not_embedded(corrupt_set, encoder):
    tar = corrupt_set / "train-000000.tar"
    tar.write_bytes(tar.read_bytes()[:-1024])  # truncated after packing
    summary = embed_shards(corrupt_set, encoder, num_workers=0, progress=False)
    assert [f["shard"] for f in summary["shards_failed"]] == ["train-000000.tar"]
    assert "shards could not" in summary["error"] or "could not be embedded" in summary["error"]
    assert summary["shards_written"] == 1
    report = verify_embeddings(corrupt_set, encoder)
    assert not report["complete"] and report["problems"][0]["shard"] == "train-000000.tar"


@pytest.mark.slow
def test_two_ranks_with_accelerate_launch(shard_set, tiny_dir, capsys):
    """`accelerate launch` with 2 processes: ranks split the shards, nothing twice or missing."""
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.exists():
        pytest.skip("accelerate's launcher is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "pathgan", "embed", str(shard_set), "--encoder",
               f"path-foundation:{tiny_dir}", "--batch-size", "2", "--num-workers", "1",
               "--no-progress"]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embed 1/2" in result.stdout and "embed 2/2" in result.stdout
    assert "2 assigned, 2 written" in result.stdout  # rank 0: shards 0 and 2
    assert "1 assigned, 1 written" in result.stdout  # rank 1: shard 1
    keys, array = read_embeddings(shard_set, f"path-foundation:{tiny_dir}")
    assert keys == _all_keys(shard_set) and len(set(keys)) == len(keys)
    assert array.shape == (len(keys), 384)
    assert cli_main(["embed", "verify", str(shard_set), "--encoder",
                     f"path-foundation:{tiny_dir}"]) == 0
    assert "3/3 shards complete" in capsys.readouterr().out


def test_missing_path_foundation_is_one_line_from_the_cli(corrupt_set, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run(
        [sys.executable, "-m", "pathgan", "embed", str(corrupt_set), "--encoder",
         "path-foundation"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pathgan: error: ")
    assert "hf auth login" in lines[0] and "Traceback" not in result.stderr
