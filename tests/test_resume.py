"""A run folder remembers its run: resume from its own config.yaml, overrides anywhere on the
line, what a resume may change (declared per key), W&B without a login, figures that say what
really ran."""

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, cli_command
from test_train import QUIET, SMOKE

from pathgan.cli import main, parse_args
from pathgan.config import load_config
from pathgan.core.fileio import write_json
from pathgan.runs import COMPLETE, RunDir
from pathgan.train.resume import plan_run

EMBGAN_SMOKE = REPO / "configs" / "embgan-smoke.yaml"


@pytest.mark.parametrize("line", [
    ["train", "--config", "C", "run.dir=R", "--resume", "latest", "train.max_steps=30"],
    ["train", "--config", "C", "train.max_steps=30", "--resume", "latest", "run.dir=R"],
    ["train", "--resume", "latest", "train.max_steps=30", "--allow-change", "run.dir=R"],
])
def test_overrides_stand_anywhere_on_the_line(line):
    args = parse_args(line)
    assert args.resume == "latest"
    assert sorted(args.overrides) == ["run.dir=R", "train.max_steps=30"]


def test_a_stray_word_is_still_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["train", "--config", "C", "a=1", "--resume", "latest", "b=2", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def fake_run(folder: Path, *overrides: str, step: int = 4) -> RunDir:
    """A run folder as training leaves it: config.yaml and a complete checkpoint."""
    run = RunDir(folder)
    run.write_config(load_config(SMOKE, [f"run.dir={folder}", *overrides]))
    checkpoint = run.checkpoint_dir(step)
    checkpoint.mkdir(parents=True)
    write_json(checkpoint / COMPLETE, {"step": step, "files": {}})
    return run


def test_a_resume_starts_from_the_runs_own_config(tmp_path):
    run = fake_run(tmp_path / "run", "model.ngf=8", "train.batch_size=4")
    plan = plan_run(None, [f"run.dir={run.path}", "train.max_steps=30"], "latest")
    assert plan.config.model.ngf == 8 and plan.config.train.batch_size == 4
    assert [(c.key, c.old, c.new) for c in plan.changes] == [("train.max_steps", 20, 30)]
    assert plan.notes == [f"resuming {run.path} at step 4 with its config.yaml; changed: "
                          "train.max_steps 20 -> 30"]


@pytest.mark.parametrize(("config", "override", "message"), [
    (None, "model.ngf=16", "model.ngf: the checkpoint of {run} holds 8, this resume asks for 16"),
    (EMBGAN_SMOKE, None, "model.kind: the checkpoint of {run} holds 'dcgan', this resume asks for "
                         "'embgan'; a resumed run keeps what its checkpoint holds: leave --config"),
    (None, "train.ema=false", "train.ema: the checkpoint of {run} holds True"),
    (None, "train.batch_size=16", "resuming {run} at step 4 would change its recipe: "
                                  "train.batch_size 8 -> 16; pass --allow-change"),
])
def test_a_conflicting_resume_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, config,
                                                                    override, message):
    run = fake_run(tmp_path / "run", "model.ngf=8")
    before = sorted(p for p in run.path.rglob("*"))
    config_text = run.config_path.read_text()
    line = ["train", "--resume", "latest", f"run.dir={run.path}",
            *(["--config", str(config)] if config else []), *([override] if override else [])]
    assert main(line) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message.format(run=run.path) in error
    assert sorted(p for p in run.path.rglob("*")) == before
    assert run.config_path.read_text() == config_text


def test_a_recipe_change_is_taken_when_asked_for(tmp_path):
    run = fake_run(tmp_path / "run")
    plan = plan_run(None, [f"run.dir={run.path}", "train.lr=1e-4"], "latest", allow_change=True)
    assert plan.config.train.lr == 1e-4
    assert [str(c) for c in plan.changes] == ["train.lr 0.0002 -> 0.0001"]


def test_a_setting_changes_freely_and_is_not_recorded(tmp_path):
    run = fake_run(tmp_path / "run")
    plan = plan_run(None, [f"run.dir={run.path}", "log.every=5", "data.num_workers=0"], "latest")
    assert plan.config.log.every == 5 and plan.changes == []


@pytest.mark.parametrize("checkpoint", [True, False])
def test_a_run_folder_without_config_is_one_line(tmp_path, capsys, checkpoint):
    folder = tmp_path / "run"
    if checkpoint:
        fake_run(folder).config_path.unlink()
    else:
        folder.mkdir()
    before = sorted(folder.rglob("*"))
    assert main(["train", "--resume", "latest", f"run.dir={folder}"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert ("holds checkpoints but no config.yaml" if checkpoint else "has no config.yaml") in error
    assert sorted(folder.rglob("*")) == before


def test_images_seen_counts_each_stretch_at_its_batch(tmp_path):
    run = fake_run(tmp_path / "run", "train.batch_size=8")
    assert run.images_seen(10) == 80
    plan = plan_run(None, [f"run.dir={run.path}", "train.batch_size=4"], "latest",
                    allow_change=True)
    run.write_config(plan.config)
    run.record_changes(4, plan.changes)
    assert run.images_seen(10) == 4 * 8 + 6 * 4
    assert run.config_at(3).train.batch_size == 8 and run.config_at(4).train.batch_size == 4
    run.drop_changes_after(3)  # resumed from an earlier checkpoint: the change is undone
    assert run.read_changes() == []


def test_a_resume_continues_the_run_and_records_its_changes(tmp_path, slide_shards):
    """Trained with a shape and a batch given on the line; resumed with neither repeated and
    no --config: the run's own settings, a taken batch change recorded, images seen true."""
    run_dir = tmp_path / "run"
    first = ["train", "--config", str(SMOKE), f"data.shards={slide_shards}",
             f"run.dir={run_dir}", "model.ngf=8", "model.ndf=8", "train.batch_size=8",
             "train.max_steps=2", "ckpt.every=2", "log.every=1", "log.wandb=false",
             "data.num_workers=0"]
    assert main(first) == 0
    assert main(["train", "--resume", "latest", f"run.dir={run_dir}", "train.max_steps=4",
                 "train.batch_size=4"]) == 2
    assert main(["train", "train.batch_size=4", "--resume", "latest", f"run.dir={run_dir}",
                 "--allow-change", "train.max_steps=4"]) == 0
    run = RunDir(run_dir)
    (record,) = run.read_changes()
    assert record["step"] == 2 and record["changes"] == {
        "train.batch_size": {"from": 8, "to": 4}, "train.max_steps": {"from": 2, "to": 4}}
    exported = json.loads((run_dir / "generator.json").read_text())
    assert exported["step"] == 4 and exported["images_seen"] == 2 * 8 + 2 * 4
    assert exported["mixed_precision"] == "no" and exported["ngf"] == 8
    saved = yaml.safe_load(run.config_path.read_text())
    assert saved["train"]["batch_size"] == 4 and saved["model"]["ngf"] == 8
    assert_metrics_documented(run_dir)


def assert_metrics_documented(run_dir: Path) -> None:
    """Every key a run logged is in the README's table of metrics.jsonl."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("#### What metrics.jsonl holds", 1)[1].split("\n**", 1)[0]
    keys = {key for row in RunDir(run_dir).read_metrics() for key in row}
    assert keys, run_dir
    missing = sorted(key for key in keys if f"`{key}`" not in table)
    assert not missing, f"{run_dir.name} logs {missing}: add them to the README's table"


@pytest.mark.slow
@pytest.mark.parametrize(("name", "config", "overrides"), [
    # augmented: real images are encoded in the loop (no embedding files needed)
    ("embgan", EMBGAN_SMOKE, ["train.augment=color"]),
    ("hybrid", EMBGAN_SMOKE, ["model.hybrid=true", "train.augment=color"]),
    ("r3gan", REPO / "configs" / "r3gan-smoke.yaml", ["train.ema=false"]),
])
def test_what_each_gan_logs_is_documented(tmp_path, slide_shards, name, config, overrides):
    run_dir = tmp_path / name
    assert main(["train", "--config", str(config), f"data.shards={slide_shards}",
                 f"run.dir={run_dir}", "train.max_steps=2", "log.every=1", "log.wandb=false",
                 "data.num_workers=0", "ckpt.every=2", *overrides]) == 0
    assert_metrics_documented(run_dir)


@pytest.mark.slow
def test_wandb_without_a_login_logs_offline_and_says_so(tmp_path, slide_shards):
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in QUIET.items()
           if key not in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SILENT")}
    env.update(HOME=str(home), WANDB_CONFIG_DIR=str(home), NETRC=str(home / ".netrc"),
               WANDB_SILENT="true")
    run_dir = tmp_path / "run"
    result = subprocess.run(
        cli_command("train", "--config", SMOKE, f"data.shards={slide_shards}",
                    f"run.dir={run_dir}", "train.max_steps=1", "log.wandb=true",
                    "data.num_workers=0"),
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert f"no login found (wandb login, WANDB_API_KEY), so this run logs offline into " \
           f"{run_dir / 'wandb'}" in output and "wandb sync" in output
    assert list((run_dir / "wandb").glob("offline-run-*"))


def test_a_wandb_that_fails_mid_run_does_not_stop_training(tmp_path, capsys):
    from pathgan.train.logbook import Logbook

    class FailingAccelerator:
        is_main_process = True
        trackers = ["wandb"]

        def log(self, values, step):
            raise ConnectionError("W&B service unreachable")

    accelerator = FailingAccelerator()
    logbook = Logbook(accelerator, RunDir(tmp_path), use_wandb=True)
    logbook.metrics(1, {"Loss_D": 1.0})
    logbook.metrics(2, {"Loss_D": 2.0})
    assert [row["step"] for row in RunDir(tmp_path).read_metrics()] == [1, 2]
    assert accelerator.trackers == [] and not logbook.use_wandb
    out = capsys.readouterr().out
    assert out.count("W&B: logging failed at step 1 (ConnectionError: W&B service "
                     "unreachable); training goes on") == 1

