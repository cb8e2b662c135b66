"""``pathgan embed [verify] SHARDS_DIR --encoder SPEC``: compute, or check, embeddings.

The first computes the embeddings of this worker's shards (``--task-index/--num-tasks``, a SLURM
array task, or an ``accelerate launch`` rank); the second exits 0 only when every shard has a
complete, aligned embedding file.
"""

import argparse
import sys

from pathgan.core.errors import PathganError

DESCRIPTION = """\
Compute embeddings of a shard set with a frozen encoder, one file per shard under
SHARDS_DIR/embeddings/<encoder-id>/. Finished shards are skipped; rerun to resume.
Forms:
  pathgan embed SHARDS_DIR --encoder SPEC [--batch-size N] [--task-index I --num-tasks K]
  pathgan embed verify SHARDS_DIR --encoder SPEC
Encoder specs: path-foundation, path-foundation:/local/dir, timm:NAME, timm:NAME:random,
hf-hub:ORG/REPO. Under `accelerate launch` each rank takes its own shards; in a SLURM array
each task does (SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT)."""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "embed", help="precompute encoder embeddings of a shard set (or verify them)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="pathgan embed [verify] SHARDS_DIR --encoder SPEC [options]",
    )
    parser.add_argument("target", nargs="+", metavar="[verify] SHARDS_DIR",
                        help="the shard set; prefix with `verify` to check its embeddings")
    parser.add_argument("--encoder", required=True, metavar="SPEC",
                        help="path-foundation, path-foundation:/dir, timm:NAME[:random], "
                             "hf-hub:ORG/REPO (verify also takes an encoder id)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--task-index", type=int, default=None,
                        help="this task's index (default: SLURM_ARRAY_TASK_ID, else 0)")
    parser.add_argument("--num-tasks", type=int, default=None,
                        help="number of tasks (default: SLURM_ARRAY_TASK_COUNT, else 1)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="decoding processes (default: the cores per rank of this node, less "
                        "one for the rank itself, at most 16)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="autocast dtype of torch encoders (Path Foundation stays fp32)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda:LOCAL_RANK if there is a GPU, else cpu)")
    parser.add_argument("--max-missing", type=float, default=0.05,
                        help="fail when more than this share of samples is corrupt (default 0.05)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def _split_target(target: list[str]) -> tuple[bool, str]:
    if len(target) == 2 and target[0] == "verify":
        return True, target[1]
    if len(target) == 1:
        return False, target[0]
    raise PathganError("usage: pathgan embed [verify] SHARDS_DIR --encoder SPEC")


def run(args) -> int:
    verify, shards_dir = _split_target(args.target)
    if verify:
        return run_verify_embeddings(shards_dir, args.encoder)
    # when the command runs: `pathgan --help` stays fast
    from pathgan.embed import embed_shards, format_summary

    summary = embed_shards(
        shards_dir, args.encoder, batch_size=args.batch_size, task_index=args.task_index,
        num_tasks=args.num_tasks, num_workers=args.num_workers, precision=args.precision,
        device=args.device, max_missing=args.max_missing, progress=not args.no_progress,
    )
    print(format_summary(summary), flush=True)
    if summary.get("error"):
        raise PathganError(summary["error"])
    return 0


def run_verify_embeddings(shards_dir: str, encoder: str) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.shards.embedding_files import verify_embeddings

    report = verify_embeddings(shards_dir, encoder)
    for problem in report["problems"]:
        print(f"{problem['shard']}: {problem['problem']}", file=sys.stderr)
    state = "complete" if report["complete"] else "INCOMPLETE"
    precision = "/".join(report["precisions"]) or "unknown"
    print(f"embeddings {report['encoder_id']} ({precision}): {report['ok']}/{report['shards']} "
          f"shards {state}, {report['missing_keys']} corrupt samples listed as missing")
    return 0 if report["complete"] else 1
