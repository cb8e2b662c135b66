"""The Embedding GAN's discriminator: ``Linear`` layers on a D-dim encoder embedding."""

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as with_spectral_norm


class MinibatchStd(nn.Module):
    """StyleGAN's minibatch standard deviation: one more feature (a vector's) or channel (a
    feature map's) holding how much each group of ``group_size`` samples varies, averaged over
    features and positions. A generator that draws one pattern for every z (or one per class)
    then gives itself away; without it, the embedding discriminator judged samples one at a
    time and the generator collapsed."""

    def __init__(self, group_size: int = 4) -> None:
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = min(self.group_size, len(x))
        while len(x) % group:
            group -= 1
        # sample i is grouped with i + k * (N / group), as in StyleGAN
        spread = x.float().reshape(group, -1, *x.shape[1:]).std(dim=0, correction=0)
        spread = spread.flatten(1).mean(dim=1).repeat(group)
        positions = x.shape[2:]
        spread = spread.view(-1, 1, *(1 for _ in positions)).expand(-1, 1, *positions)
        return torch.cat([x, spread.to(x.dtype)], dim=1)


class EmbeddingDiscriminator(nn.Module):
    """embedding (N, D) -> [minibatch std] -> hidden Linear + LeakyReLU(0.2) [+ dropout] layers
    -> one logit.

    The layers keep PyTorch's default (fan-in scaled) initialisation. The DCGAN init,
    N(0, 0.02), made the first logits ~0.005 x the embedding's norm: D(x) stayed at 0.5 for
    the first hundreds of steps and the generator followed an uninformative direction.
    """

    def __init__(self, embed_dim: int = 384, hidden: list[int] = (512, 256),
                 dropout: float = 0.0, spectral_norm: bool = False,
                 minibatch_std: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [MinibatchStd(minibatch_std)] if minibatch_std else []
        width = embed_dim + (1 if minibatch_std else 0)
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
