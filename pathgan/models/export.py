"""The exported generator: the files `pathgan sample`, `pathgan eval` and `pathgan push` read.

A folder (a run folder, its ``best/``, or a Hub snapshot) holds ``generator.safetensors``, the
weights, and ``generator.json``, the model config the generator is rebuilt from (plus what made
it: the GAN kind and its encoder). Weights are safetensors: loading never unpickles anything.
"""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pathgan.core.errors import PathganError
from pathgan.core.fileio import atomic_path, read_json, write_json
from pathgan.models.dcgan import Generator

GENERATOR_WEIGHTS = "generator.safetensors"
GENERATOR_CONFIG = "generator.json"


def generator_config(model, encoder_id: str | None = None) -> dict:
    """``generator.json`` of a run's ``model`` config section: what :func:`load_generator`
    rebuilds the generator from, and what made it (the encoder's spec and id, for an
    Embedding GAN)."""
    return {"nz": model.nz, "ngf": model.ngf, "channels": model.channels,
            "image_size": model.image_size, "kind": model.kind, "encoder": model.encoder,
            "encoder_id": encoder_id}


def export_generator(generator: torch.nn.Module, model_config: dict, folder: Path) -> Path:
    """Save generator weights as safetensors beside a JSON of the model config."""
    state = {k: v.detach().cpu().contiguous() for k, v in generator.state_dict().items()}
    with atomic_path(folder / GENERATOR_WEIGHTS) as temporary:
        save_file(state, str(temporary))
    write_json(folder / GENERATOR_CONFIG, model_config)
    return folder / GENERATOR_WEIGHTS


def load_generator(folder: str | Path, device: str | torch.device = "cpu"):
    """The exported generator of a folder (eval mode) and its model config."""
    folder = Path(folder)
    weights, config_path = folder / GENERATOR_WEIGHTS, folder / GENERATOR_CONFIG
    if not weights.is_file() or not config_path.is_file():
        raise PathganError(f"{folder} has no exported generator ({GENERATOR_WEIGHTS}); "
                           "train it first or point at a finished run folder")
    config = read_json(config_path)
    generator = Generator(nz=config["nz"], ngf=config["ngf"], channels=config["channels"])
    generator.load_state_dict(load_file(str(weights)))
    return generator.to(device).eval(), config
