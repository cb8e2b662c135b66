"""Tiny stand-ins for Hub models, laid out on disk like the real ones (plain functions).

``make_tiny_path_foundation(dir)`` writes a small Keras model with Path Foundation's serving
signature (224x224x3 float32 in [0, 1] -> ``output_0`` of 384) as a TensorFlow SavedModel in
the Hub repo's layout (``saved_model.pb`` + ``variables/`` at the root). It is built once per
process and copied, so every copy has the same weights and the same encoder id.
``install_in_hf_cache`` puts such a folder into a Hugging Face cache as a snapshot of a repo,
so that the real Hub code path (``snapshot_download`` with ``HF_HUB_OFFLINE=1``) finds it.
"""

import os
import shutil
import tempfile
from pathlib import Path

TINY_COMMIT = "0123456789abcdef0123456789abcdef01234567"
EMBED_DIM = 384
_cache: dict[str, Path] = {}


def _build(directory: Path, seed: int) -> None:
    from pathgan.encoders.path_foundation import import_tensorflow

    import_tensorflow()  # before keras: imports triton first (see import_tensorflow)
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((224, 224, 3)),
            keras.layers.Conv2D(8, 16, strides=16, activation="gelu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(EMBED_DIM),
        ]
    )
    # Keras 3's export writes a tf.saved_model with a ``serving_default`` signature whose output
    # is named ``output_0``: the same signature as Path Foundation's.
    model.export(str(directory), format="tf_saved_model", verbose=False)


def make_tiny_path_foundation(directory: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny SavedModel into ``directory`` (created); returns it."""
    key = f"seed{seed}"
    if key not in _cache:
        built = Path(tempfile.mkdtemp(prefix="pathgan-tiny-pf-")) / "model"
        _build(built, seed)
        _cache[key] = built
    directory = Path(directory)
    shutil.copytree(_cache[key], directory, dirs_exist_ok=True)
    return directory


def install_in_hf_cache(model_dir: str | os.PathLike, hub_cache: str | os.PathLike,
                        repo_id: str = "google/path-foundation", commit: str = TINY_COMMIT,
                        ref: str = "main") -> Path:
    """Copy a model folder into ``hub_cache`` as the snapshot ``commit`` of ``repo_id``."""
    repo_folder = Path(hub_cache) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_folder / "snapshots" / commit
    shutil.copytree(model_dir, snapshot, dirs_exist_ok=True)
    (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
    (repo_folder / "refs" / ref).write_text(commit)
    return snapshot
