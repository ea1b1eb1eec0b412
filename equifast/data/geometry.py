"""Preprocessing geometry shared by every data source: resize, centre crop, crop-protocol margin.

A model's evaluation view of an image is timm's eval transform: resize the shorter side to
``floor(input / crop_pct)`` and take the central ``input``-sized window. The *crop* translation
protocol (DESIGN.md 1.5) needs more than that window: a **source** that extends the window by a
margin ``(my, mx)`` on every side, so that each translated image is another window of the same
photograph and no artificial border enters it. The identity image is the central window of the
source.

Convention:
    Sizes are ``(H, W)`` (rows, columns); margins are ``(my, mx)`` in pixels of the model input;
    images are uint8 tensors ``(3, H, W)``, RGB, channel first, values 0..255.

Example:
    >>> pre = Preprocess(input_size=(224, 224), crop_pct=0.875, interpolation="bilinear")
    >>> source_size(pre, margin=(16, 16))
    (256, 256)
    >>> src = resize_and_crop(Image.open("cat.jpg"), pre, margin=(16, 16))  # (3, 256, 256)
    >>> identity = src[:, 16:240, 16:240]  # what timm's eval transform gives, (3, 224, 224)
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "CropPlan",
    "Preprocess",
    "apply_crop_plan",
    "as_margin",
    "check_input_size",
    "crop_plan",
    "resize_and_crop",
    "resized_size",
    "scale_size",
    "source_size",
    "to_rgb",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# ITU-R BT.601 luma, as Pillow's convert("L"): the grey value of an RGB pixel, for models that
# take one channel.
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)


def channel_normalization(preprocess: Preprocess, channels: int
                          ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The ``(mean, std)`` of a model input of ``channels`` channels: 3 (RGB) or 1 (grey).

    A one-value mean and std serve every channel. For a grey model whose config gives RGB values
    (timm keeps ImageNet's three for ``in_chans=1``), they are weighted with the luma weights
    (:data:`LUMA_WEIGHTS`), as the grey values themselves are.
    """
    mean, std = preprocess.mean, preprocess.std
    if channels == 3:
        return (mean * 3, std * 3) if len(mean) == 1 else (mean, std)
    if channels == 1:
        if len(mean) == 1:
            return mean, std
        return ((sum(w * m for w, m in zip(LUMA_WEIGHTS, mean)),),
                (sum(w * s for w, s in zip(LUMA_WEIGHTS, std)),))
    raise ValueError(f"a model input of {channels} channels: expected 3 (RGB) or 1 (grey)")

# The interpolation names timm and torchvision use, mapped to Pillow's filters (what
# torchvision's PIL path calls for each InterpolationMode).
INTERPOLATIONS: dict[str, Image.Resampling] = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

# crop modes of timm's eval transform that keep every output pixel inside the photograph.
# timm's third mode, "border", pads with the mean colour; a padded border is exactly what the crop
# protocol avoids, so models configured with it are read as "center" (see models.py).
CROP_MODES = ("center", "squash")


def check_input_size(value) -> tuple[int, int] | None:
    """A caller's ``input_size``: None, one positive integer (a square) or a pair ``(H, W)``.

    Raises:
        ValueError: anything else (named, with what was expected).
    """
    if value is None:
        return None
    size = (value, value) if isinstance(value, numbers.Integral) else value
    try:
        pair = tuple(size)
    except TypeError:
        pair = ()
    if (len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
                              for v in pair) or min(pair) < 1):
        raise ValueError(
            "input_size: expected (H, W), two positive integers, or one positive integer for a "
            f"square input; found {value!r}"
        )
    return int(pair[0]), int(pair[1])


@dataclass(frozen=True)
class Preprocess:
    """How a model expects its images: timm's ``pretrained_cfg`` eval fields.

    Attributes:
        input_size: ``(H, W)`` of the model input.
        crop_pct: share of the resized image the input covers; the shorter side is resized to
            ``floor(input / crop_pct)`` (timm's rule).
        interpolation: resize filter, one of ``INTERPOLATIONS`` ('bilinear', 'bicubic', ...).
        mean: per-channel RGB mean on the 0..1 scale, for normalization.
        std: per-channel RGB standard deviation on the 0..1 scale.
        crop_mode: 'center' (keep aspect, the default) or 'squash' (resize both sides to
            ``floor(input / crop_pct)``, aspect not kept), as in timm.
    """

    input_size: tuple[int, int]
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    crop_mode: str = "center"

    def __post_init__(self) -> None:
        # Normalize containers (timm gives lists or tuples, torchvision lists) so that two equal
        # configs compare and hash equal.
        size = tuple(int(v) for v in self.input_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(
                f"input_size must be (H, W) with positive ints, got {self.input_size!r}"
            )
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        if len(self.mean) not in (1, 3) or len(self.std) != len(self.mean):
            raise ValueError(
                f"mean and std need 3 values (RGB) or 1 (greyscale) each, got {self.mean!r} "
                f"and {self.std!r}"
            )
        if not self.crop_pct > 0:
            raise ValueError(f"crop_pct must be > 0, got {self.crop_pct!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")

    @property
    def scale_size(self) -> tuple[int, int]:
        """``(H, W)`` target of the resize before the crop; see :func:`scale_size`."""
        return scale_size(self)


def as_margin(margin: int | tuple[int, int] | list[int], name: str = "margin") -> tuple[int, int]:
    """``(my, mx)`` from one int or a pair, checked non-negative.

    Args:
        margin: one int for both axes, or ``(my, mx)``.
        name: the argument's name, for the error message.

    Returns:
        ``(my, mx)`` as ints.
    """
    value = margin
    if isinstance(value, int):
        value = (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 0:
        raise ValueError(f"{name} must be (y, x) with non-negative ints, got {value!r}")
    return pair  # type: ignore[return-value]


def scale_size(preprocess: Preprocess) -> tuple[int, int]:
    """The resize target of timm's eval transform, ``floor(input / crop_pct)`` per axis.

    Mirrors ``timm.data.transforms_factory.transforms_imagenet_eval`` (timm 1.0): floor, not round.

    Args:
        preprocess: the model's preprocessing config.

    Returns:
        ``(H, W)``: for 'center' mode the shorter side of the image goes to this size (both equal
        for square inputs); for 'squash' the image is resized to exactly this size.
    """
    return tuple(math.floor(v / preprocess.crop_pct) for v in preprocess.input_size)  # type: ignore[return-value]


def source_size(preprocess: Preprocess, margin: int | tuple[int, int] = (0, 0)) -> tuple[int, int]:
    """Size of the crop-protocol source: the model input plus ``margin`` on every side.

    Args:
        preprocess: the model's preprocessing config.
        margin: ``(my, mx)`` (or one int for both): the largest shift of the group, in input pixels.

    Returns:
        ``(H + 2 * my, W + 2 * mx)``.
    """
    my, mx = as_margin(margin)
    h, w = preprocess.input_size
    return h + 2 * my, w + 2 * mx


def warn_unmargined_sources(
    source_hw: tuple[int, int],
    margin: tuple[int, int],
    model_hw: tuple[int, int],
    model_margin: tuple[int, int],
    where: str = "data",
    stacklevel: int = 2,
) -> None:
    """Warn when tensor sources of at least the model's input size leave a smaller input.

    Tensors are crop-protocol sources (the input plus the group's margin on each side), so images
    cut to the model's size (or resized to 256 for a 224 model) are measured on a smaller central
    window: a 224 x 224 tensor under 32-pixel shifts feeds 160 x 160 inputs to a model configured
    for 224 x 224. That is legitimate when asked for (``input_size=``, which skips this check),
    and a silent change of resolution when not. Sources smaller than the model's size were chosen
    small on purpose (a quick test): no warning.

    Args:
        source_hw: ``(H, W)`` of the sources given.
        margin: the group's margin ``(my, mx)`` at the input size the sources leave.
        model_hw: the model's configured input size.
        model_margin: the group's margin at ``model_hw`` (what sources for that size need).
        where: what to name in the message.
        stacklevel: passed to :func:`warnings.warn` (the caller's depth below the user's call).
    """
    height, width = source_hw
    inner = (height - 2 * margin[0], width - 2 * margin[1])
    model_h, model_w = model_hw
    if height < model_h or width < model_w or (inner[0] >= model_h and inner[1] >= model_w):
        return
    wanted = (model_h + 2 * model_margin[0], model_w + 2 * model_margin[1])
    size = "the model's input size" if (height, width) == (model_h, model_w) else (
        f"at least the model's input size ({model_h}x{model_w})")
    warnings.warn(
        f"{where}: the sources are {height}x{width}, {size}, but sources hold the model input "
        f"plus the group's margin ({margin[0]}, {margin[1]} px on each side for its shifts, crop "
        f"protocol): the model sees {inner[0]}x{inner[1]} inputs. To measure at "
        f"{model_h}x{model_w} pass sources of {wanted[0]}x{wanted[1]} (e.g. "
        "equifast.data.resize_and_crop(image, equifast.models.preprocess_for(model), "
        f"margin={tuple(model_margin)}), or a folder or list of files, which equifast crops "
        f"itself); to measure at {inner[0]}x{inner[1]} pass input_size={inner}",
        stacklevel=stacklevel + 1,
    )


def warn_cropped_batch(where: str, source_hw, first_hw, stacklevel: int = 2) -> bool:
    """Warn that a later batch of an iterable, larger than the first, is cut to the first's size;
    returns whether it warned (a batch of the first's size, or smaller, which is an error of its
    own, gets no warning).

    Without ``input_size=`` the first batch sets the input size; a later batch with larger
    sources is measured on its central window of the first batch's size, so its images are seen
    with another field of view than their own.
    """
    source_hw, first_hw = tuple(source_hw), tuple(first_hw)
    if source_hw == first_hw or min(a - b for a, b in zip(source_hw, first_hw)) < 0:
        return False
    warnings.warn(
        f"{where}: sources of {source_hw[0]}x{source_hw[1]}, larger than the {first_hw[0]}x"
        f"{first_hw[1]} of the first batch, which set the input size: their central "
        f"{first_hw[0]}x{first_hw[1]} window is measured (and so for every later batch of "
        "another size); pass input_size=(H, W) to choose the size, or batches of one size",
        stacklevel=stacklevel + 1,
    )
    return True


def resized_size(image_hw: tuple[int, int], preprocess: Preprocess) -> tuple[int, int]:
    """``(h, w)`` of an ``image_hw`` image after timm's eval resize (before any crop).

    Square targets go through torchvision's ``Resize(int)`` (shorter side to the target, longer
    side truncated with ``int``); non-square targets through timm's ``ResizeKeepRatio`` (scale by
    the smaller ratio, both sides rounded). Both rules are reproduced here so that the crop lands
    on the same pixels as timm's.

    Args:
        image_hw: ``(H, W)`` of the decoded image.
        preprocess: the model's preprocessing config.

    Returns:
        ``(h, w)`` of the resized image.
    """
    img_h, img_w = image_hw
    target_h, target_w = scale_size(preprocess)
    if preprocess.crop_mode == "squash":
        return target_h, target_w
    if target_h == target_w:
        # torchvision.transforms.functional._compute_resized_output_size, size=[target]
        short, long = (img_w, img_h) if img_w <= img_h else (img_h, img_w)
        new_short, new_long = target_h, int(target_h * long / short)
        return (new_long, new_short) if img_w <= img_h else (new_short, new_long)
    # timm.data.transforms.ResizeKeepRatio.get_params with longest=0 (no random scale/aspect)
    ratio = min(img_h / target_h, img_w / target_w)
    return round(img_h / ratio), round(img_w / ratio)


@dataclass(frozen=True)
class CropPlan:
    """Where the source comes from in one image: resize to ``resize_hw``, then crop.

    Attributes:
        resize_hw: ``(h, w)`` the whole image is resized to.
        top: first row of the source in the resized image.
        left: first column of the source in the resized image.
        source_hw: ``(Hs, Ws)`` of the source (input plus margins).
        upscaled: True when timm's resize left the image too small for the source, so it was
            resized larger (the shorter side, relative to the source, equals the source): the
            identity window then shows a slightly zoomed-in view compared with timm's eval view.
    """

    resize_hw: tuple[int, int]
    top: int
    left: int
    source_hw: tuple[int, int]
    upscaled: bool


def crop_plan(
    image_hw: tuple[int, int],
    preprocess: Preprocess,
    margin: int | tuple[int, int] = (0, 0),
) -> CropPlan:
    """Plan the resize and the crop-protocol crop of one image, without touching pixels.

    The identity window is placed exactly where torchvision's ``CenterCrop`` puts timm's crop
    (``int(round((h - H) / 2))``), and the source extends it by the margin; so the central window
    of the source equals timm's eval output for any margin that fits. When it does not fit (e.g.
    input 224, crop_pct 0.875: the resized shorter side is 256, so a margin above 16 leaves the
    image), the image is resized so that the source just fits (``upscaled=True``) and the source
    is the centre crop of that: padding would put an artificial border into the shifted images,
    which the crop protocol exists to avoid.

    Args:
        image_hw: ``(H, W)`` of the decoded image.
        preprocess: the model's preprocessing config.
        margin: ``(my, mx)`` (or one int): extra pixels on each side, the group's largest shift.

    Returns:
        The :class:`CropPlan`.
    """
    my, mx = as_margin(margin)
    in_h, in_w = preprocess.input_size
    src_h, src_w = in_h + 2 * my, in_w + 2 * mx
    res_h, res_w = resized_size(image_hw, preprocess)
    # torchvision.transforms.functional.center_crop's offsets for the identity window
    top = int(round((res_h - in_h) / 2.0)) - my
    left = int(round((res_w - in_w) / 2.0)) - mx
    if top >= 0 and left >= 0 and top + src_h <= res_h and left + src_w <= res_w:
        return CropPlan((res_h, res_w), top, left, (src_h, src_w), upscaled=False)

    # Too small: scale (keeping the aspect of what 'center' / 'squash' would resize) by the
    # smaller ratio, so the tighter axis equals the source and the other is at least as large.
    base_h, base_w = image_hw if preprocess.crop_mode == "center" else (res_h, res_w)
    ratio = min(base_h / src_h, base_w / src_w)
    res_h = max(src_h, round(base_h / ratio))
    res_w = max(src_w, round(base_w / ratio))
    top = int(round((res_h - src_h) / 2.0))
    left = int(round((res_w - src_w) / 2.0))
    return CropPlan((res_h, res_w), top, left, (src_h, src_w), upscaled=True)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any decoded Pillow image to 8-bit RGB the way model loaders do, plus 16-bit.

    Greyscale, palette, CMYK, YCbCr and images with alpha go through ``Image.convert("RGB")``,
    what torchvision's and timm's loaders do (alpha is dropped, not composited), so that the
    measured images are the ones the model is evaluated on. 16-bit and 32-bit integer greyscale
    (``I;16*``, ``I``) are scaled to 0..255 first: Pillow's own conversion clips them, which turns
    a 16-bit photograph almost white. Float images (``F``) in 0..1 are scaled by 255, others
    clipped to 0..255.

    Args:
        img: a decoded Pillow image of any mode.

    Returns:
        The image in mode ``RGB``.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        values = np.asarray(img).astype(np.float64)
        top = float(values.max()) if values.size else 0.0
        if mode == "F":
            scale = 255.0 if top <= 1.0 else 1.0
        elif mode == "I" and top <= 255:
            scale = 1.0  # 8-bit content stored in a 32-bit container
        else:
            # 16-bit full range maps 65535 -> 255; a deeper 'I' image scales by its maximum
            scale = 255.0 / max(65535.0, top)
        grey = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        # Going through RGBA avoids Pillow's warning about palette transparency; same pixels.
        img = img.convert("RGBA")
    return img.convert("RGB")


def apply_crop_plan(img: Image.Image, preprocess: Preprocess, plan: CropPlan) -> torch.Tensor:
    """Resize and crop an RGB image as planned by :func:`crop_plan`.

    Args:
        img: an RGB Pillow image (see :func:`to_rgb`).
        preprocess: gives the interpolation.
        plan: from :func:`crop_plan` for this image's size.

    Returns:
        uint8 tensor ``(3, Hs, Ws)``.
    """
    res_h, res_w = plan.resize_hw
    src_h, src_w = plan.source_hw
    if (img.height, img.width) != (res_h, res_w):
        img = img.resize((res_w, res_h), INTERPOLATIONS[preprocess.interpolation])
    img = img.crop((plan.left, plan.top, plan.left + src_w, plan.top + src_h))
    # np.array copies, so the tensor owns writable memory (from_numpy warns on read-only arrays)
    pixels = np.array(img, dtype=np.uint8)
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def resize_and_crop(
    img: Image.Image,
    preprocess: Preprocess,
    margin: int | tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """The crop-protocol source of one image: timm's eval resize, centre crop of input + margins.

    With ``margin=(0, 0)`` this is timm's eval transform (``timm.data.create_transform(...,
    is_training=False)``) before ``ToTensor``/normalization, pixel for pixel. With a margin the
    central ``input_size`` window is still that output, unless the image had to be resized larger
    to hold the margin (see :func:`crop_plan`).

    Args:
        img: a decoded Pillow image of any mode (converted with :func:`to_rgb`).
        preprocess: the model's preprocessing config.
        margin: ``(my, mx)`` (or one int): pixels added on each side, the group's largest shift.

    Returns:
        uint8 tensor ``(3, H + 2 * my, W + 2 * mx)``, RGB.
    """
    img = to_rgb(img)
    plan = crop_plan((img.height, img.width), preprocess, margin)
    return apply_crop_plan(img, preprocess, plan)


def is_image_list(data) -> bool:
    """Whether ``data`` is a decoded Pillow image or a non-empty list or tuple of them."""
    if isinstance(data, Image.Image):
        return True
    return (isinstance(data, (list, tuple)) and len(data) > 0
            and all(isinstance(entry, Image.Image) for entry in data))


def image_sources(
    images: Image.Image | list[Image.Image] | tuple[Image.Image, ...],
    preprocess: Preprocess,
    margin: int | tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Decoded Pillow images as crop-protocol sources, each as an image file would give it.

    Args:
        images: one image or a sequence of them, of any mode (:func:`to_rgb`) and size.
        preprocess: the model's preprocessing config.
        margin: ``(my, mx)`` (or one int): pixels added on each side, the group's largest shift.

    Returns:
        uint8 tensor ``(N, 3, H + 2 * my, W + 2 * mx)``.

    Example:
        >>> pre = Preprocess(input_size=(224, 224))
        >>> image_sources([Image.open("cat.jpg"), Image.open("dog.png")], pre, 16).shape
        torch.Size([2, 3, 256, 256])
    """
    images = [images] if isinstance(images, Image.Image) else list(images)
    return torch.stack([resize_and_crop(img, preprocess, margin) for img in images])

