"""Google's Path Foundation (a TensorFlow SavedModel) as a differentiable torch module.

The model lives on the Hugging Face Hub as ``google/path-foundation`` (gated: accept its terms
on the Hub, then ``hf auth login``). It is loaded with ``snapshot_download`` (the usual cache,
revision, token and ``HF_HUB_OFFLINE``) and ``tf.saved_model.load``; ``from_pretrained_keras`` is
gone from ``huggingface_hub`` 1.x and fails under Keras 3. A local folder in the Hub layout
(``saved_model.pb`` + ``variables/``) works too: ``path-foundation:/local/dir``.

Its serving signature takes 224x224x3 float32 in [0, 1] (a plain ``/255``, no mean/std) and
returns ``output_0`` of 384. The [-1, 1] -> [0, 1] mapping and NCHW -> NHWC permute happen in
torch (autograd sees them); only the SavedModel call crosses to TensorFlow, inside
:class:`_SavedModelCall`, an autograd Function whose tensors travel by DLPack both ways (no copy,
on GPU too) and whose backward asks ``tf.GradientTape`` for the input gradient given the incoming
output gradient. TensorFlow is imported lazily, with GPU memory growth on, and large batches are
cut into chunks.
"""

import contextlib
import hashlib
import os
import re
import threading
from pathlib import Path

import torch

from pathgan.encoders.base import Encoder, safe_id_part
from pathgan.errors import PathganError
from pathgan.images import IMAGE_SIZE, signed_to_unit

REPO_ID = "google/path-foundation"
REPO_URL = f"https://huggingface.co/{REPO_ID}"
SIGNATURE = "serving_default"
OUTPUT_KEY = "output_0"
PREPROCESSING = "unit01"
DEFAULT_CHUNK_SIZE = 128
#: TensorFlow aborts the process (not an exception) on a CPU buffer that is not 64-byte aligned
_TF_ALIGN_BYTES = 64

_tf_lock = threading.Lock()
_tf_module = None


def import_tensorflow():
    """Import TensorFlow once, quietly, with memory growth on every GPU it sees."""
    global _tf_module
    with _tf_lock:
        if _tf_module is not None:
            return _tf_module
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # Importing triton (torch.compile, timm) *after* TensorFlow segfaults the process (their
        # bundled LLVMs clash); importing it first is safe, so do that whenever it is installed.
        with contextlib.suppress(ImportError):
            import triton  # noqa: F401
        try:
            import tensorflow as tf
        except ImportError as error:
            raise PathganError(
                "Path Foundation needs TensorFlow: pip install 'pathgan[tensorflow]' "
                f"(or 'pathgan[tensorflow-cpu]') ({error})"
            ) from error
        for gpu in tf.config.list_physical_devices("GPU"):
            # RuntimeError: TensorFlow already initialised the GPU; nothing to do then
            with contextlib.suppress(RuntimeError):
                tf.config.experimental.set_memory_growth(gpu, True)
        _tf_module = tf
        return tf


def _gated_message(repo_id: str) -> str:
    return (
        f"cannot access {repo_id} on the Hugging Face Hub: it is gated, so accept its terms at "
        f"https://huggingface.co/{repo_id} while logged in, then run `hf auth login` "
        "(or set HF_TOKEN)"
    )


def hub_snapshot(repo_id: str, revision: str | None = None,
                 token: str | bool | None = None) -> Path:
    """Download (or find in the cache) a Hub repo; every access problem becomes one line."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in (
        "1",
        "true",
        "yes",
        "on",
    )
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, token=token, local_files_only=offline
        )
    except GatedRepoError as error:
        raise PathganError(_gated_message(repo_id)) from error
    except RevisionNotFoundError as error:
        raise PathganError(f"{repo_id} has no revision {revision!r} on the Hub") from error
    except RepositoryNotFoundError as error:
        raise PathganError(
            f"{repo_id} was not found on the Hub or you may not read it: check the name; if it is "
            f"gated, accept its terms at https://huggingface.co/{repo_id} and run `hf auth login`"
        ) from error
    except LocalEntryNotFoundError as error:
        raise PathganError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"({'HF_HUB_OFFLINE is set' if offline else 'no network'}): run once online after "
            f"accepting its terms at https://huggingface.co/{repo_id} and `hf auth login`, "
            "or point to a local copy"
        ) from error
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise PathganError(_gated_message(repo_id)) from error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise PathganError(f"cannot download {repo_id}: {first_line}") from error
    return Path(folder)


def _check_layout(folder: Path) -> None:
    if not (folder / "saved_model.pb").is_file() or not (folder / "variables").is_dir():
        raise PathganError(
            f"{folder} is not a Path Foundation SavedModel folder: expected saved_model.pb and "
            "variables/ (the layout of https://huggingface.co/google/path-foundation)"
        )


def local_revision(folder: Path) -> str:
    """A short content hash of a local SavedModel: its graph and its variables index."""
    digest = hashlib.sha256()
    for name in ("saved_model.pb", "variables/variables.index"):
        path = folder / name
        if path.is_file():
            digest.update(name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def resolve(location: str | None = None, revision: str | None = None,
            token: str | bool | None = None) -> tuple[Path, str]:
    """Where the SavedModel lies and its encoder id, without importing TensorFlow."""
    if location:
        folder = Path(location).expanduser()
        if not folder.is_dir():
            raise PathganError(f"Path Foundation folder {location} does not exist")
        _check_layout(folder)
        weights = local_revision(folder)
    else:
        folder = hub_snapshot(REPO_ID, revision=revision, token=token)
        _check_layout(folder)
        commit = folder.name
        weights = commit[:12] if re.fullmatch(r"[0-9a-f]{40}", commit) else local_revision(folder)
    return folder, f"path-foundation--{safe_id_part(weights)}--{PREPROCESSING}"


def _aligned(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach().contiguous()
    if tensor.data_ptr() % _TF_ALIGN_BYTES:
        tensor = tensor.clone()  # fresh allocations are aligned
    return tensor


class SavedModelBridge:
    """Runs one SavedModel signature on torch tensors, forward and input-gradient, via DLPack."""

    def __init__(self, tf, model, signature, input_name: str, chunk_size: int) -> None:
        self.tf = tf
        self.model = model  # keeps the variables alive
        self.signature = signature
        self.input_name = input_name
        self.chunk_size = max(1, int(chunk_size))
        self.gpu_count = len(tf.config.list_logical_devices("GPU"))
        spec = tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32)

        def _forward(images):
            return signature(**{input_name: images})[OUTPUT_KEY]

        self._forward = tf.function(_forward, input_signature=[spec])

    # -- torch <-> TensorFlow, no copies --------------------------------------------------------
    def _tf_device(self, tensor: torch.Tensor) -> str:
        if tensor.is_cuda and self.gpu_count:
            return f"/GPU:{tensor.device.index or 0}"
        return "/CPU:0"

    def _to_tf(self, tensor: torch.Tensor):
        capsule = torch.utils.dlpack.to_dlpack(_aligned(tensor))
        return self.tf.experimental.dlpack.from_dlpack(capsule)

    def _to_torch(self, tensor) -> torch.Tensor:
        return torch.utils.dlpack.from_dlpack(self.tf.experimental.dlpack.to_dlpack(tensor))

    def _stage(self, tensor: torch.Tensor) -> torch.Tensor:
        # TensorFlow without a GPU (tensorflow-cpu) next to CUDA torch: the one case that copies.
        return tensor.cpu() if tensor.is_cuda and not self.gpu_count else tensor

    def forward(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        staged = self._stage(images_nhwc)
        with self.tf.device(self._tf_device(staged)):
            outputs = [self._to_torch(self._forward(self._to_tf(chunk)))
                       for chunk in staged.split(self.chunk_size)]
        return torch.cat(outputs).to(images_nhwc.device)

    def forward_recorded(self, images_nhwc: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Forward under TensorFlow gradient tapes, one per chunk, kept for the backward.

        Keeping the forward's tapes and activations, as torch autograd does, costs a forward and
        a backward pass; running the model again inside a tape at backward time would cost one
        forward pass more.
        """
        device = images_nhwc.device
        staged = self._stage(images_nhwc)
        outputs, records = [], []
        with self.tf.device(self._tf_device(staged)):
            for chunk in staged.split(self.chunk_size):
                inputs = self._to_tf(chunk)
                with self.tf.GradientTape() as tape:
                    tape.watch(inputs)
                    result = self.signature(**{self.input_name: inputs})[OUTPUT_KEY]
                records.append((tape, inputs, result))
                outputs.append(self._to_torch(result))
        return torch.cat(outputs).to(device), records

    def recorded_gradient(self, records: list, output_gradient: torch.Tensor,
                          device: torch.device) -> torch.Tensor:
        staged = self._stage(output_gradient.float())
        gradients = []
        with self.tf.device(self._tf_device(staged)):
            for (tape, inputs, result), chunk in zip(records, staged.split(self.chunk_size),
                                                     strict=True):
                gradient = tape.gradient(result, inputs, output_gradients=self._to_tf(chunk))
                gradients.append(self._to_torch(gradient))
        return torch.cat(gradients).to(device)


class _SavedModelCall(torch.autograd.Function):
    """torch autograd node around a TensorFlow SavedModel call (NHWC [0, 1] -> (N, D))."""

    @staticmethod
    def forward(ctx, bridge: SavedModelBridge, images_nhwc: torch.Tensor) -> torch.Tensor:
        ctx.bridge = bridge
        ctx.device = images_nhwc.device
        if not ctx.needs_input_grad[1]:  # inference: no tape, nothing kept
            ctx.records = None
            return bridge.forward(images_nhwc)
        output, ctx.records = bridge.forward_recorded(images_nhwc)
        return output

    @staticmethod
    def backward(ctx, output_gradient: torch.Tensor):
        if ctx.records is None:
            return None, None
        gradient = ctx.bridge.recorded_gradient(ctx.records, output_gradient, ctx.device)
        ctx.records = None  # one backward, as for any torch graph: free TensorFlow's tapes
        return None, gradient


class PathFoundationEncoder(Encoder):
    """Path Foundation: [-1, 1] NCHW -> [0, 1] NHWC (in torch) -> SavedModel -> (N, 384)."""

    def __init__(self, bridge: SavedModelBridge, embed_dim: int, encoder_id: str, spec: str,
                 device: torch.device, source: str) -> None:
        super().__init__(embed_dim, encoder_id, spec)
        self.bridge = bridge
        self.source = source
        self._device = torch.device(device)
        self.freeze()

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            self._device = torch.device(device)
        return super().to(*args, **kwargs)

    @property
    def chunk_size(self) -> int:
        return self.bridge.chunk_size

    @chunk_size.setter
    def chunk_size(self, value: int) -> None:
        self.bridge.chunk_size = max(1, int(value))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_input(images)
        if tuple(images.shape[-2:]) != (IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"Path Foundation takes {IMAGE_SIZE}x{IMAGE_SIZE} images, got {tuple(images.shape)}"
            )
        unit_nhwc = signed_to_unit(images.float()).permute(0, 2, 3, 1).contiguous()
        return _SavedModelCall.apply(self.bridge, unit_nhwc)


def load_path_foundation(location: str | None = None, *, device=None, revision: str | None = None,
                         token: str | bool | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         spec: str = "path-foundation") -> PathFoundationEncoder:
    """Load Path Foundation from the Hub (``location=None``) or a local folder in the Hub layout."""
    folder, encoder_id = resolve(location, revision=revision, token=token)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tf = import_tensorflow()
    gpus = tf.config.list_logical_devices("GPU")
    placement = f"/GPU:{device.index or 0}" if device.type == "cuda" and gpus else "/CPU:0"
    try:
        with tf.device(placement):
            model = tf.saved_model.load(str(folder))
    except Exception as error:  # a broken download or a foreign SavedModel
        raise PathganError(f"cannot load the SavedModel in {folder}: {error}") from error
    if SIGNATURE not in model.signatures:
        raise PathganError(f"{folder}: the SavedModel has no {SIGNATURE!r} signature")
    signature = model.signatures[SIGNATURE]
    inputs = signature.structured_input_signature[1]
    outputs = signature.structured_outputs
    if len(inputs) != 1 or OUTPUT_KEY not in outputs:
        raise PathganError(
            f"{folder}: expected a serving signature with one input and output {OUTPUT_KEY!r}, "
            f"got inputs {sorted(inputs)} and outputs {sorted(outputs)}"
        )
    input_name = next(iter(inputs))
    embed_dim = outputs[OUTPUT_KEY].shape[-1]
    bridge = SavedModelBridge(tf, model, signature, input_name, chunk_size)
    if embed_dim is None:
        probe = torch.zeros(1, IMAGE_SIZE, IMAGE_SIZE, 3)
        embed_dim = bridge.forward(probe).shape[-1]
    return PathFoundationEncoder(bridge, int(embed_dim), encoder_id, spec, device, str(folder))
