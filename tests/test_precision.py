"""``mixed_precision: auto`` follows the compute capability, in pathgan train and launch/train.sh.

torch.cuda.is_bf16_supported() says True on a V100 (7.0) because it counts emulation; both
places must still choose fp16 there. The GPUs are mocked: these tests need none.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO

from pathgan.train import loop
from pathgan.train.precision import resolve_mixed_precision


def _fake_gpus(monkeypatch, *capabilities):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(capabilities))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: capabilities[i])
    # What torch answers on a V100: emulated bf16 counts as supported.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)


@pytest.mark.parametrize(("capabilities", "expected"), [
    (((7, 0),), "fp16"),            # V100
    (((7, 5),), "fp16"),            # T4
    (((8, 0),), "bf16"),            # A100
    (((9, 0), (9, 0)), "bf16"),     # H100 node
    (((8, 0), (7, 0)), "fp16"),     # a mixed node: every rank must choose alike
    ((), "no"),                     # no CUDA
])
def test_auto_follows_the_compute_capability(monkeypatch, capabilities, expected):
    _fake_gpus(monkeypatch, *capabilities)
    assert resolve_mixed_precision("auto") == expected


def test_an_explicit_choice_is_kept(monkeypatch):
    _fake_gpus(monkeypatch, (7, 0))
    assert resolve_mixed_precision("bf16") == "bf16"
    assert resolve_mixed_precision("no") == "no"


def test_the_training_loop_uses_the_same_rule():
    assert loop.resolve_mixed_precision is resolve_mixed_precision


SITECUSTOMIZE = """
import os
import torch

_capability = tuple(int(part) for part in os.environ["FAKE_CUDA_CAPABILITY"].split("."))
torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 2
torch.cuda.get_device_capability = lambda device=None: _capability
torch.cuda.is_bf16_supported = lambda including_emulation=True: True
"""


def _train_sh_env(tmp_path, **extra) -> dict:
    """launch/train.sh's environment: this interpreter, no cluster variables, a stand-in
    `accelerate` on PATH that records its flags in tmp_path/accelerate-args."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    recorded = tmp_path / "accelerate-args"
    fake_accelerate = bin_dir / "accelerate"
    fake_accelerate.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$@" > {recorded}
        """))
    fake_accelerate.chmod(0o755)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PATHGAN_", "SLURM_", "MASTER_"))}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        PYTHON=sys.executable,
        VIRTUAL_ENV=sys.prefix,  # train.sh would otherwise activate a .venv (and its accelerate)
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]),
    )
    env.update(extra)
    return env


def _run_train_sh(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "launch" / "train.sh"), "configs/dcgan-smoke.yaml"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("capability", "expected"), [("7.0", "fp16"), ("8.0", "bf16")])
def test_train_sh_asks_pathgan_for_the_precision(tmp_path, capability, expected):
    """launch/train.sh on a pretend 2-GPU node (sitecustomize mocks torch.cuda)."""
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
    result = _run_train_sh(_train_sh_env(tmp_path, FAKE_CUDA_CAPABILITY=capability))
    assert result.returncode == 0, result.stderr
    flags = (tmp_path / "accelerate-args").read_text().split()
    assert flags[flags.index("--mixed_precision") + 1] == expected
    assert flags[flags.index("--num_processes") + 1] == "2"
    assert f"mixed precision {expected}" in result.stderr


def test_train_sh_stops_when_python_cannot_answer(tmp_path):
    """Never guess "no GPU" (and train on the CPU of a GPU node) when the probe fails."""
    result = _run_train_sh(_train_sh_env(tmp_path, PYTHON=str(tmp_path / "no-such-python")))
    assert result.returncode == 2
    assert "cannot ask" in result.stderr
    assert not (tmp_path / "accelerate-args").exists()


def _d_gradients(one_region: bool, cache_enabled: bool = False) -> list[torch.Tensor]:
    """D's weight gradients after a discriminator loss on a real and a fake batch in bf16
    autocast on the CPU: in one autocast region (train_step), or one region per forward."""
    from pathgan.models import Discriminator
    from pathgan.train.objective import bce_logits

    torch.manual_seed(0)
    discriminator = Discriminator(ndf=4)
    real, fake = torch.randn(2, 4, 3, 224, 224)

    def region():
        return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=cache_enabled)

    if one_region:
        with region():
            loss = bce_logits(discriminator(real), 1.0) + bce_logits(discriminator(fake), 0.0)
    else:
        with region():
            real_logits = discriminator(real)
        with region():
            fake_logits = discriminator(fake)
        loss = bce_logits(real_logits, 1.0) + bce_logits(fake_logits, 0.0)
    loss.backward()
    return [p.grad for p in discriminator.parameters()]


def test_d_passes_in_one_autocast_region_cast_their_own_weights(monkeypatch, tmp_path):
    """train_step runs D on real and fake images in one autocast region; a cached cast would
    make both passes share one bf16 copy of D's weights and sum their gradients in bf16."""
    from pathgan.config import load_config

    handlers = []
    monkeypatch.setattr(loop, "Accelerator", lambda **kwargs: handlers.extend(
        kwargs["kwargs_handlers"]))
    loop.make_accelerator(load_config(REPO / "configs" / "dcgan-smoke.yaml"), tmp_path)
    (autocast,) = [h for h in handlers if type(h).__name__ == "AutocastKwargs"]
    assert autocast.cache_enabled is False
    separate = _d_gradients(one_region=False)
    assert all(torch.equal(a, b) for a, b in zip(separate, _d_gradients(True), strict=True))
    cached = _d_gradients(one_region=True, cache_enabled=True)
    assert not all(torch.equal(a, b) for a, b in zip(separate, cached, strict=True))
