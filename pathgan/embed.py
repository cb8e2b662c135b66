"""``pathgan embed``: precompute encoder embeddings of a shard set, one file per shard.

Output: ``SHARDS_DIR/embeddings/<encoder-id>/<shard stem>.npz`` (``train-000000.tar`` ->
``train-000000.npz``), readable with numpy alone (``np.load(path)``, no pickle):

- ``keys``: str (n,), the keys embedded, in shard order;
- ``embeddings``: float32 (n, D), row i belongs to ``keys[i]``;
- ``missing_keys``: str (m,), samples that could not be decoded (corrupt), in shard order;
- ``meta``: a JSON string: format, encoder id and spec, dim, dtype, precision, shard name,
  split, the shard's sha256 from the manifest, counts, and why each missing key is missing.

Work is split by shard: worker ``w`` of ``W`` takes shards ``w, w + W, ...`` of the manifest,
where ``w = task_index * world_size + rank`` combines a SLURM array task (or ``--task-index``)
with an ``accelerate launch``/``torchrun`` rank, so no two workers write the same file. Finished,
verified outputs are skipped; files are written under a temporary name and renamed.
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pathgan.data.format import load_manifest
from pathgan.data.reading import ShardSamples, collate_samples, index_shard, shard_keys
from pathgan.errors import PathganError
from pathgan.fileio import atomic_path, sha256_file
from pathgan.images import uint8_to_signed

FORMAT = "pathgan-embeddings/1"
EMBEDDINGS_DIR = "embeddings"
DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_MISSING = 0.05


# -- where things are -------------------------------------------------------------------------
def embeddings_dir(shards_dir: str | Path, encoder_id: str) -> Path:
    return Path(shards_dir) / EMBEDDINGS_DIR / encoder_id


def embedding_path(shards_dir: str | Path, encoder_id: str, shard_name: str) -> Path:
    return embeddings_dir(shards_dir, encoder_id) / (Path(shard_name).stem + ".npz")


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


# -- checking and reading outputs -------------------------------------------------------------
def read_embedding_file(path: str | Path) -> dict:
    """One output file -> {keys, embeddings, missing_keys, meta (dict)}; numpy only, no pickle."""
    with np.load(path, allow_pickle=False) as data:
        return {
            "keys": [str(key) for key in data["keys"]],
            "embeddings": data["embeddings"],
            "missing_keys": [str(key) for key in data["missing_keys"]],
            "meta": json.loads(str(data["meta"])),
        }


def load_embedding_file(path: Path) -> tuple[dict | None, str | None]:
    """``(contents, None)``, or ``(None, what is wrong)`` when the file is absent or unreadable."""
    if not path.is_file():
        return None, "no embedding file"
    try:
        return read_embedding_file(path), None
    except Exception as error:
        return None, f"unreadable ({type(error).__name__}: {error})"


def check_embedding_file(path: Path, shard: dict, encoder_id: str,
                         keys: list[str] | None = None) -> str | None:
    """None when ``path`` is a complete, aligned output for ``shard``; else what is wrong.

    ``keys``: the shard's keys in tar order (read from the tar when not given).
    """
    data, problem = load_embedding_file(path)
    return problem or check_embedding_data(data, path, shard, encoder_id, keys)


def check_embedding_data(data: dict, path: Path, shard: dict, encoder_id: str,
                         keys: list[str] | None = None) -> str | None:
    """:func:`check_embedding_file` on contents already read from ``path``."""
    meta, array = data["meta"], data["embeddings"]
    if meta.get("encoder_id") != encoder_id:
        return f"written by encoder {meta.get('encoder_id')}, not {encoder_id}"
    if shard.get("sha256") and meta.get("source_sha256") != shard["sha256"]:
        return "the shard changed since its embeddings were computed (sha256 differs)"
    if array.dtype != np.float32 or array.ndim != 2 or array.shape[0] != len(data["keys"]):
        return f"embeddings are {array.dtype} {array.shape} for {len(data['keys'])} keys"
    if meta.get("dim") != array.shape[1]:
        return f"embeddings have dimension {array.shape[1]}, meta says {meta.get('dim')}"
    if not np.isfinite(array).all():
        return "embeddings contain NaN or infinity"
    if keys is None:
        keys = shard_keys(path.parents[2] / shard["name"])
    embedded, missing = set(data["keys"]), set(data["missing_keys"])
    if embedded & missing or len(embedded) + len(missing) != len(data["keys"]) + len(
        data["missing_keys"]
    ):
        return "keys are duplicated or listed both as embedded and missing"
    if [key for key in keys if key in embedded] != data["keys"] or embedded | missing != set(keys):
        return (
            f"keys are not aligned with the shard ({len(data['keys'])} embedded + "
            f"{len(data['missing_keys'])} missing, the shard has {len(keys)})"
        )
    return None


def _encoder_id(encoder) -> str:
    if hasattr(encoder, "encoder_id"):
        return encoder.encoder_id
    from pathgan.encoders import resolve_encoder_id

    return resolve_encoder_id(str(encoder))


def verify_embeddings(shards_dir: str | Path, encoder) -> dict:
    """Check that every shard of a set has a complete, aligned embedding file.

    ``encoder``: an Encoder, an encoder spec, or an encoder id. Returns ``{"complete": bool,
    "encoder_id", "shards", "ok", "missing_keys", "problems": [{"shard", "problem"}]}``.
    """
    manifest = load_manifest(shards_dir)
    encoder_id = _encoder_id(encoder)
    problems, ok, missing, precisions = [], 0, 0, set()
    for shard in manifest["shards"]:
        path = embedding_path(shards_dir, encoder_id, shard["name"])
        data, problem = load_embedding_file(path)  # read once: checked, then counted
        try:
            problem = problem or check_embedding_data(data, path, shard, encoder_id)
        except PathganError as error:
            problem = str(error)
        if problem is None:
            ok += 1
            missing += len(data["missing_keys"])
            precisions.add(data["meta"].get("precision", "fp32"))
        else:
            problems.append({"shard": shard["name"], "problem": problem})
    return {"complete": not problems, "encoder_id": encoder_id,
            "shards": len(manifest["shards"]), "ok": ok, "missing_keys": missing,
            "precisions": sorted(precisions), "problems": problems}


def read_embeddings(shards_dir: str | Path, encoder_id, split: str | None = "train"
                    ) -> tuple[list[str], np.ndarray]:
    """A shard set's embeddings as ``(keys, float32 array (n, D))``, shards in manifest order.

    ``encoder_id``: an encoder id (or an Encoder, or a spec); ``split``: "train", "val" or None
    for all. Corrupt samples (``missing_keys``) are left out.
    """
    encoder_id = _encoder_id(encoder_id)
    manifest = load_manifest(shards_dir)
    shards = [s for s in manifest["shards"] if split is None or s["split"] == split]
    if not shards:
        raise PathganError(f"{shards_dir} has no {split or ''} shards".replace("  ", " "))
    keys: list[str] = []
    arrays = []
    for shard in shards:
        path = embedding_path(shards_dir, encoder_id, shard["name"])
        if not path.is_file():
            raise PathganError(
                f"{path} is missing: run `pathgan embed {shards_dir} --encoder SPEC` for encoder "
                f"{encoder_id}"
            )
        data = read_embedding_file(path)
        if shard.get("sha256") and data["meta"].get("source_sha256") != shard["sha256"]:
            raise PathganError(f"{path} is stale: {shard['name']} changed; rerun pathgan embed")
        keys.extend(data["keys"])
        arrays.append(data["embeddings"].astype(np.float32, copy=False))
    return keys, np.concatenate(arrays)


def stored_precision(shards_dir: str | Path, encoder_id: str, split: str | None = "train"
                     ) -> str:
    """The precision (fp32, bf16, fp16) the split's embeddings were computed in; a one-line
    error when its files disagree (they were made by runs with different ``--precision``)."""
    manifest = load_manifest(shards_dir)
    found = set()
    for shard in manifest["shards"]:
        if split is None or shard["split"] == split:
            path = embedding_path(shards_dir, encoder_id, shard["name"])
            with np.load(path, allow_pickle=False) as data:  # reads the meta member only
                found.add(json.loads(str(data["meta"])).get("precision", "fp32"))
    if len(found) != 1:
        raise PathganError(f"the embeddings of {encoder_id} in {shards_dir} were computed in "
                           f"different precisions ({', '.join(sorted(found)) or 'none'}); rerun "
                           "`pathgan embed` with one --precision")
    return found.pop()


# -- the job ----------------------------------------------------------------------------------
@dataclass
class _Pending:
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


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def encoder_precision(encoder, requested: str) -> str:
    """The precision an encoder really runs in: TensorFlow encoders are always float32."""
    return requested if hasattr(encoder, "set_precision") else "fp32"


def _write_output(item: _Pending, encoder, precision: str) -> int:
    keys_ok = [key for key, ok in zip(item.keys, item.ok, strict=True) if ok]
    missing = [key for key, ok in zip(item.keys, item.ok, strict=True) if not ok]
    meta = {
        "format": FORMAT,
        "encoder_id": encoder.encoder_id,
        "encoder_spec": getattr(encoder, "spec", ""),
        "dim": int(encoder.embed_dim),
        "dtype": "float32",
        "precision": encoder_precision(encoder, precision),
        "shard": item.shard["name"],
        "split": item.shard.get("split"),
        "source_sha256": item.shard["sha256"],
        "count": len(keys_ok),
        "missing": len(missing),
        "missing_reasons": {key: item.errors.get(key, "") for key in missing},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with atomic_path(item.output) as temporary, open(temporary, "wb") as handle:
        np.savez(
            handle,
            keys=np.array(keys_ok, dtype=str),
            embeddings=np.ascontiguousarray(item.embeddings[item.ok], dtype=np.float32),
            missing_keys=np.array(missing, dtype=str),
            meta=np.array(json.dumps(meta)),
        )
    return len(missing)


def _remove_stale_temporaries(output: Path) -> None:
    """Temporary files of an interrupted run for this worker's own outputs (never others')."""
    if output.parent.is_dir():
        for stale in output.parent.glob(f".{output.name}.tmp-*"):
            stale.unlink(missing_ok=True)


def embed_shards(shards_dir: str | Path, encoder, *, batch_size: int = DEFAULT_BATCH_SIZE,
                 task_index: int | None = None, num_tasks: int | None = None,
                 num_workers: int | None = None, precision: str = "fp32", device=None,
                 max_missing: float = DEFAULT_MAX_MISSING, progress: bool = True,
                 log=None) -> dict:
    """Embed this worker's shards of ``shards_dir`` with ``encoder`` (an Encoder or a spec).

    Returns a summary dict (see :func:`format_summary`). When a shard could not be read or more
    than ``max_missing`` of the samples were corrupt, ``summary["error"]`` says so (the CLI then
    exits non-zero); every good shard has been written by then.
    """
    from tqdm.auto import tqdm

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    started = time.perf_counter()
    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir)
    worker, workers = worker_assignment(task_index, num_tasks)
    mine = assigned_shards(manifest["shards"], worker, workers)
    device = torch.device(device) if device is not None else _default_device()
    if batch_size < 1:
        raise PathganError("--batch-size must be at least 1")

    # The id first: Path Foundation's comes without TensorFlow, so a finished job costs nothing
    # and DataLoader workers fork before TensorFlow starts its threads.
    loaded = encoder if isinstance(encoder, torch.nn.Module) else None
    spec = getattr(encoder, "spec", None) or str(encoder)
    if loaded is None and not spec.startswith("path-foundation"):
        loaded = _load(spec, device, precision, log)
    encoder_id = loaded.encoder_id if loaded is not None else _encoder_id(spec)

    summary = {"worker": worker, "num_workers": workers, "encoder_id": encoder_id,
               "output_dir": str(embeddings_dir(shards_dir, encoder_id)),
               "shards_assigned": len(mine), "shards_skipped": 0, "shards_written": 0,
               "shards_failed": [], "images": 0, "missing": [], "seconds": 0.0,
               "images_per_second": 0.0}
    pending: list[_Pending] = []
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
                summary["shards_skipped"] += 1
                continue
            if (actual or sha256_file(path)) != expected:
                raise PathganError("sha256 differs from the manifest (truncated or changed?)")
            start = sum(len(p.keys) for p in pending)
            pending.append(_Pending(shard, path, output, keys, start, entries))
        except PathganError as error:
            summary["shards_failed"].append({"shard": shard["name"], "reason": str(error)})
            log(f"pathgan embed: skipping {shard['name']}: {error}")

    if pending:
        dataset = ShardSamples([(p.path, p.entries) for p in pending])
        _run(dataset, pending, loaded, spec, device, batch_size, num_workers, precision,
             progress, worker, workers, summary, log, tqdm)

    summary["seconds"] = round(time.perf_counter() - started, 3)
    # the rate of the embedding loop itself (model loading and shard checks excluded)
    rate_seconds = summary.get("embed_seconds") or summary["seconds"]
    summary["images_per_second"] = round(summary["images"] / max(rate_seconds, 1e-9), 2)
    total = summary["images"] + len(summary["missing"])
    if summary["shards_failed"]:
        names = ", ".join(f["shard"] for f in summary["shards_failed"])
        count = len(summary["shards_failed"])
        summary["error"] = f"{count} shard(s) could not be embedded: {names}"
    elif total and len(summary["missing"]) / total > max_missing:
        summary["error"] = (f"{len(summary['missing'])} of {total} samples could not be decoded "
                            f"(above --max-missing {max_missing:.0%})")
    return summary


def _load(spec: str, device, precision: str, log):
    from pathgan.encoders import load_encoder

    encoder = load_encoder(spec, device=device, precision=precision)
    if precision != "fp32" and not hasattr(encoder, "set_precision"):
        log(f"pathgan embed: {spec} runs in float32 (TensorFlow); --precision {precision} "
            "applies to torch encoders only")
    return encoder


def _run(dataset, pending, encoder, spec, device, batch_size, num_workers, precision, progress,
         worker, workers, summary, log, tqdm) -> None:
    if num_workers is None:
        num_workers = min(4, max(0, (os.cpu_count() or 1) - 1))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collate_samples, pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
    )
    batches = iter(loader)  # workers start decoding now, while the encoder loads
    if encoder is None:
        encoder = _load(spec, device, precision, log)
    expected = summary["encoder_id"]
    if encoder.encoder_id != expected:
        raise PathganError(f"encoder id changed while loading: {expected} -> {encoder.encoder_id}")
    encoder = encoder.to(device).eval()
    if hasattr(encoder, "set_precision"):
        encoder.set_precision(precision)
    for item in pending:
        item.embeddings = np.zeros((len(item.keys), encoder.embed_dim), dtype=np.float32)
        item.ok = np.zeros(len(item.keys), dtype=bool)
    starts = [item.start for item in pending]
    total = len(dataset)
    position = worker if workers > 1 and worker < 8 else None
    bar = tqdm(total=total, unit="img", desc=f"embed {worker + 1}/{workers}", disable=not progress,
               position=position, dynamic_ncols=True, mininterval=1.0)
    next_to_write = 0
    compute_started = time.perf_counter()
    try:
        for indices, images, failures in batches:
            if images is not None:
                with torch.no_grad():
                    inputs = uint8_to_signed(images.to(device, non_blocking=True))
                    outputs = encoder(inputs).float().cpu().numpy()
                for row, index in enumerate(indices):
                    item = pending[np.searchsorted(starts, index, side="right") - 1]
                    item.embeddings[index - item.start] = outputs[row]
                    item.ok[index - item.start] = True
                    item.done += 1
            for index, error in failures:
                item = pending[np.searchsorted(starts, index, side="right") - 1]
                key = item.keys[index - item.start]
                item.errors[key] = error
                item.done += 1
                summary["missing"].append({"shard": item.shard["name"], "key": key,
                                           "reason": error})
                log(f"pathgan embed: corrupt sample {key} in {item.shard['name']}: {error}")
            summary["images"] += len(indices)
            bar.update(len(indices) + len(failures))
            while next_to_write < len(pending) and \
                    pending[next_to_write].done == len(pending[next_to_write].keys):
                item = pending[next_to_write]
                _write_output(item, encoder, precision)
                summary["shards_written"] += 1
                item.embeddings = None  # free it
                next_to_write += 1
    finally:
        bar.close()
        dataset.close()
        summary["embed_seconds"] = round(time.perf_counter() - compute_started, 3)
    for item in pending[next_to_write:]:  # only an empty shard can be left
        item.embeddings = np.zeros((0, encoder.embed_dim), np.float32)
        item.ok = np.zeros(0, bool)
        _write_output(item, encoder, precision)
        summary["shards_written"] += 1


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
