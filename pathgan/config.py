"""Typed run configuration: YAML files, ``key=value`` overrides, validation up front.

Every value has a type and a default here, and what it may be is declared beside it: a choice
is a ``Literal`` (on/off switches that can follow the machine are :data:`Switch`: ``auto``,
``on`` or ``off``), a range an ``Annotated`` :class:`Rule`. A YAML file or an override that names
an unknown key or gives a value of the wrong type, choice or range is a one-line
:class:`PathganError`; :meth:`Config.validate` checks every declaration, then the few rules that
tie keys together.

What a key means to a resumed run is declared with it too: its field is made by :func:`held`,
:func:`recipe`, :func:`length` or :func:`setting` (:class:`OnResume`), and
:func:`resume_changes` sorts a resume's changes by it. A key without one fails a test.
"""

import copy
import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml

from pathgan.core.errors import PathganError
from pathgan.core.fileio import atomic_path
from pathgan.models.augment import parse_policy

#: The modern GAN's discriminator heads (model.heads), and those that judge an encoder's output.
HEADS = ("pixels", "projected", "embedding")
ENCODER_HEADS = ("projected", "embedding")

#: A performance switch: ``auto`` is on where there is CUDA (``core.devices.switch_on``).
#: Config files that say true/false (``channels_last`` was a boolean) still load as on/off.
Switch = Literal["auto", "on", "off"]


@dataclass(frozen=True)
class Rule:
    """What a value must satisfy, and the one-line error when it does not (``{key}`` and
    ``{value}`` are filled in)."""

    holds: Callable[[typing.Any], bool]
    error: str


POSITIVE = Rule(lambda value: value > 0, "{key} must be positive, not {value}")
NOT_NEGATIVE = Rule(lambda value: value >= 0, "{key} cannot be negative, not {value}")
FRACTION = Rule(lambda value: 0.0 <= value < 1.0, "{key} must be in [0, 1), not {value}")
COUNT_OR_NEVER = Rule(lambda value: value >= 0,
                      "data.num_workers and eval.every cannot be negative")
EMA_HORIZON = Rule(lambda value: value > 0, "train.ema_kimg and train.ema_rampup must be positive "
                   "(ema_rampup: null for no warm-up)")
Positive = Annotated[int, POSITIVE]


class OnResume(enum.Enum):
    """What a changed value means to a resumed run (declared on each field, read by
    :func:`resume_changes`)."""

    #: The checkpoint holds it (a network's shape, the GAN's kind, the encoder, the EMA copy):
    #: the saved weights cannot take another value. A resume that changes it is refused.
    HELD = "held"
    #: How the run trains (batch, learning rate, augmentation, data, seed): the steps already
    #: taken used the old value. Changed only with ``--allow-change``, and recorded with the step.
    RECIPE = "recipe"
    #: When the run stops (``train.max_steps``, ``train.epochs``): extending or shortening a run
    #: leaves every step taken true. Taken, and recorded with the step.
    LENGTH = "length"
    #: How it runs or reports, not what it learns (loader workers, logging, checkpoints,
    #: compile, in-loop evaluation): taken.
    SETTING = "setting"


RESUME = "on_resume"  # the field metadata key


def _declared(on_resume: OnResume, default, factory) -> typing.Any:
    metadata = {RESUME: on_resume}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def held(default=None, *, factory=None):
    """A field the checkpoint holds (:attr:`OnResume.HELD`)."""
    return _declared(OnResume.HELD, default, factory)


def recipe(default=None, *, factory=None):
    """A field of the training recipe (:attr:`OnResume.RECIPE`)."""
    return _declared(OnResume.RECIPE, default, factory)


def length(default=None):
    """A field saying when the run stops (:attr:`OnResume.LENGTH`)."""
    return _declared(OnResume.LENGTH, default, None)


def setting(default=None, *, factory=None):
    """A field of how the run runs or reports (:attr:`OnResume.SETTING`)."""
    return _declared(OnResume.SETTING, default, factory)


@dataclass
class RunConfig:
    dir: str = setting("runs/dcgan")  # the run folder: checkpoints, samples, metrics, exports
    name: str | None = setting(None)  # W&B run name (default: the run folder's name)
    seed: int = recipe(0)


@dataclass
class DataConfig:
    shards: str = recipe("shards/camelyon16")  # a shard set made by `pathgan shards pack`
    split: Literal["train", "val"] = recipe("train")
    num_workers: Annotated[int, COUNT_OR_NEVER] = setting(4)  # loader processes per rank
    shuffle_buffer: int = setting(1000)
    # unreadable shards or corrupt samples in a row after which a rank's stream stops
    max_consecutive_failures: Positive = setting(100)
    # decoded patches held for the whole run (auto: on the GPU when the rank's share fits in
    # cache_fraction of its free memory, else in host memory when it fits there, else streamed)
    cache: Literal["auto", "device", "host", "off"] = setting("auto")
    cache_fraction: Annotated[float, Rule(lambda value: 0.0 < value <= 1.0,
                                          "{key} must be in (0, 1], not {value}")] = setting(0.3)
    # real patches flipped and turned by multiples of 90 degrees on the device, at random
    # (tissue has no up or left); off for the reference recipe
    flip_rotate: bool = recipe(False)
    # conditional runs: classes in training batches as the split has them (sampled), or equally
    # often (balanced: rare classes drawn again, common ones less)
    class_balance: Literal["sampled", "balanced"] = recipe("sampled")


@dataclass
class ModelConfig:
    # dcgan and embgan: the seed's two; r3gan: the modern GAN (R3GAN-style ResNets, the
    # relativistic loss with R1/R2, no transposed convolution)
    kind: Literal["dcgan", "embgan", "r3gan"] = held("dcgan")
    # class-conditional networks: G draws the class asked for, each D judges it (the classes
    # are the labels of the shard set's manifest)
    conditional: bool = held(False)
    nz: Positive = held(100)
    # r3gan: the generator's channels at 224 px (doubling as the size halves)
    ngf: Positive = held(64)
    ndf: Positive = held(64)  # r3gan: the discriminator's channels at 224 px
    channels: int = held(3)
    image_size: Annotated[int, Rule(lambda value: value == 224, "{key}: only 224 is "
                                    "supported (the shards are 224)")] = held(224)
    # Embedding GAN
    encoder: str | None = held(None)  # an encoder spec, e.g. path-foundation or timm:NAME:random
    # The encoder's precision in training: auto = that of the precomputed real embeddings
    # (fp32 when real images are encoded in the loop); any other value must match them.
    encoder_precision: Literal["auto", "fp32", "bf16", "fp16"] = recipe("auto")
    disc_hidden: list[int] = held(factory=lambda: [512, 256])
    disc_dropout: Annotated[float, FRACTION] = recipe(0.0)
    spectral_norm: bool = held(False)  # its weights are saved as weight_orig + u, v
    # group size of the embedding discriminator's batch-spread feature (0: none)
    minibatch_std: Annotated[int, Rule(lambda value: value >= 0, "{key} must be 0 (off) or a "
                                       "group size, not {value}")] = held(4)
    hybrid: bool = held(False)  # add the DCGAN pixel discriminator to the embedding one
    pixel_weight: float = recipe(1.0)  # weight of the pixel discriminator's loss in the hybrid
    embedding_weight: float = recipe(1.0)
    # The modern GAN (r3gan): its stages' widths stop growing at max_width; residual blocks per
    # stage; a block's 1x1 convolution widens by expansion; its grouped 3x3 convolution has
    # group_width channels a group; per-pixel noise from noise_from px up (0: none), initial
    # strength noise_strength (an initial value: the checkpoint holds the learnt one)
    max_width: Positive = held(256)
    blocks: Positive = held(1)
    expansion: Positive = held(2)
    group_width: Positive = held(8)
    noise_from: Annotated[int, NOT_NEGATIVE] = held(28)
    noise_strength: Annotated[float, NOT_NEGATIVE] = held(0.1)
    # r3gan's discriminator heads, each with its loss weight: pixels (its ResNet on the images),
    # projected (small discriminators on feature maps of the frozen model.encoder, through fixed
    # random projections: Projected GAN), embedding (the Embedding GAN's Linear discriminator on
    # model.encoder's embedding). Held: the checkpoint has a discriminator per head.
    heads: dict[str, float] = held(factory=lambda: {"pixels": 1.0})
    # the encoder's blocks (ViT) or stages (CNN) the projected head judges; null: the last four
    head_levels: list[int] | None = held(None)
    # images over which the encoder heads' weights ramp up from 0 (0: full from the start)
    head_warmup: Annotated[int, NOT_NEGATIVE] = recipe(0)


@dataclass
class TrainConfig:
    batch_size: Positive = recipe(128)  # global: split across ranks
    epochs: Positive = length(10)
    # stop after this many optimizer steps (overrides epochs); 0 exports the initial generator
    max_steps: Annotated[int, NOT_NEGATIVE] | None = length(None)
    lr: Annotated[float, POSITIVE] = recipe(2e-4)
    beta1: Annotated[float, FRACTION] = recipe(0.5)
    beta2: Annotated[float, FRACTION] = recipe(0.999)
    # Schedules (half a cosine over the run, train/schedules.py): lr -> lr_end, beta2 ->
    # beta2_end; null: constant
    lr_end: Annotated[float, POSITIVE] | None = recipe(None)
    beta2_end: Annotated[float, FRACTION] | None = recipe(None)
    # r3gan: the R1/R2 penalty weight gamma -> gamma_end, taken every penalty_every-th step
    # (lazy regularisation: weighted x penalty_every)
    gamma: Annotated[float, NOT_NEGATIVE] = recipe(1.0)
    gamma_end: Annotated[float, NOT_NEGATIVE] | None = recipe(None)
    penalty_every: Positive = recipe(1)
    # auto: bf16 where the GPU computes in it, fp16 on older GPUs, no (fp32) on the CPU
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = recipe("auto")
    # convolution weights and images in channels-last layout
    channels_last: Switch = setting("on")
    compile: Switch = setting("auto")  # torch.compile of G and D
    # fused Adam, which skips a non-finite update on the device (auto: on CUDA and the CPU);
    # off: foreach Adam, whose skip reads a flag on the host every step
    fused_adam: Switch = setting("auto")
    ema: bool = held(False)  # the EMA generator is part of every checkpoint
    ema_kimg: Annotated[float, EMA_HORIZON] = recipe(10.0)  # EMA half-life in thousands of images
    # warm-up: half-life <= this x images seen (null: none)
    ema_rampup: Annotated[float, EMA_HORIZON] | None = recipe(0.05)
    # DiffAugment before every discriminator (and the encoder): any of color,translation,cutout
    # (comma-separated); null or "" for none
    augment: str | None = recipe(None)
    # SyncBatchNorm across ranks (CUDA) instead of per-rank statistics
    sync_bn: bool = recipe(False)
    # what to do when a loss is NaN or infinite
    nonfinite: Literal["skip", "stop"] = setting("skip")
    # stop after this many steps in a row with a skipped update (checked at log lines)
    max_nonfinite: Positive = setting(20)


@dataclass
class LogConfig:
    every: Positive = setting(10)  # steps between metric lines
    sample_every: Positive = setting(200)  # steps between sample grids
    num_samples: Positive = setting(64)  # images in a grid (a fixed noise batch)
    # log to Weights & Biases (WANDB_MODE=offline/disabled work too)
    wandb: bool = setting(True)
    project: str = setting("pathgan")
    entity: str | None = setting(None)
    tags: list[str] = setting(factory=list)


@dataclass
class CkptConfig:
    every: Positive = setting(500)  # steps between checkpoints (and one at the end)
    keep: Positive = setting(3)  # checkpoints kept, newest first


@dataclass
class EvalConfig:
    # steps between in-loop evaluations (0: never)
    every: Annotated[int, COUNT_OR_NEVER] = setting(0)
    # samples per side; k-NN precision/recall needs k + 1 = 4 samples a side
    n: Annotated[int, Rule(lambda value: value >= 4,
                           "{key} must be at least 4, not {value}")] = setting(256)
    # defaults to model.encoder, else timm:vit_small_patch16_224; the best FD so far (best/) is
    # compared across evaluations, so they must share a space
    encoder: str | None = recipe(None)


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
        """Every key against its declaration, then the rules that tie keys together."""
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            hints = typing.get_type_hints(type(values), include_extras=True)
            for name, kind in hints.items():
                _check(getattr(values, name), kind, f"{section.name}.{name}")
        if self.model.kind == "embgan" and not self.model.encoder:
            raise PathganError("model.encoder is required when model.kind is embgan")
        if self.model.kind == "r3gan":
            self._validate_r3gan()
        elif self.model.heads != {"pixels": 1.0}:
            raise PathganError("model.heads are the modern GAN's (model.kind r3gan); the "
                               "Embedding GAN weighs its two by model.pixel_weight and "
                               "model.embedding_weight")
        if self.model.hybrid and self.model.kind != "embgan":
            raise PathganError("model.hybrid adds a pixel discriminator to the Embedding GAN: "
                               "it needs model.kind embgan")
        try:
            parse_policy(self.train.augment or "")
        except ValueError as error:
            raise PathganError(f"train.augment: {error}") from None
        return self

    def _validate_r3gan(self) -> None:
        """The modern GAN's widths must split into its blocks' groups; its heads are known ones,
        and those on an encoder have one; a conditional one has no projected head."""
        model = self.model
        for key in ("ngf", "ndf", "max_width"):
            if (getattr(model, key) * model.expansion) % model.group_width:
                raise PathganError(f"model.{key} x model.expansion ({getattr(model, key)} x "
                                   f"{model.expansion}) must be a multiple of model.group_width "
                                   f"({model.group_width})")
        unknown = sorted(set(model.heads) - set(HEADS))
        if unknown or not model.heads:
            raise PathganError(f"model.heads: unknown head {', '.join(unknown)} (known: "
                               f"{', '.join(HEADS)})" if unknown else
                               "model.heads: name at least one head")
        for name, weight in model.heads.items():
            if weight <= 0:
                raise PathganError(f"model.heads.{name}: a weight must be positive, not {weight}")
        on_encoder = sorted(set(model.heads) & set(ENCODER_HEADS))
        if on_encoder and not model.encoder:
            raise PathganError(f"model.heads: the {' and '.join(on_encoder)} head needs "
                               "model.encoder (e.g. timm:vit_small_patch16_224)")
        if model.encoder and not on_encoder:
            raise PathganError("model.encoder is used by r3gan's projected and embedding heads "
                               "only: name one in model.heads, or unset model.encoder")
        if model.hybrid:
            raise PathganError("model.hybrid is the Embedding GAN's; r3gan names its heads in "
                               "model.heads")
        if model.conditional and "projected" in model.heads:
            raise PathganError("model.conditional: the projected head judges no class (its "
                               "per-level discriminators have no class projection); use the "
                               "pixels and embedding heads for a conditional modern GAN")


def _check(value, kind, key: str) -> None:
    """``value`` against what its declared type allows: a Literal's choices, a Rule's range."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is not None:
            (inner,) = [a for a in args if a is not type(None)]
            _check(value, inner, key)
    elif origin is Annotated:
        _check(value, args[0], key)
        for rule in args[1:]:
            if not rule.holds(value):
                raise PathganError(rule.error.format(key=key, value=value))
    elif origin is Literal and value not in args:
        raise PathganError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")


# --- loading --------------------------------------------------------------------------------


BOOLEAN_WORDS = {"on": True, "off": False, "yes": True, "no": False, "y": True, "n": False}


def _type_name(kind) -> str:
    return getattr(kind, "__name__", str(kind))


def _coerce(value, kind, key: str):
    """``value`` as a dataclass field's type (its declaration without ``Annotated`` rules); ints
    pass as floats, not vice versa."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is Literal:  # the choice is checked by validate()
        if isinstance(value, bool):
            return "on" if value else "off"  # YAML reads on/off as booleans; so did old configs
        return str(value) if isinstance(value, (int, float)) else value
    if origin is list:
        if not isinstance(value, list):
            raise PathganError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, args[0], key) for item in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise PathganError(f"{key}: expected a mapping, got {value!r}")
        return {str(name): _coerce(item, args[1], f"{key}.{name}") for name, item in value.items()}
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
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


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PathganError(f"config file {path}: no such file")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise PathganError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise PathganError(f"{path} must hold a mapping of config sections")
    return values


def _nested(dotted: dict[str, object]) -> dict:
    """``{"train.lr": 1e-4}`` -> ``{"train": {"lr": 1e-4}}``."""
    nested: dict = {}
    for key, value in dotted.items():
        *sections, name = key.split(".")
        level = nested
        for section in sections:
            level = level.setdefault(section, {})
        level[name] = value
    return nested


def _apply_overrides(config: Config, overrides) -> None:
    for override in overrides:
        keys, value = parse_override(override)
        _apply(config, _nested({".".join(keys): value}), "")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then the overrides; validated."""
    config = Config()
    if path is not None:
        _apply(config, _read_yaml(path), "")
    _apply_overrides(config, overrides)
    return config.validate()


def resume_config(saved: Config, path: str | Path | None, overrides: list[str] = ()) -> Config:
    """A resumed run's config: the run's own (``saved``), then the keys the YAML file writes
    (only those: its defaults do not count), then the overrides; validated."""
    config = copy.deepcopy(saved)
    if path is not None:
        _apply(config, _read_yaml(path), "")
    _apply_overrides(config, overrides)
    return config.validate()


def with_values(config: Config, values: dict[str, object]) -> Config:
    """A copy of ``config`` with dotted keys set (``{"train.batch_size": 8}``); validated."""
    config = copy.deepcopy(config)
    _apply(config, _nested(values), "")
    return config.validate()


def flat_values(config: Config) -> dict[str, object]:
    """Every key of a config, dotted, with its value."""
    return {f"{section}.{name}": value for section, values in config_to_dict(config).items()
            for name, value in values.items()}


def declared_on_resume() -> dict[str, OnResume | None]:
    """Every key and what a change of it means to a resumed run (None: not declared)."""
    return {f"{section.name}.{key.name}": key.metadata.get(RESUME)
            for section in dataclasses.fields(Config)
            for key in dataclasses.fields(section.type)}


@dataclass(frozen=True)
class Change:
    """A key whose value a resumed run changes."""

    key: str
    old: object
    new: object
    on_resume: OnResume

    def __str__(self) -> str:
        return f"{self.key} {self.old!r} -> {self.new!r}"


def resume_changes(old: Config, new: Config) -> list[Change]:
    """The keys whose values differ, each with what its change means (in declaration order)."""
    before, after, meaning = flat_values(old), flat_values(new), declared_on_resume()
    return [Change(key, before[key], after[key], meaning[key])
            for key in before if before[key] != after[key]]


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
