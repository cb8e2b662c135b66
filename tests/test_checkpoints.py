"""Checkpoints independent of compile wrappers and process counts; damaged ones are passed over."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_same_weights, cli_command
from safetensors.torch import load_file
from test_train import DDP_SCRIPT, QUIET, SMOKE, run_training

from pathgan.runs import RunDir, staging_dir
from pathgan.train.checkpoint import checkpoint_problem, commit_checkpoint

# torch.compile with the eager backend: the same OptimizedModule wrapper (and key prefix
# `_orig_mod.`) as inductor, without minutes of C++ compilation on a CPU.
EAGER_COMPILE = """
import functools
import sys
import torch
torch.compile = functools.partial(torch.compile, backend="eager")
from pathgan.cli import main
sys.exit(main(sys.argv[1:]))
"""


def checkpoint(run_dir: Path, step: int) -> Path:
    return RunDir(run_dir).checkpoint_dir(step)


def assert_weights(exported: dict, saved_dir: Path) -> None:
    assert_same_weights(exported, load_file(saved_dir / "model.safetensors"))


@pytest.mark.slow
def test_a_compiled_run_resumes_without_compile(tmp_path, slide_shards):
    script = tmp_path / "eager_compile.py"
    script.write_text(textwrap.dedent(EAGER_COMPILE))
    run_dir = tmp_path / "compiled"
    common = [f"data.shards={slide_shards}", f"run.dir={run_dir}", "log.wandb=false",
              "train.max_steps=3", "ckpt.every=3", "train.ema=false"]
    result = subprocess.run([sys.executable, str(script), "train", "--config", str(SMOKE),
                             *common, "train.compile=on"],
                            capture_output=True, text=True, env=QUIET, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = checkpoint(run_dir, 3)
    for name in ("model.safetensors", "model_1.safetensors"):
        assert not any("_orig_mod" in key for key in load_file(saved / name)), name
    # compile off, resumed at the saved step: the restored weights are exported as they are
    run_training(slide_shards, run_dir, *common[2:], "train.compile=off", resume="latest")
    assert_weights(load_file(run_dir / "generator.safetensors"), saved)


def launch_two(script: Path, *overrides: str) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", str(script), str(SMOKE), *overrides]
    result = subprocess.run(command, capture_output=True, text=True, env=QUIET, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


RESUME_SCRIPT = DDP_SCRIPT.replace("config = load_config(sys.argv[1], sys.argv[2:])\n"
                                   "result = train(config)",
                                   "config = load_config(sys.argv[1], sys.argv[2:])\n"
                                   "result = train(config, resume='latest')")


@pytest.mark.slow
def test_checkpoints_move_between_process_counts(tmp_path, slide_shards):
    script = tmp_path / "resume_train.py"
    script.write_text(textwrap.dedent(RESUME_SCRIPT))
    assert "resume='latest'" in script.read_text()
    run_dir = tmp_path / "moving"
    common = [f"data.shards={slide_shards}", f"run.dir={run_dir}", "log.wandb=false",
              "ckpt.every=2", "train.ema=false"]
    single = [sys.executable, "-m", "pathgan", "train", "--config", str(SMOKE), *common]

    launch_two(script, *common, "train.max_steps=2")  # 2 processes write checkpoint 2
    # ... which 1 process restores exactly (no step left: it exports the restored weights)
    subprocess.run([*single, "train.max_steps=2", "--resume", "latest"], check=True, env=QUIET,
                   capture_output=True, timeout=300)
    assert_weights(load_file(run_dir / "generator.safetensors"), checkpoint(run_dir, 2))
    # 1 process writes checkpoint 4, which 2 processes restore, identical on both ranks
    subprocess.run([*single, "train.max_steps=4", "--resume", "latest"], check=True, env=QUIET,
                   capture_output=True, timeout=300)
    launch_two(script, *common, "train.max_steps=4")
    saved = load_file(checkpoint(run_dir, 4) / "model.safetensors")
    for rank in (0, 1):
        params = load_file(run_dir / f"params-rank{rank}.safetensors")
        for name, tensor in params.items():
            if name.startswith("generator."):
                assert torch.equal(tensor, saved[name.removeprefix("generator.")]), name


def test_commit_lists_every_file_with_its_size_and_checksum(tmp_path):
    path = tmp_path / "checkpoints" / "checkpoint-000001"
    staging = staging_dir(path)
    (staging / "sub").mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"weights" * 100)
    (staging / "sub" / "state.bin").write_bytes(b"state")
    commit_checkpoint(staging, path, 1)
    assert checkpoint_problem(path) is None
    with open(path / "sub" / "state.bin", "r+b") as handle:
        handle.write(b"X")  # same size, other bytes
    assert "corrupt" in checkpoint_problem(path)
    (path / "model.safetensors").write_bytes(b"weights")
    assert checkpoint_problem(path) == "model.safetensors has 7 bytes, not 700"


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, slide_shards):
    run_dir = tmp_path / "damaged"
    common = ["log.wandb=false", "ckpt.every=2", "log.every=1"]
    run_training(slide_shards, run_dir, *common, "train.max_steps=4")
    newest = checkpoint(run_dir, 4) / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # a node died before the data reached disk
    result = run_training(slide_shards, run_dir, *common, "train.max_steps=5", resume="latest")
    output = result.stdout + result.stderr
    assert "skipping damaged checkpoint checkpoint-000004: model.safetensors has 1000 bytes" \
        in output
    assert f"resumed from {checkpoint(run_dir, 2)} at step 2" in output
    assert "finished at step 5" in result.stdout
    # every checkpoint damaged: one line, exit 2
    for step in (4, 5):
        weights = checkpoint(run_dir, step) / "model.safetensors"
        if weights.exists():
            weights.write_bytes(b"")
    result = subprocess.run(cli_command("train", "--config", SMOKE, f"data.shards={slide_shards}",
                                        f"run.dir={run_dir}", *common, "train.max_steps=6",
                                        "--resume", "latest"),
                            capture_output=True, text=True, env=QUIET, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no intact checkpoint in" in result.stderr


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_an_explicit_damaged_checkpoint_is_refused(tmp_path, damage):
    path = tmp_path / "checkpoints" / "checkpoint-000001"
    staging = staging_dir(path)
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"weights")
    commit_checkpoint(staging, path, 1)
    if damage == "truncate":
        (path / "model.safetensors").write_bytes(b"w")
    else:
        (path / "model.safetensors").unlink()
    from pathgan.core.errors import PathganError
    from pathgan.train.checkpoint import resolve_resume

    with pytest.raises(PathganError, match="damaged checkpoint"):
        resolve_resume(RunDir(tmp_path), str(path))
