"""What ``pathgan eval`` writes from its figures: ``eval.json``, ``report.md``, one-line
summaries. Nothing here computes a figure (:mod:`pathgan.evaluation.evaluator` does)."""

from pathgan.core.fileio import atomic_path, write_json
from pathgan.evaluation.evaluator import INCEPTION_KEY
from pathgan.runs import LOSS_PLOT, EvalDir


def write_report(result: dict, out: EvalDir) -> None:
    """``eval.json`` (the result as it is) and ``report.md`` into an eval folder."""
    write_json(out.result_path, result)
    with atomic_path(out.report_path) as temporary:
        temporary.write_text(format_report(result))


def _number(value, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _levels(entry: dict) -> str:
    return ", ".join(f"{size} px {_number(value, 3)}"
                     for size, value in entry["swd_levels"].items())


def summary_line(entry: dict) -> str:
    text = (f"FD {_number(entry['fd'])}, KID {_number(entry['kid_mean'])} ± "
            f"{_number(entry['kid_std'], 2)}, precision {_number(entry['precision'], 3)}, "
            f"recall {_number(entry['recall'], 3)} (n={entry['n']}, real {entry['n_real']}, "
            f"{entry['encoder']}); SWD {_number(entry['swd'], 4)} on pixels ({_levels(entry)})")
    if INCEPTION_KEY in entry:
        text += f", Inception FID {_number(entry[INCEPTION_KEY])}"
    if "spectral_peak" in entry:
        text += (f"; spectral peak {_number(entry['spectral_peak'], 3)} at "
                 f"{entry['spectral_period']} px")
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
    if "spectral_peak" in real:
        lines.append(f"- real patches' spectral peak (the floor): "
                     f"{_number(real['spectral_peak'], 3)} at {real['spectral_period']} px")
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
              "distribution. Spectral peak: how far the mean power spectrum of the grid's "
              "images peaks at a generator's resampling periods (2 to 32 px) against its "
              "neighbourhood; a transposed-convolution lattice is hundreds or more, real "
              "patches about 1.5 to 2."]
    for run in result["runs"]:
        loss = f"![loss]({run['loss_plot']})" if run.get("loss_plot") else f"(no {LOSS_PLOT})"
        lines += ["", f"## {run['name']}", "", f"`{run['run']}`: {summary_line(run)}", "",
                  "| real | generated | losses |", "|---|---|---|",
                  f"| ![real]({real['grid']}) | ![generated]({run.get('fake_grid', '')}) | "
                  f"{loss} |"]
        if "classes" in run:
            lines += class_table(run["classes"])
    return "\n".join(lines) + "\n"


def class_table(classes: dict) -> list[str]:
    """A conditional run's per-class scores (generated in the real draw's class proportions,
    each class against the real samples of that class)."""
    if "note" in classes and not isinstance(classes["note"], dict):
        return ["", f"Per class: {classes['note']}."]
    lines = ["", "Per class (each class's generated patches against the real ones of that "
             "class):", "", "| class | n | real n | FD ↓ | KID ↓ | precision ↑ | recall ↑ | "
             "SWD ↓ |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, scores in classes.items():
        if "fd" not in scores:
            lines.append(f"| {name} | {scores['n']} | {scores['n_real']} | {scores['note']} "
                         "| | | | |")
            continue
        lines.append(f"| {name} | {scores['n']} | {scores['n_real']} | {_number(scores['fd'])} "
                     f"| {_number(scores['kid_mean'])} ± {_number(scores['kid_std'], 2)} | "
                     f"{_number(scores['precision'], 3)} | {_number(scores['recall'], 3)} | "
                     f"{_number(scores['swd'], 4)} |")
    return lines

