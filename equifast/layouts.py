"""Feature layouts: viewing a layer's output as a spatial grid, and inferring its stride.

Convention:
    The canonical view of a layer output is ``(N, C, h, w)`` (a view, never a copy), plus ``P``
    non-spatial prefix tokens for token layouts. Layouts met in practice:

    - ``"NCHW"``: CNN feature maps ``(N, C, h, w)``.
    - ``"NHWC"``: channels-last blocks (Swin, ConvNeXt blocks in timm) ``(N, h, w, C)``.
    - ``"NLC"``: tokens ``(N, P + h * w, C)`` with ``P`` prefix tokens (class, distillation,
      register tokens) before a row-major ``h x w`` token grid (ViT, DeiT, BEiT).
    - ``"NC"``: plain vectors ``(N, C)`` (pooled features, logits); viewed as ``(N, 1, 1, C)`` so
      that a correlation runs over the channel vector.

    The stride of a layer is ``(H / h, W / w)`` for a model input of ``H x W``; when a layer
    rounds sizes (a stride-2 convolution on an odd input gives ``ceil(H / 2)``), the integer stride
    is used. One input size cannot tell every stride apart: convolutions without padding lose a
    border (Inception v3 at 224 px has a 5 x 5 stride-32 map, 44.8 px per cell), and small grids
    fit many strides (a 2 x 2 map of a 33 px input: 16 or 32). Where the model also runs on an
    input ``GROWTH`` pixels larger, :func:`stride_from_growth` reads the stride off how many cells
    the grid gains, which borders do not change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LAYOUTS = ("NCHW", "NHWC", "NLC", "NC")
MAX_PREFIX_TOKENS = 8
# Pixels added to both sides of the input for the second shape probe: a multiple of every
# power-of-two stride up to 64, so that such a grid gains exactly GROWTH / stride cells.
GROWTH = 64


@dataclass(frozen=True)
class FeatureLayout:
    """How a layer's output maps to a grid.

    Attributes:
        layout: One of ``LAYOUTS``.
        grid_h: Rows of the spatial grid (1 for vectors).
        grid_w: Columns of the spatial grid (the channel count for vectors).
        channels: Channels per grid position (1 for vectors).
        prefix: Non-spatial prefix tokens (``NLC`` only).
        stride: ``(stride_y, stride_x)`` in input pixels (``(nan, nan)`` for vectors).
    """

    layout: str
    grid_h: int
    grid_w: int
    channels: int
    prefix: int = 0
    stride: tuple[float, float] = (math.nan, math.nan)

    @property
    def kind(self) -> str:
        return "vector" if self.layout == "NC" else "spatial"

    def tiles(self, input_size: tuple[int, int]) -> bool:
        """Whether the grid's cells tile the input exactly (``grid * stride == size`` on both
        axes). Only then is a circular shift of the image one of the grid: at 33 px, 17 cells of
        stride 2 span 34 px, and the features that wrap come from a seam the image does not have,
        so the engine masks them as it does for the other protocols."""
        return (self.kind == "spatial"
                and abs(self.grid_h * self.stride[0] - input_size[0]) < 1e-6
                and abs(self.grid_w * self.stride[1] - input_size[1]) < 1e-6)


def _integer_stride(size: int, cells: int) -> float:
    """Input pixels per grid cell; the integer one when ``cells`` is a rounded ``size / s``."""
    ratio = size / cells
    rounded = round(ratio)
    # ceil(size / s) and floor(size / s) both satisfy |size - s * cells| < s.
    if rounded >= 1 and abs(size - rounded * cells) < rounded:
        return float(rounded)
    return ratio


def _stride_candidates(size: int, cells: int) -> range:
    """Every integer stride ``s`` that gives ``cells`` (>= 1) cells from ``size`` pixels: rounding
    down or up (57 px in 8 cells: 7 or 8; 57 px in 2 cells: anything from 20 to 56), or, on grids
    of 8 or more cells, rounding down after losing a border of up to one stride to an unpadded
    convolution (224 px in 111 cells: a 3x3 stride-2 convolution without padding). Small grids
    do not get that latitude: there it would let almost any shape pass for a grid.

    The left-over pixels ``size - s * cells`` lie in ``(-s, 0]`` (ceil) or ``[0, s)`` (floor; up
    to ``2 s`` on 8 or more cells), so the strides form one range, found in closed form (the
    engine asks for every layer's shape, a few thousand times for all leaves of a model).
    """
    # floor side: size - s * cells <= 2 s, or <= s - 1
    low = -(-size // (cells + 2)) if cells >= 8 else -(-(size + 1) // (cells + 1))
    # ceil side: -s < size - s * cells, i.e. s * (cells - 1) <= size - 1
    high = size if cells == 1 else min(size, (size - 1) // (cells - 1))
    return range(max(low, 1), high + 1)


def _is_power_of_two(value: int) -> bool:
    return value & (value - 1) == 0


def _grid_fit(h: int, w: int, input_size: tuple[int, int]
              ) -> tuple[float, tuple[float, float]] | None:
    """How an ``h x w`` grid fits the input: ``(deviation, (stride_y, stride_x))``.

    Preferably one integer stride that explains both sizes (a power of two when several do: CNN
    strides are, and 57 px in 2 cells is a stride-32 map, not 28); ``deviation`` is how far the
    sizes are from it (``max |size / cells - s| / s``: 0 for exact division, about 0.1 for rounded
    odd sizes). Otherwise the two ratios ``size / cells`` when they agree within 1/8 (a deviation
    of 1 or more, so that an integer fit always wins). None when neither holds.
    """
    height, width = input_size
    if not (1 <= h <= height and 1 <= w <= width):
        return None
    along_y, along_x = _stride_candidates(height, h), _stride_candidates(width, w)
    common = range(max(along_y.start, along_x.start), min(along_y.stop, along_x.stop))
    if common:
        def deviation(stride: int) -> float:
            return max(abs(height / h - stride), abs(width / w - stride)) / stride

        powers = [s for s in common if _is_power_of_two(s)]
        best = min(powers or common, key=lambda s: (deviation(s), s))
        return deviation(best), (float(best), float(best))
    stride_y, stride_x = _integer_stride(height, h), _integer_stride(width, w)
    spread = abs(stride_y - stride_x) / min(stride_y, stride_x)
    if spread <= 0.125:
        return 1.0 + spread, (stride_y, stride_x)
    return None


def _grid_stride(h: int, w: int, input_size: tuple[int, int]) -> tuple[float, float] | None:
    """The ``(stride_y, stride_x)`` of :func:`_grid_fit`, or None."""
    fit = _grid_fit(h, w, input_size)
    return None if fit is None else fit[1]


def _plausible_grid(h: int, w: int, input_size: tuple[int, int]) -> bool:
    """A grid of a model follows the input's aspect: some stride explains both of its sizes."""
    return _grid_fit(h, w, input_size) is not None


def _growth_strides(size: int, cells: int, grown_cells: int, growth: int) -> set[int]:
    """Integer strides ``s`` under which ``cells`` cells at ``size`` pixels become ``grown_cells``
    at ``size + growth``: the grid gains ``floor`` or ``ceil`` of ``growth / s`` cells (a border
    lost to unpadded convolutions is the same at both sizes), and holds no more cells than
    ``ceil(size / s)`` (what padding to the full input gives). Empty when the grid did not grow
    (adaptive pooling to a fixed size)."""
    gained = grown_cells - cells
    if gained < 1:
        return set()
    return {s for s in range(1, size + growth + 1)
            if growth // s <= gained <= -(-growth // s) and cells <= -(-size // s)}


def stride_from_growth(
    grid: tuple[int, int], grown_grid: tuple[int, int], input_size: tuple[int, int],
    growth: int = GROWTH, multiple_of: int | None = None,
) -> tuple[float, float] | None:
    """The stride of a layer from its grid at two input sizes, or None when they do not tell it.

    ``grid`` is ``(h, w)`` at ``input_size``, ``grown_grid`` at ``input_size`` plus ``growth`` on
    both sides. One integer stride explains both axes: when several do, a multiple of
    ``multiple_of`` (the stride of the layer before: a network downsamples by integer factors,
    so Sequencer's 9 x 9 grid after its stride-7 stem is stride 14 at 128 px, not 15), then a
    power of two, then the one closest to ``growth / gained cells``.

    Example:
        >>> stride_from_growth((5, 5), (7, 7), (224, 224))  # Inception v3's last stage
        (32.0, 32.0)
        >>> stride_from_growth((16, 16), (20, 20), (224, 224))  # a 14-pixel patch embedding
        (14.0, 14.0)
    """
    (h, w), (grown_h, grown_w) = grid, grown_grid
    height, width = input_size
    common = (_growth_strides(height, h, grown_h, growth)
              & _growth_strides(width, w, grown_w, growth))
    if not common:
        return None

    def deviation(stride: int) -> float:
        return max(abs(growth / (grown_h - h) - stride),
                   abs(growth / (grown_w - w) - stride)) / stride

    if multiple_of:
        common = {s for s in common if s % multiple_of == 0} or common
    powers = [s for s in common if _is_power_of_two(s)]
    best = min(powers or common, key=lambda s: (deviation(s), s))
    return float(best), float(best)


def grown_grid_of(layout: FeatureLayout, shape: tuple[int, ...] | torch.Size,
                  grown_size: tuple[int, int]) -> tuple[int, int] | None:
    """``(h, w)`` of a layer output of ``shape`` read with ``layout`` (found at another input
    size) for an input of ``grown_size``; None when the shape does not fit it."""
    shape = tuple(int(s) for s in shape)
    if layout.layout == "NCHW" and len(shape) == 4:
        return shape[2], shape[3]
    if layout.layout == "NHWC" and len(shape) == 4:
        return shape[1], shape[2]
    if layout.layout == "NLC" and len(shape) == 3:
        return next(_token_grid_shapes(shape[1] - layout.prefix, grown_size), None)
    return None


def _token_grid_shapes(cells: int, input_size: tuple[int, int]):
    """The ``(h, w)`` with ``h * w = cells`` closest to the input's aspect, nearest first."""
    if cells < 1:
        return
    height, width = input_size
    # h * w = cells with h / w = height / width  =>  h = sqrt(cells * height / width).
    h = round(math.sqrt(cells * height / width))
    for candidate in (h, h - 1, h + 1):
        if candidate >= 1 and cells % candidate == 0:
            yield candidate, cells // candidate


def token_grid(tokens: int, input_size: tuple[int, int]) -> tuple[int, int, int] | None:
    """``(prefix, h, w)`` for ``tokens`` tokens: the fewest prefix tokens leaving a plausible
    grid."""
    for prefix in range(0, MAX_PREFIX_TOKENS + 1):
        if tokens - prefix < 1:
            break
        for h, w in _token_grid_shapes(tokens - prefix, input_size):
            if _plausible_grid(h, w, input_size):
                return prefix, h, w
    return None


def token_fit(grid: tuple[int, int, int], input_size: tuple[int, int]) -> float:
    """The deviation (:func:`_grid_fit`) of the ``(prefix, h, w)`` reading of a token layer."""
    fit = _grid_fit(grid[1], grid[2], input_size)
    return math.inf if fit is None else fit[0]


def token_count_rank(tokens: int, input_size: tuple[int, int]) -> tuple[bool, float, bool]:
    """How well ``tokens`` tokens read as the positions of a grid of the input; lower is better.

    A reading without prefix tokens beats one that needs them (a class token or registers are
    few and come with a model that declares them; any count passes for a few prefix tokens and
    some grid: 512 as 6 + 22 x 23), then the smaller deviation (:func:`token_fit`), then a
    power-of-two stride. ``(True, inf, True)`` when no reading is plausible.
    """
    grid = token_grid(tokens, input_size)
    fit = None if grid is None else _grid_fit(grid[1], grid[2], input_size)
    if fit is None:
        return True, math.inf, True
    deviation, (stride_y, stride_x) = fit
    powers = all(s.is_integer() and _is_power_of_two(int(s)) for s in (stride_y, stride_x))
    return grid[0] > 0, deviation, not powers


def detect_layout(
    shape: tuple[int, ...] | torch.Size,
    input_size: tuple[int, int],
    layout: str | None = None,
    prefix: int | None = None,
    name: str = "layer",
    prefix_hint: int | None = None,
) -> FeatureLayout:
    """Find how a layer output of ``shape`` maps to a grid, for a model input of ``input_size``.

    Args:
        shape: Shape of the layer output, batch first.
        input_size: ``(H, W)`` of the model input.
        layout: Force a layout (``"NCHW"``, ``"NHWC"``, ``"NLC"``, ``"NC"``); ``None`` detects it.
            4-D outputs that fit both ``NCHW`` and ``NHWC`` are read as ``NCHW``.
        prefix: Force the number of prefix tokens of an ``NLC`` layout.
        name: Layer name for error messages.
        prefix_hint: The prefix tokens the model says it has (timm's ``num_prefix_tokens``):
            taken where the tokens after them form a grid that fits the input at least as
            closely as the reading without the hint (the fewest prefix tokens that leave a
            plausible grid); a layer before the class token joins has none. Token counts alone
            can mislead: 1 + 7 x 9 tokens (a 112 x 144 DeiT) pass for an 8 x 8 grid, and 196
            tokens without a class token for 1 + 13 x 15.

    Returns:
        The :class:`FeatureLayout`.

    Raises:
        ValueError: The shape fits no layout (the message gives the shape, the input size and how
            to override).

    Example:
        >>> detect_layout((2, 197, 192), (224, 224))  # doctest: +NORMALIZE_WHITESPACE
        FeatureLayout(layout='NLC', grid_h=14, grid_w=14, channels=192, prefix=1,
                      stride=(16.0, 16.0))
    """
    shape = tuple(int(s) for s in shape)
    height, width = int(input_size[0]), int(input_size[1])
    hint = (
        f"; pass layouts={{{name!r}: 'NCHW'|'NHWC'|'NLC'|'NC'}} to set it, or leave the layer out"
    )
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout of {name!r}: expected one of {LAYOUTS}, found {layout!r}")

    def spatial(lay: str, h: int, w: int, c: int, p: int = 0) -> FeatureLayout:
        # A layout given by the user may have a grid no single stride explains (an anisotropic
        # model): then each axis has its own.
        stride = _grid_stride(h, w, (height, width)) or (
            _integer_stride(height, h), _integer_stride(width, w))
        return FeatureLayout(lay, h, w, c, p, stride)

    ndim = len(shape)
    if layout == "NC" or (layout is None and ndim == 2):
        if ndim < 2:
            raise ValueError(f"layer {name!r}: output of shape {shape} has no channel axis{hint}")
        channels = math.prod(shape[1:])
        return FeatureLayout("NC", 1, channels, 1, 0)
    if ndim == 4:
        _, d1, d2, d3 = shape
        if layout == "NCHW":
            return spatial("NCHW", d2, d3, d1)
        if layout == "NHWC":
            return spatial("NHWC", d1, d2, d3)
        if layout is None:
            if (d2, d3) == (1, 1) or (d1, d2) == (1, 1):
                # A 1x1 map is a pooled vector: compare it as one (equivariance == invariance).
                return FeatureLayout("NC", 1, d1 * d2 * d3, 1, 0)
            # Both readings may fit ((N, 7, 7, 8) at 224: 7x8 cells of stride 29..31, or 7x7 of
            # stride 32): the closer fit wins, channels-first on a tie.
            as_nchw = _grid_fit(d2, d3, (height, width))
            as_nhwc = _grid_fit(d1, d2, (height, width))
            if as_nchw is not None and (as_nhwc is None or as_nchw[0] <= as_nhwc[0]):
                return spatial("NCHW", d2, d3, d1)
            if as_nhwc is not None:
                return spatial("NHWC", d1, d2, d3)
    if ndim == 3 and layout in (None, "NLC"):
        _, tokens, channels = shape
        if prefix is not None:
            found = token_grid(tokens - prefix, (height, width))
            grid = (prefix, *found[1:]) if found is not None and found[0] == 0 else None
        else:
            grid = token_grid(tokens, (height, width))
            if prefix_hint is not None and 0 < prefix_hint < tokens:
                # The model's prefix tokens, unless the layer has none (CaiT's and XCiT's blocks
                # before the class token joins, a ViT's patch embedding): 196 tokens are a
                # 14 x 14 grid, not 1 + 13 x 15. The closer fit to the input wins, the hint on
                # a tie (1 + 7 x 9 tokens of a 112 x 144 DeiT fit exactly; 8 x 8 does not).
                found = token_grid(tokens - prefix_hint, (height, width))
                if found is not None and found[0] == 0:
                    hinted = (prefix_hint, *found[1:])
                    if grid is None or token_fit(hinted, (height, width)) <= token_fit(
                            grid, (height, width)):
                        grid = hinted
        if grid is not None:
            p, h, w = grid
            if (h, w) == (1, 1) and p == 0 and layout is None:
                # One token (LeViT's last stage on a small input): a pooled vector, as a 1x1 map.
                return FeatureLayout("NC", 1, channels, 1, 0)
            return spatial("NLC", h, w, channels, p)
    expected = {
        2: "(N, C)",
        3: f"(N, P + h*w, C) with a token grid of the input's aspect {height}x{width} and "
        f"at most {MAX_PREFIX_TOKENS} prefix tokens",
        4: f"(N, C, h, w) or (N, h, w, C) with a grid of the input's aspect {height}x{width}",
    }.get(ndim, "2-D, 3-D or 4-D")
    raise ValueError(
        f"cannot infer the feature grid of layer {name!r}: output shape {shape}, expected "
        f"{expected}{' as ' + layout if layout else ''}{hint}"
    )


def grid_view(feats: torch.Tensor, layout: FeatureLayout | str, grid_h: int = 0, grid_w: int = 0,
              prefix: int = 0) -> torch.Tensor:
    """View ``feats`` as ``(N, C, h, w)`` without copying (prefix tokens dropped).

    Args:
        feats: The layer output, batch first, in ``layout``.
        layout: A :class:`FeatureLayout` or a layout name (then give ``grid_h``, ``grid_w``,
            ``prefix``).

    Returns:
        A view of shape ``(N, C, h, w)``; vectors ``(N, C)`` become ``(N, 1, 1, C)``.
    """
    if isinstance(layout, FeatureLayout):
        name, grid_h, grid_w, prefix = layout.layout, layout.grid_h, layout.grid_w, layout.prefix
    else:
        name = layout
    n = feats.shape[0]
    if name == "NCHW":
        return feats
    if name == "NHWC":
        return feats.permute(0, 3, 1, 2)
    if name == "NLC":
        grid = feats[:, prefix:, :]
        return grid.unflatten(1, (grid_h, grid_w)).permute(0, 3, 1, 2)
    if name == "NC":
        return feats.reshape(n, 1, 1, -1)
    raise ValueError(f"layout: expected one of {LAYOUTS}, found {name!r}")
