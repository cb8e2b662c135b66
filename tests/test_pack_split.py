"""The validation split: decided per group from a hash of its id, whoever packs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import tiffslide
from conftest import REPO, run_cli

from pathgan.shards.format import load_manifest, shard_paths
from pathgan.shards.options import PackOptions
from pathgan.shards.reading import iter_tar_samples
from pathgan.shards.sources import discover_sources


def membership(shards_dir: Path) -> dict[str, str]:
    """key -> split of every sample of a shard set."""
    return {key: path.name.split("-")[0]
            for path in shard_paths(shards_dir) for key, _ in iter_tar_samples(path)}


def patch_folders(root: Path, slide_path: Path, count: int) -> list[Path]:
    """``count`` folders of two small patch images each, one folder per (pretend) slide."""
    slide = tiffslide.TiffSlide(slide_path)
    folders = []
    for index in range(count):
        folder = root / f"slide_{index:02d}"
        folder.mkdir(parents=True)
        for patch in range(2):
            region = slide.read_region((100 * index, 150 * patch + 900), 0, (96, 96))
            region.convert("RGB").save(folder / f"patch_{patch}.png")
        folders.append(folder)
    return folders


def test_one_pack_and_a_two_task_array_give_the_same_split(tmp_path, slide_path, capfd):
    folders = patch_folders(tmp_path / "patches", slide_path, 12)
    options = ["--val-fraction", "0.3", "--max-count", "5"]
    single = tmp_path / "single"
    assert run_cli("shards", "pack", *folders, "--out", single, "--workers", "1", *options) == 0
    warnings = capfd.readouterr().err

    array = tmp_path / "array"
    env = {**os.environ, "PYTHONPATH": str(REPO), "VIRTUAL_ENV": sys.prefix,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PATHGAN_NUM_TASKS": "2", "SLURM_CPUS_PER_TASK": "1"}
    for task in ("0", "1"):
        done = subprocess.run(["bash", "slurm/pack.sbatch", array, *folders, "--", *options],
                              cwd=REPO, env={**env, "SLURM_ARRAY_TASK_ID": task},
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]

    assert membership(array) == membership(single)
    assert set(membership(single).values()) == {"train", "val"}
    assert "merge: groups: train 10, val 2" in done.stdout
    assert "the val split has 2 group(s) of 12 (fewer than 5)" in warnings
    merged, one = load_manifest(array), load_manifest(single)
    for split in ("train", "val"):
        assert merged["splits"][split]["groups"] == one["splits"][split]["groups"]
    val_groups = {s["group"] for s in one["sources"] if s["split"] == "val"}
    assert val_groups == {"slide_05", "slide_08"}


def test_default_groups_are_slide_names_and_patch_folders(tmp_path, slide_path):
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "patient_7_node_1.svs").symlink_to(slide_path)
    (tmp_path / "slides" / "patient_7_node_2.svs").symlink_to(slide_path)
    patch_folders(tmp_path / "patches", slide_path, 2)
    inputs = [str(tmp_path / "slides"), str(tmp_path / "patches")]

    groups = {Path(s.path).name if s.kind == "slide" else f"{Path(s.path).parent.name}/"
              f"{Path(s.path).name}": s.group for s in discover_sources(inputs, PackOptions())}
    assert groups == {"patient_7_node_1.svs": "patient_7_node_1",
                      "patient_7_node_2.svs": "patient_7_node_2",
                      "slide_00/patch_0.png": "slide_00", "slide_00/patch_1.png": "slide_00",
                      "slide_01/patch_0.png": "slide_01", "slide_01/patch_1.png": "slide_01"}

    by_patient = PackOptions(group_pattern=r"^(patient_\d+)")
    slide_groups = {s.group for s in discover_sources(inputs, by_patient) if s.kind == "slide"}
    assert slide_groups == {"patient_7"}


def test_a_groups_side_does_not_depend_on_the_other_inputs(tmp_path, slide_path):
    folders = patch_folders(tmp_path / "patches", slide_path, 6)
    all_six, last_three = tmp_path / "all", tmp_path / "three"
    for out, inputs in ((all_six, folders), (last_three, folders[3:])):
        assert run_cli("shards", "pack", *inputs, "--out", out, "--val-fraction", "0.5",
                       "--workers", "1") == 0
    sides = membership(all_six)
    assert {key: sides[key] for key in membership(last_three)} == membership(last_three)
    sources = json.dumps(load_manifest(all_six)["sources"])
    assert '"split": "val"' in sources and '"split": "train"' in sources


def pack_part(out: Path, task: int, num_tasks: int, inputs: list, *options) -> None:
    """What slurm/pack.sbatch's task does before merging: a part and its done marker."""
    if inputs:
        assert run_cli("shards", "pack", *inputs, "--out", out / "parts" / f"task-{task}",
                       "--workers", "1", *options) == 0
    marker = {"task": task, "num_tasks": num_tasks, "inputs": [str(i) for i in inputs]}
    (out / "parts" / f"task-{task}.done").write_text(json.dumps(marker))


def test_shards_merge_makes_two_parts_one_shard_set(tmp_path, slide_path, capsys):
    folders = patch_folders(tmp_path / "patches", slide_path, 6)
    options = ["--val-fraction", "0.5", "--max-count", "3"]
    out = tmp_path / "merged"
    pack_part(out, 0, 3, folders[:4], *options)
    assert run_cli("shards", "merge", out, "--if-complete") == 0  # tasks 1 and 2 still run
    assert "merge: waiting for task(s) [1, 2] of 3" in capsys.readouterr().out
    assert not (out / "manifest.json").exists()
    assert run_cli("shards", "merge", out) == 2
    assert "task(s) [1, 2] of 3 have not finished" in capsys.readouterr().err

    pack_part(out, 1, 3, folders[4:], *options)
    pack_part(out, 2, 3, [])  # more tasks than inputs
    (out / "train-000009.tar").write_bytes(b"left by an older merge")
    assert run_cli("shards", "merge", out, "--if-complete") == 0
    assert run_cli("shards", "verify", out) == 0
    assert not (out / "train-000009.tar").exists()
    merged, parts = load_manifest(out), [load_manifest(out / "parts" / f"task-{i}") for i in (0, 1)]
    assert [s["part"] for s in merged["shards"]] == [
        f"task-{i}/{s['name']}" for i, part in enumerate(parts) for s in part["shards"]]
    assert [s["name"] for s in merged["shards"] if s["split"] == "train"] == [
        f"train-{n:06d}.tar" for n in range(merged["splits"]["train"]["shards"])]
    assert merged["total_samples"] == 12 and merged["sources"] == [*parts[0]["sources"],
                                                                   *parts[1]["sources"]]
    assert merged["config"]["inputs"] == [str(f) for f in folders]
    assert [p["samples"] for p in merged["merged_from"]["parts"]] == [8, 4, 0]
    single = tmp_path / "single"
    assert run_cli("shards", "pack", *folders, "--out", single, "--workers", "1", *options) == 0
    assert membership(out) == membership(single)
    for split, counts in load_manifest(single)["splits"].items():
        assert (merged["splits"][split]["samples"], merged["splits"][split]["groups"]) == (
            counts["samples"], counts["groups"])
