"""The errors a user sees as a single line (exit code 2), never as a traceback.

Besides mistakes in the input (:class:`PathganError`), the file system fails in everyday ways
on a shared cluster: a full disk or quota, a read-only mount, a folder of someone else, a stale
network handle, a file-size limit. A stage wraps its writes in :func:`writing`, which turns
such an error into a :class:`FileSystemFault`: the path, what the error means, the free space
where that is the cause, what the stage kept, and (filled in by ``pathgan``'s command runner)
the command that continues. An error it does not know keeps its traceback, and the runner says
first which file was being written.
"""

import contextlib
import errno
import re
import resource
import shlex
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path


class PathganError(Exception):
    """A problem with the user's input, options or files, explained in one line."""


# What each errno means to a user, and what to do about it.
FAULTS = {
    errno.ENOSPC: ("no space left on the device", "free some space"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise the quota"),
    errno.EROFS: ("read-only file system", "write to a writable folder"),
    errno.EACCES: ("permission denied", "write to a folder of yours or fix its permissions"),
    errno.EPERM: ("operation not permitted", "write to a folder of yours or fix its permissions"),
    errno.ESTALE: ("stale file handle: the network file system lost the file",
                   "check the mount"),
    errno.EFBIG: ("file too large for the file-size limit", "raise the limit (ulimit -f)"),
}
SPACE_FAULTS = (errno.ENOSPC, errno.EDQUOT)
# torch.save reports a failed write without its errno (PyTorchStreamWriter):
TORCH_WRITE_FAILURE = re.compile(r"unexpected pos \d+ vs \d+|PytorchStreamWriter failed writing")
# the text of an OSError inside other errors: Python's "[Errno 28]", Rust's (safetensors)
# "(os error 28)" or "code: 28"
ERRNO_IN_TEXT = re.compile(r"\[Errno (\d+)\]|\(os error (\d+)\)|\bcode: (\d+)\b")
NEARLY_FULL_BYTES = 16 << 20  # a write stopped by a full disk leaves less than this free


class FileSystemFault(PathganError):
    """A write the file system refused, said in one line; ``kept`` is what the stage kept and
    ``rerun_args`` what to add to the command line to continue (``--resume latest``)."""

    def __init__(self, path: Path | None, code: int, kept: str | None = None,
                 rerun_args: tuple[str, ...] = ()) -> None:
        super().__init__(path, code)
        self.path = None if path is None else Path(path)
        self.code, self.kept, self.rerun_args = code, kept, rerun_args
        self.continue_with: str | None = None  # the command that continues, when known
        self.free = _free_bytes(self.path) if code in SPACE_FAULTS and path else None

    def __str__(self) -> str:
        meaning, advice = FAULTS[self.code]
        if self.free is not None:
            meaning += f" ({format_bytes(self.free)} free)"
        elif self.code == errno.EFBIG:
            meaning += f" ({format_bytes(resource.getrlimit(resource.RLIMIT_FSIZE)[0])})"
        parts = [f"{self.path or 'a write failed'}: {meaning}"]
        if self.kept:
            parts.append(f"kept: {self.kept}")
        parts.append(f"{advice}, then continue with: {self.continue_with}" if self.continue_with
                     else advice)
        return "; ".join(parts)

    def set_command(self, argv: list[str]) -> None:
        self.continue_with = continue_command(argv, self.rerun_args)


def continue_command(argv: list[str], rerun_args: tuple[str, ...] = ()) -> str:
    """The command line that continues a stopped ``pathgan ARGV``: the same, with ``rerun_args``
    (``--resume latest``) in place of any earlier value of their flag."""
    args = list(argv)
    if rerun_args:
        flag = rerun_args[0]
        while flag in args[:-1]:
            del args[args.index(flag):args.index(flag) + 2]
        args = [a for a in args if not a.startswith(flag + "=")] + list(rerun_args)
    return shlex.join(["pathgan", *args])


def format_bytes(count: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _free_bytes(path: Path) -> int | None:
    """Free space (for unprivileged users) on the file system of ``path`` or its nearest
    existing parent."""
    for folder in [path, *path.parents]:
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


def fault_code(error: BaseException, path: Path | None) -> int | None:
    """The errno of a file-system fault behind ``error`` (one of FAULTS), or None.

    torch.save does not say why its write failed: a nearly full disk says ENOSPC, a finite
    file-size limit EFBIG (this is asked while the half-written file is still there)."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno if error.errno in FAULTS else None
    text = str(error)
    if match := ERRNO_IN_TEXT.search(text):
        code = int(next(group for group in match.groups() if group))
        return code if code in FAULTS else None
    if isinstance(error, RuntimeError) and TORCH_WRITE_FAILURE.search(text):
        free = _free_bytes(path) if path else None
        if free is not None and free < NEARLY_FULL_BYTES:
            return errno.ENOSPC
        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            return errno.EFBIG
    return None


@contextlib.contextmanager
def writing(path: str | Path | None, kept: Callable[[], str | None] | None = None,
            rerun_args: tuple[str, ...] = (),
            discard: Callable[[], None] | None = None, exact: bool = False) -> Iterator[None]:
    """Run a stage's writes into ``path`` (a file or the folder it writes in).

    A file-system fault becomes a :class:`FileSystemFault` naming the file (the error's own
    file name when it has one, unless ``exact``: ``path`` is the file); ``kept()`` says what
    the stage kept, ``rerun_args`` what continues it. ``discard()`` removes what the failed
    write left, once the fault is known.
    Nested uses: the innermost names the file, the outer ones add what was kept. An unknown
    error is left as it is, marked with the file being written (``pathgan_writing``); an
    interrupt is marked with what was kept (``pathgan_kept``).
    """
    path = None if path is None else Path(path)
    try:
        yield
    except PathganError as error:  # already one line; a fault learns what was kept
        if isinstance(error, FileSystemFault):
            if error.kept is None and kept is not None:
                error.kept = kept()
            error.rerun_args = error.rerun_args or rerun_args
        raise
    except KeyboardInterrupt as interrupt:
        if kept is not None and not hasattr(interrupt, "pathgan_kept"):
            interrupt.pathgan_kept = kept()
            interrupt.pathgan_rerun_args = rerun_args
        raise
    except Exception as error:
        code = fault_code(error, path)
        named = path if exact else getattr(error, "filename", None) or path
        fault = None if code is None else FileSystemFault(named, code, kept() if kept else None,
                                                          rerun_args)
        if discard is not None:
            discard()
        if fault is not None:
            raise fault from error
        if _is_write_failure(error) and not hasattr(error, "pathgan_writing"):
            error.pathgan_writing = named
        raise


def _is_write_failure(error: Exception) -> bool:
    """An OSError, or torch's text of a failed write: worth saying which file was written."""
    return isinstance(error, OSError) or bool(TORCH_WRITE_FAILURE.search(str(error)))
