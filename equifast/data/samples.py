"""The embedded sample photographs: a dataset that is always there.

Eight colour photographs from scikit-image's sample data (astronaut, chelsea, coffee, rocket,
retina, hubble_deep_field, immunohistochemistry, stereo_motorcycle), stored in the package as
JPEGs with their longest side at most 512 px (sources and licences in ``samples/LICENSE.txt``).
They let ``equifast measure`` run with no dataset, and tests and the engine-versus-naive checks run
on real photographs. scikit-image is not needed at run time.

Example:
    >>> from equifast.data.geometry import Preprocess
    >>> sources, names = load_samples(Preprocess(input_size=(224, 224)), margin=(32, 32))
    >>> sources.shape, sources.dtype
    (torch.Size([8, 3, 288, 288]), torch.uint8)
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

import torch
from PIL import Image

from equifast.data.geometry import Preprocess, resize_and_crop

__all__ = ["load_sample_image", "load_samples", "sample_names"]

# Fixed order (not the directory listing's) so that image n is the same photograph everywhere,
# e.g. for the chance comparison's partner image (n + 1) mod B.
_SAMPLES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "retina",
    "hubble_deep_field",
    "immunohistochemistry",
    "stereo_motorcycle",
)


def sample_names() -> list[str]:
    """Names of the embedded photographs, in their fixed order.

    Returns:
        e.g. ``["astronaut", "chelsea", ...]``.
    """
    return list(_SAMPLES)


def load_sample_image(name: str) -> Image.Image:
    """Decode one embedded photograph.

    Args:
        name: one of :func:`sample_names`.

    Returns:
        The RGB Pillow image at its stored size (longest side at most 512 px).

    Raises:
        KeyError: for an unknown name (the message lists the known ones).
    """
    if name not in _SAMPLES:
        raise KeyError(f"no embedded sample named {name!r}; the samples are {', '.join(_SAMPLES)}")
    resource = resources.files("equifast.data").joinpath("samples", f"{name}.jpg")
    with resource.open("rb") as handle:
        img = Image.open(handle)
        img.load()  # decode now: the file closes when the block ends
    return img.convert("RGB")


def load_samples(
    preprocess: Preprocess,
    margin: int | tuple[int, int] = (0, 0),
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """The embedded photographs as crop-protocol sources for a model.

    Each photograph goes through :func:`equifast.data.geometry.resize_and_crop`: timm's eval
    resize and a centre crop of ``input_size + 2 * margin``, whose central window is the model's
    usual eval view.

    Args:
        preprocess: the model's preprocessing config (input size, crop_pct, interpolation).
        margin: ``(my, mx)`` (or one int): extra pixels on each side for translations.
        names: which photographs, in this order; all of them when None.

    Returns:
        ``(sources, names)``: uint8 tensor ``(N, 3, H + 2 * my, W + 2 * mx)`` and the N names.
    """
    chosen = sample_names() if names is None else list(names)
    if not chosen:
        raise ValueError(f"names is empty; choose from {', '.join(_SAMPLES)}")
    sources = [resize_and_crop(load_sample_image(name), preprocess, margin) for name in chosen]
    return torch.stack(sources), chosen
