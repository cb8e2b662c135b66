"""The run folder: every file a training run writes, by name, and how to read each one back.

The contract between ``pathgan train`` and the stages that read its runs (``sample``, ``eval``,
``push`` and its model card, the demo), as :mod:`pathgan.shards.format` is the shard set's::

    RUN/config.yaml                   the resolved config, read back as the typed Config
    RUN/changes.jsonl                 what resumes changed, with the step ({"step": N,
                                      "changes": {"train.lr": {"from": A, "to": B}}, ...})
    RUN/metrics.jsonl                 one JSON object per logged step ({"step": N, ...})
    RUN/samples/step_NNNNNN.png       grids drawn from the run's fixed noise
    RUN/samples/<class>/step_NNNNNN.png  a conditional run's: the same noise, all of one class
    RUN/loss.png                      Loss_D and Loss_G per logged step
    RUN/checkpoints/checkpoint-NNNNNN/  Accelerate save_state folders; each counts once its
                                      COMPLETE file (the step, every file's size and sha256) is in
    RUN/generator.safetensors         the exported generator: its weights ...
    RUN/generator.json                ... and what rebuilds it (model config, GAN kind, encoder;
                                      the modern GAN's widths, blocks and noise)
    RUN/best/                         the generator of the best in-loop evaluation, and best.json
    RUN/PREEMPTED                     a run stopped by a signal before its end (holds the step)
    RUN/eval/                         ``pathgan eval``'s default output (:class:`EvalDir`)
    RUN/evaluations.jsonl             where ``pathgan eval`` wrote each eval.json of this
                                      generator ({"eval": PATH, "created": ...}), anywhere
    RUN/wandb/                        Weights & Biases' own files (offline runs)

A *generator folder* is any folder that holds the two generator files: a run folder, its
``best/``, or a Hub repo made by ``pathgan push`` (which uploads them under the same names).
Weights are safetensors: loading never unpickles anything.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pathgan.config import Change, Config, load_config, save_config, with_values
from pathgan.core.errors import PathganError
from pathgan.core.fileio import atomic_path, read_json, timestamp, write_json
from pathgan.models.conditional import ConditionalGenerator, ConditionalR3Generator
from pathgan.models.dcgan import Generator
from pathgan.models.r3gan import R3Generator

CONFIG = "config.yaml"
CHANGES = "changes.jsonl"
EVALUATIONS = "evaluations.jsonl"
METRICS = "metrics.jsonl"
SAMPLES = "samples"
LOSS_PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)$")
COMPLETE = "COMPLETE"  # inside a checkpoint: written last, it lists every other file
STAGING, REPLACED = ".partial", ".old"  # suffixes of a checkpoint folder being saved or swapped
BEST = "best"
BEST_RECORD = "best.json"  # in best/: the step and figures of that evaluation
PREEMPTED = "PREEMPTED"
EVAL = "eval"
WANDB = "wandb"
GENERATOR_WEIGHTS = "generator.safetensors"
GENERATOR_CONFIG = "generator.json"
GENERATOR_FILES = (GENERATOR_WEIGHTS, GENERATOR_CONFIG)


class RunDir:
    """A run folder (``run.dir``): the paths of its files, and readers of them. Nothing is
    created until something is written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    # -- the config ---------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    def has_config(self) -> bool:
        return self.config_path.is_file()

    def read_config(self) -> Config:
        """The run's resolved config, validated (switches written as true/false load too)."""
        return load_config(self.config_path)

    def write_config(self, config: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(config, self.config_path)

    # -- what resumes changed ---------------------------------------------------------------------
    @property
    def changes_path(self) -> Path:
        return self.path / CHANGES

    def read_changes(self) -> list[dict]:
        """The records of ``changes.jsonl``, oldest first (a line torn by a kill is skipped)."""
        return _read_jsonl(self.changes_path, "step")

    def record_changes(self, step: int, changes: list[Change]) -> None:
        """Append what a resume at ``step`` changed (its first step runs with the new values)."""
        record = {"step": step, "time": timestamp(),
                  "changes": {c.key: {"from": c.old, "to": c.new} for c in changes}}
        with open(self.changes_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def drop_changes_after(self, step: int) -> None:
        """On resume from ``step``: changes made later are undone with the steps they ran."""
        records = self.read_changes()
        kept = [record for record in records if record["step"] <= step]
        if len(kept) != len(records):
            _write_jsonl(self.changes_path, kept)

    def config_at(self, step: int) -> Config:
        """The config the steps up to ``step`` ran with: ``config.yaml`` with the changes
        recorded after ``step`` undone, newest first."""
        config = self.read_config()
        for record in reversed(self.read_changes()):
            if record["step"] > step:
                config = with_values(config, {key: change["from"]
                                              for key, change in record["changes"].items()})
        return config

    def images_seen(self, step: int) -> int:
        """Real images the discriminator saw in ``step`` steps: each stretch of steps at the
        global batch size it ran with (``changes.jsonl``, then ``config.yaml``)."""
        stretches = []  # (first step, batch size from there on)
        for record in self.read_changes():
            change = record["changes"].get("train.batch_size")
            if change is not None:
                if not stretches:
                    stretches.append((0, change["from"]))
                stretches.append((record["step"], change["to"]))
        if not stretches:
            stretches = [(0, self.read_config().train.batch_size)]
        ends = [start for start, _ in stretches[1:]] + [step]
        return sum(max(0, min(end, step) - start) * batch
                   for (start, batch), end in zip(stretches, ends, strict=True))

    # -- metrics, samples, the loss plot --------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS

    def read_metrics(self) -> list[dict]:
        """The rows of ``metrics.jsonl``; a line torn by a kill mid-append is skipped."""
        return _read_jsonl(self.metrics_path, "step")

    def last_logged_step(self) -> int | None:
        rows = self.read_metrics()
        return rows[-1]["step"] if rows else None

    @property
    def samples_dir(self) -> Path:
        return self.path / SAMPLES

    def sample_grid(self, step: int) -> Path:
        return self.samples_dir / f"step_{step:06d}.png"

    @staticmethod
    def grid_step(grid: Path) -> int:
        """The step a sample grid was drawn at, from its name."""
        return int(grid.stem.removeprefix("step_"))

    def newest_sample_grid(self) -> Path | None:
        grids = sorted(self.samples_dir.glob("step_*.png"))  # zero-padded steps sort
        return grids[-1] if grids else None

    def class_sample_grid(self, step: int, name: str) -> Path:
        """A conditional run's grid of one class (the class name made safe for a folder)."""
        return self.samples_dir / safe_class_folder(name) / f"step_{step:06d}.png"

    def newest_class_sample_grids(self, classes: list[str]) -> dict[str, Path]:
        """The newest grid of each class that has one."""
        found = {}
        for name in classes:
            grids = sorted((self.samples_dir / safe_class_folder(name)).glob("step_*.png"))
            if grids:
                found[name] = grids[-1]
        return found

    @property
    def loss_plot(self) -> Path:
        return self.path / LOSS_PLOT

    # -- checkpoints ------------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / f"checkpoint-{step:06d}"

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder counts once its COMPLETE file exists)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.iterdir() if CHECKPOINT_NAME.match(p.name)
                 and (p / COMPLETE).is_file()]
        return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)))

    def unfinished_checkpoints(self) -> list[Path]:
        """What saves killed half-way left: folders being written or swapped out."""
        return [*self.checkpoints_dir.glob(f"checkpoint-*{STAGING}"),
                *self.checkpoints_dir.glob(f"checkpoint-*{REPLACED}")]

    def final_step(self) -> int | None:
        """The step of the exported generator: the loop checkpoints at its very end (runs without
        checkpoints: the last logged step)."""
        checkpoints = self.checkpoints()
        if checkpoints:
            return int(read_json(checkpoints[-1] / COMPLETE)["step"])
        return self.last_logged_step()

    # -- the best generator, preemption, evaluations, W&B ----------------------------------------
    @property
    def best_dir(self) -> Path:
        """A generator folder: the generator of the best in-loop evaluation."""
        return self.path / BEST

    def read_best(self) -> dict:
        """``best/best.json`` (the step and figures of the best evaluation), or {}."""
        path = self.best_dir / BEST_RECORD
        return read_json(path) if path.is_file() else {}

    def write_best(self, record: dict) -> None:
        write_json(self.best_dir / BEST_RECORD, record)

    @property
    def preempted(self) -> bool:
        """Stopped by a signal before its end: its exported generator is not its last."""
        return (self.path / PREEMPTED).is_file()

    def mark_preempted(self, step: int) -> None:
        (self.path / PREEMPTED).write_text(f"{step}\n")

    def clear_preempted(self) -> None:
        (self.path / PREEMPTED).unlink(missing_ok=True)

    @property
    def eval_dir(self) -> Path:
        """Where ``pathgan eval`` of this run alone writes by default."""
        return self.path / EVAL

    @property
    def evaluations_path(self) -> Path:
        return self.path / EVALUATIONS

    def record_evaluation(self, result: Path) -> None:
        """Note where ``pathgan eval`` wrote an ``eval.json`` that scored this generator."""
        record = {"eval": str(Path(result).resolve()), "created": timestamp()}
        with open(self.evaluations_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def eval_results(self) -> list[Path]:
        """Every ``eval.json`` that may score this generator: those one folder down
        (``RUN/eval``, any ``--out`` put inside the run) and those ``evaluations.jsonl`` points
        to that are still there."""
        recorded = [Path(record["eval"]) for record in _read_jsonl(self.evaluations_path, "eval")]
        return sorted({*(path.resolve() for path in self.path.glob(f"*/{EvalDir.RESULT}")),
                       *(path for path in recorded if path.is_file())})

    @property
    def wandb_dir(self) -> Path:
        return self.path / WANDB


def _read_jsonl(path: Path, required: str) -> list[dict]:
    """The objects of a JSON-lines file that have ``required``; a torn line is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and required in row:
            rows.append(row)
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))


def safe_class_folder(name: str) -> str:
    """A class name as a folder name (letters, digits, ``-_.``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "class"


def staging_dir(checkpoint: Path) -> Path:
    """Where a checkpoint is written before it replaces ``checkpoint`` (not a checkpoint name)."""
    return checkpoint.with_name(checkpoint.name + STAGING)


def replaced_dir(checkpoint: Path) -> Path:
    """Where an older checkpoint of the same step is set aside while a new one takes its name."""
    return checkpoint.with_name(checkpoint.name + REPLACED)


class EvalDir:
    """What ``pathgan eval`` writes into its output folder (``RUN/eval`` by default): ``eval.json``
    (every figure), ``report.md``, the real grid and, per run, a generated grid and a copy of its
    loss plot. The JSON names the images relative to the folder, as the report links them."""

    RESULT = "eval.json"
    REPORT = "report.md"
    REAL_GRID = "real.png"
    # ``pathgan utility`` writes beside eval's files (a conditional run's downstream utility)
    UTILITY_RESULT = "utility.json"
    UTILITY_REPORT = "utility.md"
    UTILITY_FIGURE = "utility.png"

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def result_path(self) -> Path:
        return self.path / self.RESULT

    @property
    def report_path(self) -> Path:
        return self.path / self.REPORT

    @staticmethod
    def fake_grid(name: str) -> str:
        return f"{name}-fake.png"

    @staticmethod
    def loss_plot(name: str) -> str:
        return f"{name}-loss.png"

    def read_result(self) -> dict:
        return read_json(self.result_path)


# -- the exported generator (in any generator folder) -------------------------------------------
#: generator.json's keys that rebuild a modern (r3gan) generator, beside nz, ngf and channels
R3GAN_GENERATOR_KEYS = ("max_width", "blocks", "expansion", "group_width", "noise_from",
                        "noise_strength")


def generator_config(model, encoder_id: str | None = None, classes=None) -> dict:
    """``generator.json`` of a run's ``model`` config section: what :func:`load_generator`
    rebuilds the generator from, and what made it (the encoder's spec and id, for an
    Embedding GAN; for a conditional one, its classes in code order, their training samples
    and how batches were balanced: ``train.classes.Classes``; for the modern GAN, its widths,
    blocks and noise)."""
    config = {"nz": model.nz, "ngf": model.ngf, "channels": model.channels,
              "image_size": model.image_size, "kind": model.kind, "encoder": model.encoder,
              "encoder_id": encoder_id}
    if model.kind == "r3gan":
        config.update({key: getattr(model, key) for key in R3GAN_GENERATOR_KEYS})
    if classes is not None:
        config.update(conditional=True, classes=list(classes.names),
                      class_counts=list(classes.counts), class_balance=classes.balance)
    return config


def generator_classes(config: dict) -> list[str] | None:
    """The classes a generator draws (from its ``generator.json``), None when unconditional."""
    return list(config["classes"]) if config.get("conditional") else None


def build_generator(config: dict) -> torch.nn.Module:
    """A freshly initialised generator of the kind, size and classes a :func:`generator_config`
    says (generator.json files written before the modern GAN have no kind's keys: a DCGAN's)."""
    classes = generator_classes(config)
    if config.get("kind") == "r3gan":
        shape = {key: config[key] for key in R3GAN_GENERATOR_KEYS}
        if classes:
            return ConditionalR3Generator(config["nz"], config["ngf"], channels=config["channels"],
                                          num_classes=len(classes), **shape)
        return R3Generator(config["nz"], config["ngf"], channels=config["channels"], **shape)
    if classes:
        return ConditionalGenerator(nz=config["nz"], ngf=config["ngf"],
                                    channels=config["channels"], num_classes=len(classes))
    return Generator(nz=config["nz"], ngf=config["ngf"], channels=config["channels"])


def export_generator(generator: torch.nn.Module, model_config: dict, folder: Path) -> Path:
    """Save generator weights as safetensors beside a JSON of the model config."""
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    with atomic_path(folder / GENERATOR_WEIGHTS) as temporary:
        save_file(state, str(temporary))
    write_json(folder / GENERATOR_CONFIG, model_config)
    return folder / GENERATOR_WEIGHTS


def require_generator(folder: str | Path) -> None:
    """A one-line error unless ``folder`` holds an exported generator."""
    folder = Path(folder)
    if not all((folder / name).is_file() for name in GENERATOR_FILES):
        raise PathganError(f"{folder} has no exported generator ({GENERATOR_WEIGHTS}); "
                           "train it first or point at a finished run folder")


def read_generator_config(folder: str | Path) -> dict:
    """``generator.json`` of a generator folder."""
    return read_json(Path(folder) / GENERATOR_CONFIG)


def load_generator(folder: str | Path, device: str | torch.device = "cpu"):
    """The exported generator of a folder (eval mode) and its model config."""
    require_generator(folder)
    config = read_generator_config(folder)
    generator = build_generator(config)
    generator.load_state_dict(load_file(str(Path(folder) / GENERATOR_WEIGHTS)))
    return generator.to(device).eval(), config
