"""``pathgan shards convert``: the same samples in another image format, readable by pathgan and by
a plain webdataset client; embeddings carried; resumable; corrupt samples skipped and listed."""

import json
import shutil

import numpy as np
import pytest
import webdataset as wds
from conftest import run_cli

from pathgan.core.fileio import sha256_file
from pathgan.shards.embedding_files import (
    check_embedding_file,
    embedding_path,
    read_embedding_file,
    write_embedding_file,
)
from pathgan.shards.format import decode_sample, encode_image, load_manifest, shard_paths
from pathgan.shards.reading import iter_tar_samples, shard_keys

ENCODER_ID = "test-encoder"


def samples_of(shards_dir) -> dict[str, tuple[np.ndarray, bytes]]:
    """key -> (pixels, metadata bytes), every shard of a set, in order."""
    return {key: (decode_sample({"__key__": key, **members})[1], members["json"])
            for path in shard_paths(shards_dir) for key, members in iter_tar_samples(path)}


def embed_with_fake_encoder(shards_dir) -> None:
    """Embedding files as `pathgan embed` writes them, with made-up rows."""
    for shard in load_manifest(shards_dir)["shards"]:
        keys = shard_keys(shards_dir / shard["name"])
        rows = np.arange(len(keys) * 4, dtype=np.float32).reshape(len(keys), 4)
        write_embedding_file(embedding_path(shards_dir, ENCODER_ID, shard["name"]), keys, rows,
                             {}, {"encoder_id": ENCODER_ID, "dim": 4, "precision": "fp32",
                                  "shard": shard["name"], "split": shard["split"],
                                  "source_sha256": shard["sha256"]})


@pytest.fixture(scope="module")
def embedded_png(tmp_path_factory, slide_shards):
    out = tmp_path_factory.mktemp("embedded") / "png"
    shutil.copytree(slide_shards, out)
    embed_with_fake_encoder(out)
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory, embedded_png) -> dict:
    """The embedded PNG set converted to jpg and raw."""
    root = tmp_path_factory.mktemp("converted")
    sets = {"png": embedded_png}
    for image_format in ("jpg", "raw"):
        sets[image_format] = root / image_format
        workers = "2" if image_format == "raw" else "1"  # a process pool, and none
        assert run_cli("shards", "convert", embedded_png, "--out", sets[image_format],
                       "--format", image_format, "--workers", workers) == 0
    return sets


def test_every_format_holds_the_same_samples_in_the_same_order(converted):
    original = samples_of(converted["png"])
    for image_format in ("jpg", "raw"):
        assert [p.name for p in shard_paths(converted[image_format])] == \
            [p.name for p in shard_paths(converted["png"])]
        samples = samples_of(converted[image_format])
        assert list(samples) == list(original)  # keys, in shard order
        assert all(samples[key][1] == original[key][1] for key in original)  # metadata
        difference = np.mean([np.abs(samples[k][0].astype(int) - original[k][0]).mean()
                              for k in original])
        if image_format == "raw":
            assert difference == 0  # lossless
        else:
            assert 0 < difference < 3  # q95 JPEG: close, not equal
        assert run_cli("shards", "verify", converted[image_format]) == 0


def test_the_manifest_keeps_splits_groups_sources_and_labels(converted):
    source = load_manifest(converted["png"])
    for image_format, member in (("jpg", "jpg"), ("raw", "npy")):
        manifest = load_manifest(converted[image_format])
        assert manifest["splits"] == source["splits"]
        assert manifest["sources"] == source["sources"] and manifest["labels"] == source["labels"]
        assert manifest["config"]["image_format"] == member
        assert manifest["converted_from"]["image_format"] == "png"
        for shard in manifest["shards"]:
            assert shard["sha256"] == sha256_file(converted[image_format] / shard["name"])


def test_a_plain_webdataset_client_reads_every_format(converted):
    keys = list(samples_of(converted["png"]))
    for image_format in ("png", "jpg", "raw"):
        urls = [str(path) for path in shard_paths(converted[image_format])]
        dataset = wds.WebDataset(urls, shardshuffle=False).decode("rgb8")
        read = [(sample["__key__"], sample.get("png", sample.get("jpg", sample.get("npy"))))
                for sample in dataset]
        assert [key for key, _ in read] == keys
        assert all(image.shape == (224, 224, 3) and image.dtype == np.uint8
                   for _, image in read)


def test_embedding_files_are_carried_and_check_against_the_new_shards(converted):
    for image_format in ("jpg", "raw"):
        for shard in load_manifest(converted[image_format])["shards"]:
            path = embedding_path(converted[image_format], ENCODER_ID, shard["name"])
            assert check_embedding_file(path, shard, ENCODER_ID) is None
            before = read_embedding_file(embedding_path(converted["png"], ENCODER_ID,
                                                        shard["name"]))
            after = read_embedding_file(path)
            assert after["keys"] == before["keys"]
            assert np.array_equal(after["embeddings"], before["embeddings"])


def test_a_rerun_resumes_and_rewrites_only_what_is_missing(tmp_path, converted, capsys):
    out = tmp_path / "jpg"
    shutil.copytree(converted["jpg"], out)
    first, second = shard_paths(out)[:2]
    kept = sha256_file(second)
    first.unlink()
    (out / f".{second.name}.tmp-99999").write_bytes(b"left by a killed run")
    assert run_cli("shards", "convert", converted["png"], "--out", out, "--format", "jpg",
                   "--workers", "1") == 0
    assert "resuming:" in capsys.readouterr().out
    assert first.is_file() and sha256_file(second) == kept
    assert not list(out.glob(".*.tmp-*"))
    assert load_manifest(out)["shards"] == load_manifest(converted["jpg"])["shards"]


def test_corrupt_samples_are_skipped_listed_and_left_out_of_the_embeddings(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    shard = source / "train-000000.tar"
    with wds.TarWriter(str(shard), encoder=False) as sink:
        for index in range(6):
            image = np.full((224, 224, 3), index * 40, dtype=np.uint8)
            data = encode_image(image, "png") if index != 2 else b"corrupt bytes"
            sink.write({"__key__": f"k{index}", "png": data, "json": b'{"label": 1}'})
    entry = {"name": shard.name, "split": "train", "samples": 6, "sha256": sha256_file(shard)}
    (source / "manifest.json").write_text(json.dumps(
        {"total_samples": 6, "shards": [entry], "skipped": [], "labels": {"1": 6},
         "config": {"image_format": "png"}}))
    embed_with_fake_encoder(source)
    out = tmp_path / "raw"
    assert run_cli("shards", "convert", source, "--out", out, "--format", "raw",
                   "--max-skipped", "0.5", "--workers", "1") == 0
    manifest = load_manifest(out)
    assert manifest["total_samples"] == 5 and manifest["labels"] == {"1": 5}
    assert [item["key"] for item in manifest["skipped"]] == ["k2"]
    embeddings = embedding_path(out, ENCODER_ID, shard.name)
    assert check_embedding_file(embeddings, manifest["shards"][0], ENCODER_ID) is None
    assert "k2" not in read_embedding_file(embeddings)["keys"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["PNG", "--out", "X", "--format", "png"], "png already"),
        (["PNG", "--out", "PNG", "--format", "jpg"], "another folder than SRC"),
        (["EMPTY", "--out", "X", "--format", "jpg"], "manifest.json is missing"),
        (["PNG", "--out", "X", "--format", "jpg", "--jpeg-quality", "0"], "--jpeg-quality"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, slide_shards, capsys, args, message):
    (tmp_path / "empty").mkdir()
    replace = {"PNG": str(slide_shards), "EMPTY": str(tmp_path / "empty"),
               "X": str(tmp_path / "out")}
    assert run_cli("shards", "convert", *[replace.get(a, a) for a in args]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(error) == 1 and message in error[0]
