"""Scores from the six sufficient statistics, and their aggregation with bootstrap intervals.

Every score is a cheap function of the per-channel statistics ``(count, mean_a, mean_b, m2_a, m2_b,
c_ab)`` of a compared pair (``a``: features of the transformed image; ``b``: the features it is
compared with). See DESIGN.md section 1.4 for their meaning.

- ``corr``: channel-centred correlation ``sum_c c_ab / sqrt(sum_c m2_a * sum_c m2_b)``; with
  ``pooled=True`` NaN where every channel is constant to rounding (``ROUNDING_RELATIVE``).
- ``one_minus_corr``: ``1 - corr``, the normalized difference of the standardized maps.
- ``corr_channelwise``: mean over non-flat channels of each channel's Pearson correlation.
- ``flat_frac``: share of channels spatially constant on either side.
- ``cosine``: ``sum ab / sqrt(sum a^2 sum b^2)``.
- ``nde``: ``sum (a - b)^2 / (sum a^2 + sum b^2)``.
- ``rel_err``: ``sqrt(sum (a - b)^2 / sum b^2)``.
- ``psnr``: ``10 log10(range^2 / mse)``; the six statistics hold no extremes, so ``range`` is taken
  as four standard deviations of ``b`` (all valid values, around their global mean: the +-2 sigma
  span), unless given.
- ``corr_vs_chance``: ``(corr_eq - corr_chance) / (1 - corr_chance)`` from the means over images.

Example:
    >>> import torch
    >>> stats = torch.tensor([[[4.0, 0.0, 0.0, 2.0, 2.0, 2.0]]], dtype=torch.float64)
    >>> float(score_stats(stats, ["corr"])["corr"][0])
    1.0
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np
import torch

from . import _ext

METRICS = ("corr", "one_minus_corr", "corr_channelwise", "flat_frac", "cosine", "nde", "rel_err",
           "psnr")
DEFAULT_METRICS = ("corr", "one_minus_corr", "corr_channelwise", "flat_frac", "cosine", "nde")
DERIVED_METRICS = ("corr_vs_chance",)

# A channel is flat when its spatial standard deviation is below 1e-6 of its mean level (rounding
# of a constant map after interpolation stays far below that) or below 1e-15 absolutely.
FLAT_RELATIVE = 1e-6
FLAT_ABSOLUTE = 1e-15
# Pooled corr is undefined where every channel's spatial standard deviation is below 1e-12 of
# its mean level on one side or both (about 1e4 float64 ulps). Each image's statistics are exact
# about one of its values, but their merge needs the differences of the images' means, rounded to
# an ulp of the level: for maps that vary by a few ulps (a sigmoid of values near 1e-16 is 0.5 to
# an ulp: the SE gates of a random-init EfficientNet in float64) that rounding is as large as the
# spread, and the pooled corr moved by 0.007 with the order of the merge. Far finer than
# FLAT_RELATIVE: deep layers at random init have real spreads of 1e-8 of their level.
ROUNDING_RELATIVE = 1e-12
# corr_vs_chance is undefined where the chance level is within this of 1: unrelated images then
# give the same features up to rounding (the logits of a random-init GoogLeNet: every corr
# 1 within 7e-16), and 1 - chance is rounding, which gave 1, 0.33 or NaN by the order of the sums.
# Nearly so (a random-init EfficientViT's head, a CSPNeXt gate: chance 1 - 1.5e-11), the ratio
# divides the rounding of float64 statistics (about 1e-15 in corr) by 1 - chance: the engine and
# the naive loop gave -4.0e-4 and -3.7e-4 for the same features. At 1e-9 that noise is 1e-6.
CHANCE_MARGIN = 1e-9


def check_metrics(metrics: Sequence[str] | None) -> tuple[str, ...]:
    """Validate a list of metric names (``None``: the defaults); ``corr`` is always included."""
    if metrics is None:
        return DEFAULT_METRICS
    if isinstance(metrics, str):
        metrics = (metrics,)  # metrics="psnr", as comparisons="eq" (not 'p', 's', 'n', 'r')
    metrics = tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS + DERIVED_METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; expected some of {METRICS + DERIVED_METRICS}")
    # corr is needed for corr_vs_chance and the summaries.
    return tuple(dict.fromkeys(("corr",) + tuple(m for m in metrics if m in METRICS)))


@functools.cache
def _has_compiled_op(device_type: str) -> bool:
    return _ext.has_kernel("score_stats", device_type)


def _channel_sums(terms: torch.Tensor, channel_counts: list[int] | None) -> torch.Tensor:
    """Sums over the last (channel) axis: whole, or per layer for ``channel_counts``."""
    if channel_counts is None:
        return terms.sum(-1)
    if len(channel_counts) == 1:
        return terms.sum(-1, keepdim=True)
    # One deterministic segmented reduction (each sum runs in channel order), instead of one
    # reduction per layer: on a GPU the launches, not the arithmetic, set the time of scoring.
    # `unsafe`: the counts were checked by the caller, and torch's own check reads them back from
    # the device (a synchronization per call).
    lengths = _counts_tensor(channel_counts, terms.device, torch.long)
    lengths = lengths.expand(*terms.shape[:-1], len(channel_counts))
    return torch.segment_reduce(terms, "sum", lengths=lengths, axis=terms.dim() - 1, unsafe=True)


_COUNTS_CACHE: dict[tuple, torch.Tensor] = {}


def _counts_tensor(counts: list[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``counts`` as a tensor on ``device``, made once: the engine scores the same layers every
    forward, and a fresh host-to-device copy would wait for the GPU each time."""
    key = (tuple(counts), str(device), dtype)
    tensor = _COUNTS_CACHE.get(key)
    if tensor is None:
        if len(_COUNTS_CACHE) >= 64:
            _COUNTS_CACHE.clear()
        tensor = _COUNTS_CACHE[key] = torch.tensor(counts, dtype=dtype, device=device)
    return tensor


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, NaN elsewhere."""
    return torch.where(den > 0, num / den, math.nan)


def score_stats(
    stats: torch.Tensor, metrics: Sequence[str] = DEFAULT_METRICS, psnr_range: float | None = None,
    channel_counts: Sequence[int] | None = None, force_reference: bool = False,
    pooled: bool = False,
) -> dict[str, torch.Tensor]:
    """Scores of compared pairs from their per-channel statistics.

    Args:
        stats: ``(..., C, 6)`` statistics (any float dtype; computed in float64).
        metrics: Which scores (names in ``METRICS``).
        psnr_range: Peak-to-peak range for ``psnr`` (``None``: four standard deviations of ``b``).
        channel_counts: Score several layers in one call: ``stats`` holds their channels one
            after the other (concatenated along the channel axis), ``channel_counts[i]`` of layer
            ``i``. ``None``: all channels are one layer.
        force_reference: Compute with torch ops even where the compiled op ``equifast::score_stats``
            exists (the CPU): one pass over the channels per layer, the same definitions, sums in
            channel order (the torch ops sum in another order: equal to about 1e-15 relative).
        pooled: The statistics were merged over images (``merge_stats``): ``corr`` and
            ``one_minus_corr`` are NaN where every channel is constant to rounding
            (``ROUNDING_RELATIVE``), which the merge cannot score.

    Returns:
        ``{metric: (...) float64 tensor}``, or ``(..., L)`` with ``L = len(channel_counts)``; NaN
        where undefined (no valid positions, all flat).

    Example (two layers of 1 and 2 channels scored in one call):
        >>> a = torch.tensor([4.0, 0.0, 0.0, 2.0, 2.0, 2.0], dtype=torch.float64)
        >>> b = torch.tensor([4.0, 0.0, 0.0, 2.0, 2.0, -2.0], dtype=torch.float64)
        >>> score_stats(torch.stack([a, a, b]), ["corr"], channel_counts=[1, 2])["corr"].tolist()
        [1.0, 0.0]
    """
    stats = stats.to(torch.float64)
    if stats.dim() < 2 or stats.shape[-1] != 6:
        raise ValueError(f"score_stats: expected statistics of shape (..., C, 6), found "
                         f"{tuple(stats.shape)}")
    if channel_counts is not None:
        channel_counts = [int(c) for c in channel_counts]
        if any(c < 1 for c in channel_counts) or sum(channel_counts) != stats.shape[-2]:
            raise ValueError(f"score_stats: channel_counts must be positive and add up to the "
                             f"{stats.shape[-2]} channels of the statistics, found "
                             f"{channel_counts}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; expected some of {METRICS}")
    if not force_reference and _has_compiled_op(stats.device.type):
        counts = channel_counts if channel_counts is not None else [stats.shape[-2]]
        table = torch.ops.equifast.score_stats(
            stats.contiguous(), counts, None if psnr_range is None else float(psnr_range))
        if channel_counts is None:
            table = table.squeeze(-2)
        out = {metric: table[..., METRICS.index(metric)] for metric in metrics}
    else:
        out = _score_stats_torch(stats, metrics, psnr_range, channel_counts)
    if pooled:
        _undefine_rounding_corr(out, stats, channel_counts)
    return out


def _undefine_rounding_corr(scores: dict[str, torch.Tensor], stats: torch.Tensor,
                            channel_counts: list[int] | None) -> None:
    """NaN in ``corr`` and ``one_minus_corr`` where every channel of a layer is constant to
    rounding on one side or both (``ROUNDING_RELATIVE``)."""
    count, mean_a, mean_b, m2_a, m2_b, _ = stats.unbind(-1)
    safe = torch.where(count > 0, count, 1.0)
    rounding = ((m2_a / safe <= (ROUNDING_RELATIVE * mean_a) ** 2)
                | (m2_b / safe <= (ROUNDING_RELATIVE * mean_b) ** 2))
    channels = (_counts_tensor(channel_counts, stats.device, torch.float64)
                if channel_counts is not None else float(stats.shape[-2]))
    undefined = _channel_sums(rounding.to(torch.float64), channel_counts) >= channels
    for metric in ("corr", "one_minus_corr"):
        if metric in scores:
            scores[metric] = torch.where(undefined, math.nan, scores[metric])


def _score_stats_torch(stats: torch.Tensor, metrics: Sequence[str], psnr_range: float | None,
                       channel_counts: list[int] | None) -> dict[str, torch.Tensor]:
    """score_stats with torch ops (every device)."""
    count, mean_a, mean_b, m2_a, m2_b, c_ab = stats.unbind(-1)
    out: dict[str, torch.Tensor] = {}
    # The channel sums every score needs, as one reduction of stacked per-channel terms (the
    # engine scores every layer of every batch: a few large ops beat many small ones). Stacked
    # along a new first axis, so that the copy and the reduction run over contiguous channels.
    weighted_a, weighted_b = count * mean_a, count * mean_b
    difference = mean_a - mean_b
    per_channel_terms = [
        count, m2_a, m2_b, c_ab,
        # sums of squares and products about zero, built from the centred moments without
        # cancellation-prone raw sums
        m2_a + weighted_a * mean_a, m2_b + weighted_b * mean_b, c_ab + weighted_a * mean_b,
        m2_a + m2_b - 2 * c_ab + count * difference * difference, weighted_b,
    ]
    with_flat = "flat_frac" in metrics or "corr_channelwise" in metrics
    if with_flat:
        # Channels spatially constant on either side.
        safe = torch.where(count > 0, count, 1.0)
        var_a, var_b = m2_a / safe, m2_b / safe
        flat_a = var_a <= (FLAT_RELATIVE * mean_a) ** 2 + FLAT_ABSOLUTE**2
        flat_b = var_b <= (FLAT_RELATIVE * mean_b) ** 2 + FLAT_ABSOLUTE**2
        flat = flat_a | flat_b
        # Each channel's Pearson correlation, zero where flat (left out of the mean).
        channelwise = torch.where(flat, 0.0, c_ab / torch.sqrt(torch.where(flat, 1.0, m2_a * m2_b)))
        per_channel_terms += [flat.to(torch.float64), channelwise]
    terms = _channel_sums(torch.stack(per_channel_terms), channel_counts)
    total, sum_m2_a, sum_m2_b, sum_c, sum_aa, sum_bb, sum_ab, sum_sq_diff, sum_weighted_b = (
        terms[:9].unbind(0)
    )
    # A sum of squares: rounding of the centred moments can take it just below zero for maps
    # equal to the statistics' precision; it is then zero.
    sum_sq_diff = sum_sq_diff.clamp_min(0)
    corr = _safe_div(sum_c, torch.sqrt(sum_m2_a * sum_m2_b))
    if with_flat:
        flat_channels, sum_channelwise = terms[9], terms[10]
        channels = (_counts_tensor(channel_counts, stats.device, torch.float64)
                    if channel_counts is not None else float(stats.shape[-2]))
    for metric in metrics:
        if metric == "corr":
            out[metric] = corr
        elif metric == "one_minus_corr":
            out[metric] = 1.0 - corr
        elif metric == "flat_frac":
            out[metric] = torch.where(total <= 0, math.nan, flat_channels / channels)
        elif metric == "corr_channelwise":
            value = _safe_div(sum_channelwise, channels - flat_channels)
            out[metric] = torch.where(total <= 0, math.nan, value)
        elif metric == "cosine":
            out[metric] = _safe_div(sum_ab, torch.sqrt(sum_aa * sum_bb))
        elif metric == "nde":
            out[metric] = _safe_div(sum_sq_diff, sum_aa + sum_bb)
        elif metric == "rel_err":
            out[metric] = torch.sqrt(_safe_div(sum_sq_diff, sum_bb))
        elif metric == "psnr":
            mse = _safe_div(sum_sq_diff, total)
            if psnr_range is None:
                # All valid values of b about their grand mean: within each channel, then its
                # mean about the grand one (sum b^2 - total * mean^2 cancels: every digit of
                # b = 1 + 1e-8 x is lost, and psnr was -inf).
                grand_mean_b = _safe_div(sum_weighted_b, total)
                if channel_counts is None:
                    grand = grand_mean_b.unsqueeze(-1)
                else:
                    grand = grand_mean_b.repeat_interleave(
                        _counts_tensor(channel_counts, stats.device, torch.long), dim=-1,
                        output_size=stats.shape[-2])
                between = mean_b - grand
                var_b = _safe_div(_channel_sums(m2_b + count * between * between, channel_counts),
                                  total)
                peak = 4.0 * torch.sqrt(var_b)
            else:
                peak = torch.full_like(mse, float(psnr_range))
            # Maps equal to the last bit (mse exactly 0) have an infinite PSNR, as skimage and
            # torchmetrics give it; 0 / 0 (b constant, a equal to it) has none.
            value = 10.0 * torch.log10(_safe_div(peak * peak, mse))
            out[metric] = torch.where((mse == 0) & (peak > 0), math.inf, value)
    return out


def corr_vs_chance(corr_eq: np.ndarray | float, corr_chance: np.ndarray | float):
    """Normalized equivariance ``(corr_eq - corr_chance) / (1 - corr_chance)``; NaN where the
    chance level is 1 within :data:`CHANCE_MARGIN`."""
    corr_eq, corr_chance = np.asarray(corr_eq, np.float64), np.asarray(corr_chance, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(corr_chance < 1 - CHANCE_MARGIN,
                        (corr_eq - corr_chance) / (1 - corr_chance), np.nan)
