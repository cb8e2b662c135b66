"""``pathgan train [--config CONFIG] [--resume latest|PATH] [--allow-change] [key=value ...]``.

One process as ``pathgan train``; one per GPU (or CPU rank, or node) as ``accelerate launch -m
pathgan train`` with the same arguments (launch/train.sh and slurm/train.sbatch do that).
``key=value`` overrides may stand anywhere on the line (:func:`pathgan.cli.parse_args`).
"""

import argparse
import os

DESCRIPTION = """\
Train a GAN. For several GPUs or nodes use `accelerate launch -m pathgan train` with the same
arguments. --resume continues a run from its own config.yaml (RUN/config.yaml: --config may be
left out): a change of what the checkpoint holds (model shapes, model.kind, model.encoder,
train.ema) is refused; a change of the recipe (batch size, learning rate, augmentation, data,
seed) needs --allow-change; train.max_steps and train.epochs may change freely. What changed is
recorded with its step in RUN/changes.jsonl."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a GAN (DCGAN or Embedding GAN) from a YAML config",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None,
                        help="a YAML run config (see configs/); when resuming, the run's own "
                             "config.yaml is used and this is optional")
    parser.add_argument("--resume", metavar="latest|PATH",
                        help="continue from the newest checkpoint of run.dir, or from PATH")
    parser.add_argument("--allow-change", action="store_true",
                        help="on resume, take recipe changes (train.batch_size, train.lr, ...) "
                             "from the checkpoint's step on")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. train.batch_size=64 run.dir=runs/x "
                             "(anywhere on the line)")
    parser.set_defaults(handler=run, intermixed_overrides=True)


def run(args) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.train.loop import train
    from pathgan.train.resume import plan_run

    plan = plan_run(args.config, args.overrides, args.resume, args.allow_change)
    main_rank = os.environ.get("RANK", "0") == "0"
    for note in plan.notes:
        if main_rank:
            print(note, flush=True)
    result = train(plan.config, resume=args.resume, changes=plan.changes)
    if not result.preempted and main_rank:
        print(f"finished at step {result.step}; run folder: {result.run_dir}", flush=True)
    return 130 if result.interrupted else 0  # preempted: 0, the batch script requeues
