"""``pathgan eval``: how close a run's patches are to held-out real ones, in an encoder's space.

For each run, ``n`` patches are generated from its exported generator and ``n`` real patches are
drawn from the shard set's ``val`` split (``train`` when there is no ``val``; the JSON says which);
both go through the same frozen encoder and :mod:`pathgan.metrics` compares the two feature sets
(Fréchet distance, KID, k-NN precision/recall). Both sets are also compared on their pixels, with
the sliced Wasserstein distance on Laplacian-pyramid descriptors (SWD, which needs no weights).
Optionally the classic Inception FID too.

Work is split across ranks (``accelerate launch``): rank ``r`` of ``W`` takes the contiguous
slice ``[r * ceil(n/W), (r + 1) * ceil(n/W))`` of the sample indices, padded to the same length;
the features are gathered, padding dropped and rows put back in index order, and rank 0 computes
the statistics and broadcasts them. The noise of fake sample ``i`` is row ``i`` of one seeded
``(n, nz)`` matrix and the real samples are drawn with the same seed, so any number of ranks
sees the same two sets and gets the same figures.

Real features come from precomputed embeddings (``pathgan embed``) when they exist for the same
encoder id, else from the shard images.

:class:`InLoopEvaluator` is the same thing for the training loop: the real features are computed
once, then each call scores a generator module.
"""

import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pathgan.data.reading import collate_samples
from pathgan.errors import PathganError
from pathgan.fileio import atomic_path, write_json
from pathgan.images import IMAGE_SIZE, save_image_grid, signed_to_uint8, uint8_to_signed
from pathgan.models import noise_batch

__all__ = ["DEFAULT_ENCODER", "FORMAT", "InLoopEvaluator", "RealSet", "default_encoder_spec",
           "evaluate_runs", "fake_features", "inception_extractor", "make_state",
           "real_features", "real_split", "resolve_inception_weights", "select_real"]

FORMAT = "pathgan-eval/1"
DEFAULT_ENCODER = "timm:vit_small_patch16_224"
MIN_SAMPLES = 4  # k-NN precision/recall with k = 3 needs k + 1 samples a side
DEFAULT_BATCH_SIZE = 64
GRID_COUNT = 64
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 + INCEPTION_WEIGHTS)
INCEPTION_KEY = "fid_inception"


# -- processes ---------------------------------------------------------------------------------
def make_state():
    """The process state (one process, or a rank of ``accelerate launch``). With no GPU the
    processes form a gloo group (``cpu=True``); inside a training job the existing state."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def rank_slice(total: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``range(total)``; every share but the last has
    ``ceil(total / world)`` items (the last may have fewer, or none)."""
    per = math.ceil(total / world) if total else 0
    start = min(rank * per, total)
    return range(start, min(start + per, total))


def _gather_rows(indices: torch.Tensor, rows: torch.Tensor, per_rank: int, state) -> tuple:
    """Pad this rank's ``(index, row)`` pairs to ``per_rank``, gather every rank's, drop the
    padding and sort by index: ``(indices, rows)`` of the whole set, the same on every rank."""
    count = len(indices)
    if state.num_processes > 1:
        from accelerate.utils import gather

        device = state.device
        padded_index = torch.full((per_rank,), -1, dtype=torch.long, device=device)
        padded_rows = torch.zeros((per_rank, rows.shape[1]), dtype=torch.float32, device=device)
        padded_index[:count] = indices.to(device)
        padded_rows[:count] = rows.to(device, torch.float32)
        indices, rows = gather(padded_index), gather(padded_rows)
        keep = indices >= 0
        indices, rows = indices[keep], rows[keep]
    order = torch.argsort(indices)
    return indices[order].cpu(), rows[order].cpu()


def _broadcast(value, state):
    """``value`` of rank 0, on every rank."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _log(state, message: str) -> None:
    if state.is_main_process:
        print(message, file=sys.stderr, flush=True)


def _progress(state, total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="img", leave=False,
                disable=not state.is_main_process or not sys.stderr.isatty())


# -- feature extractors ------------------------------------------------------------------------
@dataclass
class _Extractor:
    """Generator-space images (float NCHW in [-1, 1]) and their indices in the set -> float32
    features (N, dim). Only the SWD descriptors depend on the indices."""

    name: str  # "encoder", "swd" or "inception"
    dim: int
    forward: object  # (images, indices) -> features
    id: str

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, indices) -> torch.Tensor:
        return self.forward(images, indices).float()


def _encoder_extractor(encoder) -> _Extractor:
    return _Extractor("encoder", int(encoder.embed_dim), lambda images, _: encoder(images),
                      encoder.encoder_id)


def swd_extractor(n: int, seed: int = 0) -> _Extractor:
    """Laplacian-pyramid descriptors of every image, for the SWD of a set of ``n`` images."""
    from pathgan.metrics import descriptors_per_image, laplacian_descriptors, swd_descriptor_dim

    per_image = descriptors_per_image(n)
    return _Extractor(
        "swd", swd_descriptor_dim(IMAGE_SIZE, per_image),
        lambda images, indices: laplacian_descriptors(images, indices, per_image, seed),
        f"laplacian-pyramid-7x7-{per_image}-per-image")


def resolve_inception_weights(path: str | Path | None = None) -> Path:
    """The local file of torch-fidelity's Inception weights (``--inception-weights`` or the torch
    hub cache); a one-line error saying where to put it when it is not there. Never downloads."""
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise PathganError(f"--inception-weights {path}: no such file (get it from "
                               f"{INCEPTION_URL})")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not cached.is_file():
        raise PathganError(f"Inception FID needs {INCEPTION_WEIGHTS} locally: download "
                           f"{INCEPTION_URL} to {cached} (or pass --inception-weights FILE)")
    return cached


def inception_extractor(weights: str | Path | None = None, device=None) -> _Extractor:
    """torchmetrics' FID Inception-v3 (2048-d pool features, the torch-fidelity port of the
    TensorFlow FID network) from a local weights file; fed uint8 images as FID expects."""
    path = resolve_inception_weights(weights)
    try:  # the file must be plain tensors: refuse anything else before torch-fidelity loads it
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PathganError(f"{path} is not an Inception weights file ({type(error).__name__})"
                           ) from error
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric = FrechetInceptionDistance(feature=2048, normalize=False,
                                          feature_extractor_weights_path=str(path))
    except ModuleNotFoundError as error:
        raise PathganError("Inception FID needs torch-fidelity: pip install torch-fidelity"
                           ) from error
    network = metric.inception.to(device or "cpu").eval()
    return _Extractor("inception", 2048, lambda images, _: network(signed_to_uint8(images)),
                      "inception-v3-compat--" + INCEPTION_WEIGHTS.removesuffix(".pth"))


# -- the real side -----------------------------------------------------------------------------
def real_split(shards_dir: str | Path) -> str:
    """``val`` when the shard set has validation samples, else ``train``."""
    from pathgan.data.format import load_manifest

    shards = load_manifest(shards_dir)["shards"]
    has_val = any(s["split"] == "val" and s["samples"] > 0 for s in shards)
    return "val" if has_val else "train"


@dataclass
class RealSet:
    """The real samples an evaluation compares against: a seeded draw of one split."""

    shards_dir: Path
    split: str
    keys: list[str]
    dataset: object  # pathgan.data.reading.ShardSamples over exactly these keys, in this order
    available: int  # samples in the split
    note: str = ""
    source: dict = field(default_factory=dict)  # extractor name -> "embeddings" | "images"

    def __len__(self) -> int:
        return len(self.keys)


def select_real(shards_dir: str | Path, n: int, seed: int = 0,
                split: str | None = None) -> RealSet:
    """Draw ``min(n, available)`` real samples of ``split`` (default: :func:`real_split`) with a
    seeded generator, kept in shard order."""
    from pathgan.data.format import load_manifest
    from pathgan.data.reading import ShardSamples, index_shard

    shards_dir = Path(shards_dir)
    manifest = load_manifest(shards_dir)
    note = ""
    if split is None:
        split = real_split(shards_dir)
        if split == "train":
            note = "no val split: real samples drawn from train (seen in training)"
    shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        raise PathganError(f"{shards_dir} has no {split} shards")
    entries = [(shards_dir / s["name"], index_shard(shards_dir / s["name"])) for s in shards]
    flat = [(i, j) for i, (_, items) in enumerate(entries) for j in range(len(items))]
    if len(flat) < MIN_SAMPLES:
        raise PathganError(f"{shards_dir} has {len(flat)} {split} samples; need at least "
                           f"{MIN_SAMPLES}")
    count = min(n, len(flat))
    chosen = sorted(np.random.default_rng(seed).choice(len(flat), count, replace=False))
    picked: dict[int, list] = {}
    for position in chosen:
        i, j = flat[position]
        picked.setdefault(i, []).append(entries[i][1][j])
    dataset = ShardSamples([(entries[i][0], items) for i, items in sorted(picked.items())])
    keys = [key for _, key, _ in dataset.items]
    if count < n:
        extra = f"only {count} {split} samples (asked for {n})"
        note = f"{note}; {extra}" if note else extra
    return RealSet(shards_dir, split, keys, dataset, len(flat), note)


def _precomputed(real: RealSet, encoder_id: str) -> torch.Tensor | None:
    """Rows of precomputed embeddings for ``real``'s keys, or None when they do not all exist."""
    from pathgan.data.embeddings import read_embeddings

    try:
        keys, array = read_embeddings(real.shards_dir, encoder_id, real.split)
    except PathganError:
        return None
    row = {key: i for i, key in enumerate(keys)}
    rows = [row[key] for key in real.keys if key in row]
    if len(rows) < len(real.keys) * 0.95:  # many keys missing: embeddings of another packing
        return None
    return torch.from_numpy(array[rows])


def real_features(real: RealSet, extractors: list[_Extractor], state, *,
                  batch_size: int = DEFAULT_BATCH_SIZE, num_workers: int = 0) -> dict:
    """``{extractor name: float32 (n_real, D)}`` on every rank, rows in ``real.keys`` order
    (corrupt samples dropped). The encoder's come from precomputed embeddings when possible."""
    features: dict[str, torch.Tensor] = {}
    todo = []
    for extractor in extractors:
        found = _precomputed(real, extractor.id) if extractor.name == "encoder" else None
        if found is not None:
            features[extractor.name] = found
            real.source[extractor.name] = "embeddings"
        else:
            todo.append(extractor)
            real.source[extractor.name] = "images"
    if not todo:
        return features

    mine = rank_slice(len(real), state.process_index, state.num_processes)
    per_rank = math.ceil(len(real) / state.num_processes)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(real.dataset, list(mine)), batch_size=batch_size,
        num_workers=num_workers, collate_fn=collate_samples,
    )
    indices, rows, errors = [], {e.name: [] for e in todo}, []
    with _progress(state, len(mine), "real features") as bar:
        for batch_indices, images, bad in loader:
            errors.extend(error for _, error in bad)
            bar.update(len(batch_indices) + len(bad))
            if images is None:
                continue
            images = uint8_to_signed(images.to(state.device))
            indices.extend(batch_indices)
            for extractor in todo:
                rows[extractor.name].append(extractor(images, batch_indices))
    if errors:
        print(f"pathgan eval: {len(errors)} real samples could not be decoded and were left "
              f"out (first: {errors[0]})", file=sys.stderr, flush=True)
    index_tensor = torch.tensor(indices, dtype=torch.long)
    for extractor in todo:
        mine_rows = (torch.cat(rows[extractor.name]) if rows[extractor.name]
                     else torch.zeros((0, extractor.dim)))
        _, features[extractor.name] = _gather_rows(index_tensor, mine_rows, per_rank, state)
    return features


def real_grid(real: RealSet, count: int = GRID_COUNT) -> torch.Tensor:
    """The first ``count`` real samples as uint8 (N, 3, 224, 224), for the report."""
    images = [real.dataset[i][1] for i in range(min(count, len(real)))]
    return torch.stack([image for image in images if image is not None])


# -- the fake side -----------------------------------------------------------------------------
def _module_device(module: torch.nn.Module, default) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device(default)


@torch.no_grad()
def fake_features(generator: torch.nn.Module, n: int, extractors: list[_Extractor], state, *,
                  nz: int | None = None, seed: int = 0,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """``{extractor name: float32 (n, D)}`` of ``n`` generated samples, on every rank; this rank
    generates its slice of the sample indices. The generator is put in eval mode for the call
    (BatchNorm running statistics) and restored afterwards."""
    nz = nz or getattr(generator, "nz", None) or getattr(
        getattr(generator, "module", None), "nz", None)
    if nz is None:
        raise ValueError("cannot tell the generator's nz: pass nz=")
    noise = noise_batch(n, nz, seed)
    mine = rank_slice(n, state.process_index, state.num_processes)
    device = _module_device(generator, state.device)
    was_training = generator.training
    generator.eval()
    rows = {e.name: [] for e in extractors}
    try:
        with _progress(state, len(mine), "generated features") as bar:
            for start in range(mine.start, mine.stop, batch_size):
                stop = min(start + batch_size, mine.stop)
                images = generator(noise[start:stop].to(device)).float()
                for extractor in extractors:
                    rows[extractor.name].append(extractor(images, range(start, stop)))
                bar.update(stop - start)
    finally:
        generator.train(was_training)
    indices = torch.arange(mine.start, mine.stop, dtype=torch.long)
    per_rank = math.ceil(n / state.num_processes)
    features = {}
    for extractor in extractors:
        mine_rows = (torch.cat(rows[extractor.name]) if rows[extractor.name]
                     else torch.zeros((0, extractor.dim)))
        _, features[extractor.name] = _gather_rows(indices, mine_rows, per_rank, state)
    return features


# -- statistics --------------------------------------------------------------------------------
def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def _score(real: dict, fake: dict, state, *, k: int, subsets: int, subset_size: int,
           seed: int) -> dict:
    """Statistics of every extractor's features, computed on rank 0 and sent to every rank."""
    result, error = None, None
    if state.is_main_process:
        from pathgan.metrics import (
            compare_features,
            frechet_distance,
            sliced_wasserstein_distance,
        )

        try:
            result = compare_features(real["encoder"], fake["encoder"], k=k, subsets=subsets,
                                      subset_size=subset_size, seed=seed)
            result.update(sliced_wasserstein_distance(real["swd"], fake["swd"], seed=seed))
            if "inception" in real:
                result[INCEPTION_KEY] = frechet_distance(real["inception"], fake["inception"])
            result = {key: _finite(value) for key, value in result.items()}
            result["swd_levels"] = {size: _finite(value)
                                    for size, value in result["swd_levels"].items()}
        except ValueError as problem:  # too few samples: every rank must hear of it, not hang
            error = str(problem)
    result, error = _broadcast((result, error), state)
    if error:
        raise PathganError(f"cannot score the samples: {error}")
    return result


def _load_encoder(spec_or_encoder, device, state):
    from pathgan.encoders import Encoder, load_encoder

    if isinstance(spec_or_encoder, Encoder):
        return spec_or_encoder
    with state.main_process_first():  # one download into the cache, the others read it
        return load_encoder(str(spec_or_encoder), device=device)


class InLoopEvaluator:
    """Scores a generator against cached real features, for evaluation every N training steps.

    ``evaluator = InLoopEvaluator(shards_dir, split=None, encoder=spec_or_Encoder, n=256,
    device=accelerator.device)``; then ``metrics = evaluator(generator)`` on **every** rank (the
    work is split across ranks and gathered; all ranks get the same dict):
    ``{"fd", "kid_mean", "kid_std", "precision", "recall", "swd", "swd_levels", "n", "n_real",
    "encoder", "real_split"}``. Pass the unwrapped (or EMA) generator; its train/eval mode is
    restored.
    The real features are computed on the first call (or by :meth:`prepare`) and kept; the
    fake noise is the same at every call, so successive figures are comparable.
    """

    def __init__(self, real_shards: str | Path, split: str | None = None, encoder=None,
                 n: int = 256, device=None, *, seed: int = 0,
                 batch_size: int = DEFAULT_BATCH_SIZE, k: int = 3, subsets: int = 100,
                 subset_size: int = 1000, num_workers: int = 0) -> None:
        self.state = make_state()
        self.device = torch.device(device) if device is not None else self.state.device
        self.real_shards = Path(real_shards)
        self.requested_split = split
        self.encoder = _load_encoder(encoder or DEFAULT_ENCODER, self.device, self.state)
        self.n, self.seed, self.batch_size = int(n), int(seed), int(batch_size)
        self.k, self.subsets, self.subset_size = k, subsets, subset_size
        self.num_workers = num_workers
        self.extractors = [_encoder_extractor(self.encoder), swd_extractor(self.n, self.seed)]
        self.real: RealSet | None = None
        self._real_features: dict | None = None

    def prepare(self) -> "InLoopEvaluator":
        """Draw the real samples and compute (or read) their features, once."""
        if self._real_features is None:
            self.real = select_real(self.real_shards, self.n, self.seed, self.requested_split)
            self._real_features = real_features(self.real, self.extractors, self.state,
                                                batch_size=self.batch_size,
                                                num_workers=self.num_workers)
        return self

    def __call__(self, generator: torch.nn.Module) -> dict:
        self.prepare()
        fake = fake_features(generator, self.n, self.extractors, self.state, seed=self.seed,
                             batch_size=self.batch_size)
        result = _score(self._real_features, fake, self.state, k=self.k, subsets=self.subsets,
                        subset_size=self.subset_size, seed=self.seed)
        return {**result, "encoder": self.encoder.encoder_id, "real_split": self.real.split}


# -- pathgan eval ------------------------------------------------------------------------------
def _run_config(run_dir: Path) -> dict:
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise PathganError(f"{path} is not valid YAML ({error})") from error


def eval_encoder_spec(eval_encoder: str | None, model_encoder: str | None,
                      default: str | None = DEFAULT_ENCODER) -> str | None:
    """The encoder an evaluation uses: ``eval.encoder``, else ``model.encoder``, else default."""
    return eval_encoder or model_encoder or default


def default_encoder_spec(run_dirs: list[Path]) -> str:
    """The encoder the runs name (``eval.encoder``, else ``model.encoder`` of their
    ``config.yaml``) when they agree, else :data:`DEFAULT_ENCODER` when none names one."""
    named = []
    for run_dir in run_dirs:
        config = _run_config(run_dir)
        spec = eval_encoder_spec((config.get("eval") or {}).get("encoder"),
                                 (config.get("model") or {}).get("encoder"), default=None)
        if spec and spec not in named:
            named.append(spec)
    if len(named) > 1:
        raise PathganError(f"the runs name different encoders ({', '.join(named)}): pass "
                           "--encoder SPEC so that they are compared in one space")
    return named[0] if named else DEFAULT_ENCODER


def _last_step(run_dir: Path) -> int | None:
    from pathgan.plots import read_metrics

    rows = read_metrics(run_dir / "metrics.jsonl")
    return rows[-1]["step"] if rows else None


def _names(sources) -> list[str]:
    """Short unique names: the run folder's, or the Hub repo's (not its cache folder's)."""
    names: list[str] = []
    for source in sources:
        base = (source.hub["repo"].split("/")[1] if source.hub
                else source.folder.resolve().name) or "run"
        name, i = base, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
    return names


def default_out_dir(sources) -> Path:
    """``RUN_DIR/eval`` for one run folder; ``./eval-YYYYmmdd-HHMMSS`` when comparing several
    or for a Hub generator (never inside the Hugging Face cache)."""
    if len(sources) == 1 and sources[0].hub is None:
        return sources[0].folder / "eval"
    return Path(f"eval-{time.strftime('%Y%m%d-%H%M%S')}")


def evaluate_runs(run_dirs, real_shards, n: int, encoder_spec: str | None = None,
                  out_dir=None, seed: int = 0, *, batch_size: int = DEFAULT_BATCH_SIZE,
                  inception: bool = False, inception_weights=None, k: int = 3,
                  subsets: int = 100, subset_size: int = 1000, num_workers: int = 0) -> dict:
    """Evaluate runs against ``n`` real samples of ``real_shards``; write ``eval.json``,
    ``report.md`` and grids into ``out_dir`` (rank 0). Returns the eval.json dict (every rank).
    """
    from pathgan.hub import resolve_generator

    state = make_state()
    sources = [resolve_generator(run) for run in run_dirs]
    run_dirs = [source.folder for source in sources]
    if not run_dirs:
        raise PathganError("give at least one RUN_DIR")
    if n < k + 1:
        raise PathganError(f"-n must be at least {k + 1}")
    if batch_size < 1:
        raise PathganError("--batch-size must be at least 1")
    from pathgan.models.export import GENERATOR_WEIGHTS, load_generator

    for run_dir in run_dirs:
        if not run_dir.is_dir():
            raise PathganError(f"{run_dir}: no such run folder")
        if not (run_dir / GENERATOR_WEIGHTS).is_file():
            raise PathganError(f"{run_dir} has no exported generator ({GENERATOR_WEIGHTS}); "
                               "train it first or point at a finished run folder")
    real = select_real(real_shards, n, seed)  # checks the shard set before loading any model
    spec = encoder_spec or default_encoder_spec(run_dirs)
    extractors = []
    if inception:
        extractors.append(inception_extractor(inception_weights, state.device))
    encoder = _load_encoder(spec, state.device, state)
    extractors[:0] = [_encoder_extractor(encoder), swd_extractor(n, seed)]
    source = "given" if encoder_spec else "default"
    _log(state, f"pathgan eval: encoder {spec} ({source}), id {encoder.encoder_id}; "
                f"{len(real)} real samples from {real.split}; {n} generated per run; "
                f"{state.num_processes} process(es)")
    if real.note:
        _log(state, f"pathgan eval: note: {real.note}")

    real_rows = real_features(real, extractors, state, batch_size=batch_size,
                              num_workers=num_workers)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(sources)
    names = _names(sources)
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_image_grid(real_grid(real), out_dir / "real.png")

    runs = []
    for source, name in zip(sources, names, strict=True):
        run_dir = source.folder
        generator, model_config = load_generator(run_dir, state.device)
        fake_rows = fake_features(generator, n, extractors, state, nz=model_config["nz"],
                                  seed=seed, batch_size=batch_size)
        scores = _score(real_rows, fake_rows, state, k=k, subsets=subsets,
                        subset_size=subset_size, seed=seed)
        entry = {"run": source.pinned, **({"hub": source.hub} if source.hub else {}),
                 "name": name, "step": _last_step(run_dir), **scores,
                 "encoder": encoder.encoder_id, "real_split": real.split}
        if inception:
            entry["inception_encoder"] = extractors[-1].id
        if state.is_main_process:
            noise = noise_batch(min(GRID_COUNT, n), model_config["nz"], seed)
            with torch.no_grad():
                images = generator(noise.to(state.device))
            save_image_grid(signed_to_uint8(images).cpu(), out_dir / f"{name}-fake.png")
            entry["fake_grid"] = f"{name}-fake.png"
            loss = run_dir / "loss.png"
            if loss.is_file():
                shutil.copyfile(loss, out_dir / f"{name}-loss.png")
                entry["loss_plot"] = f"{name}-loss.png"
            _log(state, f"pathgan eval: {name}: " + _summary(entry))
        runs.append(entry)
        del generator

    result = {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "encoder": encoder.encoder_id,
        "encoder_spec": spec,
        "real": {"shards": str(real.shards_dir), "split": real.split, "n": len(real_rows[
            "encoder"]), "available": real.available, "source": real.source.get("encoder"),
            "note": real.note, "grid": "real.png"},
        "n": n,
        "seed": seed,
        "processes": state.num_processes,
        "statistics": {"kid_subsets": subsets, "k": k, "kid_subset_size": min(
            subset_size, n, len(real_rows["encoder"]))},
        "runs": runs,
    }
    if state.is_main_process:
        write_json(out_dir / "eval.json", result)
        with atomic_path(out_dir / "report.md") as temporary:
            temporary.write_text(format_report(result))
        _log(state, f"pathgan eval: wrote {out_dir / 'eval.json'} and {out_dir / 'report.md'}")
    state.wait_for_everyone()
    result["out_dir"] = str(out_dir)
    return result


# -- reporting ---------------------------------------------------------------------------------
def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _levels(entry: dict) -> str:
    return ", ".join(f"{size} px {_number(value, 3)}"
                     for size, value in entry["swd_levels"].items())


def _summary(entry: dict) -> str:
    text = (f"FD {_number(entry['fd'])}, KID {_number(entry['kid_mean'])} ± "
            f"{_number(entry['kid_std'], 2)}, precision {_number(entry['precision'], 3)}, "
            f"recall {_number(entry['recall'], 3)} (n={entry['n']}, real {entry['n_real']}, "
            f"{entry['encoder']}); SWD {_number(entry['swd'], 4)} on pixels ({_levels(entry)})")
    if INCEPTION_KEY in entry:
        text += f", Inception FID {_number(entry[INCEPTION_KEY])}"
    return text


def format_report(result: dict) -> str:
    """``report.md``: a table comparing the runs, then per run the real grid, a generated grid
    and the loss plot side by side (image paths relative to the report)."""
    real = result["real"]
    inception = any(INCEPTION_KEY in run for run in result["runs"])
    lines = [
        "# pathgan eval",
        "",
        f"- encoder: `{result['encoder']}` (spec `{result['encoder_spec']}`)",
        f"- real: `{real['shards']}`, split `{real['split']}`, {real['n']} samples "
        f"(of {real['available']}), features from {real['source']}",
        f"- generated: {result['n']} per run, seed {result['seed']}, "
        f"{result['processes']} process(es), {result['created']}",
    ]
    if real["note"]:
        lines.append(f"- note: {real['note']}")
    header = ("| run | step | n | real n | FD ↓ | KID ↓ (mean ± std) | precision ↑ | recall ↑ "
              "| SWD ↓ |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if inception:
        header, rule = header + " Inception FID ↓ |", rule + "---:|"
    lines += ["", header, rule]
    for run in result["runs"]:
        row = (f"| {run['name']} | {run['step'] if run['step'] is not None else ''} | "
               f"{run['n']} | {run['n_real']} | {_number(run['fd'])} | "
               f"{_number(run['kid_mean'])} ± {_number(run['kid_std'], 2)} | "
               f"{_number(run['precision'], 3)} | {_number(run['recall'], 3)} | "
               f"{_number(run['swd'], 4)} |")
        if inception:
            row += f" {_number(run.get(INCEPTION_KEY))} |"
        lines.append(row)
    lines += ["", f"FD, KID, precision and recall in the space of `{result['encoder']}`; FD and "
              "KID: lower is better, 0 is the same distribution; precision (fidelity) and recall "
              "(coverage) in [0, 1]: higher is better. SWD needs no model: the sliced "
              "Wasserstein distance (x 1000) between 7x7 neighbourhoods of the Laplacian pyramids "
              "of the pixels (levels from 224 px down; per level in each run's summary), "
              "normalised by the real set's statistics; lower is better, 0 is the same "
              "distribution."]
    for run in result["runs"]:
        loss = f"![loss]({run['loss_plot']})" if run.get("loss_plot") else "(no loss.png)"
        lines += ["", f"## {run['name']}", "", f"`{run['run']}`: {_summary(run)}", "",
                  "| real | generated | losses |", "|---|---|---|",
                  f"| ![real]({real['grid']}) | ![generated]({run.get('fake_grid', '')}) | "
                  f"{loss} |"]
    return "\n".join(lines) + "\n"
