"""Typed wrappers of the ``torch.ops.equifast`` operators.

Each wrapper calls the compiled kernel for the tensor's device when the extension has one, and the
pure-PyTorch reference (:mod:`equifast.ops._reference`) otherwise, with a one-time warning. Fake
(meta) implementations are registered so that the ops work with ``torch.compile`` and ``opcheck``.

Convention: see :mod:`equifast.ops._reference` (source maps, exact versus bilinear sampling).
"""

from __future__ import annotations

from typing import Sequence

import torch

from .. import _ext
from . import _reference
from ._reference import (
    CHANNEL_MAPS,
    COMPARISONS,
    STATS_FIELDS,
    check_channel_map,
    empty_linear_sums,
    merge_linear_sums,
    merge_stats,
    solve_linear_maps,
)

LAYOUT_NAMES = ("NCHW", "NHWC", "NLC")


def _use_kernel(op_name: str, device: torch.device, force_reference: bool) -> bool:
    if force_reference:
        return False
    if _ext.has_kernel(op_name, device.type):
        return True
    _ext.warn_fallback(op_name, device.type)
    return False


def _stats_arguments(source_affines, wrap, batch, layout, grid_h, grid_w, prefix, subpixel,
                     with_inv, with_chance) -> tuple:
    """The arguments after ``feats`` that :func:`equivariance_stats` and
    :func:`linear_fit_sums` share, checked and in the types the ops take: ``(affines, wrap,
    batch, layout, grid_h, grid_w, prefix, subpixel, with_inv, with_chance)``. ValueErrors name
    ``layout`` or ``subpixel``."""
    if layout not in LAYOUT_NAMES:
        raise ValueError(f"layout: expected one of {LAYOUT_NAMES}, found {layout!r}")
    if subpixel not in ("bilinear", "skip"):
        raise ValueError(f"subpixel: expected 'bilinear' or 'skip', found {subpixel!r}")
    affines = source_affines.detach().to("cpu", torch.float64).contiguous()
    args = (affines, [int(w) for w in wrap], int(batch), layout, int(grid_h), int(grid_w),
            int(prefix), subpixel, bool(with_inv), bool(with_chance))
    return args


def transform_images(
    src: torch.Tensor,
    source_affines: torch.Tensor,
    protocols: Sequence[int],
    margin: tuple[int, int],
    out_size: tuple[int, int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    out_dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    force_reference: bool = False,
) -> torch.Tensor:
    """Transform ``B`` sources for ``E`` group elements in one launch.

    Args:
        src: ``(B, 3, Hs, Ws)`` uint8 or float sources.
        source_affines: ``(E, 2, 3)`` float64 maps, output pixel -> identity-window coordinate.
        protocols: ``(E,)`` protocol codes (0 crop, 1 circular, 2 zero).
        margin: ``(margin_y, margin_x)`` of the identity window in the source.
        out_size: ``(H, W)`` of the output images.
        mean, std: Normalization (``None`` keeps values).
        out_dtype: Output dtype (the model's).
        channels_last: Output memory format.
        force_reference: Use the pure-PyTorch reference even when a kernel exists.

    Returns:
        ``(E * B, 3, H, W)`` images, element-major, on ``src``'s device.

    Example:
        >>> import torch
        >>> src = torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8)
        >>> affines = torch.tensor([[[1.0, 0, 0], [0, 1, 0]]], dtype=torch.float64)
        >>> transform_images(src, affines, [0], (0, 0), (8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """
    affines = source_affines.detach().to("cpu", torch.float64).contiguous()
    protocols = [int(p) for p in protocols]
    args = (src, affines, protocols, int(margin[0]), int(margin[1]), int(out_size[0]),
            int(out_size[1]), None if mean is None else [float(m) for m in mean],
            None if std is None else [float(s) for s in std], out_dtype, bool(channels_last))
    if _use_kernel("transform_images", src.device, force_reference):
        return torch.ops.equifast.transform_images(*args)
    return _reference.transform_images(src.cpu(), *args[1:]).to(src.device)


def equivariance_stats(
    feats: torch.Tensor,
    source_affines: torch.Tensor,
    wrap: Sequence[int],
    batch: int,
    layout: str,
    grid_h: int,
    grid_w: int,
    prefix: int = 0,
    subpixel: str = "bilinear",
    with_inv: bool = True,
    with_chance: bool = True,
    force_reference: bool = False,
    reference: torch.Tensor | None = None,
    channel_map: str = "identity",
    disc: Sequence[float] | None = None,
    linear_maps: torch.Tensor | None = None,
    map_folds: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Equivariance / invariance / chance statistics of one layer for the stacked batch.

    Args:
        feats: Layer output of ``(K + 1) * batch`` images, identity block first, in ``layout``;
            with ``reference``, of the ``K * batch`` images of the elements only.
        source_affines: ``(K, 2, 3)`` float64 feature-grid source maps.
        wrap: ``(K,)`` 1 for circular elements.
        batch: Images per block.
        layout: ``"NCHW"``, ``"NHWC"`` or ``"NLC"``.
        grid_h, grid_w: Spatial grid.
        prefix: Prefix tokens (``NLC``).
        subpixel: ``"bilinear"`` or ``"skip"``.
        with_inv, with_chance: Which comparisons besides equivariance.
        force_reference: Use the pure-PyTorch reference even when a kernel exists.
        reference: The identity block, ``batch`` images laid out like ``feats`` (the same shape
            and strides after the batch axis), when it is not the first block of ``feats``: the
            statistics are those of the two stacked, without copying them together (the engine
            keeps the identity features of a batch's first forward for its later ones).
        channel_map: ``"identity"``, or ``"match"``: each channel against the best-correlated
            channel of the other map, per image (:func:`_reference.match_channels`). ``match``
            needs a ``(C, C)`` matrix per image and element, which no kernel computes yet: it
            runs the reference. ``"linear"``: against ``M b + c``, a map fitted on other images
            (:func:`linear_fit_sums`, :func:`solve_linear_maps`), also in the reference.
        disc: ``(centre_x, centre_y, radius_x, radius_y)`` in grid coordinates: a position counts
            only where it and its source both lie inside this disc (an ellipse when the radii
            differ; :func:`equifast.groups.feature_disc` gives the disc inscribed in the model
            input). Not with wrapping elements. ``None``: no disc.
        linear_maps: With ``channel_map="linear"``: ``(F, 3, K, C, C + 1)`` maps ``[M | c]`` of
            ``F`` folds (:func:`solve_linear_maps`).
        map_folds: With ``channel_map="linear"``: ``(B,)``, the fold whose map scores each image.

    Returns:
        ``(3, K, B, C, 6)`` float64 statistics (see ``STATS_FIELDS``, ``COMPARISONS``).
    """
    args = _stats_arguments(source_affines, wrap, batch, layout, grid_h, grid_w, prefix,
                            subpixel, with_inv, with_chance)
    check_channel_map(channel_map)
    disc = _reference.check_disc(disc, wrap)
    if channel_map == "identity" and _use_kernel("equivariance_stats", feats.device,
                                                 force_reference):
        return torch.ops.equifast.equivariance_stats(feats, *args, reference, disc)
    # (the reference builds its sampling plans on the CPU: a GPU layer's features go there)
    return _reference.equivariance_stats(
        feats.detach().cpu(), *args, None if reference is None else reference.detach().cpu(),
        channel_map=channel_map, disc=disc, linear_maps=linear_maps, map_folds=map_folds,
    ).to(feats.device)


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
    """What the linear channel maps of one layer are fitted on, from one stacked batch.

    The arguments are those of :func:`equivariance_stats`; ``folds`` ``(B,)`` puts each image in
    one of ``num_folds`` folds. Returns float64 sums on the CPU per fold, comparison and element
    (:func:`_reference.linear_fit_sums`); merge batches with :func:`merge_linear_sums` and fit
    with :func:`solve_linear_maps`. Runs the reference (no kernel yet).

    Example:
        >>> import torch
        >>> feats = torch.randn(2 * 4, 3, 5, 5)  # identity block + one element, 4 images
        >>> shift = torch.tensor([[[1.0, 0, 1], [0, 1, 0]]], dtype=torch.float64)
        >>> sums = linear_fit_sums(feats, shift, [0], 4, "NCHW", 5, 5, 0, "bilinear", True,
        ...                        True, folds=[0, 1, 0, 1], num_folds=2)
        >>> solve_linear_maps(sums, ridge=1e-3).shape  # (F, 3, K, C, C + 1)
        torch.Size([2, 3, 1, 3, 4])
    """
    args = _stats_arguments(source_affines, wrap, batch, layout, grid_h, grid_w, prefix,
                            subpixel, with_inv, with_chance)
    disc = _reference.check_disc(disc, wrap)
    return _reference.linear_fit_sums(
        feats.detach().cpu(), *args, folds, int(num_folds),
        None if reference is None else reference.detach().cpu(), disc,
    )


def _register_fakes() -> None:
    """Shape functions for fake tensors / ``torch.compile`` (only when the schemas exist)."""
    if not _ext.has_ops():
        return

    @torch.library.register_fake("equifast::transform_images")
    def _(src, source_affines, protocols, margin_y, margin_x, out_h, out_w, mean, std, out_dtype,
          channels_last):
        out = src.new_empty((source_affines.shape[0] * src.shape[0], src.shape[1], out_h, out_w),
                            dtype=out_dtype)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out

    @torch.library.register_fake("equifast::equivariance_stats")
    def _(feats, source_affines, wrap, batch, layout, grid_h, grid_w, prefix, subpixel, with_inv,
          with_chance, reference=None, disc=None):
        channels = feats.shape[1] if layout == "NCHW" else feats.shape[-1]
        return feats.new_empty((3, source_affines.shape[0], batch, channels, 6),
                               dtype=torch.float64)

    @torch.library.register_fake("equifast::score_stats")
    def _(stats, channel_counts, psnr_range):
        return stats.new_empty((*stats.shape[:-2], len(channel_counts), 8))


_register_fakes()

__all__ = [
    "CHANNEL_MAPS",
    "COMPARISONS",
    "STATS_FIELDS",
    "check_channel_map",
    "empty_linear_sums",
    "equivariance_stats",
    "linear_fit_sums",
    "merge_linear_sums",
    "merge_stats",
    "solve_linear_maps",
    "transform_images",
]
