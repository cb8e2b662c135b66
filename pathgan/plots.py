"""Figures a run writes as PNG files, readable without any service."""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402

from pathgan.fileio import atomic_path  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a line torn by a kill mid-append is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def plot_losses(metrics_path: str | Path, out_path: str | Path, title: str = "") -> bool:
    """``Loss_D`` and ``Loss_G`` per logged iteration, as in the reference figure."""
    rows = [row for row in read_metrics(metrics_path) if "Loss_D" in row]
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
