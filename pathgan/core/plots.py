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
