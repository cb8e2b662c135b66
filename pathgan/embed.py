"""``pathgan embed``: precompute encoder embeddings of a shard set, one file per shard.

The files are those of :mod:`pathgan.shards.embedding_files`. Work is split by shard: worker
``w`` of ``W`` takes shards ``w, w + W, ...`` of the manifest, where ``w = task_index * world_size +
rank`` combines a SLURM array task (or ``--task-index``) with an ``accelerate launch``/
``torchrun`` rank, so no two workers write the same file. Finished, verified outputs are
skipped; files are written under a temporary name and renamed.
"""

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pathgan.core.devices import default_device
from pathgan.core.errors import PathganError, writing
from pathgan.core.fileio import sha256_file
from pathgan.core.images import uint8_to_signed
from pathgan.encoders import load_encoder
from pathgan.shards.embedding_files import (
    EMBEDDINGS_DIR,
    as_encoder_id,
    check_embedding_file,
    embedding_path,
    embeddings_dir,
    write_embedding_file,
)
from pathgan.shards.format import load_manifest
from pathgan.shards.reading import ShardSamples, collate_samples, index_shard

DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_MISSING = 0.05


# -- who does what ----------------------------------------------------------------------------
def worker_assignment(task_index: int | None = None, num_tasks: int | None = None,
                      env=None) -> tuple[int, int]:
    """(worker, num_workers) of this process: SLURM array task (or explicit ``--task-index``/
    ``--num-tasks``) times the accelerate/torchrun rank (``RANK``/``WORLD_SIZE``)."""
    env = os.environ if env is None else env
    if (task_index is None) != (num_tasks is None):
        raise PathganError("give both --task-index and --num-tasks, or neither")
    if task_index is None and "SLURM_ARRAY_TASK_ID" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        task_index = int(env["SLURM_ARRAY_TASK_ID"]) - first
        num_tasks = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if task_index is None:
        task_index, num_tasks = 0, 1
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise PathganError(
            f"task index {task_index} is not in 0..{num_tasks - 1} (a SLURM array must be "
            "contiguous, e.g. --array=0-7)"
        )
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    return task_index * world + rank, num_tasks * world


def assigned_shards(shards: list[dict], worker: int, num_workers: int) -> list[dict]:
    """Round-robin over manifest order: disjoint across workers, and together all shards."""
    return [shard for index, shard in enumerate(shards) if index % num_workers == worker]


# -- the job ----------------------------------------------------------------------------------
@dataclass
class _Pending:
    """A shard to embed: its keys, and the rows filled in as batches come back."""

    shard: dict
    path: Path
    output: Path
    keys: list[str]
    start: int  # index of the shard's first sample in the dataset
    entries: list
    embeddings: np.ndarray | None = None
    ok: np.ndarray | None = None
    errors: dict[str, str] = field(default_factory=dict)
    done: int = 0

    @property
    def complete(self) -> bool:
        return self.done == len(self.keys)


@dataclass
class EmbedJob:
    """What one worker embeds and how: everything :func:`embed_shards` decided before the
    encoder runs."""

    shards: list[_Pending]  # the shards to embed, in dataset order
    encoder: torch.nn.Module | None  # None: load it from ``spec`` once the loader has started
    spec: str
    encoder_id: str
    device: torch.device
    batch_size: int
    num_workers: int
    precision: str
    progress: bool
    worker: int
    workers: int
    log: Callable[[str], None]


@dataclass
class Embedded:
    """What the embedding loop did."""

    images: int = 0
    missing: list[dict] = field(default_factory=list)  # {"shard", "key", "reason"}
    shards_written: int = 0
    seconds: float = 0.0  # the loop itself: model loading and shard checks excluded


def _write_output(item: _Pending, encoder) -> None:
    keys_ok = [key for key, ok in zip(item.keys, item.ok, strict=True) if ok]
    missing = {key: item.errors.get(key, "")
               for key, ok in zip(item.keys, item.ok, strict=True) if not ok}
    meta = {"encoder_id": encoder.encoder_id, "encoder_spec": getattr(encoder, "spec", ""),
            "dim": int(encoder.embed_dim), "precision": encoder.precision,
            "shard": item.shard["name"], "split": item.shard.get("split"),
            "source_sha256": item.shard["sha256"]}
    write_embedding_file(item.output, keys_ok, item.embeddings[item.ok], missing, meta)


def _remove_stale_temporaries(output: Path) -> None:
    """Temporary files of an interrupted run for this worker's own outputs (never others')."""
    if output.parent.is_dir():
        for stale in output.parent.glob(f".{output.name}.tmp-*"):
            stale.unlink(missing_ok=True)


def finished_embeddings_line(shards_dir: Path) -> str:
    """What a stopped embed kept, in words: the files a rerun checks and keeps."""
    count = len(list((shards_dir / EMBEDDINGS_DIR).glob("*/*.npz")))
    return (f"{count} finished embedding file(s) under {shards_dir / EMBEDDINGS_DIR} (the rerun "
            "checks and keeps them)")


def embed_shards(shards_dir: str | Path, encoder, **options) -> dict:
    """:func:`embed_job` of ``shards_dir``: a fault or an interrupt says which files were
    kept (a rerun resumes)."""
    shards_dir = Path(shards_dir)
    with writing(shards_dir, kept=lambda: finished_embeddings_line(shards_dir)):
        return embed_job(shards_dir, encoder, **options)


def embed_job(shards_dir: str | Path, encoder, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 task_index: int | None = None, num_tasks: int | None = None,
                 num_workers: int | None = None, precision: str = "fp32", device=None,
                 max_missing: float = DEFAULT_MAX_MISSING, progress: bool = True,
                 log=None) -> dict:
    """Embed this worker's shards of ``shards_dir`` with ``encoder`` (an Encoder or a spec).

    Returns a summary dict (see :func:`format_summary`). When a shard could not be read or more
    than ``max_missing`` of the samples were corrupt, ``summary["error"]`` says so (the CLI then
    exits non-zero); every good shard has been written by then.
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    started = time.perf_counter()
    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir)
    worker, workers = worker_assignment(task_index, num_tasks)
    mine = assigned_shards(manifest["shards"], worker, workers)
    device = default_device(device)
    if batch_size < 1:
        raise PathganError("--batch-size must be at least 1")

    # The id first: Path Foundation's comes without TensorFlow, so a finished job costs nothing
    # and DataLoader workers fork before TensorFlow starts its threads.
    loaded = encoder if isinstance(encoder, torch.nn.Module) else None
    spec = getattr(encoder, "spec", None) or str(encoder)
    if loaded is None and not spec.startswith("path-foundation"):
        loaded = _load(spec, device, precision, log)
    encoder_id = loaded.encoder_id if loaded is not None else as_encoder_id(spec)

    pending, skipped, failed = _pending_shards(shards_dir, mine, encoder_id, log)
    if num_workers is None:  # the node's cores shared by its ranks, one left to each rank
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        num_workers = min(16, max(0, (os.cpu_count() or 1) // ranks_here - 1))
    embedded = Embedded()
    if pending:
        embedded = _run(EmbedJob(pending, loaded, spec, encoder_id, device, batch_size,
                                 num_workers, precision, progress, worker, workers, log))

    seconds = round(time.perf_counter() - started, 3)
    summary = {"worker": worker, "num_workers": workers, "encoder_id": encoder_id,
               "output_dir": str(embeddings_dir(shards_dir, encoder_id)),
               "shards_assigned": len(mine), "shards_skipped": skipped,
               "shards_written": embedded.shards_written, "shards_failed": failed,
               "images": embedded.images, "missing": embedded.missing, "seconds": seconds,
               # the rate of the embedding loop itself (model loading and shard checks excluded)
               "images_per_second": round(embedded.images / max(embedded.seconds or seconds,
                                                                 1e-9), 2)}
    if pending:
        summary["embed_seconds"] = embedded.seconds
    total = embedded.images + len(embedded.missing)
    if failed:
        names = ", ".join(f["shard"] for f in failed)
        summary["error"] = f"{len(failed)} shard(s) could not be embedded: {names}"
    elif total and len(embedded.missing) / total > max_missing:
        summary["error"] = (f"{len(embedded.missing)} of {total} samples could not be decoded "
                            f"(above --max-missing {max_missing:.0%})")
    return summary


def _pending_shards(shards_dir: Path, mine: list[dict], encoder_id: str, log
                    ) -> tuple[list[_Pending], int, list[dict]]:
    """This worker's shards that still need embedding; how many are done already (a complete,
    aligned output of the same shard); and those that cannot be read, with why."""
    pending: list[_Pending] = []
    skipped, failed = 0, []
    for shard in mine:
        output = embedding_path(shards_dir, encoder_id, shard["name"])
        _remove_stale_temporaries(output)
        path = shards_dir / shard["name"]
        try:
            if not path.is_file():
                raise PathganError(f"{path} is missing")
            entries = index_shard(path)
            keys = [key for key, _ in entries]
            actual = None if shard.get("sha256") else sha256_file(path)
            expected = shard.get("sha256") or actual
            shard = {**shard, "sha256": expected}
            if output.is_file() and check_embedding_file(output, shard, encoder_id, keys) is None:
                skipped += 1
                continue
            if (actual or sha256_file(path)) != expected:
                raise PathganError("sha256 differs from the manifest (truncated or changed?)")
            start = sum(len(p.keys) for p in pending)
            pending.append(_Pending(shard, path, output, keys, start, entries))
        except PathganError as error:
            failed.append({"shard": shard["name"], "reason": str(error)})
            log(f"pathgan embed: skipping {shard['name']}: {error}")
    return pending, skipped, failed


def _load(spec: str, device, precision: str, log):
    encoder = load_encoder(spec, device=device, precision=precision)
    if precision != "fp32" and not hasattr(encoder, "set_precision"):
        log(f"pathgan embed: {spec} runs in float32 (TensorFlow); --precision {precision} "
            "applies to torch encoders only")
    return encoder


def _ready_encoder(job: EmbedJob):
    """The job's encoder, loaded if it was not, on its device in its precision."""
    encoder = job.encoder or _load(job.spec, job.device, job.precision, job.log)
    if encoder.encoder_id != job.encoder_id:
        raise PathganError(f"encoder id changed while loading: {job.encoder_id} -> "
                           f"{encoder.encoder_id}")
    encoder = encoder.to(job.device).eval()
    if hasattr(encoder, "set_precision"):
        encoder.set_precision(job.precision)
    return encoder


def _run(job: EmbedJob) -> Embedded:
    """Embed every sample of the job's shards; each shard's file is written as soon as its last
    sample is back (corrupt samples listed as missing)."""
    dataset = ShardSamples([(item.path, item.entries) for item in job.shards])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=job.batch_size, shuffle=False, num_workers=job.num_workers,
        collate_fn=collate_samples, pin_memory=job.device.type == "cuda",
        prefetch_factor=4 if job.num_workers else None,
    )
    batches = iter(loader)  # workers start decoding now, while the encoder loads
    encoder = _ready_encoder(job)
    for item in job.shards:
        item.embeddings = np.zeros((len(item.keys), encoder.embed_dim), dtype=np.float32)
        item.ok = np.zeros(len(item.keys), dtype=bool)
    starts = [item.start for item in job.shards]

    def shard_of(index: int) -> _Pending:
        return job.shards[np.searchsorted(starts, index, side="right") - 1]

    embedded = Embedded()
    position = job.worker if job.workers > 1 and job.worker < 8 else None
    bar = tqdm(total=len(dataset), unit="img", desc=f"embed {job.worker + 1}/{job.workers}",
               disable=not job.progress, position=position, dynamic_ncols=True, mininterval=1.0)
    written = [0]  # shards written, in order

    def record(indices: list[int], outputs: torch.Tensor | None, failures: list) -> None:
        """A batch's results into its shards' rows; every shard complete by now is written."""
        if outputs is not None:
            rows = outputs.cpu().numpy()  # waits for this batch only: the next one is queued
            for row, index in enumerate(indices):
                item = shard_of(index)
                item.embeddings[index - item.start] = rows[row]
                item.ok[index - item.start] = True
                item.done += 1
        for index, error in failures:
            item = shard_of(index)
            key = item.keys[index - item.start]
            item.errors[key] = error
            item.done += 1
            embedded.missing.append({"shard": item.shard["name"], "key": key, "reason": error})
            job.log(f"pathgan embed: corrupt sample {key} in {item.shard['name']}: {error}")
        embedded.images += len(indices)
        bar.update(len(indices) + len(failures))
        while written[0] < len(job.shards) and job.shards[written[0]].complete:
            item = job.shards[written[0]]
            _write_output(item, encoder)
            embedded.shards_written += 1
            item.embeddings = None  # free it
            written[0] += 1

    compute_started = time.perf_counter()
    previous = None  # the batch whose results are read once the next one is on the device
    try:
        for indices, images, failures in batches:
            outputs = None
            if images is not None:
                with torch.no_grad():
                    inputs = uint8_to_signed(images.to(job.device, non_blocking=True))
                    outputs = encoder(inputs).float()
            if previous is not None:
                record(*previous)
            previous = (indices, outputs, failures)
        if previous is not None:
            record(*previous)
    finally:
        bar.close()
        dataset.close()
        embedded.seconds = round(time.perf_counter() - compute_started, 3)
    next_to_write = written[0]
    for item in job.shards[next_to_write:]:  # only an empty shard can be left
        item.embeddings = np.zeros((0, encoder.embed_dim), np.float32)
        item.ok = np.zeros(0, bool)
        _write_output(item, encoder)
        embedded.shards_written += 1
    return embedded


def format_summary(summary: dict) -> str:
    lines = [
        f"embed {summary['worker'] + 1}/{summary['num_workers']}: encoder {summary['encoder_id']}",
        f"  shards: {summary['shards_assigned']} assigned, {summary['shards_written']} written, "
        f"{summary['shards_skipped']} already done, {len(summary['shards_failed'])} failed",
        f"  images: {summary['images']} embedded ({summary['images_per_second']:.1f} images/s), "
        f"{len(summary['missing'])} missing; {summary['seconds']:.1f} s in all",
        f"  output: {summary['output_dir']}",
    ]
    lines += [f"  missing: {m['shard']} {m['key']}: {m['reason']}" for m in summary["missing"]]
    lines += [f"  failed: {f['shard']}: {f['reason']}" for f in summary["shards_failed"]]
    return "\n".join(lines)
