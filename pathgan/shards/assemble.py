"""Assembly: what each shard holds, each shard copied from the spools, and the manifest.

Each split's records are ordered by a seeded hash of their keys (``mixing_rank``: every stretch of
the order mixes sources, positions and patch sizes, whatever the input order) and the order is
cut into shards of bounded count and size (``plan_shards``). ``write_shard`` copies the encoded
bytes of its samples from the spools in that order (threads run several), lands the shard
atomically and then a small record of it under ``DIR/.pack/``; a rerun keeps every shard whose
record and checksum match. The manifest is made last, from the records.
"""

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pathgan.core.errors import PathganError
from pathgan.core.fileio import read_json, sha256_file, write_json
from pathgan.shards.embedding_files import embedding_path
from pathgan.shards.format import SPLITS, make_manifest, shard_entry, shard_name, shard_writer
from pathgan.shards.options import PackOptions
from pathgan.shards.plan import PLAN_FIELDS
from pathgan.shards.sources import Source
from pathgan.shards.spool import SpoolReader
from pathgan.shards.table_embeddings import ColumnEmbeddings, ShardEmbeddings

RECORDS_DIR = ".pack"
SPOOL_DIR = f"{RECORDS_DIR}/spool"


# --- what each shard holds ------------------------------------------------------------------------


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
    per_shard = options.samples_per_shard()
    for split in SPLITS:
        members = mixed_order(plans, splits, split, options.seed)
        for index, start in enumerate(range(0, len(members), per_shard)):
            jobs.append(ShardJob(shard_name(split, index), split,
                                 members[start : start + per_shard], plans, str(out_dir),
                                 fingerprint, options.image_format, embeddings))
    return jobs


# --- writing a shard ------------------------------------------------------------------------------


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


# --- the manifest ---------------------------------------------------------------------------------


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
        [{k: r[k] for k in ("name", "split", "samples", "bytes", "sha256", "labels")}
         for r in records],
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


def check_skip_threshold(manifest: dict, plans: list, options: PackOptions) -> None:
    attempted = len(manifest["skipped"]) + manifest["total_samples"]
    attempted += sum(1 for p in plans if not p.skipped and not len(p))
    fraction = len(manifest["skipped"]) / max(attempted, 1)
    if fraction > options.max_skipped_fraction:
        raise PathganError(
            f"{len(manifest['skipped'])} inputs could not be read ({fraction:.0%}, above "
            f"--max-skipped {options.max_skipped_fraction:.0%}); see 'skipped' in the manifest"
        )
