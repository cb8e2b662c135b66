"""``pathgan eval RUN_DIR [RUN_DIR ...] --real SHARDS_DIR -n N``: score runs on real patches."""

import argparse

DESCRIPTION = """\
Generate N patches from each run's exported generator and compare them with N real patches
(the shard set's val split, else train) in a frozen encoder's embedding space: Fréchet distance,
KID and k-NN precision/recall; with --inception also the classic Inception FID.
Writes OUT/eval.json, OUT/report.md and real/generated grids. Default OUT: RUN_DIR/eval for one
run, ./eval-<timestamp> for several. Default encoder: the runs' eval.encoder or model.encoder
(config.yaml), else timm:vit_small_patch16_224 (pretrained; downloaded once).
Under `accelerate launch -m pathgan eval ...` the work is split across processes."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="score runs: FD, KID, precision/recall in an encoder's space",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run folders (RUN, RUN/best) or Hub generators "
                             "(hf-hub:ORG/NAME[@REVISION]) to compare")
    parser.add_argument("--real", required=True, metavar="SHARDS_DIR",
                        help="shard set of real patches (its val split, else train)")
    parser.add_argument("-n", type=int, default=1000,
                        help="generated (and real) samples per run (default 1000)")
    parser.add_argument("--encoder", default=None, metavar="SPEC",
                        help="path-foundation, path-foundation:/dir, timm:NAME[:random], "
                             "hf-hub:ORG/REPO (default: from the runs' config, else "
                             "timm:vit_small_patch16_224)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="output folder (default: RUN_DIR/eval, or ./eval-<timestamp>)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the noise and of the real draw (default 0)")
    parser.add_argument("--inception", action="store_true",
                        help="also the Inception FID (needs the torch-fidelity weights locally)")
    parser.add_argument("--inception-weights", default=None, metavar="FILE",
                        help="weights-inception-2015-12-05-6726825d.pth (default: torch hub cache)")
    parser.add_argument("--num-workers", type=int, default=0,
                        help="processes decoding real patches (default 0: in the main process)")
    parser.set_defaults(handler=run, writes="out")


def run(args) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.evaluation.job import evaluate_runs

    evaluate_runs(args.runs, args.real, args.n, encoder_spec=args.encoder, out_dir=args.out,
                  seed=args.seed, batch_size=args.batch_size, inception=args.inception,
                  inception_weights=args.inception_weights, num_workers=args.num_workers)
    return 0
