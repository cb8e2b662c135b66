"""``pathgan train``: one process; ``accelerate launch -m pathgan.train`` for several."""


def register(subparsers) -> None:
    from pathgan.train import add_train_arguments, run_train

    parser = subparsers.add_parser(
        "train", help="train a GAN (DCGAN or Embedding GAN) from a YAML config",
        description="Train a GAN. For several GPUs or nodes use `accelerate launch -m "
        "pathgan.train` with the same arguments.",
    )
    add_train_arguments(parser)
    parser.set_defaults(handler=run_train)
