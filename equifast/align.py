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
from the inner edges of the fields of the border rows and columns (:func:`_offset_from_borders`);
where the input shows neither (attention), on the grid of the module that began the layer's grid
(:class:`GridAnchors`, :func:`_relayed_offset`); where every field spans the image, from the
grid's own structure: a direct path's cells on the anchor's grid (:func:`_carried_offset`), a
reduction read on its module's input (:func:`_local_offset`, :func:`_local_borders` on a small
grid), the offset of the anchor on the
layer's own grid (:func:`_same_grid_offset`). The gradient does not pass the gates of
squeeze-and-excitation blocks (:func:`global_gates_cut`), whose global mean would otherwise
spread every later footprint over the whole image.
``"center"`` assumes ``o = (s - 1) / 2``, ``"corner"`` ``o = 0``; a number (or a ``(oy, ox)``
pair) sets it; a dict sets it per layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import numbers
import re
import warnings
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .layers import LayerHooks, first_tensor, input_channels
from .layouts import FeatureLayout, detect_layout, grid_view
from .result import shown_names

AlignSpec = str | float | tuple[float, float] | Mapping[str, object]
# dtypes whose gradients are too coarse for the probe (probe_dtypes)
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)
# Seconds the probe reads layers before its progress bar shows (find_offsets' progress)
PROBE_BAR_DELAY = 2.0

# How align="auto" found each offset (find_offsets' readings, result.config["offset_readings"]).
# Every reading but the centroid's is exact for convolutions and pooling whatever the weights; the
# centroid of random weights leans by a pixel or more. A layer that shares the reading of a layer
# before it (the same tensor, or computed from it by ops on each position alone) has its label.
READINGS = {
    "footprint": "the centre of the footprint of the layer's central block on the input",
    "borders": "the inner edges of the fields of its border rows and columns on the input",
    "anchor": "its footprint on the grid of the module that began its grid (an anchor)",
    "direct path": "a direct path's cells on the grid of the module that began its grid",
    "anchor grid": "the offset of the anchor on its own grid",
    "centroid": "the centroid of its input-gradient (an estimate: leans with random weights)",
    "no gradient": "none: no gradient reached the input, so the offset is centred",
    "given": "align= set it",
}


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
    anchors: GridAnchors | None = None,
    readings: dict[str, str] | None = None,
    made: Mapping[str, AsMade] | None = None,
    progress: bool = False,
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
        anchors: The :class:`GridAnchors` recorded in that forward, if any.
        readings: A dict to fill with how each offset was found, ``{name: reading}`` (a key of
            :data:`READINGS`: ``"footprint"``, ..., ``"centroid"`` for an estimate, ``"given"``
            where ``align`` set it); vector layers are left out.
        made: The outputs of ``captured`` as their layers made them (:func:`record_outputs`).
        progress: Show a progress bar over the layers the ``auto`` probe reads, where that
            takes more than a few seconds (the leaves of a large model).

    Returns:
        ``{name: (offset_y, offset_x)}`` (NaN for vector layers).
    """
    per_layer = dict(align) if isinstance(align, Mapping) else {name: align for name in layers}
    offsets: dict[str, tuple[float, float]] = {}
    found: dict[str, str] = {}
    auto = []
    for name, layout in layers.items():
        spec = per_layer.get(name, "auto")
        if layout.kind == "vector":
            offsets[name] = (math.nan, math.nan)
        elif spec == "auto":
            auto.append(name)
        else:
            offsets[name] = fixed_offset(layout, spec)
            found[name] = "given"
    if auto and captured is not None:
        offsets.update(offsets_from_graph(captured[0], captured[1], {n: layers[n] for n in auto},
                                          input_size, anchors, readings=found, made=made,
                                          progress=progress))
    elif auto:
        attempts = probe_dtypes(dtype)
        for attempt, probe_dtype in enumerate(attempts):
            try:
                with widened_to(model, probe_dtype, dtype):
                    offsets.update(_receptive_field_offsets(
                        model, {n: layers[n] for n in auto}, input_size, device, probe_dtype,
                        samples, seed, found, progress))
                break
            except Exception:
                if attempt == len(attempts) - 1:
                    raise
    if readings is not None:
        readings.update({name: found[name] for name in layers if name in found})
    return {name: offsets[name] for name in layers}


def probe_dtypes(dtype: torch.dtype) -> list[torch.dtype]:
    """The dtypes to try the ``auto`` probe in, in order: float32 first where the model is in
    bfloat16 or float16 (with its parameters :func:`widened_to` it), whose gradients round small
    contributions to 0, so that no footprint is read and every offset falls back to the centroid
    (a 2x2 stride-2 convolution behind a 4x4 patch stem read 4.5 / 3.5 for 3.5 in bfloat16);
    then the model's own, for a model that fails in float32 (one that casts its input to its
    dtype)."""
    return [torch.float32, dtype] if dtype in _SIXTEEN_BIT else [dtype]


@contextlib.contextmanager
def widened_to(model: nn.Module, probe_dtype: torch.dtype, dtype: torch.dtype) -> Iterator[None]:
    """With ``model``'s 16-bit floating parameters and buffers widened to float32 where the probe
    runs in float32 for a 16-bit ``dtype`` (:func:`probe_dtypes`), narrowed back after. In place
    (their ``.data``, so that tied tensors stay tied), and exact: float32 holds every bfloat16 and
    float16 value."""
    widened = []
    if probe_dtype == torch.float32 and dtype in _SIXTEEN_BIT:
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.dtype in _SIXTEEN_BIT:
                widened.append((tensor, tensor.dtype))
                tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for tensor, original in widened:
            tensor.data = tensor.data.to(original)


def estimated_offsets(readings: Mapping[str, str], linear_parts) -> list[str]:
    """The layers whose offsets ``align="auto"`` could only estimate (``"centroid"`` readings of
    :func:`find_offsets`), where the group's elements depend on them: where one element's linear
    part (``linear_parts``, 2x2 each) is not the identity. Translations do not depend on
    offsets."""
    identity = torch.eye(2, dtype=torch.float64)
    if all(torch.equal(torch.as_tensor(part, dtype=torch.float64), identity)
           for part in linear_parts):
        return []
    return [name for name, reading in readings.items() if reading == "centroid"]


def warn_estimated_offsets(readings: Mapping[str, str], linear_parts, stacklevel: int) -> None:
    """Warn where ``align="auto"`` could only estimate offsets the group depends on
    (:func:`estimated_offsets`)."""
    estimated = estimated_offsets(readings, linear_parts)
    if not estimated:
        return
    warnings.warn(
        f"align='auto' could only estimate the grid offsets of {len(estimated)} layer(s), from "
        "the centroid of their input-gradients, which leans by a pixel or more: "
        f"{shown_names(estimated)}. The scores of rotations and flips depend on these offsets "
        "(result.config['offsets']; how "
        "each was found: config['offset_readings']); to set them, pass align='center', "
        "'corner', a number or a dict per layer", UserWarning, stacklevel=stacklevel + 1)


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


@dataclasses.dataclass
class _Anchor:
    name: str
    tensor: torch.Tensor
    layout: FeatureLayout
    step: int  # when it ran, in the order of GridAnchors.finished
    # The module's input where it is a feature map of another grid (a downsampling
    # convolution's or pooling's input), for :func:`_local_source`.
    input: torch.Tensor | None = None
    input_layout: FeatureLayout | None = None
    # Whether an earlier anchor had its grid's size (see GridAnchors).
    again: bool = False


class GridAnchors:
    """Records, during the probe forward, the outputs of the leaf modules that begin a grid (a
    patch embedding, a downsampling convolution or pooling, a patch merging's norm) and the
    order in which modules finish.

    A grid begins at the first output of its size, and again at each module of another kind or
    configuration that makes that size from the newest grid (the latest size that a module made
    from another grid: the network's current stage), one anchor per kind:
    - PVT's attention reduces its keys to the size of the stride-32 stage's grid (o = 14 on
      224 px) long before that stage's own downsampling (o = 0);
    - GhostNetV2's attention pools its input functionally, so its first convolution on the
      pooled grid (o = 2 at stride 8) runs before the stage's own downsampling (o = 0);
    - side paths from older grids begin none: NASNet pools the cell before last by 1 x 1
      beside its reduction, at another offset.
    Where code inside a module made the grid before its first leaf ran (torchvision's Swin V2
    merges patches by slicing, then reduces them by a linear layer), the innermost module that
    made the grid from another grid gives the anchor its input (:meth:`_made_inside`).
    Such a later anchor is read on its module's input (:func:`_local_offset`), and left out
    where that does not show it or the image's reading disagrees. The image's reading follows
    every path into it (HRNet's fusions sum nearest-upsampled branches, whose coarse cells skew
    it: -4 for 0); the input's assumes that the input shares its grid's offset (NASNet shifts
    a path by a cell, a crop and a pad that keep the grid's size, before pooling it: 1 for 5).

    Where a layer's input-gradient does not show its offset (attention reaches every pixel; a
    deep layer's field is clipped by the image), it is read on the grid of the anchor before
    it, whose own offset the input-gradient gives (:func:`_relayed_offset`). Use as a context
    manager around the probe forward; its hooks only record.
    """

    MAX_ANCHORS = 64

    def __init__(self, model: nn.Module, input_size: tuple[int, int], batch: int) -> None:
        self.model, self.input_size, self.batch = model, input_size, batch
        self.anchors: list[_Anchor] = []
        self.finished: dict[str, int] = {}
        self._grids: set[tuple[int, int]] = set()
        self._makers: set[tuple] = set()  # (input grid, output grid, module) of the anchors
        self._leaf_makers: list[tuple[str, tuple[int, int]]] = []  # leaves that made a grid
        # the latest grid size that a module made from another grid (the current stage's)
        self._newest: tuple[int, int] | None = None
        self._steps = 0
        self._handles: list = []

    def __enter__(self) -> "GridAnchors":
        for name, module in self.model.named_modules():
            # (a scripted submodule takes no hooks: what it outputs is not recorded)
            if name and not isinstance(module, torch.jit.ScriptModule):
                leaf = next(module.children(), None) is None
                self._handles.append(module.register_forward_hook(
                    functools.partial(self._record, name, leaf)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(self, name: str, leaf: bool, module, args, output) -> None:
        self._steps += 1
        self.finished.setdefault(name, self._steps)
        if not leaf and not any(anchor.input is None for anchor in self.anchors):
            return
        if leaf and len(self.anchors) >= self.MAX_ANCHORS:
            return
        tensor, layout = self._feature_map(first_tensor(output, batch=self.batch))
        if layout is None or layout.kind != "spatial":
            return
        grid = (layout.grid_h, layout.grid_w)
        given, given_layout = self._feature_map(first_tensor(args, batch=self.batch))
        if given_layout is None or given_layout.kind != "spatial" or (
                given_layout.grid_h, given_layout.grid_w) == grid:
            given, given_layout = None, None
        if not leaf:
            if given is not None:
                self._made_inside(name, grid, given, given_layout)
            return
        if given is not None:
            self._leaf_makers.append((name, grid))
        maker = (None if given_layout is None else (given_layout.grid_h, given_layout.grid_w),
                 grid, repr(module))
        again = grid in self._grids
        if not again or (given is not None and maker[0] == self._newest
                         and maker not in self._makers):
            self.anchors.append(_Anchor(name, tensor, layout, self._steps, given, given_layout,
                                        again=again))
            self._grids.add(grid)
            self._makers.add(maker)
            if not again and given is not None:
                self._newest = grid

    def _made_inside(self, name: str, grid: tuple[int, int], given: torch.Tensor,
                     given_layout: FeatureLayout) -> None:
        """A module that made ``grid`` from another grid (``given``) and holds an anchor whose
        own input was on that grid already: code inside the module made the grid before the
        anchor's leaf ran (torchvision's Swin V2 merges 2 x 2 patches by slicing, then a linear
        reduction). The anchor is read on this module's input (:func:`_local_source`), and its
        module counts as having made its grid from another grid. Not where a leaf inside the
        module made that grid from another grid: the code's grid is then a side path
        (GhostNetV2's blocks pool their input for a gate beside their strided convolution)."""
        if any(maker.startswith(name + ".") and made == grid
               for maker, made in self._leaf_makers):
            return
        for anchor in self.anchors:
            if (anchor.input is None and anchor.name.startswith(name + ".")
                    and (anchor.layout.grid_h, anchor.layout.grid_w) == grid):
                anchor.input, anchor.input_layout = given, given_layout
                if not anchor.again:
                    self._newest = grid

    def _feature_map(self, tensor: torch.Tensor | None
                     ) -> tuple[torch.Tensor | None, FeatureLayout | None]:
        """``(tensor, layout)`` where ``tensor`` is a batch-first feature map in the probe's
        graph: 4-D, or 3-D tokens (LeViT subsamples its token grid by slicing), not the windows
        of all images along the batch axis, nor attention maps."""
        if (tensor is None or tensor.dim() not in (3, 4) or tensor.shape[0] != self.batch
                or not tensor.is_floating_point() or not tensor.requires_grad):
            return None, None
        try:
            return tensor, detect_layout(tensor.shape, self.input_size)
        except ValueError:
            return None, None


@dataclasses.dataclass
class AsMade:
    """A layer's output in the probe forward as its layer made it. The model may write the
    output in place later (timm's residual blocks add the shortcut to their last BatchNorm's
    output, then apply the ReLU in place), and the gradient of the written tensor is then that
    of the sum: ResNet-D's block whose shortcut average-pools (2 px further at stride 8) read its
    last BatchNorm 2 px off its convolution's offset. The copy, a node of the graph on the
    output as made, is read instead where the version counter says it was written."""

    version: int | None  # the output's version counter then (None: it has none)
    node: object  # its autograd node then (grad_fn)
    copy: torch.Tensor | None  # kept where the model wrote the output (record_outputs)


def version_of(tensor: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place op), None where it has none (an
    inference tensor: a model that runs part of its forward under inference_mode)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def record_outputs(captured: dict[str, torch.Tensor], made: dict[str, AsMade]
                   ) -> Callable[[str, torch.Tensor], None]:
    """The :class:`~equifast.layers.LayerHooks` callback of a gradient probe: the first output of
    each layer into ``captured`` and, where it is in the graph, its :class:`AsMade` into
    ``made`` (call :func:`drop_unwritten` after the forward)."""
    latest: dict[int, AsMade] = {}  # by the output's id: the last record of that tensor

    def keep(name: str, tensor: torch.Tensor) -> None:
        if name in captured:
            return
        captured[name] = tensor
        if tensor.requires_grad:
            version, earlier = version_of(tensor), latest.get(id(tensor))
            if earlier is not None and earlier.version == version:
                made[name] = earlier  # (an nn.Identity after a layer: no second copy)
            else:
                made[name] = latest[id(tensor)] = AsMade(version, tensor.grad_fn, tensor.clone())

    return keep


def drop_unwritten(captured: Mapping[str, torch.Tensor], made: Mapping[str, AsMade]) -> None:
    """After the probe forward: the copies of the outputs that nothing wrote since their layer
    made them are dropped (the output itself is read)."""
    for name, as_made in made.items():
        if version_of(captured[name]) == as_made.version:
            as_made.copy = None


# Autograd nodes of ops that act on each position alone (activations, arithmetic with a constant,
# a parameter or a scalar), by name without the version digits: their outputs have the receptive
# fields of their inputs. BatchNorm is one where it normalizes by its running statistics.
_POINTWISE_NODES = frozenset({
    "ReluBackward", "HardswishBackward", "SiluBackward", "LeakyReluBackward", "HardtanhBackward",
    "EluBackward", "CeluBackward", "SigmoidBackward", "HardsigmoidBackward", "TanhBackward",
    "MishBackward", "GeluBackward", "ThresholdBackward", "RreluWithNoiseBackward",
    "ClampBackward", "ClampMinBackward", "ClampMaxBackward", "NegBackward",
    "AddBackward", "SubBackward", "MulBackward", "DivBackward",
    "NativeBatchNormLegitNoTrainingBackward",
})
# Adaptive poolings: the identity where they keep their input's size (_pointwise_input).
_ADAPTIVE_POOL_NODES = frozenset({"AdaptiveAvgPool2DBackward", "AdaptiveMaxPool2DBackward"})
# BatchNorm's nodes on the CPU, with cuDNN and with MIOpen: on each position alone where they
# normalize by the running statistics (_saved_training False).
_BATCH_NORM_NODES = frozenset({
    "NativeBatchNormBackward", "CudnnBatchNormBackward", "MiopenBatchNormBackward",
})


def _pointwise_input(node, shape: tuple[int, ...] | None = None) -> object | None:
    """The one input node of an autograd ``node`` that acts on each position alone and whose other
    operands do not depend on the input (parameters, constants, scalars: a ReLU, a BatchNorm in
    eval mode, ``x * 0.5``; not ``x + shortcut``), or of an adaptive pooling whose input has
    ``shape``, the shape of its output (:func:`_pointwise_chain`): one that keeps the size is the
    identity (torchvision's AlexNet and VGG pool their 6 x 6 / 7 x 7 maps to 6 x 6 / 7 x 7 at
    224 px). None for any other node."""
    base = re.sub(r"\d+$", "", node.name())
    if base in _BATCH_NORM_NODES:
        if getattr(node, "_saved_training", True) is not False:
            return None  # batch statistics mix the positions
    elif base in _ADAPTIVE_POOL_NODES:
        try:
            pooled = getattr(node, "_saved_self", None)
        except RuntimeError:  # its input was written in place since: not known
            return None
        if shape is None or not isinstance(pooled, torch.Tensor) or tuple(pooled.shape) != shape:
            return None  # (a pooling to another size mixes the positions)
    elif base not in _POINTWISE_NODES:
        return None
    inputs = [nxt for nxt, _ in node.next_functions
              if nxt is not None and type(nxt).__name__ != "AccumulateGrad"]
    return inputs[0] if len(inputs) == 1 else None


def _pointwise_chain(node, shape: tuple[int, ...] | None = None,
                     limit: int = 64) -> Iterator[object]:
    """``node``, then the nodes it reads through ops on each position alone
    (:func:`_pointwise_input`; adaptive poolings that keep the size where ``shape``, that of
    ``node``'s output, is given): outputs of all of them have the same receptive fields."""
    for _ in range(limit):
        if node is None:
            return
        yield node
        node = _pointwise_input(node, shape)


def _receptive_field_offsets(model, layers, input_size, device, dtype, samples, seed,
                             readings=None, progress=False):
    inputs = probe_inputs(input_size, device, dtype, samples, seed, input_channels(model))
    captured: dict[str, torch.Tensor] = {}
    made: dict[str, AsMade] = {}
    # Gradients of the input only: parameters keep requires_grad, but autograd.grad(inputs=...) does
    # not accumulate into them.
    anchors = GridAnchors(model, input_size, samples)
    with torch.enable_grad(), global_gates_cut(model), \
            LayerHooks(model, layers, record_outputs(captured, made)), anchors:
        model(inputs)
        drop_unwritten(captured, made)
        return offsets_from_graph(inputs, captured, layers, input_size, anchors, readings,
                                  made=made, progress=progress)


def offsets_from_graph(
    inputs: torch.Tensor,
    captured: Mapping[str, torch.Tensor],
    layers: Mapping[str, FeatureLayout],
    input_size: tuple[int, int],
    anchors: GridAnchors | None = None,
    readings: dict[str, str] | None = None,
    made: Mapping[str, AsMade] | None = None,
    progress: bool = False,
) -> dict[str, tuple[float, float]]:
    """Offsets of ``layers`` from their outputs ``captured`` in a forward of the probe ``inputs``.

    The forward ran with gradients enabled (see :func:`probe_inputs`); the engine uses this to find
    the layouts and the offsets from one probe forward. ``readings``, if given, is filled with how
    each offset was found (:data:`READINGS`). ``made``: the outputs as their layers made them
    (:func:`record_outputs`), read where the model wrote them in place later. ``progress``: a
    bar over the layers, shown where reading them takes more than a few seconds.
    """
    # Layers the model computes without a graph (a frozen backbone under torch.no_grad in its
    # forward, as in linear probing), or from a detached tensor (a neck on a backbone's
    # detached features: a graph through its own parameters, none back to the input): the
    # gradient probe cannot see their receptive fields.
    graphless = [name for name in layers
                 if name in captured and not captured[name].requires_grad]
    read = _offsets_through_graph(inputs, captured, layers, input_size, graphless, anchors,
                                  made or {}, progress)
    unreached = graphless + [name for name in layers if name in read and read[name] is None]
    offsets = {name: found[0] for name, found in read.items() if found is not None}
    found_by = {name: found[1] for name, found in read.items() if found is not None}
    for name in unreached:
        offsets[name] = fixed_offset(layers[name], "center")
        found_by[name] = "no gradient"
    if readings is not None:
        readings.update({name: found_by[name] for name in layers if name in found_by})
    if unreached:
        warnings.warn(
            f"align='auto' found no gradient through {len(unreached)} layer(s): "
            f"{shown_names(unreached)} (the "
            "model computes them without autograd, e.g. under torch.no_grad in its forward, or "
            "from a detached tensor); their grid offsets are taken as centred "
            "(align='center'). Translations do not depend on the offset, rotations and flips "
            "do: to choose it, pass align='corner', a number, or a dict per layer",
            UserWarning, stacklevel=5)  # the caller of measure
    return {name: offsets[name] for name in layers if name in offsets}


def _offsets_through_graph(inputs, captured, layers, input_size, graphless, anchors=None,
                           made=None, progress=False):
    """``(offset, reading)`` of the layers not in ``graphless`` from their input-gradients
    (:func:`_read_offset`); None for a layer the gradient does not reach
    (:func:`offsets_from_graph`). Where a layer's gradient on the
    input does not show its offset, it is read relative to the latest of the ``anchors``
    (:class:`GridAnchors`) before it whose offset the input-gradient gave. ``made``: the
    outputs as their layers made them (:class:`AsMade`), read where the model wrote them."""
    made = made or {}
    strides = {(layout.grid_h, layout.grid_w): layout.stride for layout in layers.values()
               if layout.kind == "spatial"}
    pending = list(anchors.anchors) if anchors is not None else []
    finished = anchors.finished if anchors is not None else {}
    sources: list[tuple[torch.Tensor, FeatureLayout, tuple[float, float]]] = []
    # Whether each source's grid was made by its module from another grid (not by functional
    # code before it: GhostNetV2's attention pools its input to the next stage's size, at
    # another offset, before the stage's downsampling): only those give their offset to the
    # layers on their grid (_same_grid_offset).
    shareable: list[bool] = []
    # The anchors that finished before the current layer but are not read yet: they are read,
    # in their order, only when a layer's own footprint does not give its offset (a
    # convolutional stage's does: resnet18's five stages need none of their five anchors, each
    # a backward pass and its translate check). Each anchor's reading depends only on the
    # anchors read before it, so reading them late changes no offset.
    unread: list[_Anchor] = []

    def read_anchors() -> None:
        while unread:
            anchor = unread.pop(0)
            grid = (anchor.layout.grid_h, anchor.layout.grid_w)
            anchor_layout = dataclasses.replace(
                anchor.layout, stride=strides.get(grid, anchor.layout.stride))
            # (an anchor begins its grid: it shares no offset with an earlier one of its
            # size, and is read on its module's input where the image does not show it)
            local = _local_source(anchor, sources, shareable, strides)
            if anchor.again and local is None:
                continue  # read on its module's input alone, which no source shows
            seed = 10_000 + anchor.step
            read = _read_offset(anchor.tensor, anchor_layout, inputs, input_size,
                                seed=seed, sources=sources)
            exact = read is not None and read[1] != "centroid"
            offset = None
            if local is not None and (anchor.again or not exact):
                offset = _local_offset(anchor.tensor, anchor_layout, local, seed)
                if offset is None and not anchor.again:
                    offset = _local_borders(anchor.tensor, anchor_layout, local, seed)
            if anchor.again:
                # on its input, unless the image disagrees (see GridAnchors)
                read = None if offset is None or (exact and offset != read[0]) else (
                    offset, "reduction")
            elif not exact and offset is not None:
                read = (offset, "reduction")
            if read is not None and read[1] != "centroid":
                sources.append((anchor.tensor, anchor_layout, read[0]))
                shareable.append(anchor.input is not None)

    names = [name for name in layers if name not in graphless]
    bar = contextlib.nullcontext(names)
    if progress:
        from tqdm.auto import tqdm

        # Reading a layer's footprint takes a backward pass to the input: the leaves of a large
        # model take seconds to minutes on a CPU. A short probe shows no bar (delay).
        bar = tqdm(names, desc="align probe", unit="layer", delay=PROBE_BAR_DELAY, leave=False)
    with torch.enable_grad(), bar as steps:
        offsets: dict[str, tuple[tuple[float, float], str] | None] = {}
        first_output: dict[int, str] = {}  # id of a captured output: the first layer with it
        made_by: dict[object, str] = {}  # autograd node of an output as made: the first layer
        for i, name in enumerate(steps):
            layout = layers[name]
            if name not in captured:
                raise RuntimeError(f"layer {name!r} did not run in the forward pass")
            # The anchors that finished before this layer (or are its own output) join the
            # unread ones, in their order: each is read (from the input, else from the anchors
            # before it) when a layer needs it.
            while pending and pending[0].step <= finished.get(name, math.inf):
                unread.append(pending.pop(0))
            tensor = captured[name]
            as_made = made.get(name)
            # The output of an earlier layer again (an nn.Identity, a Dropout in eval mode) or
            # through ops on each position alone (an activation, in place or not; a BatchNorm
            # in eval mode; an adaptive pooling to the size it pools): the same cells and
            # fields, so the same offset and reading, without
            # another backward pass (the leaves at 112 px: resnet18's take 29 readings, 49
            # where only the very tensor was shared; vit_tiny's 88, 100; convnext_atto's 77,
            # 89). A sum with another path (+= shortcut) is read (see AsMade).
            if as_made is not None:
                same = next((made_by[node] for node
                             in _pointwise_chain(as_made.node, tuple(tensor.shape))
                             if node in made_by and layers[made_by[node]] == layout), None)
                made_by.setdefault(as_made.node, name)
            else:  # no record of how it was made: the very tensor alone
                same = first_output.setdefault(id(tensor), name)
                if same == name or captured[same] is not tensor or layers[same] != layout:
                    same = None
            if same is not None:
                offsets[name] = offsets[same]
                continue
            if as_made is not None and as_made.copy is not None:
                tensor = as_made.copy  # written in place since: read as the layer made it
            read = _read_offset(tensor, layout, inputs, input_size, seed=i,
                                sources=sources, shareable=shareable,
                                unread=[anchor.tensor for anchor in unread],
                                read_unread=read_anchors)
            offsets[name] = read
    return offsets


def _local_source(anchor: _Anchor,
                  sources: list[tuple[torch.Tensor, FeatureLayout, tuple[float, float]]],
                  shareable: list[bool],
                  strides: Mapping[tuple[int, int], tuple[float, float]]
                  ) -> tuple[torch.Tensor, FeatureLayout, tuple[float, float]] | None:
    """The input of an anchor's module as a source, where it lies on the grid of a source
    whose offset is known: a downsampling convolution or pooling read on its own input, one
    kernel wide, where the fields before it span the image (Inception v3's stride-32
    reductions behind its stride-16 stage). Modules that keep a grid's size keep its offset
    (convolutions padded to keep the size, residual and concatenated paths), so the input
    takes the offset of the latest source on its grid that a module made from another grid
    (``shareable``, as for :func:`_same_grid_offset`)."""
    if anchor.input is None:
        return None
    grid = (anchor.input_layout.grid_h, anchor.input_layout.grid_w)
    for (_, source_layout, source_offset), ok in zip(reversed(sources), reversed(shareable)):
        if ok and (source_layout.grid_h, source_layout.grid_w) == grid:
            layout = dataclasses.replace(anchor.input_layout,
                                         stride=strides.get(grid, source_layout.stride))
            return anchor.input, layout, source_offset
    return None


def _local_offset(tensor: torch.Tensor, layout: FeatureLayout,
                  local: tuple[torch.Tensor, FeatureLayout, tuple[float, float]],
                  seed: int) -> tuple[float, float] | None:
    """The offset of an anchor from the footprint of its central block on its module's input
    (:func:`_local_source`), where that lies inside the input's grid and moves by one cell of
    the anchor with the block. Not checked against the centroid: the footprint is one kernel
    wide, and the centroid of a field that spans the image leans by more than a stride."""
    grid = grid_view(tensor, layout)
    block = (_central_block(layout.grid_h), _central_block(layout.grid_w))
    return _relayed_offset(grid, _probe_mix(grid, seed), layout, block, [local], guess=None)


def _local_borders(tensor: torch.Tensor, layout: FeatureLayout,
                   local: tuple[torch.Tensor, FeatureLayout, tuple[float, float]],
                   seed: int) -> tuple[float, float] | None:
    """The offset of an anchor from the inner edges of the fields of its border rows and
    columns on its module's input (:func:`_offset_from_borders`, one grid down), where its
    central block's footprint there reaches the input grid's borders: a 5x5 depthwise reduction
    to a grid of 4 x 4 cells (EfficientNet-B0's and MobileNetV3's stride-32 stages at 128 px,
    whose fields span the image). Read only where the second lines' fields start and end one
    cell of the anchor further in (translates of one another), as no guess checks it."""
    source, source_layout, source_offset = local
    ratios = tuple(layout.stride[axis] / source_layout.stride[axis] for axis in (0, 1))
    if min(layout.grid_h, layout.grid_w) < 3 or any(ratio != int(ratio) for ratio in ratios):
        return None
    grid = grid_view(tensor, layout)
    # the offset in the input grid's cells, where the anchor's stride is the ratio of the two
    cells = _offset_from_borders(grid, source, dataclasses.replace(layout, stride=ratios),
                                 _probe_mix(grid, seed), guess=None, inputs_layout=source_layout)
    if cells is None:
        return None
    return tuple(_snap(source_offset[axis] + source_layout.stride[axis] * cells[axis])
                 for axis in (0, 1))


def _probe_mix(grid: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random mix of the channels of ``grid`` (B, C, h, w), not their plain sum:
    after a LayerNorm whose weight is 1 and bias 0 (an untrained model, a baseline's copy) the
    channels of every position sum to exactly 0, and the gradient of that sum is round-off
    noise (twins' patch embedding gave offsets from -1 to 4 over four seeds, truth 1.5)."""
    mix = torch.randn(grid.shape[1], generator=torch.Generator().manual_seed(seed))
    return mix.to(grid.device)


def _read_offset(tensor: torch.Tensor, layout: FeatureLayout, inputs: torch.Tensor,
                 input_size: tuple[int, int], seed: int,
                 sources: list[tuple[torch.Tensor, FeatureLayout, tuple[float, float]]],
                 shareable: list[bool] | None = None,
                 unread: Sequence[torch.Tensor] = (),
                 read_unread: Callable[[], None] | None = None
                 ) -> tuple[tuple[float, float], str] | None:
    """``(offset, reading)`` of one layer output from the gradient of a random channel mix of its
    central block, ``reading`` a key of :data:`READINGS`: exact where a footprint gave it (on
    the input, its borders, or an anchor in ``sources``, directly or by a direct path) or an
    anchor on its grid of those ``shareable`` marks (:func:`_same_grid_offset`; none for an
    anchor, which begins its grid), else ``"centroid"``; None where the gradient does not reach
    the input. ``unread``: the tensors of anchors not read yet, which ``read_unread`` reads
    into ``sources`` and ``shareable`` where the footprint on the input does not give the
    offset (their gradients come with the same backward pass)."""
    height, width = input_size
    grid = grid_view(tensor, layout)
    rows, cols = _central_block(layout.grid_h), _central_block(layout.grid_w)
    mix = _probe_mix(grid, seed)
    target = _block_target(grid, mix, rows, cols)
    # The graph is kept for the border probes and the anchors (freed with the captured outputs).
    # The gradients on the anchors' grids come from the same backward pass, for the relays.
    candidates = [*(source for source, _, _ in sources), *unread]
    gradient, *on_candidates = torch.autograd.grad(
        target, [inputs, *candidates], retain_graph=True, allow_unused=True)
    if gradient is None:
        return None
    magnitude = _magnitude(gradient).sum((0, 1))
    # Supports (where a gradient is exactly 0) are read only from float32 and float64
    # gradients: in half precision small contributions round to 0.
    exact_zeros = (gradient.dtype in (torch.float32, torch.float64)
                   and not _underflows(gradient))
    footprint = _footprint_centre(magnitude) if exact_zeros else None
    reaches_border = exact_zeros and footprint is None
    if footprint is not None and not _footprint_translates(grid, mix, inputs, layout,
                                                           (rows, cols), magnitude):
        footprint = None  # windows: the footprint is a window's, not the block's field
    # Remove the flat floor (global mixing reaches every pixel) before taking the centroid.
    magnitude = (magnitude - magnitude.median()).clamp_min(0)
    total = magnitude.sum()
    stride_y, stride_x = layout.stride
    # The block's receptive fields centre on o + s * (mean position of the block).
    mean_row, mean_col = (rows.start + rows.stop - 1) / 2, (cols.start + cols.stop - 1) / 2
    if not torch.isfinite(total) or total <= 0:
        offset = fixed_offset(layout, "center")
    else:
        ys = torch.arange(height, dtype=torch.float32, device=magnitude.device)
        xs = torch.arange(width, dtype=torch.float32, device=magnitude.device)
        centroid_y = float((magnitude.sum(1) * ys).sum() / total)
        centroid_x = float((magnitude.sum(0) * xs).sum() / total)
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
            return (_snap(centred[0]), _snap(centred[1])), "footprint"
    if unread and read_unread is not None:
        read_unread()  # the anchors before the layer, needed now; appended to sources
    on_sources = _gradients_of(sources, candidates, on_candidates)
    # On the grid of the anchor before it (its gradient there came with the backward pass
    # above), then from the border rows' and columns' fields where the central footprint
    # reaches a border (a deep layer whose receptive field is wider than the image), then,
    # where every field spans the image, from a direct path to the anchor's grid or the
    # offset of an anchor on the layer's own grid.
    if sources:
        relayed = _relayed_offset(grid, mix, layout, (rows, cols), sources, offset, on_sources)
        if relayed is not None:
            return relayed, "anchor"
    if reaches_border:
        centred = _offset_from_borders(grid, inputs, layout, mix, offset)
        if centred is not None:
            return centred, "borders"
    if sources:
        carried = _carried_offset(grid, mix, layout, (rows, cols), sources, offset, on_sources)
        if carried is not None:
            return carried, "direct path"
        shared = None if shareable is None else _same_grid_offset(
            layout, [source for source, ok in zip(sources, shareable) if ok],
            [on_source for on_source, ok in zip(on_sources, shareable) if ok])
        if shared is not None:
            return shared, "anchor grid"
    return (_snap(offset[0]), _snap(offset[1])), "centroid"


def _gradients_of(sources: Sequence[tuple[torch.Tensor, FeatureLayout, tuple[float, float]]],
                  candidates: Sequence[torch.Tensor],
                  gradients: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The gradient of each source's tensor among those of the ``candidates`` (every source is
    one: a source before the backward pass, or an anchor read after it)."""
    by_tensor = {id(tensor): gradient for tensor, gradient in zip(candidates, gradients)}
    return [by_tensor[id(source)] for source, _, _ in sources]


def _block_target(grid: torch.Tensor, mix: torch.Tensor, rows: slice,
                  cols: slice) -> torch.Tensor:
    """The random channel ``mix`` of a block of ``grid``'s cells, summed: what the probe
    differentiates."""
    return (grid[:, :, rows][:, :, :, cols].float() * mix.view(1, -1, 1, 1)).sum()


def _support(magnitude: torch.Tensor) -> tuple[int, int, int, int] | None:
    """``(top, bottom, left, right)`` of the cells where a 2-D ``magnitude`` is not 0."""
    rows = torch.nonzero(magnitude.sum(1) > 0).flatten()
    cols = torch.nonzero(magnitude.sum(0) > 0).flatten()
    if rows.numel() == 0:
        return None
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def _moved_block(block: tuple[slice, slice], layout: FeatureLayout
                 ) -> tuple[list[int], tuple[slice, slice]] | None:
    """``(steps, moved)``: the central ``block`` moved by one cell along each axis (``steps``
    +1, or -1 where it ends at the grid's far border); None where it spans the grid along an
    axis and cannot move."""
    steps = []
    for part, cells in zip(block, (layout.grid_h, layout.grid_w)):
        if part.stop - part.start >= cells:
            return None
        steps.append(1 if part.stop < cells else -1)
    rows, cols = (slice(part.start + step, part.stop + step) for part, step in zip(block, steps))
    return steps, (rows, cols)


def _footprint_translates(grid: torch.Tensor, mix: torch.Tensor, inputs: torch.Tensor,
                          layout: FeatureLayout, block: tuple[slice, slice],
                          magnitude: torch.Tensor) -> bool:
    """Whether the input footprint of the central ``block`` moves by one stride when the block
    moves by one cell, as receptive fields of convolutions and pooling do. Window attention's
    do not: a footprint inside the image is the windows that hold the block (NesT's local
    blocks at 224 px put its stride-8 stage at 3.5 pixels instead of 1.5), and the next block
    of cells mostly lies in the same windows. True where the block cannot move (it spans the
    grid) or the gradient is not float32 or float64."""
    moving = _moved_block(block, layout)
    if moving is None:
        return True
    steps, moved = moving
    (gradient,) = torch.autograd.grad(_block_target(grid, mix, *moved), inputs,
                                      retain_graph=True)
    if gradient.dtype not in (torch.float32, torch.float64) or _underflows(gradient):
        return True
    bounds, moved = _support(magnitude), _support(_magnitude(gradient).sum((0, 1)))
    if bounds is None or moved is None:
        return False
    sizes = inputs.shape[-2:]
    for index, (bound, found) in enumerate(zip(bounds, moved)):
        axis = index // 2
        expected = min(max(bound + steps[axis] * layout.stride[axis], 0), sizes[axis] - 1)
        if abs(found - expected) >= 1:
            return False
    return True


def _footprint_on(grid: torch.Tensor, mix: torch.Tensor, rows: slice, cols: slice,
                  source: torch.Tensor, source_layout: FeatureLayout,
                  gradient: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor | None, tuple[int, ...] | None, bool]:
    """The footprint of ``grid``'s block ``rows`` x ``cols`` (mixed by ``mix``) on the grid of
    ``source``: (its gradient magnitude there, the (top, bottom, left, right) of its support
    where that can be read, whether the support lies inside the grid). ``gradient``: the
    block's gradient on ``source`` where a backward pass already gave it."""
    if gradient is None:
        (gradient,) = torch.autograd.grad(_block_target(grid, mix, rows, cols), source,
                                          retain_graph=True, allow_unused=True)
    if gradient is None:
        return None, None, False
    magnitude = _magnitude(grid_view(gradient, source_layout)).sum((0, 1))
    bounds = _support(magnitude)
    if (gradient.dtype not in (torch.float32, torch.float64) or _underflows(gradient)
            or bounds is None):
        return magnitude, None, False
    return magnitude, bounds, _footprint_centre(magnitude) is not None


def _relayed_offset(grid: torch.Tensor, mix: torch.Tensor, layout: FeatureLayout,
                    block: tuple[slice, slice],
                    sources: list[tuple[torch.Tensor, FeatureLayout, tuple[float, float]]],
                    guess: tuple[float, float] | None,
                    gradients: list[torch.Tensor | None] | None = None
                    ) -> tuple[float, float] | None:
    """The offset of a layer (``grid``, its central ``block`` mixed by ``mix``) read on the grid
    of the latest anchor in ``sources`` that it depends on, whose offset is known; None where
    that grid does not show it. ``gradients``: the block's gradients on the sources, where a
    backward pass already gave them.

    Where the block's footprint on the anchor's grid lies inside it (convolutions and pooling
    after a downsampling), its centre maps to the input through the anchor's offset and stride,
    as the input's own footprint would. It is taken where the footprint of the block one cell
    further on moves by one cell of the layer exactly (translates: windowed attention between
    the two keeps its windows' edges instead) and within one stride of the centroid's
    ``guess`` (unless that is None). Otherwise (attention mixes every cell, or a window), a
    layer on the anchor's own grid whose strongest cells (at least half the largest gradient)
    are exactly its block's carries the anchor's cells along its residual path: it takes the
    anchor's offset (the centroid of random weights leans there by a pixel or more: a ViT's
    blocks read 7 and 8 instead of 7.5).
    """
    rows, cols = block

    def translates(source: torch.Tensor, source_layout: FeatureLayout,
                   bounds: tuple[int, ...]) -> bool:
        """Whether the footprint of the block one cell further on moves by one cell of the
        layer (whole cells of the anchor's grid; cut where it moves past the grid's border)."""
        ratios = [layout.stride[axis] / source_layout.stride[axis] for axis in (0, 1)]
        moving = _moved_block(block, layout)
        if any(ratio != int(ratio) for ratio in ratios) or moving is None:
            return False  # no whole cells of the anchor per cell, or no room to move
        steps, moved = moving
        _, moved_bounds, _ = _footprint_on(grid, mix, *moved, source, source_layout)
        last = (source_layout.grid_h - 1, source_layout.grid_w - 1)
        expected = [min(max(bound + steps[index // 2] * int(ratios[index // 2]), 0),
                        last[index // 2]) for index, bound in enumerate(bounds)]
        return moved_bounds is not None and list(moved_bounds) == expected

    latest = _latest_footprint(grid, mix, block, sources, gradients)
    if latest is None:
        return None
    (source, source_layout, source_offset), magnitude, bounds, inside = latest
    mean = ((rows.start + rows.stop - 1) / 2, (cols.start + cols.stop - 1) / 2)
    if inside and translates(source, source_layout, bounds):
        centre = ((bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2)
        offset = tuple(source_offset[axis] + source_layout.stride[axis] * centre[axis]
                       - layout.stride[axis] * mean[axis] for axis in (0, 1))
        if guess is None or all(abs(offset[axis] - guess[axis]) <= max(layout.stride[axis], 2.0)
                                for axis in (0, 1)):
            return _snap(offset[0]), _snap(offset[1])
    same_grid = ((source_layout.grid_h, source_layout.grid_w) == (layout.grid_h, layout.grid_w)
                 and source_layout.stride == layout.stride)
    if same_grid and _strongest_runs(magnitude) == (range(rows.start, rows.stop),
                                                    range(cols.start, cols.stop)):
        return source_offset
    return None


def _latest_footprint(grid: torch.Tensor, mix: torch.Tensor, block: tuple[slice, slice],
                      sources: list[tuple[torch.Tensor, FeatureLayout, tuple[float, float]]],
                      gradients: list[torch.Tensor | None] | None):
    """``(source, magnitude, bounds, inside)`` (:func:`_footprint_on`) of the block on the latest
    of ``sources`` it depends on (a later anchor may lie on another branch); None where it
    depends on none."""
    for index in reversed(range(len(sources))):
        if gradients is not None and gradients[index] is None:
            continue  # not before this layer: an anchor of another branch
        source, source_layout, _ = sources[index]
        magnitude, bounds, inside = _footprint_on(
            grid, mix, *block, source, source_layout,
            None if gradients is None else gradients[index])
        if magnitude is not None:
            return sources[index], magnitude, bounds, inside
    return None


def _strongest_runs(magnitude: torch.Tensor) -> tuple[range, range] | None:
    """The rows and the columns that hold the strongest cells of a 2-D gradient ``magnitude``
    (at least half its largest), where each is one contiguous run; else None."""
    if not float(magnitude.max()) > 0:
        return None
    strongest = magnitude >= 0.5 * magnitude.max()
    runs = []
    for axis in (1, 0):
        found = torch.nonzero(strongest.any(axis)).flatten().tolist()
        if found != list(range(found[0], found[-1] + 1)):
            return None
        runs.append(range(found[0], found[-1] + 1))
    return runs[0], runs[1]


def _carried_offset(grid: torch.Tensor, mix: torch.Tensor, layout: FeatureLayout,
                    block: tuple[slice, slice],
                    sources: list[tuple[torch.Tensor, FeatureLayout, tuple[float, float]]],
                    guess: tuple[float, float],
                    gradients: list[torch.Tensor | None] | None = None
                    ) -> tuple[float, float] | None:
    """The offset of a layer read from a direct path to the latest anchor in ``sources`` before
    it: where the block's strongest cells on the anchor's grid are ``r x r`` anchor cells per
    cell of the block (``r`` the ratio of the strides, 1 on the anchor's own grid), each
    clearly stronger than any other cell (:func:`_direct_cells`), and they move by ``r`` cells
    when the block moves by one. A patch merging or a ``2 x 2`` pooling after blocks whose
    residual or concatenated path carries each cell as it is shows that pattern where neither
    the input nor the anchor's grid shows a footprint: Swin's stages behind its windows,
    DenseNet's last transition and dense block behind dense blocks whose fields span the image.
    The last resort before the centroid, taken within one stride of the centroid's ``guess``."""
    latest = _latest_footprint(grid, mix, block, sources, gradients)
    if latest is None:
        return None
    (source, source_layout, source_offset), magnitude, _, _ = latest
    ratios = [layout.stride[axis] / source_layout.stride[axis] for axis in (0, 1)]
    moving = _moved_block(block, layout)
    if any(ratio != int(ratio) or ratio < 1 for ratio in ratios) or moving is None:
        return None  # no whole cells of the anchor per cell, or no room to move the block
    shape = tuple(int(ratio) * (part.stop - part.start) for ratio, part in zip(ratios, block))
    runs = _direct_cells(magnitude, shape)
    if runs is None:
        return None
    steps, moved = moving
    moved_magnitude, _, _ = _footprint_on(grid, mix, *moved, source, source_layout)
    moved_runs = None if moved_magnitude is None else _direct_cells(moved_magnitude, shape)
    if moved_runs is None or any(moved_run.start != run.start + step * int(ratio)
                                 for moved_run, run, step, ratio
                                 in zip(moved_runs, runs, steps, ratios)):
        return None
    offset = []
    for axis, (run, part) in enumerate(zip(runs, block)):
        centre = (run.start + run.stop - 1) / 2
        mean = (part.start + part.stop - 1) / 2
        offset.append(source_offset[axis] + source_layout.stride[axis] * centre
                      - layout.stride[axis] * mean)
        if abs(offset[axis] - guess[axis]) > max(layout.stride[axis], 2.0):
            return None
    return _snap(offset[0]), _snap(offset[1])


# How much weaker than the weakest cell of a direct path every other cell must be.
_DIRECT_GAP = 1.25


def _direct_cells(magnitude: torch.Tensor, shape: tuple[int, int]) -> tuple[range, range] | None:
    """The rows and the columns of the rectangle of ``shape`` cells of a 2-D gradient
    ``magnitude`` whose every cell is at least ``_DIRECT_GAP`` times as strong as any cell
    outside it; None where its strongest cells are no such rectangle."""
    count = shape[0] * shape[1]
    if magnitude.numel() <= count:
        return None
    values, flat = magnitude.flatten().topk(count + 1)
    if not float(values[-2]) >= _DIRECT_GAP * float(values[-1]) or not float(values[-2]) > 0:
        return None
    rows, cols = flat[:-1] // magnitude.shape[1], flat[:-1] % magnitude.shape[1]
    top, left = int(rows.min()), int(cols.min())
    if int(rows.max()) - top + 1 != shape[0] or int(cols.max()) - left + 1 != shape[1]:
        return None  # (count distinct cells spanning exactly shape fill the rectangle)
    return range(top, top + shape[0]), range(left, left + shape[1])


def _same_grid_offset(layout: FeatureLayout,
                      sources: list[tuple[torch.Tensor, FeatureLayout, tuple[float, float]]],
                      gradients: list[torch.Tensor | None]) -> tuple[float, float] | None:
    """The offset of the latest anchor in ``sources`` on the layer's own grid that it depends
    on. Modules that keep a grid's size keep its offset (convolutions padded to keep the size,
    pooling with stride 1, concatenations and sums of such branches): the last resort before
    the centroid, which leans by several pixels where every field spans the image (Inception
    v3's later stride-16 and stride-32 blocks concatenate branches whose fields do, and no path
    carries a cell as it is: 20.5-23.5 instead of 21 and 43-45 instead of 37 at 224 px)."""
    for (_, source_layout, source_offset), gradient in zip(reversed(sources),
                                                            reversed(gradients)):
        if (gradient is not None
                and (source_layout.grid_h, source_layout.grid_w) == (layout.grid_h, layout.grid_w)
                and source_layout.stride == layout.stride):
            return source_offset
    return None


def _offset_from_borders(grid: torch.Tensor, inputs: torch.Tensor, layout: FeatureLayout,
                         mix: torch.Tensor, guess: tuple[float, float] | None,
                         inputs_layout: FeatureLayout | None = None
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
    second cells whose fields reach the far border), the result is taken only within a quarter
    of a stride (at least 2 pixels) of the centroid's ``guess``: Swin's windows at 128 px put
    the first row's field of its stride-16 patch merging 8 pixels off its geometry; without a
    ``guess``, nothing is read there. ``inputs`` may be a feature map in ``inputs_layout``
    (offsets and ``layout.stride`` in its cells: :func:`_local_borders`).
    The first probe image carries one border cell and the second the other, in one backward
    pass (the images are independent).
    """
    offsets = []
    for axis, (cells, stride) in enumerate(zip((layout.grid_h, layout.grid_w), layout.stride)):
        outer = _field_edges(grid, inputs, axis, 0, cells - 1, mix, inputs_layout)
        if outer is None:
            return None
        far_end, near_start = outer
        inner = [edges for edges in [_field_edges(grid, inputs, axis, 1, cells - 2, mix,
                                                  inputs_layout)]
                 if edges is not None] if cells >= 2 else []
        if inner and (abs(inner[0][0] - far_end - stride) > 1e-6
                      or abs(near_start - inner[0][1] - stride) > 1e-6):
            return None
        offset = _snap((far_end + near_start - (cells - 1) * stride) / 2)
        if not inner and (guess is None or abs(offset - guess[axis]) > max(stride / 4, 2.0)):
            return None
        offsets.append(offset)
    return offsets[0], offsets[1]


def _field_edges(grid: torch.Tensor, inputs: torch.Tensor, axis: int, first: int, last: int,
                 mix: torch.Tensor, inputs_layout: FeatureLayout | None = None
                 ) -> tuple[int, int] | None:
    """Along ``axis`` (0: rows), the far end of the field of grid line ``first`` and the near
    start of the field of line ``last``, in input pixels (or cells of ``inputs``, a feature map
    in ``inputs_layout``); None where either reaches the far border or a gradient came near
    underflow."""
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
    if inputs_layout is not None:
        gradients = [grid_view(gradient, inputs_layout) for gradient in gradients]
    size = gradients[0].shape[2 + axis]
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
    bounds = _support(magnitude)
    if bounds is None:
        return None
    top, bottom, left, right = bounds
    if top == 0 or left == 0 or bottom == height - 1 or right == width - 1:
        return None
    return (top + bottom) / 2, (left + right) / 2
