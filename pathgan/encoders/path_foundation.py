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
output gradient; :class:`SavedModelBridge` explains how the two frameworks' CUDA streams are
ordered. TensorFlow is imported lazily and set up for this rank
(:mod:`pathgan.encoders.tensorflow_runtime`), and large batches are cut into chunks.
"""

import hashlib
import re
from pathlib import Path

import torch

from pathgan.core.errors import PathganError
from pathgan.core.hub import hub_snapshot
from pathgan.core.images import signed_to_unit
from pathgan.encoders.base import Encoder, safe_id_part
from pathgan.encoders.tensorflow_runtime import (
    import_tensorflow,
    notice,
    resolve_device,
    tensorflow_setup,
)

REPO_ID = "google/path-foundation"
REPO_URL = f"https://huggingface.co/{REPO_ID}"
SIGNATURE = "serving_default"
OUTPUT_KEY = "output_0"
PREPROCESSING = "unit01"
INPUT_SIDE = 224  # its serving signature takes INPUT_SIDE x INPUT_SIDE RGB images
DEFAULT_CHUNK_SIZE = 128
#: TensorFlow aborts the process (not an exception) on a CPU buffer that is not 64-byte aligned
_TF_ALIGN_BYTES = 64


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
    """Runs one SavedModel signature on torch tensors, forward and input-gradient, via DLPack.

    Tensors cross between the frameworks without a copy, and on CUDA that needs care: DLPack
    shares memory but not stream order. torch and TensorFlow each queue kernels on their own
    CUDA stream and neither knows the other's, so every crossing is ordered by hand:

    1. torch -> TensorFlow (:meth:`_hand_to_tf`): torch's current stream is synchronised before
       TensorFlow gets the tensors, so that TensorFlow never reads memory that torch's queued
       kernels (the generator, a ``non_blocking`` copy, the alignment clone) have not written.
    2. TensorFlow -> torch (:meth:`_take_from_tf`): TensorFlow's devices are synchronised before
       torch wraps the results, so that torch never reads outputs or input gradients that
       TensorFlow has not written yet. That also means TensorFlow has finished reading the
       inputs of step 1: the caller keeps them referenced until this point, since dropping the
       last reference hands their memory back to torch's allocator for reuse.
    3. torch copies the results into its own memory and synchronises once more before the
       TensorFlow tensors are dropped, so that TensorFlow does not reuse a buffer that torch's
       stream is still reading.

    On the CPU both frameworks run each op to completion before returning: no step is needed.
    """

    def __init__(self, tf, model, signature, input_name: str, chunk_size: int) -> None:
        self.tf = tf
        self.model = model  # keeps the variables alive
        self.signature = signature
        self.input_name = input_name
        self.chunk_size = max(1, int(chunk_size))
        spec = tf.TensorSpec([None, INPUT_SIDE, INPUT_SIDE, 3], tf.float32)

        def _forward(images):
            return signature(**{input_name: images})[OUTPUT_KEY]

        self._forward = tf.function(_forward, input_signature=[spec])

    # -- torch <-> TensorFlow, no copies --------------------------------------------------------
    @staticmethod
    def _tf_device(tensor: torch.Tensor) -> str:
        return tensorflow_setup().device_for(tensor.device)

    def _stage(self, tensor: torch.Tensor) -> torch.Tensor:
        # TensorFlow without this GPU (tensorflow-cpu) next to CUDA torch: the one case that copies.
        return tensor.cpu() if tensor.is_cuda and self._tf_device(tensor) == "/CPU:0" else tensor

    def _hand_to_tf(self, tensor: torch.Tensor) -> list:
        """A staged tensor as TensorFlow tensors of ``chunk_size`` rows (step 1 above)."""
        chunks = [_aligned(chunk) for chunk in tensor.split(self.chunk_size)]
        if tensor.is_cuda:
            torch.cuda.current_stream(tensor.device).synchronize()
        return [self.tf.experimental.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(chunk))
                for chunk in chunks]

    def _take_from_tf(self, tensors: list, on_gpu: bool, device: torch.device) -> torch.Tensor:
        """TensorFlow results (computed on a GPU or not) as one torch tensor on ``device``
        (steps 2 and 3 above)."""
        if on_gpu:
            self.tf.test.experimental.sync_devices()
        shared = [torch.utils.dlpack.from_dlpack(self.tf.experimental.dlpack.to_dlpack(tensor))
                  for tensor in tensors]
        result = torch.cat(shared).to(device)  # torch's own memory from here on
        if on_gpu:
            torch.cuda.current_stream(device).synchronize()
        return result

    def forward(self, images_nhwc: torch.Tensor) -> torch.Tensor:
        staged = self._stage(images_nhwc)
        with self.tf.device(self._tf_device(staged)):
            inputs = self._hand_to_tf(staged)
            outputs = [self._forward(chunk) for chunk in inputs]
            return self._take_from_tf(outputs, staged.is_cuda, images_nhwc.device)

    def forward_recorded(self, images_nhwc: torch.Tensor) -> tuple[torch.Tensor, list]:
        """Forward under TensorFlow gradient tapes, one per chunk, kept for the backward.

        Keeping the forward's tapes and activations, as torch autograd does, costs a forward and
        a backward pass; running the model again inside a tape at backward time would cost one
        forward pass more.
        """
        staged = self._stage(images_nhwc)
        records = []
        with self.tf.device(self._tf_device(staged)):
            for inputs in self._hand_to_tf(staged):
                with self.tf.GradientTape() as tape:
                    tape.watch(inputs)
                    result = self.signature(**{self.input_name: inputs})[OUTPUT_KEY]
                records.append((tape, inputs, result))
            output = self._take_from_tf([result for _, _, result in records], staged.is_cuda,
                                        images_nhwc.device)
        return output, records

    def recorded_gradient(self, records: list, output_gradient: torch.Tensor,
                          device: torch.device) -> torch.Tensor:
        staged = self._stage(output_gradient.float())
        with self.tf.device(self._tf_device(staged)):
            incoming = self._hand_to_tf(staged)
            gradients = [tape.gradient(result, inputs, output_gradients=chunk)
                         for (tape, inputs, result), chunk in zip(records, incoming, strict=True)]
            return self._take_from_tf(gradients, staged.is_cuda, device)


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
        if tuple(images.shape[-2:]) != (INPUT_SIDE, INPUT_SIDE):
            raise ValueError(
                f"Path Foundation takes {INPUT_SIDE}x{INPUT_SIDE} images, got {tuple(images.shape)}"
            )
        unit_nhwc = signed_to_unit(images.float()).permute(0, 2, 3, 1).contiguous()
        return _SavedModelCall.apply(self.bridge, unit_nhwc)


def load_path_foundation(location: str | None = None, *, device=None, revision: str | None = None,
                         token: str | bool | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                         spec: str = "path-foundation") -> PathFoundationEncoder:
    """Load Path Foundation from the Hub (``location=None``) or a local folder in the Hub layout."""
    folder, encoder_id = resolve(location, revision=revision, token=token)
    device = resolve_device(device)
    tf = import_tensorflow(device)
    setup = tensorflow_setup()
    placement = setup.device_for(device)
    notice(f"TensorFlow {tf.__version__} runs Path Foundation on {setup.describe(device)}")
    if device.type == "cuda" and placement == "/CPU:0":
        notice(f"warning: torch runs on {device} but TensorFlow has no GPU here (tensorflow-cpu "
               "installed, or TensorFlow cannot load CUDA): Path Foundation runs on the CPU and "
               "every batch goes through host memory, which is slow")
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
        probe = torch.zeros(1, INPUT_SIDE, INPUT_SIDE, 3)
        embed_dim = bridge.forward(probe).shape[-1]
    return PathFoundationEncoder(bridge, int(embed_dim), encoder_id, spec, device, str(folder))
