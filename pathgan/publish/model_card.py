"""The model card of a pushed generator: every figure is read from the run folder, none typed in.

:func:`read_run_facts` collects what a run wrote: its resolved ``config.yaml``, the step of the
exported generator, ``metrics.jsonl`` (the in-loop ``eval/*`` figures), ``best/best.json``, the
newest ``eval.json`` of ``pathgan eval`` that scored this generator, and the manifest fingerprint
of the shard set it trained on. :func:`render_card` turns them into the ``README.md`` of a Hub
model repo: YAML metadata, the recipe, the data, each figure with its n and its feature space,
and how to sample. Local paths and file names never reach the card.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from safetensors import safe_open

from pathgan.config import Config
from pathgan.core.errors import PathganError
from pathgan.core.fileio import read_json
from pathgan.encoders import parse_spec, resolve_encoder_id
from pathgan.runs import (
    BEST,
    CONFIG,
    GENERATOR_WEIGHTS,
    LOSS_PLOT,
    EvalDir,
    RunDir,
    generator_classes,
    read_generator_config,
    safe_class_folder,
)
from pathgan.shards.format import MANIFEST, load_manifest

#: Numbers of an evaluation that count samples or steps rather than score the generator.
BOOKKEEPING = ("step", "n", "n_real")
#: eval.json's per-class scores of a conditional generator: a table of their own
PER_CLASS = "classes"
UTILITY_WAYS = (("real", "real"), ("synthetic", "synthetic only (CAS)"),
                ("real+synthetic", "real + synthetic"),
                ("gan-test", "real, tested on synthetic (GAN-test)"))
#: What the repo gets besides the run's own files: the card, and the newest sample grid.
CARD, SAMPLE_GRID = "README.md", "samples.png"
TAGS = ["pathgan", "gan", "histopathology", "digital-pathology", "h-and-e"]
LICENSE_COMMENT = (
    "# license: fill in the licence of these weights (e.g. cc-by-4.0, apache-2.0 or other); "
    "the training data's licence may restrict it"
)


@dataclass
class Evaluation:
    """Figures of one evaluation of the generator, with what they were measured on."""

    title: str  # where they come from: `pathgan eval`, the in-loop evaluation, ...
    step: int | None
    figures: dict  # metric name -> number, None (not finite), or a list/dict of numbers
    n: int | None = None  # generated samples
    n_real: int | None = None
    encoder: str | None = None  # encoder id of the embedding-space figures
    inception_encoder: str | None = None
    real_split: str | None = None


@dataclass
class RunFacts:
    """What the card says, all of it read from the run folder."""

    config: Config  # the resolved training config, as the run saved it
    generator_dir: Path  # RUN_DIR, or RUN_DIR/best
    generator: dict  # generator.json
    generator_parameters: int
    step: int | None  # of the exported generator
    fingerprint: str | None  # the shard set's manifest fingerprint
    training_patches: int | None  # samples in the split it trained on
    encoder_id: str | None  # of model.encoder (Embedding GAN)
    evaluations: list[Evaluation] = field(default_factory=list)
    eval_file: tuple[dict, dict] | None = None  # (eval.json, this generator's entry in it)
    eval_searched: list[str] = field(default_factory=list)  # where an eval.json was looked for
    sample_grid: Path | None = None
    loss_plot: Path | None = None
    classes: list[str] | None = None  # a conditional generator's (generator.json)
    class_grids: dict[str, Path] = field(default_factory=dict)  # its newest grid per class
    utility: dict | None = None  # `pathgan utility`'s utility.json for this generator
    images_seen: int | None = None  # real images in the steps to the exported generator
    changes: list[dict] = field(default_factory=list)  # changes.jsonl records up to its step

    @property
    def best(self) -> bool:
        return self.generator_dir.name == BEST

    @property
    def mixed_precision(self) -> str:
        """What ran (recorded in generator.json since it was), and what the config asked."""
        asked = self.config.train.mixed_precision
        ran = self.generator.get("mixed_precision")
        if ran is None:
            return f"{asked} (what it resolved to was not recorded)" if asked == "auto" else asked
        return ran if ran == asked else f"{ran} (train.mixed_precision {asked})"


# -- reading the run ---------------------------------------------------------------------------
def read_run_facts(run_dir: str | Path, best: bool = False,
                   eval_path: str | Path | None = None) -> RunFacts:
    run = RunDir(run_dir)
    if not run.has_config():
        raise PathganError(f"{run.path} is not a pathgan run folder (no {CONFIG})")
    if run.preempted and not best:  # best/ is complete regardless
        raise PathganError(f"{run.path} was preempted before its end, so its exported generator "
                           "is not its last: resume it with --resume latest first, or push --best")
    generator_dir = run.best_dir if best else run.path
    if not (generator_dir / GENERATOR_WEIGHTS).is_file():
        what = "no best generator (eval.every was 0?)" if best else "no exported generator"
        raise PathganError(f"{run.path} has {what}: {generator_dir / GENERATOR_WEIGHTS} is "
                           "missing")
    config = run.read_config()
    best_record = run.read_best()
    fingerprint, patches = _shard_set_facts(config)
    generator = read_generator_config(generator_dir)
    facts = RunFacts(
        config=config,
        generator_dir=generator_dir,
        generator=generator,
        generator_parameters=_parameter_count(generator_dir / GENERATOR_WEIGHTS),
        step=best_record.get("step") if best else run.final_step(),
        fingerprint=fingerprint,
        training_patches=patches,
        # recorded at export since the Hub work; older runs: resolved from the spec
        encoder_id=generator.get("encoder_id") or _training_encoder_id(config),
        sample_grid=run.newest_sample_grid(),
        loss_plot=run.loss_plot if run.loss_plot.is_file() else None,
    )
    facts.classes = generator_classes(generator)
    if facts.classes:
        facts.class_grids = run.newest_class_sample_grids(facts.classes)
        facts.utility = _find_utility(run, generator_dir)
    if facts.step is not None:
        # recorded at export since resumes could change the batch; older runs: counted here
        facts.images_seen = generator.get("images_seen", run.images_seen(facts.step))
        facts.changes = [r for r in run.read_changes() if r["step"] <= facts.step]
    facts.eval_searched = _eval_places(run, generator_dir, eval_path)
    facts.eval_file = _find_eval(run, generator_dir, eval_path)
    if facts.eval_file:
        result, entry = facts.eval_file
        facts.evaluations.append(_from_eval_json(result, entry))
    in_loop = _in_loop_evaluation(run, best_record)
    if in_loop:
        facts.evaluations.append(in_loop)
    if best_record:
        facts.evaluations.append(_from_entry(f"Best in-loop evaluation (the generator kept in "
                                             f"{BEST}/)", best_record))
    return facts


def _parameter_count(weights: Path) -> int:
    with safe_open(str(weights), framework="pt") as tensors:  # reads the header, not the data
        names = tensors.keys()  # a safe_open handle is not iterable itself
        return sum(math.prod(tensors.get_slice(name).get_shape()) for name in names)


def _shard_set_facts(config: Config) -> tuple[str | None, int | None]:
    """The manifest fingerprint and the size of the trained split, when the set is still there."""
    if not (Path(config.data.shards) / MANIFEST).is_file():
        return None, None
    content = load_manifest(config.data.shards)
    split = content.get("splits", {}).get(config.data.split, {})
    return content.get("fingerprint"), split.get("samples")


def _training_encoder_id(config: Config) -> str | None:
    spec = config.model.encoder
    if config.model.kind != "embgan" or not spec:
        return None
    try:
        return resolve_encoder_id(spec)
    except PathganError:  # e.g. a Path Foundation copy that is gone: the card says so
        return None


def _eval_places(run: RunDir, generator_dir: Path, eval_path) -> list[str]:
    """Where :func:`_find_eval` looks, in words (for the line saying nothing was found)."""
    if eval_path is not None:
        return [str(eval_path)]
    folders = dict.fromkeys([run.path, generator_dir])
    return [place for folder in folders for place in
            (f"{folder}/*/{EvalDir.RESULT}", str(RunDir(folder).evaluations_path))]


def _find_eval(run: RunDir, generator_dir: Path, eval_path) -> tuple[dict, dict] | None:
    """The newest ``eval.json`` that scored this generator (``--eval`` or under the run)."""
    if eval_path is not None:
        candidates = [Path(eval_path)]
        if not candidates[0].is_file():
            raise PathganError(f"--eval {eval_path}: no such file")
    else:
        found = {*run.eval_results(), *RunDir(generator_dir).eval_results()}
        candidates = sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
    target = generator_dir.resolve()
    for path in candidates:
        result = read_json(path)
        for entry in result.get("runs", []):
            if entry.get("run") and Path(entry["run"]).resolve() == target:
                return result, entry
    if eval_path is not None:
        scored = ", ".join(entry.get("name", "?") for entry in read_json(eval_path).get("runs",
                                                                                         []))
        raise PathganError(f"--eval {eval_path} holds no evaluation of {generator_dir} "
                           f"(it scored: {scored or 'nothing'})")
    return None


def _find_utility(run: RunDir, generator_dir: Path) -> dict | None:
    """The run's ``utility.json`` (``pathgan utility``'s default place) when it scored this
    generator."""
    path = run.eval_dir / EvalDir.UTILITY_RESULT
    if not path.is_file():
        return None
    result = read_json(path)
    scored = result.get("run")
    return result if scored and Path(scored).resolve() == generator_dir.resolve() else None


def class_grid_name(name: str) -> str:
    """The repo's file of a class's newest sample grid."""
    return f"samples-{safe_class_folder(name)}.png"


def _is_figure(value) -> bool:
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_figure(item) for item in value)
    if isinstance(value, dict):
        return all(_is_figure(item) for item in value.values())
    return False


def _finite_or_none(value):
    """metrics.jsonl writes a non-finite float as the string "nan" or "inf"."""
    return None if isinstance(value, str) else value


def _from_entry(title: str, entry: dict, **overrides) -> Evaluation:
    """An evaluation from an eval.json run entry or best.json: every number but the
    bookkeeping is a figure, so metrics added later (``swd``, ``swd_levels``, ...) show too."""
    figures = {key: value for key, value in entry.items()
               if key not in (*BOOKKEEPING, PER_CLASS) and _is_figure(value)}
    fields = {"step": entry.get("step"), "n": entry.get("n"), "n_real": entry.get("n_real"),
              "encoder": entry.get("encoder"), "real_split": entry.get("real_split"),
              "inception_encoder": entry.get("inception_encoder"), **overrides}
    return Evaluation(title, figures=figures, **fields)


def _from_eval_json(result: dict, entry: dict) -> Evaluation:
    return _from_entry("`pathgan eval`", entry, encoder=entry.get("encoder") or result.get(
        "encoder"))


def _in_loop_evaluation(run: RunDir, best_record: dict) -> Evaluation | None:
    """The last ``eval/*`` row of metrics.jsonl. Its encoder id and real count are not logged
    per row; best.json, written by the same evaluator, records them."""
    rows = [row for row in run.read_metrics()
            if any(key.startswith("eval/") for key in row)]
    if not rows:
        return None
    last = rows[-1]
    values = {key.removeprefix("eval/"): _finite_or_none(value) for key, value in last.items()
              if key.startswith("eval/")}
    figures = {key: value for key, value in values.items() if key not in BOOKKEEPING}
    return Evaluation("Last in-loop evaluation", last["step"], figures, n=values.get("n"),
                      n_real=values.get("n_real", best_record.get("n_real")),
                      encoder=best_record.get("encoder"),
                      real_split=best_record.get("real_split"))


# -- writing the card --------------------------------------------------------------------------
def figure_text(value) -> str:
    """A figure as the card prints it (4 significant digits)."""
    if value is None:
        return "n/a (not finite)"
    if isinstance(value, dict):
        return ", ".join(f"{key}: {figure_text(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(figure_text(item) for item in value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def feature_space(metric: str, evaluation: Evaluation) -> str:
    """Where a figure was measured, in words."""
    if metric.startswith("swd"):
        return "on Laplacian-pyramid 7x7 neighbourhoods of pixels"
    if metric == "fid_inception":
        return f"in `{evaluation.inception_encoder or 'Inception-v3'}` pool features"
    if evaluation.encoder:
        return f"in `{evaluation.encoder}` embeddings"
    return "in the evaluation encoder's embeddings (id not recorded)"


def sample_counts(evaluation: Evaluation) -> str:
    """How many samples the figures of an evaluation stand on."""
    counts = f"n = {evaluation.n}" if evaluation.n is not None else "n not recorded"
    if evaluation.n_real is not None:
        counts += f" generated, {evaluation.n_real} real"
    if evaluation.real_split:
        counts += f" ({evaluation.real_split} split)"
    return counts


def public_encoder_spec(spec: str | None) -> str | None:
    """An encoder spec without a local folder: ``path-foundation:/dir`` is a local copy of the
    published Path Foundation, so it is written as ``path-foundation``."""
    if not spec:
        return spec
    return "path-foundation" if parse_spec(spec).location else spec


def card_metadata(config: Config) -> str:
    kind_tags = {"embgan": ["embedding-gan"], "r3gan": ["r3gan"]}.get(config.model.kind,
                                                                     ["dcgan"])
    metadata = {"library_name": "pathgan", "pipeline_tag": "unconditional-image-generation",
                "tags": [*TAGS, *kind_tags]}
    return f"---\n{yaml.safe_dump(metadata, sort_keys=False)}{LICENSE_COMMENT}\n---\n"


def _gan_title(model) -> str:
    if model.kind == "dcgan":
        return "DCGAN"
    if model.kind == "r3gan":
        return "modern GAN (R3GAN-style ResNets, relativistic loss with R1/R2)"
    return "Embedding GAN" + (" (hybrid: embedding and pixel discriminators)"
                              if model.hybrid else "")


def _discriminator_text(model, encoder_id: str | None) -> str:
    pixel = (f"`Conv2d` + `BatchNorm2d` + `LeakyReLU(0.2)` on pixels down to one logit, "
             f"ndf {model.ndf}")
    if model.kind == "dcgan":
        return pixel
    if model.kind == "r3gan":
        return (f"residual bottleneck blocks on pixels (grouped 3x3 convolutions, no "
                f"normalisation, low-pass downsampling) down to 7x7, one logit; ndf "
                f"{model.ndf}, up to {model.max_width} channels, {model.blocks} block(s) a stage")
    identity = f"id `{encoder_id}`" if encoder_id else "id not resolved here"
    text = (f"`Linear` layers {model.disc_hidden} on the embeddings of the frozen encoder "
            f"`{public_encoder_spec(model.encoder)}` ({identity}); dropout "
            f"{model.disc_dropout}, spectral norm {'on' if model.spectral_norm else 'off'}")
    if model.hybrid:
        text += (f"; plus the pixel discriminator ({pixel}); loss weights: embedding "
                 f"{model.embedding_weight}, pixel {model.pixel_weight}")
    return text


def _objective_text(model, train) -> str:
    if model.kind != "r3gan":
        return "non-saturating GAN loss: binary cross-entropy on discriminator logits"
    gamma = train.gamma if train.gamma_end is None else f"{train.gamma} -> {train.gamma_end}"
    return (f"relativistic pairing loss with R1 and R2 gradient penalties, gamma {gamma}, "
            f"taken every {train.penalty_every} step(s)")


def _generator_text(facts: RunFacts, ngf: int) -> str:
    parameters = f"{facts.generator_parameters:,} parameters"
    if facts.config.model.kind == "r3gan":
        model = facts.config.model
        return (f"residual bottleneck blocks, bilinear upsampling (no transposed convolution), "
                f"per-pixel noise from {model.noise_from} px, `Tanh` output, 224x224 RGB; nz "
                f"{facts.generator['nz']}, {ngf} channels at 224 px up to {model.max_width}; "
                f"{parameters}")
    return (f"`ConvTranspose2d` + `BatchNorm2d` + `ReLU`, `Tanh` output, 224x224 RGB; "
            f"nz {facts.generator['nz']}, ngf {ngf} ({16 * ngf} channels at 7x7 down "
            f"to {ngf} at 112x112); {parameters}")


def _optimizer_text(train) -> str:
    def span(start, end) -> str:
        return str(start) if end is None else f"{start} -> {end} (half a cosine)"

    return (f"Adam, lr {span(train.lr, train.lr_end)}, betas ({train.beta1}, "
            f"{span(train.beta2, train.beta2_end)})")


def recipe_rows(facts: RunFacts) -> list[tuple[str, str]]:
    model, train = facts.config.model, facts.config.train
    ngf = facts.generator["ngf"]
    ema = (f"on, half-life {train.ema_kimg} kimg, warm-up {train.ema_rampup} (the "
           "exported generator is the EMA copy)" if train.ema else "off")
    rows = [
        ("GAN", _gan_title(model)),
        ("objective", _objective_text(model, train)),
        ("generator", _generator_text(facts, ngf)),
        ("discriminator", _discriminator_text(model, facts.encoder_id)),
        ("batch", f"{train.batch_size} (global, across all processes)"),
        ("optimizer", _optimizer_text(train)),
        ("mixed precision", facts.mixed_precision),
        ("EMA", ema),
        ("augmentation", f"DiffAugment: {train.augment}" if train.augment else "none"),
    ]
    step = "not recorded" if facts.step is None else str(facts.step)
    seen = "not recorded" if facts.images_seen is None else f"{facts.images_seen:,}"
    rows += [("steps", step), ("images seen", f"{seen} (steps x the global batch of each)")]
    if facts.changes:
        rows.append(("changed on resume", "; ".join(
            f"at step {record['step']}: " + ", ".join(
                f"{key} {change['from']} -> {change['to']}"
                for key, change in record["changes"].items())
            for record in facts.changes)))
    return rows


def _data_text(facts: RunFacts) -> str:
    if facts.fingerprint is None:
        return ("Data set fingerprint: not recorded (the shard set named in the training "
                "config is no longer there).")
    size = ("" if facts.training_patches is None else
            f", {facts.training_patches:,} patches in its `{facts.config.data.split}` "
            "split")
    return (f"Trained on a pathgan shard set with manifest fingerprint `{facts.fingerprint}`"
            f"{size}. Paths and file names of the data are not published.")


def _evaluation_lines(evaluation: Evaluation) -> list[str]:
    step = f" at step {evaluation.step}" if evaluation.step is not None else ""
    counts = sample_counts(evaluation)
    lines = [f"### {evaluation.title}{step}", "", "| metric | value | samples | feature space |",
             "|---|---:|---|---|"]
    for metric, value in evaluation.figures.items():
        lines.append(f"| {metric} | {figure_text(value)} | {counts} | "
                     f"{feature_space(metric, evaluation)} |")
    return [*lines, ""]


def _classes_lines(facts: RunFacts) -> list[str]:
    """A conditional generator's classes: training patches per class and a grid of each."""
    if not facts.classes:
        return []
    counts = facts.generator.get("class_counts") or [None] * len(facts.classes)
    lines = ["## Classes", "",
             f"Class-conditional: it draws the class it is given. Classes in code order, with "
             f"their training patches (batches: {facts.generator.get('class_balance')}):", "",
             "| code | class | training patches | samples (the run's fixed noise) |",
             "|---:|---|---:|---|"]
    for code, (name, count) in enumerate(zip(facts.classes, counts, strict=True)):
        grid = f"![{name}]({class_grid_name(name)})" if name in facts.class_grids else ""
        lines.append(f"| {code} | {name} | {'' if count is None else count} | {grid} |")
    return [*lines, ""]


def per_class_lines(classes: dict) -> list[str]:
    """``pathgan eval``'s per-class scores (each class against the real patches of it)."""
    lines = ["### Per class (`pathgan eval`)", "",
             "| class | n | real n | FD | KID | precision | recall | SWD |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, scores in classes.items():
        if not isinstance(scores, dict) or "fd" not in scores:
            continue
        lines.append(f"| {name} | {scores['n']} | {scores['n_real']} | "
                     + " | ".join(figure_text(scores.get(key)) for key in (
                         "fd", "kid_mean", "precision", "recall", "swd")) + " |")
    return [*lines, ""]


def utility_lines(utility: dict) -> list[str]:
    """``pathgan utility``'s table: a fixed classifier trained each way, tested on real val."""
    def cell(way: str, metric: str) -> str:
        value = utility["summary"][way][metric]
        return f"{value['mean']:.3f} ± {value['std']:.3f}"

    lines = ["### Downstream utility (`pathgan utility`)", "",
             f"A fixed classifier ({utility['classifier']}; encoder `{utility['encoder']}`) "
             f"trained on each set and tested on the real val split, mean ± std over "
             f"{utility['seeds']} seeds. Real patches: train {utility['counts']['train']}, val "
             f"{utility['counts']['val']}.", "",
             "| trained on | balanced accuracy | AUROC |", "|---|---:|---:|"]
    for way, label in UTILITY_WAYS:
        lines.append(f"| {label} | {cell(way, 'balanced_accuracy')} | {cell(way, 'auroc')} |")
    return [*lines, "", *[f"- {finding}" for finding in utility.get("findings", [])], ""]


def sample_spec(repo_id: str, revision: str | None) -> str:
    return f"hf-hub:{repo_id}" + (f"@{revision}" if revision else "")


def render_card(facts: RunFacts, repo_id: str, revision: str | None = None) -> str:
    spec = sample_spec(repo_id, revision)
    lines = [card_metadata(facts.config), f"# {repo_id}", "",
             f"The generator of a pathgan {_gan_title(facts.config.model)}: 224x224 RGB H&E "
             "histopathology patches"
             + (" (the generator of its best in-loop evaluation)." if facts.best else "."), ""]
    if facts.sample_grid:
        which = " (the last generator of the run, not the best one)" if facts.best else ""
        lines += [f"![samples]({SAMPLE_GRID})", "",
                  f"Generated at step {RunDir.grid_step(facts.sample_grid)} from the run's fixed "
                  f"noise{which}.", ""]
    lines += _classes_lines(facts)
    lines += [
        "## How to sample", "",
        "```bash",
        f"pathgan sample {spec} -n 64 --out DIR                      # PNG files",
        f"pathgan sample {spec} -n 10000 --out DIR --format shards   # WebDataset shards",
        *([f"pathgan sample {spec} --label {facts.classes[0]} -n 1000 --out DIR --format shards"
           "   # one class, labelled"] if facts.classes else []),
        "```", "",
        "The Hub commit that made the patches is pinned in the output (`sample.json`, or the "
        "shard set's `manifest.json`). Once downloaded, `HF_HUB_OFFLINE=1` samples from the "
        "local cache. In Python:", "",
        "```python",
        "import torch",
        "from huggingface_hub import snapshot_download",
        "from pathgan.runs import load_generator",
        "",
        f"generator, config = load_generator(snapshot_download(\"{repo_id}\""
        + (f", revision=\"{revision}\"" if revision else "") + "))",
        *(["classes = config[\"classes\"]  # a conditional generator: G(z, class codes)",
            f"labels = torch.full((16,), classes.index(\"{facts.classes[0]}\"))",
            "images = generator(torch.randn(16, config[\"nz\"]), labels)  # (16, 3, 224, 224) "
            "in [-1, 1]"] if facts.classes else
          ["images = generator(torch.randn(16, config[\"nz\"]))  # (16, 3, 224, 224) in [-1, 1]"]),
        "```", "",
        "## Training recipe", "", "| | |", "|---|---|",
        *(f"| {name} | {value} |" for name, value in recipe_rows(facts)), "",
        f"The full resolved configuration is `{CONFIG}` (local paths left out).", "",
        "## Data", "", _data_text(facts), "",
        "## Evaluation", "",
    ]
    if not facts.evaluations:
        lines += ["No evaluation was recorded for this run.", ""]
    for evaluation in facts.evaluations:
        lines += _evaluation_lines(evaluation)
    if facts.eval_file and PER_CLASS in facts.eval_file[1]:
        lines += per_class_lines(facts.eval_file[1][PER_CLASS])
    if facts.utility:
        lines += utility_lines(facts.utility)
    if facts.evaluations:
        lines += ["FD and KID: lower is better, 0 is the same distribution; precision "
                  "(fidelity) and recall (coverage) in [0, 1]: higher is better. Figures depend "
                  "on n and on the feature space: compare them only at the same n, space and "
                  "real split.", ""]
    if facts.loss_plot:
        lines += ["## Losses", "", f"![losses]({LOSS_PLOT})", ""]
    return "\n".join(lines)
