"""``pathgan demo``: the whole pipeline on the bundled slide (what `make demo` runs)."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="pack, embed, train the three GANs, evaluate: the bundled slide, on CPU",
        description="Runs every stage on the bundled CC0 slide in about 9 minutes on 2 CPU "
        "cores, with no key or login (W&B offline): the slide's epidermis and dermis packed "
        "with a held-out region, the DCGAN, the Embedding GAN and the class-conditional modern "
        "GAN trained side by side, evaluated, and the downstream utility of the conditional "
        "one's patches.",
    )
    parser.add_argument("--out", default="demo", help="output folder (default: demo)")
    parser.add_argument("--size", choices=["full", "small"], default="full",
                        help="small: a few steps per stage (a quick check)")
    parser.add_argument("--encoder", help="encoder spec (default: Path Foundation when it is "
                        "in the local cache, else a random-init timm ViT)")
    parser.set_defaults(handler=run, writes="out")


def run(args) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.demo import run_demo

    run_demo(args.out, args.size, args.encoder)
    return 0
