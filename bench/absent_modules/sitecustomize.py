"""Makes modules absent for this repository's code, as they are on the GPU machines.

``bench/gpu_check.sh --dry-run`` puts this folder on PYTHONPATH, so that every Python process
of the dry run loads it at start-up. ``PATHGAN_ABSENT_MODULES`` names top-level modules; an
``import`` of one of them in a file of this repository then fails as if it were not installed.
Other packages still import them: on the GPU machine their optional imports would take their
other branch, which is their business, not pathgan's.
"""

import builtins
import os
from pathlib import Path

ABSENT = set(os.environ.get("PATHGAN_ABSENT_MODULES", "").split())
REPO = str(Path(__file__).resolve().parents[2]) + os.sep
_import = builtins.__import__


def _ours(path: str) -> bool:
    """A file of this repository, not of a package installed in a virtualenv inside it."""
    return path.startswith(REPO) and "site-packages" not in path


def _import_unless_absent(name, globals=None, locals=None, fromlist=(), level=0):
    importer = str((globals or {}).get("__file__") or "")
    if level == 0 and name.partition(".")[0] in ABSENT and _ours(importer):
        raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU machine: "
                                  "bench/gpu_check.sh --dry-run)", name=name)
    return _import(name, globals, locals, fromlist, level)


if ABSENT:
    builtins.__import__ = _import_unless_absent
