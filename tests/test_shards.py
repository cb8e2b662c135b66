"""Packing slides and patch folders into shards, verifying, showing and reading them back."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tiffslide
import torch
from conftest import cli_command, run_cli
from PIL import Image

from pathgan.shards.format import load_manifest, shard_paths
from pathgan.shards.inspect import verify_shards
from pathgan.shards.reading import iter_tar_samples, shard_keys
from pathgan.shards.stream import make_image_stream


def error_lines(stderr: str) -> list[str]:
    """The error lines of a command's stderr (progress bars aside); never a traceback."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("pathgan: error:")]


def all_keys(shards_dir: Path) -> list[str]:
    return [key for path in shard_paths(shards_dir) for key in shard_keys(path)]


def metadata_of(shards_dir: Path) -> list[dict]:
    return [
        json.loads(members["json"])
        for path in shard_paths(shards_dir)
        for _, members in iter_tar_samples(path)
    ]


def test_pack_writes_verified_shards_with_manifest(slide_shards):
    manifest = load_manifest(slide_shards)
    assert manifest["total_samples"] == sum(s["samples"] for s in manifest["shards"]) > 20
    assert len(manifest["shards"]) >= 3 and all(s["samples"] <= 12 for s in manifest["shards"])
    assert manifest["skipped"] == []
    assert manifest["config"]["patch_sizes"] == [224]
    keys = all_keys(slide_shards)
    assert len(keys) == len(set(keys)) == manifest["total_samples"]
    meta = metadata_of(slide_shards)[0]
    assert meta["source_type"] == "slide" and meta["patch_size"] == 224
    assert meta["mpp"] == pytest.approx(0.499) and meta["tissue_fraction"] >= 0.5
    assert verify_shards(slide_shards) == []
    assert run_cli("shards", "verify", slide_shards) == 0


def test_patches_match_the_slide_pixels(slide_shards, slide_path):
    first = shard_paths(slide_shards)[0]
    key, members = next(iter_tar_samples(first))
    meta = json.loads(members["json"])
    image = np.array(Image.open(__import__("io").BytesIO(members["png"])))
    region = tiffslide.TiffSlide(slide_path).read_region((meta["x"], meta["y"]), 0, (224, 224))
    np.testing.assert_array_equal(image, np.asarray(region.convert("RGB")))


def test_multi_size_patches_are_resized_to_224(tmp_path, slide_path):
    out = tmp_path / "multi"
    assert run_cli("shards", "pack", slide_path, "--out", out, "--patch-sizes", "512,1024",
                   "--format", "raw", "--workers", "1") == 0
    sizes = {m["patch_size"] for m in metadata_of(out)}
    assert sizes == {512, 1024}
    stream = make_image_stream(out, batch_size=2, num_workers=0)
    assert next(iter(stream)).shape == (2, 3, 224, 224)


def test_rerun_resumes_without_redoing_finished_shards(tmp_path, slide_path):
    out = tmp_path / "resume"
    args = ["shards", "pack", slide_path, "--out", out, "--max-count", "10", "--workers", "1"]
    assert run_cli(*args) == 0
    before = {p.name: (p.stat().st_mtime_ns, load_manifest(out)) for p in shard_paths(out)}
    lost = shard_paths(out)[1]
    original_sha = next(s["sha256"] for s in load_manifest(out)["shards"] if s["name"] == lost.name)
    lost.unlink()
    (out / "manifest.json").unlink()
    assert run_cli(*args) == 0
    for path in shard_paths(out):
        if path.name != lost.name:
            assert path.stat().st_mtime_ns == before[path.name][0], "a finished shard was redone"
    rewritten = next(s for s in load_manifest(out)["shards"] if s["name"] == lost.name)
    assert rewritten["sha256"] == original_sha  # shards are byte-for-byte reproducible
    assert verify_shards(out) == []


def test_killed_pack_finishes_on_rerun_without_duplicates(tmp_path, slide_path):
    out = tmp_path / "killed"
    command = cli_command("shards", "pack", slide_path, "--out", out, "--max-count", "1",
                          "--workers", "1")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / ".pack").glob("*.json")):
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert not (out / "manifest.json").exists(), "the pack finished before it could be killed"
    assert subprocess.run(command, capture_output=True).returncode == 0
    keys = all_keys(out)
    assert len(keys) == len(set(keys)) == load_manifest(out)["total_samples"]
    assert not list(out.glob(".*.tmp-*")), "a partial shard was left behind"
    assert verify_shards(out) == []


@pytest.fixture
def patch_folder(tmp_path, slide_path) -> Path:
    """Class sub-folders of 512 and 1024 px patches cut from the slide, plus one corrupt file."""
    slide = tiffslide.TiffSlide(slide_path)
    root = tmp_path / "patches"
    for label, origin in (("tumor", (600, 900)), ("normal", (1100, 1400))):
        (root / label).mkdir(parents=True)
        for index, size in enumerate((512, 1024, 512)):
            region = slide.read_region((origin[0] + 40 * index, origin[1]), 0, (size, size))
            region.convert("RGB").save(root / label / f"slide{index}_patch{index}.png")
    (root / "normal" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


def test_patch_folders_labels_resize_and_corrupt_file(tmp_path, patch_folder):
    out = tmp_path / "folder"
    assert run_cli("shards", "pack", patch_folder, "--out", out, "--max-skipped", "0.5",
                   "--workers", "1") == 0
    manifest = load_manifest(out)
    assert manifest["total_samples"] == 6
    assert manifest["labels"] == {"tumor": 3, "normal": 3}
    assert [Path(s["path"]).name for s in manifest["skipped"]] == ["broken.png"]
    assert manifest["skipped"][0]["reason"]
    assert {m["patch_size"] for m in metadata_of(out)} == {512, 1024}
    assert verify_shards(out) == []


def test_too_many_unreadable_inputs_fail_loudly(tmp_path, patch_folder, capsys):
    out = tmp_path / "strict"
    assert run_cli("shards", "pack", patch_folder, "--out", out, "--workers", "1") == 2
    error = error_lines(capsys.readouterr().err)
    assert len(error) == 1 and "could not be read" in error[0]
    assert [Path(s["path"]).name for s in load_manifest(out)["skipped"]] == ["broken.png"]


def test_unreadable_slide_is_skipped_and_reported(tmp_path, slide_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    shutil.copy(slide_path, folder / "good.svs")
    (folder / "bad.svs").write_bytes(b"II*\x00garbage" * 10)
    out = tmp_path / "out"
    assert run_cli("shards", "pack", folder, "--out", out, "--workers", "2",
                   "--max-skipped", "0.5") == 0
    manifest = load_manifest(out)
    assert [Path(s["path"]).name for s in manifest["skipped"]] == ["bad.svs"]
    assert manifest["total_samples"] > 20


def test_truncated_tar_fails_verify_and_is_skipped_by_the_pipeline(tmp_path, slide_shards):
    copy = tmp_path / "copy"
    shutil.copytree(slide_shards, copy)
    victim = shard_paths(copy)[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    problems = verify_shards(copy)
    assert any(victim.name in problem for problem in problems)
    assert run_cli("shards", "verify", copy) == 1
    stream = make_image_stream(copy, batch_size=4, num_workers=0)
    with pytest.warns(UserWarning, match="skipping"):
        batches = [batch for _, batch in zip(range(30), stream, strict=False)]
    assert len(batches) == stream.batches_per_epoch
    assert stream.skipped.count >= 1


def test_corrupt_sample_is_skipped_by_the_pipeline(tmp_path):
    import webdataset as wds

    from pathgan.core.fileio import sha256_file
    from pathgan.shards.format import encode_image

    out = tmp_path / "corrupt"
    out.mkdir()
    with wds.TarWriter(str(out / "train-000000.tar"), encoder=False) as sink:
        for index in range(8):
            image = np.full((224, 224, 3), index * 30, dtype=np.uint8)
            data = encode_image(image, "png") if index != 3 else b"corrupt bytes"
            sink.write({"__key__": f"k{index}", "png": data, "json": b"{}"})
    shard = {"name": "train-000000.tar", "split": "train", "samples": 8,
             "sha256": sha256_file(out / "train-000000.tar")}
    (out / "manifest.json").write_text(json.dumps(
        {"total_samples": 8, "shards": [shard], "skipped": []}))
    assert any("k3" in problem for problem in verify_shards(out))
    stream = make_image_stream(out, batch_size=7, num_workers=0, shuffle_buffer=1)
    with pytest.warns(UserWarning, match="corrupt sample k3"):
        batch = next(iter(stream))
    # >= 1: the stream's thread reads ahead, into the next pass over the shard and its k3
    assert batch.shape == (7, 3, 224, 224) and stream.skipped.count >= 1
    stream.close()


ASAP_XML = """<?xml version="1.0"?>
<ASAP_Annotations><Annotations>
<Annotation Name="Annotation 0" Type="Polygon" PartOfGroup="Tumor"><Coordinates>
<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="1100" Y="0"/>
<Coordinate Order="2" X="1100" Y="3000"/><Coordinate Order="3" X="0" Y="3000"/>
</Coordinates></Annotation>
<Annotation Name="Annotation 1" Type="Polygon" PartOfGroup="_2"><Coordinates>
<Coordinate Order="0" X="0" Y="0"/><Coordinate Order="1" X="1100" Y="0"/>
<Coordinate Order="2" X="1100" Y="1000"/><Coordinate Order="3" X="0" Y="1000"/>
</Coordinates></Annotation>
</Annotations><AnnotationGroups/></ASAP_Annotations>
"""


def test_labels_from_camelyon_xml(tmp_path, slide_path):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / f"{slide_path.stem}.xml").write_text(ASAP_XML)
    out = tmp_path / "labelled"
    assert run_cli("shards", "pack", slide_path, "--out", out, "--annotations", annotations,
                   "--workers", "1") == 0
    metadata = metadata_of(out)
    for meta in metadata:
        centre_x, centre_y = meta["x"] + 112, meta["y"] + 112
        expected = "tumor" if centre_x < 1100 and centre_y >= 1000 else "normal"
        assert meta["label"] == expected, meta
    assert {m["label"] for m in metadata} == {"tumor", "normal"}
    # With a fraction rule, a patch straddling the border needs that much of it inside.
    strict = tmp_path / "strict"
    assert run_cli("shards", "pack", slide_path, "--out", strict, "--annotations", annotations,
                   "--tumor-fraction", "1.0", "--workers", "1") == 0
    for meta in metadata_of(strict):
        inside = meta["x"] + 224 <= 1100 and meta["y"] >= 1000
        assert (meta["label"] == "tumor") == inside


def test_split_keeps_each_source_on_one_side(tmp_path, slide_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("a", "b", "c", "d"):
        (folder / f"slide_{name}.svs").symlink_to(slide_path)
    out = tmp_path / "split"
    assert run_cli("shards", "pack", folder, "--out", out, "--val-fraction", "0.25",
                   "--max-count", "16", "--workers", "2") == 0
    sides: dict[str, set[str]] = {}
    for path in shard_paths(out):
        split = path.name.split("-")[0]
        for _, members in iter_tar_samples(path):
            sides.setdefault(json.loads(members["json"])["source"], set()).add(split)
    assert len(sides) == 4 and all(len(s) == 1 for s in sides.values())
    assert sum(1 for s in sides.values() if s == {"val"}) == 1
    manifest = load_manifest(out)
    assert manifest["splits"]["val"]["samples"] * 3 == manifest["splits"]["train"]["samples"]


def test_pipeline_yields_normalised_images_and_equal_batches_per_rank(slide_shards):
    # 12 + 12 + 12 + rest samples over uneven shards: ranks must still agree on the count.
    counts = []
    for rank in range(2):
        stream = make_image_stream(slide_shards, batch_size=4, world_size=2, rank=rank,
                                   num_workers=2, seed=rank)
        batches = list(stream)
        counts.append(len(batches))
        assert all(b.dtype == torch.float32 and b.shape == (4, 3, 224, 224) for b in batches)
        stacked = torch.cat(batches)
        assert stacked.min() >= -1.0 and stacked.max() <= 1.0 and stacked.min() < -0.5
        assert len(list(stream)) == counts[-1]  # the next epoch has the same length
    total = load_manifest(slide_shards)["total_samples"]
    assert counts[0] == counts[1] == total // 8


def test_show_writes_a_grid(tmp_path, slide_shards, capsys):
    grid = tmp_path / "grid.png"
    assert run_cli("shards", "show", slide_shards, "--out", grid, "-n", "16") == 0
    assert "samples:" in capsys.readouterr().out
    with Image.open(grid) as image:
        assert image.size == (4 * 226 + 2, 4 * 226 + 2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["shards", "pack", "/no/such/slide.svs", "--out", "X"], "no such file"),
        (["shards", "pack", "SLIDE", "--out", "X", "--val-fraction", "2"], "--val-fraction"),
        (["shards", "pack", "SLIDE", "--out", "X", "--patch-sizes", "a,b"], "--patch-sizes"),
        (["shards", "pack", "EMPTY", "--out", "X"], "no slides or patch images"),
        (["shards", "pack", "SLIDE", "--out", "X", "--patch-sizes", "4000",
          "--workers", "1"], "no patches found"),
        (["shards", "verify", "EMPTY"], "manifest.json is missing"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, slide_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    replace = {"SLIDE": str(slide_path), "EMPTY": str(tmp_path / "empty"),
               "X": str(tmp_path / "out")}
    assert run_cli(*[replace.get(a, a) for a in args]) == 2
    error = error_lines(capsys.readouterr().err)
    assert len(error) == 1 and message in error[0]
