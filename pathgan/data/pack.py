"""``pathgan shards pack``: slides and patch folders -> WebDataset shards + manifest.json.

The job runs in four steps, each deterministic given the inputs and the options:

1. *discover*: expand the inputs into sources (slides, patch images with their labels), each
   with the *group* that is the unit of the train/validation split;
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
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pathgan.data import slides
from pathgan.data.format import (
    MANIFEST,
    SHARDS_FORMAT,
    SPLITS,
    shard_entry,
    shard_name,
    shard_writer,
)
from pathgan.data.pack_worker import (
    PLAN_FIELDS,
    PackOptions,
    Source,
    SpoolReader,
    UnitJob,
    plan_images,
    plan_slide,
    spool_is_complete,
    spool_unit,
)
from pathgan.errors import PathganError
from pathgan.fileio import read_json, sha256_file, write_json
from pathgan.images import IMAGE_SIZE

__all__ = ["PackOptions", "pack"]

PATCH_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
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


def discover_sources(inputs: list[str], options: PackOptions) -> list[Source]:
    """Expand slide files and folders into sources; a missing input is a one-line error."""
    sources: list[Source] = []
    for raw in inputs:
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
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
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

    def records(self) -> Iterator[dict]:
        for plan, row in self.members.tolist():
            yield {**self.plans[plan].record(row), "split": self.split}


def plan_fingerprint(sources: list[Source], options: PackOptions) -> str:
    """Changes whenever the inputs or any option that shapes the shards change."""
    shaping = {k: v for k, v in asdict(options).items() if k not in ("workers",)}
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
                fingerprint: str) -> list[ShardJob]:
    jobs = []
    per_shard = samples_per_shard(options)
    for split in SPLITS:
        members = mixed_order(plans, splits, split, options.seed)
        for index, start in enumerate(range(0, len(members), per_shard)):
            jobs.append(ShardJob(shard_name(split, index), split,
                                 members[start : start + per_shard], plans, str(out_dir),
                                 fingerprint, options.image_format))
    return jobs


def groups_per_split(plans: list, splits: list[str], sources: list[Source]) -> dict[str, int]:
    """Groups with at least one sample, per split."""
    groups: dict[str, set[str]] = {split: set() for split in SPLITS}
    for plan, split, source in zip(plans, splits, sources, strict=True):
        if len(plan):
            groups[split].add(source.group)
    return {split: len(names) for split, names in groups.items()}


def warn_small_validation(groups: dict[str, int], options: PackOptions) -> None:
    if options.val_fraction > 0 and groups["val"] < MIN_VAL_GROUPS:
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
    slide_sources = [s for s in sources if s.kind == "slide"]
    image_sources = [s for s in sources if s.kind == "image"]
    plans = dict(zip((s.path for s in image_sources), plan_images(image_sources), strict=True))
    if slide_sources:
        with tqdm(total=len(slide_sources), desc="tissue detection", unit="slide") as progress:
            for source, plan in run_all(pool, plan_slide, slide_sources, options, IMAGE_SIZE,
                                        in_flight=len(slide_sources)):
                plans[source.path] = plan
                progress.update()
    return [plans[s.path] for s in sources]


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
    skipped, per_source, labels = [], Counter(), Counter()
    count = 0
    with shard_writer(out_dir / job.name) as sink, SpoolReader(out_dir / SPOOL_DIR) as spool:
        for record in job.records():
            try:
                image_bytes, learnt = spool.read(record)
            except ValueError as error:  # the patch could not be read: skipped and reported
                skipped.append({"path": record["source"], "key": record["key"],
                                "reason": str(error)})
                continue
            metadata = {k: v for k, v in record.items() if k not in PLAN_FIELDS}
            metadata = {**metadata, **learnt, "synthetic": False}
            sink.write({"__key__": record["key"], job.image_format: image_bytes,
                        "json": json.dumps(metadata).encode()})
            count += 1
            per_source[record["source"]] += 1
            labels[str(record["label"])] += 1
    result = {
        **shard_entry(out_dir / job.name, job.split, count),
        "fingerprint": job.fingerprint,
        "skipped": skipped,
        "per_source": dict(per_source),
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


def _remove_stale_shards(out_dir: Path, jobs: list[ShardJob]) -> None:
    """Shards, records and partial files left by an earlier (killed or different) run go."""
    for folder in (out_dir, out_dir / RECORDS_DIR, out_dir / SPOOL_DIR):
        for partial in folder.glob(".*.tmp-*"):
            partial.unlink(missing_ok=True)
    planned = {job.name for job in jobs}
    for path in out_dir.glob("*.tar"):
        if path.name not in planned and re.fullmatch(r"(train|val)-\d{6}\.tar", path.name):
            path.unlink()
            record_path(out_dir, path.name).unlink(missing_ok=True)


def build_manifest(sources, plans, records, groups, options, inputs, fingerprint) -> dict:
    skipped = [{"path": p.source, "reason": p.skipped} for p in plans if p.skipped]
    skipped += [entry for record in records for entry in record["skipped"]]
    per_source = Counter()
    labels = Counter()
    for record in records:
        per_source.update(record["per_source"])
        labels.update(record["labels"])
    split_of = {}
    for record in records:
        for source in record["per_source"]:
            split_of[source] = record["split"]
    splits = {
        split: {
            "samples": sum(r["samples"] for r in records if r["split"] == split),
            "shards": sum(1 for r in records if r["split"] == split),
            "groups": groups[split],
        }
        for split in SPLITS
    }
    return {
        "format": SHARDS_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint,
        "total_samples": sum(r["samples"] for r in records),
        "splits": splits,
        "shards": [
            {k: r[k] for k in ("name", "split", "samples", "bytes", "sha256")} for r in records
        ],
        "sources": [
            {"path": s.path, "kind": s.kind, "group": s.group,
             "split": split_of.get(s.path), "samples": per_source.get(s.path, 0),
             **({"mpp": p.mpp} if s.kind == "slide" else {})}
            for s, p in zip(sources, plans, strict=True)
        ],
        "labels": dict(labels),
        "skipped": skipped,
        "config": {"inputs": list(inputs), **asdict(options)},
    }


def _check_skip_threshold(manifest: dict, plans: list, options: PackOptions) -> None:
    attempted = len(manifest["skipped"]) + manifest["total_samples"]
    attempted += sum(1 for p in plans if not p.skipped and not len(p))
    fraction = len(manifest["skipped"]) / max(attempted, 1)
    if fraction > options.max_skipped_fraction:
        raise PathganError(
            f"{len(manifest['skipped'])} inputs could not be read ({fraction:.0%}, above "
            f"--max-skipped {options.max_skipped_fraction:.0%}); see 'skipped' in the manifest"
        )


def pack(inputs: list[str], out_dir: str | Path, options: PackOptions,
         overwrite: bool = False) -> dict:
    """Pack ``inputs`` into shards under ``out_dir``; returns the manifest."""
    validate(options)
    out_dir = Path(out_dir)
    sources = discover_sources(inputs, options)
    if not sources:
        raise PathganError(f"no slides or patch images found in {' '.join(inputs)}")
    fingerprint = plan_fingerprint(sources, options)
    _prepare_out_dir(out_dir, fingerprint, overwrite)
    pool = _process_pool(options.workers) if options.workers > 1 else None
    try:
        plans = _plan_all(sources, options, pool)
        splits = split_of_sources(sources, options)
        jobs = plan_shards(plans, splits, options, out_dir, fingerprint)
        if not jobs:
            reasons = "; ".join(f"{Path(p.source).name}: {p.skipped}" for p in plans
                                if p.skipped)[:500]
            raise PathganError(
                "no patches found (every slide was unreadable or had no tissue patch above "
                f"--min-tissue {options.min_tissue})" + (f": {reasons}" if reasons else "")
            )
        groups = groups_per_split(plans, splits, sources)
        warn_small_validation(groups, options)
        _remove_stale_shards(out_dir, jobs)
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
                              options, inputs, fingerprint)
    write_json(out_dir / MANIFEST, manifest)
    shutil.rmtree(out_dir / SPOOL_DIR, ignore_errors=True)  # every shard is written
    if manifest["total_samples"] == 0:
        raise PathganError("every patch failed to read; see 'skipped' in the manifest")
    _check_skip_threshold(manifest, plans, options)
    return manifest
