"""The DCGAN and the shared training loop: networks, smoke run, resume, DDP, signals, errors."""

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, assert_same_weights, cli_command, run_cli
from safetensors.torch import load_file

from pathgan.config import load_config
from pathgan.core.errors import PathganError
from pathgan.models import Discriminator, Generator
from pathgan.runs import RunDir
from pathgan.train import loop
from pathgan.train.build import build_gan, to_device

SMOKE = REPO / "configs" / "dcgan-smoke.yaml"
QUIET = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
         "PYTHONUNBUFFERED": "1"}


def train_command(shards: Path, run_dir: Path, *overrides: str, resume: str | None = None):
    args = ["train", "--config", SMOKE, f"data.shards={shards}", f"run.dir={run_dir}",
            *overrides]
    return cli_command(*args, *(["--resume", resume] if resume else []))


def run_training(shards, run_dir, *overrides, resume=None, timeout=300):
    result = subprocess.run(train_command(shards, run_dir, *overrides, resume=resume),
                            capture_output=True, text=True, env=QUIET, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_networks_at_224():
    generator, discriminator = Generator(), Discriminator()
    assert sum(p.numel() for p in generator.parameters()) == 16_165_760
    assert sum(p.numel() for p in discriminator.parameters()) == 11_198_208
    images = generator(torch.randn(3, 100))
    assert images.shape == (3, 3, 224, 224)
    assert images.min() >= -1 and images.max() <= 1  # Tanh
    logits = discriminator(images)
    assert logits.shape == (3,)  # logits: no Sigmoid inside, the loss applies it
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in discriminator.modules())
    weights = generator.main[0].weight
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002
    small = Generator(nz=16, ngf=8)
    assert small(torch.randn(2, 16)).shape == (2, 3, 224, 224)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, slide_shards) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    result = run_training(slide_shards, run_dir)
    assert "finished at step 20" in result.stdout
    return run_dir


@pytest.mark.slow
def test_smoke_run_writes_everything(smoke_run):
    rows = RunDir(smoke_run).read_metrics()
    assert [row["step"] for row in rows] == list(range(2, 21, 2))
    for row in rows:
        for key in ("Loss_D", "Loss_G", "D(x)", "D(G(z))", "images_per_s", "step_time"):
            assert isinstance(row[key], float) and row[key] == row[key], key
        assert 0 <= row["D(x)"] <= 1
    checkpoints = sorted(p.name for p in (smoke_run / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-000010", "checkpoint-000020"]
    assert (smoke_run / "checkpoints" / "checkpoint-000020" / "COMPLETE").is_file()
    assert sorted(p.name for p in (smoke_run / "samples").iterdir()) == [
        "step_000010.png", "step_000020.png"]
    assert (smoke_run / "loss.png").stat().st_size > 10_000
    assert list((smoke_run / "wandb").glob("offline-run-*"))
    assert load_config(smoke_run / "config.yaml").train.max_steps == 20
    weights = load_file(smoke_run / "generator.safetensors")
    assert weights["main.0.weight"].shape == (100, 128, 7, 7)
    assert json.loads((smoke_run / "generator.json").read_text())["ngf"] == 8
    assert not (smoke_run / "PREEMPTED").exists()


@pytest.mark.slow
def test_the_exported_ema_generator_is_never_worse_than_the_raw_one(smoke_run, slide_shards):
    """After a short run, the EMA generator (warm-up, copied BatchNorm statistics) draws
    textured patches at least as close to real ones, by SWD, as the raw generator does."""
    from pathgan.evaluation import (
        fake_features,
        make_state,
        real_features,
        select_real,
        swd_extractor,
    )
    from pathgan.evaluation.metrics import sliced_wasserstein_distance
    from pathgan.runs import load_generator

    exported, config = load_generator(smoke_run, "cpu")
    raw = Generator(nz=config["nz"], ngf=config["ngf"])
    newest = sorted((smoke_run / "checkpoints").glob("checkpoint-*"))[-1]
    raw.load_state_dict(load_file(newest / "model.safetensors"))
    state, n = make_state(), 32
    extractor = swd_extractor(n)
    real = real_features(select_real(slide_shards, n), [extractor], state)["swd"]
    with torch.no_grad():
        images = exported.eval()(torch.randn(8, config["nz"]))
    assert images.flatten(1).std(dim=1).min() > 0.02  # not flat grey
    swd = {name: sliced_wasserstein_distance(real, fake_features(
        generator, n, [extractor], state, nz=config["nz"])["swd"])["swd"]
        for name, generator in (("exported", exported), ("raw", raw))}
    assert swd["exported"] <= 1.05 * swd["raw"], swd


@pytest.mark.slow
def test_sample_and_arch_commands(tmp_path, smoke_run):
    assert run_cli("sample", smoke_run, "-n", "5", "--out", tmp_path / "png") == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 5
    assert run_cli("sample", smoke_run, "-n", "7", "--out", tmp_path / "shards",
                   "--format", "shards", "--per-shard", "3") == 0
    assert run_cli("shards", "verify", tmp_path / "shards") == 0
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["total_samples"] == 7 and len(manifest["shards"]) == 3
    # The same seed gives the same patches.
    assert run_cli("sample", smoke_run, "-n", "5", "--out", tmp_path / "again") == 0
    for path in (tmp_path / "png").glob("*.png"):
        assert path.read_bytes() == (tmp_path / "again" / path.name).read_bytes()
    assert run_cli("sample", smoke_run, "-n", "5", "--out", tmp_path / "x",
                   "--batch-size", "0") == 2
    assert run_cli("arch", "--config", SMOKE, "--out", tmp_path / "arch") == 0
    table = (tmp_path / "arch" / "architecture.md").read_text()
    assert "3 x 224 x 224" in table and "Total parameters" in table
    assert (tmp_path / "arch" / "discriminator-images.png").is_file()


@pytest.mark.slow
def test_a_fresh_run_refuses_a_folder_with_checkpoints(smoke_run, slide_shards):
    result = subprocess.run(train_command(slide_shards, smoke_run, "log.wandb=false"),
                            capture_output=True, text=True, env=QUIET, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "already holds checkpoints: pass --resume latest" in result.stderr


def test_a_checkpoint_is_replaced_whole(tmp_path):
    from pathgan.runs import staging_dir
    from pathgan.train.checkpoint import commit_checkpoint, prune_checkpoints

    path = tmp_path / "checkpoints" / "checkpoint-000005"
    path.mkdir(parents=True)
    (path / "COMPLETE").write_text("{}")
    (path / "model.safetensors").write_text("old")
    staging = staging_dir(path)
    staging.mkdir()
    (staging / "model.safetensors").write_text("new")
    assert RunDir(tmp_path).checkpoints() == [path]  # a staging folder is never a checkpoint
    commit_checkpoint(staging, path, 5)
    assert (path / "model.safetensors").read_text() == "new" and (path / "COMPLETE").is_file()
    (tmp_path / "checkpoints" / "checkpoint-000009.partial").mkdir()  # a killed save
    prune_checkpoints(RunDir(tmp_path), keep=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["checkpoint-000005"]


def wait_for(predicate, process, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert process.poll() is None, process.stderr.read()[-3000:]
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.slow
def test_killed_run_resumes_with_identical_weights(tmp_path, slide_shards):
    run_dir = tmp_path / "killed"
    process = subprocess.Popen(
        train_command(slide_shards, run_dir, "train.max_steps=1000", "ckpt.every=5",
                      "log.wandb=false", "train.ema=false", "log.every=1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=QUIET)
    saved = run_dir / "checkpoints" / "checkpoint-000005"
    wait_for(lambda: (saved / "COMPLETE").is_file(), process)
    process.kill()
    process.wait()
    # Resuming at the saved step with nothing left to do exports the restored weights as-is.
    result = run_training(slide_shards, run_dir, "train.max_steps=5", "log.wandb=false",
                          "train.ema=false", resume=str(saved))
    assert "resumed from" in result.stdout + result.stderr
    assert_same_weights(load_file(run_dir / "generator.safetensors"),
                        load_file(saved / "model.safetensors"))
    # And training goes on from there: metrics continue after step 5 without duplicates.
    run_training(slide_shards, run_dir, "train.max_steps=8", "log.wandb=false",
                 "train.ema=false", "log.every=1", resume="latest")
    steps = [row["step"] for row in RunDir(run_dir).read_metrics()]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_signal_checkpoints_and_resume_finishes(tmp_path, slide_shards):
    run_dir = tmp_path / "preempted"
    process = subprocess.Popen(
        train_command(slide_shards, run_dir, "train.max_steps=1000", "log.every=1",
                      "ckpt.every=1000"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=QUIET)
    wait_for(lambda: len(RunDir(run_dir).read_metrics()) >= 3, process)
    process.send_signal(signal.SIGUSR1)
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    step = int((run_dir / "PREEMPTED").read_text())
    assert f"preempted at step {step}" in stdout
    assert (run_dir / "checkpoints" / f"checkpoint-{step:06d}" / "COMPLETE").is_file()
    result = run_training(slide_shards, run_dir, f"train.max_steps={step + 3}",
                          "log.every=1", resume="latest")
    assert f"finished at step {step + 3}" in result.stdout
    assert not (run_dir / "PREEMPTED").exists()
    # Both processes logged to the same W&B run (offline-run-<time>-<id>).
    wandb_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and len({p.name.rsplit("-", 1)[1] for p in wandb_runs}) == 1
    assert RunDir(run_dir).read_metrics()[-1]["step"] == step + 3


DDP_SCRIPT = """
import os
import sys
from safetensors.torch import save_file
from pathgan.config import load_config
from pathgan.train.loop import train

config = load_config(sys.argv[1], sys.argv[2:])
result = train(config)
rank = int(os.environ["RANK"])
networks = {"generator": result.generator, **result.discriminators}
tensors = {f"{name}.{key}": value.detach().cpu().contiguous()
           for name, network in networks.items()
           for key, value in network.named_parameters()}
save_file(tensors, f"{config.run.dir}/params-rank{rank}.safetensors")
"""


def initial_generator_weight(ngf: int = 8, seed: int = 0) -> torch.Tensor:
    """The first generator layer as the trainer initialises it (seeded before building)."""
    torch.manual_seed(seed)
    return Generator(ngf=ngf).state_dict()["main.0.weight"]


def train_two_processes(tmp_path: Path, config: Path, run_dir: Path, *overrides: str,
                        mixed_precision: str = "no") -> dict[str, torch.Tensor]:
    """Train ``config`` in two CPU processes (gloo DDP); check that both ranks end with the same
    parameters and return rank 0's."""
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               mixed_precision, "--dynamo_backend", "no", str(script), str(config),
               f"run.dir={run_dir}", f"train.mixed_precision={mixed_precision}", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, env=QUIET, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [load_file(run_dir / f"params-rank{rank}.safetensors") for rank in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 10
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
    return ranks[0]


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical(tmp_path, slide_shards):
    run_dir = tmp_path / "ddp"
    params = train_two_processes(tmp_path, SMOKE, run_dir, f"data.shards={slide_shards}",
                                 "train.max_steps=6", "log.wandb=false", "ckpt.every=6")
    assert not torch.equal(params["generator.main.0.weight"], initial_generator_weight())
    assert [row["step"] for row in RunDir(run_dir).read_metrics()] == [2, 4, 6]


@pytest.mark.slow
def test_in_loop_evaluation_is_logged_and_keeps_the_best_generator(tmp_path, slide_shards):
    run_dir = tmp_path / "evaluated"
    run_training(slide_shards, run_dir, "train.max_steps=4", "log.wandb=false", "eval.every=2",
                 "eval.n=8", "eval.encoder=timm:mobilenetv3_small_050:random")
    rows = [row for row in RunDir(run_dir).read_metrics() if "eval/fd" in row]
    assert [row["step"] for row in rows] == [2, 4]
    assert all(row["eval/fd"] >= 0 and row["eval/n"] == 8 for row in rows)
    best = json.loads((run_dir / "best" / "best.json").read_text())
    assert best["fd"] == pytest.approx(min(row["eval/fd"] for row in rows), abs=1e-6)
    assert best["step"] in (2, 4) and best["encoder"].startswith("timm-mobilenetv3_small_050")
    assert run_cli("sample", run_dir / "best", "-n", "2", "--out", tmp_path / "best") == 0


@pytest.mark.slow
def test_bf16_autocast_on_cpu(tmp_path, slide_shards):
    run_dir = tmp_path / "bf16"
    run_training(slide_shards, run_dir, "train.mixed_precision=bf16", "train.max_steps=4",
                 "log.wandb=false", "log.every=1")
    rows = RunDir(run_dir).read_metrics()
    assert len(rows) == 4 and all(isinstance(row["Loss_D"], float) for row in rows)


def _adam_moments(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [t.clone() for state in optimizer.state.values()
            for t in (state["exp_avg"], state["exp_avg_sq"], state["step"])]


def test_the_steps_update_is_plain_adams_or_none_at_all():
    """The step's update (fused Adam, the default on the CPU since issue 20, told to skip by
    ``found_inf``) moves the channels_last DCGAN generator exactly as foreach Adam (the update
    before issue 20) does with the same gradients, and a skipped one leaves weights, moments and
    step count as they were. A conditional demo run that drew one stripe lattice at step 150 was
    suspected of updates skipped or misapplied: a fused kernel reading a weight and its gradient
    in different memory layouts moves them wrong (seen on the CPU), a flag read wrong skips
    every update."""
    cpu = torch.device("cpu")
    config = load_config(SMOKE)
    torch.manual_seed(0)
    generator = to_device(build_gan(config, cpu).generator, cpu, channels_last=True)
    reference = copy.deepcopy(generator)
    optimizer = loop.make_optimizer([generator], config, cpu)
    assert optimizer.defaults["fused"]
    plain = torch.optim.Adam(reference.parameters(), lr=config.train.lr,
                             betas=(config.train.beta1, config.train.beta2), foreach=True)
    prepared = SimpleNamespace(optimizer=optimizer, zero_grad=optimizer.zero_grad,
                               step=optimizer.step)  # what _update uses of Accelerate's wrapper
    accelerator = SimpleNamespace(backward=torch.Tensor.backward)
    noise = torch.randn(4, config.model.nz)
    initial = [p.detach().clone() for p in generator.parameters()]

    loop._update(prepared, generator(noise).square().mean(), torch.zeros(()), accelerator)
    plain.zero_grad()
    reference(noise).square().mean().backward()
    plain.step()
    for before, updated, expected in zip(initial, generator.parameters(),
                                         reference.parameters(), strict=True):
        assert not torch.equal(updated, before)
        torch.testing.assert_close(updated, expected, rtol=0, atol=1e-7)

    weights = [p.detach().clone() for p in generator.parameters()]
    moments = _adam_moments(optimizer)
    loop._update(prepared, generator(noise).square().mean(), torch.ones(()), accelerator)
    assert all(torch.equal(a, b) for a, b in zip(weights, generator.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(moments, _adam_moments(optimizer), strict=True))


NAN_SCRIPT = """
import sys
import torch
from pathgan.cli import main
from pathgan.train.objective import GANObjective

def nan_loss(self, real, fake):
    return torch.tensor(float("nan"), requires_grad=True), {}

GANObjective.d_loss = nan_loss
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("policy", "expected_step", "lines"), [("stop", 2, 1), ("skip", 4, 2)])
def test_nonfinite_loss_policy(tmp_path, slide_shards, policy, expected_step, lines):
    """Every D loss is NaN: its updates are skipped on the device; the log lines (every 2
    steps) say so, and the run stops at the first one (stop) or once 3 steps in a row were
    skipped (skip), its state saved."""
    script = tmp_path / "nan_train.py"
    script.write_text(textwrap.dedent(NAN_SCRIPT))
    run_dir = tmp_path / policy
    result = subprocess.run(
        [sys.executable, str(script), "train", "--config", str(SMOKE),
         f"data.shards={slide_shards}", f"run.dir={run_dir}", "log.wandb=false",
         f"train.nonfinite={policy}", "train.max_nonfinite=3"],
        capture_output=True, text=True, env=QUIET, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("pathgan: error")]
    assert len(errors) == 1 and "non-finite loss" in errors[0]
    assert f"({expected_step} in a row)" in errors[0]
    assert result.stdout.count("non-finite loss") == lines
    assert (run_dir / "checkpoints" / f"checkpoint-{expected_step:06d}" / "COMPLETE").is_file()
    rows = RunDir(run_dir).read_metrics()
    assert [row["skipped_updates_d"] for row in rows] == [2] * lines
    assert all(row["skipped_updates_g"] == 0 for row in rows)


HOST_READS_SCRIPT = """
import json
import sys
import threading
import torch
from pathgan.config import load_config
from pathgan.train import loop

# Every way Python code reads a tensor's value on the host (each waits for the device).
READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__",
         "__array__")
counting = [False]
counts = []

def counted(name):
    original = getattr(torch.Tensor, name)
    def read(self, *args, **kwargs):
        # the step's own reads: the stream's thread runs meanwhile, on host memory
        if counting[0] and threading.current_thread() is threading.main_thread():
            counts[-1] += 1
        return original(self, *args, **kwargs)
    return read

for name in READS:
    setattr(torch.Tensor, name, counted(name))
step = loop.train_step

def counting_step(*args, **kwargs):
    counts.append(0)
    counting[0] = True
    try:
        return step(*args, **kwargs)
    finally:
        counting[0] = False

loop.train_step = counting_step
reads = {}
run_root = sys.argv[-1].partition("=")[2]  # the last argument is run.dir=PATH
for fused in ("auto", "off"):
    counts.clear()
    loop.train(load_config(sys.argv[1], [*sys.argv[2:], f"train.fused_adam={fused}",
                                         f"run.dir={run_root}-{fused}"]))
    reads[fused] = list(counts)
print(json.dumps(reads))
"""


def test_a_training_step_never_reads_the_device_from_the_host(tmp_path, slide_shards):
    """With fused Adam (the default), no step reads a tensor's value on the host, so the CPU
    can queue steps ahead of a GPU; skips are decided on the device, and the loop reads its
    figures at log lines. Adam without a fused kernel reads its two skip flags (and, on the
    host, its step counters)."""
    script = tmp_path / "count_reads.py"
    script.write_text(textwrap.dedent(HOST_READS_SCRIPT))
    result = subprocess.run(
        [sys.executable, str(script), str(SMOKE), f"data.shards={slide_shards}",
         "train.max_steps=5", "log.every=2", "log.sample_every=100", "ckpt.every=100",
         "log.wandb=false", "train.ema=true", f"run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env=QUIET, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reads = json.loads(result.stdout.strip().splitlines()[-1])
    assert reads["auto"] == [0] * 5
    assert len(reads["off"]) == 5 and all(count >= 2 for count in reads["off"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batchsize=3", "unknown config key 'train.batchsize'"),
        ("train.mixed_precision=fp8", "train.mixed_precision: 'fp8' is not one of"),
        ("train.batch_size=abc", "train.batch_size: expected int"),
        ("train.lr=-1", "train.lr must be positive"),
        ("nonsense", "override 'nonsense' is not of the form key=value"),
        ("eval.n=2", "eval.n must be at least 4"),
        ("model.hybrid=true", "model.hybrid adds a pixel discriminator to the Embedding GAN"),
        ("train.augment=color,flip", "train.augment: unknown augmentation 'flip'"),
        ("train.ema_kimg=0", "train.ema_kimg and train.ema_rampup must be positive"),
    ],
)
def test_bad_config_is_a_one_line_error(capsys, override, message):
    assert run_cli("train", "--config", SMOKE, override) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"pathgan: error: {message}")


def test_yaml_words_on_the_command_line_keep_their_meaning():
    config = load_config(SMOKE, ["train.mixed_precision=no", "train.compile=off",
                                 "train.ema=no", "train.channels_last=on"])
    assert config.train.mixed_precision == "no" and config.train.compile == "off"
    assert config.train.ema is False and config.train.channels_last == "on"


def test_configs_with_boolean_switches_still_load(tmp_path):
    # channels_last was a boolean before the switches had one vocabulary (auto | on | off);
    # run folders saved then say true, and YAML reads an unquoted on/off as a boolean too.
    saved = tmp_path / "config.yaml"
    saved.write_text("train:\n  channels_last: true\n  compile: false\n  fused_adam: on\n")
    config = load_config(saved)
    assert (config.train.channels_last, config.train.compile, config.train.fused_adam) == (
        "on", "off", "on")


def test_every_declared_choice_is_enforced():
    import dataclasses
    import typing

    from pathgan.config import Config

    choices = [(f"{section.name}.{name}", kind)
               for section in dataclasses.fields(Config)
               for name, kind in typing.get_type_hints(section.type).items()
               if typing.get_origin(kind) is typing.Literal]
    assert len(choices) >= 8
    for key, kind in choices:
        with pytest.raises(PathganError, match=f"^{key}: 'nonsense' is not one of "
                                               f"{', '.join(typing.get_args(kind))}$"):
            load_config(SMOKE, [f"{key}=nonsense"])


def test_missing_config_and_shards_are_one_line_errors(tmp_path):
    assert run_cli("train", "--config", tmp_path / "nope.yaml") == 2
    result = subprocess.run(cli_command("train", "--config", SMOKE,
                                        f"data.shards={tmp_path}", f"run.dir={tmp_path}/r",
                                        "log.wandb=false"),
                            capture_output=True, text=True, env=QUIET, timeout=120)
    assert result.returncode == 2 and "manifest.json is missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_channels_last_keeps_the_projection_of_z_contiguous():
    from pathgan.train.build import to_device

    generator = to_device(Generator(nz=16, ngf=4), torch.device("cpu"), channels_last=True)
    weights = {name: p for name, p in generator.named_parameters() if p.ndim == 4}
    assert weights.pop("main.0.weight").is_contiguous()  # its input is 1x1 (see to_device)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights.values())


def test_too_few_samples_per_rank_for_batchnorm_is_said_in_one_line():
    from pathgan.train.loop import batchnorm_batch_warning

    networks = [Generator(ngf=4), Discriminator(ndf=4)]
    reference = load_config(SMOKE, ["train.batch_size=128"])
    warning = batchnorm_batch_warning(networks, reference, world=64)
    assert "leaves 2 samples per rank" in warning and "train.batch_size to 1024" in warning
    assert "train.sync_bn=true" in warning and "\n" not in warning
    assert batchnorm_batch_warning(networks, reference, world=8) is None  # 16 per rank
    small = load_config(SMOKE, ["train.batch_size=8"])  # one process: its own batch, as asked
    assert batchnorm_batch_warning(networks, small, world=1) is None
    synced = load_config(SMOKE, ["train.batch_size=128", "train.sync_bn=true"])
    assert batchnorm_batch_warning(networks, synced, world=64) is None
    linear = [torch.nn.Sequential(torch.nn.Linear(4, 4))]  # no BatchNorm: nothing to say
    assert batchnorm_batch_warning(linear, reference, world=64) is None
