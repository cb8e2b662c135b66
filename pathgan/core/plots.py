"""Figures a run writes as PNG files, readable without any service."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from pathgan.core.fileio import atomic_path  # noqa: E402


def plot_losses(metrics: list[dict], out_path: str | Path, title: str = "") -> bool:
    """``Loss_D`` and ``Loss_G`` per logged iteration (rows of ``metrics.jsonl``), as in the
    reference figure; False when no row has them."""
    rows = [row for row in metrics if "Loss_D" in row]
    if not rows:
        return False
    figure, axes = plt.subplots(figsize=(10, 5))
    steps = [row["step"] for row in rows]
    axes.plot(steps, [row["Loss_D"] for row in rows], label="D", linewidth=1)
    axes.plot(steps, [row["Loss_G"] for row in rows], label="G", linewidth=1)
    axes.set_xlabel("iterations")
    axes.set_ylabel("loss")
    axes.set_title(title or "Generator and discriminator loss during training")
    axes.legend()
    figure.tight_layout()
    with atomic_path(out_path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
    return True


def plot_spread_bars(series: dict[str, list[dict]], labels: list[str], out_path: str | Path,
                     title: str = "") -> None:
    """Grouped bars: for each series (e.g. a metric), one bar per label at the ``mean`` of its
    figure, with an error bar from ``min`` to ``max`` (the figure's spread over seeds)."""
    figure, axes = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(series)
    for offset, (name, values) in enumerate(series.items()):
        positions = [i + (offset - (len(series) - 1) / 2) * width for i in range(len(labels))]
        means = [value["mean"] for value in values]
        below = [value["mean"] - value["min"] for value in values]
        above = [value["max"] - value["mean"] for value in values]
        axes.bar(positions, means, width, yerr=[below, above], capsize=4,
                 label=name.replace("_", " "))
    axes.set_xticks(range(len(labels)), labels)
    axes.set_ylim(0, 1.05)
    axes.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    axes.set_title(title, fontsize=10)
    axes.legend(loc="lower right")
    figure.tight_layout()
    with atomic_path(out_path) as temporary:
        figure.savefig(temporary, format="png", dpi=100)
    plt.close(figure)
