"""pathgan: synthetic histopathology patches from GANs trained at scale."""

__version__ = "0.1.0"
