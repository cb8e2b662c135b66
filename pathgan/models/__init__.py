"""Network definitions, drawing images from a generator (:mod:`pathgan.models.generation`) and
the exported generator's files (:mod:`pathgan.models.export`).

They know nothing of Accelerate, shard files or training."""

from pathgan.models.dcgan import Discriminator, Generator, init_dcgan_weights
from pathgan.models.embgan import EmbeddingDiscriminator
from pathgan.models.generation import generate, generated_batches, noise_batch

__all__ = ["Discriminator", "EmbeddingDiscriminator", "Generator", "generate",
           "generated_batches", "init_dcgan_weights", "noise_batch"]
