"""Pure-PyTorch float64 references of the equifast ops: the oracle of the compiled kernels.

Convention:
    Affine maps are ``(2, 3)`` matrices acting on ``(x, y, 1)``: ``x`` is the column, ``y`` the row,
    pixel centres at integer coordinates, origin at the top-left pixel. The ops take *source*
    maps: output position ``u`` reads position ``A @ u`` of the input. A map whose entries are all
    integers (within ``INTEGER_TOLERANCE``) is applied by index arithmetic; any other map samples
    bilinearly.

    Bilinear sampling (shared by the kernels through ``csrc/include/equifast/affine.h``): for a
    source coordinate ``x``, ``x0 = floor(x)``, ``fx = x - x0``, neighbours ``x0`` and ``x0 + 1``;
    with wrapping both wrap modulo the size; without it a position counts as inside when
    ``-EDGE_TOLERANCE <= x <= size - 1 + EDGE_TOLERANCE`` and its neighbours are clamped into the
    grid.

    Disc (``disc=(cx, cy, rx, ry)`` in grid coordinates, the ``mask="disc"`` of the engine): a
    position of a comparison counts only where it and its source (the integer source of an exact
    map) both lie inside the ellipse ``((x - cx) / rx)**2 + ((y - cy) / ry)**2 <= 1 +
    DISC_TOLERANCE``, computed in this order in float64 (``affine.h``, ``inside_disc``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..groups import INTEGER_TOLERANCE
from ..layouts import grid_view
from ..scores import FLAT_ABSOLUTE, FLAT_RELATIVE

EDGE_TOLERANCE = 1e-6
DISC_TOLERANCE = 1e-9
STATS_FIELDS = ("count", "mean_a", "mean_b", "m2_a", "m2_b", "c_ab")
PROTOCOL_CROP, PROTOCOL_CIRCULAR, PROTOCOL_ZERO = 0, 1, 2
COMPARISONS = ("eq", "inv", "chance")


def is_integer_map(affine: torch.Tensor) -> bool:
    """Whether a ``(2, 3)`` map has integer entries (it is applied exactly)."""
    return bool(torch.all((affine - torch.round(affine)).abs() <= INTEGER_TOLERANCE))


def _grid_sources(affine: torch.Tensor, out_h: int, out_w: int):
    """``(xs, ys, src_x, src_y)``, each ``(out_h, out_w)`` float64: every output position and
    the source ``affine`` reads there, in the kernels' order of operations (``apply_map``)."""
    ys, xs = torch.meshgrid(
        torch.arange(out_h, dtype=torch.float64), torch.arange(out_w, dtype=torch.float64),
        indexing="ij",
    )
    src_x = affine[0, 0] * xs + affine[0, 1] * ys + affine[0, 2]
    src_y = affine[1, 0] * xs + affine[1, 1] * ys + affine[1, 2]
    return xs, ys, src_x, src_y


def _sample_plan(
    affine: torch.Tensor, out_h: int, out_w: int, size_h: int, size_w: int, wrap: bool,
    offset_y: int = 0, offset_x: int = 0, bound_h: int | None = None,
    bound_w: int | None = None,
):
    """Neighbour indices, weights and validity for sampling a ``size_h x size_w`` grid.

    Output position ``(x, y)`` reads source ``A @ (x, y, 1)`` (plus ``offset`` in the sampled grid,
    used for the crop margin). Wrapping happens modulo ``bound`` (the window size), validity is
    checked against ``bound`` when given (zero protocol) and against the sampled grid otherwise.

    Returns:
        ``(indices, weights, inside)``: ``indices`` is a list of ``(iy, ix)`` long tensors of shape
        ``(out_h, out_w)`` into the sampled grid, ``weights`` the matching float64 weights, and
        ``inside`` a per-neighbour validity list (False where a neighbour lies outside and must read
        the fill value).
    """
    affine = affine.to(torch.float64)
    _, _, src_x, src_y = _grid_sources(affine, out_h, out_w)
    bound_h = size_h if bound_h is None else bound_h
    bound_w = size_w if bound_w is None else bound_w
    # Validity and wrapping are decided in window coordinates (before adding the margin offset).
    if is_integer_map(affine):
        ix, iy = torch.round(src_x).long(), torch.round(src_y).long()
        if wrap:
            ix, iy = ix % bound_w, iy % bound_h
            inside = torch.ones_like(ix, dtype=torch.bool)
        else:
            inside = (ix + offset_x >= 0) & (ix + offset_x < size_w)
            inside &= (iy + offset_y >= 0) & (iy + offset_y < size_h)
            if bound_h != size_h or bound_w != size_w:
                inside &= (ix >= 0) & (ix < bound_w) & (iy >= 0) & (iy < bound_h)
            ix, iy = ix + offset_x, iy + offset_y
            ix, iy = ix.clamp(0, size_w - 1), iy.clamp(0, size_h - 1)
        return [(iy, ix)], [torch.ones_like(src_x)], [inside]
    x0f, y0f = torch.floor(src_x), torch.floor(src_y)
    fx, fy = src_x - x0f, src_y - y0f
    x0, y0 = x0f.long(), y0f.long()
    neighbours = [(0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                  (1, 0, fy * (1 - fx)), (1, 1, fy * fx)]
    indices, weights, insides = [], [], []
    if wrap:
        for dy, dx, weight in neighbours:
            indices.append(((y0 + dy) % bound_h, (x0 + dx) % bound_w))
            weights.append(weight)
            insides.append(torch.ones_like(x0, dtype=torch.bool))
        return indices, weights, insides
    # Without wrapping a position is inside when its continuous source lies in the grid; its
    # neighbours are clamped so that a source exactly on the last row reads that row.
    lim_h, lim_w = (size_h, size_w)
    sx, sy = src_x + offset_x, src_y + offset_y
    inside = (sx >= -EDGE_TOLERANCE) & (sx <= lim_w - 1 + EDGE_TOLERANCE)
    inside &= (sy >= -EDGE_TOLERANCE) & (sy <= lim_h - 1 + EDGE_TOLERANCE)
    if bound_h != size_h or bound_w != size_w:
        inside &= (src_x >= -EDGE_TOLERANCE) & (src_x <= bound_w - 1 + EDGE_TOLERANCE)
        inside &= (src_y >= -EDGE_TOLERANCE) & (src_y <= bound_h - 1 + EDGE_TOLERANCE)
    sx0, sy0 = x0 + offset_x, y0 + offset_y
    for dy, dx, weight in neighbours:
        iy = (sy0 + dy).clamp(0, size_h - 1)
        ix = (sx0 + dx).clamp(0, size_w - 1)
        indices.append((iy, ix))
        weights.append(weight)
        insides.append(inside)
    return indices, weights, insides


def transform_images(
    src: torch.Tensor,
    source_affines: torch.Tensor,
    protocols: Sequence[int],
    margin_y: int,
    margin_x: int,
    out_h: int,
    out_w: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    out_dtype: torch.dtype,
    channels_last: bool,
) -> torch.Tensor:
    """Transform a batch of sources for all group elements at once (reference).

    Args:
        src: ``(B, 3, Hs, Ws)`` uint8 (0..255) or float (already scaled, e.g. 0..1 or normalized).
        source_affines: ``(E, 2, 3)`` float64 maps from output pixels to *window* coordinates;
            the window is the ``out_h x out_w`` identity image at ``(margin_y, margin_x)`` of the
            source.
        protocols: ``(E,)`` ints: 0 crop (read the source anywhere), 1 circular (wrap in the
            window), 2 zero (outside the window reads the fill).
        margin_y, margin_x: Offset of the identity window in the source.
        out_h, out_w: Output size.
        mean, std: Per-channel normalization ``(v / 255 - mean) / std`` for uint8 sources,
            ``(v - mean) / std`` for float ones; ``None`` keeps the values. The fill is 0 after
            normalization (the mean: neutral).
        out_dtype: Output dtype.
        channels_last: Return in ``torch.channels_last`` memory format.

    Returns:
        ``(E * B, 3, out_h, out_w)`` images, element-major (element ``e``, image ``b`` at
        ``e * B + b``).
    """
    if src.dim() != 4:
        raise ValueError(f"src: expected (B, C, Hs, Ws), found shape {tuple(src.shape)}")
    batch, channels, size_h, size_w = src.shape
    values = src.to(torch.float64)
    if src.dtype == torch.uint8:
        values = values / 255.0
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
        values = (values - mean_t) / std_t
    outputs = []
    for affine, protocol in zip(source_affines.to(torch.float64), protocols):
        wrap = int(protocol) == PROTOCOL_CIRCULAR
        bound = (out_h, out_w) if int(protocol) == PROTOCOL_ZERO else (None, None)
        if wrap:
            # Circular shifts wrap inside the identity window: sample the window itself.
            window = values[:, :, margin_y:margin_y + out_h, margin_x:margin_x + out_w]
            indices, weights, insides = _sample_plan(affine, out_h, out_w, out_h, out_w, True)
            grid = window
        else:
            indices, weights, insides = _sample_plan(
                affine, out_h, out_w, size_h, size_w, False, margin_y, margin_x, *bound
            )
            grid = values
        out = torch.zeros(batch, channels, out_h, out_w, dtype=torch.float64)
        for (iy, ix), weight, inside in zip(indices, weights, insides):
            out += grid[:, :, iy, ix] * (weight * inside)
        outputs.append(out)
    result = torch.cat(outputs, 0).to(out_dtype)
    if channels_last:
        result = result.contiguous(memory_format=torch.channels_last)
    return result


def check_disc(disc: Sequence[float] | None, wrap: Sequence[int]) -> list[float] | None:
    """``disc`` as four floats (``None`` stays ``None``), or a ``ValueError`` naming the problem."""
    if disc is None:
        return None
    values = [float(v) for v in disc]
    if len(values) != 4:
        raise ValueError(f"disc: expected 4 numbers (centre_x, centre_y, radius_x, radius_y) in "
                         f"grid coordinates, found {len(values)}")
    if not all(math.isfinite(v) for v in values) or values[2] <= 0 or values[3] <= 0:
        raise ValueError(f"disc: expected a finite centre and finite positive radii, found "
                         f"(centre_x, centre_y, radius_x, radius_y) = {tuple(values)}")
    if any(int(w) for w in wrap):
        raise ValueError("disc: masks the border of the image, which a wrapping element "
                         "(circular protocol) does not have")
    return values


def inside_disc(x: torch.Tensor, y: torch.Tensor, disc: Sequence[float]) -> torch.Tensor:
    """Whether the points ``(x, y)`` (float64) lie inside ``disc = (cx, cy, rx, ry)``."""
    u = (x - disc[0]) / disc[2]
    v = (y - disc[1]) / disc[3]
    return u * u + v * v <= 1.0 + DISC_TOLERANCE


def disc_mask(affine: torch.Tensor, height: int, width: int,
              disc: Sequence[float]) -> torch.Tensor:
    """``(h, w)`` bool: positions that lie inside ``disc`` with their sources under ``affine``."""
    affine = affine.to(torch.float64)
    xs, ys, src_x, src_y = _grid_sources(affine, height, width)
    if is_integer_map(affine):
        src_x, src_y = torch.round(src_x), torch.round(src_y)
    return inside_disc(xs, ys, disc) & inside_disc(src_x, src_y, disc)


def realign(
    grid: torch.Tensor, affine: torch.Tensor, wrap: bool, disc: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-align ``(B, C, h, w)`` maps with a source map; returns ``(moved, valid (h, w))``.

    With ``disc`` (see :func:`check_disc`), ``valid`` keeps only the positions inside it.
    """
    height, width = grid.shape[-2:]
    indices, weights, insides = _sample_plan(affine, height, width, height, width, wrap)
    moved = torch.zeros_like(grid, dtype=torch.float64)
    for (iy, ix), weight in zip(indices, weights):
        moved += grid[:, :, iy, ix].to(torch.float64) * weight
    valid = insides[0]
    if disc is not None:
        valid = valid & disc_mask(affine, height, width, disc)
    return moved, valid


CHANNEL_MAPS = ("identity", "match", "linear")


def check_channel_map(channel_map: str) -> str:
    """``channel_map`` if it is one of :data:`CHANNEL_MAPS`, else a ValueError naming them."""
    if channel_map not in CHANNEL_MAPS:
        raise ValueError(f"channel_map: expected one of {CHANNEL_MAPS}, found {channel_map!r}")
    return channel_map


def _flat(mean: torch.Tensor, centred_norm: torch.Tensor, positions: int) -> torch.Tensor:
    """Channels whose spatial standard deviation (from the norm of the centred values over
    ``positions``) is flat by the scores' rule (:data:`equifast.scores.FLAT_RELATIVE`)."""
    variance = centred_norm.square() / positions
    return variance <= (FLAT_RELATIVE * mean).square() + FLAT_ABSOLUTE**2


def match_channels(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``b`` with each channel ``c`` replaced by the channel of ``b`` best correlated with
    channel ``c`` of ``a`` over the valid positions, image by image (DESIGN.md 1.6, ``match``).

    A network that learned a rotated copy of a filter shows rotation equivariance as a
    permutation of channels (as a group convolution would): matched, the rotated copy stands
    beside its filter. The match is a map, not a permutation: several channels of ``a`` may
    take the same channel of ``b``. A flat channel of ``b`` (spatially constant as
    ``corr_channelwise`` counts it: :data:`equifast.scores.FLAT_RELATIVE`) is never chosen; a
    flat channel of ``a`` keeps its own. Correlations within 1e-9 of each other are ties, taken
    by the first channel.

    Args:
        a, b: ``(B, C, h, w)`` float64.
        valid: ``(h, w)`` bool.

    Returns:
        ``(B, C, h, w)``: ``b``'s channels in the matched order.
    """
    if not bool(valid.any()) or a.shape[1] == 1:
        return b
    chosen = torch.empty(a.shape[:2], dtype=torch.long, device=a.device)
    for image in range(a.shape[0]):  # one (C, C) matrix at a time: C = 2048 is 32 MB
        da = a[image][:, valid]
        db = b[image][:, valid]
        mean_a = da.mean(-1, keepdim=True)
        mean_b = db.mean(-1, keepdim=True)
        da = da - mean_a
        db = db - mean_b
        scale_a = da.norm(dim=-1)
        scale_b = db.norm(dim=-1)
        # Flat channels have no correlation to speak of: a constant channel re-aligned by
        # bilinear weights varies by an ulp, and the correlations of those ulps won the match
        # (0.96 against a real 0.97 for a random-init HGNetV2 in float64) by how the weights
        # happened to round, which differs between equal computations.
        flat_a = _flat(mean_a[:, 0], scale_a, da.shape[-1])
        flat_b = _flat(mean_b[:, 0], scale_b, db.shape[-1])
        # rows scaled to unit length first (O(C m)), so that one product is the correlation
        # matrix and the passes over the C x C matrix are few (a constant row stays 0)
        da = da / torch.where(scale_a > 0, scale_a, 1.0)[:, None]
        db = db / torch.where(scale_b > 0, scale_b, 1.0)[:, None]
        correlation = da @ db.T
        # flat channels of b are never chosen; flat channels of a keep their own
        correlation.masked_fill_(flat_b[None, :], -math.inf)
        # correlations within 1e-9 are ties, taken by the first channel: on few positions many
        # pairs correlate perfectly, and rounding must not choose among them
        best = correlation.mul_(1e9).round_().argmax(-1)
        own = torch.arange(a.shape[1], device=a.device)
        chosen[image] = torch.where(flat_a | flat_b.all(), own, best)
    return torch.gather(b, 1, chosen[:, :, None, None].expand_as(b))


def pair_stats(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The six statistics of ``a`` against ``b`` per image and channel over ``valid`` positions.

    Args:
        a, b: ``(B, C, h, w)`` float64.
        valid: ``(h, w)`` bool.

    Returns:
        ``(B, C, 6)`` float64: count, mean_a, mean_b, m2_a, m2_b, c_ab (zeros where count is 0).
    """
    a, b = a[..., valid], b[..., valid]  # (B, C, m)
    count = a.shape[-1]
    if count == 0:
        return torch.zeros(*a.shape[:2], 6, dtype=torch.float64)
    # Centred about each channel's first valid value, then about the mean of the differences:
    # a - a_0 is exact where the spread is small against the level, a - mean would carry the
    # mean's rounding error (up to an ulp of the level) into every centred value, a large part of
    # a spread of a few ulps (deep layers of a random-init LeViT).
    shifted_a, shifted_b = a - a[..., :1], b - b[..., :1]
    shift_mean_a, shift_mean_b = shifted_a.mean(-1), shifted_b.mean(-1)
    da = shifted_a - shift_mean_a[..., None]
    db = shifted_b - shift_mean_b[..., None]
    mean_a, mean_b = a[..., 0] + shift_mean_a, b[..., 0] + shift_mean_b
    m2_a = (da * da).sum(-1)
    m2_b = (db * db).sum(-1)
    c_ab = (da * db).sum(-1)
    count_column = torch.full_like(mean_a, float(count))
    return torch.stack([count_column, mean_a, mean_b, m2_a, m2_b, c_ab], -1)


def _comparison_pairs(feats, source_affines, wrap, batch, layout, grid_h, grid_w, prefix,
                      subpixel, with_inv, with_chance, reference, disc):
    """The pairs every comparison compares: yields ``(comparison, k, a, b, valid)`` with ``a``
    the transformed images' features and ``b`` what they are compared with, ``(B, C, h, w)``
    float64, and ``valid`` ``(h, w)`` bool (arguments as :func:`equivariance_stats`).
    Elements skipped by ``subpixel="skip"`` yield nothing."""
    if reference is not None:
        if reference.shape[1:] != feats.shape[1:] or reference.shape[0] != batch:
            raise ValueError(f"reference: expected the identity block of shape "
                             f"{(batch, *feats.shape[1:])}, found {tuple(reference.shape)}")
        feats = torch.cat([reference.to(feats.device), feats])
    grid = grid_view(feats, layout, grid_h, grid_w, prefix).to(torch.float64)
    total = grid.shape[0]
    elements = source_affines.shape[0]
    if total != (elements + 1) * batch:
        raise ValueError(
            f"feats: expected (K + 1) * batch = {(elements + 1) * batch} images for K = {elements} "
            f"elements and batch {batch}, found {total}"
        )
    disc = check_disc(disc, wrap)
    identity = grid[:batch]
    for k in range(elements):
        affine = source_affines[k].to(torch.float64)
        if subpixel == "skip" and not is_integer_map(affine):
            continue
        moved, valid = realign(identity, affine, bool(wrap[k]), disc)
        transformed = grid[(k + 1) * batch:(k + 2) * batch]
        yield 0, k, transformed, moved, valid
        if with_inv:
            yield 1, k, transformed, identity, valid
        if with_chance:
            yield 2, k, transformed, torch.roll(moved, -1, 0), valid


def equivariance_stats(
    feats: torch.Tensor,
    source_affines: torch.Tensor,
    wrap: Sequence[int],
    batch: int,
    layout: str,
    grid_h: int,
    grid_w: int,
    prefix: int,
    subpixel: str,
    with_inv: bool,
    with_chance: bool,
    reference: torch.Tensor | None = None,
    channel_map: str = "identity",
    disc: Sequence[float] | None = None,
    linear_maps: torch.Tensor | None = None,
    map_folds: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Statistics of the equivariance, invariance and chance comparisons (reference).

    Args:
        feats: The layer output for the stacked batch, ``N = (K + 1) * batch`` images, identity
            block first, in ``layout`` (``"NCHW"``, ``"NHWC"`` or ``"NLC"``; vectors are passed as
            ``NCHW`` of shape ``(N, 1, 1, C)``). With ``reference``, the ``K * batch`` images of
            the elements only.
        source_affines: ``(K, 2, 3)`` float64 maps in feature-grid coordinates: output position
            ``u`` of the re-aligned identity map reads position ``A_k @ u``.
        wrap: ``(K,)`` 1 where the element wraps around (circular protocol).
        batch: Images per block ``B``.
        layout, grid_h, grid_w, prefix: How to view ``feats`` (see :mod:`equifast.layouts`).
        subpixel: ``"bilinear"`` or ``"skip"`` (non-integer maps give count 0: NaN scores).
        with_inv, with_chance: Whether to compute those comparisons (zeros otherwise).
        reference: The identity block (``batch`` images laid out like ``feats``) when it is not
            the first block of ``feats``: the same statistics as with the two stacked.
        channel_map: ``"identity"`` (channel ``c`` against channel ``c``), ``"match"`` (against
            the best-correlated channel of the other map, per image: :func:`match_channels`) or
            ``"linear"`` (against a fitted linear map of the other map: :func:`map_linearly`).
        disc: ``(cx, cy, rx, ry)`` in grid coordinates: only positions inside it with their
            sources count (module docstring). ``None``: every valid position.
        linear_maps: ``channel_map="linear"`` only: ``(F, 3, K, C, C + 1)`` fitted maps
            (:func:`solve_linear_maps`) of ``F`` folds.
        map_folds: ``channel_map="linear"`` only: ``(B,)`` the fold whose map scores each
            image (another fold than the image's own: the maps are scored out of sample).

    Returns:
        ``(3, K, B, C, 6)`` float64 statistics for eq, inv, chance: count, mean_a, mean_b, m2_a,
        m2_b, c_ab over the valid positions, where ``a`` is the transformed image's features and
        ``b`` the re-aligned identity features (eq), the identity features (inv) or the re-aligned
        identity features of image ``(n + 1) % B`` (chance), each passed through the channel map.
    """
    elements = source_affines.shape[0]
    channels = grid_view(feats[:1], layout, grid_h, grid_w, prefix).shape[1]
    if channel_map == "linear":
        linear_maps, map_folds = check_linear_maps(linear_maps, map_folds, elements, batch,
                                                   channels)
    out = torch.zeros(3, elements, batch, channels, 6, dtype=torch.float64)
    for c, k, a, b, valid in _comparison_pairs(feats, source_affines, wrap, batch, layout,
                                               grid_h, grid_w, prefix, subpixel, with_inv,
                                               with_chance, reference, disc):
        if channel_map == "match":
            b = match_channels(a, b, valid)
        elif channel_map == "linear":
            b = _map_by_folds(linear_maps[:, c, k], map_folds, b)
        stats = pair_stats(a, b, valid)
        if channel_map == "linear":
            # an image whose map had nothing to be fitted on (NaN as a whole): no statistics,
            # like an image without valid positions (NaN scores)
            stats[torch.isnan(linear_maps[map_folds, c, k, 0, 0])] = 0.0
        out[c, k] = stats
    return out


def _map_by_folds(maps: torch.Tensor, map_folds: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``b`` ``(B, C, h, w)`` with image ``n`` through ``maps[map_folds[n]]`` (``(F, C, C + 1)``):
    one product per fold, not a copy of a ``C x C`` map per image."""
    mapped = torch.empty_like(b)
    for fold in map_folds.unique().tolist():
        images = map_folds == fold
        mapped[images] = map_linearly(maps[fold][None], b[images])
    return mapped


# Linear channel maps (DESIGN.md 1.6, Lenc & Vedaldi): per layer, element and comparison, the
# affine map b -> M b + c that best predicts a from b, fitted by ridge least squares on the pairs
# of one fold of the images and scored on the others.
LINEAR_FIT_FIELDS = ("count", "mean_a", "mean_b", "s_bb", "s_ab")


def check_linear_maps(linear_maps, map_folds, elements: int, batch: int, channels: int):
    """``(linear_maps, map_folds)`` as float64 / long tensors after checking their shapes
    against ``K = elements``, ``B = batch`` and ``C = channels``; a ValueError naming what was
    expected otherwise."""
    if linear_maps is None or map_folds is None:
        raise ValueError("channel_map='linear': expected linear_maps (F, 3, K, C, C + 1) and "
                         "map_folds (B,), found "
                         f"{'no linear_maps' if linear_maps is None else 'no map_folds'}")
    linear_maps = torch.as_tensor(linear_maps, dtype=torch.float64)
    map_folds = torch.as_tensor(map_folds, dtype=torch.long).reshape(-1)
    shape = tuple(linear_maps.shape)
    if (len(shape) != 5 or shape[1] != 3 or shape[2] != elements or shape[3] != channels
            or shape[4] != channels + 1):
        raise ValueError(f"linear_maps: expected (F, 3, K, C, C + 1) = (F, 3, {elements}, "
                         f"{channels}, {channels + 1}), found {shape}")
    if map_folds.shape[0] != batch or (batch and (int(map_folds.min()) < 0
                                                  or int(map_folds.max()) >= shape[0])):
        raise ValueError(f"map_folds: expected {batch} fold indices in [0, {shape[0]}), found "
                         f"{map_folds.tolist()}")
    return linear_maps, map_folds


def map_linearly(maps: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``M b + c``: ``maps`` ``[M | c]`` ``(B, C, C + 1)`` per image or ``(1, C, C + 1)`` for
    all, ``b`` ``(B, C, h, w)``."""
    batch, channels = b.shape[:2]
    mixed = maps[..., :-1] @ b.reshape(batch, channels, -1)  # (B, C, h * w)
    return (mixed + maps[..., -1:]).reshape(b.shape)


def linear_fit_sums(
    feats: torch.Tensor,
    source_affines: torch.Tensor,
    wrap: Sequence[int],
    batch: int,
    layout: str,
    grid_h: int,
    grid_w: int,
    prefix: int,
    subpixel: str,
    with_inv: bool,
    with_chance: bool,
    folds: Sequence[int] | torch.Tensor,
    num_folds: int,
    reference: torch.Tensor | None = None,
    disc: Sequence[float] | None = None,
) -> dict[str, torch.Tensor]:
    """What the linear channel maps are fitted on, from one stacked batch, per fold.

    The pairs are those of :func:`equivariance_stats` (arguments as there); ``folds`` ``(B,)``
    puts each image in one of ``num_folds`` folds. Merge the sums of several batches with
    :func:`merge_linear_sums`, then :func:`solve_linear_maps`.

    Returns:
        A dict of float64 tensors (:data:`LINEAR_FIT_FIELDS`): ``count`` ``(F, 3, K)`` pairs of
        positions, ``mean_a`` and ``mean_b`` ``(F, 3, K, C)``, and the co-moment matrices about
        those means ``s_bb = sum (b - mean_b)(b - mean_b)^T`` and ``s_ab = sum (a - mean_a)
        (b - mean_b)^T``, ``(F, 3, K, C, C)``. A comparison not asked for, or chance with a
        batch of one image (no other image to pair with), stays zero.
    """
    elements = source_affines.shape[0]
    channels = grid_view(feats[:1], layout, grid_h, grid_w, prefix).shape[1]
    folds = torch.as_tensor(folds, dtype=torch.long).reshape(-1)
    if folds.shape[0] != batch:
        raise ValueError(f"folds: expected one fold per image ({batch}), found {folds.shape[0]}")
    sums = empty_linear_sums(num_folds, elements, channels)
    for c, k, a, b, valid in _comparison_pairs(feats, source_affines, wrap, batch, layout,
                                               grid_h, grid_w, prefix, subpixel, with_inv,
                                               with_chance and batch > 1, reference, disc):
        for fold in range(num_folds):
            chosen = folds == fold
            if not bool(chosen.any()) or not bool(valid.any()):
                continue
            # (C, n * m): the channels of every valid position of the fold's images
            a_values = a[chosen][..., valid].transpose(0, 1).reshape(channels, -1)
            b_values = b[chosen][..., valid].transpose(0, 1).reshape(channels, -1)
            mean_a, mean_b = a_values.mean(-1), b_values.mean(-1)
            a_centred = a_values - mean_a[:, None]
            b_centred = b_values - mean_b[:, None]
            sums["count"][fold, c, k] = a_values.shape[-1]
            sums["mean_a"][fold, c, k] = mean_a
            sums["mean_b"][fold, c, k] = mean_b
            sums["s_bb"][fold, c, k] = b_centred @ b_centred.T
            sums["s_ab"][fold, c, k] = a_centred @ b_centred.T
    return sums


def empty_linear_sums(num_folds: int, elements: int, channels: int,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Linear-fit sums of no pairs (:func:`linear_fit_sums`)."""
    shape = (num_folds, 3, elements)
    return {
        "count": torch.zeros(shape, dtype=torch.float64, device=device),
        "mean_a": torch.zeros(*shape, channels, dtype=torch.float64, device=device),
        "mean_b": torch.zeros(*shape, channels, dtype=torch.float64, device=device),
        "s_bb": torch.zeros(*shape, channels, channels, dtype=torch.float64, device=device),
        "s_ab": torch.zeros(*shape, channels, channels, dtype=torch.float64, device=device),
    }


def merge_linear_sums(first: dict[str, torch.Tensor],
                      second: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sums of the pairs of both (Chan's merge of means and co-moment matrices)."""
    n1, n2 = first["count"], second["count"]
    total = n1 + n2
    safe = torch.where(total > 0, total, torch.ones_like(total))
    weight = (n2 / safe)[..., None]  # the second's share of the merged mean
    delta_a = second["mean_a"] - first["mean_a"]
    delta_b = second["mean_b"] - first["mean_b"]
    spread = (n1 * n2 / safe)[..., None, None]
    return {
        "count": total,
        "mean_a": first["mean_a"] + delta_a * weight,
        "mean_b": first["mean_b"] + delta_b * weight,
        "s_bb": first["s_bb"] + second["s_bb"]
        + spread * delta_b[..., :, None] * delta_b[..., None, :],
        "s_ab": first["s_ab"] + second["s_ab"]
        + spread * delta_a[..., :, None] * delta_b[..., None, :],
    }


def solve_linear_maps(sums: dict[str, torch.Tensor], ridge: float) -> torch.Tensor:
    """The ridge least-squares maps ``[M | c]`` from merged sums: ``(F, 3, K, C, C + 1)``.

    ``M = s_ab (s_bb + lambda I)^-1`` and ``c = mean_a - M mean_b`` minimise
    ``sum |a - (M b + c)|^2 + lambda |M|_F^2`` over the pairs, with ``lambda = ridge *
    trace(s_bb) / C`` (so that ``ridge`` does not depend on the features' scale). A fold,
    comparison and element without pairs gets NaN.
    """
    s_bb, s_ab = sums["s_bb"], sums["s_ab"]
    channels = s_bb.shape[-1]
    trace = s_bb.diagonal(dim1=-2, dim2=-1).sum(-1)
    # (constant features: s_bb = s_ab = 0, any positive lambda gives M = 0, a constant guess)
    penalty = torch.where(trace > 0, ridge * trace / channels, torch.ones_like(trace))
    eye = torch.eye(channels, dtype=s_bb.dtype, device=s_bb.device)
    regularized = s_bb + penalty[..., None, None] * eye
    # (s_bb + lambda I) M^T = s_ab^T. The matrix is symmetric positive definite: Cholesky.
    # (Not torch.linalg.solve: with torch 2.14's MKL build its batched LU fails, "Pivots given
    # to lu_solve must all be greater or equal to 1", once torch.set_num_threads has changed
    # the thread count in the process, as the benchmarks do.)
    targets = s_ab.transpose(-1, -2)
    factor, info = torch.linalg.cholesky_ex(regularized)
    solution = torch.cholesky_solve(targets, factor)
    failed = info != 0  # not positive definite in floating point (a vanishing ridge)
    if bool(failed.any()):
        solution[failed] = torch.linalg.lstsq(regularized[failed], targets[failed]).solution
    mixing = solution.transpose(-1, -2)
    bias = sums["mean_a"] - (mixing @ sums["mean_b"][..., None])[..., 0]
    maps = torch.cat([mixing, bias[..., None]], -1)
    maps[sums["count"] == 0] = math.nan
    return maps


def merge_stats(stats: torch.Tensor, dim: int) -> torch.Tensor:
    """Chan's parallel merge of six-number statistics along ``dim`` (pooled statistics).

    Args:
        stats: ``(..., 6)`` statistics.
        dim: The axis to merge (not the last).

    Returns:
        The merged statistics with ``dim`` removed, float64.
    """
    stats = stats.to(torch.float64)
    count = stats[..., 0]
    total = count.sum(dim)
    safe = torch.where(total > 0, total, torch.ones_like(total))
    # The means as one part's mean (the first that has a count) plus the weighted mean of the
    # others' differences from it: where one part alone has a count (a bootstrap resample that
    # draws one batch three times), the merged mean is that part's mean exactly, not
    # (3 n m) / (3 n) rounded, whose last bit would pass for a spread of the values.
    # No part has a count: means 0, as the parts' own.
    first = (count > 0).to(torch.int8).argmax(dim, keepdim=True)

    def merged_mean(field: int) -> torch.Tensor:
        anchor = stats[..., field].gather(dim, first)
        mean = anchor.squeeze(dim) + ((stats[..., field] - anchor) * count).sum(dim) / safe
        return torch.where(total > 0, mean, torch.zeros_like(mean))

    mean_a, mean_b = merged_mean(1), merged_mean(2)
    da = stats[..., 1] - mean_a.unsqueeze(dim)
    db = stats[..., 2] - mean_b.unsqueeze(dim)
    m2_a = (stats[..., 3] + count * da * da).sum(dim)
    m2_b = (stats[..., 4] + count * db * db).sum(dim)
    c_ab = (stats[..., 5] + count * da * db).sum(dim)
    return torch.stack([total, mean_a, mean_b, m2_a, m2_b, c_ab], -1)


__all__ = [
    "COMPARISONS",
    "STATS_FIELDS",
    "check_disc",
    "disc_mask",
    "equivariance_stats",
    "inside_disc",
    "is_integer_map",
    "linear_fit_sums",
    "map_linearly",
    "merge_linear_sums",
    "merge_stats",
    "pair_stats",
    "realign",
    "solve_linear_maps",
    "transform_images",
]
