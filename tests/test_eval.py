"""``pathgan eval`` on a tiny trained run: files, one vs two processes, embeddings, in-loop use."""

import json
import math
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO, cli_command, run_cli

# a 224-input timm model small enough for 2 CPU cores; random weights, no download
ENCODER = "timm:mobilenetv3_small_050:random"
N = 15  # odd: two processes get uneven slices (8 + 7), padding must be dropped
RUN_KEYS = {"fd", "kid_mean", "kid_std", "precision", "recall", "swd", "swd_levels", "n",
            "encoder"}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, slide_shards):
    run_dir = tmp_path_factory.mktemp("eval") / "tiny-run"
    command = cli_command("train", "--config", REPO / "configs" / "dcgan-smoke.yaml",
                          f"data.shards={slide_shards}", f"run.dir={run_dir}",
                          "train.max_steps=4", "log.wandb=false", "ckpt.every=4",
                          "log.sample_every=4")
    subprocess.run(command, check=True, cwd=REPO, capture_output=True)
    assert (run_dir / "generator.safetensors").is_file()
    return run_dir


@pytest.fixture(scope="module")
def single(tiny_run, slide_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-one")
    assert run_cli("eval", tiny_run, "--real", slide_shards, "-n", N, "--encoder", ENCODER,
                   "--out", out, "--batch-size", 8) == 0
    return out, json.loads((out / "eval.json").read_text())


@pytest.mark.slow
def test_eval_writes_json_and_report(single, tiny_run):
    out, result = single
    (run,) = result["runs"]
    assert set(run) >= RUN_KEYS
    assert run["n"] == N and run["n_real"] == N
    assert run["encoder"].startswith("timm-mobilenetv3_small_050--random-")
    assert run["real_split"] == "train"  # one slide: no val split, said so
    assert "no val split" in result["real"]["note"]
    assert all(math.isfinite(run[key]) for key in ("fd", "kid_mean", "kid_std"))
    assert 0 <= run["precision"] <= 1 and 0 <= run["recall"] <= 1
    assert run["swd"] > 0 and list(run["swd_levels"]) == ["224", "112", "56", "28"]
    assert run["swd"] == pytest.approx(sum(run["swd_levels"].values()) / 4)
    # 4 steps of a DCGAN: already its transposed convolutions' lattice, far above real patches
    assert run["spectral_period"] in (2, 4, 8, 16, 32) and result["real"]["spectral_peak"] > 1
    assert run["spectral_peak"] > 5 * result["real"]["spectral_peak"]
    report = (out / "report.md").read_text()
    assert "SWD" in report and "Laplacian" in report and "spectral peak" in report
    assert "tiny-run" in report and run["encoder"] in report
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"real.png", "tiny-run-fake.png", "tiny-run-loss.png"} <= set(images)
    assert all((out / image).is_file() for image in images)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_an_eval_written_outside_the_run_is_found_from_it(single, tiny_run):
    from pathgan.runs import RunDir

    out, _ = single
    assert (out / "eval.json").resolve() in RunDir(tiny_run).eval_results()


def test_a_run_scored_in_the_encoder_it_trained_against_is_said():
    from pathgan.evaluation.job import trained_against

    embgan = {"kind": "embgan", "encoder": "timm:x:random", "encoder_id": "timm-x--random-1"}
    assert trained_against(embgan, "timm:x:random", "another-id")
    assert trained_against(embgan, "path-foundation:/copy", "timm-x--random-1")
    assert not trained_against(embgan, "timm:y:random", "timm-y--random-2")
    assert not trained_against({"kind": "dcgan", "encoder": None, "encoder_id": None},
                               "timm:x:random", "timm-x--random-1")


@pytest.mark.slow
def test_two_processes_give_the_same_figures(single, tiny_run, slide_shards, tmp_path):
    _, expected = single
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               "-m", "pathgan", "eval", str(tiny_run), "--real", str(slide_shards), "-n", str(N),
               "--encoder", ENCODER, "--out", str(tmp_path), "--batch-size", "4"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["processes"] == 2
    got, want = result["runs"][0], expected["runs"][0]
    assert got["n"] == want["n"] == N and got["n_real"] == want["n_real"]
    for key in ("fd", "kid_mean", "precision", "recall", "swd"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-9), key


@pytest.mark.slow
def test_precomputed_embeddings_are_used(single, tiny_run, slide_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(slide_shards, shards, ignore=shutil.ignore_patterns("embeddings"))
    assert run_cli("embed", shards, "--encoder", ENCODER, "--num-workers", "0",
                   "--no-progress") == 0
    # two runs (the same one twice) compared in one table
    assert run_cli("eval", tiny_run, tiny_run, "--real", shards, "-n", N, "--encoder", ENCODER,
                   "--out", tmp_path / "out") == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["real"]["source"] == "embeddings"
    assert [run["name"] for run in result["runs"]] == ["tiny-run", "tiny-run-2"]
    for run in result["runs"]:
        assert run["fd"] == pytest.approx(single[1]["runs"][0]["fd"], rel=1e-3)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| tiny-run |" in report and "| tiny-run-2 |" in report


@pytest.mark.slow
def test_in_loop_evaluator_matches_pathgan_eval(single, tiny_run, slide_shards):
    from pathgan.evaluation import InLoopEvaluator
    from pathgan.runs import load_generator

    generator, _ = load_generator(tiny_run)
    generator.train()
    evaluator = InLoopEvaluator(slide_shards, None, ENCODER, N, "cpu", subsets=100)
    first = evaluator(generator)
    assert generator.training  # its mode is given back
    assert first["fd"] == pytest.approx(single[1]["runs"][0]["fd"], rel=1e-4)
    assert first["swd"] == pytest.approx(single[1]["runs"][0]["swd"], rel=1e-4)
    assert first["real_split"] == "train" and first["n"] == N
    assert evaluator(generator)["fd"] == first["fd"]  # real features cached, same noise


@pytest.mark.slow
def test_inception_without_weights_is_one_clear_line(tiny_run, slide_shards, tmp_path,
                                                     monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    code = run_cli("eval", tiny_run, "--real", slide_shards, "-n", 8, "--encoder", ENCODER,
                   "--inception", "--out", tmp_path / "out")
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "weights-inception-2015-12-05" in error[-1] and "--inception-weights" in error[-1]
    assert not (tmp_path / "out").exists()


def test_default_encoder_comes_from_the_runs(tmp_path):
    from pathgan.core.errors import PathganError
    from pathgan.evaluation import DEFAULT_ENCODER, default_encoder_spec

    plain, emb, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for folder, text in [(plain, "model:\n  kind: dcgan\n"),
                         (emb, "model:\n  encoder: path-foundation\n"),
                         (other, "model:\n  encoder: x\neval:\n  encoder: timm:resnet18\n")]:
        folder.mkdir()
        (folder / "config.yaml").write_text(text)
    assert default_encoder_spec([plain]) == DEFAULT_ENCODER
    assert default_encoder_spec([plain, emb]) == "path-foundation"
    assert default_encoder_spec([other]) == "timm:resnet18"
    with pytest.raises(PathganError, match="--encoder"):
        default_encoder_spec([emb, other])


def test_rank_slices_cover_every_index_once():
    from pathgan.evaluation import rank_slice

    for total in (0, 1, 7, 15, 16):
        for world in (1, 2, 3, 8):
            slices = [rank_slice(total, rank, world) for rank in range(world)]
            assert [i for s in slices for i in s] == list(range(total))
            assert max(len(s) for s in slices) == math.ceil(total / world)


@pytest.mark.slow
def test_missing_run_generator_or_shards_is_one_line(tmp_path, tiny_run, slide_shards, capsys):
    assert run_cli("eval", tmp_path / "nope", "--real", slide_shards, "-n", 8) == 2
    assert "no such run folder" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert run_cli("eval", tmp_path / "run", "--real", slide_shards, "-n", 8) == 2
    assert "no exported generator" in capsys.readouterr().err
    assert run_cli("eval", tiny_run, "--real", tmp_path, "-n", 8) == 2
    assert "manifest.json" in capsys.readouterr().err


@pytest.mark.slow
def test_inception_fid_with_local_weights(tiny_run, slide_shards, tmp_path):
    """The --inception path end to end, with random weights saved in the real file's format."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with mock.patch.object(inception, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict",
                              lambda self, state: None):
        network = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(network.state_dict(), weights)
    assert run_cli("eval", tiny_run, "--real", slide_shards, "-n", 6, "--encoder", ENCODER,
                   "--inception", "--inception-weights", weights, "--out", tmp_path / "out") == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert math.isfinite(result["runs"][0]["fid_inception"])
    assert "Inception FID" in (tmp_path / "out" / "report.md").read_text()


def test_embeddings_of_another_precision_are_not_taken_as_real_features(tmp_path, slide_shards):
    """bf16-made embeddings against an fp32 encoder: the real side is encoded from the images,
    as the generated side is, rather than read with another rounding."""
    from pathgan.encoders import load_encoder
    from pathgan.evaluation.features import _precomputed, select_real

    shards = tmp_path / "bf16"
    shutil.copytree(slide_shards, shards)
    assert run_cli("embed", shards, "--encoder", ENCODER, "--precision", "bf16",
                   "--num-workers", "0") == 0
    encoder = load_encoder(ENCODER, device="cpu")
    real = select_real(shards, N)
    assert _precomputed(real, encoder) is None
    encoder.set_precision("bf16")
    assert encoder.precision == "bf16" and len(_precomputed(real, encoder)) == N
