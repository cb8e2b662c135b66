"""``pathgan arch --config CONFIG --out DIR``: a config's networks as layer tables and diagrams."""


def register(subparsers) -> None:
    arch = subparsers.add_parser("arch", help="draw a config's networks and tabulate layers")
    arch.add_argument("--config", required=True)
    arch.add_argument("--out", required=True, help="output folder")
    arch.add_argument("overrides", nargs="*", metavar="key=value")
    arch.set_defaults(handler=run, writes="out")


def run(args) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.config import load_config
    from pathgan.train.architecture import write_architecture

    for path in write_architecture(load_config(args.config, args.overrides), args.out):
        print(f"wrote {path}")
    return 0
