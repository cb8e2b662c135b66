"""Packing with named tissue classes and a held-out region of one slide."""

import json

import pytest
from conftest import REPO, run_cli

from pathgan.shards import annotations
from pathgan.shards.format import class_names, load_manifest, split_labels
from pathgan.shards.reading import iter_tar_samples, shard_paths

SLIDE_XML = REPO / "shards" / "cmu_small_region.xml"


def _metadata(shards_dir, split=None) -> list[dict]:
    return [json.loads(members["json"]) for path in shard_paths(shards_dir, split)
            for _, members in iter_tar_samples(path)]


@pytest.fixture
def skin_shards(labelled_shards):
    return labelled_shards


def test_named_classes_become_labels_with_counts_per_split(skin_shards):
    manifest = load_manifest(skin_shards)
    assert class_names(manifest) == ["dermis", "epidermis"]
    slide = annotations.read_asap_xml(SLIDE_XML)
    for split in ("train", "val"):
        metadata = _metadata(skin_shards, split)
        counts = {}
        for meta in metadata:
            counts[meta["label"]] = counts.get(meta["label"], 0) + 1
            # every label is the class holding >= 70% of the patch
            assert slide.class_fractions(meta["x"], meta["y"], meta["patch_size"]
                                         )[meta["label"]] >= 0.7
        assert counts == split_labels(manifest, split)
        assert set(counts) == {"dermis", "epidermis"}  # both classes on both sides


def test_held_out_region_shares_no_pixel_with_train(skin_shards):
    manifest = load_manifest(skin_shards)
    groups = {split: {s["group"] for s in manifest["sources"] if s["split"] == split}
              for split in ("train", "val")}
    assert groups["val"] and groups["train"] and not groups["val"] & groups["train"]
    assert all(group.startswith("cmu_small_region@x") for group in groups["train"])

    def boxes(split):
        return [(m["x"], m["y"], m["x"] + m["patch_size"], m["y"] + m["patch_size"])
                for m in _metadata(skin_shards, split)]

    for vx0, vy0, vx1, vy1 in boxes("val"):
        for tx0, ty0, tx1, ty1 in boxes("train"):
            assert vx1 <= tx0 or tx1 <= vx0 or vy1 <= ty0 or ty1 <= vy0


def test_unannotated_slide_beside_named_classes_has_no_label(tmp_path, slide_path):
    folder = tmp_path / "annotations"
    folder.mkdir()
    (folder / "another_slide.xml").write_text(SLIDE_XML.read_text())
    out = tmp_path / "shards"
    assert run_cli("shards", "pack", slide_path, "--out", out, "--annotations", folder,
                   "--workers", "1") == 0
    assert {m["label"] for m in _metadata(out)} == {None}
    assert run_cli("shards", "pack", slide_path, "--out", tmp_path / "none", "--annotations",
                   folder, "--labelled-only", "--workers", "1") == 2  # nothing left: one line


def test_show_draws_one_class_and_refuses_an_unknown_one(skin_shards, tmp_path, capsys):
    assert run_cli("shards", "show", skin_shards, "--out", tmp_path / "e.png", "-n", "4",
                   "--label", "epidermis") == 0
    assert (tmp_path / "e.png").is_file()
    assert run_cli("shards", "show", skin_shards, "--out", tmp_path / "x.png",
                   "--label", "tumor") == 2
    assert "no sample labelled 'tumor'" in capsys.readouterr().err
