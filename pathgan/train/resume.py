"""The config of a ``pathgan train`` run, new or resumed, decided before anything is written.

A new run: the ``--config`` file, then the ``key=value`` overrides. A resumed run continues
what its folder holds: its own ``config.yaml`` is the base (the ``--config`` file may be left
out); the keys a ``--config`` file writes and the overrides are then changes, sorted by what
each key declares (:class:`pathgan.config.OnResume`): a change of what the checkpoint holds is
refused, a change of the recipe is taken only with ``--allow-change``, and every change that
is taken is recorded with the step it starts at (``changes.jsonl``), so that figures such as
images seen stay true.
"""

from dataclasses import dataclass, field
from pathlib import Path

from pathgan.config import (
    Change,
    Config,
    OnResume,
    load_config,
    parse_override,
    resume_changes,
    resume_config,
)
from pathgan.core.errors import PathganError
from pathgan.core.fileio import read_json
from pathgan.runs import COMPLETE, CONFIG, RunDir


@dataclass
class RunPlan:
    """What ``pathgan train`` is asked to do."""

    config: Config
    changes: list[Change] = field(default_factory=list)  # to record when the resume starts
    notes: list[str] = field(default_factory=list)  # one line each, printed before training


def plan_run(config_path: str | None, overrides: list[str], resume: str | None,
             allow_change: bool = False) -> RunPlan:
    """The config to train with and what a resume changes; a one-line error for a request
    that cannot be honoured (nothing is written here)."""
    if resume is None:
        if config_path is None:
            raise PathganError("pathgan train needs --config CONFIG (or --resume latest "
                               "run.dir=RUN to continue a run from its own config.yaml)")
        return RunPlan(load_config(config_path, overrides))
    run = RunDir(_run_folder(config_path, overrides, resume))
    checkpoint = _checkpoint(run, resume)
    if checkpoint is None:  # nothing trained yet: a fresh start, with the run's settings if any
        if config_path is None and not run.has_config():
            raise PathganError(f"{run.path} has no {CONFIG}: there is no run to resume there; "
                               "pass --config CONFIG to start one")
        config = (load_config(config_path, overrides) if config_path is not None
                  else resume_config(run.read_config(), None, overrides))
        config.run.dir = str(run.path)
        return RunPlan(config)
    origin = RunDir(checkpoint.parent.parent)  # the run that wrote it (--resume PATH: any)
    if not origin.has_config():
        raise PathganError(f"{origin.path} holds checkpoints but no {CONFIG}, so what they hold "
                           "is unknown: resume cannot check the settings")
    step = _step(checkpoint)
    if step is None:
        raise PathganError(f"--resume {resume}: its {COMPLETE} file is unreadable")
    saved = origin.config_at(step)
    config = resume_config(saved, config_path, overrides)
    config.run.dir = str(run.path)
    changes = [c for c in resume_changes(saved, config) if c.key != "run.dir"]
    _refuse_unsafe(changes, origin, step, config_path, allow_change)
    taken = [c for c in changes if c.on_resume in (OnResume.RECIPE, OnResume.LENGTH)]
    notes = [f"resuming {origin.path} at step {step} with its {CONFIG}"
             + (f"; changed: {', '.join(map(str, changes))}" if changes else "")]
    return RunPlan(config, taken, notes)


def _run_folder(config_path: str | None, overrides: list[str], resume: str) -> Path:
    """The run folder a resume continues: ``run.dir=`` on the line, else the ``--config``
    file's, else the folder of the checkpoint ``--resume PATH`` names."""
    for override in reversed(overrides):
        keys, value = parse_override(override)
        if keys == ["run", "dir"] and value:
            return Path(str(value))
    if config_path is not None:
        return Path(load_config(config_path).run.dir)
    if resume != "latest":  # RUN/checkpoints/checkpoint-NNNNNN
        return Path(resume).resolve().parent.parent
    raise PathganError("--resume latest needs the run folder: add run.dir=RUN")


def _checkpoint(run: RunDir, resume: str) -> Path | None:
    """The checkpoint a resume starts from: ``--resume PATH`` itself, or the newest complete
    one of the run (the loop checks its files again and may fall back to an older one)."""
    if resume != "latest":
        path = Path(resume).resolve()
        if not (path / COMPLETE).is_file():
            raise PathganError(f"--resume {resume}: not a complete checkpoint folder")
        return path
    readable = [path for path in run.checkpoints() if _step(path) is not None]
    return readable[-1] if readable else None


def _step(checkpoint: Path) -> int | None:
    try:
        return int(read_json(checkpoint / COMPLETE)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _refuse_unsafe(changes: list[Change], run: RunDir, step: int, config_path: str | None,
                   allow_change: bool) -> None:
    held = [c for c in changes if c.on_resume is OnResume.HELD]
    if held:
        change = held[0]
        fix = (f"leave --config {config_path} out (the run's {CONFIG} is used)" if config_path
               else f"leave {change.key} out")
        raise PathganError(
            f"{change.key}: the checkpoint of {run.path} holds {change.old!r}, this resume asks "
            f"for {change.new!r}; a resumed run keeps what its checkpoint holds: {fix}, or "
            "start a new run.dir")
    recipe = [c for c in changes if c.on_resume is OnResume.RECIPE]
    if recipe and not allow_change:
        raise PathganError(
            f"resuming {run.path} at step {step} would change its recipe: "
            f"{', '.join(map(str, recipe))}; pass --allow-change to take "
            f"{'it' if len(recipe) == 1 else 'them'} from step {step} on (recorded in "
            f"changes.jsonl), or leave {'it' if len(recipe) == 1 else 'them'} out")
    undeclared = [c for c in changes if c.on_resume is None]
    if undeclared:  # a key added without saying what it means to a resume: never silently
        raise PathganError(f"{undeclared[0].key} declares nothing about resuming "
                           "(pathgan.config.OnResume); it cannot change on resume")
