"""Any ``timm`` model (by name or ``hf-hub:ORG/REPO``: UNI, Phikon, ...) as a frozen encoder.

The model's own preprocessing comes from its pretrained config: [-1, 1] -> [0, 1], resize when
its input size is not 224, then its mean/std. ``num_classes=0`` makes it return pooled features.
``timm:NAME:random`` builds it with ``pretrained=False`` (no download) from a fixed seed, so
every process of a job gets the same weights. An optional autocast dtype (bf16/fp16) speeds up
GPUs; embeddings always come back as float32.
"""

import contextlib
import hashlib

import torch
import torch.nn.functional as F
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from pathgan.core.devices import default_device
from pathgan.core.errors import PathganError
from pathgan.core.images import signed_to_unit
from pathgan.encoders.base import Encoder, safe_id_part

RANDOM_SEED = 0
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_KNOWN_NORMS = {
    ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)): "imagenet",
    ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)): "half",
    ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)): "clip",
}


def weights_hash(model: torch.nn.Module) -> str:
    """A content hash of every parameter and buffer: the revision of the weights actually used."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        data = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(str(data.dtype).encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:12]


def preprocessing_tag(mean, std, size: int) -> str:
    key = (tuple(round(float(m), 8) for m in mean), tuple(round(float(s), 8) for s in std))
    name = _KNOWN_NORMS.get(key)
    if name is None:
        name = "norm" + hashlib.sha256(repr(key).encode()).hexdigest()[:8]
    return f"unit01-{name}-{size}"


def _create(name: str, pretrained: bool, model_kwargs: dict):
    import timm  # here: timm takes seconds to import (torchvision with it)

    try:
        if pretrained:
            return timm.create_model(name, pretrained=True, num_classes=0, **model_kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            return timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise PathganError(
                f"timm has no model {name!r} (see timm.list_models('*vit*'))"
            ) from error
        raise
    except Exception as error:
        repo = name.removeprefix("hf-hub:")
        if isinstance(error, GatedRepoError | RepositoryNotFoundError):
            raise PathganError(
                f"cannot access the weights of {name}: if the repo is gated, accept its terms at "
                f"https://huggingface.co/{repo} while logged in, then run `hf auth login`"
            ) from error
        if isinstance(error, LocalEntryNotFoundError):
            raise PathganError(
                f"the weights of {name} are not in the local Hugging Face cache and the Hub cannot "
                "be reached (HF_HUB_OFFLINE or no network): run once online"
            ) from error
        raise


class TimmEncoder(Encoder):
    """A timm backbone with its own normalisation; frozen, differentiable w.r.t. its input."""

    def __init__(self, model: torch.nn.Module, embed_dim: int, encoder_id: str, spec: str,
                 mean, std, input_size: int, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__(embed_dim, encoder_id, spec)
        self.model = model
        self.input_size = int(input_size)
        self.autocast_dtype = autocast_dtype
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.freeze()

    def set_precision(self, precision: str | None) -> None:
        """``fp32`` (or None), ``bf16`` or ``fp16``: the autocast dtype of the forward pass."""
        if precision not in (None, *PRECISIONS):
            raise PathganError(f"unknown precision {precision!r}: use fp32, bf16 or fp16")
        self.autocast_dtype = PRECISIONS.get(precision) if precision else None

    @property
    def precision(self) -> str:
        return next((name for name, dtype in PRECISIONS.items()
                     if dtype is self.autocast_dtype), "fp32")

    def _model_input(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the model's input: its size and normalisation."""
        self.check_input(images)
        x = signed_to_unit(images.float())
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False)
        return (x - self.mean) / self.std

    def _in_precision(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._model_input(images)
        with self._in_precision():
            return self.model(x).float()

    def features(self, images: torch.Tensor, levels: int | list[int]) -> list[torch.Tensor]:
        """timm's ``forward_intermediates``: a ViT's token maps after the blocks ``levels``
        (14x14 at 224 px), a CNN's stages (56, 28, 14, 7 px for a ResNet); an int ``n``: the
        last ``n``."""
        if not hasattr(self.model, "forward_intermediates"):
            return super().features(images, levels)
        x = self._model_input(images)
        try:
            with self._in_precision():
                maps = self.model.forward_intermediates(x, indices=levels,
                                                        intermediates_only=True)
        except (AssertionError, IndexError, ValueError) as error:
            raise PathganError(f"{self.encoder_id} cannot give feature levels {levels} "
                               f"({error or type(error).__name__})") from None
        return [level.float() for level in maps]


def load_timm(name: str, *, pretrained: bool = True, device=None, precision: str | None = None,
              spec: str | None = None, **model_kwargs) -> TimmEncoder:
    """``timm.create_model(name)`` (``hf-hub:ORG/REPO`` too) wrapped as a :class:`TimmEncoder`."""
    from timm.data import resolve_model_data_config  # here: timm is slow to import

    model = _create(name, pretrained, model_kwargs)
    config = resolve_model_data_config(model)
    size = int(config["input_size"][-1])
    embed_dim = getattr(model, "head_hidden_size", None) or model.num_features
    revision = weights_hash(model)
    if not pretrained:
        revision = f"random-{revision}"
    hub = name.startswith("hf-hub:")
    base = "hf-hub-" + name.removeprefix("hf-hub:") if hub else f"timm-{name}"
    encoder_id = "--".join(
        [safe_id_part(base), revision, preprocessing_tag(config["mean"], config["std"], size)]
    )
    encoder = TimmEncoder(model, int(embed_dim), encoder_id, spec or f"timm:{name}",
                          config["mean"], config["std"], size)
    encoder.set_precision(precision)
    return encoder.to(default_device(device))
