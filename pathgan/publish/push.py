"""``pathgan push``: a trained generator to the Hugging Face Hub, with its model card.

:func:`push` writes the folder a model repo gets (the exported generator, the training config
without local paths, ``eval.json``, a sample grid, the loss plot and a model card written by
:mod:`pathgan.publish.model_card`) and uploads it with ``HfApi.upload_folder``, or writes it for
review.

The token comes from ``hf auth login`` or ``HF_TOKEN`` and is handed to ``HfApi`` only: it is
never printed or written.
"""

import re
import shutil
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import yaml
from huggingface_hub.errors import HfHubHTTPError, HTTPError  # HTTPError: the transport's

from pathgan.config import Config, config_to_dict
from pathgan.core.errors import PathganError
from pathgan.core.fileio import atomic_path, write_json
from pathgan.publish.model_card import (
    CARD,
    SAMPLE_GRID,
    RunFacts,
    class_grid_name,
    public_encoder_spec,
    read_run_facts,
    render_card,
)
from pathgan.runs import (
    BEST_RECORD,
    CONFIG,
    GENERATOR_CONFIG,
    GENERATOR_WEIGHTS,
    LOSS_PLOT,
    EvalDir,
)

REPO_ID_FORM = re.compile(r"[\w.-]+/[\w.-]+")
#: config keys that hold local paths: the uploaded copy leaves them out.
LOCAL_PATH_KEYS = (("run", "dir"), ("data", "shards"))
ENCODER_KEYS = (("model", "encoder"), ("eval", "encoder"))
#: eval.json keys that name local folders or files (the run, the real shard set, its grids).
EVAL_LOCAL_KEYS = {"runs": ("run", "name", "fake_grid", "loss_plot"), "real": ("shards", "grid"),
                   "result": ("out_dir",)}
TEXT_SUFFIXES = (".md", ".json", ".yaml")


# -- the folder a repo gets --------------------------------------------------------------------
def public_config(config: Config) -> tuple[dict, list[str]]:
    """The training config without local paths, and comment lines saying what was changed."""
    public = config_to_dict(config)
    notes = []
    for section, key in LOCAL_PATH_KEYS:
        if public.get(section, {}).pop(key, None) is not None:
            notes.append(f"{section}.{key} (a local path) is left out")
    for section, key in ENCODER_KEYS:
        spec = public.get(section, {}).get(key)
        if spec and public_encoder_spec(spec) != spec:
            public[section][key] = public_encoder_spec(spec)
            notes.append(f"{section}.{key} named a local copy of Path Foundation: written as "
                         "path-foundation")
    return public, notes


def public_eval(result: dict, entry: dict) -> dict:
    """``eval.json`` reduced to this generator's figures, without local paths or file names."""
    def without(mapping: dict, kind: str) -> dict:
        return {k: v for k, v in mapping.items() if k not in EVAL_LOCAL_KEYS[kind]}

    public = without({k: v for k, v in result.items() if k not in ("runs", "real")}, "result")
    public["encoder_spec"] = public_encoder_spec(result.get("encoder_spec"))
    return {**public, "real": without(result.get("real", {}), "real"),
            "runs": [without(entry, "runs")]}


def public_utility(result: dict) -> dict:
    """``utility.json`` without local paths: the generator's and the real shard set's, and
    what the held-out check said of them (its verdict is kept)."""
    public = {k: v for k, v in result.items() if k not in ("run", "real", "out_dir")}
    public["held_out"] = str(result.get("held_out", "")).split(":")[0]
    return public


def _write_config(config: Config, path: Path) -> None:
    public, notes = public_config(config)
    header = ["# The resolved training config of this generator (pathgan).", *(
        f"# {note}." for note in notes)]
    if notes:
        header.append(f"# To train again: pathgan train --config {CONFIG} "
                      "data.shards=SHARDS run.dir=RUN")
    with atomic_path(path) as temporary:
        temporary.write_text("\n".join(header) + "\n" + yaml.safe_dump(public, sort_keys=False))


def write_repo_folder(facts: RunFacts, folder: Path, repo_id: str,
                      revision: str | None = None) -> list[str]:
    """Write every file the repo gets into ``folder`` (a generator folder: the run's files keep
    their names); returns their names."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(facts.generator_dir / GENERATOR_WEIGHTS, folder / GENERATOR_WEIGHTS)
    generator = {**facts.generator, "encoder": public_encoder_spec(facts.generator.get("encoder"))}
    write_json(folder / GENERATOR_CONFIG, generator)
    _write_config(facts.config, folder / CONFIG)
    if facts.eval_file:
        write_json(folder / EvalDir.RESULT, public_eval(*facts.eval_file))
    if facts.best:
        shutil.copyfile(facts.generator_dir / BEST_RECORD, folder / BEST_RECORD)
    if facts.sample_grid:
        shutil.copyfile(facts.sample_grid, folder / SAMPLE_GRID)
    for name, grid in facts.class_grids.items():
        shutil.copyfile(grid, folder / class_grid_name(name))
    if facts.utility:
        write_json(folder / EvalDir.UTILITY_RESULT, public_utility(facts.utility))
    if facts.loss_plot:
        shutil.copyfile(facts.loss_plot, folder / LOSS_PLOT)
    with atomic_path(folder / CARD) as temporary:
        temporary.write_text(render_card(facts, repo_id, revision))
    return sorted(path.name for path in folder.iterdir())


def local_paths(run_dir: Path, config: Config) -> list[str]:
    """Strings that must never be published: the run's and the data's folders, the home."""
    paths = {str(run_dir.resolve()), str(Path.home())}
    values = config_to_dict(config)
    for section, key in LOCAL_PATH_KEYS:
        value = str(values[section][key] or "")
        if "/" in value:  # a bare folder name is too short to tell from ordinary words
            paths.update({value, str(Path(value).resolve())})
    return sorted(path for path in paths if len(path) > 1)


def check_no_local_paths(folder: Path, forbidden: list[str]) -> None:
    """Refuse to publish a text file that names a local path (a guard for keys added later)."""
    for path in sorted(folder.iterdir()):
        if path.suffix in TEXT_SUFFIXES:
            text = path.read_text()
            for local in forbidden:
                if local in text:
                    raise PathganError(f"{path.name} would publish the local path {local}; "
                                       "nothing was uploaded")


# -- to the Hub --------------------------------------------------------------------------------
def hub_token() -> str:
    token = huggingface_hub.get_token()
    if not token:
        raise PathganError("no Hugging Face token: run `hf auth login` (or set HF_TOKEN) with a "
                           "token that may write to the repo")
    return token


def _hub_error(repo_id: str, error) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return "the Hugging Face Hub refused the token (401): run `hf auth login` again"
    if status == 403:
        return (f"the token may not write to {repo_id} (403): use a token with write access "
                f"to {repo_id.split('/')[0]}")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
    return f"cannot push to {repo_id}: {first_line}"


def upload(folder: Path, repo_id: str, *, token: str, private: bool, revision: str | None,
           message: str) -> str:
    """Create the repo (and branch) when missing, upload ``folder`` in one commit; its URL."""
    api = huggingface_hub.HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                                   commit_message=message)
    except HfHubHTTPError as error:
        raise PathganError(_hub_error(repo_id, error)) from error
    except (OSError, HTTPError) as error:  # no network, or HF_HUB_OFFLINE
        raise PathganError(f"cannot reach the Hugging Face Hub to push {repo_id}: "
                           f"{str(error).splitlines()[0] if str(error) else type(error)}"
                           ) from error
    return commit.commit_url


def push(run_dir: str | Path, repo_id: str, *, private: bool = False,
         revision: str | None = None, best: bool = False, eval_path: str | Path | None = None,
         dry_run: str | Path | None = None) -> str:
    """Upload a run's generator with its model card; with ``dry_run`` write the folder there
    instead and upload nothing. Returns the commit URL, or the dry-run folder."""
    if not REPO_ID_FORM.fullmatch(repo_id):
        raise PathganError(f"--repo {repo_id!r} is not of the form ORG/NAME")
    if dry_run is not None and Path(dry_run).exists() and any(Path(dry_run).iterdir()):
        raise PathganError(f"--dry-run {dry_run} is not empty: give a new or empty folder")
    token = None if dry_run is not None else hub_token()
    run_dir = Path(run_dir)
    facts = read_run_facts(run_dir, best=best, eval_path=eval_path)
    if facts.eval_file is None:
        print(f"pathgan push: note: no eval.json of `pathgan eval` scored this generator (looked "
              f"in {', '.join(facts.eval_searched)}): the card will say so; run `pathgan eval "
              f"{facts.generator_dir} --real SHARDS` or pass --eval PATH", file=sys.stderr,
              flush=True)
    forbidden = local_paths(run_dir, facts.config)
    if dry_run is not None:
        write_repo_folder(facts, Path(dry_run), repo_id, revision)
        check_no_local_paths(Path(dry_run), forbidden)
        return str(dry_run)
    with tempfile.TemporaryDirectory(prefix="pathgan-push-") as staging:
        folder = Path(staging)
        write_repo_folder(facts, folder, repo_id, revision)
        check_no_local_paths(folder, forbidden)
        kind = facts.config.model.kind
        message = f"pathgan push: {kind} generator" + (
            f" at step {facts.step}" if facts.step is not None else "")
        return upload(folder, repo_id, token=token, private=private, revision=revision,
                      message=message)
