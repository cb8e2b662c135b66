"""``pathgan push RUN_DIR --repo ORG/NAME``: share a trained generator on the Hugging Face Hub."""

import argparse

DESCRIPTION = """\
Upload a run's exported generator (generator.safetensors + generator.json) to a Hugging Face
model repo, with the training config (local paths left out), the newest eval.json of
`pathgan eval` that scored it, the newest sample grid, the loss plot, and a model card
(README.md) whose every figure is read from the run. The token comes from `hf auth login` or
HF_TOKEN. --dry-run DIR writes the folder it would upload into DIR and uploads nothing."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "push", help="share a trained generator on the Hugging Face Hub, with a model card",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run folder")
    parser.add_argument("--repo", required=True, metavar="ORG/NAME", help="the model repo")
    parser.add_argument("--private", action="store_true",
                        help="create the repo private (an existing repo keeps its visibility)")
    parser.add_argument("--revision", default=None, metavar="BRANCH",
                        help="push to this branch (created from main when missing)")
    parser.add_argument("--best", action="store_true",
                        help="push RUN_DIR/best/, the generator of the best in-loop evaluation")
    parser.add_argument("--eval", default=None, metavar="PATH",
                        help="the eval.json of `pathgan eval` to publish (default: the newest "
                             "one under RUN_DIR that scored this generator)")
    parser.add_argument("--dry-run", default=None, metavar="DIR",
                        help="write the folder into DIR (new or empty) and upload nothing")
    parser.set_defaults(handler=run, writes="dry_run")


def run(args) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.publish.push import push

    where = push(args.run_dir, args.repo, private=args.private, revision=args.revision,
                 best=args.best, eval_path=args.eval, dry_run=args.dry_run)
    if args.dry_run is not None:
        print(f"wrote the folder for {args.repo} into {where}; nothing was uploaded")
    else:
        print(f"pushed to {where}")
    return 0
