"""Patch images, one kind of pack input beside slides (``slides.py``) and parquet tables
(``tables.py``): which files are patch images, reading one at the shards' size (the one resize of
every patch image and table row), and the words a patch that cannot be read is reported with.
"""


import numpy as np
from PIL import Image

from pathgan.shards import slides

PATCH_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def skip_reason(error: Exception) -> str:
    """Why an input was skipped, as manifests and logs record it: the error's type and first
    line."""
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]


def read_patch_image(file, output_size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A patch image (a path or a binary stream) as RGB pixels at ``output_size``, the one
    resize of every patch image and table row, and its (width, height) before."""
    with Image.open(file) as image:
        image.load()
        size = image.size
        pixels = np.asarray(image.convert("RGB"))
    return slides.resize_patch(pixels, output_size), size
