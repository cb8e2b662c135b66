"""The encoder interface: generator images in, float32 embeddings out, frozen but differentiable.

Every encoder takes a batch exactly as the generator makes it (float NCHW in [-1, 1], 224x224),
applies its own preprocessing and returns ``(N, D)`` float32 embeddings. Its weights never get
gradients and it stays in eval mode even when a trainer calls ``.train()``, but it is
differentiable with respect to its input, so a generator can learn through it.

``encoder_id`` names the model, its weights revision and its preprocessing, and is written next
to everything computed with it (e.g. ``path-foundation--1a2b3c4d5e6f--unit01``).
"""

import re

import torch
from torch import nn

from pathgan.core.errors import PathganError

_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]+$")


def safe_id_part(text: str) -> str:
    """Any text -> letters, digits and ``-_.`` only, so that an id can name a folder."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.") or "x"


class Encoder(nn.Module):
    """A frozen image encoder: ``forward(images in [-1, 1], NCHW) -> float32 (N, embed_dim)``."""

    embed_dim: int
    encoder_id: str
    #: the spec it was loaded from (``path-foundation``, ``timm:NAME:random``, ...)
    spec: str = ""

    def __init__(self, embed_dim: int, encoder_id: str, spec: str = "") -> None:
        super().__init__()
        if not _ID_PATTERN.match(encoder_id):
            raise ValueError(f"encoder id {encoder_id!r} is not filesystem-safe")
        self.embed_dim = int(embed_dim)
        self.encoder_id = encoder_id
        self.spec = spec

    def freeze(self) -> "Encoder":
        """No parameter gets gradients; eval mode. Subclasses call this at the end of __init__."""
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "Encoder":
        """Stay in eval mode whatever the caller asks (a trainer's ``model.train()`` included)."""
        return super().train(False)

    @property
    def precision(self) -> str:
        """What the forward pass computes in: fp32 here (TensorFlow encoders); torch encoders
        that take ``set_precision`` say theirs."""
        return "fp32"

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    def check_input(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape)
            raise ValueError(f"{self.encoder_id}: expected images (N, 3, H, W), got {shape}")

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def features(self, images: torch.Tensor, levels: int | list[int]) -> list[torch.Tensor]:
        """Feature maps ``(N, C, S, S)`` of several depths (``levels``: indices of the model's
        blocks or stages), float32: what projected discriminator heads judge. An encoder whose
        graph gives only its embedding (a TensorFlow one) refuses."""
        raise PathganError(f"{self.encoder_id} gives its embedding only, no feature maps: the "
                           "projected head needs a timm encoder (model.encoder=timm:NAME)")

    def extra_repr(self) -> str:
        return f"encoder_id={self.encoder_id!r}, embed_dim={self.embed_dim}"
