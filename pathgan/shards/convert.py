"""``pathgan shards convert``: a shard set re-encoded in another image format, nothing else changed.

Each shard of ``SRC`` is rewritten under the same name in ``DST``: every sample keeps its key and
its other members (the metadata, labels included), and its image member is decoded and encoded
again as PNG (lossless), JPEG (``--jpeg-quality``) or raw ``.npy`` pixels. The manifest keeps
the splits, groups, sources and labels of ``SRC`` (counts recomputed from what was written) and
says what it was converted from; embedding files (``embeddings/<encoder-id>/``) are carried for
the new shards (their checksum is the new shard's). Shards can then be chosen for how fast they
decode against how much disk they take (BENCHMARKS.md, "Shard formats") without reading the
slides again.

As ``pathgan shards pack``: shards land atomically, each with a record under ``DST/.convert/``;
a rerun keeps every shard whose record and checksum match and converts the rest; the manifest is
written last. Corrupt samples are skipped and listed (``skipped`` in the manifest); above
``--max-skipped`` of them the conversion fails after writing what it could.
"""

import concurrent.futures
import hashlib
import json
import multiprocessing
import shutil
import signal
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from pathgan.core.errors import PathganError, writing
from pathgan.core.fileio import read_json, sha256_file, write_json
from pathgan.shards.embedding_files import (
    EMBEDDINGS_DIR,
    embedded_encoders,
    embedding_path,
    read_embedding_file,
    write_embedding_file,
)
from pathgan.shards.format import (
    IMAGE_EXTENSIONS,
    MANIFEST,
    decode_sample_image,
    encode_image,
    load_manifest,
    make_manifest,
    shard_entry,
    shard_writer,
)
from pathgan.shards.reading import TarFormatError, tar_samples

RECORDS_DIR = ".convert"
#: manifest keys that make_manifest computes or takes by name; the others are carried as they are
MANIFEST_OWN_KEYS = ("format", "created", "fingerprint", "total_samples", "splits", "shards",
                     "sources", "labels", "skipped", "config", "converted_from")


@dataclass(frozen=True)
class ConvertJob:
    """One shard to convert (what a worker process needs, and nothing it cannot pickle)."""

    source: str  # the source shard's path
    target: str  # the converted shard's path
    shard: dict  # the source manifest's entry
    image_format: str  # png | jpg | npy
    jpeg_quality: int
    fingerprint: str  # of this shard's conversion
    encoder_ids: tuple[str, ...]  # embedding files of SRC to carry


def record_path(out_dir: Path, name: str) -> Path:
    return out_dir / RECORDS_DIR / f"{name}.json"


def shard_fingerprint(shard: dict, image_format: str, jpeg_quality: int) -> str:
    quality = jpeg_quality if image_format == "jpg" else None
    text = json.dumps([shard["sha256"], image_format, quality])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def convert_shard(job: ConvertJob) -> dict:
    """Write one converted shard (and its embedding files), atomically; returns its record."""
    target = Path(job.target)
    skipped, keys, labels = [], [], Counter()
    try:
        with shard_writer(target) as sink:
            for sample in tar_samples(job.source):
                key = sample["__key__"]
                try:
                    image = decode_sample_image(sample)
                except Exception as error:  # a corrupt sample: skipped and listed
                    skipped.append({"path": job.source, "key": key,
                                    "reason": f"{type(error).__name__}: {error}"})
                    continue
                members = {name: data for name, data in sample.items()
                           if name not in IMAGE_EXTENSIONS and name != "__url__"}
                members[job.image_format] = encode_image(image, job.image_format,
                                                         job.jpeg_quality)
                sink.write(members)
                keys.append(key)
                metadata = json.loads(sample["json"]) if "json" in sample else {}
                labels[str(metadata.get("label"))] += 1
    except (TarFormatError, OSError) as error:
        raise PathganError(f"{job.source} is not a readable tar ({error}); check the set "
                           "with `pathgan shards verify`") from None
    entry = shard_entry(target, job.shard["split"], len(keys))
    dropped = {item["key"] for item in skipped}
    for encoder_id in job.encoder_ids:  # before the record: a recorded shard has them
        carry_embedding_file(Path(job.source).parent, target.parent, encoder_id, entry,
                             dropped)
    record = {**entry, "fingerprint": job.fingerprint, "skipped": skipped,
              "labels": dict(labels)}
    write_json(record_path(target.parent, target.name), record)
    return record


def carry_embedding_file(src_dir: Path, out_dir: Path, encoder_id: str, entry: dict,
                         dropped: set[str]) -> None:
    """A shard's embedding file for its converted shard: the same rows, less those of the
    samples that were dropped (an embedding file lists exactly its shard's keys), checked
    against the new shard's sha256."""
    source = embedding_path(src_dir, encoder_id, entry["name"])
    if not source.is_file():
        return  # that shard was never embedded (a partial `pathgan embed`)
    data = read_embedding_file(source)
    kept = [row for row, key in enumerate(data["keys"]) if key not in dropped]
    missing = {key: data["meta"]["missing_reasons"].get(key, "")
               for key in data["missing_keys"] if key not in dropped}
    write_embedding_file(embedding_path(out_dir, encoder_id, entry["name"]),
                         [data["keys"][row] for row in kept], data["embeddings"][kept], missing,
                         {**data["meta"], "source_sha256": entry["sha256"]})


def finished_record(job: ConvertJob) -> dict | None:
    """The record of a shard already converted the same way, checked against its file."""
    target = Path(job.target)
    path = record_path(target.parent, target.name)
    if not (path.is_file() and target.is_file()):
        return None
    try:
        record = read_json(path)
    except (OSError, ValueError):
        return None
    if record.get("fingerprint") != job.fingerprint or record.get("sha256") != sha256_file(target):
        return None
    return record


def converted_manifest(source: dict, records: list[dict], src_dir: Path, image_format: str,
                       jpeg_quality: int, fingerprint: str) -> dict:
    """``SRC``'s manifest for the converted shards: new sizes, checksums and counts; the same
    splits, groups, sources and extra keys; labels counted again; what it came from."""
    splits = source.get("splits", {})
    groups = ({split: info["groups"] for split, info in splits.items()}
              if splits and all("groups" in info for info in splits.values()) else None)
    labels = None
    if "labels" in source:
        labels = Counter()
        for record in records:
            labels.update(record["labels"])
    # A source shard that counted its labels (pack does) keeps them, counted again.
    counted = {shard["name"] for shard in source["shards"] if "labels" in shard}
    entries = [{**{k: r[k] for k in ("name", "split", "samples", "bytes", "sha256")},
                **({"labels": dict(sorted(r["labels"].items()))} if r["name"] in counted
                   else {})} for r in records]
    return make_manifest(
        entries,
        {**source.get("config", {}), "image_format": image_format,
         "jpeg_quality": jpeg_quality},
        fingerprint=fingerprint, groups=groups, sources=source.get("sources"),
        labels=dict(labels) if labels is not None else None,
        skipped=source.get("skipped", []) + [s for r in records for s in r["skipped"]],
        converted_from={"path": str(src_dir), "fingerprint": source.get("fingerprint"),
                        "image_format": source.get("config", {}).get("image_format")},
        **{k: v for k, v in source.items() if k not in MANIFEST_OWN_KEYS},
    )


def prepare_out_dir(src_dir: Path, out_dir: Path, fingerprint: str, overwrite: bool) -> None:
    if out_dir.resolve() == src_dir.resolve():
        raise PathganError("--out must be another folder than SRC (a conversion writes a new "
                           "shard set beside the old one)")
    manifest = out_dir / MANIFEST
    if manifest.is_file() and read_json(manifest).get("fingerprint") != fingerprint \
            and not overwrite:
        raise PathganError(f"{out_dir} already holds another shard set; choose another --out "
                           "or pass --overwrite")
    if overwrite and out_dir.exists():
        for path in [*out_dir.glob("*.tar"), manifest]:
            path.unlink(missing_ok=True)
        for folder in (RECORDS_DIR, EMBEDDINGS_DIR):
            shutil.rmtree(out_dir / folder, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for folder in [out_dir, out_dir / RECORDS_DIR, *(out_dir / EMBEDDINGS_DIR).glob("*")]:
        for partial in folder.glob(".*.tmp-*"):  # left by a killed run
            partial.unlink(missing_ok=True)


def refuse_same_format(source: dict, image_format: str, jpeg_quality: int) -> None:
    config = source.get("config", {})
    if config.get("image_format") == image_format and (
            image_format != "jpg" or config.get("jpeg_quality") == jpeg_quality):
        shown = "raw" if image_format == "npy" else image_format
        raise PathganError(f"the shards are {shown} already: nothing to convert")


def convert(src_dir: str | Path, out_dir: str | Path, image_format: str,
            jpeg_quality: int = 95, workers: int = 1, max_skipped: float = 0.1,
            overwrite: bool = False) -> dict:
    """Convert the shard set ``src_dir`` into ``out_dir`` with ``image_format`` (png, jpg or
    npy) images; returns the new manifest."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    if image_format not in ("png", "jpg", "npy"):
        raise PathganError(f"--format must be png, jpg or raw, not {image_format!r}")
    if not 1 <= jpeg_quality <= 100:
        raise PathganError(f"--jpeg-quality must be in 1..100, not {jpeg_quality}")
    source = load_manifest(src_dir)
    refuse_same_format(source, image_format, jpeg_quality)
    encoder_ids = tuple(embedded_encoders(src_dir))
    jobs = [ConvertJob(str(src_dir / shard["name"]), str(out_dir / shard["name"]), shard,
                       image_format, jpeg_quality,
                       shard_fingerprint(shard, image_format, jpeg_quality), encoder_ids)
            for shard in source["shards"]]
    fingerprint = hashlib.sha256("".join(job.fingerprint for job in jobs).encode()
                                 ).hexdigest()[:16]
    prepare_out_dir(src_dir, out_dir, fingerprint, overwrite)
    records = {job.target: record for job in jobs if (record := finished_record(job))}
    if records:
        print(f"resuming: {len(records)} of {len(jobs)} shards already converted and verified")
    pending = [job for job in jobs if job.target not in records]
    with writing(out_dir, kept=lambda: converted_shards_line(out_dir)):
        records.update(run_jobs(pending, workers, total=source["total_samples"],
                                done=sum(record["samples"] for record in records.values())))
    manifest = converted_manifest(source, [records[job.target] for job in jobs], src_dir,
                                  image_format, jpeg_quality, fingerprint)
    write_json(out_dir / MANIFEST, manifest)
    skipped = sum(len(records[job.target]["skipped"]) for job in jobs)
    if skipped > max_skipped * max(source["total_samples"], 1):
        raise PathganError(f"{skipped} of {source['total_samples']} samples could not be "
                           f"decoded (above --max-skipped {max_skipped:.0%}); see 'skipped' in "
                           f"{out_dir / MANIFEST}")
    return manifest


def converted_shards_line(out_dir: Path) -> str:
    """What a stopped conversion kept, in words: the shards a rerun checks and keeps."""
    count = len(list((out_dir / RECORDS_DIR).glob("*.json")))
    return f"{count} converted shard(s) in {out_dir} (the rerun checks and keeps them)"


def run_jobs(jobs: list[ConvertJob], workers: int, total: int, done: int) -> dict[str, dict]:
    """Convert ``jobs`` in ``workers`` processes (one shard each at a time), with a progress
    bar in samples; returns their records by target path."""
    records = {}
    with tqdm(total=total, initial=done, desc="converting", unit="patch") as progress:
        if workers <= 1:
            for job in jobs:
                records[job.target] = convert_shard(job)
                progress.update(job.shard["samples"])
            return records
        # spawn: the parent has torch loaded, whose threads do not survive fork reliably
        context = multiprocessing.get_context("spawn")
        # Ctrl-C is this process's: it says what was kept while the workers finish their shard
        with concurrent.futures.ProcessPoolExecutor(
                workers, mp_context=context, initializer=signal.signal,
                initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
            futures = {pool.submit(convert_shard, job): job for job in jobs}
            for future in concurrent.futures.as_completed(futures):
                job = futures[future]
                records[job.target] = future.result()
                progress.update(job.shard["samples"])
    return records
