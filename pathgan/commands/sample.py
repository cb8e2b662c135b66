"""``pathgan sample`` and ``pathgan arch``."""


def register(subparsers) -> None:
    sample = subparsers.add_parser("sample", help="generate patches from a trained run")
    sample.add_argument("generator", metavar="GENERATOR",
                        help="a run folder with generator.safetensors (RUN, RUN/best), or a "
                             "Hub repo made by `pathgan push`: hf-hub:ORG/NAME[@REVISION]")
    sample.add_argument("-n", type=int, required=True, help="number of patches")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("--format", choices=["png", "shards"], default="png")
    sample.add_argument("--batch-size", type=int, default=64)
    sample.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same images)")
    sample.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK when "
                        "there is a GPU, else cpu)")
    sample.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    sample.set_defaults(handler=run_sample)

    arch = subparsers.add_parser("arch", help="draw a config's networks and tabulate layers")
    arch.add_argument("--config", required=True)
    arch.add_argument("--out", required=True, help="output folder")
    arch.add_argument("overrides", nargs="*", metavar="key=value")
    arch.set_defaults(handler=run_arch)


def run_sample(args) -> int:
    from pathgan.sample import sample

    out = sample(args.generator, args.n, args.out, image_format=args.format,
                 batch_size=args.batch_size, seed=args.seed, device=args.device,
                 per_shard=args.per_shard)
    print(f"wrote {args.n} patches to {out}")
    return 0


def run_arch(args) -> int:
    from pathgan.config import load_config
    from pathgan.train.architecture import write_architecture

    for path in write_architecture(load_config(args.config, args.overrides), args.out):
        print(f"wrote {path}")
    return 0
