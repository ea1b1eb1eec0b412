"""Grid offsets of feature maps: where feature pixel 0 sits in input coordinates.

Feature pixel ``i`` of a layer with stride ``s`` sits at input coordinate ``o + i * s``.
Translations do not depend on ``o``; rotations and flips about the image centre do. A stride-2
convolution with padding ``k // 2`` has ``o = 0``, 2x2 average pooling ``o = 0.5``, a 16-pixel ViT
patch ``o = 7.5``.

``align="auto"`` finds ``o`` from the centroid of the effective receptive field of a block of
central feature pixels (mean absolute input-gradient over a few random inputs, with its flat
background removed so that global mixing such as attention does not pull it to the image centre),
snapped to half a pixel; where the pixels with a non-zero gradient lie inside the image, from the
centre of that footprint, which convolutions and pooling make exact whatever the weights; where
that footprint reaches the borders (a deep layer's receptive field about as wide as the image),
from the inner edges of the fields of the border rows and columns (:func:`_offset_from_borders`).
The gradient does not pass the gates of squeeze-and-excitation blocks (:func:`global_gates_cut`),
whose global mean would otherwise spread every later footprint over the whole image.
``"center"`` assumes ``o = (s - 1) / 2``, ``"corner"`` ``o = 0``; a number (or a ``(oy, ox)``
pair) sets it; a dict sets it per layer.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import warnings
from typing import Iterator, Mapping

import torch
from torch import nn

from .layers import LayerHooks, input_channels
from .layouts import FeatureLayout, grid_view

AlignSpec = str | float | tuple[float, float] | Mapping[str, object]


def _snap(value: float) -> float:
    return round(value * 2.0) / 2.0


def _align_error(align) -> ValueError:
    return ValueError(
        "align: expected 'auto', 'center', 'corner', a finite number, an (offset_y, offset_x) "
        f"pair of them or a dict of those per layer; found {align!r}"
    )


def _finite_number(value) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def check_align(align: AlignSpec) -> AlignSpec:
    """``align`` as given, once every spec in it is one :func:`find_offsets` accepts."""
    specs = list(align.values()) if isinstance(align, Mapping) else [align]
    for spec in specs:
        if isinstance(spec, str):
            if spec not in ("auto", "center", "corner"):
                raise _align_error(align)
        elif isinstance(spec, (tuple, list)):
            if len(spec) != 2 or not all(_finite_number(v) for v in spec):
                raise _align_error(align)
        elif not _finite_number(spec):
            raise _align_error(align)
    return align


def fixed_offset(layout: FeatureLayout, align) -> tuple[float, float]:
    """Offset for a non-``auto`` spec."""
    if layout.kind == "vector":
        return (math.nan, math.nan)
    stride_y, stride_x = layout.stride
    if align == "center":
        return ((stride_y - 1) / 2.0, (stride_x - 1) / 2.0)
    if align == "corner":
        return (0.0, 0.0)
    if _finite_number(align):
        return (float(align), float(align))
    if isinstance(align, (tuple, list)) and len(align) == 2 and all(map(_finite_number, align)):
        return (float(align[0]), float(align[1]))
    raise _align_error(align)


def find_offsets(
    model: nn.Module,
    layers: Mapping[str, FeatureLayout],
    input_size: tuple[int, int],
    align: AlignSpec = "auto",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    samples: int = 2,
    seed: int = 0,
    captured: tuple[torch.Tensor, Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, tuple[float, float]]:
    """Grid offset ``(offset_y, offset_x)`` of every layer.

    Args:
        model: The model (eval mode).
        layers: ``{name: FeatureLayout}`` of the layers.
        input_size: ``(H, W)`` of the model input.
        align: ``"auto"``, ``"center"``, ``"corner"``, a number, a pair, or a dict per layer.
        device, dtype: Where and how the probe forward runs.
        samples: Random inputs for the ``auto`` probe.
        seed: Seed of those inputs.
        captured: ``(inputs, {name: output})`` of a forward of :func:`probe_inputs` (``samples``,
            ``seed``) that already ran with gradients enabled and hooks on the layers: the ``auto``
            probe then reuses it instead of running the model again.

    Returns:
        ``{name: (offset_y, offset_x)}`` (NaN for vector layers).
    """
    per_layer = dict(align) if isinstance(align, Mapping) else {name: align for name in layers}
    offsets: dict[str, tuple[float, float]] = {}
    auto = []
    for name, layout in layers.items():
        spec = per_layer.get(name, "auto")
        if layout.kind == "vector":
            offsets[name] = (math.nan, math.nan)
        elif spec == "auto":
            auto.append(name)
        else:
            offsets[name] = fixed_offset(layout, spec)
    if auto and captured is not None:
        offsets.update(offsets_from_graph(captured[0], captured[1], {n: layers[n] for n in auto},
                                          input_size))
    elif auto:
        offsets.update(_receptive_field_offsets(model, {n: layers[n] for n in auto}, input_size,
                                                device, dtype, samples, seed))
    return {name: offsets[name] for name in layers}


def _central_block(size: int) -> slice:
    """A block of positions symmetric about the grid centre, a quarter of the grid wide.

    A block rather than one pixel, so that locally asymmetric mixing (shifted attention windows of
    Swin, which put a single pixel at a window edge) averages out across the block.
    """
    width = max(1, size // 4)
    if width % 2 != size % 2:
        width += 1
    start = (size - width) // 2
    return slice(start, start + width)


def probe_inputs(input_size: tuple[int, int], device, dtype, samples: int = 2,
                 seed: int = 0, channels: int = 3) -> torch.Tensor:
    """The seeded random inputs of the ``auto`` probe, in the graph of a leaf that requires
    gradients: not that leaf itself, so that a model may change its input in place
    (``x.sub_(mean)``), which autograd refuses on a leaf."""
    height, width = input_size
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(samples, channels, height, width, generator=generator).to(device, dtype)
    return inputs.requires_grad_(True).clone()


# Modules that scale a feature map by a gate computed from its global mean (squeeze-and-excitation
# and its kin in timm and torchvision): every child of theirs works on the pooled vector.
_GLOBAL_GATE = re.compile(r"SqueezeExcit|^SEModule$|^EffectiveSEModule$|^C?EcaModule$"
                          r"|^SelectiveKernelAttn$")


@contextlib.contextmanager
def global_gates_cut(model: nn.Module) -> Iterator[None]:
    """While active, the gates of squeeze-and-excitation blocks pass no gradient (their children's
    outputs are detached; the values are unchanged), so that ``align="auto"`` sees each layer's
    local footprint.

    A gate computed from the global mean reaches every input pixel: the footprint of every layer
    after the first such block covered the whole image, and the offset fell back on the centroid
    of random weights (EfficientNet-B0's first blocks at 224 pixels: ``(0.5, -0.5)`` instead of 0;
    MobileNetV3's: up to a pixel off at stride 4). The gate's own modules work on the pooled
    vector, ``(N, C)`` layers without an offset, so measuring them (``layers="leaves"``) needs no
    gradient through them.
    """

    def detach(module, inputs, output):
        return output.detach() if isinstance(output, torch.Tensor) else output

    handles = []
    try:
        for module in model.modules():
            if _GLOBAL_GATE.search(type(module).__name__):
                handles += [child.register_forward_hook(detach) for child in module.children()]
        yield
    finally:
        for handle in handles:
            handle.remove()


def _receptive_field_offsets(model, layers, input_size, device, dtype, samples, seed):
    inputs = probe_inputs(input_size, device, dtype, samples, seed, input_channels(model))
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str, tensor: torch.Tensor) -> None:
        captured.setdefault(name, tensor)

    # Gradients of the input only: parameters keep requires_grad, but autograd.grad(inputs=...) does
    # not accumulate into them.
    with torch.enable_grad(), global_gates_cut(model), LayerHooks(model, layers, keep):
        model(inputs)
        return offsets_from_graph(inputs, captured, layers, input_size)


def offsets_from_graph(
    inputs: torch.Tensor,
    captured: Mapping[str, torch.Tensor],
    layers: Mapping[str, FeatureLayout],
    input_size: tuple[int, int],
) -> dict[str, tuple[float, float]]:
    """Offsets of ``layers`` from their outputs ``captured`` in a forward of the probe ``inputs``.

    The forward ran with gradients enabled (see :func:`probe_inputs`); the engine uses this to find
    the layouts and the offsets from one probe forward.
    """
    # Layers the model computes without a graph (a frozen backbone under torch.no_grad in its
    # forward, as in linear probing), or from a detached tensor (a neck on a backbone's
    # detached features: a graph through its own parameters, none back to the input): the
    # gradient probe cannot see their receptive fields.
    graphless = [name for name in layers
                 if name in captured and not captured[name].requires_grad]
    offsets = _offsets_through_graph(inputs, captured, layers, input_size, graphless)
    unreached = graphless + [name for name in layers
                             if name in offsets and offsets[name] is None]
    for name in unreached:
        offsets[name] = fixed_offset(layers[name], "center")
    if unreached:
        listed = ", ".join(unreached[:8]) + (f" and {len(unreached) - 8} more"
                                             if len(unreached) > 8 else "")
        warnings.warn(
            f"align='auto' found no gradient through {len(unreached)} layer(s): {listed} (the "
            "model computes them without autograd, e.g. under torch.no_grad in its forward, or "
            "from a detached tensor); their grid offsets are taken as centred "
            "(align='center'). Translations do not depend on the offset, rotations and flips "
            "do: to choose it, pass align='corner', a number, or a dict per layer",
            UserWarning, stacklevel=5)  # the caller of measure
    return {name: offsets[name] for name in layers if name in offsets}


def _offsets_through_graph(inputs, captured, layers, input_size, graphless):
    """Offsets of the layers not in ``graphless`` from their input-gradients; None for a layer
    the gradient does not reach (:func:`offsets_from_graph`)."""
    height, width = input_size
    with torch.enable_grad():
        offsets: dict[str, tuple[float, float] | None] = {}
        names = [name for name in layers if name not in graphless]
        for i, name in enumerate(names):
            layout = layers[name]
            if name not in captured:
                raise RuntimeError(f"layer {name!r} did not run in the forward pass")
            grid = grid_view(captured[name], layout)
            rows, cols = _central_block(layout.grid_h), _central_block(layout.grid_w)
            # A seeded random mix of the channels, not their plain sum: after a LayerNorm whose
            # weight is 1 and bias 0 (an untrained model, a baseline's copy) the channels of
            # every position sum to exactly 0, and the gradient of that sum is round-off noise
            # (twins' patch embedding gave offsets from -1 to 4 over four seeds, truth 1.5).
            block = grid[:, :, rows][:, :, :, cols].float()
            mix = torch.randn(block.shape[1], generator=torch.Generator().manual_seed(i))
            target = (block * mix.to(block.device).view(1, -1, 1, 1)).sum()
            # The graph is kept for the border probes below (freed with the captured outputs).
            (gradient,) = torch.autograd.grad(target, inputs, retain_graph=True,
                                              allow_unused=True)
            if gradient is None:
                offsets[name] = None
                continue
            magnitude = _magnitude(gradient).sum((0, 1))
            # Supports (where a gradient is exactly 0) are read only from float32 and float64
            # gradients: in half precision small contributions round to 0.
            exact_zeros = (gradient.dtype in (torch.float32, torch.float64)
                           and not _underflows(gradient))
            footprint = _footprint_centre(magnitude) if exact_zeros else None
            # Remove the flat floor (global mixing reaches every pixel) before taking the centroid.
            magnitude = (magnitude - magnitude.median()).clamp_min(0)
            total = magnitude.sum()
            if not torch.isfinite(total) or total <= 0:
                offsets[name] = fixed_offset(layout, "center")
                continue
            ys = torch.arange(height, dtype=torch.float32, device=magnitude.device)
            xs = torch.arange(width, dtype=torch.float32, device=magnitude.device)
            centroid_y = float((magnitude.sum(1) * ys).sum() / total)
            centroid_x = float((magnitude.sum(0) * xs).sum() / total)
            stride_y, stride_x = layout.stride
            # The block's receptive fields centre on o + s * (mean position of the block).
            mean_row, mean_col = (rows.start + rows.stop - 1) / 2, (cols.start + cols.stop - 1) / 2
            offset = (centroid_y - stride_y * mean_row, centroid_x - stride_x * mean_col)
            if footprint is None and exact_zeros:
                # The central footprint reaches a border (a deep layer whose receptive field is
                # wider than the image): the border rows and columns still tell the offset.
                centred = _offset_from_borders(grid, inputs, layout, mix.to(block.device), offset)
                if centred is not None:
                    offset = centred
            if footprint is not None:
                # The footprint's centre is exact for convolutions and pooling whatever the
                # weights; the centroid of random weights leans by a pixel or more (ConvNeXt's
                # first stage: 0.0 / 1.0 instead of 1.5). Taken when the two are within half a
                # stride (at least 2 pixels: a stride-1 layer's centroid leans as far) of each
                # other, so that an odd footprint does not override the centroid.
                centred = (footprint[0] - stride_y * mean_row, footprint[1] - stride_x * mean_col)
                if (abs(centred[0] - offset[0]) <= max(stride_y / 2, 2.0)
                        and abs(centred[1] - offset[1]) <= max(stride_x / 2, 2.0)):
                    offset = centred
            offsets[name] = (_snap(offset[0]), _snap(offset[1]))
    return offsets


def _offset_from_borders(grid: torch.Tensor, inputs: torch.Tensor, layout: FeatureLayout,
                         mix: torch.Tensor, guess: tuple[float, float]
                         ) -> tuple[float, float] | None:
    """The offset from the inner edges of the receptive fields of the grid's border rows and
    columns, where they lie inside the image; else None.

    Cell ``i``'s field spans ``o + i * s - r .. o + i * s + r`` along an axis where the network
    is translation equivariant (convolutions and pooling, whatever their weights and padding).
    When ``r`` is about as wide as the image, the field of a central cell reaches both borders
    and the centroid of random weights leans (MobileNetV2's stride-16 stages at 224 pixels: up
    to 2.5 pixels; Inception v3's Mixed_6b: 5). The first cell's field still ends inside the
    image, at ``o + r``, and the last one's (``n - 1``) starts at ``o + (n - 1) * s - r``: their
    sum gives ``o`` exactly. The fields of the second and the second-to-last cells must end and
    start one stride further in: otherwise the fields are no translates of one another (windows
    padded at one end) and nothing is read. Where that cannot be seen (a grid one cell wide, or
    second cells whose fields reach the far border), the result is taken only within half a
    stride of the centroid's ``guess``, as the central footprint's is.
    The first probe image carries one border cell and the second the other, in one backward
    pass (the images are independent).
    """
    offsets = []
    for axis, (cells, stride) in enumerate(zip((layout.grid_h, layout.grid_w), layout.stride)):
        outer = _field_edges(grid, inputs, axis, 0, cells - 1, mix)
        if outer is None:
            return None
        far_end, near_start = outer
        inner = [edges for edges in [_field_edges(grid, inputs, axis, 1, cells - 2, mix)]
                 if edges is not None] if cells >= 2 else []
        if inner and (abs(inner[0][0] - far_end - stride) > 1e-6
                      or abs(near_start - inner[0][1] - stride) > 1e-6):
            return None
        offset = _snap((far_end + near_start - (cells - 1) * stride) / 2)
        if not inner and abs(offset - guess[axis]) > max(stride / 2, 2.0):
            return None
        offsets.append(offset)
    return offsets[0], offsets[1]


def _field_edges(grid: torch.Tensor, inputs: torch.Tensor, axis: int, first: int, last: int,
                 mix: torch.Tensor) -> tuple[int, int] | None:
    """Along ``axis`` (0: rows), the far end of the field of grid line ``first`` and the near
    start of the field of line ``last``, in input pixels; None where either reaches the far
    border or a gradient came near underflow."""
    weights = mix.view(1, -1, 1, 1)
    lines = [grid.narrow(2 + axis, first, 1), grid.narrow(2 + axis, last, 1)]
    if inputs.shape[0] >= 2:
        targets = [(lines[0][:1] * weights).sum() + (lines[1][1:2] * weights).sum()]
        picks = [(0, 0), (0, 1)]  # (backward pass, image) of the first and the last line
    else:
        targets = [(line * weights).sum() for line in lines]
        picks = [(0, 0), (1, 0)]
    gradients = [torch.autograd.grad(target, inputs, retain_graph=True)[0] for target in targets]
    if any(_underflows(gradient) for gradient in gradients):
        return None
    size = inputs.shape[2 + axis]
    reached = []
    for step, image in picks:
        magnitude = _magnitude(gradients[step][image]).sum(0)  # (H, W)
        reached.append(torch.nonzero(magnitude.sum(1 - axis) > 0).flatten())
    if any(pixels.numel() == 0 for pixels in reached):
        return None
    far_end, near_start = int(reached[0][-1]), int(reached[1][0])
    if far_end >= size - 1 or near_start <= 0:
        return None  # the border lines' fields reach the far border too
    return far_end, near_start


def _magnitude(gradient: torch.Tensor) -> torch.Tensor:
    """``|gradient|`` in float32 or float64 (a float64 gradient's smallest paths would round to 0
    in float32, and its support shrink)."""
    magnitude = gradient.detach().abs()
    return magnitude if magnitude.dtype == torch.float64 else magnitude.float()


def _underflows(gradient: torch.Tensor) -> bool:
    """Whether some of the gradient's paths come within 2^24 of the dtype's smallest normal
    number: then others may have rounded to 0, and its support can end short of the receptive
    field's (timm's ConvNeXt at random init scales each residual branch by 1e-6: six blocks on,
    the outermost pixels of a field get 1e-44 in float32, and some get 0)."""
    magnitude = gradient.detach().abs()
    smallest = magnitude[magnitude > 0].min() if bool((magnitude > 0).any()) else None
    return smallest is not None and float(smallest) < torch.finfo(gradient.dtype).tiny * 2.0**24


def _footprint_centre(magnitude: torch.Tensor) -> tuple[float, float] | None:
    """Centre ``(y, x)`` of the pixels with a non-zero gradient when they lie inside the image
    (a receptive field that reaches a border is cut there, and its centre moves); else None."""
    height, width = magnitude.shape
    rows = torch.nonzero(magnitude.sum(1) > 0).flatten()
    cols = torch.nonzero(magnitude.sum(0) > 0).flatten()
    if rows.numel() == 0 or cols.numel() == 0:
        return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    if top == 0 or left == 0 or bottom == height - 1 or right == width - 1:
        return None
    return (top + bottom) / 2, (left + right) / 2
