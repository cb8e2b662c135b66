"""Frozen pathology encoders behind one interface, loaded from a short spec.

Specs:

- ``path-foundation``: Google's Path Foundation from the Hub (``google/path-foundation``),
  ``path-foundation@REVISION`` for a pinned revision;
- ``path-foundation:/local/dir``: a local copy in the Hub layout (``saved_model.pb`` +
  ``variables/``);
- ``timm:NAME``: a timm model with pretrained weights; ``timm:NAME:random``: random init, no
  download;
- ``hf-hub:ORG/REPO``: a timm model on the Hub (UNI, Phikon, ...);
- ``stain-texture``: 32 statistics of H&E stain density and texture, no weights
  (:mod:`pathgan.encoders.stain_texture`).

Every encoder maps generator images (float NCHW in [-1, 1]) to float32 ``(N, D)`` embeddings;
see :class:`~pathgan.encoders.base.Encoder`.
"""

import re
from dataclasses import dataclass

from pathgan.encoders.tensorflow_runtime import protect_from_triton_clash

# Before anything else can import triton: with TensorFlow already imported, that would crash.
protect_from_triton_clash()

from pathgan.core.errors import PathganError  # noqa: E402
from pathgan.encoders import path_foundation, stain_texture, timm_backbone  # noqa: E402
from pathgan.encoders.base import Encoder  # noqa: E402

__all__ = ["Encoder", "EncoderSpec", "is_encoder_id", "load_encoder", "parse_spec",
           "resolve_encoder_id"]

SPEC_HELP = (
    "path-foundation, path-foundation:/local/dir, timm:NAME, timm:NAME:random, hf-hub:ORG/REPO "
    "or stain-texture"
)


@dataclass(frozen=True)
class EncoderSpec:
    kind: str  # "path-foundation", "timm" or "stain-texture"
    name: str = ""  # timm model name (``hf-hub:ORG/REPO`` included)
    location: str | None = None  # local Path Foundation folder
    revision: str | None = None  # Hub revision of Path Foundation
    pretrained: bool = True
    text: str = ""


def parse_spec(spec: str) -> EncoderSpec:
    """Parse an encoder spec string; a bad one is a one-line :class:`PathganError`."""
    text = spec.strip()
    if text in ("path-foundation", "stain-texture"):
        return EncoderSpec(text, text=text)
    if text.startswith("path-foundation@") and len(text) > len("path-foundation@"):
        return EncoderSpec("path-foundation", revision=text.split("@", 1)[1], text=text)
    if text.startswith("path-foundation:") and len(text) > len("path-foundation:"):
        return EncoderSpec("path-foundation", location=text.split(":", 1)[1], text=text)
    if text.startswith("timm:"):
        parts = text.split(":")
        if len(parts) == 2 and parts[1]:
            return EncoderSpec("timm", name=parts[1], text=text)
        if len(parts) == 3 and parts[1] and parts[2] == "random":
            return EncoderSpec("timm", name=parts[1], pretrained=False, text=text)
    if re.fullmatch(r"hf-hub:[\w.-]+/[\w.-]+(@[\w./-]+)?", text):
        return EncoderSpec("timm", name=text, text=text)
    raise PathganError(f"unknown encoder spec {spec!r}: use {SPEC_HELP}")


def is_encoder_id(text: str) -> bool:
    """An encoder id (``path-foundation--1a2b3c4d5e6f--unit01``) rather than a spec."""
    return "--" in text and re.fullmatch(r"[A-Za-z0-9._-]+", text) is not None


def load_encoder(spec: str, device=None, *, precision: str | None = None,
                 chunk_size: int | None = None, token: str | bool | None = None,
                 **model_kwargs) -> Encoder:
    """Load the encoder a spec names, frozen and in eval mode, on ``device`` (default: cuda if
    available, else cpu). ``precision`` (fp32/bf16/fp16) applies to torch encoders; Path
    Foundation always runs in float32. ``chunk_size`` bounds the batch TensorFlow sees at once.
    """
    parsed = parse_spec(spec)
    if parsed.kind == "path-foundation":
        return path_foundation.load_path_foundation(
            parsed.location, device=device, revision=parsed.revision, token=token,
            chunk_size=chunk_size or path_foundation.DEFAULT_CHUNK_SIZE, spec=parsed.text,
        )
    if parsed.kind == "stain-texture":
        return stain_texture.load_stain_texture(device)
    return timm_backbone.load_timm(parsed.name, pretrained=parsed.pretrained, device=device,
                                   precision=precision, spec=parsed.text, **model_kwargs)


def resolve_encoder_id(spec: str) -> str:
    """The id a spec's encoder will have. Path Foundation's is found without TensorFlow (a hash
    of the local folder, or the Hub commit); a torch encoder is loaded on the CPU to hash its
    weights. An encoder id passes through unchanged."""
    if is_encoder_id(spec):
        return spec
    parsed = parse_spec(spec)
    if parsed.kind == "path-foundation":
        return path_foundation.resolve(parsed.location, revision=parsed.revision)[1]
    return load_encoder(spec, device="cpu").encoder_id
