"""``pathgan arch``: the networks of a config as a layer table and a diagram PNG."""

from pathlib import Path

import torch
from torch import nn

from pathgan.config import Config
from pathgan.core.fileio import atomic_path
from pathgan.core.plots import plt
from pathgan.shards.format import IMAGE_SIDE
from pathgan.train.build import build_networks
from pathgan.train.objective import EMBEDDINGS, FEATURES, IMAGES

LAYER_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.ReLU, nn.LeakyReLU, nn.Tanh,
               nn.Linear, nn.Dropout)


def layer_table(model: nn.Module, example: torch.Tensor) -> list[dict]:
    """Every leaf layer with its output shape and parameter count, from one forward pass."""
    rows, hooks = [], []
    for name, module in model.named_modules():
        if isinstance(module, LAYER_TYPES):
            def record(module, inputs, output, name=name):
                rows.append({"name": name, "layer": repr(module),
                             "output": tuple(output.shape[1:]),
                             "params": sum(p.numel() for p in module.parameters())})
            hooks.append(module.register_forward_hook(record))
    with torch.no_grad():
        model.eval()(example)
    for hook in hooks:
        hook.remove()
    return rows


def table_markdown(title: str, rows: list[dict]) -> str:
    total = sum(row["params"] for row in rows)
    lines = [f"## {title}", "", "| # | layer | output shape | parameters |", "|---|---|---|---|"]
    lines += [f"| {i} | `{r['layer']}` | {' x '.join(map(str, r['output']))} | {r['params']:,} |"
              for i, r in enumerate(rows)]
    lines += ["", f"Total parameters: {total:,}", ""]
    return "\n".join(lines)


def draw_diagram(title: str, rows: list[dict], path: Path) -> None:
    """One box per layer, left to right, height growing with the spatial size."""
    figure, axes = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 4.5))
    colours = {"Conv": "#4c72b0", "Batc": "#dd8452", "ReLU": "#55a868", "Leak": "#55a868",
               "Tanh": "#c44e52", "Line": "#8172b3", "Drop": "#937860"}
    sizes = [r["output"][-1] if len(r["output"]) == 3 else 1 for r in rows]
    for index, (row, size) in enumerate(zip(rows, sizes, strict=True)):
        height = 0.5 + 3.0 * (size / max(sizes)) ** 0.5
        kind = row["layer"][:4]
        axes.add_patch(plt.Rectangle((index, -height / 2), 0.8, height,
                                     color=colours.get(kind, "#999999"), alpha=0.85))
        label = row["layer"].split("(")[0]
        shape = "x".join(map(str, row["output"]))
        axes.text(index + 0.4, height / 2 + 0.15, shape, ha="center", va="bottom", fontsize=7,
                  rotation=60)
        axes.text(index + 0.4, -height / 2 - 0.15, label, ha="center", va="top", fontsize=7,
                  rotation=60)
    axes.set_xlim(-0.5, len(rows) + 0.5)
    axes.set_ylim(-4, 4)
    axes.axis("off")
    axes.set_title(title)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png", dpi=120)
    plt.close(figure)


def write_architecture(config: Config, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The encoder is not drawn (it is frozen and external); its embedding width is needed.
    model = config.model
    gan = build_networks(config, torch.device("cpu"))
    networks = {"generator": (gan.generator, torch.zeros(2, model.nz))}
    images = torch.zeros(2, model.channels, IMAGE_SIDE, IMAGE_SIDE)
    for view, discriminator in gan.discriminators.items():
        example = {IMAGES: lambda: images,
                   FEATURES: lambda: gan.encoder.features(images, gan.feature_levels),
                   EMBEDDINGS: lambda: torch.zeros(2, gan.encoder.embed_dim)}[view]()
        networks[f"discriminator-{view}"] = (discriminator, example)
    written, markdown = [], ["# Architecture", ""]
    for name, (network, example) in networks.items():
        rows = layer_table(network, example)
        draw_diagram(name, rows, out_dir / f"{name}.png")
        markdown.append(table_markdown(name, rows))
        written.append(out_dir / f"{name}.png")
    with atomic_path(out_dir / "architecture.md") as temporary:
        temporary.write_text("\n".join(markdown))
    return [*written, out_dir / "architecture.md"]
