"""The GPU paths, asserted on behaviour: bf16 and fp16 training of both GANs, torch.compile, a
compiled GPU checkpoint that resumes on the CPU, sampling and evaluation, bf16 encoders.

Marked ``gpu`` and skipped without CUDA, unless ``PATHGAN_GPU_TESTS_ON_CPU=1`` (the dry run of
``bench/gpu_check.sh``) runs them on the CPU to find typos and missing imports there. On a CPU,
``torch.compile`` uses the ``aot_eager`` backend (the same tracing without inductor's C++ build,
which takes minutes on a small CPU), and the fp16 runs are skipped (Accelerate has no CPU fp16:
it would train in fp32, without a GradScaler). ``PATHGAN_GPU_DATA`` names a folder that
``bench/gpu_data.py`` filled (no slide reader needed); else the tests fill one.
"""

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_same_weights, cli_command, run_cli
from safetensors.torch import load_file
from test_train import QUIET, initial_generator_weight

from pathgan.config import load_config
from pathgan.core.images import hwc_to_chw, uint8_to_signed
from pathgan.encoders import load_encoder
from pathgan.models import noise_batch
from pathgan.runs import RunDir
from pathgan.shards.format import decode_sample, shard_paths
from pathgan.shards.reading import iter_tar_samples

sys.path.insert(0, str(REPO / "bench"))
import gpu_data  # noqa: E402
from plain_gan import PlainGAN  # noqa: E402

pytestmark = pytest.mark.gpu

ON_CUDA = torch.cuda.is_available()
# PATHGAN_TEST_COMPILE_BACKEND=inductor runs inductor on a CPU too (minutes of C++ builds)
COMPILE_BACKEND = os.environ.get("PATHGAN_TEST_COMPILE_BACKEND",
                                 "inductor" if ON_CUDA else "aot_eager")
DCGAN = REPO / "configs" / "dcgan-smoke.yaml"
EMBGAN = REPO / "configs" / "embgan-smoke.yaml"  # its encoder is gpu_data.EMBED_ENCODER
# On CUDA, fp16 may skip its first steps while the GradScaler finds its scale; on a CPU, where
# the point is to run every line once, a step takes seconds.
STEPS, BATCH = (6, 8) if ON_CUDA else (2, 2)
COMMON = [f"train.max_steps={STEPS}", f"train.batch_size={BATCH}", "log.every=1",
          f"ckpt.every={STEPS}", f"log.sample_every={STEPS}", "log.wandb=false",
          "data.num_workers=1"]
# The GPU defaults (auto precision is bf16 there, compile on), and fp16 for older GPUs (without
# compile: a second compiled run would add minutes of compilation and test nothing new).
RUNS = {
    "dcgan-bf16": (DCGAN, ["train.mixed_precision=bf16", "train.compile=on", "train.ema=false"]),
    "dcgan-fp16": (DCGAN, ["train.mixed_precision=fp16", "train.compile=off"]),
    "embgan-bf16": (EMBGAN, ["train.mixed_precision=bf16"]),
    "embgan-fp16": (EMBGAN, ["train.mixed_precision=fp16"]),
}
# fp16 needs CUDA: on a CPU Accelerate trains it as fp32, without a GradScaler
RUNS_HERE = [name for name in RUNS if ON_CUDA or not name.endswith("fp16")]
TRAIN_SCRIPT = """
import functools
import sys

import torch

# argv[1]: the torch.compile backend (aot_eager on a CPU: see this module's docstring)
torch.compile = functools.partial(torch.compile, backend=sys.argv[1])
from pathgan.cli import main

sys.exit(main(sys.argv[2:]))
"""


@dataclass
class Run:
    dir: Path
    returncode: int
    log: str


@pytest.fixture(scope="module")
def device() -> torch.device:
    if ON_CUDA:
        return torch.device("cuda")
    if os.environ.get("PATHGAN_GPU_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    pytest.skip("needs CUDA (PATHGAN_GPU_TESTS_ON_CPU=1 runs it on the CPU)")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, device) -> Path:
    folder = os.environ.get("PATHGAN_GPU_DATA") or tmp_path_factory.mktemp("gpu-data")
    return gpu_data.prepare(Path(folder), device=device.type)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shards) -> dict[str, Run]:
    """The runs of RUNS_HERE, started together (they are small: they share the GPU)."""
    root = tmp_path_factory.mktemp("gpu-runs")
    script = root / "train.py"
    script.write_text(textwrap.dedent(TRAIN_SCRIPT))
    with contextlib.ExitStack() as logs:  # files: a full pipe would stall a run
        processes = {}
        for name in RUNS_HERE:
            config, overrides = RUNS[name]
            command = [sys.executable, str(script), COMPILE_BACKEND, "train", "--config",
                       str(config), f"data.shards={shards}", f"run.dir={root / name}", *COMMON,
                       *overrides]
            log = logs.enter_context(open(root / f"{name}.log", "w"))
            processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                               env=QUIET)
        returncodes = {name: process.wait(timeout=600) for name, process in processes.items()}
    return {name: Run(root / name, code, (root / f"{name}.log").read_text())
            for name, code in returncodes.items()}


def real_batch(shards: Path, count: int) -> torch.Tensor:
    """The first ``count`` patches of the shard set as the trainer sees them: [-1, 1], NCHW."""
    samples = [decode_sample({"__key__": key, **members})
               for key, members in iter_tar_samples(shard_paths(shards)[0])][:count]
    return uint8_to_signed(torch.stack([hwc_to_chw(image) for _, image, _ in samples]))


def failure(log: str) -> str:
    """The last line of a failed run's output (the exception, as a rule), then its end."""
    lines = log.strip().splitlines()
    return f"{lines[-1] if lines else 'no output'}\n{log[-3000:]}"


@pytest.mark.parametrize("name", list(RUNS))
def test_mixed_precision_training_reaches_finite_losses_and_changes_g(runs, name, device):
    if name not in RUNS_HERE:
        pytest.skip("fp16 needs CUDA: Accelerate trains fp16 as fp32 on a CPU, no GradScaler")
    run = runs[name]
    assert run.returncode == 0, failure(run.log)
    assert "non-finite" not in run.log
    rows = RunDir(run.dir).read_metrics()
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(row["Loss_D"]) and math.isfinite(row["Loss_G"]) for row in rows)
    # The exported generator (the EMA copy where train.ema is on) has moved from its start.
    exported = load_file(run.dir / "generator.safetensors")["main.0.weight"]
    assert not torch.equal(exported, initial_generator_weight())
    if device.type == "cuda":
        assert rows[-1]["gpu_mem_mb"] > 0
        # fp16 trains through Accelerate's one GradScaler for both optimizers, whose state is
        # checkpointed; bf16 needs none.
        checkpoint = run.dir / "checkpoints" / f"checkpoint-{STEPS:06d}"
        assert (checkpoint / "scaler.pt").is_file() == name.endswith("fp16")


@contextlib.contextmanager
def exact_fp32_convolutions():
    """cuDNN's fp32 convolutions use TF32 by default, and two runs may pick different
    algorithms: rounding of 1e-3 that would hide a compiler's error, or be taken for one."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = before


def relative_difference(ours: tuple[torch.Tensor, ...], reference: tuple[torch.Tensor, ...]):
    """|ours - reference| / |reference| over all the tensors together (one network's
    gradients): a tensor whose gradient is all but zero weighs what it weighs."""
    ours, reference = (torch.cat([t.double().flatten() for t in ts]) for ts in (ours, reference))
    return ((ours - reference).norm() / reference.norm()).item()


def in_fp64(gan: PlainGAN) -> PlainGAN:
    for network in (gan.generator, *gan.objective.discriminators.values()):
        network.double()
    return gan


def test_compile_on_and_off_give_the_same_losses_for_a_fixed_batch(shards, device):
    # No augmentation in the gradient check: it runs outside the compiled networks anyway, and
    # its random draws depend on the dtype, which would keep the fp64 reference from matching.
    config = load_config(DCGAN, ["train.mixed_precision='no'", "train.augment=''"])
    real = real_batch(shards, BATCH).to(device)
    noise = noise_batch(BATCH, config.model.nz, seed=1).to(device)
    with exact_fp32_convolutions():
        reference = in_fp64(PlainGAN.build(config, device)).losses_and_gradients(
            {"images": real.double()}, noise.double())
        first = {backend: PlainGAN.build(config, device, compile_backend=backend)
                 .losses_and_gradients({"images": real}, noise)
                 for backend in (None, COMPILE_BACKEND)}
    errors = {backend: [relative_difference(ours[network], reference[network])
                        for network in (2, 3)]  # D's gradients, G's
              for backend, ours in first.items()}
    print(f"losses (D, G): fp64 {[float(x) for x in reference[:2]]}, "
          f"{ {b: [float(x) for x in ours[:2]] for b, ours in first.items()} }; "
          f"gradients' error against fp64 (D, G): {errors}")
    (*eager_losses, _, _), (*compiled_losses, _, _) = first.values()
    # Same weights, same batch: the losses differ by rounding only, and the compiled
    # gradients are as close to fp64 as the eager ones. (Eager is not the reference: on a CPU,
    # its BatchNorm backward sums in fp32 and lands up to 1% off where the terms cancel.)
    torch.testing.assert_close(torch.stack(compiled_losses), torch.stack(eager_losses),
                               rtol=1e-4, atol=1e-5)
    for compiled_error, eager_error in zip(errors[COMPILE_BACKEND], errors[None], strict=True):
        assert compiled_error <= 2 * eager_error + 1e-4


def test_compile_on_and_off_train_alike_for_a_fixed_batch(shards, device):
    """A few steps of the DCGAN defaults (augmentation included): Adam's first updates are
    about lr * sign(gradient), so rounding-sized gradient differences become step-sized ones
    and the losses drift apart a little, not more."""
    config = load_config(DCGAN, ["train.mixed_precision='no'"])
    real = {"images": real_batch(shards, BATCH).to(device)}
    noise = noise_batch(BATCH, config.model.nz, seed=1).to(device)
    steps = {}
    with exact_fp32_convolutions():
        for backend in (None, COMPILE_BACKEND):
            gan = PlainGAN.build(config, device, compile_backend=backend)
            steps[backend] = torch.stack([torch.stack(gan.step(real, noise))
                                          for _ in range(STEPS)])
    eager, compiled = steps.values()
    print(f"losses per step (D, G), eager: {eager.tolist()}, compiled: {compiled.tolist()}")
    assert torch.isfinite(compiled).all() and torch.isfinite(eager).all()
    torch.testing.assert_close(compiled, eager, rtol=0.1, atol=0.05)


def test_a_compiled_gpu_checkpoint_resumes_on_the_cpu_with_equal_weights(runs, shards, tmp_path):
    """The GPU default (compile on) writes checkpoints that resume with no GPU and no compile
    (issue 11, item 1). Resuming at the last step exports the restored weights as they are."""
    trained = runs["dcgan-bf16"]
    assert trained.returncode == 0, failure(trained.log)
    run_dir = tmp_path / "resumed"
    shutil.copytree(trained.dir, run_dir)
    result = subprocess.run(
        cli_command("train", "--config", DCGAN, f"data.shards={shards}", f"run.dir={run_dir}",
                    *COMMON, "train.compile=off", "train.mixed_precision='no'",
                    "train.ema=false", "--resume", "latest", "--allow-change"),
        capture_output=True, text=True, env={**QUIET, "CUDA_VISIBLE_DEVICES": ""}, timeout=300)
    assert result.returncode == 0, failure(result.stderr)
    assert "resumed from" in result.stdout + result.stderr
    assert_same_weights(load_file(run_dir / "generator.safetensors"),
                        load_file(trained.dir / "generator.safetensors"))


def test_sample_and_eval_on_the_device(runs, shards, device, tmp_path):
    run = runs["dcgan-bf16"]
    assert run.returncode == 0, failure(run.log)
    assert run_cli("sample", run.dir, "-n", "6", "--out", tmp_path / "png",
                   "--device", device.type) == 0
    assert len(list((tmp_path / "png").glob("*.png"))) == 6
    assert run_cli("eval", run.dir, "--real", shards, "-n", "8", "--batch-size", "4",
                   "--encoder", gpu_data.EMBED_ENCODER, "--out", tmp_path / "eval") == 0
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["real"]["source"] == "embeddings"  # gpu_data's, of the same encoder
    (scores,) = report["runs"]
    assert scores["n"] == 8 and scores["step"] == STEPS
    for key in ("fd", "kid_mean", "precision", "recall"):
        assert scores[key] is not None and math.isfinite(scores[key]), key
    assert 0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1


def test_timm_bf16_embeddings_are_within_one_percent_of_fp32(shards, device):
    spec = "timm:vit_small_patch16_224:random"  # the ViT-S/16 of the benchmarks
    images = real_batch(shards, 4).to(device)
    with torch.no_grad():
        fp32 = load_encoder(spec, device=device)(images)
        bf16 = load_encoder(spec, device=device, precision="bf16")(images)
    assert bf16.dtype == torch.float32 and bf16.shape == fp32.shape == (4, 384)
    relative_error = (bf16 - fp32).norm(dim=1) / fp32.norm(dim=1)
    assert relative_error.max() < 0.01, relative_error


SYNC_SCRIPT = """
import functools
import json
import sys

import torch

torch.compile = functools.partial(torch.compile, backend=sys.argv[1])
from pathgan.config import load_config
from pathgan.train import loop

step = loop.train_step
calls = [0]
WARMUP = 2  # compilation and autotuning in the first steps may wait for the device


def checked(*args, **kwargs):
    calls[0] += 1
    if calls[0] <= WARMUP or not torch.cuda.is_available():
        return step(*args, **kwargs)
    torch.cuda.set_sync_debug_mode("error")  # any wait for the GPU in a step raises
    try:
        return step(*args, **kwargs)
    finally:
        torch.cuda.set_sync_debug_mode("default")


loop.train_step = checked
loop.train(load_config(sys.argv[2], sys.argv[3:]))
print(json.dumps({"checked": max(calls[0] - WARMUP, 0) if torch.cuda.is_available() else 0}))
"""


def test_a_step_on_the_device_cache_never_waits_for_the_gpu(shards, device, tmp_path):
    """The GPU defaults with the decoded-patch cache on the device: every step after warm-up
    runs under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any host-device
    synchronisation (the CPU test in test_train.py counts host reads instead)."""
    script = tmp_path / "sync.py"
    script.write_text(textwrap.dedent(SYNC_SCRIPT))
    steps = STEPS + 2
    result = subprocess.run(
        [sys.executable, str(script), COMPILE_BACKEND, str(DCGAN), f"data.shards={shards}",
         f"run.dir={tmp_path / 'run'}", *COMMON, f"train.max_steps={steps}", "log.every=1000",
         f"ckpt.every={steps * 10}", f"log.sample_every={steps * 10}", "data.cache=device",
         "train.mixed_precision=bf16", "train.compile=on"],
        capture_output=True, text=True, env=QUIET, timeout=600)
    assert result.returncode == 0, failure(result.stdout + result.stderr)
    checked = json.loads(result.stdout.strip().splitlines()[-1])["checked"]
    assert checked == (steps - 2 if device.type == "cuda" else 0)
    if device.type == "cuda":
        assert "in the memory of cuda" in result.stdout  # the cache was on the device
