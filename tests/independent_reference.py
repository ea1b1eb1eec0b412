"""An independent float64 implementation of the measure, written from DESIGN.md section 1 alone.

It was written blind to equifast's code (engine, ops, scores, groups and the naive loop) and
imports no part of equifast: it is a third oracle beside the naive loop (``equifast/naive.py``)
and the float64 reference ops (``equifast/ops/_reference.py``). Those two share the group elements
of ``groups.py`` and the reading of the specification that came with them; this module builds its
own affine maps, image transforms, feature re-alignment, valid regions and scores from the text,
so that a misreading shared by both shows as a disagreement here. ``test_independent_reference.py``
compares it with ``equifast.measure``.

It covers what that test needs, plainly and slowly: ``NCHW`` layers, float images that are
already normalized, a batch of images measured as one block, per-image scores averaged over images.

Conventions it settles where section 1 leaves a choice (each agreed with equifast):

- Pixel centres at integer coordinates, origin at the top-left pixel, ``x`` right, ``y`` down. An
  element's ``2 x 3`` matrix is the *forward* map: the content at ``p`` moves to ``M p``, so the
  transformed image reads ``(T_g x)(p) = x(M^-1 p)``.
- A translation ``(dy, dx)`` moves the content down and right, as ``torch.roll`` does. Rotations
  and flips act about the image centre ``((W - 1) / 2, (H - 1) / 2)``; an angle turns
  counter-clockwise on screen, so with ``y`` down the linear part is ``[[c, s], [-s, c]]``.
- A product element ``a*b`` is the map ``a`` after ``b`` (the matrix product: ``b`` acts first).
- Crop protocol: the image is the centre window of the source, ``margin = (my, mx)`` pixels in
  from each side, and every element reads the source there, at image coordinate plus margin.
- Fill: a sample whose source coordinate lies outside ``[0, size - 1]`` on either axis is the fill
  *entirely*, never a blend of the pixels inside with the fill. The fill is the normalization's
  per-channel mean, which is 0 for the already normalized float images used here.
- The stride of a layer is ``H / h`` (and ``W / w``), an integer: the test's input sizes are
  multiples of every stride, and the reference refuses a grid that does not tile the input rather
  than guess how a layer rounds. Feature pixel ``u`` sits at ``offset + stride * u`` and the
  element acts on a layer as ``M_l = P^-1 M P``; the moved features read ``F(M_l^-1 u)``.
- A re-alignment is exact when ``M_l`` has integer coefficients; the ``mean`` element is exact
  when all elements are.
- A channel is flat when its spatial spread is zero up to rounding: its centred sum of squares is
  at most ``FLAT`` times its plain sum of squares.
- Undefined scores (added after the blind part, as equifast settles them in its README): a
  comparison without a valid position has every score NaN, ``flat_frac`` included; the ``mean``
  element averages each image's defined scores over the elements, and the mean over images takes
  the images whose score is defined (an element undefined everywhere leaves the ``mean`` rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

METRICS = ("corr", "one_minus_corr", "corr_channelwise", "flat_frac", "cosine", "nde")
COMPARISONS = ("eq", "inv", "chance")

# Closer than this to an integer, a coordinate or a coefficient is that integer: an exact map then
# samples one pixel with weight 1, and cos(90 degrees) = 6e-17 does not make a rotation by 90
# degrees an interpolated one.
SNAP = 1e-9

# The mean of n equal float64 values is not always that value, so a constant channel keeps a
# centred sum of squares of about 1e-32 times its plain one; real spatial spread is far above this.
FLAT = 1e-20

IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])

# An element: its name (as equifast names it), its forward 2 x 3 map, its protocol.
Element = tuple[str, np.ndarray, str]


# ------------------------------------------------------------------------------------------------
# Affine maps of the image plane (2 x 3, pixel coordinates, forward: content at p moves to M p)


def homogeneous(affine: np.ndarray) -> np.ndarray:
    """The 3 x 3 form of a 2 x 3 affine map."""
    square = np.eye(3)
    square[:2] = affine
    return square


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """``outer`` after ``inner``."""
    return (homogeneous(outer) @ homogeneous(inner))[:2]


def invert(affine: np.ndarray) -> np.ndarray:
    return np.linalg.inv(homogeneous(affine))[:2]


def translation(dy: float, dx: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy]])


def about_centre(linear: np.ndarray, height: int, width: int) -> np.ndarray:
    """The linear 2 x 2 map ``linear`` applied about the image centre."""
    centre = translation((height - 1) / 2, (width - 1) / 2)
    back = translation(-(height - 1) / 2, -(width - 1) / 2)
    return compose(centre, compose(np.hstack([linear, np.zeros((2, 1))]), back))


def rotation(angle: float, height: int, width: int) -> np.ndarray:
    """Counter-clockwise on screen: with ``y`` down, the right (1, 0) turns to the top (0, -1)."""
    radians = math.radians(angle)
    cos, sin = math.cos(radians), math.sin(radians)
    linear = np.array([[cos, sin], [-sin, cos]])
    # Multiples of 90 degrees are exact maps: make their coefficients the integers they stand for.
    linear = np.where(np.abs(linear - np.round(linear)) < SNAP, np.round(linear), linear)
    return about_centre(linear, height, width)


def flip(axis: str, height: int, width: int) -> np.ndarray:
    """``"horizontal"`` mirrors ``x`` (left and right swap), ``"vertical"`` mirrors ``y``."""
    linear = np.diag([-1.0, 1.0]) if axis == "horizontal" else np.diag([1.0, -1.0])
    return about_centre(linear, height, width)


def is_integer_map(affine: np.ndarray) -> bool:
    return bool(np.all(np.abs(affine - np.round(affine)) < SNAP))


# ------------------------------------------------------------------------------------------------
# Sampling


def snap(coordinates: torch.Tensor) -> torch.Tensor:
    nearest = torch.round(coordinates)
    return torch.where((coordinates - nearest).abs() < SNAP, nearest, coordinates)


def source_coordinates(
    affine: np.ndarray, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each pixel of a ``height x width`` output reads: ``affine^-1 p``, as ``(x, y)``."""
    inverse = invert(affine)
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64),
        torch.arange(width, dtype=torch.float64),
        indexing="ij",
    )
    source_x = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
    source_y = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
    return snap(source_x), snap(source_y)


def sample_bilinear(
    images: torch.Tensor, source_x: torch.Tensor, source_y: torch.Tensor, wrap: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear samples of ``images (N, C, Hs, Ws)`` at ``(h, w)`` source coordinates.

    Returns the samples ``(N, C, h, w)`` and where they are valid ``(h, w)``. With ``wrap`` the
    indices go modulo the size (a circular image) and every sample is valid. Otherwise a sample is
    valid where its source lies in ``[0, Ws - 1] x [0, Hs - 1]``, and an invalid one is 0 (the
    fill) as a whole.
    """
    size_y, size_x = images.shape[-2:]
    left, top = torch.floor(source_x), torch.floor(source_y)
    fraction_x, fraction_y = source_x - left, source_y - top
    left, top = left.long(), top.long()
    samples = torch.zeros(images.shape[:2] + source_x.shape, dtype=images.dtype)
    for step_y, weight_y in ((0, 1 - fraction_y), (1, fraction_y)):
        for step_x, weight_x in ((0, 1 - fraction_x), (1, fraction_x)):
            row, column = top + step_y, left + step_x
            if wrap:
                row, column = row % size_y, column % size_x
            else:
                # Clamped taps of a valid sample have weight 0 (its coordinate was snapped onto the
                # last pixel); those of an invalid sample are zeroed below.
                row, column = row.clamp(0, size_y - 1), column.clamp(0, size_x - 1)
            samples += images[:, :, row, column] * (weight_y * weight_x)
    if wrap:
        return samples, torch.ones(source_x.shape, dtype=torch.bool)
    valid = (source_x >= 0) & (source_x <= size_x - 1) & (source_y >= 0) & (source_y <= size_y - 1)
    return samples * valid, valid


def transform_images(
    sources: torch.Tensor,
    affine: np.ndarray,
    protocol: str,
    margin: tuple[int, int],
    input_size: tuple[int, int],
) -> torch.Tensor:
    """``T_g x`` for the ``H x W`` image held in the centre of each source, ``(N, 3, H, W)``."""
    height, width = input_size
    margin_y, margin_x = margin
    source_x, source_y = source_coordinates(affine, height, width)
    if protocol == "crop":
        # Every element is a window of the larger source, so content moves in from the margin.
        samples, _ = sample_bilinear(sources, source_x + margin_x, source_y + margin_y, wrap=False)
        return samples
    window = sources[:, :, margin_y : margin_y + height, margin_x : margin_x + width]
    if protocol in ("circular", "zero"):
        samples, _ = sample_bilinear(window, source_x, source_y, wrap=protocol == "circular")
        return samples
    raise ValueError(f"unknown protocol {protocol!r}")


# ------------------------------------------------------------------------------------------------
# Feature grids


def layer_stride(input_size: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    strides = []
    for size, cells in zip(input_size, grid):
        if size % cells:
            raise ValueError(f"a grid of {cells} cells does not tile {size} input pixels")
        strides.append(size // cells)
    return strides[0], strides[1]


def grid_offset(
    align: str | float | Sequence[float], stride: tuple[int, int]
) -> tuple[float, float]:
    """The input coordinate ``(y, x)`` of feature pixel 0's centre."""
    if align == "center":
        # A centred grid: cell i covers input pixels [s i, s (i + 1) - 1], centre s i + (s - 1) / 2.
        return (stride[0] - 1) / 2, (stride[1] - 1) / 2
    if align == "corner":
        return 0.0, 0.0
    if isinstance(align, (int, float)):
        return float(align), float(align)
    offset_y, offset_x = align
    return float(offset_y), float(offset_x)


def layer_map(
    affine: np.ndarray, stride: tuple[int, int], offset: tuple[float, float]
) -> np.ndarray:
    """``M_l = P^-1 M P``, with ``P(u) = offset + stride * u`` from grid to image coordinates."""
    grid_to_image = np.array([[stride[1], 0.0, offset[1]], [0.0, stride[0], offset[0]]])
    return compose(invert(grid_to_image), compose(affine, grid_to_image))


def move_features(
    features: torch.Tensor,
    affine: np.ndarray,
    stride: tuple[int, int],
    offset: tuple[float, float],
    protocol: str,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """``T'_g F`` of ``features (N, C, h, w)``: the moved maps, their valid region, exactness."""
    affine_in_grid = layer_map(affine, stride, offset)
    source_x, source_y = source_coordinates(affine_in_grid, *features.shape[-2:])
    moved, valid = sample_bilinear(features, source_x, source_y, wrap=protocol == "circular")
    return moved, valid, is_integer_map(affine_in_grid)


# ------------------------------------------------------------------------------------------------
# Scores


def pair_scores(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image scores of ``a`` against ``b`` (both ``(N, C, h, w)``) over the valid positions."""
    a, b = a[..., valid], b[..., valid]  # (N, C, positions)
    a_centred = a - a.mean(-1, keepdim=True)
    b_centred = b - b.mean(-1, keepdim=True)
    spread_a = (a_centred * a_centred).sum(-1)  # M2_a per channel
    spread_b = (b_centred * b_centred).sum(-1)
    comoment = (a_centred * b_centred).sum(-1)  # C_ab per channel
    corr = comoment.sum(-1) / torch.sqrt(spread_a.sum(-1) * spread_b.sum(-1))

    flat = (spread_a <= FLAT * (a * a).sum(-1)) | (spread_b <= FLAT * (b * b).sum(-1))
    channel_corr = comoment / torch.sqrt(spread_a * spread_b)
    kept = (~flat).sum(-1)
    # The plain mean over the non-flat channels; NaN where every channel is flat.
    channelwise = torch.where(flat, 0.0, channel_corr).sum(-1) / kept
    channelwise = torch.where(kept > 0, channelwise, math.nan)

    sum_ab, sum_aa, sum_bb = (a * b).sum((1, 2)), (a * a).sum((1, 2)), (b * b).sum((1, 2))
    return {
        "corr": corr,
        "one_minus_corr": 1 - corr,
        "corr_channelwise": channelwise,
        # no valid position: no channel to call flat or not
        "flat_frac": flat.double().mean(-1) if a.shape[-1] else torch.full_like(corr, math.nan),
        "cosine": sum_ab / torch.sqrt(sum_aa * sum_bb),
        "nde": ((a - b) ** 2).sum((1, 2)) / (sum_aa + sum_bb),
    }


# ------------------------------------------------------------------------------------------------
# The measure


def layer_outputs(model: nn.Module, images: torch.Tensor, layers: Sequence[str]) -> dict:
    modules = dict(model.named_modules())
    outputs = {}
    hooks = [
        modules[name].register_forward_hook(
            lambda module, inputs, output, name=name: outputs.__setitem__(name, output.detach())
        )
        for name in layers
    ]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    for name, output in outputs.items():
        if output.dim() != 4:
            raise ValueError(f"layer {name}: only NCHW outputs are covered, got {output.shape}")
    return outputs


def measure(
    model: nn.Module,
    sources: torch.Tensor,
    elements: Sequence[Element],
    layers: Sequence[str],
    input_size: tuple[int, int],
    margin: tuple[int, int],
    align: str | float | Mapping[str, str | float | Sequence[float]],
) -> list[dict]:
    """Mean scores over the images of ``sources (N, 3, H + 2 my, W + 2 mx)``, one batch.

    ``align`` is ``"center"``, ``"corner"``, a number, or per layer one of those or an
    ``(offset_y, offset_x)`` pair. Returns one row per layer, element (and ``"mean"``, the
    per-image mean over elements), comparison and metric, plus ``corr_vs_chance`` on the ``eq``
    rows: ``layer, element, comparison, metric, value, exact, stride_y, stride_x, offset_y,
    offset_x``.
    """
    model.eval()
    originals = layer_outputs(
        model, transform_images(sources, IDENTITY, "crop", margin, input_size), layers
    )
    geometry = {}
    for layer in layers:
        stride = layer_stride(input_size, originals[layer].shape[-2:])
        layer_align = align[layer] if isinstance(align, Mapping) else align
        geometry[layer] = stride, grid_offset(layer_align, stride)

    per_image = {}  # (layer, element, comparison) -> {metric: (N,)}
    exact = {}  # (layer, element) -> bool
    for name, affine, protocol in elements:
        transformed = layer_outputs(
            model, transform_images(sources, affine, protocol, margin, input_size), layers
        )
        for layer in layers:
            stride, offset = geometry[layer]
            original = originals[layer]
            moved, valid, exact[layer, name] = move_features(
                original, affine, stride, offset, protocol
            )
            # Chance: image n against the moved features of image (n + 1) mod N.
            others = {"eq": moved, "inv": original, "chance": torch.roll(moved, -1, dims=0)}
            for comparison, other in others.items():
                per_image[layer, name, comparison] = pair_scores(transformed[layer], other, valid)

    names = [name for name, _, _ in elements]
    rows = []
    for layer in layers:
        (stride_y, stride_x), (offset_y, offset_x) = geometry[layer]
        exact[layer, "mean"] = all(exact[layer, name] for name in names)
        # The mean element: each image's mean over the elements, then the mean over images.
        for comparison in COMPARISONS:
            per_image[layer, "mean", comparison] = {
                metric: torch.stack(
                    [per_image[layer, name, comparison][metric] for name in names]
                ).nanmean(0)
                for metric in METRICS
            }
        for name in names + ["mean"]:
            means = {
                comparison: {
                    metric: per_image[layer, name, comparison][metric].nanmean().item()
                    for metric in METRICS
                }
                for comparison in COMPARISONS
            }
            chance = means["chance"]["corr"]
            means["eq"]["corr_vs_chance"] = (means["eq"]["corr"] - chance) / (1 - chance)
            for comparison, values in means.items():
                for metric, value in values.items():
                    rows.append(
                        {
                            "layer": layer,
                            "element": name,
                            "comparison": comparison,
                            "metric": metric,
                            "value": value,
                            "exact": exact[layer, name],
                            "stride_y": float(stride_y),
                            "stride_x": float(stride_x),
                            "offset_y": offset_y,
                            "offset_x": offset_x,
                        }
                    )
    return rows
