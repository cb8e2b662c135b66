"""Checkpoints of a run: what survives a restart, finding the one to resume, saving, pruning.

A checkpoint is an ``accelerator.save_state`` folder (models, optimizers, the fp16 scaler, RNG
states, and the objects registered for checkpointing: the step counter, the W&B run id, the
EMA generator). Model weights are safetensors; nothing is unpickled from untrusted sources.
Where checkpoints lie and what they are called is the run folder's (:mod:`pathgan.runs`).

A checkpoint counts once its ``COMPLETE`` file exists. That file is written only after every
other file and the folder are on disk (fsync), and it lists each file's size and sha256, so a
file truncated by a dying node is found on resume: ``--resume latest`` then falls back to the
newest intact checkpoint.
"""

import shutil
from pathlib import Path

from pathgan.core.errors import PathganError
from pathgan.core.fileio import fsync_dir, fsync_file, read_json, sha256_file, write_json
from pathgan.runs import CHECKPOINT_NAME, COMPLETE, REPLACED, STAGING, RunDir, replaced_dir


class TrainState:
    """Progress that must survive a restart; registered with ``register_for_checkpointing``.

    The epoch is not kept: it follows from the step (older checkpoints that hold one load too).
    """

    def __init__(self) -> None:
        self.step = 0
        self.wandb_run_id: str | None = None
        self.best_fd: float | None = None  # of the in-loop evaluation, for best/

    def state_dict(self) -> dict:
        return {"step": self.step, "wandb_run_id": self.wandb_run_id, "best_fd": self.best_fd}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.wandb_run_id = state.get("wandb_run_id")
        self.best_fd = state.get("best_fd")


def checkpoint_problem(path: Path) -> str | None:
    """None when every file ``COMPLETE`` lists is there with its size and sha256; else what is
    wrong. (Checkpoints written before files were listed are taken as they are.)"""
    try:
        listed = read_json(path / COMPLETE).get("files", {})
    except (OSError, ValueError) as error:
        return f"unreadable {COMPLETE} ({type(error).__name__})"
    for name, expected in listed.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, not {expected['bytes']}"
        if sha256_file(file) != expected["sha256"]:
            return f"{name} is corrupt (sha256 differs)"
    return None


def resolve_resume(run: RunDir, resume: str | None) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from, and a warning line for each damaged one passed over.

    ``latest``: the newest *intact* checkpoint, or None (a fresh start) when there is none at
    all; an error when every one is damaged. A path: itself, checked.
    """
    if resume is None:
        return None, []
    if resume != "latest":
        path = Path(resume)
        if not (path / COMPLETE).is_file():
            raise PathganError(f"--resume {resume}: not a complete checkpoint folder")
        problem = checkpoint_problem(path)
        if problem:
            raise PathganError(f"--resume {resume}: damaged checkpoint: {problem}")
        return path, []
    warnings = []
    for path in reversed(run.checkpoints()):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, warnings
        warnings.append(f"skipping damaged checkpoint {path.name}: {problem}")
    if warnings:
        raise PathganError(f"no intact checkpoint in {run.checkpoints_dir} "
                           f"({'; '.join(warnings)})")
    return None, []


def commit_checkpoint(staging: Path, path: Path, step: int) -> None:
    """Mark ``staging`` complete and put it in place of ``path``, which is never half-written:
    an older checkpoint of the same step is set aside first and removed after the swap.

    Every file is on disk before ``COMPLETE`` lists it, and ``COMPLETE`` is on disk before the
    rename makes the checkpoint visible."""
    files = {}
    for file in sorted(p for p in staging.rglob("*") if p.is_file()):
        fsync_file(file)
        files[str(file.relative_to(staging))] = {"bytes": file.stat().st_size,
                                                 "sha256": sha256_file(file)}
    for folder in sorted({file.parent for file in staging.rglob("*")} | {staging}):
        fsync_dir(folder)
    write_json(staging / COMPLETE, {"step": step, "files": files})
    fsync_dir(staging)
    old = replaced_dir(path)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    staging.rename(path)
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def prune_checkpoints(run: RunDir, keep: int) -> None:
    """Keep the newest ``keep``; also drop what saves killed half-way left behind."""
    for old in [*run.checkpoints()[:-keep], *run.unfinished_checkpoints()]:
        shutil.rmtree(old, ignore_errors=True)


def clean_unfinished(run: RunDir) -> None:
    """Undo what a save stopped half-way (a full disk, a kill) left, before anything is resumed:
    a staging folder is removed, never resumed from; a checkpoint set aside for a newer one of
    the same step that never took its place is put back."""
    if not run.checkpoints_dir.is_dir():
        return
    for old in run.checkpoints_dir.glob(f"checkpoint-*{REPLACED}"):
        final = old.with_name(old.name.removesuffix(REPLACED))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)
    for staging in run.checkpoints_dir.glob(f"checkpoint-*{STAGING}"):
        shutil.rmtree(staging, ignore_errors=True)


def last_checkpoint_line(run: RunDir) -> str:
    """What a stopped run kept, in words: its newest complete checkpoint and its step."""
    checkpoints = run.checkpoints()
    if not checkpoints:
        return f"no complete checkpoint yet in {run.checkpoints_dir}"
    step = int(CHECKPOINT_NAME.match(checkpoints[-1].name).group(1))
    return f"the last complete checkpoint, {checkpoints[-1]} (step {step})"
