"""pathgan: synthetic histopathology patches from GANs trained at scale."""

import sys as _sys

if "tensorflow" in _sys.modules:  # imported before pathgan: see encoders.tensorflow_runtime
    from pathgan.encoders.tensorflow_runtime import protect_from_triton_clash

    protect_from_triton_clash()

__version__ = "0.1.0"
