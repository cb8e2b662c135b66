"""``pathgan shards pack`` from parquet tables and Hub data sets, with precomputed embeddings."""

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiffslide
import torch
from conftest import REPO, run_cli
from PIL import Image
from test_train import QUIET

from pathgan.core.errors import PathganError
from pathgan.core.images import uint8_to_signed
from pathgan.encoders import load_encoder
from pathgan.shards.embedding_files import (
    embedding_path,
    read_embedding_file,
    read_embeddings,
    verify_embeddings,
)
from pathgan.shards.format import decode_sample, load_manifest, shard_paths
from pathgan.shards.patches import read_patch_image
from pathgan.shards.reading import iter_tar_samples

try:
    from tinymodels import TINY_COMMIT, install_in_hf_cache, make_tiny_path_foundation
except ImportError:  # tests/ as a package
    from tests.tinymodels import TINY_COMMIT, install_in_hf_cache, make_tiny_path_foundation

ENCODER = "timm:vit_tiny_patch16_224:random"  # the Embedding GAN smoke config's encoder
SIZES = (96, 150, 224, 300, 512)  # patch sides in the table: every one is resized to 224
CORRUPT_ROW = 5  # of the first file
NO_EMBEDDING_ROW = 7  # of the first file
COLUMNS = ["--label-column", "diagnosis", "--group-column", "patient"]


def slide_patches(count: int) -> list[np.ndarray]:
    """``count`` tissue patches of various sizes from the bundled slide."""
    slide = tiffslide.TiffSlide(REPO / "shards" / "cmu_small_region.svs")
    patches = []
    for index in range(count):
        side = SIZES[index % len(SIZES)]
        region = slide.read_region((180 * index % 1500, 900 + 40 * index), 0, (side, side))
        patches.append(np.asarray(region.convert("RGB")))
    return patches


def encoded(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format, quality=95)
    return buffer.getvalue()


def column_embeddings(images: list[bytes]) -> np.ndarray:
    """What a data set's publisher computed: the encoder's embeddings of the images as packed."""
    encoder = load_encoder(ENCODER, device="cpu")
    pixels = [read_patch_image(io.BytesIO(data), 224)[0] for data in images]
    with torch.no_grad():
        return encoder(uint8_to_signed(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2))
                       ).numpy()


def write_table(path: Path, images: list[bytes], embeddings: list, start: int) -> None:
    """A parquet file as the Hub stores data sets: an Image struct, a ClassLabel column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = range(start, start + len(images))
    table = pa.table({
        "image": [{"bytes": data, "path": None} for data in images],
        "diagnosis": pa.array([row % 2 for row in rows], pa.int64()),
        "patient": [f"patient_{row % 6}" for row in rows],
        "emb": pa.array(embeddings, pa.list_(pa.float32())),
    })
    features = {"diagnosis": {"_type": "ClassLabel", "names": ["normal", "tumor"]}}
    table = table.replace_schema_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=7)  # ranges of rows start inside row groups


@pytest.fixture(scope="module")
def table_parts(tmp_path_factory):
    """The pieces of a 30-row table: image bytes (PNG and JPEG, five sizes, one corrupt) and
    the encoder's embeddings of them (one row without)."""
    patches = slide_patches(30)
    images = [encoded(p, "PNG" if i % 3 else "JPEG") for i, p in enumerate(patches)]
    embeddings = [list(map(float, row)) for row in column_embeddings(images)]
    images[CORRUPT_ROW] = b"not an image"
    embeddings[NO_EMBEDDING_ROW] = None
    return images, embeddings


def table_folder(root: Path, images: list[bytes], embeddings: list) -> Path:
    """The table as two files, the way Hub data sets are laid out."""
    write_table(root / "data" / "train-0.parquet", images[:20], embeddings[:20], start=0)
    write_table(root / "data" / "train-1.parquet", images[20:], embeddings[20:], start=20)
    return root


@pytest.fixture(scope="module")
def table(table_parts, tmp_path_factory) -> Path:
    return table_folder(tmp_path_factory.mktemp("table") / "patches", *table_parts)


@pytest.fixture(scope="module")
def packed(table, tmp_path_factory) -> Path:
    """The table packed with its embeddings, by two worker processes."""
    out = tmp_path_factory.mktemp("packed") / "shards"
    assert run_cli("shards", "pack", table, "--out", out, *COLUMNS, "--embedding-column", "emb",
                   "--encoder", ENCODER, "--val-fraction", "0.3", "--max-count", "8",
                   "--workers", "2") == 0
    return out


def samples_by_row(shards: Path) -> dict[int, tuple[str, str, np.ndarray, dict]]:
    """Row of the table (its two files one after the other) -> (split, key, image, metadata)
    of every sample of a shard set."""
    samples = {}
    for path in shard_paths(shards):
        for key, members in iter_tar_samples(path):
            key, image, metadata = decode_sample({"__key__": key, **members})
            first = 20 if metadata["source"].endswith("train-1.parquet") else 0
            samples[first + metadata["row"]] = path.name.split("-")[0], key, image, metadata
    return samples


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_rows_become_resized_samples_with_labels_groups_and_their_embeddings(packed,
                                                                             table_parts):
    images, embeddings = table_parts
    manifest = load_manifest(packed)
    assert manifest["total_samples"] == 29  # 30 rows, one corrupt
    (skipped,) = manifest["skipped"]
    assert skipped["path"].endswith("train-0.parquet") and skipped["key"].endswith("-r00000005")
    assert skipped["reason"] == ("UnidentifiedImageError: cannot identify image file "
                                 "<_io.BytesIO object>")
    assert manifest["labels"] == {"normal": 15, "tumor": 14}
    assert {s["kind"] for s in manifest["sources"]} == {"table"}
    val_groups = {s["group"] for s in manifest["sources"] if s["split"] == "val"}
    assert manifest["splits"]["val"]["groups"] == len(val_groups) > 0
    assert manifest["splits"]["train"]["groups"] == 6 - len(val_groups)
    check = manifest["embeddings"]["check"]
    assert check["rows"] == 28 and check["median_relative_l2"] < 1e-6  # the same model

    samples = samples_by_row(packed)
    assert sorted(samples) == [row for row in range(30) if row != CORRUPT_ROW]
    for row, (split, _, image, metadata) in samples.items():
        side = SIZES[row % len(SIZES)]
        assert image.shape == (224, 224, 3) and metadata["original_size"] == [side, side]
        assert metadata["label"] == ["normal", "tumor"][row % 2]
        assert metadata["group"] == f"patient_{row % 6}"
        assert (split == "val") == (metadata["group"] in val_groups)
        if row % 3:  # PNG in the table: the very pixels pack gives a patch image file
            np.testing.assert_array_equal(image, read_patch_image(io.BytesIO(images[row]),
                                                                  224)[0])

    encoder_id = manifest["embeddings"]["encoder_id"]
    stored, missing = {}, {}
    for shard in manifest["shards"]:
        data = read_embedding_file(embedding_path(packed, encoder_id, shard["name"]))
        assert data["meta"]["precision"] == "fp32" and data["meta"]["column"] == "emb"
        stored.update(zip(data["keys"], data["embeddings"], strict=True))
        missing.update(data["meta"]["missing_reasons"])
    key_of = {row: key for row, (_, key, _, _) in samples.items()}
    assert missing == {key_of[NO_EMBEDDING_ROW]: "no embedding in column 'emb'"}
    assert len(stored) == 28
    for row, key in key_of.items():
        if row != NO_EMBEDDING_ROW:
            np.testing.assert_array_equal(stored[key], np.float32(embeddings[row]))


def test_the_packed_table_verifies_and_trains_the_embedding_gan_without_embedding(packed,
                                                                                 tmp_path):
    assert run_cli("shards", "verify", packed) == 0
    assert run_cli("embed", "verify", packed, "--encoder", ENCODER) == 0
    report = verify_embeddings(packed, ENCODER)
    assert report["complete"] and report["missing_keys"] == 1
    files = sorted((packed / "embeddings").rglob("*.npz"))
    before = {path: path.stat().st_mtime_ns for path in files}

    run_dir = tmp_path / "embgan"
    result = subprocess.run(
        [sys.executable, "-m", "pathgan", "train", "--config",
         str(REPO / "configs" / "embgan-smoke.yaml"), f"data.shards={packed}",
         f"run.dir={run_dir}", f"model.encoder={ENCODER}", "train.max_steps=2", "log.every=1",
         "log.sample_every=2", "ckpt.every=2", "log.wandb=false"],
        capture_output=True, text=True, env=QUIET, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and rows[-1]["emb_mean_dist"] > 0
    assert (run_dir / "generator.safetensors").is_file()
    assert sorted((packed / "embeddings").rglob("*.npz")) == files  # nothing re-embedded
    assert {path: path.stat().st_mtime_ns for path in files} == before


def test_a_rerun_keeps_the_shards_and_rewrites_a_lost_embedding_file(packed, table, tmp_path,
                                                                     capsys):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(packed, out)
    encoder_id = load_manifest(out)["embeddings"]["encoder_id"]
    lost = embedding_path(out, encoder_id, "train-000000.tar")
    kept = {path.name: path.read_bytes() for path in out.glob("*.tar")}
    lost.unlink()
    capsys.readouterr()
    assert run_cli("shards", "pack", table, "--out", out, *COLUMNS, "--embedding-column", "emb",
                   "--encoder", ENCODER, "--val-fraction", "0.3", "--max-count", "8",
                   "--workers", "1") == 0
    assert f"resuming: {len(kept) - 1} of {len(kept)} shards" in capsys.readouterr().out
    assert {path.name: path.read_bytes() for path in out.glob("*.tar")} == kept
    assert lost.is_file() and verify_embeddings(out, encoder_id)["complete"]


def test_a_column_made_otherwise_is_refused_with_the_measured_difference(table_parts, tmp_path,
                                                                        capsys):
    images, embeddings = table_parts
    scaled = [None if row is None else [1.05 * value for value in row] for row in embeddings]
    table = table_folder(tmp_path / "tampered", images, scaled)
    out = tmp_path / "out"
    assert run_cli("shards", "pack", table, "--out", out, "--embedding-column", "emb",
                   "--encoder", ENCODER, "--workers", "1") == 2
    error = error_line(capsys)
    assert ("the embeddings in column 'emb' are not timm-vit_tiny_patch16_224--random-" in error
            and "relative L2 difference median 5.00e-02 (max 5.00e-02) over 28 rows, above the "
            "tolerance 1e-02" in error), error
    assert not out.exists()  # refused before any work

    assert run_cli("shards", "pack", table, "--out", out, "--embedding-column", "emb",
                   "--encoder", ENCODER, "--embedding-tolerance", "0.06", "--workers", "1") == 0


def test_an_encoder_that_cannot_load_here_is_said_and_the_pack_goes_on(table, tmp_path, capsys):
    encoder_id = "path-foundation--0123456789ab--unit01"
    out = tmp_path / "out"
    assert run_cli("shards", "pack", table, "--out", out, "--embedding-column", "emb",
                   "--encoder", encoder_id, "--embedding-precision", "bf16",
                   "--workers", "1") == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning == [f"pathgan: warning: cannot load {encoder_id} here (--encoder gives an "
                       "encoder id, not a spec that can be loaded): the embeddings of column "
                       f"'emb' are written as {encoder_id}'s unchecked"]
    report = verify_embeddings(out, encoder_id)
    assert report["complete"] and report["precisions"] == ["bf16"]
    assert load_manifest(out)["embeddings"]["check"] == {
        "not_checked": "--encoder gives an encoder id, not a spec that can be loaded"}


def test_default_groups_are_the_files_of_the_table(table, tmp_path):
    out = tmp_path / "out"
    assert run_cli("shards", "pack", table / "data", "--out", out, "--workers", "1") == 0
    sources = load_manifest(out)["sources"]
    assert [(s["group"], s["samples"]) for s in sources] == [("train-0.parquet", 19),
                                                             ("train-1.parquet", 10)]
    assert load_manifest(out)["labels"] == {"None": 29}


@pytest.mark.usefixtures("offline_hub")
def test_a_hub_data_set_packs_from_the_local_cache_offline(table, tmp_path, capsys):
    from huggingface_hub import constants

    install_in_hf_cache(table, constants.HF_HUB_CACHE, repo_id="lab/patches")
    # a data set's cache layout is a model's under another prefix
    (Path(constants.HF_HUB_CACHE) / "models--lab--patches").rename(
        Path(constants.HF_HUB_CACHE) / "datasets--lab--patches")
    hub, local = tmp_path / "hub", tmp_path / "local"
    assert run_cli("shards", "pack", "hf-dataset:lab/patches", "--out", hub, *COLUMNS,
                   "--workers", "1") == 0
    assert run_cli("shards", "pack", table, "--out", local, *COLUMNS, "--workers", "1") == 0
    from_hub, from_folder = samples_by_row(hub), samples_by_row(local)
    assert from_hub.keys() == from_folder.keys() and len(from_hub) == 29
    for row, (split, _, image, metadata) in from_hub.items():
        np.testing.assert_array_equal(image, from_folder[row][2])
        assert (split, metadata["label"]) == (from_folder[row][0], from_folder[row][3]["label"])
    snapshots = str(Path(constants.HF_HUB_CACHE) / "datasets--lab--patches" / "snapshots")
    assert all(s["path"].startswith(snapshots) for s in load_manifest(hub)["sources"])

    capsys.readouterr()
    assert run_cli("shards", "pack", "hf-dataset:lab/absent", "--out", tmp_path / "x") == 2
    assert "hf-dataset:lab/absent is not in the local Hugging Face cache" in error_line(capsys)


@pytest.mark.usefixtures("offline_hub")
@pytest.mark.parametrize(("args", "message"), [
    (["--image-column", "img"], "has no column 'img' (its columns: image, diagnosis, patient, "
                                "emb)"),
    (["--label-column", "stage"], "has no column 'stage'"),
    (["--embedding-column", "emb"], "--embedding-column and --encoder go together"),
    (["--embedding-column", "patient", "--encoder", ENCODER], "holds string, not a list of "
                                                               "numbers"),
    (["--embedding-column", "emb", "--encoder", "hf-hub:lab/absent"],
     "cannot tell which encoder --encoder hf-hub:lab/absent is"),
    (["--embedding-column", "emb", "--encoder", "timm:vit_small_patch16_224:random"],
     "column 'emb' holds 192-d embeddings; timm-vit_small_patch16_224--random-"),
])
def test_table_errors_are_one_line(table, tmp_path, capsys, args, message):
    assert run_cli("shards", "pack", table, "--out", tmp_path / "out", "--workers", "1",
                   *args) == 2
    assert message in error_line(capsys)


def test_unsupported_encodings_and_table_options_without_a_table(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": [1, 2]}), tmp_path / "ints.parquet")
    assert run_cli("shards", "pack", tmp_path / "ints.parquet", "--out", tmp_path / "a") == 2
    assert ("unsupported image encoding in ints.parquet: column 'image' holds int64"
            in error_line(capsys))
    patch = tmp_path / "patches" / "p.png"
    patch.parent.mkdir()
    Image.new("RGB", (64, 64), "pink").save(patch)
    assert run_cli("shards", "pack", patch.parent, "--out", tmp_path / "b",
                   "--label-column", "label") == 2
    assert "--label-column applies to parquet tables, and no INPUT is one" in error_line(capsys)


def test_units_of_any_size_and_any_worker_count_give_the_same_bytes(packed, table, tmp_path,
                                                                    monkeypatch):
    from pathgan.shards import plan

    monkeypatch.setattr(plan, "TABLE_ROWS_PER_UNIT", 4)  # units start inside row groups
    out = tmp_path / "small-units"
    assert run_cli("shards", "pack", table, "--out", out, *COLUMNS, "--embedding-column", "emb",
                   "--encoder", ENCODER, "--val-fraction", "0.3", "--max-count", "8",
                   "--workers", "1") == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == {
        p.name: p.read_bytes() for p in packed.glob("*.tar")}
    encoder_id = load_manifest(out)["embeddings"]["encoder_id"]
    for shard in load_manifest(out)["shards"]:
        ours = read_embedding_file(embedding_path(out, encoder_id, shard["name"]))
        theirs = read_embedding_file(embedding_path(packed, encoder_id, shard["name"]))
        assert ours["keys"] == theirs["keys"] and ours["missing_keys"] == theirs["missing_keys"]
        np.testing.assert_array_equal(ours["embeddings"], theirs["embeddings"])


def test_a_table_packed_in_two_parts_merges_with_its_embeddings(packed, table, tmp_path):
    out = tmp_path / "merged"
    files = sorted((table / "data").glob("*.parquet"))
    for task, file in enumerate(files):
        assert run_cli("shards", "pack", file, "--out", out / "parts" / f"task-{task}", *COLUMNS,
                       "--embedding-column", "emb", "--encoder", ENCODER, "--val-fraction",
                       "0.3", "--max-count", "8", "--workers", "1") == 0
        (out / "parts" / f"task-{task}.done").write_text(json.dumps(
            {"task": task, "num_tasks": 2, "inputs": [str(file)]}))
    assert run_cli("shards", "merge", out) == 0
    assert run_cli("shards", "verify", out) == 0
    assert run_cli("embed", "verify", out, "--encoder", ENCODER) == 0
    merged = load_manifest(out)
    encoder_id = merged["embeddings"]["encoder_id"]
    assert merged["embeddings"]["column"] == "emb" and len(merged["merged_from"]["parts"]) == 2
    for shard in merged["shards"]:
        data = read_embedding_file(embedding_path(out, encoder_id, shard["name"]))
        assert data["meta"]["shard"] == shard["name"]
    one_pack = {row: sample[:2] for row, sample in samples_by_row(packed).items()}
    assert {row: sample[:2] for row, sample in samples_by_row(out).items()} == one_pack
    def embeddings_by_key(shards: Path) -> dict[str, list[float]]:
        keys, array = read_embeddings(shards, encoder_id, split=None)
        return dict(zip(keys, array.tolist(), strict=True))

    assert embeddings_by_key(out) == embeddings_by_key(packed)


@pytest.mark.usefixtures("offline_hub")
def test_path_foundation_that_cannot_load_here_is_named_by_its_cached_commit(table, tmp_path,
                                                                            monkeypatch, capsys):
    from huggingface_hub import constants

    from pathgan.encoders import path_foundation

    install_in_hf_cache(make_tiny_path_foundation(tmp_path / "pf"), constants.HF_HUB_CACHE)

    def no_tensorflow(*args, **kwargs):
        raise PathganError("Path Foundation needs TensorFlow: pip install 'pathgan[tensorflow]'")

    monkeypatch.setattr(path_foundation, "load_path_foundation", no_tensorflow)
    out = tmp_path / "out"
    assert run_cli("shards", "pack", table, "--out", out, "--embedding-column", "emb",
                   "--encoder", "path-foundation", "--workers", "1") == 0
    encoder_id = f"path-foundation--{TINY_COMMIT[:12]}--unit01"
    assert (f"pathgan: warning: cannot load path-foundation here (Path Foundation needs "
            f"TensorFlow: pip install 'pathgan[tensorflow]'): the embeddings of column 'emb' are "
            f"written as {encoder_id}'s unchecked") in capsys.readouterr().err
    assert verify_embeddings(out, encoder_id)["complete"]


def test_rows_without_a_group_take_their_files_group(table_parts, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images, _ = table_parts
    path = tmp_path / "table" / "part.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"image": [{"bytes": data} for data in images[:4]],
                             "patient": ["p1", None, "p1", None]}), path)
    out = tmp_path / "out"
    assert run_cli("shards", "pack", path.parent, "--out", out, "--group-column", "patient",
                   "--workers", "1") == 0
    groups = {s["group"]: s["samples"] for s in load_manifest(out)["sources"]}
    assert groups == {"p1": 2, "part.parquet": 2}


def test_read_units_join_small_row_groups_and_cut_big_ones_in_a_few():
    from pathgan.shards.plan import table_units

    assert table_units([0, 100, 200, 300, 400]).tolist() == [0, 300]  # Hub files: 100-row groups
    one_group = table_units([0, 1_000_000])  # pyarrow's default: one group for the whole file
    assert one_group.tolist() == list(range(0, 1_000_000, 62_500))  # 16 units, not 3907
    assert table_units([0, 100, 700]).tolist() == [0, 100, 356, 612]
    assert table_units([0]).tolist() == [0]  # an empty file
