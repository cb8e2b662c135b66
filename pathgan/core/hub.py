"""Downloads from the Hugging Face Hub: model repos, and folders named by ``hf-hub:`` specs.

- :func:`hub_snapshot`: a repo (Path Foundation, a generator) from the Hub or the local cache,
  every access problem (gated, missing, offline) as one line.
- :func:`resolve_generator`: a generator spec, a folder (``RUN``, ``RUN/best``) or
  ``hf-hub:ORG/NAME[@REVISION]``, as a local folder holding the files it is asked for (a
  generator's: :data:`pathgan.runs.GENERATOR_FILES`). A Hub generator comes through
  :func:`hub_snapshot` (those files only; the usual cache, token and ``HF_HUB_OFFLINE``) and is
  pinned to the commit it resolved to.

Uploading is the publishing stage's (:mod:`pathgan.publish.push`); nothing here writes to the Hub.
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from pathgan.core.errors import PathganError

HUB_SPEC = re.compile(r"hf-hub:(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


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

    folder: Path  # holds the generator's files
    pinned: str  # the folder as given, or hf-hub:ORG/NAME@<commit>
    hub: dict | None = None  # {"repo", "revision", "commit"} of a Hub generator


def resolve_generator(spec: str | Path, files: tuple[str, ...]) -> GeneratorSource:
    """A folder, or ``hf-hub:ORG/NAME[@REVISION]`` downloaded (or read from the cache): only
    ``files``, which must all be there."""
    text = str(spec)
    if not text.startswith("hf-hub:"):
        return GeneratorSource(Path(text), text)
    match = HUB_SPEC.fullmatch(text)
    if not match:
        raise PathganError(f"{text!r} is not a Hub generator: use hf-hub:ORG/NAME or "
                           "hf-hub:ORG/NAME@REVISION")
    repo, revision = match["repo"], match["revision"]
    folder = hub_snapshot(repo, revision=revision, allow_patterns=list(files))
    if not all((folder / name).is_file() for name in files):
        raise PathganError(f"{text} holds no pathgan generator ({' and '.join(files)}); "
                           "was it made with `pathgan push`?")
    commit = folder.name  # snapshot folders are named by the commit they hold
    return GeneratorSource(folder, f"hf-hub:{repo}@{commit}",
                           {"repo": repo, "revision": revision or "main", "commit": commit})
