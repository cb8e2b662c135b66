"""The Embedding GAN's discriminator: ``Linear`` layers on a D-dim encoder embedding."""

from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as with_spectral_norm


class EmbeddingDiscriminator(nn.Module):
    """embedding (N, D) -> hidden Linear + LeakyReLU(0.2) [+ dropout] layers -> one logit.

    The layers keep PyTorch's default (fan-in scaled) initialisation. The DCGAN init,
    N(0, 0.02), made the first logits ~0.005 x the embedding's norm: D(x) stayed at 0.5 for
    the first hundreds of steps and the generator followed an uninformative direction.
    """

    def __init__(self, embed_dim: int = 384, hidden: list[int] = (512, 256),
                 dropout: float = 0.0, spectral_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = embed_dim
        for size in [*hidden, 1]:
            linear = nn.Linear(width, size)
            layers.append(with_spectral_norm(linear) if spectral_norm else linear)
            if size != 1:
                layers.append(nn.LeakyReLU(0.2, inplace=True))
                if dropout:
                    layers.append(nn.Dropout(dropout))
            width = size
        self.main = nn.Sequential(*layers)

    def forward(self, embeddings):
        return self.main(embeddings.float()).flatten()
