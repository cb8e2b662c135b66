"""A table's precomputed embeddings: checked against their encoder before any work, written beside
each shard.

A table's embedding column travels with its rows through the spools and is written beside each
shard in ``pathgan embed``'s format (``embeddings/<encoder-id>/<shard>.npz``, see
:mod:`pathgan.shards.embedding_files`), so the Embedding GAN trains on a packed table without
embedding it again. The column is checked first: the embeddings of rows spread over the tables are
recomputed with the encoder when it loads here (the one part of the pack that runs a network).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pathgan.core.errors import PathganError
from pathgan.core.images import uint8_to_signed
from pathgan.encoders import is_encoder_id, load_encoder, resolve_encoder_id
from pathgan.shards.embedding_files import embedding_path, write_embedding_file
from pathgan.shards.options import PackOptions
from pathgan.shards.sources import Source
from pathgan.shards.tables import TableRow, spread_rows

# Rows of a table whose embeddings are recomputed to check the column against its encoder.
EMBEDDING_CHECK_ROWS = 32


@dataclass(frozen=True)
class ColumnEmbeddings:
    """A table's precomputed embeddings: which column, made by which encoder, how checked."""

    column: str
    encoder_id: str
    spec: str
    dim: int
    precision: str
    check: dict  # the figures of the check against the encoder, or why it was not made

    def problem(self, vector: np.ndarray | None) -> str | None:
        """Why a row's embedding cannot be used (the sample is then listed as missing)."""
        if vector is None:
            return f"no embedding in column {self.column!r}"
        if vector.shape != (self.dim,):
            return f"a {vector.size}-d embedding where the column's are {self.dim}-d"
        if not np.isfinite(vector).all():
            return "the embedding holds NaN or infinity"
        return None


def load_column_encoder(spec: str) -> tuple[torch.nn.Module | None, str, str | None]:
    """(the encoder, its id, None), or (None, its id, why it cannot be loaded here): an encoder
    id given as is, a gated or uncached model offline, TensorFlow missing. Without even an id,
    the embeddings could not be told apart from any other encoder's: a one-line error."""

    if is_encoder_id(spec):
        return None, spec, "--encoder gives an encoder id, not a spec that can be loaded"
    try:
        encoder = load_encoder(spec, device="cpu")
        return encoder, encoder.encoder_id, None
    except (PathganError, ImportError, OSError) as error:
        why = str(error).splitlines()[0]
    try:
        return None, resolve_encoder_id(spec), why
    except (PathganError, ImportError, OSError) as error:
        raise PathganError(f"cannot tell which encoder --encoder {spec} is ({error}); pass its "
                           "encoder id instead (as `pathgan embed verify` prints it)") from None


def relative_differences(rows: list[TableRow], encoder) -> np.ndarray:
    """Per row: the L2 distance of its column embedding from the encoder's embedding of its
    image as packed, relative to the latter's length."""
    pixels = torch.from_numpy(np.stack([row.image for row in rows]))  # NHWC uint8, writable
    images = uint8_to_signed(pixels.permute(0, 3, 1, 2))
    with torch.no_grad():
        ours = encoder(images).float().cpu().numpy()
    theirs = np.stack([row.embedding for row in rows])
    return np.linalg.norm(theirs - ours, axis=1) / np.maximum(np.linalg.norm(ours, axis=1), 1e-12)


def check_against_encoder(rows: list[TableRow], encoder, options: PackOptions) -> dict:
    """Recompute the sampled rows' embeddings and refuse, with the measured difference, a
    column made another way: a discriminator would learn that difference instead of tissue.

    The median over rows is compared, since a preprocessing difference (another resize, other
    normalisation, another encoder) moves every row, while one odd row is noise."""
    column = options.embedding_column
    dims = {row.embedding.size for row in rows}
    if dims != {encoder.embed_dim}:
        raise PathganError(f"column {column!r} holds {'/'.join(map(str, sorted(dims)))}-d "
                           f"embeddings; {encoder.encoder_id} makes {encoder.embed_dim}-d ones")
    differences = relative_differences(rows, encoder)
    check = {"rows": len(rows), "median_relative_l2": float(np.median(differences)),
             "max_relative_l2": float(differences.max()),
             "tolerance": options.embedding_tolerance}
    if check["median_relative_l2"] > options.embedding_tolerance:
        raise PathganError(
            f"the embeddings in column {column!r} are not {encoder.encoder_id}'s of these "
            f"images: relative L2 difference median {check['median_relative_l2']:.2e} (max "
            f"{check['max_relative_l2']:.2e}) over {len(rows)} rows, above the tolerance "
            f"{options.embedding_tolerance:.0e}; other preprocessing or another encoder made "
            "them: embed the shards with `pathgan embed` instead")
    return check


def column_embeddings(sources: list[Source], options: PackOptions) -> ColumnEmbeddings | None:
    """The embedding column's provenance, checked on rows spread over the tables against the
    encoder when it loads here; when it does not, says so and goes on."""
    if not options.embedding_column:
        return None
    files = list({source.path: source.table for source in sources
                  if source.kind == "table"}.values())
    sampled = spread_rows(files, EMBEDDING_CHECK_ROWS)
    rows = [row for row in sampled if row.image is not None and row.embedding is not None]
    if not rows:
        raise PathganError(f"none of {len(sampled)} rows spread over the tables has both an "
                           f"image and an embedding in column {options.embedding_column!r}")
    encoder, encoder_id, why_not = load_column_encoder(options.encoder)
    if encoder is None:
        print(f"pathgan: warning: cannot load {options.encoder} here ({why_not}): the "
              f"embeddings of column {options.embedding_column!r} are written as "
              f"{encoder_id}'s unchecked", file=sys.stderr)
        check, dim = {"not_checked": why_not}, rows[0].embedding.size
    else:
        check, dim = check_against_encoder(rows, encoder, options), encoder.embed_dim
        print(f"embedding column {options.embedding_column!r} matches {encoder_id}: relative "
              f"L2 median {check['median_relative_l2']:.1e} over {check['rows']} rows "
              f"(tolerance {options.embedding_tolerance:.0e})")
    return ColumnEmbeddings(options.embedding_column, encoder_id, options.encoder, dim,
                            options.embedding_precision, check)


class ShardEmbeddings:
    """The column embeddings of one shard's samples, gathered in shard order, then written."""

    def __init__(self, column: ColumnEmbeddings) -> None:
        self.column = column
        self.keys: list[str] = []
        self.vectors: list[np.ndarray] = []
        self.missing: dict[str, str] = {}

    def add(self, key: str, vector: np.ndarray | None) -> None:
        problem = self.column.problem(vector)
        if problem:
            self.missing[key] = problem
        else:
            self.keys.append(key)
            self.vectors.append(vector)

    def write(self, out_dir: Path, shard: dict) -> None:
        column = self.column
        array = np.stack(self.vectors) if self.vectors else np.zeros((0, column.dim), np.float32)
        meta = {"encoder_id": column.encoder_id, "encoder_spec": column.spec, "dim": column.dim,
                "precision": column.precision, "column": column.column, "shard": shard["name"],
                "split": shard["split"], "source_sha256": shard["sha256"]}
        write_embedding_file(embedding_path(out_dir, column.encoder_id, shard["name"]),
                             self.keys, array, self.missing, meta)
