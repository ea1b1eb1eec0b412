"""Grid offsets of feature maps: where feature pixel 0 sits in input coordinates.

Feature pixel ``i`` of a layer with stride ``s`` sits at input coordinate ``o + i * s``.
Translations do not depend on ``o``; rotations and flips about the image centre do. A stride-2
convolution with padding ``k // 2`` has ``o = 0``, 2x2 average pooling ``o = 0.5``, a 16-pixel ViT
patch ``o = 7.5``.

``align="auto"`` finds ``o`` from the centroid of the effective receptive field of a block of
central feature pixels (mean absolute input-gradient over a few random inputs, with its flat
background removed so that global mixing such as attention does not pull it to the image centre),
snapped to half a pixel; where the pixels with a non-zero gradient lie inside the image, from the
centre of that footprint, which convolutions and pooling make exact whatever the weights. The
gradient does not pass the gates of squeeze-and-excitation blocks (:func:`global_gates_cut`),
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
            (gradient,) = torch.autograd.grad(
                target, inputs, retain_graph=i < len(names) - 1, allow_unused=True
            )
            if gradient is None:
                offsets[name] = None
                continue
            magnitude = gradient.detach().float().abs().sum((0, 1))
            footprint = _footprint_centre(magnitude) if gradient.dtype in (
                torch.float32, torch.float64) else None
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
