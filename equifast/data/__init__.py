"""Data sources: uint8 crop-protocol sources for the measurement engine.

``geometry`` holds the preprocessing config and the resize/crop shared by every source;
``samples`` the embedded photographs; ``folder`` image folders read with Pillow. (``dali``, the
GPU pipeline, is imported on its own so that this package does not need DALI.)
"""

from equifast.data.folder import ImageFolderSource
from equifast.data.geometry import Preprocess, resize_and_crop, source_size
from equifast.data.samples import load_samples, sample_names

__all__ = [
    "ImageFolderSource",
    "Preprocess",
    "load_samples",
    "resize_and_crop",
    "sample_names",
    "source_size",
]
