"""Network definitions, and the exported generator's files (:mod:`pathgan.models.export`).

They know nothing of Accelerate, shard files or training."""

from pathgan.models.dcgan import Discriminator, Generator, init_dcgan_weights, noise_batch
from pathgan.models.embgan import EmbeddingDiscriminator

__all__ = ["Discriminator", "EmbeddingDiscriminator", "Generator", "init_dcgan_weights",
           "noise_batch"]
