"""Class-conditional networks (``model.conditional: true``).

- The generator draws the class it is given through **class-conditional BatchNorm** (de Vries
  et al. 2017, as in Miyato & Koyama 2018 and BigGAN): every BatchNorm of the DCGAN generator
  keeps its shared normalisation statistics, but its scale and shift are looked up per class,
  so the class steers every layer, colour and texture alike. Measured on the bundled slide's
  epidermis and dermis (demo widths, batch 8): the classes look alike at 300 steps and are told
  apart, each still varied, from about 450. A class embedding joined to z as well separated
  them sooner but drew one picture per class (every z alike) by 450-600 steps.
- Each discriminator judges the class by **projection** (Miyato & Koyama 2018): its logit is the
  unconditional one plus the inner product of a learned class embedding with the features of
  its last hidden layer (summed over positions for the pixel discriminator's 7x7 map; the last
  hidden ``Linear`` layer of the embedding discriminator). A sample is then scored for being a
  real patch *of its class*.

The modern GAN's (``model.kind: r3gan``) follow R3GAN's: the generator joins a learned class
embedding to ``z`` before its generative basis (it has no normalisation layer to condition),
and the discriminator projects its discriminative basis's output onto a learned class embedding
(beside an unconditional term, which R3GAN's has not: :class:`ConditionalR3Discriminator`). In
training, each fake of a pair is drawn for the class of the real patch it is paired with
(:mod:`pathgan.train.objective`), so the relativistic loss compares like with like.

Classes are integer codes into the class names of the shard set's manifest (sorted), which the
exported ``generator.json`` lists. Unconditional networks are left untouched: they are called
``G(z)`` and ``D(x)``, these ``G(z, y)`` and ``D(x, y)``.
"""

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as with_spectral_norm

from pathgan.models.dcgan import BASE_SIZE, UPSAMPLING_STAGES, Discriminator, init_dcgan_weights
from pathgan.models.embgan import EmbeddingDiscriminator, MinibatchStd
from pathgan.models.r3gan import (
    DiscriminativeBasis,
    GenerativeBasis,
    R3Discriminator,
    R3Generator,
    noise_seeds,
)


class ConditionalBatchNorm2d(nn.Module):
    """``BatchNorm2d`` without affine parameters, then a per-class gain and bias, initialised
    like the DCGAN's BatchNorm (gain ~ N(1, 0.02), bias 0) for every class."""

    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(width, affine=False)
        self.gain = nn.Embedding(num_classes, width)
        self.bias = nn.Embedding(num_classes, width)
        nn.init.normal_(self.gain.weight, 1.0, 0.02)
        nn.init.zeros_(self.bias.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        shape = (len(labels), -1, 1, 1)
        return self.norm(x) * self.gain(labels).view(shape) + self.bias(labels).view(shape)


def add_classes(generator: nn.Module, num_classes: int) -> None:
    """What makes a generator conditional to the rest of pathgan: its class count, and
    ``class_mix``, how often each class is drawn when no class is asked for: in training
    batches, hence when BatchNorm statistics are recomputed, and by default when sampling. Set by
    training; saved with the weights."""
    generator.num_classes = num_classes
    generator.register_buffer("class_mix", torch.full((num_classes,), 1.0 / num_classes))


class ConditionalGenerator(nn.Module):
    """The DCGAN generator (same widths and sizes) with class-conditional BatchNorm."""

    def __init__(self, nz: int = 100, ngf: int = 64, channels: int = 3,
                 num_classes: int = 2) -> None:
        super().__init__()
        self.nz = nz
        add_classes(self, num_classes)
        width = ngf * 2 ** (UPSAMPLING_STAGES - 1)
        projection = nn.ConvTranspose2d(nz, width, BASE_SIZE, 1, 0, bias=False)  # 1x1 -> 7x7
        projection.keep_contiguous = True  # see dcgan.Generator
        convolutions, norms = [projection], [ConditionalBatchNorm2d(width, num_classes)]
        for _ in range(UPSAMPLING_STAGES - 1):  # 7 -> 14 -> 28 -> 56 -> 112
            convolutions.append(nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False))
            width //= 2
            norms.append(ConditionalBatchNorm2d(width, num_classes))
        self.convolutions = nn.ModuleList(convolutions)
        self.norms = nn.ModuleList(norms)
        self.output = nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False)  # -> 224
        for convolution in [*self.convolutions, self.output]:  # the norms initialise their own
            init_dcgan_weights(convolution)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = z.view(z.shape[0], self.nz, 1, 1)
        for convolution, norm in zip(self.convolutions, self.norms, strict=True):
            x = torch.relu(norm(convolution(x), labels))
        return torch.tanh(self.output(x))


def projection(embedding: nn.Module, labels: torch.Tensor, features: torch.Tensor):
    """The projection term: <embedding(y), features> per sample."""
    return (embedding(labels) * features.float()).sum(dim=1)


class ConditionalDiscriminator(Discriminator):
    """The DCGAN discriminator with a minibatch-std channel before its last convolution, plus a
    projection on its last 7x7 feature map averaged over positions (a sum would make the
    projection 49x the unconditional logit at initialisation: LeakyReLU features are mostly
    positive, so their sum grows with the count).

    The minibatch-std channel was added when the conditional DCGAN drew one picture per class;
    that collapse went only when the class embedding on z went too (module docstring), and
    whether the channel is still needed without it was not measured."""

    def __init__(self, ndf: int = 64, channels: int = 3, num_classes: int = 2,
                 minibatch_std: int = 4) -> None:
        super().__init__(ndf, channels)
        self.num_classes = num_classes
        width = self.main[-1].in_channels
        self.minibatch_std = MinibatchStd(minibatch_std)
        self.main[-1] = nn.Conv2d(width + 1, 1, BASE_SIZE, 1, 0, bias=False)  # 7 -> 1 logit
        init_dcgan_weights(self.main[-1])
        self.class_embedding = nn.Embedding(num_classes, width)
        nn.init.normal_(self.class_embedding.weight, 0.0, 0.02)  # as the DCGAN's convolutions

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = self.main[:-1](images)
        logits = self.main[-1](self.minibatch_std(features)).flatten()
        return logits + projection(self.class_embedding, labels, features.mean(dim=(2, 3)))


class ConditionalEmbeddingDiscriminator(EmbeddingDiscriminator):
    """The embedding discriminator plus a projection on its last hidden layer."""

    def __init__(self, embed_dim: int = 384, hidden: list[int] = (512, 256),
                 dropout: float = 0.0, spectral_norm: bool = False, minibatch_std: int = 4,
                 num_classes: int = 2) -> None:
        super().__init__(embed_dim, hidden, dropout, spectral_norm, minibatch_std)
        self.num_classes = num_classes
        width = self.main[-1].in_features
        embedding = nn.Embedding(num_classes, width)
        bound = 1.0 / math.sqrt(width)  # the scale of PyTorch's Linear initialisation
        nn.init.uniform_(embedding.weight, -bound, bound)
        self.class_embedding = with_spectral_norm(embedding) if spectral_norm else embedding

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = self.main[:-1](embeddings.float())
        logits = self.main[-1](features).flatten()
        return logits + projection(self.class_embedding, labels, features)


#: Values of the modern generator's class embedding. Measured on the bundled slide's epidermis
#: and dermis (demo settings, 150 steps): with as many as ``z`` has (100), every noise drew the
#: same picture of its class in two runs out of two; with 16, the samples of a class vary.
R3_CLASS_DIM = 16


class ConditionalR3Generator(R3Generator):
    """The modern generator with a learned class embedding (``class_dim`` values, ~ N(0, 1) like
    ``z``) joined to ``z`` before the generative basis. The noise fields stay a function of
    ``z`` alone, so one noise row draws the same grain in every class."""

    def __init__(self, nz: int = 100, width: int = 16, *, num_classes: int = 2,
                 class_dim: int = R3_CLASS_DIM, **kwargs) -> None:
        super().__init__(nz, width, **kwargs)
        add_classes(self, num_classes)
        self.class_embedding = nn.Embedding(num_classes, class_dim)
        self.main[0] = GenerativeBasis(nz + class_dim, self.main[0].basis.shape[0])

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        z = z.view(z.shape[0], self.nz)
        joined = torch.cat([z, self.class_embedding(labels).to(z.dtype)], dim=1)
        return self.synthesise(joined, noise_seeds(z))


class ConditionalR3Discriminator(R3Discriminator):
    """The modern discriminator whose discriminative basis maps to ``class_dim`` features, and
    whose logit is a linear map of them plus their inner product with a class embedding (the
    projection discriminator; both initialised ~ N(0, 1/class_dim), so the logit starts at the
    unconditional one's scale). R3GAN's conditional discriminator has the projection alone;
    with it, the demo's samples drifted to red and cyan confetti (1 run), with the unconditional
    term beside it they kept H&E colours (1 run, same seed and settings)."""

    def __init__(self, width: int = 16, *, num_classes: int = 2, class_dim: int = 64,
                 **kwargs) -> None:
        super().__init__(width, **kwargs)
        self.num_classes = num_classes
        channels = self.main[-1].linear.in_features
        self.main[-1] = DiscriminativeBasis(channels, class_dim)
        self.class_embedding = nn.Embedding(num_classes, class_dim)
        nn.init.normal_(self.class_embedding.weight, 0.0, 1.0 / math.sqrt(class_dim))
        self.unconditional = nn.Linear(class_dim, 1, bias=False)
        nn.init.normal_(self.unconditional.weight, 0.0, 1.0 / math.sqrt(class_dim))

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = self.main(images)
        return (self.unconditional(features).flatten()
                + projection(self.class_embedding, labels, features))
