"""``pathgan utility``: train the fixed classifier of :mod:`pathgan.evaluation.utility` on real,
synthetic and real + synthetic patches, test it on the real val split, and write what was found.

The real side is every labelled sample of the shard set's ``train`` and ``val`` splits (features
from precomputed embeddings when they exist for the encoder, else from the images); samples of
a class the generator does not draw are left out, and said. Per seed, the generator draws as many
patches per class as the real train split has (``-n`` to set the total, in the same
proportions), from noise seeded with the seed, so every seed brings a new synthetic set and a new
bootstrap of the real one. Writes ``utility.json`` (every figure, per seed and as mean, std, min,
max), ``utility.md`` and ``utility.png`` (balanced accuracy and AUROC with their spread), by
default beside the run's ``pathgan eval`` files (``RUN/eval/``).
"""

from pathlib import Path

import torch

from pathgan.core.errors import PathganError
from pathgan.core.fileio import atomic_path, timestamp, write_json
from pathgan.core.hub import resolve_generator
from pathgan.core.plots import plot_spread_bars
from pathgan.evaluation.evaluator import load_eval_encoder
from pathgan.evaluation.features import (
    DEFAULT_BATCH_SIZE,
    ENCODER,
    encoder_extractor,
    fake_features,
    real_features,
    select_real,
)
from pathgan.evaluation.ranks import log_main, make_state
from pathgan.evaluation.utility import (
    WAYS,
    bootstrap_rows,
    classification_scores,
    fit_linear_head,
    spread,
)
from pathgan.models.generation import class_shares
from pathgan.runs import GENERATOR_FILES, EvalDir, RunDir, generator_classes, load_generator
from pathgan.shards.format import load_manifest

FORMAT = "pathgan-utility/1"
RESULT, REPORT, FIGURE = EvalDir.UTILITY_RESULT, EvalDir.UTILITY_REPORT, EvalDir.UTILITY_FIGURE
DEFAULT_ENCODER = "stain-texture"
GAN_TEST = "gan-test"  # the real-trained classifier tested on the synthetic patches
METRICS = ("accuracy", "balanced_accuracy", "auroc")
ALL_SAMPLES = 10**12  # select_real's n: every sample of a split


def labelled_features(shards: Path, split: str, classes: list[str], extractor, state,
                      batch_size: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Features and class codes of every sample of ``split`` labelled with one of ``classes``;
    and what was left out (``{label: count}``, None for unlabelled)."""
    if not load_manifest(shards)["splits"][split]["samples"]:
        return torch.zeros(0, extractor.dim), torch.zeros(0, dtype=torch.long), {}
    real = select_real(shards, ALL_SAMPLES, 0, split)
    features = real_features(real, [extractor], state, batch_size=batch_size)[ENCODER]
    if len(features) != len(real):
        raise PathganError(f"{len(real) - len(features)} {split} samples of {shards} could not "
                           "be read: run pathgan shards verify")
    left_out: dict = {}
    rows, codes = [], []
    for row, label in enumerate(real.labels):
        if label in classes:
            rows.append(row)
            codes.append(classes.index(label))
        else:
            left_out[label] = left_out.get(label, 0) + 1
    return features[rows], torch.tensor(codes, dtype=torch.long), left_out


def check_splits(train_codes: torch.Tensor, val_codes: torch.Tensor, classes: list[str],
                 shards: Path) -> None:
    """One-line errors for a val split that cannot test a classifier and a train split that
    cannot train one."""
    if len(val_codes) == 0:
        raise PathganError(f"the val split of {shards} has no sample of the generator's classes "
                           f"({', '.join(classes)}): pack with --val-fraction (and "
                           "--region-groups for one slide)")
    for codes, split in ((val_codes, "val"), (train_codes, "train")):
        present = sorted({classes[code] for code in codes.tolist()})
        if len(present) < len(classes):
            raise PathganError(f"the {split} split of {shards} has only "
                               f"{', '.join(present) or 'no labelled samples'} of the classes "
                               f"{', '.join(classes)}: a classifier cannot be "
                               f"{'tested' if split == 'val' else 'trained'} on it")


def synthetic_labels(train_codes: torch.Tensor, num_classes: int, n: int | None) -> torch.Tensor:
    """Class codes of the synthetic set: the real train split's (``n`` None), or ``n`` in its
    proportions; in blocks of one class."""
    counts = torch.bincount(train_codes, minlength=num_classes).tolist()
    if n is not None:
        counts = class_shares(n, counts)
    return torch.cat([torch.full((count,), code, dtype=torch.long)
                      for code, count in enumerate(counts)])


def one_seed(seed: int, real: dict, generator, nz: int, extractor, state, num_classes: int,
             n: int | None, batch_size: int) -> dict:
    """Every way's scores on the val split for one seed (and GAN-test)."""
    train_features, train_codes = real["train"]
    val_features, val_codes = real["val"]
    fake_codes = synthetic_labels(train_codes, num_classes, n)
    fake = fake_features(generator, len(fake_codes), [extractor], state, nz=nz, seed=seed,
                         batch_size=batch_size, labels=fake_codes)[ENCODER]
    rows = bootstrap_rows(train_codes, seed)
    boot_features, boot_codes = train_features[rows], train_codes[rows]
    training = {
        "real": (boot_features, boot_codes),
        "synthetic": (fake, fake_codes),
        "real+synthetic": (torch.cat([boot_features, fake]), torch.cat([boot_codes, fake_codes])),
    }
    scores = {}
    for way in WAYS:
        head = fit_linear_head(*training[way], num_classes)
        scores[way] = classification_scores(head.probabilities(val_features), val_codes,
                                            num_classes)
        if way == "real":
            scores[GAN_TEST] = classification_scores(head.probabilities(fake), fake_codes,
                                                     num_classes)
    return scores


def summarise(per_seed: list[dict]) -> dict:
    """``{way: {metric: spread over seeds}}``."""
    return {way: {metric: spread([seed[way][metric] for seed in per_seed]) for metric in METRICS}
            for way in (*WAYS, GAN_TEST)}


def utility_findings(summary: dict, num_classes: int) -> list[str]:
    """What the table says that must not be missed: whether real + synthetic falls below real
    alone by more than the seeds' spread (balanced accuracy), and the CAS against chance."""
    findings = []
    real = summary["real"]["balanced_accuracy"]
    mixed = summary["real+synthetic"]["balanced_accuracy"]
    margin = max(real["std"], mixed["std"])
    if mixed["mean"] < real["mean"] - margin:
        findings.append(f"real + synthetic ({mixed['mean']:.3f}) falls below real alone "
                        f"({real['mean']:.3f}) by more than the seeds' spread ({margin:.3f}): "
                        "the synthetic patches hurt this classifier")
    else:
        findings.append(f"real + synthetic ({mixed['mean']:.3f}) is within the seeds' spread "
                        f"({margin:.3f}) of real alone ({real['mean']:.3f}) or above it")
    cas, chance = summary["synthetic"]["balanced_accuracy"], 1 / num_classes
    findings.append(f"trained on synthetic patches only (CAS), balanced accuracy "
                    f"{cas['mean']:.3f} ± {cas['std']:.3f} against chance {chance:.3f}"
                    + (": near chance" if cas["mean"] - chance <= max(cas["std"], 0.05) else ""))
    return findings


def run_utility(generator_spec, real_shards, *, encoder_spec: str = DEFAULT_ENCODER,
                seeds: int = 3, n: int | None = None, out_dir=None,
                batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
    """Score a conditional generator's downstream utility (module docstring); returns the
    ``utility.json`` dict."""
    if seeds < 1:
        raise PathganError(f"--seeds must be at least 1, not {seeds}")
    if n is not None and n < 1:
        raise PathganError(f"-n must be positive, not {n}")
    state = make_state()
    source = resolve_generator(generator_spec, GENERATOR_FILES)
    generator, config = load_generator(source.folder, state.device)
    classes = generator_classes(config)
    if not classes:
        raise PathganError(f"{generator_spec} is unconditional: pathgan utility needs a generator "
                           "trained with model.conditional=true (its patches need labels)")
    shards = Path(real_shards)
    held_out_note = held_out(source.folder, shards)
    extractor = encoder_extractor(load_eval_encoder(encoder_spec, state.device, state))
    real, left_out = {}, {}
    for split in ("train", "val"):
        features, codes, left_out[split] = labelled_features(shards, split, classes, extractor,
                                                             state, batch_size)
        real[split] = (features, codes)
    check_splits(real["train"][1], real["val"][1], classes, shards)
    log_main(state, f"pathgan utility: {len(real['train'][1])} real train and "
                    f"{len(real['val'][1])} val patches of {', '.join(classes)}; encoder "
                    f"{extractor.id}; {seeds} seed(s)")
    per_seed = [one_seed(seed, real, generator, config["nz"], extractor, state, len(classes), n,
                         batch_size) for seed in range(seeds)]
    summary = summarise(per_seed)
    counts = {split: dict(zip(classes, torch.bincount(real[split][1], minlength=len(classes))
                              .tolist(), strict=True)) for split in real}
    counts["synthetic"] = dict(zip(classes, torch.bincount(
        synthetic_labels(real["train"][1], len(classes), n), minlength=len(classes)).tolist(),
        strict=True))
    result = {
        "format": FORMAT, "created": timestamp(), "run": source.pinned,
        **({"hub": source.hub} if source.hub else {}),
        "real": str(shards), "classes": classes, "counts": counts, "left_out": left_out,
        "encoder": extractor.id, "encoder_spec": encoder_spec,
        "classifier": "frozen encoder + linear softmax head (standardised features, L2 "
                      "penalised, L-BFGS); real train bootstrapped per seed",
        "seeds": seeds, "held_out": held_out_note, "summary": summary, "per_seed": per_seed,
        "findings": utility_findings(summary, len(classes)),
    }
    out = Path(out_dir) if out_dir is not None else default_out_dir(source)
    if state.is_main_process:
        write_outputs(result, out)
        log_main(state, "pathgan utility:\n" + format_table(result))
        log_main(state, f"pathgan utility: wrote {out / RESULT}, {out / REPORT}, {out / FIGURE}")
    result["out_dir"] = str(out)
    return result


def held_out(run_folder: Path, shards: Path) -> str:
    """Whether the val split tested on was held out from the generator: refused when the run
    trained on it; said when the run's data cannot be checked."""
    run = RunDir(run_folder)
    if not run.has_config():
        return "unchecked: the generator folder has no config.yaml saying what it trained on"
    data = run.read_config().data
    if Path(data.shards).resolve() != shards.resolve():
        return f"unchecked: the generator trained on {data.shards}, not this shard set"
    if data.split == "val":
        raise PathganError(f"the generator trained on the val split of {shards}: that split "
                           "cannot be its held-out test")
    return f"yes: the generator trained on the {data.split} split of this shard set"


def default_out_dir(source) -> Path:
    """``RUN/eval`` (beside ``pathgan eval``'s files) for a run folder; ``./utility`` for a Hub
    generator (never inside the Hugging Face cache)."""
    return RunDir(source.folder).eval_dir if source.hub is None else Path("utility")


def format_table(result: dict) -> str:
    """The ways as rows, each metric as mean ± std (min-max) over seeds."""
    lines = ["| trained on | accuracy | balanced accuracy | AUROC |", "|---|---:|---:|---:|"]
    for way in (*WAYS, GAN_TEST):
        cells = []
        for metric in METRICS:
            value = result["summary"][way][metric]
            cells.append(f"{value['mean']:.3f} ± {value['std']:.3f} "
                         f"({value['min']:.3f}-{value['max']:.3f})")
        label = "real, tested on synthetic (GAN-test)" if way == GAN_TEST else way
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(result: dict) -> str:
    counts = result["counts"]
    lines = [
        "# pathgan utility", "",
        f"- generator: `{result['run']}`, classes {', '.join(result['classes'])}",
        f"- real: `{result['real']}`: train {counts['train']}, val {counts['val']}; val held "
        f"out from the generator: {result['held_out']}",
        f"- synthetic per seed: {counts['synthetic']}",
        f"- classifier: {result['classifier']}; encoder `{result['encoder']}`",
        f"- seeds: {result['seeds']} (mean ± sample std, min-max)",
        "", "Every classifier is tested on the real val split, except GAN-test (the classifier "
        "trained on real patches, tested on the synthetic ones: are the generated classes "
        "recognisable?). Trained on synthetic only, it is the Classification Accuracy Score "
        "(CAS, Ravuri & Vinyals 2019).", "", format_table(result), "",
        *[f"- {finding}" for finding in result["findings"]], "", f"![utility]({FIGURE})",
    ]
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RESULT, result)
    with atomic_path(out / REPORT) as temporary:
        temporary.write_text(format_report(result))
    ways = [*WAYS, GAN_TEST]
    plot_spread_bars(
        {metric: [result["summary"][way][metric] for way in ways]
         for metric in ("balanced_accuracy", "auroc")},
        [way if way != GAN_TEST else "GAN-test" for way in ways], out / FIGURE,
        title=f"downstream utility ({result['seeds']} seeds; chance: balanced accuracy "
              f"{1 / len(result['classes']):.2f}, AUROC 0.5)")
