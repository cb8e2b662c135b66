"""``pathgan eval``: score runs against held-out real patches and write what was found.

For each run, ``n`` patches are generated from its exported generator and ``n`` real patches are
drawn from the shard set's ``val`` split (``train`` when there is no ``val``; the JSON says which);
both go through the same frozen encoder and are compared (Fréchet distance, KID, k-NN
precision/recall), and on their pixels by the SWD; optionally by the classic Inception FID too.
A conditional run's patches are drawn in the real draw's class proportions and also scored per
class (:mod:`pathgan.evaluation.per_class`).
The grids' images (up to 64 a side) also give the upsampling-artefact figure (the spectral peak at
a generator's resampling periods, :func:`~pathgan.evaluation.metrics.upsampling_artefact`), the
real patches' as its floor.
Any number of ranks sees the same two sets and gets the same figures; rank 0 writes
``eval.json``, ``report.md`` (:mod:`pathgan.evaluation.report`) and the grids.
"""

import shutil
import time
from pathlib import Path

import torch

from pathgan.core.errors import PathganError
from pathgan.core.fileio import timestamp
from pathgan.core.hub import resolve_generator
from pathgan.core.images import save_image_grid, signed_to_uint8
from pathgan.evaluation.evaluator import (
    DEFAULT_ENCODER,
    eval_encoder_spec,
    load_eval_encoder,
    score_features,
)
from pathgan.evaluation.features import (
    DEFAULT_BATCH_SIZE,
    ENCODER,
    RealSet,
    encoder_extractor,
    fake_features,
    inception_extractor,
    real_features,
    select_real,
    swd_extractor,
)
from pathgan.evaluation.metrics import upsampling_artefact
from pathgan.evaluation.per_class import class_matched_labels, per_class_scores
from pathgan.evaluation.ranks import log_main, make_state
from pathgan.evaluation.report import summary_line, write_report
from pathgan.models import generate, noise_batch
from pathgan.runs import (
    GENERATOR_FILES,
    EvalDir,
    RunDir,
    generator_classes,
    load_generator,
    read_generator_config,
    require_generator,
)

FORMAT = "pathgan-eval/1"
GRID_COUNT = 64


def default_encoder_spec(run_dirs: list[Path]) -> str:
    """The encoder the runs name (``eval.encoder``, else ``model.encoder`` of their
    ``config.yaml``) when they agree, else :data:`DEFAULT_ENCODER` when none names one."""
    named = []
    for run in map(RunDir, run_dirs):
        if not run.has_config():  # a best/ folder or a Hub generator
            continue
        config = run.read_config()
        spec = eval_encoder_spec(config.eval.encoder, config.model.encoder, default=None)
        if spec and spec not in named:
            named.append(spec)
    if len(named) > 1:
        raise PathganError(f"the runs name different encoders ({', '.join(named)}): pass "
                           "--encoder SPEC so that they are compared in one space")
    return named[0] if named else DEFAULT_ENCODER


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
        return RunDir(sources[0].folder).eval_dir
    return Path(f"eval-{time.strftime('%Y%m%d-%H%M%S')}")


def evaluate_runs(run_dirs, real_shards, n: int, encoder_spec: str | None = None,
                  out_dir=None, seed: int = 0, *, batch_size: int = DEFAULT_BATCH_SIZE,
                  inception: bool = False, inception_weights=None, k: int = 3,
                  subsets: int = 100, subset_size: int = 1000, num_workers: int = 0) -> dict:
    """Evaluate runs against ``n`` real samples of ``real_shards``; write ``eval.json``,
    ``report.md`` and grids into ``out_dir`` (rank 0). Returns the eval.json dict (every rank).
    """
    state = make_state()
    sources = [resolve_generator(run, GENERATOR_FILES) for run in run_dirs]
    if not sources:
        raise PathganError("give at least one RUN_DIR")
    if n < k + 1:
        raise PathganError(f"-n must be at least {k + 1}")
    if batch_size < 1:
        raise PathganError("--batch-size must be at least 1")
    _check_generators([source.folder for source in sources])
    real = select_real(real_shards, n, seed)  # checks the shard set before loading any model
    spec = encoder_spec or default_encoder_spec([source.folder for source in sources])
    # Inception first: without its weights file it stops before the encoder is downloaded.
    inception_fid = [inception_extractor(inception_weights, state.device)] if inception else []
    encoder = load_eval_encoder(spec, state.device, state)
    extractors = [encoder_extractor(encoder), swd_extractor(n, seed), *inception_fid]
    source = "given" if encoder_spec else "default"
    log_main(state, f"pathgan eval: encoder {spec} ({source}), id {encoder.encoder_id}; "
                    f"{len(real)} real samples from {real.split}; {n} generated per run; "
                    f"{state.num_processes} process(es)")
    if real.note:
        log_main(state, f"pathgan eval: note: {real.note}")
    for source, name in zip(sources, _names(sources), strict=True):
        if trained_against(read_generator_config(source.folder), spec, encoder.encoder_id):
            log_main(state, f"pathgan eval: note: {name}'s discriminator trained against "
                            f"{encoder.encoder_id}, the encoder these figures are in, so FD/KID "
                            "favour it (Kynkaanniemi et al. 2023); --encoder another one for a "
                            "fair comparison")

    real_rows = real_features(real, extractors, state, batch_size=batch_size,
                              num_workers=num_workers)
    out = EvalDir(out_dir if out_dir is not None else default_out_dir(sources))
    real_spectrum = None
    if state.is_main_process:
        out.path.mkdir(parents=True, exist_ok=True)
        real_images = real_grid(real)
        save_image_grid(real_images, out.path / EvalDir.REAL_GRID)
        real_spectrum = spectral_figures(real_images.float())

    runs = []
    for source, name in zip(sources, _names(sources), strict=True):
        generator, model_config = load_generator(source.folder, state.device)
        classes = generator_classes(model_config)
        fake_labels = class_matched_labels(real.labels, classes, n) if classes else None
        fake_rows = fake_features(generator, n, extractors, state, nz=model_config["nz"],
                                  seed=seed, batch_size=batch_size, labels=fake_labels)
        scores = score_features(real_rows, fake_rows, state, k=k, subsets=subsets,
                                subset_size=subset_size, seed=seed)
        entry = {"run": source.pinned, **({"hub": source.hub} if source.hub else {}),
                 "name": name, "step": RunDir(source.folder).last_logged_step(), **scores,
                 "encoder": encoder.encoder_id, "real_split": real.split}
        if classes:
            entry["classes"] = _class_entry(real, real_rows, fake_rows, fake_labels, classes,
                                            state, k=k, subsets=subsets,
                                            subset_size=subset_size, seed=seed)
        if inception:
            entry["inception_encoder"] = extractors[-1].id
        if state.is_main_process:
            entry.update(_write_run_figures(generator, model_config["nz"], min(GRID_COUNT, n),
                                            seed, RunDir(source.folder), name, out))
            log_main(state, f"pathgan eval: {name}: " + summary_line(entry))
            for class_name, class_scores in entry.get("classes", {}).items():
                if "fd" in class_scores:
                    log_main(state, f"pathgan eval: {name} [{class_name}]: "
                                    + summary_line({**class_scores, "encoder": entry["encoder"]}))
        runs.append(entry)
        del generator

    result = {
        "format": FORMAT,
        "created": timestamp(),
        "encoder": encoder.encoder_id,
        "encoder_spec": spec,
        "real": {"shards": str(real.shards_dir), "split": real.split,
                 "n": len(real_rows[ENCODER]), "available": real.available,
                 "source": real.source.get(ENCODER), "note": real.note,
                 "grid": EvalDir.REAL_GRID, **(real_spectrum or {})},
        "n": n,
        "seed": seed,
        "processes": state.num_processes,
        "statistics": {"kid_subsets": subsets, "k": k,
                       "kid_subset_size": min(subset_size, n, len(real_rows[ENCODER]))},
        "runs": runs,
    }
    if state.is_main_process:
        write_report(result, out)
        for source in sources:
            if source.hub is None:  # push finds it from the run, wherever --out put it
                RunDir(source.folder).record_evaluation(out.result_path)
        log_main(state, f"pathgan eval: wrote {out.result_path} and {out.report_path}")
    state.wait_for_everyone()
    result["out_dir"] = str(out.path)
    return result


def trained_against(model_config: dict, spec: str, encoder_id: str) -> bool:
    """Whether a generator (its generator.json) was trained against this encoder: an Embedding
    GAN's discriminator judged it in that space."""
    return bool(model_config.get("encoder")) and (
        model_config.get("encoder_id") == encoder_id or model_config.get("encoder") == spec)


def _class_entry(real: RealSet, real_rows: dict, fake_rows: dict, fake_labels, classes,
                 state, **statistics) -> dict:
    """A conditional run's per-class scores, or a note saying why there are none."""
    if fake_labels is None:
        return {"note": f"no real sample of {real.split} has one of the run's classes "
                        f"({', '.join(classes)})"}
    if any(len(rows) != len(real) for rows in real_rows.values()):
        return {"note": "some real samples could not be read: no per-class scores"}
    return per_class_scores(real_rows, real.labels, fake_rows, fake_labels, classes, state,
                            **statistics)


def _check_generators(folders: list[Path]) -> None:
    """Every folder holds an exported generator: said before any model is loaded."""
    for folder in folders:
        if not folder.is_dir():
            raise PathganError(f"{folder}: no such run folder")
        require_generator(folder)


def real_grid(real: RealSet, count: int = GRID_COUNT) -> torch.Tensor:
    """The first ``count`` real samples as uint8 (N, 3, 224, 224), for the report."""
    images = [real.dataset[i][1] for i in range(min(count, len(real)))]
    return torch.stack([image for image in images if image is not None])


def spectral_figures(images: torch.Tensor) -> dict:
    """eval.json's upsampling-artefact keys for a set of images: the spectral peak and its
    period in pixels."""
    artefact = upsampling_artefact(images)
    return {"spectral_peak": artefact["peak"], "spectral_period": artefact["period"]}


def _write_run_figures(generator, nz: int, count: int, seed: int, run: RunDir, name: str,
                       out: EvalDir) -> dict:
    """A grid of the run's first ``count`` samples and a copy of its loss plot, into ``out``;
    the eval.json keys that name them."""
    images = generate(generator, noise_batch(count, nz, seed), batch_size=count)  # one batch
    save_image_grid(signed_to_uint8(images).cpu(), out.path / EvalDir.fake_grid(name))
    figures = {"fake_grid": EvalDir.fake_grid(name), **spectral_figures(images)}
    if run.loss_plot.is_file():
        shutil.copyfile(run.loss_plot, out.path / EvalDir.loss_plot(name))
        figures["loss_plot"] = EvalDir.loss_plot(name)
    return figures
