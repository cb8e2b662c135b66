"""The ``pathgan`` command: parses arguments and calls the stage that does the work.

Each sub-command lives in ``pathgan/commands/<name>.py`` with a ``register(subparsers)``
function; handlers import their stage lazily so that ``pathgan --help`` stays fast.
A :class:`PathganError` (a file-system fault among them) is printed as one line and exits
with code 2; an interrupt says what was kept and exits with 130.
"""

import argparse
import importlib
import pkgutil
import sys

import pathgan.commands
from pathgan import __version__
from pathgan.core.errors import FileSystemFault, PathganError, continue_command, writing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathgan", description="Synthetic histopathology patches from GANs trained at scale."
    )
    parser.add_argument("--version", action="version", version=f"pathgan {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    names = sorted(module.name for module in pkgutil.iter_modules(pathgan.commands.__path__))
    for name in names:
        importlib.import_module(f"pathgan.commands.{name}").register(subparsers)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides anywhere on it for the commands that take
    them (``--resume latest`` in the middle would otherwise end the overrides: argparse reads
    one run of positionals only)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "intermixed_overrides", False):
        stray = [word for word in extra if word.startswith("-") or "=" not in word]
        if not stray:
            args.overrides = [*args.overrides, *extra]
            return args
        extra = stray
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def run_handler(handler, args, argv: list[str] | None = None) -> int:
    """Run a command handler: a PathganError becomes one line on stderr and exit code 2 (a
    file-system fault also says the command that continues, ``argv`` again); an interrupt says
    what the stage kept and exits with 130; an unknown error met while writing a file says
    which file before its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    # the output a command names (set_defaults(writes=...)): a fault there names it (stages
    # that know what they kept wrap their own writes too)
    output = getattr(args, getattr(args, "writes", ""), None)
    try:
        with writing(output):
            return handler(args) or 0
    except FileSystemFault as fault:
        fault.set_command(argv)
        print(f"pathgan: error: {fault}", file=sys.stderr)
        return 2
    except PathganError as error:
        print(f"pathgan: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(_interrupted_line(interrupt, argv), file=sys.stderr)
        return 130
    except Exception as error:
        if path := getattr(error, "pathgan_writing", None):
            print(f"pathgan: {type(error).__name__} while writing {path}; not a known file-system "
                  "fault, the traceback follows", file=sys.stderr, flush=True)
        raise


def _interrupted_line(interrupt: KeyboardInterrupt, argv: list[str]) -> str:
    kept = getattr(interrupt, "pathgan_kept", None)
    if kept is None:
        return "pathgan: interrupted"
    rerun = continue_command(argv, getattr(interrupt, "pathgan_rerun_args", ()))
    return f"pathgan: interrupted; kept: {kept}; continue with: {rerun}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_handler(args.handler, args, argv)


if __name__ == "__main__":
    sys.exit(main())
