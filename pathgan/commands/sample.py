"""``pathgan sample GENERATOR -n N --out DIR``: patches from a trained generator (of the classes
asked for, for a conditional one: ``--label``, ``--labels-like``)."""


def register(subparsers) -> None:
    sample = subparsers.add_parser("sample", help="generate patches from a trained run")
    sample.add_argument("generator", metavar="GENERATOR",
                        help="a run folder with generator.safetensors (RUN, RUN/best), or a "
                             "Hub repo made by `pathgan push`: hf-hub:ORG/NAME[@REVISION]")
    sample.add_argument("-n", type=int, required=True,
                        help="number of patches (in all, shared among the classes asked for)")
    sample.add_argument("--out", required=True, help="output folder")
    sample.add_argument("--format", choices=["png", "shards"], default="png")
    sample.add_argument("--batch-size", type=int, default=64)
    sample.add_argument("--seed", type=int, default=0, help="noise seed (same seed, same images)")
    sample.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda:LOCAL_RANK when "
                        "there is a GPU, else cpu)")
    sample.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
    sample.add_argument("--label", action="append", metavar="CLASS",
                        help="conditional generators: draw this class (repeat, or separate by "
                             "commas, for several: -n shared equally); default: the classes in "
                             "the mix the generator was trained on")
    sample.add_argument("--labels-like", metavar="SHARDS",
                        help="conditional generators: share -n among the classes in the "
                             "proportions of this shard set's training split")
    sample.set_defaults(handler=run_sample, writes="out")


def run_sample(args) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.sample import sample

    labels = ([name.strip() for value in args.label for name in value.split(",") if name.strip()]
              if args.label else None)
    out = sample(args.generator, args.n, args.out, image_format=args.format,
                 batch_size=args.batch_size, seed=args.seed, device=args.device,
                 per_shard=args.per_shard, labels=labels, labels_like=args.labels_like)
    print(f"wrote {args.n} patches to {out}")
    return 0
