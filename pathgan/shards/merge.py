"""``pathgan shards merge``: the parts of an array-packed shard set made one shard set.

``slurm/pack.sbatch`` packs task i's inputs into ``OUT_DIR/parts/task-<i>/`` (a shard set of its
own) and then writes ``OUT_DIR/parts/task-<i>.done`` (JSON: task, num_tasks, inputs). Once every
task is done, the merge makes ``OUT_DIR`` one shard set: each part's tars are hard-linked (moved
where links are impossible) to ``OUT_DIR/<split>-<n>.tar`` numbered in task order, the
embeddings of a table's column (or of ``pathgan embed`` run on a part) are rewritten under the
new shard names, and ``OUT_DIR/manifest.json`` is written last, atomically.

The merged train/validation membership is that of one pack of all inputs: pack decides each
group's side from a hash of the group id alone, whatever task packed it.

It is idempotent: rerunning it re-links what is missing, drops shards of an older merge that are
no longer listed, and rewrites the manifest. With ``if_complete`` (what pack.sbatch uses) it
returns quietly while some task is still running; a lock folder makes sure only one task merges.
The parts stay (the tars are hard links, so they cost no space); ``rm -rf OUT_DIR/parts`` is
safe once the merge is done, but a rerun of the pack array would then repack everything.
"""

import hashlib
import os
import time
from collections import Counter
from pathlib import Path

from pathgan.core.errors import PathganError
from pathgan.core.fileio import read_json, write_json
from pathgan.shards.embedding_files import (
    EMBEDDINGS_DIR,
    embedding_path,
    embeddings_dir,
    read_embedding_file,
    write_embedding_file,
)
from pathgan.shards.format import (
    MANIFEST,
    SHARD_NAME,
    SPLITS,
    load_manifest,
    make_manifest,
    shard_name,
)
from pathgan.shards.sources import warn_small_validation

PARTS_DIR = "parts"
LOCK_TRIES = 600  # one a second: how long a task waits for another task's merge
STALE_LOCK_SECONDS = 3600  # a lock this old was left by a killed merge


def done_markers(parts_dir: Path) -> dict[int, dict]:
    return {int(marker["task"]): marker
            for marker in map(read_json, parts_dir.glob("task-*.done"))}


def place(src: Path, dst: Path) -> None:
    """Make dst the same file as src: a hard link, else a move."""
    if dst.exists():
        if src.exists() and os.path.samefile(src, dst):
            return
        dst.unlink()
    if not src.exists():
        raise PathganError(f"{src} is missing (a part changed after packing?)")
    try:
        os.link(src, dst)
    except OSError:
        os.replace(src, dst)


def carry_embeddings(part_dir: Path, out_dir: Path, old_name: str, new_name: str) -> set[str]:
    """Every embedding file of a part's shard, rewritten for its merged name (its meta names
    the shard); returns the encoder ids carried."""
    carried = set()
    for folder in sorted((part_dir / EMBEDDINGS_DIR).glob("*")):
        source = embedding_path(part_dir, folder.name, old_name)
        if source.is_file():
            data = read_embedding_file(source)
            missing = {key: data["meta"]["missing_reasons"].get(key, "")
                       for key in data["missing_keys"]}
            write_embedding_file(embedding_path(out_dir, folder.name, new_name), data["keys"],
                                 data["embeddings"], missing,
                                 {**data["meta"], "shard": new_name})
            carried.add(folder.name)
    return carried


def remove_unlisted(out_dir: Path, listed: set[str], encoder_ids: set[str]) -> None:
    """Shards (and their embeddings) of an older merge of other inputs."""
    for path in out_dir.glob("*.tar"):
        if SHARD_NAME.fullmatch(path.name) and path.name not in listed:
            path.unlink()
    for encoder_id in encoder_ids:
        for path in embeddings_dir(out_dir, encoder_id).glob("*.npz"):
            if f"{path.stem}.tar" not in listed:
                path.unlink()


def finished_tasks(parts_dir: Path, if_complete: bool) -> tuple[dict[int, dict], int] | None:
    """(marker of every task, number of tasks); None while some task runs (``if_complete``)."""
    markers = done_markers(parts_dir)
    if not markers:
        raise PathganError(f"{parts_dir} holds no finished task (task-<i>.done)")
    counts = {int(marker["num_tasks"]) for marker in markers.values()}
    if len(counts) != 1:
        raise PathganError(f"the parts disagree on the number of tasks: {sorted(counts)}")
    (num_tasks,) = counts
    missing = [task for task in range(num_tasks) if task not in markers]
    if missing and if_complete:
        print(f"merge: waiting for task(s) {missing[:20]} of {num_tasks}; the last one merges")
        return None
    if missing:
        raise PathganError(f"task(s) {missing} of {num_tasks} have not finished")
    return markers, num_tasks


def link_part(out_dir: Path, task: int, manifest: dict, counters: Counter
              ) -> tuple[list[dict], set[str]]:
    """Link one part's shards under their merged names, numbered on from ``counters`` (per
    split), with their embeddings; returns their manifest entries and the encoder ids."""
    part_dir = out_dir / PARTS_DIR / f"task-{task}"
    shards, encoder_ids = [], set()
    for shard in manifest["shards"]:
        name = shard_name(shard["split"], counters[shard["split"]])
        counters[shard["split"]] += 1
        place(part_dir / shard["name"], out_dir / name)
        encoder_ids |= carry_embeddings(part_dir, out_dir, shard["name"], name)
        shards.append({**shard, "name": name, "part": f"task-{task}/{shard['name']}"})
    return shards, encoder_ids


def merge_parts(out_dir: Path, markers: dict[int, dict], num_tasks: int) -> dict:
    """Link every part's shards into ``out_dir`` and write the merged manifest; returns it."""
    counters, labels = Counter(), Counter()
    shards, sources, skipped, fingerprints, parts, inputs = [], [], [], [], [], []
    options, embeddings, encoder_ids = None, None, set()
    for task in range(num_tasks):
        marker = markers[task]
        inputs += marker["inputs"]
        if not marker["inputs"]:
            parts.append({"task": task, "inputs": [], "shards": 0, "samples": 0})
            continue
        manifest = load_manifest(out_dir / PARTS_DIR / f"task-{task}")
        fingerprints.append(manifest.get("fingerprint", ""))
        linked, carried = link_part(out_dir, task, manifest, counters)
        shards += linked
        encoder_ids |= carried
        sources += manifest.get("sources", [])
        skipped += manifest.get("skipped", [])
        labels.update(manifest.get("labels", {}))
        if options is None:
            options = {k: v for k, v in manifest.get("config", {}).items() if k != "inputs"}
        if "embeddings" in manifest:
            embeddings = {k: v for k, v in manifest["embeddings"].items() if k != "check"}
        parts.append({"task": task, "inputs": marker["inputs"],
                      "fingerprint": manifest.get("fingerprint"),
                      "shards": len(manifest["shards"]), "samples": manifest["total_samples"],
                      **({"embeddings_check": manifest["embeddings"]["check"]}
                         if "embeddings" in manifest else {})})
    if not shards:
        raise PathganError("no task produced any shard")
    remove_unlisted(out_dir, {shard["name"] for shard in shards}, encoder_ids)
    groups = {split: len({s["group"] for s in sources if s.get("split") == split})
              for split in SPLITS}
    merged = make_manifest(
        shards, {"inputs": inputs, **(options or {})},
        fingerprint=hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()[:16],
        groups=groups, sources=sources, labels=dict(labels), skipped=skipped,
        merged_from={"num_tasks": num_tasks, "parts": parts},
        **({"embeddings": embeddings} if embeddings else {}))
    write_json(out_dir / MANIFEST, merged)
    print(f"merge: {merged['total_samples']} samples in {len(shards)} shards from {num_tasks} "
          f"task(s) -> {out_dir / MANIFEST}")
    print("merge: groups: " + ", ".join(f"{split} {count}" for split, count in groups.items()))
    warn_small_validation(groups, (options or {}).get("val_fraction", 0))
    return merged


def merge(out_dir: str | Path, if_complete: bool = False) -> dict | None:
    """Merge ``out_dir/parts`` into ``out_dir``, one merge at a time (a lock folder); None
    when ``if_complete`` and some task has not finished."""
    out_dir = Path(out_dir)
    if not (out_dir / PARTS_DIR).is_dir():
        raise PathganError(f"{out_dir / PARTS_DIR} holds no finished task (task-<i>.done)")
    lock = out_dir / PARTS_DIR / ".merge.lock"
    for _ in range(LOCK_TRIES):  # another task merging: wait for it, then merge again
        try:
            lock.mkdir()
            break
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > STALE_LOCK_SECONDS:
                    lock.rmdir()  # left by a killed merge
            except FileNotFoundError:
                continue
            time.sleep(1)
    else:
        raise PathganError(f"{lock} is held; remove it if no merge is running")
    try:
        finished = finished_tasks(out_dir / PARTS_DIR, if_complete)
        return merge_parts(out_dir, *finished) if finished else None
    finally:
        lock.rmdir()
