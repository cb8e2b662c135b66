"""TensorFlow beside torch: never a segfault from the import order, one GPU per rank, memory
growth failures reported, the TensorFlow device logged, CPU threads shared between ranks.

The GPU cases run against a stand-in for ``tf.config`` with mocked device lists; the import
order and the thread limits run against the real TensorFlow in fresh interpreters.
"""

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO

from pathgan.encoders import load_encoder
from pathgan.encoders.tensorflow_runtime import (
    configure_tensorflow,
    cpu_thread_share,
    select_gpus,
)

try:
    from tinymodels import make_tiny_path_foundation
except ImportError:  # tests/ as a package
    from tests.tinymodels import make_tiny_path_foundation


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_path_foundation(tmp_path_factory.mktemp("pf") / "path-foundation")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environment,
                          capture_output=True, text=True, timeout=300)


def test_tensorflow_imported_first_never_crashes(tiny_dir):
    """`import tensorflow` then Path Foundation, timm and torch.compile: a segfault before."""
    result = _run_python(f"""
        import tensorflow
        from pathgan.encoders import load_encoder
        import torch
        encoder = load_encoder("path-foundation:{tiny_dir}", device="cpu")
        print(tuple(encoder(torch.zeros(2, 3, 224, 224)).shape))
        import timm  # imports torch._dynamo, which imports triton when it can
        compiled = torch.compile(torch.nn.Linear(2, 3))
        print(tuple(compiled(torch.ones(1, 2)).shape))
    """)
    assert result.returncode == 0, f"exit code {result.returncode}: {result.stderr[-2000:]}"
    assert result.stdout.split() == ["(2,", "384)", "(1,", "3)"]
    notices = [line for line in result.stderr.splitlines() if line.startswith("pathgan:")]
    assert len([line for line in notices if "triton" in line]) == 1
    assert any("torch.compile runs eagerly" in line for line in notices)


def test_tensorflow_threads_are_this_ranks_share_of_the_cpu():
    result = _run_python("""
        import os
        from pathgan.encoders.path_foundation import import_tensorflow
        tf = import_tensorflow("cpu")
        threading = tf.config.threading
        print(len(os.sched_getaffinity(0)), threading.get_intra_op_parallelism_threads(),
              threading.get_inter_op_parallelism_threads())
        print(float(tf.reduce_sum(tf.ones((4, 4)))))
    """, LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    assert result.returncode == 0, result.stderr[-2000:]
    (cpus, intra, inter), (total,) = (line.split() for line in result.stdout.splitlines())
    assert int(intra) == max(1, int(cpus) // 2) and int(inter) == min(2, int(intra))
    assert float(total) == 16.0


class FakeTensorFlow:
    """``tf.config`` with a mocked GPU list; records what pathgan asks of it."""

    def __init__(self, gpus: int, initialised: bool = False, growth_fails: bool = False):
        self.physical = [f"PhysicalDevice(GPU:{index})" for index in range(gpus)]
        self.visible = None
        self.growth = []
        self.threads = None

        def set_visible_devices(devices, kind):
            if initialised:
                raise RuntimeError("Visible devices cannot be modified after being initialized")
            self.visible = list(devices)

        def set_memory_growth(device, enable):
            if growth_fails:
                raise RuntimeError("Physical devices cannot be modified after being initialized")
            self.growth.append(device)

        def set_intra(count):
            self.threads = (count, self.threads[1] if self.threads else None)

        def set_inter(count):
            self.threads = (self.threads[0] if self.threads else None, count)

        self.config = SimpleNamespace(
            list_physical_devices=lambda kind: list(self.physical),
            set_visible_devices=set_visible_devices,
            experimental=SimpleNamespace(set_memory_growth=set_memory_growth),
            threading=SimpleNamespace(set_intra_op_parallelism_threads=set_intra,
                                      set_inter_op_parallelism_threads=set_inter),
        )


def test_each_rank_sees_its_own_gpu_only():
    tf = FakeTensorFlow(gpus=8)
    setup = configure_tensorflow(tf, torch.device("cuda", 3), local_rank=3, local_world_size=8,
                                 cpus=64)
    assert tf.visible == tf.growth == ["PhysicalDevice(GPU:3)"]
    assert setup.device_for(torch.device("cuda", 3)) == "/GPU:0"
    assert setup.device_for(torch.device("cuda", 0)) == "/CPU:0"
    assert setup.cpu_threads is None and tf.threads is None
    assert "GPU 3 only" in setup.describe(torch.device("cuda", 3))


def test_without_a_device_the_launchers_local_rank_decides():
    tf = FakeTensorFlow(gpus=4)
    configure_tensorflow(tf, None, local_rank=2, local_world_size=4, cpus=32)
    assert tf.visible == ["PhysicalDevice(GPU:2)"]
    assert select_gpus(4, None, None) is None  # a lone process keeps every GPU
    lone = FakeTensorFlow(gpus=2)
    setup = configure_tensorflow(lone, None, local_rank=None, local_world_size=1, cpus=8)
    assert lone.visible is None and lone.growth == lone.physical
    assert setup.device_for(torch.device("cuda", 1)) == "/GPU:1"


def test_torch_on_the_cpu_hides_every_gpu_and_shares_the_cores():
    tf = FakeTensorFlow(gpus=8)
    setup = configure_tensorflow(tf, torch.device("cpu"), local_rank=1, local_world_size=4,
                                 cpus=16)
    assert tf.visible == [] and tf.growth == []
    assert tf.threads == (4, 2) and setup.cpu_threads == 4
    assert setup.device_for(torch.device("cpu")) == "/CPU:0"


def test_cpu_threads_are_left_alone_for_a_single_process():
    tf = FakeTensorFlow(gpus=0)  # tensorflow-cpu
    setup = configure_tensorflow(tf, torch.device("cpu"), local_rank=None, local_world_size=1,
                                 cpus=16)
    assert tf.threads is None and setup.cpu_threads is None
    assert cpu_thread_share(cpus=2, local_world_size=4) == 1


def test_a_failed_memory_growth_is_reported(capsys):
    tf = FakeTensorFlow(gpus=2, growth_fails=True)
    configure_tensorflow(tf, torch.device("cuda", 1), local_rank=1, local_world_size=2, cpus=8)
    message = capsys.readouterr().err
    assert "cannot turn on TensorFlow's memory growth on GPU 1" in message
    assert "after being initialized" in message


def test_an_initialised_tensorflow_keeps_its_gpus_and_says_so(capsys):
    tf = FakeTensorFlow(gpus=2, initialised=True)
    setup = configure_tensorflow(tf, torch.device("cuda", 1), local_rank=1, local_world_size=2,
                                 cpus=8)
    assert "keeps all 2 GPUs" in capsys.readouterr().err
    assert setup.device_for(torch.device("cuda", 1)) == "/GPU:1"


def test_torch_on_cuda_beside_tensorflow_on_the_cpu_is_a_warning(tiny_dir, capsys):
    """This machine's TensorFlow has no GPU; torch's device is named, never touched."""
    encoder = load_encoder(f"path-foundation:{tiny_dir}", device="cuda:0")
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("pathgan: TensorFlow ") and "on the CPU" in line for line in lines)
    assert any("torch runs on cuda:0 but TensorFlow has no GPU" in line for line in lines)
    assert encoder.device == torch.device("cuda", 0)
