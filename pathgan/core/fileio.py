"""Atomic writes, checksums and timestamps shared by every stage.

A file only ever appears under its final name complete: it is written to a temporary name in
the same folder, flushed to disk, then renamed (a rename is atomic on POSIX file systems).
"""

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

from pathgan.core.errors import writing


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; rename it into place only on success. A
    file-system fault names ``final`` (what was being written; it is left as it was)."""
    final = Path(final)
    temporary = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    with writing(final, exact=True):
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield temporary
            fsync_file(temporary)
            os.replace(temporary, final)
        finally:
            temporary.unlink(missing_ok=True)


def fsync_file(path: str | os.PathLike) -> None:
    """Force a file's data to disk (a node that dies after a rename may otherwise leave the
    new name pointing at lost data on shared cluster file systems)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Force a folder's entries (new names, renames) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def timestamp() -> str:
    """Now, as every file's ``created`` records it: ISO 8601 in UTC, to the second."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
