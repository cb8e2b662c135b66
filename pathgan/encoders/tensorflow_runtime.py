"""TensorFlow inside a torch process: import order, one GPU per rank, memory, CPU threads.

Path Foundation is a TensorFlow SavedModel that runs beside torch, often in every rank of a
multi-GPU job. What makes that safe:

- **triton before TensorFlow.** Importing triton after TensorFlow segfaults the process (their
  bundled LLVMs clash), and triton comes in with torch.compile and with ``torch._dynamo``, which
  timm, torchvision and accelerate import. Imported first, triton is harmless, so pathgan imports
  it just before TensorFlow. When TensorFlow is already in the process (a notebook that imported
  it first), triton can no longer be imported safely: pathgan blocks it (a later
  ``import triton`` raises ImportError, which torch reads as "no triton"), makes torch.compile
  run eagerly, and says so in one line.
- **One GPU per rank.** accelerate does not narrow ``CUDA_VISIBLE_DEVICES``, so every rank's
  TensorFlow would create a context and a memory pool on every GPU of the node. TensorFlow sees
  only the GPU that torch uses in this process (none when torch runs on the CPU).
- **Memory growth** on that GPU, so that TensorFlow does not reserve it all beside torch. When
  TensorFlow was initialised before pathgan could set it up, that is reported, not ignored.
- **CPU threads.** TensorFlow on the CPU (``tensorflow-cpu``, or no CUDA for TensorFlow) sizes
  its thread pools to every core of the node; beside other ranks it gets its share of them.

TensorFlow is set up once per process, at its first import through :func:`import_tensorflow`,
for the device it is asked for then.
"""

import contextlib
import importlib.util
import os
import sys
import threading
from dataclasses import dataclass

import torch

from pathgan.core.devices import default_device
from pathgan.core.errors import PathganError

#: inter-op pool size of a rank's TensorFlow on a shared CPU: a ViT forward is a chain of ops
CPU_INTER_OP_THREADS = 2


def notice(message: str) -> None:
    """One line on stderr, from every rank (each rank's TensorFlow has its own device)."""
    print(f"pathgan: {message}", file=sys.stderr, flush=True)


def protect_from_triton_clash() -> None:
    """If TensorFlow is already imported and triton is not, make sure triton never will be.

    Cheap when there is nothing to do (two dictionary look-ups), so it can run at import time.
    """
    if "tensorflow" not in sys.modules or "triton" in sys.modules:
        return
    if importlib.util.find_spec("triton") is None:
        return  # not installed: nothing can import it
    sys.modules["triton"] = None  # `import triton` now raises ImportError instead of crashing
    torch.compiler.set_stance("force_eager")
    notice("TensorFlow was imported before pathgan, and importing triton after TensorFlow "
           "crashes the process: triton stays unloaded and torch.compile runs eagerly here "
           "(import pathgan before tensorflow to keep them)")


@dataclass(frozen=True)
class TensorFlowSetup:
    """Where this process's TensorFlow can run."""

    gpus: dict[int, int]  # torch's CUDA index -> TensorFlow's GPU index, for the GPUs TF sees
    physical_gpus: int  # GPUs TensorFlow found on the node
    cpu_threads: int | None  # intra-op threads when limited beside other ranks

    def device_for(self, device: torch.device) -> str:
        """The TensorFlow device that works on tensors of a torch ``device``."""
        if device.type == "cuda" and (device.index or 0) in self.gpus:
            return f"/GPU:{self.gpus[device.index or 0]}"
        return "/CPU:0"

    def describe(self, device: torch.device) -> str:
        placement = self.device_for(device)
        if placement != "/CPU:0":
            return (f"GPU {device.index or 0} only (TensorFlow's {placement}, of "
                    f"{self.physical_gpus} on this node), memory growth on")
        threads = (f", {self.cpu_threads} intra-op threads (this rank's share of the cores)"
                   if self.cpu_threads else "")
        return f"the CPU{threads}"


def select_gpus(gpu_count: int, device: torch.device | None,
                local_rank: int | None) -> list[int] | None:
    """The GPUs (torch's numbering) this process's TensorFlow may see; None: all of them.

    TensorFlow runs where torch runs: on the torch device's GPU, on none when torch uses the
    CPU. Without a device, a launcher's ``LOCAL_RANK`` names this process's GPU; a lone process
    keeps them all. Both frameworks number GPUs as CUDA does, after ``CUDA_VISIBLE_DEVICES``.
    """
    if device is not None and device.type != "cuda":
        return []
    index = device.index if device is not None else local_rank
    if index is None:
        return None
    return [index] if index < gpu_count else []


def cpu_thread_share(cpus: int, local_world_size: int) -> int | None:
    """Intra-op threads of one rank's TensorFlow on the CPU; None: TensorFlow's own default."""
    return max(1, cpus // local_world_size) if local_world_size > 1 else None


def configure_tensorflow(tf, device: torch.device | None, local_rank: int | None,
                         local_world_size: int, cpus: int) -> TensorFlowSetup:
    """Narrow a freshly imported TensorFlow to this process's GPU, or its share of the CPU."""
    physical = tf.config.list_physical_devices("GPU")
    visible = select_gpus(len(physical), device, local_rank)
    if visible is not None:
        try:
            tf.config.set_visible_devices([physical[i] for i in visible], "GPU")
        except RuntimeError as error:  # TensorFlow already created its GPU contexts
            notice(f"warning: TensorFlow was initialised before pathgan could narrow it to "
                   f"{visible or 'no GPU'}: it keeps all {len(physical)} GPUs ({error})")
            visible = None
    if visible is None:
        visible = list(range(len(physical)))
    for index in visible:
        try:
            tf.config.experimental.set_memory_growth(physical[index], True)
        except (RuntimeError, ValueError) as error:
            notice(f"warning: cannot turn on TensorFlow's memory growth on GPU {index}, so it "
                   f"may reserve most of that GPU's memory beside torch ({error})")
    threads = None if visible else cpu_thread_share(cpus, local_world_size)
    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(
                min(CPU_INTER_OP_THREADS, threads))
        except RuntimeError as error:
            notice(f"warning: cannot limit TensorFlow to {threads} CPU threads beside "
                   f"{local_world_size - 1} other ranks ({error})")
            threads = None
    return TensorFlowSetup({torch_index: tf_index for tf_index, torch_index in enumerate(visible)},
                           len(physical), threads)


def resolve_device(device: torch.device | str | None) -> torch.device:
    """A concrete torch device (default: :func:`~pathgan.core.devices.default_device`; ``cuda`` ->
    ``cuda:N``, the current one)."""
    device = default_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _environment_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else None


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):  # the cores this job may use (SLURM, taskset)
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_lock = threading.Lock()
_tensorflow = None
_setup: TensorFlowSetup | None = None


def import_tensorflow(device: torch.device | str | None = None):
    """TensorFlow, imported once per process (after triton) and set up for ``device``.

    ``device`` is this process's torch device; without one, a launcher's ``LOCAL_RANK`` decides.
    The first call sets TensorFlow up; later calls return the same module.
    """
    global _tensorflow, _setup
    with _lock:
        if _tensorflow is not None:
            return _tensorflow
        protect_from_triton_clash()
        if "tensorflow" not in sys.modules:
            os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
            with contextlib.suppress(ImportError):
                import triton  # noqa: F401  (first, while that is safe: see the module doc)
        try:
            import tensorflow as tf  # the optional [tensorflow] extra, after triton
        except ImportError as error:
            raise PathganError(
                "Path Foundation needs TensorFlow: pip install 'pathgan[tensorflow]' "
                f"(or 'pathgan[tensorflow-cpu]') ({error})"
            ) from error
        _setup = configure_tensorflow(
            tf, None if device is None else resolve_device(device),
            _environment_int("LOCAL_RANK"), _environment_int("LOCAL_WORLD_SIZE") or 1,
            _cpu_count(),
        )
        _tensorflow = tf
        return tf


def tensorflow_setup() -> TensorFlowSetup:
    """How TensorFlow was set up by :func:`import_tensorflow` (which must have run)."""
    if _setup is None:
        raise RuntimeError("import_tensorflow() has not run in this process")
    return _setup
