"""The networks: the DCGAN generator and discriminators, the embedding discriminator, the
differentiable augmentation in front of them (:mod:`pathgan.models.augment`), and drawing images
from a generator (:mod:`pathgan.models.generation`). The exported generator's files are the run
folder's (:mod:`pathgan.runs`).

They know nothing of Accelerate, shard files or training."""

from pathgan.models.dcgan import Discriminator, Generator, init_dcgan_weights
from pathgan.models.embgan import EmbeddingDiscriminator
from pathgan.models.generation import generate, generated_batches, noise_batch

__all__ = ["Discriminator", "EmbeddingDiscriminator", "Generator", "generate",
           "generated_batches", "init_dcgan_weights", "noise_batch"]
