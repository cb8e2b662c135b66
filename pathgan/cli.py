"""The ``pathgan`` command: parses arguments and calls the stage that does the work.

Each sub-command lives in ``pathgan/commands/<name>.py`` with a ``register(subparsers)``
function; handlers import their stage lazily so that ``pathgan --help`` stays fast.
A :class:`PathganError` is printed as one line and exits with code 2.
"""

import argparse
import importlib
import pkgutil
import sys

import pathgan.commands
from pathgan import __version__
from pathgan.core.errors import PathganError


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


def run_handler(handler, args) -> int:
    """Run a command handler, turning a PathganError into one line on stderr and exit code 2."""
    try:
        return handler(args) or 0
    except PathganError as error:
        print(f"pathgan: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pathgan: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_handler(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
