"""``pathgan shards pack``: slides, patch images and parquet tables -> WebDataset shards + manifest.

The job runs in four steps, each deterministic given the inputs and the options, each in the
module named after it; this one runs them in order, with their processes, threads and progress:

1. *discover* (``sources.py``): expand the inputs into sources (slides, patch images with their
   labels, the files of parquet tables: one source per split group of each), each with the
   *group* that is the unit of the train/validation split, and decide each group's side; a
   table's embedding column is checked against its encoder (``table_embeddings.py``), on a
   sample of rows, before any work;
2. *plan* (``plan.py``): find every tissue patch of every slide (in worker processes), every
   patch image and table row, as sample records; order each split's records by a seeded hash of
   their keys (shards mix sources, positions and patch sizes) and cut the order into shards of
   bounded count and size (``assemble.py``);
3. *spool* (``spool.py``): worker processes read each level-aligned region of a slide once, cut
   every window inside it, resize, encode, and append the encoded patches to a spool file per
   region; the work is dealt out by regions, so one huge slide keeps every worker busy;
4. *assemble* (``assemble.py``): threads copy the encoded bytes from the spools into each
   shard, in the shard's mixed order; each shard lands atomically with a small record under
   ``DIR/.pack/``; the manifest is written last, from the records.

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
and every complete spool, and does only what is missing, so a killed pack resumes.
"""

import concurrent.futures
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import signal
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from pathgan.core.errors import PathganError, writing
from pathgan.core.fileio import read_json, write_json
from pathgan.shards.assemble import (
    RECORDS_DIR,
    SPOOL_DIR,
    ShardJob,
    build_manifest,
    check_skip_threshold,
    finished_record,
    plan_shards,
    record_path,
    write_shard,
)
from pathgan.shards.embedding_files import embedding_path, embeddings_dir
from pathgan.shards.format import IMAGE_SIDE, MANIFEST, SHARD_NAME
from pathgan.shards.options import PackOptions
from pathgan.shards.plan import plan_images, plan_slide, plan_table
from pathgan.shards.regions import split_by_region
from pathgan.shards.sources import (
    Source,
    check_table_options,
    discover_sources,
    groups_per_split,
    split_of_sources,
    warn_small_validation,
)
from pathgan.shards.spool import spool_unit, unit_jobs, units_to_spool
from pathgan.shards.table_embeddings import ColumnEmbeddings, column_embeddings

__all__ = ["PackOptions", "pack"]

# Options that change no byte of the output: left out of the fingerprint.
NOT_SHAPING = ("workers", "embedding_tolerance")


def plan_fingerprint(sources: list[Source], options: PackOptions) -> str:
    """Changes whenever the inputs or any option that shapes the shards change."""
    shaping = {k: v for k, v in asdict(options).items() if k not in NOT_SHAPING}
    files = []
    for source in sources:
        stat = os.stat(source.path)
        files.append([source.path, source.label, source.group, stat.st_size, int(stat.st_mtime)])
    blob = json.dumps({"options": shaping, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --- running work ---------------------------------------------------------------------------


def _process_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # spawn: slide readers and torch do not survive fork reliably. The workers run plan.py
    # and spool.py only, which import no torch, so they start quickly.
    # Ctrl-C is this process's to handle: it stops the pack and says what was kept, while the
    # workers finish their unit (a worker's own KeyboardInterrupt would print its traceback).
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN),
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
                                        IMAGE_SIDE, in_flight=len(slide_sources)):
                for index in slide_sources[source]:
                    plans[index] = plan
                progress.update()
    return plans


def spool_units(plans: list, pending: list[ShardJob], out_dir: Path, fingerprint: str,
                options: PackOptions, pool) -> None:
    """Spool every unit that a pending shard draws from; complete spools are kept."""
    spool_dir = out_dir / SPOOL_DIR
    todo, done, total = units_to_spool(plans, pending, spool_dir, fingerprint)
    jobs = unit_jobs(todo, spool_dir, fingerprint, options)
    with tqdm(total=total, initial=done, desc="reading patches", unit="patch") as progress:
        for _, count in run_all(pool, spool_unit, jobs, in_flight=2 * options.workers):
            progress.update(count)


def assemble_shards(pending: list[ShardJob], workers: int, total: int) -> dict[str, dict]:
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


def finished_shards_line(out_dir: Path) -> str:
    """What a stopped pack kept, in words: the shards a rerun checks and keeps."""
    count = len(list((out_dir / RECORDS_DIR).glob("*.json")))
    return (f"{count} finished shard(s) in {out_dir} (the rerun checks and keeps them, and "
            "the regions already read)")


def pack(inputs: list[str], out_dir: str | Path, options: PackOptions,
         overwrite: bool = False) -> dict:
    """Pack ``inputs`` into shards under ``out_dir``; returns the manifest. A fault or an
    interrupt says which shards were kept (a rerun resumes)."""
    options.validate()
    out_dir = Path(out_dir)
    with writing(out_dir, kept=lambda: finished_shards_line(out_dir)):
        return _pack(inputs, out_dir, options, overwrite)


def _pack(inputs: list[str], out_dir: Path, options: PackOptions, overwrite: bool) -> dict:
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
        sources, plans = split_by_region(sources, plans, options)
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
    records.update(assemble_shards(pending, options.workers, total))
    manifest = build_manifest(sources, plans, [records[job.name] for job in jobs], groups,
                              options, inputs, fingerprint, embeddings)
    write_json(out_dir / MANIFEST, manifest)
    shutil.rmtree(out_dir / SPOOL_DIR, ignore_errors=True)  # every shard is written
    if manifest["total_samples"] == 0:
        raise PathganError("every patch failed to read; see 'skipped' in the manifest")
    check_skip_threshold(manifest, plans, options)
    return manifest
