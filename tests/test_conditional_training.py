"""Conditional training on the bundled slide's two tissues, and labelled synthetic shards."""

import json
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import REPO, cli_command, run_cli
from test_train import train_two_processes

from pathgan.config import load_config
from pathgan.core.errors import PathganError
from pathgan.evaluation.utility_job import check_splits
from pathgan.models.conditional import ConditionalR3Generator
from pathgan.runs import RunDir, load_generator, read_generator_config
from pathgan.shards.format import load_manifest, split_labels
from pathgan.shards.reading import iter_tar_samples, shard_paths
from pathgan.train.classes import training_classes
from pathgan.train.loop import fake_classes
from pathgan.train.objective import GANObjective, RelativisticObjective, labels_key

SMOKE = REPO / "configs" / "dcgan-smoke.yaml"
R3GAN_SMOKE = REPO / "configs" / "r3gan-smoke.yaml"
CLASSES = ["dermis", "epidermis"]


@pytest.fixture(scope="module")
def conditional_run(tmp_path_factory, labelled_shards):
    run_dir = tmp_path_factory.mktemp("runs") / "conditional"
    result = subprocess.run(cli_command(
        "train", "--config", SMOKE, f"data.shards={labelled_shards}", f"run.dir={run_dir}",
        "model.conditional=true", "data.class_balance=balanced", "train.max_steps=4",
        "log.sample_every=2", "ckpt.every=4"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "classes: dermis (" in result.stdout
    return run_dir


def test_generator_json_lists_the_classes_and_grids_are_per_class(conditional_run,
                                                                   labelled_shards):
    config = read_generator_config(conditional_run)
    counts = split_labels(load_manifest(labelled_shards), "train")
    assert config["classes"] == CLASSES
    assert config["class_counts"] == [counts[name] for name in CLASSES]
    assert config["class_balance"] == "balanced"
    grids = RunDir(conditional_run).newest_class_sample_grids(CLASSES)
    assert sorted(grids) == CLASSES and all(grid.name == "step_000004.png"
                                            for grid in grids.values())
    generator, _ = load_generator(conditional_run)
    torch.testing.assert_close(generator.class_mix, torch.tensor([0.5, 0.5]))
    noise = torch.randn(2, config["nz"])
    one, other = (generator(noise, torch.full((2,), code)) for code in (0, 1))
    assert not torch.allclose(one, other)  # the class steers the picture


def test_the_modern_gan_trains_conditionally_with_its_penalties(tmp_path, labelled_shards):
    run_dir = tmp_path / "r3gan"
    assert run_cli("train", "--config", R3GAN_SMOKE, f"data.shards={labelled_shards}",
                   f"run.dir={run_dir}", "model.conditional=true", "train.max_steps=2",
                   "train.penalty_every=1", "log.every=1", "log.wandb=false",
                   "log.sample_every=2", "ckpt.every=2") == 0
    rows = RunDir(run_dir).read_metrics()
    assert [row["step"] for row in rows] == [1, 2] and all(row["R1"] >= 0 for row in rows)
    generator, config = load_generator(run_dir)
    assert isinstance(generator, ConditionalR3Generator) and config["classes"] == CLASSES
    assert sorted(RunDir(run_dir).newest_class_sample_grids(CLASSES)) == CLASSES
    noise = torch.randn(2, config["nz"])
    with torch.no_grad():
        one, other = (generator(noise, torch.full((2,), code)) for code in (0, 1))
    assert not torch.allclose(one, other)


@pytest.mark.slow
def test_two_process_conditional_training_keeps_ranks_identical(tmp_path, labelled_shards):
    """Labels travel in each rank's share of the cache (balanced draws, flips and turns of the
    real patches drawn on each rank): the ranks still end with the same weights, the class
    embeddings of G and D among them."""
    run_dir = tmp_path / "ddp"
    params = train_two_processes(
        tmp_path, R3GAN_SMOKE, run_dir, f"data.shards={labelled_shards}",
        "model.conditional=true", "data.class_balance=balanced", "data.flip_rotate=true",
        "train.max_steps=4", "train.penalty_every=2", "log.wandb=false", "ckpt.every=4")
    embeddings = sorted(name for name in params if "class_embedding" in name)
    assert embeddings == ["generator.class_embedding.weight", "images.class_embedding.weight"]
    assert [row["step"] for row in RunDir(run_dir).read_metrics()] == [2, 4]
    assert read_generator_config(run_dir)["classes"] == CLASSES


def test_relativistic_pairs_draw_each_fake_for_its_real_partners_class():
    real = {"images": torch.zeros(6, 3, 8, 8),
            labels_key("images"): torch.tensor([1, 0, 1, 1, 0, 1])}
    paired = SimpleNamespace(class_mix=torch.tensor([0.5, 0.5]),
                             objective=RelativisticObjective({}, {}))
    assert torch.equal(fake_classes(paired, real, 6), real[labels_key("images")])
    torch.manual_seed(0)
    apart = SimpleNamespace(class_mix=torch.tensor([0.0, 1.0]), objective=GANObjective({}, {}))
    assert torch.equal(fake_classes(apart, real, 6), torch.ones(6, dtype=torch.long))
    assert fake_classes(SimpleNamespace(class_mix=None), real, 6) is None


def _samples(shards_dir):
    return [json.loads(members["json"]) for path in shard_paths(shards_dir)
            for _, members in iter_tar_samples(path)]


def test_sample_writes_labelled_shards_any_webdataset_client_reads(conditional_run, tmp_path):
    out = tmp_path / "epidermis"
    assert run_cli("sample", conditional_run, "-n", "5", "--label", "epidermis",
                   "--format", "shards", "--out", out, "--per-shard", "3") == 0
    manifest = load_manifest(out)
    assert manifest["labels"] == {"epidermis": 5}
    assert split_labels(manifest, "train") == {"epidermis": 5}
    assert [sample["label"] for sample in _samples(out)] == ["epidermis"] * 5
    assert run_cli("shards", "verify", out) == 0
    urls = [str(path) for path in shard_paths(out)]
    read = list(wds.WebDataset(urls, shardshuffle=False).decode("rgb8").to_tuple("png", "json"))
    assert len(read) == 5 and read[0][0].shape == (224, 224, 3)
    assert {metadata["label"] for _, metadata in read} == {"epidermis"}


def test_labels_shared_equally_or_like_a_real_set(conditional_run, labelled_shards, tmp_path):
    assert run_cli("sample", conditional_run, "-n", "5", "--label", "dermis,epidermis",
                   "--format", "shards", "--out", tmp_path / "both") == 0
    assert load_manifest(tmp_path / "both")["labels"] == {"dermis": 3, "epidermis": 2}
    assert run_cli("sample", conditional_run, "-n", "20", "--labels-like", labelled_shards,
                   "--format", "shards", "--out", tmp_path / "like") == 0
    real = split_labels(load_manifest(labelled_shards), "train")
    like = load_manifest(tmp_path / "like")["labels"]
    assert sum(like.values()) == 20
    assert abs(like["dermis"] / 20 - real["dermis"] / sum(real.values())) <= 1 / 20
    # PNG files go to class folders: what `pathgan shards pack` reads as classes
    assert run_cli("sample", conditional_run, "-n", "4", "--out", tmp_path / "png") == 0
    names = {path.parent.name for path in (tmp_path / "png").glob("*/*.png")}
    assert names <= set(CLASSES) and len(list((tmp_path / "png").glob("*/*.png"))) == 4


def test_the_same_sample_comes_back_with_the_same_class(conditional_run, tmp_path):
    for name in ("a", "b"):
        assert run_cli("sample", conditional_run, "-n", "3", "--label", "dermis",
                       "--format", "shards", "--out", tmp_path / name) == 0
    first, second = (np.frombuffer(members["png"], np.uint8) for name in ("a", "b")
                     for path in shard_paths(tmp_path / name)
                     for _, members in list(iter_tar_samples(path))[:1])
    assert np.array_equal(first, second)


def test_bad_labels_are_one_line_errors(conditional_run, tmp_path, capsys, smoke_generator):
    assert run_cli("sample", conditional_run, "-n", "2", "--label", "tumor",
                   "--out", tmp_path / "x") == 2
    assert "class 'tumor' is not one this generator draws (dermis, epidermis)" in \
        capsys.readouterr().err
    assert run_cli("sample", smoke_generator, "-n", "2", "--label", "dermis",
                   "--out", tmp_path / "y") == 2
    assert "this generator is unconditional" in capsys.readouterr().err


@pytest.fixture
def smoke_generator(tmp_path, slide_shards):
    """An untrained unconditional generator, exported (0 steps)."""
    run_dir = tmp_path / "plain"
    assert run_cli("train", "--config", SMOKE, f"data.shards={slide_shards}",
                   f"run.dir={run_dir}", "train.max_steps=0") == 0
    return run_dir


def _config(shards, **overrides):
    config = load_config(SMOKE, [f"data.shards={shards}", "model.conditional=true"])
    for key, value in overrides.items():
        setattr(config.data, key, value)
    return config


def _fake_set(folder, train: dict, val: dict):
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({
        "format": "pathgan-shards/1", "total_samples": 0, "shards": [],
        "splits": {"train": {"samples": sum(train.values()), "shards": 0, "labels": train},
                   "val": {"samples": sum(val.values()), "shards": 0, "labels": val}}}))
    return folder


def test_conditioning_needs_labels_for_every_training_sample_and_class(tmp_path, slide_shards):
    with pytest.raises(PathganError, match="needs labelled samples"):
        training_classes(_config(slide_shards))
    missing = _fake_set(tmp_path / "missing", {"dermis": 5}, {"dermis": 1, "epidermis": 2})
    with pytest.raises(PathganError, match="class 'epidermis' has no samples in the train"):
        training_classes(_config(missing))
    mixed = _fake_set(tmp_path / "mixed", {"dermis": 5, "None": 2}, {})
    with pytest.raises(PathganError, match="2 of the 7 train samples .* have no label"):
        training_classes(_config(mixed))
    fine = _fake_set(tmp_path / "fine", {"dermis": 6, "epidermis": 2}, {})
    classes = training_classes(_config(fine, class_balance="sampled"))
    assert classes.names == ("dermis", "epidermis") and classes.mix == (0.75, 0.25)


def test_eval_scores_a_conditional_run_per_class(conditional_run, labelled_shards, tmp_path):
    assert run_cli("eval", conditional_run, "--real", labelled_shards, "-n", "16",
                   "--encoder", "stain-texture", "--out", tmp_path / "eval") == 0
    entry = json.loads((tmp_path / "eval" / "eval.json").read_text())["runs"][0]
    val = split_labels(load_manifest(labelled_shards), "val")
    assert sorted(entry["classes"]) == CLASSES
    assert sum(scores["n"] for scores in entry["classes"].values()) == 16
    drawn = min(16, sum(val.values()))  # real samples in the draw
    for name, scores in entry["classes"].items():
        assert scores["n_real"] <= val[name]
        assert abs(scores["n"] - scores["n_real"] * 16 / drawn) <= 1  # in the real draw's mix
        if min(scores["n"], scores["n_real"]) >= 4:  # k + 1 a side
            assert scores["fd"] > 0 and scores["swd"] > 0
        else:
            assert "not scored" in scores["note"]
    assert any("fd" in scores for scores in entry["classes"].values())
    assert "| epidermis |" in (tmp_path / "eval" / "report.md").read_text()


def test_utility_trains_three_ways_and_tests_on_the_held_out_val(conditional_run,
                                                                 labelled_shards, tmp_path):
    out = tmp_path / "utility"
    assert run_cli("utility", conditional_run, "--real", labelled_shards, "--seeds", "2",
                   "--out", out) == 0
    result = json.loads((out / "utility.json").read_text())
    assert result["classes"] == CLASSES and len(result["per_seed"]) == 2
    assert result["held_out"].startswith("yes")
    assert result["counts"]["synthetic"] == result["counts"]["train"]
    for way in ("real", "synthetic", "real+synthetic", "gan-test"):
        for metric in ("accuracy", "balanced_accuracy", "auroc"):
            figure = result["summary"][way][metric]
            assert 0 <= figure["min"] <= figure["mean"] <= figure["max"] <= 1
    # the real epidermis and dermis are told apart by the fixed classifier
    assert result["summary"]["real"]["balanced_accuracy"]["mean"] > 0.7
    report = (out / "utility.md").read_text()
    assert "| synthetic |" in report and "GAN-test" in report
    assert (out / "utility.png").stat().st_size > 0


def test_utility_refuses_what_it_cannot_test(conditional_run, smoke_generator, slide_shards,
                                             labelled_shards, tmp_path, capsys):
    assert run_cli("utility", smoke_generator, "--real", labelled_shards, "--out", tmp_path) == 2
    assert "is unconditional" in capsys.readouterr().err
    assert run_cli("utility", conditional_run, "--real", slide_shards, "--out", tmp_path) == 2
    assert "has no sample of the generator's classes" in capsys.readouterr().err


def test_a_one_class_val_split_cannot_test_a_classifier():
    two = torch.tensor([0, 1, 1])
    with pytest.raises(PathganError, match="val split of S has only dermis of the classes"):
        check_splits(two, torch.tensor([0, 0]), CLASSES, "S")
    with pytest.raises(PathganError, match="val split of S has no sample"):
        check_splits(two, torch.tensor([], dtype=torch.long), CLASSES, "S")
    with pytest.raises(PathganError, match="train split of S has only epidermis"):
        check_splits(torch.tensor([1]), two, CLASSES, "S")
    check_splits(two, two, CLASSES, "S")


def test_push_carries_the_classes_per_class_scores_and_utility(conditional_run,
                                                                labelled_shards, tmp_path):
    assert run_cli("eval", conditional_run, "--real", labelled_shards, "-n", "16",
                   "--encoder", "stain-texture") == 0
    assert run_cli("utility", conditional_run, "--real", labelled_shards, "--seeds", "1") == 0
    folder = tmp_path / "repo"
    assert run_cli("push", conditional_run, "--repo", "lab/skin", "--dry-run", folder) == 0
    assert json.loads((folder / "generator.json").read_text())["classes"] == CLASSES
    assert {"samples-dermis.png", "samples-epidermis.png", "utility.json"} <= {
        path.name for path in folder.iterdir()}
    card = (folder / "README.md").read_text()
    assert "## Classes" in card and "![epidermis](samples-epidermis.png)" in card
    assert "--label dermis" in card and "### Per class (`pathgan eval`)" in card
    assert "| synthetic only (CAS) |" in card
    published = (folder / "utility.json").read_text()
    assert str(labelled_shards) not in published and str(conditional_run) not in published
