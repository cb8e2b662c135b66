"""``pathgan utility GENERATOR --real SHARDS``: would the generator's labelled patches train a
classifier? (real / synthetic only (CAS) / real + synthetic, tested on the real val split)."""

import argparse

DESCRIPTION = """\
Train one fixed classifier (a frozen encoder, by default the weightless stain-texture features,
with a linear softmax head) three ways: on the real train split, on the conditional generator's
patches only (the Classification Accuracy Score) and on both; test each on the real val split,
whose samples never fed the generator; and the real-trained one on the synthetic patches
(GAN-test). Per seed: a bootstrap of the real train split and a new synthetic set, as many per
class as the real train split has. Writes utility.json, utility.md and utility.png (default:
RUN/eval, beside pathgan eval's files)."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "utility", help="downstream utility of a conditional generator (CAS, real+synthetic)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("generator", metavar="GENERATOR",
                        help="a conditional run folder (RUN, RUN/best) or Hub generator "
                             "(hf-hub:ORG/NAME[@REVISION])")
    parser.add_argument("--real", required=True, metavar="SHARDS_DIR",
                        help="labelled shard set: its train split trains, its val split tests")
    parser.add_argument("--encoder", default="stain-texture", metavar="SPEC",
                        help="the classifier's frozen encoder (default stain-texture; any "
                             "encoder spec, e.g. path-foundation)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    parser.add_argument("-n", type=int, default=None,
                        help="synthetic patches per seed (default: as many as the real train "
                             "split, per class)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: RUN/eval)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.set_defaults(handler=run, writes="out")


def run(args) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.evaluation.utility_job import run_utility

    run_utility(args.generator, args.real, encoder_spec=args.encoder, seeds=args.seeds,
                n=args.n, out_dir=args.out, batch_size=args.batch_size)
    return 0
