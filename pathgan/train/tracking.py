"""Weights & Biases for a training run, which W&B can never stop.

W&B is a view of the run, not the run: ``metrics.jsonl``, the grids and the checkpoints hold
everything. So a missing login never stops training: with no credentials (no ``WANDB_API_KEY``,
no ``~/.netrc`` entry, nothing from ``wandb login``) and no ``WANDB_MODE`` chosen, the run logs
offline into ``RUN/wandb/`` and says in one line how to upload it later (``wandb sync``); a W&B
that fails to start, or fails mid-run (service unreachable, process gone), is reported in one
line and training goes on without it.
"""

import contextlib
import os
import secrets
import string

from accelerate import Accelerator

from pathgan.config import Config, config_to_dict
from pathgan.runs import RunDir
from pathgan.train.checkpoint import TrainState


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def has_wandb_credentials() -> bool:
    """Whether W&B would find an API key without asking (environment, netrc, its settings).

    Asks W&B's own lookup, which reads every place ``wandb login`` may have written; a W&B
    without it (another version) is taken to have credentials, and a failing start is caught
    later anyway."""
    try:
        import wandb  # here: a second to import, and runs with log.wandb false never need it
        from wandb.sdk.lib import wbauth  # W&B's own credential lookup (not in every version)
    except ImportError:
        return True
    try:
        host = wandb.Settings().base_url  # WANDB_BASE_URL, else W&B's default server
        return wbauth.authenticate_session(host=host, source="pathgan", prompt=False,
                                           update_session=False) is not None
    except Exception:  # a malformed key: W&B's own start says what is wrong with it
        return True


def sync_hint(run: RunDir) -> str:
    return f"upload it later with `wandb sync {run.wandb_dir}/offline-run-*`"


def choose_wandb_mode(accelerator: Accelerator, run: RunDir) -> str | None:
    """``offline``, said in one line, when no mode is chosen and there is no login; else None
    (W&B's own choice: ``WANDB_MODE``, or online)."""
    if os.environ.get("WANDB_MODE") or has_wandb_credentials():
        return None
    accelerator.print(f"W&B: no login found (wandb login, WANDB_API_KEY), so this run logs "
                      f"offline into {run.wandb_dir}; {sync_hint(run)} (WANDB_MODE=disabled: "
                      "no W&B files)")
    return "offline"


def init_trackers(accelerator: Accelerator, config: Config, state: TrainState,
                  run: RunDir, mode: str | None = None) -> bool:
    """Start the run's W&B run (rank 0; the same W&B run on resume); whether W&B logs."""
    if not config.log.wandb:
        return False
    if state.wandb_run_id is None:  # W&B ids: 8 lowercase letters and digits
        state.wandb_run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits)
                                     for _ in range(8))
    mode = mode or choose_wandb_mode(accelerator, run)
    init_kwargs = {"wandb": {
        "name": config.run.name or run.name,
        "entity": config.log.entity,
        "tags": config.log.tags,
        "id": state.wandb_run_id,  # a resumed run continues the same W&B run
        "resume": "allow",
        "dir": str(run.path),  # W&B writes its files into RUN/wandb
        **({"mode": mode} if mode else {}),
    }}
    try:
        accelerator.init_trackers(config.log.project, config=config_to_dict(config),
                                  init_kwargs=init_kwargs)
        return True
    except Exception as error:  # any failure of W&B: train without it
        accelerator.trackers.clear()  # a tracker whose start failed cannot finish either
        _forget_failed_run()
        if (mode or os.environ.get("WANDB_MODE")) in ("offline", "disabled"):
            accelerator.print(f"W&B: could not start ({first_line(error)}); training goes on "
                              "without W&B (metrics.jsonl has every metric)")
            return False
        accelerator.print(f"W&B: could not start online ({first_line(error)}); this run logs "
                          f"offline into {run.wandb_dir}; {sync_hint(run)}")
        return init_trackers(accelerator, config, state, run, mode="offline")


def _forget_failed_run() -> None:
    """Stop W&B's service, which still holds the run id of a start that failed (a second
    start with the same id would be refused as "in use")."""
    import wandb  # here: only after W&B failed to start (see has_wandb_credentials)

    with contextlib.suppress(Exception):  # already gone
        wandb.teardown()


def end_trackers(accelerator: Accelerator, run: RunDir) -> None:
    """Finish W&B and the process group; a W&B that fails to finish is reported, not raised:
    the run is complete and saved by then."""
    try:
        accelerator.end_training()
    except Exception as error:
        accelerator.print(f"W&B: could not finish ({first_line(error)}); the run is complete; "
                          f"its W&B files are in {run.wandb_dir} ({sync_hint(run)})")
