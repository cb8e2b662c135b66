"""Merge the parts of an array-packed shard set into one shard set.

    python slurm/merge_manifests.py OUT_DIR [--if-complete] [--keep-going]

slurm/pack.sbatch packs task i's inputs into ``OUT_DIR/parts/task-<i>/`` (a shard set of its
own) and then writes ``OUT_DIR/parts/task-<i>.done`` (JSON: task, num_tasks, inputs). Once every
task is done, this script makes ``OUT_DIR`` one shard set: each part's tars are hard-linked (moved
where links are impossible) to ``OUT_DIR/<split>-<n>.tar`` numbered in task order, and
``OUT_DIR/manifest.json`` is rewritten with the totals, written last and atomically.

The merged train/validation membership is that of one pack of all inputs: pack decides each
group's side from a hash of the group id alone, whatever task packed it. The merge prints the
number of groups per split and warns when validation has fewer than 5.

It is idempotent: rerunning it re-links what is missing, drops shards of an older merge that are
no longer listed, and rewrites the manifest. ``--if-complete`` (what pack.sbatch uses) exits 0
quietly while some task is still running; a lock directory makes sure only one task merges.
The parts stay (the tars are hard links, so they cost no space); ``rm -rf OUT_DIR/parts`` is
safe once the merge is done, but a rerun of the pack array would then repack everything.
Only the standard library: it must run wherever the batch script does.
"""

import argparse
import hashlib
import json
import os
import re
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"(train|val)-\d{6}\.tar")
MIN_VAL_GROUPS = 5  # as pathgan.data.pack: fewer validation groups give noisy figures


class MergeError(Exception):
    pass


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def done_markers(parts_dir: Path) -> dict[int, dict]:
    markers = {}
    for path in parts_dir.glob("task-*.done"):
        marker = read_json(path)
        markers[int(marker["task"])] = marker
    return markers


def place(src: Path, dst: Path) -> None:
    """Make dst the same file as src: a hard link, else a move."""
    if dst.exists():
        if src.exists() and os.path.samefile(src, dst):
            return
        dst.unlink()
    if not src.exists():
        raise MergeError(f"{src} is missing (a part changed after packing?)")
    try:
        os.link(src, dst)
    except OSError:
        os.replace(src, dst)


def merge(out_dir: Path, if_complete: bool) -> int:
    parts_dir = out_dir / "parts"
    markers = done_markers(parts_dir) if parts_dir.is_dir() else {}
    if not markers:
        raise MergeError(f"{parts_dir} holds no finished task (task-<i>.done)")
    num_tasks = {int(m["num_tasks"]) for m in markers.values()}
    if len(num_tasks) != 1:
        raise MergeError(f"the parts disagree on the number of tasks: {sorted(num_tasks)}")
    (num_tasks,) = num_tasks
    missing = [i for i in range(num_tasks) if i not in markers]
    if missing:
        if if_complete:
            print(f"merge: waiting for task(s) {missing[:20]} of {num_tasks}; the last one merges")
            return 0
        raise MergeError(f"task(s) {missing} of {num_tasks} have not finished")

    counters: Counter = Counter()
    shards, sources, skipped, fingerprints, parts, inputs = [], [], [], [], [], []
    labels: Counter = Counter()
    options = None
    for task in range(num_tasks):
        marker = markers[task]
        inputs += marker["inputs"]
        part_dir = parts_dir / f"task-{task}"
        if not marker["inputs"]:
            parts.append({"task": task, "inputs": [], "shards": 0, "samples": 0})
            continue
        manifest = read_json(part_dir / MANIFEST)
        fingerprints.append(manifest.get("fingerprint", ""))
        for shard in manifest["shards"]:
            split = shard["split"]
            name = f"{split}-{counters[split]:06d}.tar"
            counters[split] += 1
            place(part_dir / shard["name"], out_dir / name)
            shards.append({**shard, "name": name, "part": f"task-{task}/{shard['name']}"})
        sources += manifest.get("sources", [])
        skipped += manifest.get("skipped", [])
        labels.update(manifest.get("labels", {}))
        if options is None:
            options = {k: v for k, v in manifest.get("config", {}).items() if k != "inputs"}
        parts.append({"task": task, "inputs": marker["inputs"],
                      "fingerprint": manifest.get("fingerprint"),
                      "shards": len(manifest["shards"]), "samples": manifest["total_samples"]})
    if not shards:
        raise MergeError("no task produced any shard")

    listed = {s["name"] for s in shards}
    for path in out_dir.glob("*.tar"):
        if SHARD_RE.fullmatch(path.name) and path.name not in listed:
            path.unlink()  # left by an older merge of other inputs
    splits = sorted({s["split"] for s in shards} | {"train", "val"}, key=["train", "val"].index)
    groups = {split: len({s["group"] for s in sources if s.get("split") == split})
              for split in splits}
    merged = {
        "format": "pathgan-shards/1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": hashlib.sha256("\n".join(fingerprints).encode()).hexdigest()[:16],
        "total_samples": sum(s["samples"] for s in shards),
        "splits": {
            split: {"samples": sum(s["samples"] for s in shards if s["split"] == split),
                    "shards": sum(1 for s in shards if s["split"] == split),
                    "groups": groups[split]}
            for split in splits
        },
        "shards": shards,
        "sources": sources,
        "labels": dict(labels),
        "skipped": skipped,
        "config": {"inputs": inputs, **(options or {})},
        "merged_from": {"num_tasks": num_tasks, "parts": parts},
    }
    write_json_atomic(out_dir / MANIFEST, merged)
    print(f"merge: {merged['total_samples']} samples in {len(shards)} shards from {num_tasks} "
          f"task(s) -> {out_dir / MANIFEST}")
    print("merge: groups: " + ", ".join(f"{split} {count}" for split, count in groups.items()))
    if (options or {}).get("val_fraction", 0) > 0 and groups.get("val", 0) < MIN_VAL_GROUPS:
        print(f"merge: warning: the val split has {groups.get('val', 0)} group(s) (fewer than "
              f"{MIN_VAL_GROUPS}): its figures will be noisy", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--if-complete", action="store_true",
                        help="exit 0 without merging while some task has not finished")
    args = parser.parse_args(argv)
    lock = args.out_dir / "parts" / ".merge.lock"
    try:
        for _ in range(600):  # another task merging: wait for it, then merge again (idempotent)
            try:
                lock.mkdir()
                break
            except FileExistsError:
                try:
                    if time.time() - lock.stat().st_mtime > 3600:
                        lock.rmdir()  # left by a killed merge
                except FileNotFoundError:
                    continue
                time.sleep(1)
        else:
            raise MergeError(f"{lock} is held; remove it if no merge is running")
        try:
            return merge(args.out_dir, args.if_complete)
        finally:
            lock.rmdir()
    except (MergeError, OSError, KeyError, ValueError) as error:
        print(f"merge_manifests: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
