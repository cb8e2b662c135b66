"""``pathgan shards pack``: slides and patch folders -> WebDataset shards + manifest.json.

The job runs in three steps, each deterministic given the inputs and the options:

1. *discover*: expand the inputs into sources (slides, patch images with their labels);
2. *plan*: find every tissue patch of every slide (in worker processes), assign whole sources
   to train or validation, and cut each split into shards of bounded count and size;
3. *write*: worker processes write the shards; each lands atomically with a small record
   under ``DIR/.pack/``. A rerun recomputes the same plan, checks each finished shard against
   its record (checksum) and writes only what is missing, so a killed pack resumes.

The manifest is written last, from the records.
"""

import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pathgan.data import annotations as annotation_io
from pathgan.data import slides
from pathgan.data.format import (
    MANIFEST,
    SHARDS_FORMAT,
    SPLITS,
    encode_image,
    safe_key_part,
    shard_entry,
    shard_name,
    shard_writer,
)
from pathgan.errors import PathganError
from pathgan.fileio import read_json, sha256_file, write_json
from pathgan.images import IMAGE_SIZE

PATCH_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
RECORDS_DIR = ".pack"
# Upper bound of one sample in a shard: raw pixels plus tar headers and metadata. PNG and JPEG
# are smaller, so shards planned with it never exceed --max-bytes.
SAMPLE_BYTES_BOUND = IMAGE_SIZE * IMAGE_SIZE * 3 + 4096


@dataclass
class PackOptions:
    patch_sizes: list[int] = field(default_factory=lambda: [224])
    image_format: str = "png"  # png | jpg | npy ("raw" on the command line)
    jpeg_quality: int = 95
    workers: int = 2
    val_fraction: float = 0.0
    target_mpp: float | None = None  # tile at this µm/px instead of level-0 pixels
    slide_mpp: float | None = None  # override the slide's own level-0 µm/px
    overlap: float = 0.0
    min_tissue: float = 0.5
    min_saturation: int = 20
    annotations: str | None = None
    tumor_fraction: float = 0.0  # 0: a patch is tumour when its centre is inside a polygon
    group_pattern: str | None = None  # regex on patch file names; group 1 = the source id
    max_count: int = 1000
    max_bytes: int = 1 << 30
    max_skipped_fraction: float = 0.1

    def validate(self) -> None:
        if not self.patch_sizes or min(self.patch_sizes) < 8:
            raise PathganError("--patch-sizes must list sizes of at least 8 pixels")
        if self.image_format not in ("png", "jpg", "npy"):
            raise PathganError(f"--format must be png, jpg or raw, not {self.image_format!r}")
        checks = {
            "--val-fraction": 0.0 <= self.val_fraction < 1.0,
            "--overlap": 0.0 <= self.overlap < 1.0,
            "--min-tissue": 0.0 <= self.min_tissue <= 1.0,
            "--tumor-fraction": 0.0 <= self.tumor_fraction <= 1.0,
            "--workers": self.workers >= 1,
            "--max-count": self.max_count >= 1,
            "--max-bytes": self.max_bytes >= SAMPLE_BYTES_BOUND,
            "--jpeg-quality": 1 <= self.jpeg_quality <= 100,
            "--target-mpp": self.target_mpp is None or self.target_mpp > 0,
        }
        for flag, ok in checks.items():
            if not ok:
                raise PathganError(f"{flag} is out of range")
        if self.annotations and not Path(self.annotations).is_dir():
            raise PathganError(f"--annotations {self.annotations}: no such folder")
        if self.group_pattern:
            try:
                re.compile(self.group_pattern)
            except re.error as error:
                raise PathganError(f"--group-pattern is not a valid regex: {error}") from None

    @property
    def samples_per_shard(self) -> int:
        return max(1, min(self.max_count, self.max_bytes // SAMPLE_BYTES_BOUND))


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # "slide" | "image"
    label: str | None
    group: str  # the unit of the train/validation split


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


def _image_group(path: Path, options: PackOptions) -> str:
    if options.group_pattern:
        match = re.search(options.group_pattern, path.name)
        if match:
            return match.group(1) if match.groups() else match.group(0)
    return str(path)


def discover_sources(inputs: list[str], options: PackOptions) -> list[Source]:
    """Expand slide files and folders into sources; a missing input is a one-line error."""
    sources: list[Source] = []
    for raw in inputs:
        root = Path(raw)
        if not root.exists():
            raise PathganError(f"input {raw}: no such file or folder")
        if root.is_file():
            if _is_slide_file(root):
                sources.append(Source(str(root), "slide", None, str(root)))
            elif root.suffix.lower() in PATCH_IMAGE_EXTENSIONS:
                sources.append(Source(str(root), "image", None, _image_group(root, options)))
            else:
                raise PathganError(f"input {raw}: not a slide or a patch image")
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            if _is_slide_file(path):
                sources.append(Source(str(path), "slide", None, str(path)))
            elif path.suffix.lower() in PATCH_IMAGE_EXTENSIONS:
                # Patch images in a class sub-folder take the folder name as their label.
                label = path.parent.name if path.parent != root else None
                sources.append(Source(str(path), "image", label, _image_group(path, options)))
    return sources


# --- plan -----------------------------------------------------------------------------------


def _source_hash(path: str) -> str:
    return hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:8]


def plan_slide(source: Source, options: PackOptions) -> dict:
    """All tissue patches of one slide as sample records, or the reason it was skipped."""
    path = Path(source.path)
    try:
        slide = slides.open_slide(path)
        mpp, mpp_source = slides.slide_mpp(slide, options.slide_mpp)
        sizes = slides.level0_sizes(options.patch_sizes, options.target_mpp, mpp, path)
        windows, _, _ = slides.patch_windows(
            slide, sizes, IMAGE_SIZE, options.overlap, options.min_tissue, options.min_saturation
        )
        annotation_file = annotation_io.find_annotation(
            Path(options.annotations) if options.annotations else None, path
        )
        tumors = annotation_io.read_asap_xml(annotation_file) if annotation_file else None
    except Exception as error:  # an unreadable slide is skipped and reported, never fatal
        return {"source": source.path, "records": [], "skipped": _reason(error)}
    prefix = f"{safe_key_part(path.stem)}-{_source_hash(source.path)}"
    records = []
    for window in windows:
        label = None
        if tumors:
            label = tumors.label(window.x, window.y, window.size, options.tumor_fraction)
        elif options.annotations:
            label = "normal"  # a slide with no annotation file has no tumour
        records.append(
            {
                "key": f"{prefix}-s{window.size}-x{window.x}-y{window.y}",
                "source": source.path,
                "source_type": "slide",
                "level": window.level,
                "x": window.x,
                "y": window.y,
                "patch_size": window.size,
                "read_size": window.read_size,
                "mpp": mpp,
                "mpp_source": mpp_source,
                "output_mpp": mpp * window.size / IMAGE_SIZE if mpp else None,
                "label": label,
                "tissue_fraction": window.tissue_fraction,
            }
        )
    return {"source": source.path, "records": records, "skipped": None, "mpp": mpp}


def plan_image(source: Source) -> dict:
    path = Path(source.path)
    record = {
        "key": f"{safe_key_part(path.stem)}-{_source_hash(source.path)}",
        "source": source.path,
        "source_type": "image",
        "level": 0,
        "x": 0,
        "y": 0,
        "label": source.label,
    }
    return {"source": source.path, "records": [record], "skipped": None}


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def split_groups(groups: list[str], val_fraction: float) -> set[str]:
    """The groups that go to validation: a deterministic, hash-ordered share of them."""
    if val_fraction <= 0 or len(groups) < 2:
        return set()
    ordered = sorted(set(groups), key=lambda g: hashlib.sha1(g.encode()).hexdigest())
    count = min(len(ordered) - 1, max(1, round(val_fraction * len(ordered))))
    return set(ordered[:count])


@dataclass
class ShardJob:
    name: str
    split: str
    records: list[dict]
    out_dir: str
    fingerprint: str
    options: PackOptions


def plan_fingerprint(sources: list[Source], options: PackOptions) -> str:
    """Changes whenever the inputs or any option that shapes the shards change."""
    shaping = {k: v for k, v in asdict(options).items() if k not in ("workers",)}
    files = []
    for source in sources:
        stat = os.stat(source.path)
        files.append([source.path, source.label, source.group, stat.st_size, int(stat.st_mtime)])
    blob = json.dumps({"options": shaping, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_shards(plans: list[dict], sources: list[Source], options: PackOptions, out_dir: Path,
                fingerprint: str) -> list[ShardJob]:
    group_of = {source.path: source.group for source in sources}
    val_groups = split_groups([s.group for s in sources], options.val_fraction)
    by_split: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for plan in plans:
        split = "val" if group_of[plan["source"]] in val_groups else "train"
        by_split[split].extend({**record, "split": split} for record in plan["records"])
    jobs = []
    per_shard = options.samples_per_shard
    for split, records in by_split.items():
        for index, start in enumerate(range(0, len(records), per_shard)):
            jobs.append(
                ShardJob(shard_name(split, index), split, records[start : start + per_shard],
                         str(out_dir), fingerprint, options)
            )
    return jobs


# --- write ----------------------------------------------------------------------------------

_open_slides: dict[str, object] = {}


def _slide(path: str):
    if path not in _open_slides:
        if len(_open_slides) >= 4:  # a shard spans few slides; keep memory bounded
            _open_slides.pop(next(iter(_open_slides))).close()
        _open_slides[path] = slides.open_slide(path)
    return _open_slides[path]


def load_patch(record: dict) -> tuple:
    """Read one sample's 224x224 RGB pixels and complete its metadata."""
    if record["source_type"] == "slide":
        window = slides.PatchWindow(record["x"], record["y"], record["patch_size"],
                                    record["level"], record["read_size"],
                                    record["tissue_fraction"])
        return slides.read_patch(_slide(record["source"]), window, IMAGE_SIZE), record
    with Image.open(record["source"]) as image:
        image.load()
        width, height = image.size
        pixels = image.convert("RGB")
        if pixels.size != (IMAGE_SIZE, IMAGE_SIZE):
            pixels = pixels.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    return np.asarray(pixels), {**record, "patch_size": max(width, height),
                                "original_size": [width, height]}


def record_path(out_dir: Path, name: str) -> Path:
    return out_dir / RECORDS_DIR / f"{name}.json"


def write_shard(job: ShardJob) -> dict:
    """Write one shard atomically; returns its record (count, checksum, what was skipped)."""
    out_dir = Path(job.out_dir)
    skipped, per_source, labels = [], Counter(), Counter()
    count = 0
    with shard_writer(out_dir / job.name) as sink:
        for record in job.records:
            try:
                pixels, metadata = load_patch(record)
                image_bytes = encode_image(pixels, job.options.image_format,
                                           job.options.jpeg_quality)
            except Exception as error:  # a corrupt input is skipped and reported
                skipped.append({"path": record["source"], "key": record["key"],
                                "reason": _reason(error)})
                continue
            metadata = {k: v for k, v in metadata.items() if k != "key"}
            metadata["synthetic"] = False
            sink.write({"__key__": record["key"], job.options.image_format: image_bytes,
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


# --- the job --------------------------------------------------------------------------------


def _pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    # spawn: slide readers and torch do not survive fork reliably
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn")
    )


def _plan_all(sources: list[Source], options: PackOptions) -> list[dict]:
    slide_sources = [s for s in sources if s.kind == "slide"]
    plans = {s.path: plan_image(s) for s in sources if s.kind == "image"}
    if slide_sources:
        workers = min(options.workers, len(slide_sources))
        progress = tqdm(total=len(slide_sources), desc="tissue detection", unit="slide")
        if workers == 1:
            for source in slide_sources:
                plans[source.path] = plan_slide(source, options)
                progress.update()
        else:
            with _pool(workers) as pool:
                futures = {pool.submit(plan_slide, s, options): s for s in slide_sources}
                for future in concurrent.futures.as_completed(futures):
                    plans[futures[future].path] = future.result()
                    progress.update()
        progress.close()
    return [plans[s.path] for s in sources]


def _write_all(jobs: list[ShardJob], workers: int) -> list[dict]:
    records: dict[str, dict] = {}
    pending = []
    for job in jobs:
        record = finished_record(job)
        if record is None:
            pending.append(job)
        else:
            records[job.name] = record
    total = sum(len(job.records) for job in jobs)
    done = sum(record["samples"] + len(record["skipped"]) for record in records.values())
    if records:
        print(f"resuming: {len(records)} of {len(jobs)} shards already written and verified")
    with tqdm(total=total, initial=done, desc="packing", unit="patch") as progress:
        if workers == 1 or len(pending) <= 1:
            for job in pending:
                records[job.name] = write_shard(job)
                progress.update(len(job.records))
        else:
            with _pool(min(workers, len(pending))) as pool:
                futures = {pool.submit(write_shard, job): job for job in pending}
                for future in concurrent.futures.as_completed(futures):
                    job = futures[future]
                    records[job.name] = future.result()
                    progress.update(len(job.records))
    return [records[job.name] for job in jobs]


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
    for partial in [*out_dir.glob(".*.tmp-*"), *(out_dir / RECORDS_DIR).glob(".*.tmp-*")]:
        partial.unlink(missing_ok=True)
    planned = {job.name for job in jobs}
    for path in out_dir.glob("*.tar"):
        if path.name not in planned and re.fullmatch(r"(train|val)-\d{6}\.tar", path.name):
            path.unlink()
            record_path(out_dir, path.name).unlink(missing_ok=True)


def build_manifest(sources, plans, records, options, inputs, fingerprint) -> dict:
    skipped = [{"path": p["source"], "reason": p["skipped"]} for p in plans if p["skipped"]]
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
             **({"mpp": p.get("mpp")} if s.kind == "slide" else {})}
            for s, p in zip(sources, plans, strict=True)
        ],
        "labels": dict(labels),
        "skipped": skipped,
        "config": {"inputs": list(inputs), **asdict(options)},
    }


def _check_skip_threshold(manifest: dict, plans: list[dict], options: PackOptions) -> None:
    attempted = len(manifest["skipped"]) + manifest["total_samples"]
    attempted += sum(1 for p in plans if not p["skipped"] and p["records"] == [])
    fraction = len(manifest["skipped"]) / max(attempted, 1)
    if fraction > options.max_skipped_fraction:
        raise PathganError(
            f"{len(manifest['skipped'])} inputs could not be read ({fraction:.0%}, above "
            f"--max-skipped {options.max_skipped_fraction:.0%}); see 'skipped' in the manifest"
        )


def pack(inputs: list[str], out_dir: str | Path, options: PackOptions,
         overwrite: bool = False) -> dict:
    """Pack ``inputs`` into shards under ``out_dir``; returns the manifest."""
    options.validate()
    out_dir = Path(out_dir)
    sources = discover_sources(inputs, options)
    if not sources:
        raise PathganError(f"no slides or patch images found in {' '.join(inputs)}")
    fingerprint = plan_fingerprint(sources, options)
    _prepare_out_dir(out_dir, fingerprint, overwrite)
    plans = _plan_all(sources, options)
    jobs = plan_shards(plans, sources, options, out_dir, fingerprint)
    if not jobs:
        reasons = "; ".join(f"{Path(p['source']).name}: {p['skipped']}" for p in plans
                            if p["skipped"])[:500]
        raise PathganError(
            "no patches found (every slide was unreadable or had no tissue patch above "
            f"--min-tissue {options.min_tissue})" + (f": {reasons}" if reasons else "")
        )
    _remove_stale_shards(out_dir, jobs)
    records = _write_all(jobs, options.workers)
    manifest = build_manifest(sources, plans, records, options, inputs, fingerprint)
    write_json(out_dir / MANIFEST, manifest)
    if manifest["total_samples"] == 0:
        raise PathganError("every patch failed to read; see 'skipped' in the manifest")
    _check_skip_threshold(manifest, plans, options)
    return manifest
