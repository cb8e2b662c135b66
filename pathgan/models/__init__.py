"""Network definitions. They know nothing of Accelerate, data files or training."""

from pathgan.models.dcgan import Discriminator, Generator, init_dcgan_weights, noise_batch
from pathgan.models.embgan import EmbeddingDiscriminator

__all__ = ["Discriminator", "EmbeddingDiscriminator", "Generator", "init_dcgan_weights",
           "noise_batch"]
