"""``pathgan train --config CONFIG [--resume latest|PATH] [key=value ...]``.

One process as ``pathgan train``; one per GPU (or CPU rank, or node) as ``accelerate launch -m
pathgan train`` with the same arguments (launch/train.sh and slurm/train.sbatch do that).
"""

import os


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a GAN (DCGAN or Embedding GAN) from a YAML config",
        description="Train a GAN. For several GPUs or nodes use `accelerate launch -m "
        "pathgan train` with the same arguments.",
    )
    parser.add_argument("--config", required=True, help="a YAML run config (see configs/)")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue from the newest checkpoint of run.dir, or from PATH")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.batch_size=64 run.dir=runs/x")
    parser.set_defaults(handler=run)


def run(args) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.config import load_config
    from pathgan.train.loop import train

    result = train(load_config(args.config, args.overrides), resume=args.resume)
    if not result.preempted and os.environ.get("RANK", "0") == "0":
        print(f"finished at step {result.step}; run folder: {result.run_dir}", flush=True)
    return 130 if result.interrupted else 0  # preempted: 0, the batch script requeues
