"""``accelerate launch -m pathgan.train --config CONFIG [--resume latest|PATH] [key=value ...]``.

The same entry point as ``pathgan train``; with ``accelerate launch`` it runs once per process.
"""

import argparse
import os
import sys

from pathgan.cli import run_handler


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a YAML run config (see configs/)")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue from the newest checkpoint of run.dir, or from PATH")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.batch_size=64 run.dir=runs/x")


def run_train(args) -> int:
    from pathgan.config import load_config
    from pathgan.training.loop import train

    config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume)
    if not result.preempted and os.environ.get("RANK", "0") == "0":
        print(f"finished at step {result.step}; run folder: {result.run_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pathgan.train", description=__doc__.splitlines()[0])
    add_train_arguments(parser)
    return run_handler(run_train, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
