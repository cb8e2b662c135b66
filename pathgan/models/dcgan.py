"""The DCGAN of the reference recipe, at 224x224.

Generator: ``z`` (nz x 1 x 1) -> 7 -> 14 -> 28 -> 56 -> 112 -> 224, ``ConvTranspose2d`` +
``BatchNorm2d`` + ``ReLU`` blocks and a ``Tanh`` output in [-1, 1].
Discriminator: the mirror image with ``Conv2d`` + ``BatchNorm2d`` + ``LeakyReLU(0.2)``, down to
one **logit** (no sigmoid: the loss is ``BCEWithLogitsLoss``, which is safe under autocast).
"""

from torch import nn

UPSAMPLING_STAGES = 5  # 7 * 2**5 = 224
BASE_SIZE = 7


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights ~ N(0, 0.02), BatchNorm weights ~ N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    def __init__(self, nz: int = 100, ngf: int = 64, channels: int = 3) -> None:
        super().__init__()
        self.nz = nz
        in_width = ngf * 2 ** (UPSAMPLING_STAGES - 1)  # 16 * ngf at 7x7, halving per stage
        projection = nn.ConvTranspose2d(nz, in_width, BASE_SIZE, 1, 0, bias=False)
        # Its input is 1x1: a channels_last layout buys nothing, and cuDNN returns its weight
        # gradient contiguous, which torch.compile refuses for a channels_last weight.
        projection.keep_contiguous = True
        layers = [  # 1x1 -> 7x7
            projection,
            nn.BatchNorm2d(in_width),
            nn.ReLU(inplace=True),
        ]
        for _ in range(UPSAMPLING_STAGES - 1):  # 7 -> 14 -> 28 -> 56 -> 112
            width = in_width // 2
            layers += [
                nn.ConvTranspose2d(in_width, width, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            in_width = width
        layers += [nn.ConvTranspose2d(in_width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, z):
        return self.main(z.view(z.shape[0], self.nz, 1, 1))


class Discriminator(nn.Module):
    def __init__(self, ndf: int = 64, channels: int = 3) -> None:
        super().__init__()
        layers = [  # 224 -> 112, no BatchNorm on the input layer (as in DCGAN)
            nn.Conv2d(channels, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = ndf
        for _ in range(UPSAMPLING_STAGES - 1):  # 112 -> 56 -> 28 -> 14 -> 7
            layers += [
                nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width *= 2
        layers.append(nn.Conv2d(width, 1, BASE_SIZE, 1, 0, bias=False))  # 7 -> 1 logit
        self.main = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, images):
        return self.main(images).flatten()
