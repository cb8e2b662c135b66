"""What a pack reads, and which side of the train/validation split each part of it goes to.

*Sources*: the inputs expanded into slides, patch images and the files of parquet tables (one
source per split group of each), each with its *group*, the unit of the split: a slide's name, a
patch image's folder, group 1 of ``--group-pattern`` on a file's name, or a table's
``--group-column``. *The split*: a group goes to validation when a hash of its id alone falls
below ``--val-fraction``, so the same inputs give the same split however they are divided among
pack jobs (``slurm/pack.sbatch``, merged by ``merge.py``).
"""

import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pathgan.core.errors import PathganError
from pathgan.shards import annotations, slides
from pathgan.shards.format import SPLITS
from pathgan.shards.options import PackOptions
from pathgan.shards.patches import PATCH_IMAGE_EXTENSIONS
from pathgan.shards.tables import PatchTable, TableFile, row_groups

TABLE_EXTENSION = ".parquet"
# Fewer validation groups than this make validation figures noisy: say so.
MIN_VAL_GROUPS = 5


@dataclass(frozen=True)
class Source:
    path: str
    kind: str  # "slide" | "image" | "table" (a parquet file, or one group's rows of it)
    label: str | None
    group: str  # the unit of the train/validation split
    table: TableFile | None = None  # kind "table": the file, its columns and its name


# --- discover -------------------------------------------------------------------------------------


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


def unannotated_slide_label(options: PackOptions) -> str | None:
    """What a slide without an annotation file is (its source's label): ``normal`` beside
    CAMELYON16's tumour annotations, nothing beside named classes or without ``--annotations``."""
    if not options.annotations:
        return None
    return annotations.unannotated_label(Path(options.annotations))


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
    slide_label = unannotated_slide_label(options)
    for raw in inputs:
        if _is_table(raw):
            sources += table_sources(raw, options)
            continue
        root = Path(raw)
        if not root.exists():
            raise PathganError(f"input {raw}: no such file or folder")
        if root.is_file():
            if _is_slide_file(root):
                sources.append(_source(root, "slide", slide_label, options))
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
                sources.append(_source(path, "slide", slide_label, options))
            elif path.suffix.lower() in PATCH_IMAGE_EXTENSIONS:
                # Patch images in a class sub-folder take the folder name as their label.
                label = path.parent.name if path.parent != root else None
                sources.append(_source(path, "image", label, options))
    if options.labelled_only:  # patch images outside a class folder have no label
        sources = [s for s in sources if s.kind != "image" or s.label is not None]
    return sources


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


# --- the split ------------------------------------------------------------------------------------


def validation_share(group: str) -> float:
    """Where a group falls in [0, 1): a hash of its id alone."""
    return int(hashlib.sha256(group.encode()).hexdigest()[:16], 16) / 2**64


def is_validation_group(group: str, val_fraction: float) -> bool:
    return validation_share(group) < val_fraction


def split_of_sources(sources: list[Source], options: PackOptions) -> list[str]:
    return ["val" if is_validation_group(source.group, options.val_fraction) else "train"
            for source in sources]


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
