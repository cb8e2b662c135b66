"""``pathgan shards pack``: slides and patch folders -> WebDataset shards + manifest.json.

The job runs in four steps, each deterministic given the inputs and the options:

1. *discover*: expand the inputs into sources (slides, patch images with their labels, the
   files of parquet tables: one source per split group of each), each with the *group* that is
   the unit of the train/validation split; a table's embedding column is checked against its
   encoder here, on a sample of rows, before any work;
2. *plan*: find every tissue patch of every slide (in worker processes); put each group on
   the validation side when a hash of its id alone falls below ``--val-fraction``, so the same
   inputs give the same split however they are divided among pack jobs (``slurm/pack.sbatch``);
   order each split's records by a seeded hash of their keys (shards mix sources, positions and
   patch sizes) and cut the order into shards of bounded count and size;
3. *spool*: worker processes read each level-aligned region of a slide once, cut every window
   inside it, resize, encode, and append the encoded patches to a spool file per region
   (``pack_worker.py``); the work is dealt out by regions, so one huge slide keeps every
   worker busy;
4. *assemble*: threads copy the encoded bytes from the spools into each shard, in the shard's
   mixed order; each shard lands atomically with a small record under ``DIR/.pack/``.

Why spools: reading a region once serves every window inside it (neighbouring windows share
tiles: 0.6 tile decodes per patch region by region against 2.1 one window at a time, on a
CAMELYON16-layout slide), but a shard in mixed order draws from every region of every slide of
its split. Reading in that order would read each window alone (measured: 2 to 12 ms more per
patch, read and resize alone) and, with many slides, reopen slides at random; writing shards in
region order would give shards of one strip of one slide; shuffling within bounded groups of
slides would mix less and still need one of the two. The spool decouples the orders: reads are
region by region, shards are mixed, and the second pass is a byte copy (0.9 ms per patch,
about a tenth of the pack; BENCHMARKS.md, "Packing"). It costs transient disk space about the
size of the shards; the spools are deleted when the manifest is written.

A table's embedding column travels with its rows through the spools and is written beside each
shard in ``pathgan embed``'s format (``embeddings/<encoder-id>/<shard>.npz``), so the Embedding
GAN trains on a packed table without embedding it again.

A rerun recomputes the same plan, keeps every finished shard whose record and checksum match
and every complete spool, and does only what is missing, so a killed pack resumes. The
manifest is written last, from the records.
"""

import concurrent.futures
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pathgan.core.errors import PathganError
from pathgan.core.fileio import read_json, sha256_file, write_json
from pathgan.core.images import IMAGE_SIZE, uint8_to_signed
from pathgan.shards import slides
from pathgan.shards.embedding_files import embedding_path, embeddings_dir, write_embedding_file
from pathgan.shards.format import (
    MANIFEST,
    SHARD_NAME,
    SPLITS,
    make_manifest,
    shard_entry,
    shard_name,
    shard_writer,
)
from pathgan.shards.pack_worker import (
    PLAN_FIELDS,
    PackOptions,
    Source,
    SpoolReader,
    UnitJob,
    plan_images,
    plan_slide,
    plan_table,
    row_groups,
    spool_is_complete,
    spool_unit,
)
from pathgan.shards.tables import PatchTable, TableRow, spread_rows

__all__ = ["PackOptions", "pack"]

PATCH_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TABLE_EXTENSION = ".parquet"
# Options that change no byte of the output: left out of the fingerprint.
NOT_SHAPING = ("workers", "embedding_tolerance")
# Rows of a table whose embeddings are recomputed to check the column against its encoder.
EMBEDDING_CHECK_ROWS = 32
RECORDS_DIR = ".pack"
SPOOL_DIR = f"{RECORDS_DIR}/spool"
# Upper bound of one sample in a shard: raw pixels plus tar headers and metadata. PNG and JPEG
# are smaller, so shards planned with it never exceed --max-bytes.
SAMPLE_BYTES_BOUND = IMAGE_SIZE * IMAGE_SIZE * 3 + 4096
# Fewer validation groups than this make validation figures noisy: say so.
MIN_VAL_GROUPS = 5


def validate(options: PackOptions) -> None:
    options.validate()
    if options.max_bytes < SAMPLE_BYTES_BOUND:
        raise PathganError(f"--max-bytes must be at least {SAMPLE_BYTES_BOUND} (one sample)")


def samples_per_shard(options: PackOptions) -> int:
    return max(1, min(options.max_count, options.max_bytes // SAMPLE_BYTES_BOUND))


# --- discover -------------------------------------------------------------------------------


def _is_slide_file(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in slides.SLIDE_EXTENSIONS:
        return True
    if suffix in slides.TIFF_EXTENSIONS:
        try:
            with Image.open(path) as image:
                return max(image.size) > slides.MAX_PATCH_IMAGE_SIDE
        except Exception:
            return True  # let the slide reader try, and report why it fails
    return False


def source_group(path: Path, kind: str, options: PackOptions) -> str:
    """The split group of a file: group 1 of ``--group-pattern`` on its name when that matches,
    else the slide's name without extension, or the folder a patch image lies in (one folder
    per slide or patient). Names, not paths: the split is the same on every machine."""
    if options.group_pattern:
        match = re.search(options.group_pattern, path.name)
        if match:
            return match.group(1) if match.groups() else match.group(0)
    return path.stem if kind == "slide" else path.absolute().parent.name


def _source(path: Path, kind: str, label: str | None, options: PackOptions) -> Source:
    return Source(str(path), kind, label, source_group(path, kind, options))


def table_sources(table: str, options: PackOptions) -> list[Source]:
    """The sources of a parquet table (a file, a folder, ``hf-dataset:``), checked when opened:
    one per split group of each file (``--group-column``), else one per file."""
    sources = []
    for table_file in PatchTable(table, options.table_columns()).files:
        _, groups = row_groups(table_file, options.group_column)
        sources += [Source(str(table_file.path), "table", None, group, table_file)
                    for group in groups]
    return sources


def _is_table(raw: str) -> bool:
    return raw.startswith("hf-dataset:") or raw.lower().endswith(TABLE_EXTENSION)


def discover_sources(inputs: list[str], options: PackOptions) -> list[Source]:
    """Expand slide files, patch images, parquet tables and folders of them into sources; a
    missing input is a one-line error."""
    sources: list[Source] = []
    for raw in inputs:
        if _is_table(raw):
            sources += table_sources(raw, options)
            continue
        root = Path(raw)
        if not root.exists():
            raise PathganError(f"input {raw}: no such file or folder")
        if root.is_file():
            if _is_slide_file(root):
                sources.append(_source(root, "slide", None, options))
            elif root.suffix.lower() in PATCH_IMAGE_EXTENSIONS:
                sources.append(_source(root, "image", None, options))
            else:
                raise PathganError(f"input {raw}: not a slide or a patch image")
            continue
        files = sorted(p for p in root.rglob("*") if p.is_file())
        if any(path.suffix.lower() == TABLE_EXTENSION for path in files):
            sources += table_sources(raw, options)
        for path in files:
            if _is_slide_file(path):
                sources.append(_source(path, "slide", None, options))
            elif path.suffix.lower() in PATCH_IMAGE_EXTENSIONS:
                # Patch images in a class sub-folder take the folder name as their label.
                label = path.parent.name if path.parent != root else None
                sources.append(_source(path, "image", label, options))
    return sources


# --- plan -----------------------------------------------------------------------------------


def validation_share(group: str) -> float:
    """Where a group falls in [0, 1): a hash of its id alone."""
    return int(hashlib.sha256(group.encode()).hexdigest()[:16], 16) / 2**64


def is_validation_group(group: str, val_fraction: float) -> bool:
    return validation_share(group) < val_fraction


def mixing_rank(key: str, seed: int) -> int:
    """Where a sample falls in its split's order: a seeded hash of its key alone, so every
    stretch of the order mixes sources, positions and patch sizes, whatever the input order."""
    return int.from_bytes(hashlib.sha1(f"{seed}/{key}".encode()).digest()[:8], "big")


@dataclass
class ShardJob:
    name: str
    split: str
    members: np.ndarray  # (plan index, row in that plan) of each sample, in shard order
    plans: list
    out_dir: str
    fingerprint: str
    image_format: str
    embeddings: "ColumnEmbeddings | None" = None  # a table's, written beside the shard

    def records(self) -> Iterator[tuple[int, dict]]:
        """(plan index, record) of each sample, in shard order."""
        for plan, row in self.members.tolist():
            yield plan, {**self.plans[plan].record(row), "split": self.split}


def plan_fingerprint(sources: list[Source], options: PackOptions) -> str:
    """Changes whenever the inputs or any option that shapes the shards change."""
    shaping = {k: v for k, v in asdict(options).items() if k not in NOT_SHAPING}
    files = []
    for source in sources:
        stat = os.stat(source.path)
        files.append([source.path, source.label, source.group, stat.st_size, int(stat.st_mtime)])
    blob = json.dumps({"options": shaping, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_of_sources(sources: list[Source], options: PackOptions) -> list[str]:
    return ["val" if is_validation_group(source.group, options.val_fraction) else "train"
            for source in sources]


def mixed_order(plans: list, splits: list[str], split: str, seed: int) -> np.ndarray:
    """(plan index, row) of every sample of one split, in mixing order."""
    ranks, members = [np.empty(0, np.uint64)], [np.empty((0, 2), np.int64)]
    for index, (plan, plan_split) in enumerate(zip(plans, splits, strict=True)):
        if plan_split == split:
            rows = np.arange(len(plan), dtype=np.int64)
            ranks.append(np.fromiter((mixing_rank(plan.key(row), seed) for row in rows.tolist()),
                                     dtype=np.uint64, count=len(rows)))
            members.append(np.column_stack([np.full(len(rows), index, dtype=np.int64), rows]))
    return np.concatenate(members)[np.argsort(np.concatenate(ranks), kind="stable")]


def plan_shards(plans: list, splits: list[str], options: PackOptions, out_dir: Path,
                fingerprint: str, embeddings: "ColumnEmbeddings | None") -> list[ShardJob]:
    jobs = []
    per_shard = samples_per_shard(options)
    for split in SPLITS:
        members = mixed_order(plans, splits, split, options.seed)
        for index, start in enumerate(range(0, len(members), per_shard)):
            jobs.append(ShardJob(shard_name(split, index), split,
                                 members[start : start + per_shard], plans, str(out_dir),
                                 fingerprint, options.image_format, embeddings))
    return jobs


def groups_per_split(plans: list, splits: list[str], sources: list[Source]) -> dict[str, int]:
    """Groups with at least one sample, per split."""
    groups: dict[str, set[str]] = {split: set() for split in SPLITS}
    for plan, split, source in zip(plans, splits, sources, strict=True):
        if len(plan):
            groups[split].add(source.group)
    return {split: len(names) for split, names in groups.items()}


def warn_small_validation(groups: dict[str, int], val_fraction: float) -> None:
    if val_fraction > 0 and groups["val"] < MIN_VAL_GROUPS:
        print(f"pathgan: warning: the val split has {groups['val']} group(s) of "
              f"{sum(groups.values())} (fewer than {MIN_VAL_GROUPS}): its figures will be noisy; "
              "add inputs or check the grouping (--group-pattern)", file=sys.stderr)


# --- running work ---------------------------------------------------------------------------


def _process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # spawn: slide readers and torch do not survive fork reliably. The workers run
    # pack_worker.py only, which imports no torch, so they start quickly.
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn")
    )


def run_all(executor: concurrent.futures.Executor | None, function: Callable,
            jobs: Iterable, *args, in_flight: int) -> Iterator[tuple]:
    """``(job, function(job, *args))`` as each finishes; in this process without an executor.

    At most ``in_flight`` jobs are submitted ahead, so jobs made on the fly (a unit's records)
    exist only while they wait or run."""
    if executor is None:
        for job in jobs:
            yield job, function(job, *args)
        return
    jobs = iter(jobs)
    futures = {executor.submit(function, job, *args): job
               for job in itertools.islice(jobs, in_flight)}
    while futures:
        done, _ = concurrent.futures.wait(futures, return_when="FIRST_COMPLETED")
        for future in done:
            yield futures.pop(future), future.result()
            for job in itertools.islice(jobs, 1):
                futures[executor.submit(function, job, *args)] = job


def _plan_all(sources: list[Source], options: PackOptions, pool) -> list:
    """The plan of every source, in source order: patch images and table columns here, slides
    in the workers. A table file has one source per split group, so sources are told apart by
    position, not by path."""
    plans = [None] * len(sources)
    images = [index for index, source in enumerate(sources) if source.kind == "image"]
    for index, plan in zip(images, plan_images([sources[i] for i in images]), strict=True):
        plans[index] = plan
    table_files = defaultdict(list)
    for index, source in enumerate(sources):
        if source.kind == "table":
            table_files[source.path].append(index)
    for indices in tqdm(table_files.values(), desc="reading table columns", unit="file",
                        disable=not table_files):
        for index, plan in zip(indices, plan_table([sources[i] for i in indices], options),
                               strict=True):
            plans[index] = plan
    slide_sources = defaultdict(list)
    for index, source in enumerate(sources):
        if source.kind == "slide":
            slide_sources[source].append(index)
    if slide_sources:
        with tqdm(total=len(slide_sources), desc="tissue detection", unit="slide") as progress:
            for source, plan in run_all(pool, plan_slide, list(slide_sources), options,
                                        IMAGE_SIZE, in_flight=len(slide_sources)):
                for index in slide_sources[source]:
                    plans[index] = plan
                progress.update()
    return plans


# --- a table's embeddings ------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnEmbeddings:
    """A table's precomputed embeddings: which column, made by which encoder, how checked."""

    column: str
    encoder_id: str
    spec: str
    dim: int
    precision: str
    check: dict  # the figures of the check against the encoder, or why it was not made

    def problem(self, vector: np.ndarray | None) -> str | None:
        """Why a row's embedding cannot be used (the sample is then listed as missing)."""
        if vector is None:
            return f"no embedding in column {self.column!r}"
        if vector.shape != (self.dim,):
            return f"a {vector.size}-d embedding where the column's are {self.dim}-d"
        if not np.isfinite(vector).all():
            return "the embedding holds NaN or infinity"
        return None


def load_column_encoder(spec: str) -> tuple[torch.nn.Module | None, str, str | None]:
    """(the encoder, its id, None), or (None, its id, why it cannot be loaded here): an encoder
    id given as is, a gated or uncached model offline, TensorFlow missing. Without even an id,
    the embeddings could not be told apart from any other encoder's: a one-line error."""
    from pathgan.encoders import is_encoder_id, load_encoder, resolve_encoder_id

    if is_encoder_id(spec):
        return None, spec, "--encoder gives an encoder id, not a spec that can be loaded"
    try:
        encoder = load_encoder(spec, device="cpu")
        return encoder, encoder.encoder_id, None
    except (PathganError, ImportError, OSError) as error:
        why = str(error).splitlines()[0]
    try:
        return None, resolve_encoder_id(spec), why
    except (PathganError, ImportError, OSError) as error:
        raise PathganError(f"cannot tell which encoder --encoder {spec} is ({error}); pass its "
                           "encoder id instead (as `pathgan embed verify` prints it)") from None


def relative_differences(rows: list[TableRow], encoder) -> np.ndarray:
    """Per row: the L2 distance of its column embedding from the encoder's embedding of its
    image as packed, relative to the latter's length."""
    pixels = torch.from_numpy(np.stack([row.image for row in rows]))  # NHWC uint8, writable
    images = uint8_to_signed(pixels.permute(0, 3, 1, 2))
    with torch.no_grad():
        ours = encoder(images).float().cpu().numpy()
    theirs = np.stack([row.embedding for row in rows])
    return np.linalg.norm(theirs - ours, axis=1) / np.maximum(np.linalg.norm(ours, axis=1), 1e-12)


def check_against_encoder(rows: list[TableRow], encoder, options: PackOptions) -> dict:
    """Recompute the sampled rows' embeddings and refuse, with the measured difference, a
    column made another way: a discriminator would learn that difference instead of tissue.

    The median over rows is compared, since a preprocessing difference (another resize, other
    normalisation, another encoder) moves every row, while one odd row is noise."""
    column = options.embedding_column
    dims = {row.embedding.size for row in rows}
    if dims != {encoder.embed_dim}:
        raise PathganError(f"column {column!r} holds {'/'.join(map(str, sorted(dims)))}-d "
                           f"embeddings; {encoder.encoder_id} makes {encoder.embed_dim}-d ones")
    differences = relative_differences(rows, encoder)
    check = {"rows": len(rows), "median_relative_l2": float(np.median(differences)),
             "max_relative_l2": float(differences.max()),
             "tolerance": options.embedding_tolerance}
    if check["median_relative_l2"] > options.embedding_tolerance:
        raise PathganError(
            f"the embeddings in column {column!r} are not {encoder.encoder_id}'s of these "
            f"images: relative L2 difference median {check['median_relative_l2']:.2e} (max "
            f"{check['max_relative_l2']:.2e}) over {len(rows)} rows, above the tolerance "
            f"{options.embedding_tolerance:.0e}; other preprocessing or another encoder made "
            "them: embed the shards with `pathgan embed` instead")
    return check


def column_embeddings(sources: list[Source], options: PackOptions) -> ColumnEmbeddings | None:
    """The embedding column's provenance, checked on rows spread over the tables against the
    encoder when it loads here; when it does not, says so and goes on."""
    if not options.embedding_column:
        return None
    files = list({source.path: source.table for source in sources
                  if source.kind == "table"}.values())
    sampled = spread_rows(files, EMBEDDING_CHECK_ROWS)
    rows = [row for row in sampled if row.image is not None and row.embedding is not None]
    if not rows:
        raise PathganError(f"none of {len(sampled)} rows spread over the tables has both an "
                           f"image and an embedding in column {options.embedding_column!r}")
    encoder, encoder_id, why_not = load_column_encoder(options.encoder)
    if encoder is None:
        print(f"pathgan: warning: cannot load {options.encoder} here ({why_not}): the "
              f"embeddings of column {options.embedding_column!r} are written as "
              f"{encoder_id}'s unchecked", file=sys.stderr)
        check, dim = {"not_checked": why_not}, rows[0].embedding.size
    else:
        check, dim = check_against_encoder(rows, encoder, options), encoder.embed_dim
        print(f"embedding column {options.embedding_column!r} matches {encoder_id}: relative "
              f"L2 median {check['median_relative_l2']:.1e} over {check['rows']} rows "
              f"(tolerance {options.embedding_tolerance:.0e})")
    return ColumnEmbeddings(options.embedding_column, encoder_id, options.encoder, dim,
                            options.embedding_precision, check)


class ShardEmbeddings:
    """The column embeddings of one shard's samples, gathered in shard order, then written."""

    def __init__(self, column: ColumnEmbeddings) -> None:
        self.column = column
        self.keys: list[str] = []
        self.vectors: list[np.ndarray] = []
        self.missing: dict[str, str] = {}

    def add(self, key: str, vector: np.ndarray | None) -> None:
        problem = self.column.problem(vector)
        if problem:
            self.missing[key] = problem
        else:
            self.keys.append(key)
            self.vectors.append(vector)

    def write(self, out_dir: Path, shard: dict) -> None:
        column = self.column
        array = np.stack(self.vectors) if self.vectors else np.zeros((0, column.dim), np.float32)
        meta = {"encoder_id": column.encoder_id, "encoder_spec": column.spec, "dim": column.dim,
                "precision": column.precision, "column": column.column, "shard": shard["name"],
                "split": shard["split"], "source_sha256": shard["sha256"]}
        write_embedding_file(embedding_path(out_dir, column.encoder_id, shard["name"]),
                             self.keys, array, self.missing, meta)


# --- spool and assemble ---------------------------------------------------------------------


def record_path(out_dir: Path, name: str) -> Path:
    return out_dir / RECORDS_DIR / f"{name}.json"


def finished_record(job: ShardJob) -> dict | None:
    """The record of a shard already written by this same plan, checked against its file."""
    out_dir = Path(job.out_dir)
    path, shard = record_path(out_dir, job.name), out_dir / job.name
    if not (path.is_file() and shard.is_file()):
        return None
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != job.fingerprint or record.get("sha256") != sha256_file(shard):
        return None
    if job.embeddings and not embedding_path(out_dir, job.embeddings.encoder_id,
                                             job.name).is_file():
        return None  # rewritten with them (the same bytes)
    return record


def units_to_read(plans: list, pending: list[ShardJob]) -> dict[str, list[tuple]]:
    """unit -> [(plan, rows)] of every unit a pending shard draws from, slide by slide (a
    worker then mostly finds its slide already open); a unit of patch images spans plans."""
    needed = {plans[plan].unit_of(row) for job in pending for plan, row in job.members.tolist()}
    parts = defaultdict(list)
    for plan in plans:
        for unit, rows in plan.units():
            if unit in needed:
                parts[unit].append((plan, rows))
    return parts


def spool_units(plans: list, pending: list[ShardJob], out_dir: Path, fingerprint: str,
                options: PackOptions, pool) -> None:
    """Spool every unit that a pending shard draws from; complete spools are kept. A unit's
    records are made only when it is sent to a worker."""
    spool_dir = str(out_dir / SPOOL_DIR)
    todo, done, total = [], 0, 0
    for unit, parts in units_to_read(plans, pending).items():
        count = sum(len(rows) for _, rows in parts)
        total += count
        if spool_is_complete(spool_dir, unit, fingerprint):
            done += count
        else:
            todo.append((unit, parts))

    def jobs() -> Iterator[UnitJob]:
        for unit, parts in todo:
            records = [plan.record(row) for plan, rows in parts for row in rows]
            yield UnitJob(unit, records, spool_dir, fingerprint, options, IMAGE_SIZE)

    with tqdm(total=total, initial=done, desc="reading patches", unit="patch") as progress:
        for _, count in run_all(pool, spool_unit, jobs(), in_flight=2 * options.workers):
            progress.update(count)


def write_shard(job: ShardJob) -> dict:
    """Assemble one shard from the spools, atomically; returns its record (count, checksum,
    what was skipped)."""
    out_dir = Path(job.out_dir)
    skipped, per_plan, labels = [], Counter(), Counter()
    embeddings = ShardEmbeddings(job.embeddings) if job.embeddings else None
    with shard_writer(out_dir / job.name) as sink, SpoolReader(out_dir / SPOOL_DIR) as spool:
        for plan, record in job.records():
            try:
                patch = spool.read(record)
            except ValueError as error:  # the patch could not be read: skipped and reported
                skipped.append({"path": record["source"], "key": record["key"],
                                "reason": str(error)})
                continue
            metadata = {k: v for k, v in record.items() if k not in PLAN_FIELDS}
            metadata = {**metadata, **patch.learnt, "synthetic": False}
            sink.write({"__key__": record["key"], job.image_format: patch.image_bytes,
                        "json": json.dumps(metadata).encode()})
            per_plan[str(plan)] += 1
            labels[str(record["label"])] += 1
            if embeddings:
                embeddings.add(record["key"], patch.embedding)
    entry = shard_entry(out_dir / job.name, job.split, sum(per_plan.values()))
    if embeddings:  # before the record: a recorded shard has its embeddings
        embeddings.write(out_dir, entry)
    result = {
        **entry,
        "fingerprint": job.fingerprint,
        "skipped": skipped,
        "per_plan": dict(per_plan),  # samples per source, by position (a path can repeat)
        "labels": dict(labels),
    }
    write_json(record_path(out_dir, job.name), result)
    return result


def write_shards(pending: list[ShardJob], workers: int, total: int) -> dict[str, dict]:
    """Assemble the pending shards with ``workers`` threads (byte copies, checksums and file
    writes release the GIL); ``total`` patches in the plan. Returns their records by name."""
    records = {}
    done = total - sum(len(job.members) for job in pending)
    with tqdm(total=total, initial=done, desc="writing shards", unit="patch") as progress, \
            concurrent.futures.ThreadPoolExecutor(workers) as threads:
        for job, record in run_all(threads, write_shard, pending, in_flight=len(pending)):
            records[job.name] = record
            progress.update(len(job.members))
    return records


# --- the job --------------------------------------------------------------------------------


def _prepare_out_dir(out_dir: Path, fingerprint: str, overwrite: bool) -> None:
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        previous = read_json(manifest).get("fingerprint")
        if previous != fingerprint and not overwrite:
            raise PathganError(
                f"{out_dir} already holds a shard set packed from other inputs or options; "
                "choose another --out or pass --overwrite"
            )
    if overwrite and out_dir.exists():
        for path in [*out_dir.glob("*.tar"), manifest]:
            path.unlink(missing_ok=True)
        shutil.rmtree(out_dir / RECORDS_DIR, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _remove_stale_shards(out_dir: Path, jobs: list[ShardJob],
                         embeddings: ColumnEmbeddings | None) -> None:
    """Shards, records, their column embeddings and partial files left by an earlier (killed
    or different) run go."""
    folders = [out_dir, out_dir / RECORDS_DIR, out_dir / SPOOL_DIR]
    if embeddings:
        folders.append(embeddings_dir(out_dir, embeddings.encoder_id))
    for folder in folders:
        for partial in folder.glob(".*.tmp-*"):
            partial.unlink(missing_ok=True)
    planned = {job.name for job in jobs}
    for path in out_dir.glob("*.tar"):
        if path.name not in planned and SHARD_NAME.fullmatch(path.name):
            path.unlink()
            record_path(out_dir, path.name).unlink(missing_ok=True)
            if embeddings:
                embedding_path(out_dir, embeddings.encoder_id, path.name).unlink(missing_ok=True)


def build_manifest(sources: list[Source], plans: list, records: list[dict],
                   groups: dict[str, int], options: PackOptions, inputs: list[str],
                   fingerprint: str, embeddings: ColumnEmbeddings | None) -> dict:
    skipped = [{"path": p.source, "reason": p.skipped} for p in plans if p.skipped]
    skipped += [entry for record in records for entry in record["skipped"]]
    per_plan, split_of, labels = Counter(), {}, Counter()
    for record in records:
        per_plan.update(record["per_plan"])
        split_of.update(dict.fromkeys(record["per_plan"], record["split"]))
        labels.update(record["labels"])
    return make_manifest(
        [{k: r[k] for k in ("name", "split", "samples", "bytes", "sha256")} for r in records],
        {"inputs": list(inputs), **asdict(options)},
        fingerprint=fingerprint,
        groups=groups,
        sources=[
            {"path": s.path, "kind": s.kind, "group": s.group, "split": split_of.get(str(index)),
             "samples": per_plan.get(str(index), 0),
             **({"mpp": p.mpp} if s.kind == "slide" else {})}
            for index, (s, p) in enumerate(zip(sources, plans, strict=True))
        ],
        labels=dict(labels),
        skipped=skipped,
        **({"embeddings": asdict(embeddings)} if embeddings else {}),
    )


def _check_skip_threshold(manifest: dict, plans: list, options: PackOptions) -> None:
    attempted = len(manifest["skipped"]) + manifest["total_samples"]
    attempted += sum(1 for p in plans if not p.skipped and not len(p))
    fraction = len(manifest["skipped"]) / max(attempted, 1)
    if fraction > options.max_skipped_fraction:
        raise PathganError(
            f"{len(manifest['skipped'])} inputs could not be read ({fraction:.0%}, above "
            f"--max-skipped {options.max_skipped_fraction:.0%}); see 'skipped' in the manifest"
        )


def check_table_options(sources: list[Source], options: PackOptions) -> None:
    """Table options without a table are a mistake worth a line, not silently ignored."""
    if any(source.kind == "table" for source in sources):
        return
    flags = {"--image-column": options.image_column != PackOptions.image_column,
             "--label-column": options.label_column, "--group-column": options.group_column,
             "--embedding-column": options.embedding_column}
    for flag, given in flags.items():
        if given:
            raise PathganError(f"{flag} applies to parquet tables, and no INPUT is one")


def pack(inputs: list[str], out_dir: str | Path, options: PackOptions,
         overwrite: bool = False) -> dict:
    """Pack ``inputs`` into shards under ``out_dir``; returns the manifest."""
    validate(options)
    out_dir = Path(out_dir)
    sources = discover_sources(inputs, options)
    if not sources:
        raise PathganError("no slides or patch images (or parquet tables) found in "
                           + " ".join(inputs))
    check_table_options(sources, options)
    embeddings = column_embeddings(sources, options)
    fingerprint = plan_fingerprint(sources, options)
    _prepare_out_dir(out_dir, fingerprint, overwrite)
    pool = _process_pool(options.workers) if options.workers > 1 else None
    try:
        plans = _plan_all(sources, options, pool)
        splits = split_of_sources(sources, options)
        jobs = plan_shards(plans, splits, options, out_dir, fingerprint, embeddings)
        if not jobs:
            reasons = "; ".join(f"{Path(p.source).name}: {p.skipped}" for p in plans
                                if p.skipped)[:500]
            raise PathganError(
                "no patches found (every input was empty, unreadable or had no tissue patch above "
                f"--min-tissue {options.min_tissue})" + (f": {reasons}" if reasons else "")
            )
        groups = groups_per_split(plans, splits, sources)
        warn_small_validation(groups, options.val_fraction)
        _remove_stale_shards(out_dir, jobs, embeddings)
        records = {job.name: record for job in jobs if (record := finished_record(job))}
        if records:
            print(f"resuming: {len(records)} of {len(jobs)} shards already written and verified")
        pending = [job for job in jobs if job.name not in records]
        spool_units(plans, pending, out_dir, fingerprint, options, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    total = sum(len(job.members) for job in jobs)
    records.update(write_shards(pending, options.workers, total))
    manifest = build_manifest(sources, plans, [records[job.name] for job in jobs], groups,
                              options, inputs, fingerprint, embeddings)
    write_json(out_dir / MANIFEST, manifest)
    shutil.rmtree(out_dir / SPOOL_DIR, ignore_errors=True)  # every shard is written
    if manifest["total_samples"] == 0:
        raise PathganError("every patch failed to read; see 'skipped' in the manifest")
    _check_skip_threshold(manifest, plans, options)
    return manifest
