"""Checks of the arguments that ``equifast.measure`` and ``equifast.naive.measure`` share, made
before any model or data is touched (one place, so that both loops refuse the same values with
the same messages)."""

from __future__ import annotations

import numbers
import warnings

import torch

from .align import AlignSpec, check_align
from .data.geometry import check_input_size


def check_count(name: str, value, minimum: int, what: str) -> None:
    """``value`` is an integer (not a bool) of at least ``minimum``.

    Raises:
        ValueError: naming ``name``, what was expected (``what``) and what was found.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected {what}, found {value!r}")


def check_run_arguments(input_size, align: AlignSpec, limit: int | None,
                        bootstrap: int) -> tuple[int, int] | None:
    """Checks ``input_size``, ``align``, ``limit`` and ``bootstrap``; returns the input size as
    ``(H, W)`` (or None)."""
    input_size = check_input_size(input_size)
    check_align(align)
    if limit is not None:
        check_count("limit", limit, 1, "a positive integer or None")
    check_count("bootstrap", bootstrap, 0, "a number of resamples >= 0")
    if bootstrap == 1:  # one resample's "interval" is a point, which may not even hold the value
        raise ValueError("bootstrap: expected 0 (no intervals) or at least 2 resamples, found 1")
    return input_size


def check_finite_pixels(images: torch.Tensor, where: str) -> None:
    """Floating ``images`` hold no NaN or infinite value (they would turn every score into NaN).

    Raises:
        ValueError: naming ``where`` and how many values are not finite.
    """
    if images.is_floating_point():
        bad = int((~torch.isfinite(images)).sum())
        if bad:
            raise ValueError(f"{where}: expected finite pixel values, found {bad} NaN or infinite "
                             f"of {images.numel()}")


def image_shape_error(where: str, shape: tuple[int, ...]) -> ValueError:
    """The error for images of ``shape``, which is not ``(B, C, H, W)`` or ``(C, H, W)`` with
    ``C`` 1 or 3. Arrays from Pillow, OpenCV or imageio hold an image's channels last, so a
    shape that ends in 1 or 3 channels gets the permutation that makes it one."""
    message = (f"{where}: expected images of shape (B, 3, H, W) (RGB) or (B, 1, H, W) "
               f"(greyscale), or one image (3, H, W); found {shape}")
    if len(shape) in (3, 4) and shape[-1] in (1, 3) and shape[-3] not in (1, 3):
        order = "(0, 3, 1, 2)" if len(shape) == 4 else "(2, 0, 1)"
        message += (f", which looks channels-last ({'B, ' if len(shape) == 4 else ''}H, W, C), "
                    f"as Pillow and OpenCV arrays are: pass array.transpose{order} (numpy) or "
                    f"tensor.permute{order}")
    return ValueError(message)


# Normalized images (ImageNet's mean and std: about -2.1 to 2.6; mean and std 0.5: -1 to 1) never
# reach this; raw 0..255 pixel values passed as floats almost always do.
RAW_PIXEL_LEVEL = 10.0


class UnnormalizedImagesWarning(UserWarning):
    """Floating-point images that look like raw 0..255 pixel values."""


def warn_raw_float_pixels(images: torch.Tensor) -> None:
    """Warn (attributed to the caller's check of a batch, so that Python shows it once however
    many batches there are) when floating ``images``, which both loops
    take as already normalized, hold no negative value and values above ``RAW_PIXEL_LEVEL``: raw
    pixel values cast to float, which the model would see unnormalized."""
    if not images.is_floating_point() or images.numel() == 0:
        return
    low, high = torch.aminmax(images)
    if float(low) >= 0 and float(high) > RAW_PIXEL_LEVEL:
        warnings.warn(
            "data: floating-point images are taken as already normalized (the model's mean and "
            "std applied), but these have no negative value and values above "
            f"{RAW_PIXEL_LEVEL:g}, like raw 0..255 pixels; pass them as uint8 to have them "
            "normalized", UnnormalizedImagesWarning, stacklevel=2)
