"""``stain-texture``: 32 hand-made statistics of H&E colour and texture, a weightless encoder.

Pixels go to optical density and are unmixed into haematoxylin (nuclei), eosin (cytoplasm,
collagen) and a residual by the Ruifrok & Johnston (2001) H&E-DAB stain matrix. Per image:

- the share of background (near-white) pixels, and of strongly haematoxylin-stained pixels;
- mean, spread and the 10/50/90 % quantiles of the haematoxylin and of the eosin density;
- mean and spread of the residual density, of R, G and B;
- band-pass energy (mean absolute difference from a 3x3 blur) of the haematoxylin, eosin and
  total density at 1, 2, 4 and 8 pixel scales: how fine or coarse the texture is.

All of it at half the patch's resolution (2x2 averages).

It has no weights and needs no download, and it runs at thousands of patches per second on a
CPU: the downstream-utility classifier of ``pathgan utility`` uses it where no pathology encoder
is at hand (the demo). Differentiable like every encoder (thresholds are soft), though nothing
is learnt through it here. Its id names the recipe, so a change to it must change the version.
"""

import torch
import torch.nn.functional as F

from pathgan.core.devices import default_device
from pathgan.core.images import signed_to_unit
from pathgan.encoders.base import Encoder

SPEC = "stain-texture"
ENCODER_ID = "stain-texture--ruifrok-hed--v1"
# Rows: the optical-density colour of haematoxylin, eosin and DAB (Ruifrok & Johnston 2001).
STAIN_MATRIX = torch.tensor([[0.650, 0.704, 0.286],
                             [0.072, 0.990, 0.105],
                             [0.268, 0.570, 0.776]])
BACKGROUND_DENSITY = 0.15  # total optical density below this: glass, not tissue
NUCLEAR_DENSITY = 0.5  # haematoxylin density above this: a nucleus
SOFTNESS = 0.02  # width of the soft thresholds
RESOLUTION_DIVISOR = 2  # statistics are taken at half the patch's resolution
SCALES = (1, 2, 4, 8)  # pixels at that resolution
QUANTILES = (0.1, 0.5, 0.9)
EMBED_DIM = 2 + 2 * (2 + len(QUANTILES)) + 2 + 6 + 3 * len(SCALES)


def optical_density(rgb: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] -> optical density per channel (0: white)."""
    return -torch.log10((rgb.clamp(0.0, 1.0) * 255.0 + 1.0) / 256.0)


def unmix(density: torch.Tensor) -> torch.Tensor:
    """RGB optical density (N, 3, H, W) -> stain densities (haematoxylin, eosin, residual)."""
    matrix = STAIN_MATRIX / STAIN_MATRIX.norm(dim=1, keepdim=True)
    unmixing = torch.linalg.inv(matrix).to(density)
    return torch.einsum("nchw,cs->nshw", density, unmixing)


def band_energy(channels: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C * len(SCALES)): mean absolute band-pass response of each channel
    at each scale, channel-major."""
    energies = []
    for scale in SCALES:
        pooled = F.avg_pool2d(channels, scale) if scale > 1 else channels
        blurred = F.avg_pool2d(F.pad(pooled, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        energies.append((pooled - blurred).abs().mean(dim=(2, 3)))
    return torch.stack(energies, dim=2).flatten(1)


def distribution(channel: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, 2 + len(QUANTILES)): mean, standard deviation and quantiles."""
    flat = channel.flatten(1)
    quantiles = torch.quantile(flat, torch.tensor(QUANTILES, device=flat.device), dim=1).T
    return torch.cat([flat.mean(1, keepdim=True), flat.std(1, keepdim=True), quantiles], dim=1)


class StainTextureEncoder(Encoder):
    def __init__(self, device=None) -> None:
        super().__init__(EMBED_DIM, ENCODER_ID, spec=SPEC)
        self.register_buffer("_anchor", torch.zeros(0, device=device))  # says the device
        self.freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.check_input(images)
        # Half resolution (about 1 µm/px on 20x patches) still resolves nuclei, at a quarter of
        # the arithmetic.
        rgb = F.avg_pool2d(signed_to_unit(images.float().to(self.device)), RESOLUTION_DIVISOR)
        density = optical_density(rgb)
        stains = unmix(density)
        haematoxylin, eosin, residual = stains[:, 0], stains[:, 1], stains[:, 2]
        total = density.sum(dim=1)
        background = torch.sigmoid((BACKGROUND_DENSITY - total) / SOFTNESS).mean(dim=(1, 2))
        nuclear = torch.sigmoid((haematoxylin - NUCLEAR_DENSITY) / SOFTNESS).mean(dim=(1, 2))
        rgb = rgb.flatten(2)
        features = [
            background[:, None], nuclear[:, None],
            distribution(haematoxylin), distribution(eosin),
            residual.flatten(1).mean(1, keepdim=True), residual.flatten(1).std(1, keepdim=True),
            rgb.mean(2), rgb.std(2),
            band_energy(torch.stack([haematoxylin, eosin, total], dim=1)),
        ]
        return torch.cat(features, dim=1).float()


def load_stain_texture(device=None) -> StainTextureEncoder:
    return StainTextureEncoder(default_device(device))
