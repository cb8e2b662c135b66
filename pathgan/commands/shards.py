"""``pathgan shards pack | convert | verify | show | merge``."""

import os

from pathgan.core.errors import PathganError


def _sizes(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise PathganError(f"--patch-sizes takes comma-separated integers, not {text!r}") from None


def register(subparsers) -> None:
    shards = subparsers.add_parser("shards", help="pack, verify and look at WebDataset shards")
    actions = shards.add_subparsers(dest="action", required=True, metavar="ACTION")

    pack = actions.add_parser(
        "pack",
        help="slides, patch folders and parquet tables -> WebDataset shards",
        description="Cut tissue patches from slides (and read folders of patch images and "
        "parquet tables), resize them to 224x224 and write WebDataset shards with a manifest. "
        "Rerunning resumes.",
    )
    pack.add_argument("inputs", nargs="+", metavar="INPUT",
                      help="a slide file, a folder of slides or patch images, a .parquet file or "
                      "folder of them, or hf-dataset:ORG/NAME[@REVISION] (from the local Hugging "
                      "Face cache)")
    pack.add_argument("--out", required=True, help="output folder of the shard set")
    pack.add_argument("--patch-sizes", default="224",
                      help="patch sizes in pixels (level 0, or at --target-mpp), resized to "
                      "224 (default: 224; the reference recipe: 224,512,1024)")
    pack.add_argument("--format", default="png", choices=["png", "jpg", "raw"],
                      help="image encoding in the shards (default: lossless png)")
    pack.add_argument("--jpeg-quality", type=int, default=95)
    pack.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                      help="worker processes (default: cores, at most 8)")
    pack.add_argument("--val-fraction", type=float, default=0.0,
                      help="share of groups (slides, or --group-pattern groups) held out for "
                      "validation, decided per group by a hash of its name")
    pack.add_argument("--target-mpp", type=float,
                      help="tile at this many µm/px (Path Foundation is validated at ~0.5-2)")
    pack.add_argument("--slide-mpp", type=float,
                      help="level-0 µm/px of the slides, overriding what their files say")
    pack.add_argument("--overlap", type=float, default=0.0, help="patch overlap, 0 to <1")
    pack.add_argument("--min-tissue", type=float, default=0.5,
                      help="minimum tissue fraction of a patch (default: 0.5)")
    pack.add_argument("--annotations",
                      help="folder of ASAP XML files <slide>.xml: CAMELYON16 tumour polygons, "
                      "or polygons in groups named after classes (e.g. epidermis, dermis)")
    pack.add_argument("--label-fraction", "--tumor-fraction", type=float, default=0.0,
                      help="a patch takes a class when this fraction of it lies inside the "
                      "class's polygons (0: when its centre does)")
    pack.add_argument("--labelled-only", action="store_true",
                      help="leave out patches without a label (outside every class polygon)")
    pack.add_argument("--group-pattern",
                      help="regex on file names (slides and patch images) whose first group "
                      "names the split group (e.g. the patient); default: a slide's name, a "
                      "patch image's folder")
    pack.add_argument("--region-groups", type=int, metavar="SIZE",
                      help="cut each slide into squares of SIZE pixels (level 0, or at "
                      "--target-mpp), each its own split group; patches reaching across the "
                      "split are left out (one slide then gives a held-out region)")
    pack.add_argument("--seed", type=int, default=0,
                      help="seed of the order of samples in the shards (mixed across sources, "
                      "positions and patch sizes)")
    pack.add_argument("--max-count", type=int, default=1000, help="samples per shard at most")
    pack.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard at most")
    pack.add_argument("--max-skipped", type=float, default=0.1,
                      help="fail when more than this share of inputs is unreadable")
    tables = pack.add_argument_group("parquet tables and Hub data sets")
    tables.add_argument("--image-column", default="image",
                        help="column of encoded image bytes (default: image)")
    tables.add_argument("--label-column", help="column of labels, carried into the metadata")
    tables.add_argument("--group-column",
                        help="column naming each row's split group (e.g. the patient or slide); "
                        "default: one group per file of the table")
    tables.add_argument("--embedding-column",
                        help="column of precomputed embeddings, written in `pathgan embed`'s "
                        "format (needs --encoder)")
    tables.add_argument("--encoder", metavar="SPEC",
                        help="the encoder spec (or encoder id) that made --embedding-column; "
                        "checked on 32 rows when it loads here")
    tables.add_argument("--embedding-precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="the precision the column's embeddings were computed in "
                        "(default: fp32)")
    tables.add_argument("--embedding-tolerance", type=float, default=1e-2,
                        help="refuse the column when its embeddings differ from the encoder's "
                        "by more than this median relative L2 (default: 1e-2)")
    pack.add_argument("--overwrite", action="store_true",
                      help="replace a shard set packed from other inputs or options")
    pack.set_defaults(handler=run_pack)

    convert = actions.add_parser(
        "convert", help="re-encode a shard set's images as png, jpg or raw",
        description="Write SRC's shards again under the same names in --out, each image "
        "re-encoded (metadata, labels, splits, groups and embedding files carried). PNG is "
        "lossless and small, raw decodes fastest and is largest, JPEG is smallest and lossy; "
        "see the README's 'Shard formats'. Rerunning resumes.")
    convert.add_argument("src", metavar="SRC", help="a shard set (its folder)")
    convert.add_argument("--out", required=True, help="output folder of the converted set")
    convert.add_argument("--format", required=True, choices=["png", "jpg", "raw"],
                         help="image encoding of the converted shards")
    convert.add_argument("--jpeg-quality", type=int, default=95)
    convert.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                         help="worker processes, one shard each (default: cores, at most 8)")
    convert.add_argument("--max-skipped", type=float, default=0.1,
                         help="fail when more than this share of samples does not decode")
    convert.add_argument("--overwrite", action="store_true",
                         help="replace another shard set in --out")
    convert.set_defaults(handler=run_convert, writes="out")

    verify = actions.add_parser("verify", help="re-read every shard against the manifest")
    verify.add_argument("shards_dir", metavar="DIR")
    verify.set_defaults(handler=run_verify)

    merge = actions.add_parser(
        "merge", help="make the parts of an array-packed set (slurm/pack.sbatch) one shard set",
        description="Link the shards of OUT_DIR/parts/task-<i>/ into OUT_DIR, numbered in task "
        "order, and write one manifest.json. Idempotent; the parts stay (hard links).")
    merge.add_argument("out_dir", metavar="OUT_DIR")
    merge.add_argument("--if-complete", action="store_true",
                       help="exit 0 without merging while some task has not finished (the last "
                       "task to finish merges)")
    merge.set_defaults(handler=run_merge, writes="out_dir")

    show = actions.add_parser("show", help="print totals and write a grid of random samples")
    show.add_argument("shards_dir", metavar="DIR")
    show.add_argument("--out", required=True, help="PNG file for the grid")
    show.add_argument("-n", type=int, default=64, help="number of samples (default: 64)")
    show.add_argument("--seed", type=int, default=0)
    show.add_argument("--label", help="only samples with this label (a grid per class)")
    show.set_defaults(handler=run_show, writes="out")


def run_pack(args) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.shards.inspect import summary_lines
    from pathgan.shards.pack import PackOptions, pack

    options = PackOptions(
        patch_sizes=_sizes(args.patch_sizes),
        image_format="npy" if args.format == "raw" else args.format,
        jpeg_quality=args.jpeg_quality,
        workers=args.workers,
        val_fraction=args.val_fraction,
        target_mpp=args.target_mpp,
        slide_mpp=args.slide_mpp,
        overlap=args.overlap,
        min_tissue=args.min_tissue,
        annotations=args.annotations,
        label_fraction=args.label_fraction,
        labelled_only=args.labelled_only,
        group_pattern=args.group_pattern,
        region_groups=args.region_groups,
        seed=args.seed,
        max_count=args.max_count,
        max_bytes=int(args.max_bytes),
        max_skipped_fraction=args.max_skipped,
        image_column=args.image_column,
        label_column=args.label_column,
        group_column=args.group_column,
        embedding_column=args.embedding_column,
        encoder=args.encoder,
        embedding_precision=args.embedding_precision,
        embedding_tolerance=args.embedding_tolerance,
    )
    manifest = pack(args.inputs, args.out, options, overwrite=args.overwrite)
    for line in summary_lines(manifest):
        print(line)
    for entry in manifest["skipped"][:10]:
        print(f"skipped {entry['path']}: {entry['reason']}")
    print(f"wrote {args.out}/manifest.json")
    return 0


def run_convert(args) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.shards.convert import convert
    from pathgan.shards.inspect import summary_lines

    manifest = convert(args.src, args.out, "npy" if args.format == "raw" else args.format,
                       jpeg_quality=args.jpeg_quality, workers=args.workers,
                       max_skipped=args.max_skipped, overwrite=args.overwrite)
    for line in summary_lines(manifest):
        print(line)
    size = sum(shard["bytes"] for shard in manifest["shards"])
    print(f"{size / max(manifest['total_samples'], 1) / 1e3:.1f} kB per patch; wrote "
          f"{args.out}/manifest.json")
    return 0


def run_verify(args) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.shards.inspect import verify_shards

    problems = verify_shards(args.shards_dir)
    for problem in problems:
        print(problem)
    if problems:
        print(f"FAILED: {len(problems)} problems in {args.shards_dir}")
        return 1
    print(f"OK: {args.shards_dir} matches its manifest")
    return 0


def run_show(args) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.shards.format import load_manifest
    from pathgan.shards.inspect import save_samples_grid, summary_lines

    for line in summary_lines(load_manifest(args.shards_dir)):
        print(line)
    count = save_samples_grid(args.shards_dir, args.out, args.n, args.seed, args.label)
    print(f"wrote a grid of {count} {args.label + ' ' if args.label else ''}samples to "
          f"{args.out}")
    return 0


def run_merge(args) -> int:
    # when the command runs: `pathgan --help` stays fast
    from pathgan.shards.merge import merge

    merge(args.out_dir, if_complete=args.if_complete)
    return 0
