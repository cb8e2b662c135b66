"""The options of ``pathgan shards pack``, checked before any work.

Worker processes receive them (pickled with each job), so this module, like every module the
workers import (``plan.py``, ``spool.py`` and what they import), imports no torch.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

from pathgan.core.errors import PathganError
from pathgan.shards.format import IMAGE_SIDE
from pathgan.shards.tables import TableColumns

PRECISIONS = ("fp32", "bf16", "fp16")
# Upper bound of one sample in a shard: raw pixels plus tar headers and metadata. PNG and JPEG
# are smaller, so shards planned with it never exceed --max-bytes.
SAMPLE_BYTES_BOUND = IMAGE_SIDE * IMAGE_SIDE * 3 + 4096


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
    label_fraction: float = 0.0  # 0: a patch takes the class whose polygon holds its centre
    labelled_only: bool = False  # leave out patches without a label
    group_pattern: str | None = None  # regex on file names; group 1 = the split group
    region_groups: int | None = None  # square regions of a slide as split groups (their side)
    seed: int = 0  # the order of samples in the shards
    max_count: int = 1000
    max_bytes: int = 1 << 30
    max_skipped_fraction: float = 0.1
    # Parquet tables (``tables.py``): the columns read, and who made the embedding column.
    image_column: str = "image"
    label_column: str | None = None
    group_column: str | None = None  # the split unit; default: one group per file
    embedding_column: str | None = None
    encoder: str | None = None  # the spec (or id) of the encoder that made the embeddings
    embedding_precision: str = "fp32"  # what the data set's embeddings were computed in
    embedding_tolerance: float = 1e-2  # median relative L2 against a recomputed sample

    def table_columns(self) -> TableColumns:
        return TableColumns(self.image_column, self.label_column, self.group_column,
                            self.embedding_column)

    def validate(self) -> None:
        if not self.patch_sizes or min(self.patch_sizes) < 8:
            raise PathganError("--patch-sizes must list sizes of at least 8 pixels")
        if self.image_format not in ("png", "jpg", "npy"):
            raise PathganError(f"--format must be png, jpg or raw, not {self.image_format!r}")
        checks = {
            "--val-fraction": 0.0 <= self.val_fraction < 1.0,
            "--overlap": 0.0 <= self.overlap < 1.0,
            "--min-tissue": 0.0 <= self.min_tissue <= 1.0,
            "--label-fraction": 0.0 <= self.label_fraction <= 1.0,
            "--region-groups": self.region_groups is None or self.region_groups >= 1,
            "--workers": self.workers >= 1,
            "--max-count": self.max_count >= 1,
            "--jpeg-quality": 1 <= self.jpeg_quality <= 100,
            "--target-mpp": self.target_mpp is None or self.target_mpp > 0,
            "--embedding-tolerance": self.embedding_tolerance > 0,
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
        if bool(self.embedding_column) != bool(self.encoder):
            raise PathganError("--embedding-column and --encoder go together: the column's "
                               "embeddings and the encoder that made them")
        if self.embedding_precision not in PRECISIONS:
            raise PathganError(f"--embedding-precision must be one of {', '.join(PRECISIONS)}")
        if self.max_bytes < SAMPLE_BYTES_BOUND:
            raise PathganError(f"--max-bytes must be at least {SAMPLE_BYTES_BOUND} (one sample)")

    def samples_per_shard(self) -> int:
        return max(1, min(self.max_count, self.max_bytes // SAMPLE_BYTES_BOUND))
