"""The Hugging Face Hub: downloading repos, and trained generators both ways.

- :func:`hub_snapshot`: a repo (Path Foundation, a generator) from the Hub or the local cache,
  every access problem (gated, missing, offline) as one line.
- :func:`resolve_generator`: a generator spec, a run folder (``RUN``, ``RUN/best``) or
  ``hf-hub:ORG/NAME[@REVISION]``, as a local folder holding ``generator.safetensors`` and
  ``generator.json``. A Hub generator comes through :func:`hub_snapshot` (those two files only;
  the usual cache, token and ``HF_HUB_OFFLINE``) and is pinned to the commit it resolved to.
- :func:`push`: the folder a model repo gets (the exported generator, the training config without
  local paths, ``eval.json``, a sample grid, the loss plot and a model card written by
  :mod:`pathgan.publish.model_card`), uploaded with ``HfApi.upload_folder``, or written for review.

The token comes from ``hf auth login`` or ``HF_TOKEN`` and is handed to ``HfApi`` only: it is
never printed or written.
"""

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from pathgan.core.errors import PathganError
from pathgan.core.fileio import atomic_path, write_json

HUB_SPEC = re.compile(r"hf-hub:(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
CARD, SAMPLE_GRID, LOSS_PLOT = "README.md", "samples.png", "loss.png"
#: config.yaml keys that hold local paths: the uploaded copy leaves them out.
LOCAL_PATH_KEYS = (("run", "dir"), ("data", "shards"))
ENCODER_KEYS = (("model", "encoder"), ("eval", "encoder"))
#: eval.json keys that name local folders or files (the run, the real shard set, its grids).
EVAL_LOCAL_KEYS = {"runs": ("run", "name", "fake_grid", "loss_plot"), "real": ("shards", "grid"),
                   "result": ("out_dir",)}
TEXT_SUFFIXES = (".md", ".json", ".yaml")


# -- from the Hub ------------------------------------------------------------------------------
def _gated_message(repo_id: str) -> str:
    return (
        f"cannot access {repo_id} on the Hugging Face Hub: it is gated, so accept its terms at "
        f"https://huggingface.co/{repo_id} while logged in, then run `hf auth login` "
        "(or set HF_TOKEN)"
    )


def hub_snapshot(repo_id: str, revision: str | None = None, token: str | bool | None = None,
                 allow_patterns: list[str] | None = None) -> Path:
    """Download (or find in the cache) a Hub model repo, only the files ``allow_patterns``
    match when given; every access problem becomes one line."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in (
        "1",
        "true",
        "yes",
        "on",
    )
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision, token=token, local_files_only=offline,
            allow_patterns=allow_patterns,
        )
    except GatedRepoError as error:
        raise PathganError(_gated_message(repo_id)) from error
    except RevisionNotFoundError as error:
        raise PathganError(f"{repo_id} has no revision {revision!r} on the Hub") from error
    except RepositoryNotFoundError as error:
        raise PathganError(
            f"{repo_id} was not found on the Hub or you may not read it: check the name; if it is "
            f"gated, accept its terms at https://huggingface.co/{repo_id} and run `hf auth login`"
        ) from error
    except LocalEntryNotFoundError as error:
        raise PathganError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"({'HF_HUB_OFFLINE is set' if offline else 'no network'}): run once online after "
            f"accepting its terms at https://huggingface.co/{repo_id} and `hf auth login`, "
            "or point to a local copy"
        ) from error
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise PathganError(_gated_message(repo_id)) from error
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error)
        raise PathganError(f"cannot download {repo_id}: {first_line}") from error
    return Path(folder)


@dataclass(frozen=True)
class GeneratorSource:
    """Where a generator's files lie, and what to record as having made the samples."""

    folder: Path  # holds generator.safetensors and generator.json
    pinned: str  # the folder as given, or hf-hub:ORG/NAME@<commit>
    hub: dict | None = None  # {"repo", "revision", "commit"} of a Hub generator


def resolve_generator(spec: str | Path) -> GeneratorSource:
    """A run folder, or ``hf-hub:ORG/NAME[@REVISION]`` downloaded (or read from the cache)."""
    text = str(spec)
    if not text.startswith("hf-hub:"):
        return GeneratorSource(Path(text), text)
    match = HUB_SPEC.fullmatch(text)
    if not match:
        raise PathganError(f"{text!r} is not a Hub generator: use hf-hub:ORG/NAME or "
                           "hf-hub:ORG/NAME@REVISION")
    from pathgan.models.export import GENERATOR_CONFIG, GENERATOR_WEIGHTS

    repo, revision = match["repo"], match["revision"]
    folder = hub_snapshot(repo, revision=revision,
                          allow_patterns=[GENERATOR_WEIGHTS, GENERATOR_CONFIG])
    if not (folder / GENERATOR_WEIGHTS).is_file() or not (folder / GENERATOR_CONFIG).is_file():
        raise PathganError(f"{text} holds no pathgan generator ({GENERATOR_WEIGHTS} and "
                           f"{GENERATOR_CONFIG}); was it made with `pathgan push`?")
    commit = folder.name  # snapshot folders are named by the commit they hold
    return GeneratorSource(folder, f"hf-hub:{repo}@{commit}",
                           {"repo": repo, "revision": revision or "main", "commit": commit})


# -- the folder a repo gets --------------------------------------------------------------------
def public_config(config: dict) -> tuple[dict, list[str]]:
    """The training config without local paths, and comment lines saying what was changed."""
    from pathgan.publish.model_card import public_encoder_spec

    public = {section: dict(values) for section, values in config.items()}
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
    from pathgan.publish.model_card import public_encoder_spec

    def without(mapping: dict, kind: str) -> dict:
        return {k: v for k, v in mapping.items() if k not in EVAL_LOCAL_KEYS[kind]}

    public = without({k: v for k, v in result.items() if k not in ("runs", "real")}, "result")
    public["encoder_spec"] = public_encoder_spec(result.get("encoder_spec"))
    return {**public, "real": without(result.get("real", {}), "real"),
            "runs": [without(entry, "runs")]}


def _write_config(config: dict, path: Path) -> None:
    public, notes = public_config(config)
    header = ["# The resolved training config of this generator (pathgan).", *(
        f"# {note}." for note in notes)]
    if notes:
        header.append("# To train again: pathgan train --config config.yaml "
                      "data.shards=SHARDS run.dir=RUN")
    with atomic_path(path) as temporary:
        temporary.write_text("\n".join(header) + "\n" + yaml.safe_dump(public, sort_keys=False))


def write_repo_folder(facts, folder: Path, repo_id: str, revision: str | None = None) -> list[str]:
    """Write every file the repo gets into ``folder``; returns their names."""
    from pathgan.models.export import GENERATOR_CONFIG, GENERATOR_WEIGHTS
    from pathgan.publish.model_card import public_encoder_spec, render_card

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(facts.generator_dir / GENERATOR_WEIGHTS, folder / GENERATOR_WEIGHTS)
    generator = {**facts.generator, "encoder": public_encoder_spec(facts.generator.get("encoder"))}
    write_json(folder / GENERATOR_CONFIG, generator)
    _write_config(facts.config, folder / "config.yaml")
    if facts.eval_file:
        write_json(folder / "eval.json", public_eval(*facts.eval_file))
    if facts.best:
        shutil.copyfile(facts.generator_dir / "best.json", folder / "best.json")
    if facts.sample_grid:
        shutil.copyfile(facts.sample_grid, folder / SAMPLE_GRID)
    if facts.loss_plot:
        shutil.copyfile(facts.loss_plot, folder / LOSS_PLOT)
    with atomic_path(folder / CARD) as temporary:
        temporary.write_text(render_card(facts, repo_id, revision))
    return sorted(path.name for path in folder.iterdir())


def local_paths(run_dir: Path, config: dict) -> list[str]:
    """Strings that must never be published: the run's and the data's folders, the home."""
    paths = {str(run_dir.resolve()), str(Path.home())}
    for section, key in LOCAL_PATH_KEYS:
        value = str(config.get(section, {}).get(key) or "")
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
    from huggingface_hub import get_token

    token = get_token()
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
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HTTPError  # HTTPError: the transport's

    api = HfApi(token=token)
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
    from pathgan.publish.model_card import read_run_facts

    if not REPO_ID.fullmatch(repo_id):
        raise PathganError(f"--repo {repo_id!r} is not of the form ORG/NAME")
    if dry_run is not None and Path(dry_run).exists() and any(Path(dry_run).iterdir()):
        raise PathganError(f"--dry-run {dry_run} is not empty: give a new or empty folder")
    token = None if dry_run is not None else hub_token()
    run_dir = Path(run_dir)
    facts = read_run_facts(run_dir, best=best, eval_path=eval_path)
    forbidden = local_paths(run_dir, facts.config)
    if dry_run is not None:
        write_repo_folder(facts, Path(dry_run), repo_id, revision)
        check_no_local_paths(Path(dry_run), forbidden)
        return str(dry_run)
    with tempfile.TemporaryDirectory(prefix="pathgan-push-") as staging:
        folder = Path(staging)
        write_repo_folder(facts, folder, repo_id, revision)
        check_no_local_paths(folder, forbidden)
        kind = facts.config["model"]["kind"]
        message = f"pathgan push: {kind} generator" + (
            f" at step {facts.step}" if facts.step is not None else "")
        return upload(folder, repo_id, token=token, private=private, revision=revision,
                      message=message)
