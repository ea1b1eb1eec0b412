"""The naive measurement loop: the oracle of the engine in the tests and the baseline of benchmarks.

It measures exactly what :func:`equifast.measure` measures (DESIGN.md section 1), the plain way:

1. per batch of sources, one forward of the identity images and then one forward per group element
   (each batched over the images), under ``torch.inference_mode``;
2. forward hooks keep a float64 copy of every chosen layer's output (of its first call, should a
   module run more than once in a forward);
3. the statistics are plain torch ops in float64 on the kept features: the identity features are
   re-aligned with ``grid_sample`` or index arithmetic, the valid positions selected, and each score
   computed from the compared values themselves (not from sufficient statistics).

It shares no code with what it checks: it does not import :mod:`equifast.engine`,
:mod:`equifast.ops` (nor its reference) or :mod:`equifast.scores`. It uses the shared *definitions*
only: group elements as affine maps (:mod:`equifast.groups`), layer selection and hooks
(:mod:`equifast.layers`), layouts (:mod:`equifast.layouts`), grid offsets (:mod:`equifast.align`),
the result type, the models and the data loaders.

Convention:
    Affine maps are ``(2, 3)`` matrices acting on ``(x, y, 1)``: ``x`` is the column, ``y`` the row,
    pixel centres at integer coordinates, origin at the top-left pixel. An element's matrix ``M`` is
    its forward map; the transformed image reads ``(T_g x)(p) = x(M^-1 p)`` in the coordinates of
    the identity window (the model input, at ``(margin_y, margin_x)`` of the source). A map whose
    entries are all within ``INTEGER_TOLERANCE`` of integers is applied by exact pixel reads; any
    other map bilinearly (``grid_sample`` with ``align_corners=True``: pixel centres at integers),
    and a pixel whose continuous source coordinate lies outside ``[-1e-6, size - 1 + 1e-6]`` holds
    the fill value (0 after normalization) or, on a feature grid, is left out of the comparison.

Example:
    >>> import torch, equifast
    >>> from equifast import naive
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, padding_mode="circular"))
    >>> images = torch.rand(4, 3, 16, 16)
    >>> group = equifast.Translation([1, 2], protocol="circular")
    >>> result = naive.measure(net, images, group=group, progress=False)
    >>> round(float(result.frame.query("comparison == 'eq' and metric == 'corr'").value.min()), 5)
    1.0
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .align import AlignSpec, find_offsets, probe_inputs, warn_estimated_offsets
from .arguments import (
    check_finite_pixels,
    check_run_arguments,
    image_shape_error,
    warn_raw_float_pixels,
)
from .data.folder import is_path_list, no_images_message, warn_skipped
from .data.geometry import (
    LUMA_WEIGHTS,
    channel_normalization,
    image_sources,
    is_image_list,
    warn_cropped_batch,
    warn_unmargined_sources,
)
from .groups import (
    INTEGER_TOLERANCE,
    Group,
    check_circular,
    check_mask,
    default_group,
    feature_source_affines,
    parse_group,
)
from .layers import (
    LayerHooks,
    LayerSpec,
    attention_map_candidates,
    channels_first_of,
    check_layer_keys,
    input_channels,
    is_broad_selection,
    measurable_layers,
    prefix_tokens_of,
    refine_layouts,
    run_probe,
    select_layers,
    token_order_of,
    warn_undeclared_channels,
)
from .layouts import FeatureLayout, grid_view
from .result import (
    FRAME_COLUMNS,
    MODEL_COLUMNS,
    Result,
    deserves_logits_warning,
    is_headless,
    logits_of,
    warn_not_logits,
    warn_undefined_chance,
    warn_undefined_elements,
)

__all__ = ["COMPARISONS", "METRICS", "inside_image_disc", "measure", "realign", "transform"]

COMPARISONS = ("eq", "inv", "chance")
METRICS = (
    "corr",
    "one_minus_corr",
    "corr_channelwise",
    "flat_frac",
    "cosine",
    "nde",
    "rel_err",
    "psnr",
)
DEFAULT_METRICS = ("corr", "one_minus_corr", "corr_channelwise", "flat_frac", "cosine", "nde")
DERIVED_METRICS = ("corr_vs_chance",)

# A bilinear source coordinate this close outside the grid still counts as inside.
EDGE_TOLERANCE = 1e-6
# A channel is flat when its spatial (population) variance is <= (1e-6 * mean)^2 + (1e-15)^2.
FLAT_RELATIVE = 1e-6
FLAT_ABSOLUTE = 1e-15
# pooled corr is NaN where every channel's spread is below 1e-12 of its level (see _pooled_corr)
ROUNDING_RELATIVE = 1e-12
CHANCE_MARGIN = 1e-9  # corr_vs_chance: chance within this of 1 leaves it undefined
# The bootstrap draws its resamples in blocks of this many (so that intervals are reproducible).
BOOTSTRAP_BLOCK = 100

_IDENTITY_MAP = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


# ------------------------------------------------------------------------------------------------
# Sampling: the image transform and the feature re-alignment


def _is_integer_map(matrix: np.ndarray) -> bool:
    matrix = np.asarray(matrix, dtype=np.float64)
    return bool(np.all(np.abs(matrix - np.round(matrix)) <= INTEGER_TOLERANCE))


def _source_coordinates(source_map: np.ndarray, height: int, width: int, device: torch.device):
    """``(xs, ys)``, each ``(height, width)`` float64: where output pixel ``(x, y)`` reads."""
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=device),
        torch.arange(width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    a = [[float(v) for v in row] for row in source_map]
    return a[0][0] * xs + a[0][1] * ys + a[0][2], a[1][0] * xs + a[1][1] * ys + a[1][2]


def _inside(xs: torch.Tensor, ys: torch.Tensor, height: int, width: int, exact: bool):
    """Whether coordinates lie in a ``height x width`` grid (bilinear ones with a tolerance)."""
    tolerance = 0.0 if exact else EDGE_TOLERANCE
    return (
        (xs >= -tolerance)
        & (xs <= width - 1 + tolerance)
        & (ys >= -tolerance)
        & (ys <= height - 1 + tolerance)
    )


def _read(grid: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, exact: bool, wrap: bool):
    """Values of ``grid`` ``(N, C, h, w)`` at the coordinates ``(out_h, out_w)``.

    Exact coordinates (integers) read single pixels; others interpolate bilinearly. Without ``wrap``
    coordinates are clamped into the grid (callers mask what lies outside); with it they wrap.

    Returns:
        ``(N, C, out_h, out_w)``.
    """
    height, width = grid.shape[-2:]
    if exact:
        ix, iy = xs.round().long(), ys.round().long()
        if wrap:
            ix, iy = ix % width, iy % height  # Python-style modulo: always in [0, size)
        else:
            ix, iy = ix.clamp(0, width - 1), iy.clamp(0, height - 1)
        return grid[:, :, iy, ix]
    if wrap:
        # Wrap the coordinates into [0, size] and append the first row and column after the last,
        # so that the right / bottom neighbour of the last pixel is the first one.
        xs, ys = torch.remainder(xs, width), torch.remainder(ys, height)
        grid = F.pad(grid, (0, 1, 0, 1), mode="circular")
        height, width = height + 1, width + 1

    def normalized(coords: torch.Tensor, size: int) -> torch.Tensor:
        # align_corners=True: -1 and 1 are the centres of the first and last pixel.
        return coords * (2.0 / (size - 1)) - 1.0 if size > 1 else torch.zeros_like(coords)

    where = torch.stack([normalized(xs, width), normalized(ys, height)], -1)
    where = where.to(grid.dtype).expand(grid.shape[0], *where.shape)
    # padding_mode="border" clamps the coordinate into the grid: a source exactly on (or within the
    # tolerance beyond) the last row reads that row.
    return F.grid_sample(grid, where, mode="bilinear", padding_mode="border", align_corners=True)


def transform(
    sources: torch.Tensor,
    source_map: np.ndarray,
    protocol: str,
    margin: tuple[int, int],
    out_size: tuple[int, int],
) -> torch.Tensor:
    """Apply one group element to a batch of (normalized) sources.

    Args:
        sources: ``(B, 3, Hs, Ws)`` float sources, already normalized (the fill is 0).
        source_map: ``(2, 3)`` map from output pixels to identity-window coordinates (``M^-1``).
        protocol: ``"crop"`` (read the source anywhere), ``"circular"`` (wrap within the window) or
            ``"zero"`` (outside the window reads the fill).
        margin: ``(margin_y, margin_x)`` of the identity window in the source.
        out_size: ``(H, W)`` of the window and of the output.

    Returns:
        ``(B, 3, H, W)`` in the dtype of ``sources``.
    """
    height, width = out_size
    margin_y, margin_x = margin
    exact = _is_integer_map(source_map)
    if exact:
        source_map = np.round(source_map)
    xs, ys = _source_coordinates(source_map, height, width, sources.device)
    if protocol == "circular":
        window = sources[:, :, margin_y : margin_y + height, margin_x : margin_x + width]
        return _read(window, xs, ys, exact, wrap=True)
    # Crop and zero read the whole source (window coordinates shifted by the margin).
    sx, sy = xs + margin_x, ys + margin_y
    inside = _inside(sx, sy, sources.shape[-2], sources.shape[-1], exact)
    if protocol == "zero":
        inside &= _inside(xs, ys, height, width, exact)
    elif protocol != "crop":
        raise ValueError(f"protocol: expected 'crop', 'circular' or 'zero', found {protocol!r}")
    values = _read(sources, sx, sy, exact, wrap=False)
    return torch.where(inside, values, torch.zeros((), dtype=values.dtype, device=values.device))


def realign(
    grid: torch.Tensor, source_map: np.ndarray, wrap: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move feature maps by a feature-grid source map.

    Args:
        grid: ``(B, C, h, w)`` features.
        source_map: ``(2, 3)``: output position ``u`` reads position ``source_map @ u``.
        wrap: Wrap around the grid (circular elements): every position is valid.

    Returns:
        ``(moved (B, C, h, w), valid (h, w) bool)``: valid where the source lies in the grid.
    """
    height, width = grid.shape[-2:]
    exact = _is_integer_map(source_map)
    if exact:
        source_map = np.round(source_map)
    xs, ys = _source_coordinates(source_map, height, width, grid.device)
    moved = _read(grid, xs, ys, exact, wrap)
    if wrap:
        valid = torch.ones(height, width, dtype=torch.bool, device=grid.device)
    else:
        valid = _inside(xs, ys, height, width, exact)
    return moved, valid


def inside_image_disc(
    source_map: np.ndarray, layout: FeatureLayout, offset: tuple[float, float],
    input_size: tuple[int, int],
) -> torch.Tensor:
    """``(h, w)`` bool: grid positions that lie, with their sources, inside the image's disc.

    The disc of ``mask="disc"``, decided in input pixels: feature pixel ``(i, j)`` sits at
    ``(offset_x + stride_x * i, offset_y + stride_y * j)``; it counts when that point and the
    point its source sits at lie within ``(min(H, W) - 1) / 2`` (at least 0.5) of the image centre
    ``((W - 1) / 2, (H - 1) / 2)`` (a relative tolerance of 1e-9 on the squared distance).
    """
    height, width = int(input_size[0]), int(input_size[1])
    grid_h, grid_w = layout.grid_h, layout.grid_w
    if _is_integer_map(source_map):
        source_map = np.round(source_map)
    src_x, src_y = _source_coordinates(source_map, grid_h, grid_w, torch.device("cpu"))
    out_y, out_x = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64),
                                  torch.arange(grid_w, dtype=torch.float64), indexing="ij")
    stride_y, stride_x = (float(s) for s in layout.stride)
    offset_y, offset_x = (float(o) for o in offset)
    centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
    radius = max((min(height, width) - 1) / 2, 0.5)

    def inside(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dx = offset_x + stride_x * x - centre_x
        dy = offset_y + stride_y * y - centre_y
        # per axis in units of the radius: an ellipse on the grid when the strides differ
        return (dx / radius) ** 2 + (dy / radius) ** 2 <= 1 + 1e-9

    return inside(out_x, out_y) & inside(src_x, src_y)


# ------------------------------------------------------------------------------------------------
# Scores


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator``, NaN where the denominator is not positive."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, numerator / safe, torch.full_like(numerator, math.nan))


def _psnr(peak_squared: torch.Tensor, mse: torch.Tensor) -> torch.Tensor:
    """``10 log10(peak^2 / mse)``; +inf for identical maps (mse 0), NaN for 0 / 0."""
    value = 10.0 * torch.log10(_ratio(peak_squared, mse))
    return torch.where((mse == 0) & (peak_squared > 0), math.inf, value)


def _flat(mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    return variance <= (FLAT_RELATIVE * mean) ** 2 + FLAT_ABSOLUTE**2


def _pooled_corr(cross: torch.Tensor, ss_a: torch.Tensor, ss_b: torch.Tensor,
                 mean_a: torch.Tensor, mean_b: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The channel-centred correlation from moments pooled over images ``(..., C)``; NaN where
    every channel's standard deviation is below ``ROUNDING_RELATIVE`` of its level on either
    side. Each image's own sums are exact about one of its values, but their merge needs the
    differences of the images' means, which are rounded to an ulp of the level: for maps that
    vary by a few ulps (an SE gate's sigmoid of values near 1e-16) that rounding is as large as
    the spread, and the pooled corr moved by 0.007 with the order of the merge."""
    value = _ratio(cross.sum(-1), torch.sqrt(ss_a.sum(-1) * ss_b.sum(-1)))
    rounding = ((ss_a / count <= (ROUNDING_RELATIVE * mean_a) ** 2)
                | (ss_b / count <= (ROUNDING_RELATIVE * mean_b) ** 2))
    return torch.where(rounding.all(-1), math.nan, value)


def _centred(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, values - mean)`` along the last axis, centred about the first value, then about
    the mean of the differences: x - x_0 is exact where a channel's spread is small against its
    level, whereas x - mean carries the rounding error of the mean (up to an ulp of the level)
    into every centred value; for a channel whose spread is itself a few ulps (deep layers of a
    random-init LeViT), that error was a large part of it and corr moved by ~0.01."""
    shifted = values - values[..., :1]
    shift_mean = shifted.mean(-1)
    return values[..., 0] + shift_mean, shifted - shift_mean[..., None]


def pair_scores(
    a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor, metrics: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Scores of ``a`` against ``b`` per image over the valid positions, from the values themselves.

    Args:
        a, b: ``(B, C, h, w)`` float64.
        valid: ``(h, w)`` bool.
        metrics: Names in ``METRICS``.

    Returns:
        ``{metric: (B,) float64}``; NaN where undefined.
    """
    a, b = a[..., valid], b[..., valid]  # (B, C, m)
    batch, channels, positions = a.shape
    if positions == 0:
        return {m: torch.full((batch,), math.nan, dtype=torch.float64) for m in metrics}
    (mean_a, centred_a), (mean_b, centred_b) = _centred(a), _centred(b)  # (B, C), (B, C, m)
    ss_a = (centred_a * centred_a).sum(-1)  # (B, C): per-channel centred sums of squares
    ss_b = (centred_b * centred_b).sum(-1)
    cross = (centred_a * centred_b).sum(-1)
    flat = _flat(mean_a, ss_a / positions) | _flat(mean_b, ss_b / positions)
    sum_aa, sum_bb = (a * a).sum((1, 2)), (b * b).sum((1, 2))
    sum_diff = ((a - b) ** 2).sum((1, 2))
    corr = _ratio(cross.sum(-1), torch.sqrt(ss_a.sum(-1) * ss_b.sum(-1)))
    out = {}
    for metric in metrics:
        if metric == "corr":
            value = corr
        elif metric == "one_minus_corr":
            value = 1.0 - corr
        elif metric == "corr_channelwise":
            live = ~flat
            pearson = cross / torch.sqrt(torch.where(live, ss_a * ss_b, 1.0))
            value = _ratio(torch.where(live, pearson, 0.0).sum(-1), live.sum(-1).double())
        elif metric == "flat_frac":
            value = flat.double().mean(-1)
        elif metric == "cosine":
            value = _ratio((a * b).sum((1, 2)), torch.sqrt(sum_aa * sum_bb))
        elif metric == "nde":
            value = _ratio(sum_diff, sum_aa + sum_bb)
        elif metric == "rel_err":
            value = torch.sqrt(_ratio(sum_diff, sum_bb))
        elif metric == "psnr":
            mse = sum_diff / (channels * positions)
            spread = b.flatten(1).var(-1, correction=0)  # all valid values around their mean
            value = _psnr(16.0 * spread, mse)
        else:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        out[metric] = value
    return out


CHANNEL_MAPS = ("identity", "match", "linear")
# channel_map="linear": two folds of the images (even and odd places in the data's order), each
# scored with the map fitted on the other (written apart from the engine's fits)
LINEAR_FOLDS = 2


def match_channels(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``b`` with each channel taken from the channel of ``b`` that correlates best with that
    channel of ``a`` over the valid positions, image by image (``torch.corrcoef``; written apart
    from the engine's reference op on purpose). A flat channel of ``b`` (``FLAT_RELATIVE``, as
    for ``corr_channelwise``: a constant channel re-aligned by bilinear weights varies by an ulp)
    is never taken; a flat channel of ``a`` keeps its own; correlations within 1e-9 of each
    other are ties, taken by the first channel."""
    channels = a.shape[1]
    if channels == 1 or int(valid.sum()) < 2:  # one position: every channel is constant
        return b
    matched = b.clone()
    for n in range(a.shape[0]):
        rows = torch.cat([a[n][:, valid], b[n][:, valid]])  # (2C, m)
        correlation = torch.corrcoef(rows)[:channels, channels:]  # NaN for a constant row
        b_values = b[n][:, valid]
        b_constant = _flat(b_values.mean(-1), b_values.var(-1, correction=0))
        if bool(b_constant.all()):
            continue
        correlation[:, b_constant] = -math.inf
        # correlations within 1e-9 are ties, taken by the first channel (on few positions
        # many pairs correlate perfectly, and rounding must not choose among them)
        best = (correlation.nan_to_num(nan=-math.inf) * 1e9).round().argmax(-1)
        a_values = a[n][:, valid]
        a_constant = _flat(a_values.mean(-1), a_values.var(-1, correction=0))
        best[a_constant] = torch.arange(channels, device=a.device)[a_constant]
        matched[n] = b[n][best]
    return matched


def fit_linear_map(a_values: torch.Tensor, b_values: torch.Tensor,
                   ridge: float) -> torch.Tensor | None:
    """The affine map ``[M | c]`` ``(C, C + 1)`` that predicts ``a`` from ``b`` (``(C, n)``
    values of ``n`` pairs) by ridge least squares: ``min |A - M B|^2 + lambda |M|^2`` over the
    centred values, ``lambda = ridge * |B|^2 / C``, solved by ``torch.linalg.lstsq`` on the
    stacked system ``[B^T; sqrt(lambda) I] M^T = [A^T; 0]`` (not by normal equations: apart
    from the engine's). ``None`` without pairs."""
    channels, pairs = b_values.shape
    if pairs == 0:
        return None
    mean_a, mean_b = a_values.mean(-1), b_values.mean(-1)
    centred_a = a_values - mean_a[:, None]
    centred_b = b_values - mean_b[:, None]
    energy = float((centred_b * centred_b).sum())
    penalty = ridge * energy / channels if energy > 0 else 1.0
    rows = torch.cat([centred_b.T, math.sqrt(penalty) * torch.eye(channels, dtype=torch.float64)])
    targets = torch.cat([centred_a.T, torch.zeros(channels, channels, dtype=torch.float64)])
    mixing = torch.linalg.lstsq(rows, targets, driver="gelsd").solution.T  # (C, C)
    return torch.cat([mixing, (mean_a - mixing @ mean_b)[:, None]], 1)


def pair_moments(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Centred moments per channel over the images and valid positions (for pooled scores).

    Returns:
        ``(C, 6)`` float64: count, mean a, mean b, and the sums of squares and products about the
        means, ``sum (a - mean a)^2``, ``sum (b - mean b)^2``, ``sum (a - mean a)(b - mean b)``.
        Centred as in ``pair_scores`` (about each channel's first value, then about the mean of
        the differences): raw power sums ``sum a^2 - (sum a)^2 / m`` lose every digit of a
        channel whose spread is 1e-8 of its level (deep layers at random init), and pooled
        intervals then resampled that rounding.
    """
    channels = a.shape[1]
    a = a[..., valid].transpose(0, 1).reshape(channels, -1)  # (C, B m)
    b = b[..., valid].transpose(0, 1).reshape(channels, -1)
    if a.shape[1] == 0:
        return torch.zeros(channels, 6, dtype=torch.float64, device=a.device)
    (mean_a, centred_a), (mean_b, centred_b) = _centred(a), _centred(b)
    return torch.stack(
        [
            torch.full((channels,), float(a.shape[1]), dtype=torch.float64, device=a.device),
            mean_a,
            mean_b,
            (centred_a * centred_a).sum(-1),
            (centred_b * centred_b).sum(-1),
            (centred_a * centred_b).sum(-1),
        ],
        -1,
    )


def merge_moments(moments: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The moments of groups ``moments[i]`` (``(N, ..., 6)``), group i taken ``weights[i]`` times.

    The textbook decomposition: the sums about the overall mean are the groups' own sums plus
    each group's count times its mean's deviation from the overall mean (squared, or the product
    of the deviations of a and b).
    """
    weights = weights.to(moments).view(-1, *([1] * (moments.dim() - 2)))
    count_i = moments[..., 0] * weights
    count = count_i.sum(0)
    safe = torch.where(count > 0, count, torch.ones_like(count))
    # About the mean of the first group taken (a group taken alone keeps its mean exactly:
    # (3 m) / 3 rounded would make a spread of a single value); 0 where no group is taken.
    first = (count_i > 0).to(torch.int8).argmax(0, keepdim=True)

    def merged_mean(field: int) -> torch.Tensor:
        level = moments[..., field].gather(0, first)
        mean = level[0] + (count_i * (moments[..., field] - level)).sum(0) / safe
        return torch.where(count > 0, mean, torch.zeros_like(mean))

    mean_a, mean_b = merged_mean(1), merged_mean(2)
    deviation_a, deviation_b = moments[..., 1] - mean_a, moments[..., 2] - mean_b
    return torch.stack(
        [
            count,
            mean_a,
            mean_b,
            (weights * moments[..., 3] + count_i * deviation_a * deviation_a).sum(0),
            (weights * moments[..., 4] + count_i * deviation_b * deviation_b).sum(0),
            (weights * moments[..., 5] + count_i * deviation_a * deviation_b).sum(0),
        ],
        -1,
    )


def moments_scores(moments: torch.Tensor, metrics: Sequence[str]) -> dict[str, torch.Tensor]:
    """Scores from centred moments ``(..., C, 6)`` (values pooled over images; same definitions)."""
    count, mean_a, mean_b, ss_a, ss_b, cross = moments.to(torch.float64).unbind(-1)
    safe = torch.where(count > 0, count, torch.ones_like(count))
    flat = _flat(mean_a, ss_a / safe) | _flat(mean_b, ss_b / safe)
    total = count.sum(-1)
    empty = total <= 0
    # Sums about zero, from the centred moments: every term but the cross one is non-negative.
    all_aa = (ss_a + count * mean_a * mean_a).sum(-1)
    all_bb = (ss_b + count * mean_b * mean_b).sum(-1)
    all_ab = (cross + count * mean_a * mean_b).sum(-1)
    # sum (a - b)^2 = the centred sum of squares of a - b plus its mean's share; rounding of maps
    # equal to float64 precision can take the first just below zero.
    difference = mean_a - mean_b
    sum_diff = (ss_a + ss_b - 2 * cross + count * difference * difference).sum(-1).clamp_min(0)
    nan = torch.full_like(total, math.nan)
    corr = _pooled_corr(cross, ss_a, ss_b, mean_a, mean_b, safe)
    out = {}
    for metric in metrics:
        if metric == "corr":
            value = corr
        elif metric == "one_minus_corr":
            value = 1.0 - corr
        elif metric == "corr_channelwise":
            live = ~flat
            pearson = cross / torch.sqrt(torch.where(live, ss_a * ss_b, 1.0))
            value = _ratio(torch.where(live, pearson, 0.0).sum(-1), live.sum(-1).double())
            value = torch.where(empty, nan, value)
        elif metric == "flat_frac":
            value = torch.where(empty, nan, flat.double().mean(-1))
        elif metric == "cosine":
            value = _ratio(all_ab, torch.sqrt(all_aa * all_bb))
        elif metric == "nde":
            value = _ratio(sum_diff, all_aa + all_bb)
        elif metric == "rel_err":
            value = torch.sqrt(_ratio(sum_diff, all_bb))
        elif metric == "psnr":
            mse = _ratio(sum_diff, total)
            # all valid values of b about their grand mean: within channels, then between them
            grand_mean = _ratio((count * mean_b).sum(-1), total)
            between = mean_b - grand_mean[..., None]
            spread = _ratio((ss_b + count * between * between).sum(-1), total)
            value = _psnr(16.0 * spread, mse)
        else:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        out[metric] = value
    return out


def _check_metrics(metrics: Sequence[str] | None) -> tuple[str, ...]:
    if metrics is None:
        return DEFAULT_METRICS
    if isinstance(metrics, str):
        metrics = (metrics,)  # metrics="psnr", as comparisons="eq" (not 'p', 's', 'n', 'r')
    unknown = [m for m in metrics if m not in METRICS + DERIVED_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; expected some of {METRICS + DERIVED_METRICS}")
    return tuple(dict.fromkeys(("corr",) + tuple(m for m in metrics if m in METRICS)))


# ------------------------------------------------------------------------------------------------
# Bootstrap


def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray | None:
    """``(resamples, n)`` multinomial counts, drawn in blocks of 100; ``None`` without a CI."""
    if resamples <= 0 or n < 2:
        return None
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, resamples, BOOTSTRAP_BLOCK):
        size = min(BOOTSTRAP_BLOCK, resamples - start)
        blocks.append(rng.multinomial(n, [1.0 / n] * n, size=size))
    return np.concatenate(blocks).astype(np.float64)


def _resampled_means(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """NaN-ignoring means of ``values`` ``(rows, n)`` under every resample -> ``(rows, R)``.

    An infinite value (psnr of identical maps) makes the mean of a resample that draws it
    infinite; a resample that does not draw it keeps a finite mean.
    """
    valid = ~np.isnan(values)
    finite = valid & ~np.isinf(values)
    with np.errstate(divide="ignore", invalid="ignore"):
        means = (np.where(finite, values, 0.0) @ weights.T) / (valid @ weights.T)
    plus = (values == math.inf).astype(np.float64) @ weights.T > 0
    minus = (values == -math.inf).astype(np.float64) @ weights.T > 0
    means[plus] = math.inf
    means[minus] = -math.inf
    means[plus & minus] = math.nan
    return means


def _percentiles(distribution: np.ndarray | None, rows: int) -> tuple[np.ndarray, np.ndarray]:
    if distribution is None:
        return np.full(rows, math.nan), np.full(rows, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low = np.nanpercentile(distribution, 2.5, axis=1)
        high = np.nanpercentile(distribution, 97.5, axis=1)
        # with an infinite resample, linear interpolation gives NaN: the bounding resamples
        for row in np.flatnonzero(np.isinf(distribution).any(axis=1)):
            low[row] = np.nanpercentile(distribution[row], 2.5, method="lower")
            high[row] = np.nanpercentile(distribution[row], 97.5, method="higher")
        return low, high


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def _vs_chance(eq: np.ndarray, chance: np.ndarray) -> np.ndarray:
    eq, chance = np.asarray(eq, np.float64), np.asarray(chance, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        # undefined where chance is 1 up to rounding (1 - chance is then rounding)
        return np.where(chance < 1 - CHANCE_MARGIN, (eq - chance) / (1 - chance), math.nan)


# ------------------------------------------------------------------------------------------------
# Data


def _sources_tensor(images, where: str) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{where}: expected a tensor of images, found {type(images).__name__}")
    given = tuple(images.shape)
    if images.dim() == 3:
        images = images[None]  # one image (3, H, W)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise image_shape_error(where, given)
    if images.shape[0] == 0:
        raise ValueError(f"{where}: the batch holds no images (shape {given})")
    if not (images.dtype == torch.uint8 or images.is_floating_point()):
        raise TypeError(f"{where}: expected uint8 or floating images, found {images.dtype}")
    check_finite_pixels(images, where)
    warn_raw_float_pixels(images)
    return images.repeat(1, 3, 1, 1) if images.shape[1] == 1 else images


def _tensor_labels(labels, count: int, total: int, limit: int | None) -> torch.Tensor | None:
    """``labels=`` of the ``count`` measured images of ``total`` (the first ``limit``)."""
    if labels is None:
        return None
    labels = torch.as_tensor(labels).long()
    if limit and labels.shape == (total,):
        labels = labels[:limit]  # labels of all the images: keep those measured
    if labels.shape != (count,):
        raise ValueError(f"labels: expected shape ({count},), found {tuple(labels.shape)}")
    return labels


class _Data:
    """Batches ``(sources, labels)`` of crop-protocol sources of ``input_size + 2 * margin``."""

    def __init__(
        self,
        data,
        labels,
        batch_size: int,
        input_size,
        preprocess,
        group: Group,
        num_workers,
        limit,
    ):
        self.group, self.batch_size, self.limit = group, batch_size, limit
        self.model_size = preprocess.input_size  # the model's configured input size
        self.input_size_arg = (
            None if input_size is None else (int(input_size[0]), int(input_size[1]))
        )
        self.skipped: list[tuple[str, str]] = []
        self.total: int | None = None
        self.input_size: tuple[int, int] | None = None
        self.margin: tuple[int, int] | None = None
        self.folder = None
        self.tensor: torch.Tensor | None = None
        self.labels = None
        self.iterable = None
        if type(data).__module__ == "numpy" and getattr(data, "ndim", 0) >= 3:
            # an array of images is a tensor of them (a copy where its strides are negative)
            data = torch.from_numpy(np.ascontiguousarray(data))
        if input_size is not None:
            # Decoded images (samples, folders) are resized and cropped for the given input size.
            preprocess = dataclasses.replace(preprocess, input_size=self.input_size_arg)
        if data is None or (isinstance(data, str) and data == "samples"):
            from .data.samples import load_samples

            self.loader = "samples"
            self._fix_input(tuple(input_size or preprocess.input_size))
            sources, _ = load_samples(preprocess, margin=self.margin)
            self.tensor = sources[:limit] if limit else sources
            self.labels = _tensor_labels(labels, self.tensor.shape[0], sources.shape[0], limit)
        elif is_image_list(data):
            self.loader = "images"
            self._fix_input(tuple(input_size or preprocess.input_size))
            images = [data] if not isinstance(data, (list, tuple)) else list(data)
            kept = images[:limit] if limit else images
            self.tensor = image_sources(kept, preprocess, self.margin)
            self.labels = _tensor_labels(labels, len(kept), len(images), limit)
        elif labels is not None and not isinstance(data, torch.Tensor):
            where = ("a folder has the labels of its class subfolders (ImageNet layout) or of "
                     "its .txt file list ('path label' lines), and a list of files those of its "
                     "(path, label) pairs" if isinstance(data, (str, Path)) or is_path_list(data)
                     else "an iterable gives them with each batch, as (images, labels)")
            raise ValueError(f"labels: given for data of type {type(data).__name__}, which "
                             f"takes no separate labels: {where}; expected labels=None here "
                             "(labels= is for a tensor of images, Pillow images or the sample "
                             "photographs)")
        elif isinstance(data, (str, Path)) or is_path_list(data):
            from .data.folder import ImageFolderSource

            self.loader = "folder"
            self._fix_input(tuple(input_size or preprocess.input_size))
            kwargs = {} if num_workers is None else {"num_workers": num_workers}
            self.folder = ImageFolderSource(
                data, preprocess, self.margin, batch_size, limit=limit, **kwargs
            )
            self.total = len(self.folder)
        elif isinstance(data, torch.Tensor):
            self.loader = "tensor"
            sources = _sources_tensor(data, "data")
            self.tensor = sources[:limit] if limit else sources
            self._from_sources(self.tensor.shape[-2:])
            self.labels = _tensor_labels(labels, self.tensor.shape[0], sources.shape[0], limit)
        elif isinstance(data, Iterable):
            self.loader = "iterable"
            self.iterable = data
        else:
            raise TypeError(
                "data: expected a tensor, an iterable of batches, a folder, a list of image "
                f"paths or 'samples'; found {type(data).__name__}"
            )
        if self.tensor is not None:
            self.total = self.tensor.shape[0]

    def _fix_input(self, input_size) -> None:
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.margin = self.group.margin(*self.input_size)

    def _from_sources(self, source_hw) -> None:
        """Geometry from the sources: they are the input plus the group's margin on each side."""
        if self.input_size_arg is not None:
            self._fix_input(self.input_size_arg)
            return
        height, width = int(source_hw[0]), int(source_hw[1])
        margin = self.group.margin(height, width)
        input_size = (height - 2 * margin[0], width - 2 * margin[1])
        if min(input_size) < 1:
            raise ValueError(
                f"data: sources of {height}x{width} leave no image after a margin of {margin}"
            )
        self._fix_input(input_size)
        warn_unmargined_sources((height, width), margin, self.model_size,
                                self.group.margin(*self.model_size), stacklevel=4)

    def _crop(self, sources: torch.Tensor, where: str) -> torch.Tensor:
        want_h = self.input_size[0] + 2 * self.margin[0]
        want_w = self.input_size[1] + 2 * self.margin[1]
        height, width = sources.shape[-2:]
        if height < want_h or width < want_w:
            raise ValueError(
                f"{where}: sources of {height}x{width} are smaller than the "
                f"{want_h}x{want_w} the measurement needs"
            )
        top, left = (height - want_h) // 2, (width - want_w) // 2
        return sources[..., top : top + want_h, left : left + want_w]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.tensor is not None:
            for start in range(0, self.tensor.shape[0], self.batch_size):
                sources = self.tensor[start : start + self.batch_size]
                if self.loader == "tensor":
                    sources = self._crop(sources, "data")
                labels = None if self.labels is None else self.labels[start : start + len(sources)]
                yield sources, labels
        elif self.folder is not None:
            for sources, labels, _paths in self.folder:
                self.skipped = list(self.folder.skipped)
                yield sources, labels
            self.skipped = list(self.folder.skipped)
        else:
            seen = 0
            warned_crop = False
            for index, item in enumerate(self.iterable):
                labels = None
                if isinstance(item, (tuple, list)):
                    if not item:
                        raise ValueError(f"data batch {index}: empty tuple")
                    images, labels = item[0], (item[1] if len(item) > 1 else None)
                else:
                    images = item
                images = _sources_tensor(images, f"data batch {index}")
                if self.input_size is None:
                    self._from_sources(images.shape[-2:])
                if labels is not None:
                    labels = torch.as_tensor(labels).long().reshape(-1)
                    if labels.shape[0] != images.shape[0]:
                        raise ValueError(
                            f"data batch {index}: {images.shape[0]} images but "
                            f"{labels.shape[0]} labels"
                        )
                if self.limit is not None:
                    images = images[: self.limit - seen]
                    labels = None if labels is None else labels[: images.shape[0]]
                    if images.shape[0] == 0:
                        break
                seen += images.shape[0]
                if self.input_size_arg is None and not warned_crop:
                    first = (self.input_size[0] + 2 * self.margin[0],
                             self.input_size[1] + 2 * self.margin[1])
                    warned_crop = warn_cropped_batch(f"data batch {index}", images.shape[-2:],
                                                     first, stacklevel=3)
                yield self._crop(images, f"data batch {index}"), labels


def _normalized(sources: torch.Tensor, preprocess, channels: int = 3) -> torch.Tensor:
    """float64 sources: uint8 -> ``(v / 255 - mean) / std``; float sources as they are. For a
    model of one channel, the luma of the RGB values first (ITU-R BT.601)."""
    values = sources.to(torch.float64)
    if channels == 1:
        luma = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64, device=values.device)
        values = torch.einsum("bchw,c->bhw", values, luma)[:, None]
    if sources.dtype != torch.uint8:
        return values
    mean, std = channel_normalization(preprocess, channels)
    mean = torch.tensor(mean, dtype=torch.float64, device=values.device)
    std = torch.tensor(std, dtype=torch.float64, device=values.device)
    return (values / 255.0 - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# ------------------------------------------------------------------------------------------------
# The loop


def _resolve_group(group) -> Group:
    if group is None:
        return default_group()
    if isinstance(group, str):
        return parse_group(group)
    if isinstance(group, Group):
        return group
    raise TypeError(f"group: expected a Group, a spec string or None, found {type(group).__name__}")


def _probe_layouts(
    module, names, input_size, overrides, device, dtype, lenient: bool = False,
    by_name: bool = False,
) -> dict[str, FeatureLayout]:
    """Layouts of the layers that can be measured (a broad selection leaves the others out).
    ``by_name``: the model was built by name (what a failing model's message suggests)."""
    shapes: dict[str, torch.Tensor] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:
        shapes.setdefault(name, tensor)

    hooks = LayerHooks(module, names, keep, lenient=lenient, record_shapes=True)
    # two different images: a layer whose output does not follow the batch, or does not
    # depend on the input, shows it (engine's probe)
    probe = probe_inputs(input_size, device, dtype, channels=input_channels(module)).detach()
    run_probe(module, probe, hooks, torch.inference_mode(), by_name=by_name)
    _, layouts = measurable_layers(names, shapes, hooks.unmeasurable, input_size, overrides,
                                   lenient, prefix_tokens_of(module), token_order_of(module),
                                   calls=hooks.calls,
                                   channels_first=channels_first_of(module, hooks.shapes,
                                                                    input_size),
                                   attention_candidates=attention_map_candidates(module, names))
    layouts = refine_layouts(module, layouts, input_size, device, dtype, overrides,
                             lenient=lenient)
    warn_undeclared_channels(module, layouts)
    return layouts


def measure(
    model: nn.Module | str,
    data: Any = "samples",
    group: Group | str | None = None,
    layers: LayerSpec = None,
    metrics: Sequence[str] | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    *,
    labels: torch.Tensor | Sequence[int] | None = None,
    input_size: tuple[int, int] | None = None,
    layouts: Mapping[str, str] | None = None,
    align: AlignSpec = "auto",
    subpixel: str = "bilinear",
    channel_map: str = "identity",
    ridge: float = 1e-3,
    mask: str | None = None,
    comparisons: Sequence[str] = COMPARISONS,
    pooled: bool = False,
    bootstrap: int = 1000,
    seed: int = 0,
    elements_per_chunk: int | None = None,
    dtype: torch.dtype | None = None,
    channels_last: bool | None = None,
    limit: int | None = None,
    num_workers: int | None = None,
    progress: bool = True,
    model_name: str | None = None,
    force_reference: bool = False,
) -> Result:
    """The measurement of :func:`equifast.measure`, done the plain way (module docstring).

    Takes the same arguments and returns a :class:`Result` with the same rows and columns
    (``elements_per_chunk`` and ``force_reference`` are accepted and ignored: every element gets a
    forward of its own). ``config["loop"]`` is ``"naive"``. ``loader``, ``distributed`` and
    ``baseline`` are the engine's alone: the frame's baseline columns are NaN here.

    Args:
        model: A module, or a timm name / ``"tv:<torchvision name>"``.
        data: A tensor ``(N, 3, H, W)`` of sources (uint8 is normalized with the model's mean and
            std, float taken as is), an iterable of ``images`` or ``(images, labels)``, a folder
            path, an image file, a ``.txt`` file list, a list of image paths (or of
            ``(path, label)`` pairs), a Pillow image or a list of them, a numpy array as a
            tensor, or ``"samples"``.
        group: Group elements (default: translations by 8, 16, 32 pixels).
        layers: Layers to measure (:func:`equifast.layers.select_layers`).
        metrics: Scores (``METRICS``; default ``DEFAULT_METRICS``; ``corr`` always).
        batch_size: Images per batch (and per forward).
        device: Where the model runs (default: its parameters' device).
        labels: Labels of a tensor ``data`` (top-1 / top-5).
        input_size: ``(H, W)`` of the model input (default: sources minus the margins).
        layouts: Layout overrides per layer.
        align: Grid offsets (:func:`equifast.align.find_offsets`).
        subpixel: ``"bilinear"`` or ``"skip"`` (NaN for fractional re-alignments).
        channel_map: ``"identity"``, ``"match"`` or ``"linear"`` (as in
            :func:`equifast.measure`). ``"linear"`` keeps every compared pair of every image
            until the end (one pass; the maps are fitted with :func:`fit_linear_map`): for
            small tests only.
        ridge: The ridge penalty of ``channel_map="linear"`` (as in :func:`equifast.measure`).
        mask: ``None`` or ``"disc"`` (as in :func:`equifast.measure`; here decided in input
            pixels, :func:`inside_image_disc`).
        comparisons: Which of ``("eq", "inv", "chance")`` to report.
        pooled: Score the values pooled over all images (CIs from resampling batches).
        bootstrap: Resamples of the 95% intervals (0: none).
        seed: Seed of the bootstrap and the alignment probe.
        elements_per_chunk: Ignored.
        dtype: Model dtype; the model is converted in place, as by ``Module.to`` (default: the
            model's own dtype when it is not float32; else float32, bfloat16 autocast on CUDA).
        channels_last: Input memory format (default: True on CUDA).
        limit: At most this many images.
        num_workers: Loader workers for a folder.
        progress: Show a progress bar over the images, and one over the layers the
            ``align="auto"`` probe reads where that takes more than two seconds.
        model_name: Name recorded in the result.
        force_reference: Ignored.

    Returns:
        A :class:`equifast.Result`.
    """
    started = time.perf_counter()
    group = _resolve_group(group)
    metric_names = _check_metrics(metrics)
    if isinstance(comparisons, str):
        comparisons = [comparisons]
    unknown = [c for c in comparisons if c not in COMPARISONS]
    if unknown:
        raise ValueError(f"comparisons: expected some of {COMPARISONS}, found {unknown}")
    if not comparisons:
        raise ValueError(f"comparisons: expected at least one of {COMPARISONS}, found none")
    if subpixel not in ("bilinear", "skip"):
        raise ValueError(f"subpixel: expected 'bilinear' or 'skip', found {subpixel!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, found {batch_size}")
    input_size = check_run_arguments(input_size, align, limit, bootstrap)
    if channel_map not in CHANNEL_MAPS:
        raise ValueError(f"channel_map: expected one of {CHANNEL_MAPS}, found {channel_map!r}")
    if channel_map == "linear" and (isinstance(ridge, bool) or not isinstance(ridge, (int, float))
                                    or not (math.isfinite(ridge) and ridge > 0)):
        raise ValueError(f"ridge: expected a positive finite number, found {ridge!r}")
    check_mask(mask, list(group))

    from .models import check_device, model_dtype_for, resolve_model

    # built, seeded and sized as equifast.measure builds it
    resolved = resolve_model(model, seed, input_size, model_name)
    module, preprocess, model_name = resolved.module, resolved.preprocess, resolved.name
    note, pretrained = resolved.note, resolved.pretrained
    layers, layouts, align = resolved.own_names(layers, layouts, align)
    check_layer_keys(module, layouts, "layouts")
    check_layer_keys(module, align, "align")
    channels = resolved.channels  # 1: a greyscale model, fed the luma of the images
    module.eval()
    if device is None:
        parameter = next(module.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = check_device(device)
    model_dtype, autocast = model_dtype_for(module, dtype, device)
    module.to(device)
    if dtype is not None:
        module.to(dtype)  # in place, as Module.to: the caller's model stays in this dtype
    if channels_last is None:
        channels_last = device.type == "cuda"

    source = _Data(data, labels, batch_size, input_size, preprocess, group, num_workers, limit)
    batches = iter(source)
    first = next(batches, None)
    if first is None:
        raise ValueError(no_images_message(source.skipped))
    height, width = source.input_size
    margin = source.margin
    check_circular(list(group), height, width)

    names = select_layers(module, layers)
    layer_layouts = _probe_layouts(
        module, names, (height, width), layouts or {}, device, model_dtype,
        lenient=is_broad_selection(layers, module), by_name=resolved.by_name is not None,
    )
    names = [n for n in names if n in layer_layouts]
    readings: dict[str, str] = {}
    offsets = find_offsets(
        module, layer_layouts, (height, width), align, device, model_dtype, seed=seed,
        readings=readings, progress=progress,
    )
    elements = list(group)
    count = len(elements)
    image_maps = [
        np.linalg.inv(np.vstack([e.matrix(height, width), [0.0, 0.0, 1.0]]))[:2] for e in elements
    ]
    forward_maps = np.stack([e.matrix(height, width) for e in elements])
    warn_estimated_offsets(readings, forward_maps[:, :, :2], stacklevel=2)
    feature_maps: dict[str, np.ndarray] = {}
    for name in names:
        layout = layer_layouts[name]
        if layout.kind == "vector":
            feature_maps[name] = np.stack([_IDENTITY_MAP] * count)
        else:
            feature_maps[name] = feature_source_affines(forward_maps, layout.stride, offsets[name])
    exact = {n: np.array([_is_integer_map(a) for a in feature_maps[n]]) for n in names}

    # Per layer: per batch, per-image scores {metric: (3, K, B)}, pooled moments (3, K, C, 6) and
    # the images in those sums (3, K + 1): with a valid position, under some element for the last.
    per_image: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in names}
    pooled_sums: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    pooled_images: dict[str, list[np.ndarray]] = {n: [] for n in names}
    consistency_rows: list[np.ndarray] = []
    top_rows: list[np.ndarray] = []
    warned_output: list[bool] = []  # one warning per call for output that is not logits
    # channel_map="linear": (name, comparison, element) -> [(batch number, first image's place,
    # a, b, valid)], scored once every map is fitted
    linear_pairs: dict[tuple[str, int, int], list[tuple]] = {}
    headless = is_headless(module)  # num_classes=0: the output is pooled features

    def forward(images: torch.Tensor):
        """One forward; returns the output and a float64 ``(B, C, h, w)`` view of every layer."""
        kept: dict[str, torch.Tensor] = {}

        def keep(name: str, tensor: torch.Tensor) -> None:
            # Copy now: a later in-place op (ReLU(inplace=True)) must not change what was seen.
            kept.setdefault(name, tensor.detach().to(torch.float64, copy=True))

        images = images.to(model_dtype)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        autocast_context = (
            torch.autocast(device.type, torch.bfloat16) if autocast else nullcontext()
        )
        with torch.inference_mode(), LayerHooks(module, names, keep), autocast_context:
            output = module(images)
        grids = {}
        for name in names:
            layout = layer_layouts[name]
            if layout.kind == "vector":  # the whole vector is one channel, its entries positions
                grids[name] = kept[name].reshape(kept[name].shape[0], 1, 1, -1)
            else:
                grids[name] = grid_view(kept[name], layout)
        logits = logits_of(output, headless)
        if logits is None and deserves_logits_warning(output, headless) and not warned_output:
            warned_output.append(True)
            warn_not_logits(output, stacklevel=4, headless=headless)  # the caller of measure
        return logits, grids

    def run_batch(sources: torch.Tensor, batch_labels: torch.Tensor | None) -> None:
        values = _normalized(sources.to(device), preprocess, channels)
        batch = values.shape[0]
        window = values[:, :, margin[0] : margin[0] + height, margin[1] : margin[1] + width]
        identity_logits, identity = forward(window)
        scores = {n: {m: np.full((3, count, batch), math.nan) for m in metric_names} for n in names}
        sums = {
            n: torch.zeros(3, count, identity[n].shape[1], 6, dtype=torch.float64) for n in names
        }
        summed = {n: np.zeros((3, count), dtype=bool) for n in names}  # the images' (c, k)
        same_class = []
        for k, element in enumerate(elements):
            images = transform(values, image_maps[k], element.protocol, margin, (height, width))
            logits, moved_grids = forward(images)
            if identity_logits is not None and logits is not None:
                same_class.append((logits.argmax(-1) == identity_logits.argmax(-1)).cpu().numpy())
            for name in names:
                source_map = feature_maps[name][k]
                if subpixel == "skip" and not exact[name][k]:
                    continue  # not evaluated: NaN scores, nothing pooled
                a = moved_grids[name]
                b_identity = identity[name]
                # (a grid that does not tile the image, 17 cells of stride 2 at 33 px, wraps at a
                # seam the image does not have: its wrapped band is masked instead)
                wrap = (element.protocol == "circular"
                        and layer_layouts[name].tiles((height, width)))
                b_moved, valid = realign(b_identity, source_map, wrap)
                if mask == "disc" and layer_layouts[name].kind != "vector":  # (no positions)
                    valid = valid & inside_image_disc(source_map, layer_layouts[name],
                                                      offsets[name], (height, width)
                                                      ).to(valid.device)
                pairs = [(0, b_moved), (1, b_identity)]
                if batch > 1:  # chance: image n against image (n + 1) mod B
                    pairs.append((2, torch.roll(b_moved, -1, 0)))
                for c, b in pairs:
                    if channel_map == "linear":
                        linear_pairs.setdefault((name, c, k), []).append(
                            (len(per_image[name]), images_seen[0], a.cpu(), b.cpu(), valid.cpu()))
                        summed[name][c, k] = bool(valid.any())
                        continue
                    if channel_map == "match":  # the same matching as the engine's
                        b = match_channels(a, b, valid)
                    for metric, value in pair_scores(a, b, valid, metric_names).items():
                        scores[name][metric][c, k] = value.cpu().numpy()
                    if pooled:
                        sums[name][c, k] = pair_moments(a, b, valid).cpu()
                        summed[name][c, k] = bool(valid.any())  # the same for every image
        for name in names:
            per_image[name].append(scores[name])
            pooled_sums[name].append(sums[name])
            pooled_images[name].append(
                batch * np.concatenate([summed[name], summed[name].any(1, keepdims=True)], 1)
            )
        if identity_logits is not None and len(same_class) == count:
            consistency_rows.append(np.stack(same_class).astype(np.float64))  # (K, B)
            if batch_labels is not None:
                batch_labels = batch_labels.to(identity_logits.device)
                top = identity_logits.topk(min(5, identity_logits.shape[-1]), -1).indices
                hit1 = (top[:, 0] == batch_labels).double()
                hit5 = (top == batch_labels[:, None]).any(-1).double()
                unknown_label = batch_labels < 0
                hit1[unknown_label], hit5[unknown_label] = math.nan, math.nan
                top_rows.append(torch.stack([hit1, hit5]).cpu().numpy())

    progress_bar = None
    if progress:
        from tqdm.auto import tqdm

        progress_bar = tqdm(total=source.total, unit="img", desc=f"naive {model_name}", leave=False)
    images_done = 0
    images_seen = [0]  # (read by run_batch: the place of the batch's first image)
    pending = first
    while pending is not None:
        run_batch(*pending)
        images_done += pending[0].shape[0]
        images_seen[0] = images_done
        if progress_bar is not None:
            progress_bar.update(pending[0].shape[0])
        pending = next(batches, None)
    if progress_bar is not None:
        progress_bar.close()
    if channel_map == "linear":
        if images_done < LINEAR_FOLDS:
            raise ValueError(f"channel_map='linear': expected at least {LINEAR_FOLDS} images "
                             f"(one fits the map that scores the other), found {images_done}")
        _score_linear(linear_pairs, ridge, metric_names, per_image, pooled_sums, pooled)

    frame = _frame(
        names,
        layer_layouts,
        offsets,
        exact,
        per_image,
        pooled_sums,
        pooled_images,
        elements,
        comparisons,
        metric_names,
        pooled,
        bootstrap,
        seed,
        model_name,
        images_done,
    )
    model_frame = _model_frame(model_name, consistency_rows, top_rows, bootstrap, seed)
    elapsed = time.perf_counter() - started
    config = {
        "model": model_name,
        "pretrained": pretrained,
        "note": note,
        "group": group.name,
        "elements": group.names,
        "layers": names,
        "layouts": {n: layer_layouts[n].layout for n in names},
        "offsets": {n: list(offsets[n]) for n in names if not np.isnan(offsets[n]).all()},
        "offset_readings": {n: readings[n] for n in names if n in readings},
        "input_size": [height, width],
        "margin": list(margin),
        "batch_size": batch_size,
        "elements_per_chunk": 1,
        "align": align if isinstance(align, (str, int, float)) else str(align),
        "subpixel": subpixel,
        "channel_map": channel_map,
        **({"ridge": ridge, "folds": LINEAR_FOLDS} if channel_map == "linear" else {}),
        "mask": mask,
        "metrics": list(metric_names),
        "pooled": pooled,
        "bootstrap": bootstrap,
        "seed": seed,
        "device": str(device),
        "dtype": "bfloat16-autocast" if autocast else str(model_dtype).replace("torch.", ""),
        "images": images_done,
        "loader": source.loader,
        "backend": "naive",
        "loop": "naive",
        "preprocess": {
            k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(preprocess).items()
        },
        "seconds": elapsed,
        "images_per_second": images_done / elapsed if elapsed > 0 else None,
        "versions": {"torch": torch.__version__},
    }
    warn_undefined_elements(frame, subpixel)
    warn_undefined_chance(frame)
    warn_skipped(source.skipped, images_done)
    return Result(frame=frame, model_frame=model_frame, config=config, skipped=source.skipped)


def _score_linear(linear_pairs, ridge, metric_names, per_image, pooled_sums, pooled) -> None:
    """Fit every (layer, comparison, element)'s map on each fold's kept pairs and score each
    image with the map of the other fold, into ``per_image`` and ``pooled_sums``."""
    for (name, c, k), kept in linear_pairs.items():
        maps = []
        for fold in range(LINEAR_FOLDS):
            a_parts, b_parts = [], []
            for _, first_place, a, b, valid in kept:
                for n in range(a.shape[0]):
                    if (first_place + n) % LINEAR_FOLDS == fold:
                        a_parts.append(a[n][:, valid])  # (C, m)
                        b_parts.append(b[n][:, valid])
            a_values = torch.cat(a_parts, 1) if a_parts else torch.zeros(0, 0)
            b_values = torch.cat(b_parts, 1) if b_parts else torch.zeros(0, 0)
            maps.append(fit_linear_map(a_values, b_values, ridge) if a_parts else None)
        for batch_number, first_place, a, b, valid in kept:
            predicted = torch.full_like(b, math.nan)
            scored = torch.zeros(a.shape[0], dtype=torch.bool)
            for n in range(a.shape[0]):
                used = maps[(first_place + n + 1) % LINEAR_FOLDS]  # the other fold's map
                if used is None:
                    continue
                scored[n] = True
                flat = b[n].reshape(b.shape[1], -1)
                predicted[n] = (used[:, :-1] @ flat + used[:, -1:]).reshape(b[n].shape)
            for metric, value in pair_scores(a, predicted, valid, metric_names).items():
                value = torch.where(scored, value, math.nan)
                per_image[name][batch_number][metric][c, k] = value.numpy()
            if pooled:
                pooled_sums[name][batch_number][c, k] = pair_moments(a[scored], predicted[scored],
                                                                  valid)


# ------------------------------------------------------------------------------------------------
# Aggregation


def _pooled_points(batch_sums: list[torch.Tensor], metric_names, bootstrap: int, seed: int):
    """Scores of the values pooled over all images, and over resampled batches.

    Returns:
        ``({metric: (3, K + 1)}, {metric: (3, K + 1, R)} or None)``; the last column is the mean
        over the elements.
    """
    stacked = torch.stack(batch_sums)  # (batches, 3, K, C, 6) centred moments

    def scored(weights: torch.Tensor) -> dict[str, np.ndarray]:
        merged = merge_moments(stacked, weights)  # batch b taken weights[b] times
        out = {}
        for metric, value in moments_scores(merged, metric_names).items():
            value = value.numpy()  # (3, K)
            out[metric] = np.concatenate([value, _nanmean(value, 1)[:, None]], 1)
        return out

    batches = stacked.shape[0]
    points = scored(torch.ones(batches, dtype=torch.float64))
    if bootstrap <= 0 or batches < 2:
        return points, None
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(batches, np.full(batches, 1.0 / batches), size=bootstrap)
    resampled = [scored(torch.from_numpy(w.astype(np.float64))) for w in weights]
    return points, {m: np.stack([r[m] for r in resampled], -1) for m in metric_names}


def _frame(
    names,
    layer_layouts,
    offsets,
    exact,
    per_image,
    pooled_sums,
    pooled_images,
    elements,
    comparisons,
    metric_names,
    pooled,
    bootstrap,
    seed,
    model_name,
    images,
) -> pd.DataFrame:
    count = len(elements)
    element_names = [e.name for e in elements] + ["mean"]
    weights = None if pooled else resample_weights(images, bootstrap, seed)
    records = []
    for depth, name in enumerate(names):
        layout = layer_layouts[name]
        base = {
            "model": model_name,
            "layer": name,
            "depth": depth,
            "rel_depth": depth / max(len(names) - 1, 1),
            "kind": layout.kind,
            "layout": layout.layout,
            "grid_h": layout.grid_h,
            "grid_w": layout.grid_w,
            "channels": layout.channels,
            "prefix": layout.prefix,
            "stride_y": layout.stride[0],
            "stride_x": layout.stride[1],
            "stride": layout.stride[0] if layout.stride[0] == layout.stride[1] else math.nan,
            "offset_y": offsets[name][0],
            "offset_x": offsets[name][1],
            "pooled": pooled,
        }
        layer_exact = [bool(e) for e in exact[name]] + [bool(np.all(exact[name]))]
        keys = [
            (metric, comparison, k)
            for metric in metric_names
            for comparison in comparisons
            for k in range(count + 1)
        ]
        if pooled:
            points, distributions = _pooled_points(pooled_sums[name], metric_names, bootstrap, seed)
            point = np.array([points[m][COMPARISONS.index(c), k] for m, c, k in keys])
            distribution = (
                None
                if distributions is None
                else np.stack([distributions[m][COMPARISONS.index(c), k] for m, c, k in keys])
            )
            images_in = np.sum(pooled_images[name], 0)  # (3, K + 1)
            counts = np.array([images_in[COMPARISONS.index(c), k] for _, c, k in keys])
        else:
            rows = []
            for metric, comparison, k in keys:
                # (K, N): every image's score for every element
                values = np.concatenate(
                    [s[metric][COMPARISONS.index(comparison)] for s in per_image[name]], axis=1
                )
                rows.append(values[k] if k < count else _nanmean(values, 0))
            matrix = np.array(rows)  # (rows, N)
            point = _nanmean(matrix, 1)
            counts = (~np.isnan(matrix)).sum(1)
            distribution = None if weights is None else _resampled_means(matrix, weights)
        low, high = _percentiles(distribution, len(keys))
        index = {}
        for i, (metric, comparison, k) in enumerate(keys):
            index[metric, comparison, k] = i
            records.append(
                {
                    **base,
                    "element": element_names[k],
                    "exact": layer_exact[k],
                    "comparison": comparison,
                    "metric": metric,
                    "value": float(point[i]),
                    "ci_low": float(low[i]),
                    "ci_high": float(high[i]),
                    "n": int(counts[i]),
                }
            )
        if "eq" in comparisons and "chance" in comparisons:
            for k in range(count + 1):
                i_eq, i_chance = index["corr", "eq", k], index["corr", "chance", k]
                value = float(_vs_chance(point[i_eq], point[i_chance]))
                if distribution is None:
                    ci = (math.nan, math.nan)
                else:
                    ratio = _vs_chance(distribution[i_eq], distribution[i_chance])[None]
                    lows, highs = _percentiles(ratio, 1)
                    ci = (float(lows[0]), float(highs[0]))
                records.append(
                    {
                        **base,
                        "element": element_names[k],
                        "exact": layer_exact[k],
                        "comparison": "eq",
                        "metric": "corr_vs_chance",
                        "value": value,
                        "ci_low": ci[0],
                        "ci_high": ci[1],
                        "n": int(min(counts[i_eq], counts[i_chance])),
                    }
                )
    return pd.DataFrame.from_records(records, columns=FRAME_COLUMNS)


def _model_frame(model_name, consistency_rows, top_rows, bootstrap, seed) -> pd.DataFrame:
    if not consistency_rows:
        return pd.DataFrame(columns=MODEL_COLUMNS)
    rows = [("consistency", np.concatenate(consistency_rows, axis=1).mean(0))]
    if top_rows:
        top = np.concatenate(top_rows, axis=1)
        rows += [("top1", top[0]), ("top5", top[1])]
    matrix = np.array([values for _, values in rows])
    weights = resample_weights(matrix.shape[1], bootstrap, seed)
    low, high = _percentiles(
        None if weights is None else _resampled_means(matrix, weights), len(rows)
    )
    records = []
    for i, (metric, values) in enumerate(rows):
        records.append(
            {
                "model": model_name,
                "metric": metric,
                "value": float(_nanmean(values[None], 1)[0]),
                "ci_low": low[i],
                "ci_high": high[i],
                "n": int((~np.isnan(values)).sum()),
            }
        )
    return pd.DataFrame.from_records(records, columns=MODEL_COLUMNS)
