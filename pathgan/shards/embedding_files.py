"""The on-disk format of precomputed embeddings: what ``pathgan embed`` writes, what training and
evaluation read, in one place.

One file per shard: ``SHARDS_DIR/embeddings/<encoder-id>/<shard stem>.npz``
(``train-000000.tar`` -> ``train-000000.npz``), readable with numpy alone (``np.load(path)``, no
pickle):

- ``keys``: str (n,), the keys embedded, in shard order;
- ``embeddings``: float32 (n, D), row i belongs to ``keys[i]``;
- ``missing_keys``: str (m,), samples that could not be decoded (corrupt), in shard order;
- ``meta``: a JSON string: format, encoder id and spec, dim, dtype, precision, shard name,
  split, the shard's sha256 from the manifest, counts, and why each missing key is missing.

A file is complete when its keys and missing keys together are exactly the shard's keys, in
shard order, and its ``source_sha256`` is the manifest's sha256 of the shard.
"""

import json
from pathlib import Path

import numpy as np

from pathgan.core.errors import PathganError
from pathgan.core.fileio import atomic_path, timestamp
from pathgan.encoders import resolve_encoder_id
from pathgan.shards.format import load_manifest
from pathgan.shards.reading import shard_keys

FORMAT = "pathgan-embeddings/1"
EMBEDDINGS_DIR = "embeddings"


# -- where they are ----------------------------------------------------------------------------
def embeddings_dir(shards_dir: str | Path, encoder_id: str) -> Path:
    return Path(shards_dir) / EMBEDDINGS_DIR / encoder_id


def embedding_path(shards_dir: str | Path, encoder_id: str, shard_name: str) -> Path:
    return embeddings_dir(shards_dir, encoder_id) / (Path(shard_name).stem + ".npz")


def embedded_encoders(shards_dir: str | Path) -> list[str]:
    """The encoder ids a shard set holds embeddings of (folders under ``embeddings/``)."""
    folder = Path(shards_dir) / EMBEDDINGS_DIR
    return sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []


def as_encoder_id(encoder) -> str:
    """The encoder id of an Encoder, an encoder spec, or an encoder id."""
    if hasattr(encoder, "encoder_id"):
        return encoder.encoder_id
    return resolve_encoder_id(str(encoder))


# -- one file ----------------------------------------------------------------------------------
def write_embedding_file(path: Path, keys: list[str], embeddings: np.ndarray,
                         missing: dict[str, str], meta: dict) -> None:
    """Write one shard's file atomically (it appears under its name only when complete): the
    keys embedded and their float32 rows, the keys missing (key -> why) in shard order, and
    ``meta`` (encoder id and spec, dim, precision, shard, split, source sha256, ...) completed
    with the format, dtype, counts and time."""
    meta = {**meta, "format": FORMAT, "dtype": "float32", "count": len(keys),
            "missing": len(missing), "missing_reasons": missing, "created": timestamp()}
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(
            handle,
            keys=np.array(keys, dtype=str),
            embeddings=np.ascontiguousarray(embeddings, dtype=np.float32),
            missing_keys=np.array(list(missing), dtype=str),
            meta=np.array(json.dumps(meta)),
        )


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


# -- a shard set's files -----------------------------------------------------------------------
def verify_embeddings(shards_dir: str | Path, encoder) -> dict:
    """Check that every shard of a set has a complete, aligned embedding file.

    ``encoder``: an Encoder, an encoder spec, or an encoder id. Returns ``{"complete": bool,
    "encoder_id", "shards", "ok", "missing_keys", "problems": [{"shard", "problem"}]}``.
    """
    manifest = load_manifest(shards_dir)
    encoder_id = as_encoder_id(encoder)
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
    encoder_id = as_encoder_id(encoder_id)
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
