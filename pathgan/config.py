"""Typed run configuration: YAML files, ``key=value`` overrides, validation up front.

Every value has a type and a default here; a YAML file or an override that names an unknown key
or gives a value of the wrong type or range is a one-line :class:`PathganError`.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pathgan.core.errors import PathganError
from pathgan.core.fileio import atomic_path
from pathgan.models.augment import parse_policy


@dataclass
class RunConfig:
    dir: str = "runs/dcgan"  # the run folder: checkpoints, samples, metrics, exports
    name: str | None = None  # W&B run name (default: the run folder's name)
    seed: int = 0


@dataclass
class DataConfig:
    shards: str = "shards/camelyon16"  # a shard set made by `pathgan shards pack`
    split: str = "train"
    num_workers: int = 4  # loader processes per rank
    shuffle_buffer: int = 1000
    # unreadable shards or corrupt samples in a row after which a rank's stream stops
    max_consecutive_failures: int = 100
    # decoded patches held for the whole run: auto | device | host | off (auto: on the GPU
    # when the rank's share fits in cache_fraction of its free memory, else in host memory
    # when it fits there, else streamed)
    cache: str = "auto"
    cache_fraction: float = 0.3
    # real patches flipped and turned by multiples of 90 degrees on the device, at random
    # (tissue has no up or left); off for the reference recipe
    flip_rotate: bool = False


@dataclass
class ModelConfig:
    kind: str = "dcgan"  # dcgan | embgan
    nz: int = 100
    ngf: int = 64
    ndf: int = 64
    channels: int = 3
    image_size: int = 224
    # Embedding GAN
    encoder: str | None = None  # an encoder spec, e.g. path-foundation or timm:NAME:random
    # The encoder's precision in training: auto = that of the precomputed real embeddings
    # (fp32 when real images are encoded in the loop); any other value must match them.
    encoder_precision: str = "auto"
    disc_hidden: list[int] = field(default_factory=lambda: [512, 256])
    disc_dropout: float = 0.0
    spectral_norm: bool = False
    minibatch_std: int = 4  # group size of the embedding discriminator's batch-spread feature
    hybrid: bool = False  # add the DCGAN pixel discriminator to the embedding one
    pixel_weight: float = 1.0  # weight of the pixel discriminator's loss in the hybrid
    embedding_weight: float = 1.0


@dataclass
class TrainConfig:
    batch_size: int = 128  # global: split across ranks
    epochs: int = 10
    # stop after this many optimizer steps (overrides epochs); 0 exports the initial generator
    max_steps: int | None = None
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16 (auto: bf16 where supported)
    channels_last: bool = True
    compile: str = "auto"  # auto | on | off (auto: on with CUDA)
    # auto | on | off (auto: fused on CUDA and CPU, which skips a non-finite update on the
    # device; off: foreach Adam, whose skip reads a flag on the host every step)
    fused_adam: str = "auto"
    ema: bool = False
    ema_kimg: float = 10.0  # EMA half-life in thousands of images
    ema_rampup: float | None = 0.05  # warm-up: half-life <= this x images seen (null: none)
    # DiffAugment before every discriminator (and the encoder): any of color,translation,cutout
    # (comma-separated); null or "" for none
    augment: str | None = None
    sync_bn: bool = False  # SyncBatchNorm across ranks (CUDA) instead of per-rank statistics
    nonfinite: str = "skip"  # skip | stop: what to do when a loss is NaN or infinite
    # stop after this many steps in a row with a skipped update (checked at log lines)
    max_nonfinite: int = 20


@dataclass
class LogConfig:
    every: int = 10  # steps between metric lines
    sample_every: int = 200  # steps between sample grids
    num_samples: int = 64  # images in a grid (a fixed noise batch)
    wandb: bool = True  # log to Weights & Biases (WANDB_MODE=offline/disabled work too)
    project: str = "pathgan"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class CkptConfig:
    every: int = 500  # steps between checkpoints (and one at the end)
    keep: int = 3  # checkpoints kept, newest first


@dataclass
class EvalConfig:
    every: int = 0  # steps between in-loop evaluations (0: never)
    n: int = 256  # samples per side
    encoder: str | None = None  # defaults to model.encoder, else timm:vit_small_patch16_224


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> "Config":
        choices = {
            "model.kind": (self.model.kind, ("dcgan", "embgan")),
            "train.mixed_precision": (self.train.mixed_precision, ("auto", "no", "fp16", "bf16")),
            "train.compile": (self.train.compile, ("auto", "on", "off")),
            "train.fused_adam": (self.train.fused_adam, ("auto", "on", "off")),
            "train.nonfinite": (self.train.nonfinite, ("skip", "stop")),
            "data.split": (self.data.split, ("train", "val")),
            "data.cache": (self.data.cache, ("auto", "device", "host", "off")),
            "model.encoder_precision": (self.model.encoder_precision,
                                        ("auto", "fp32", "bf16", "fp16")),
        }
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise PathganError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        positive = {
            "model.nz": self.model.nz, "model.ngf": self.model.ngf, "model.ndf": self.model.ndf,
            "train.batch_size": self.train.batch_size, "train.epochs": self.train.epochs,
            "train.lr": self.train.lr, "log.every": self.log.every,
            "log.sample_every": self.log.sample_every, "log.num_samples": self.log.num_samples,
            "ckpt.every": self.ckpt.every, "ckpt.keep": self.ckpt.keep,
            "train.max_nonfinite": self.train.max_nonfinite,
            "data.max_consecutive_failures": self.data.max_consecutive_failures,
        }
        for key, value in positive.items():
            if value <= 0:
                raise PathganError(f"{key} must be positive, not {value}")
        if self.train.max_steps is not None and self.train.max_steps < 0:
            raise PathganError(f"train.max_steps cannot be negative, not {self.train.max_steps}")
        if self.eval.n < 4:  # k-NN precision/recall needs k + 1 = 4 samples a side
            raise PathganError(f"eval.n must be at least 4, not {self.eval.n}")
        if not 0.0 < self.data.cache_fraction <= 1.0:
            raise PathganError(f"data.cache_fraction must be in (0, 1], not "
                               f"{self.data.cache_fraction}")
        if self.data.num_workers < 0 or self.eval.every < 0:
            raise PathganError("data.num_workers and eval.every cannot be negative")
        for key, value in {"train.beta1": self.train.beta1, "train.beta2": self.train.beta2,
                           "model.disc_dropout": self.model.disc_dropout}.items():
            if not 0.0 <= value < 1.0:
                raise PathganError(f"{key} must be in [0, 1), not {value}")
        if self.model.image_size != 224:
            raise PathganError("model.image_size: only 224 is supported (the shards are 224)")
        if self.model.minibatch_std < 0:
            raise PathganError(f"model.minibatch_std must be 0 (off) or a group size, not "
                               f"{self.model.minibatch_std}")
        if self.model.kind == "embgan" and not self.model.encoder:
            raise PathganError("model.encoder is required when model.kind is embgan")
        if self.model.hybrid and self.model.kind != "embgan":
            raise PathganError("model.hybrid adds a pixel discriminator to the Embedding GAN: "
                               "it needs model.kind embgan")
        if self.train.ema_kimg <= 0 or (self.train.ema_rampup is not None
                                        and self.train.ema_rampup <= 0):
            raise PathganError("train.ema_kimg and train.ema_rampup must be positive "
                               "(ema_rampup: null for no warm-up)")
        try:
            parse_policy(self.train.augment or "")
        except ValueError as error:
            raise PathganError(f"train.augment: {error}") from None
        return self


# --- loading --------------------------------------------------------------------------------


BOOLEAN_WORDS = {"on": True, "off": False, "yes": True, "no": False, "y": True, "n": False}


def _type_name(kind) -> str:
    return getattr(kind, "__name__", str(kind))


def _coerce(value, kind, key: str):
    """Check ``value`` against a dataclass field type; ints pass as floats, not vice versa."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        if not isinstance(value, list):
            raise PathganError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, args[0], key) for item in value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if kind is bool and isinstance(value, str) and value.lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[value.lower()]
    if kind is str and isinstance(value, bool):
        return "on" if value else "off"  # YAML reads `on`/`off` as booleans
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise PathganError(f"{key}: expected {_type_name(kind)}, got {value!r}")
    return value


def _apply(section, values: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(section))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in hints:
            known = ", ".join(f"{prefix}{f.name}" for f in dataclasses.fields(section))
            raise PathganError(f"unknown config key {key!r} (known: {known})")
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise PathganError(f"{key}: expected a mapping of keys, got {value!r}")
            _apply(getattr(section, name), value, f"{key}.")
        else:
            setattr(section, name, _coerce(value, hints[name], key))


def parse_override(text: str) -> tuple[list[str], object]:
    """``train.batch_size=64`` -> (["train", "batch_size"], 64); values are read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise PathganError(f"override {text!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip().lower()  # YAML 1.1 reads no/yes/on/off as booleans: keep the word
    return key.strip().split("."), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then the overrides; validated."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise PathganError(f"config file {path}: no such file")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise PathganError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise PathganError(f"{path} must hold a mapping of config sections")
        _apply(config, values, "")
    for override in overrides:
        keys, value = parse_override(override)
        nested = value
        for part in reversed(keys):
            nested = {part: nested}
        _apply(config, nested, "")
    return config.validate()


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
