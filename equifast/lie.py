"""Lie derivatives of layer features: local equivariance under continuous transformations.

The measure of :func:`equifast.measure` compares features after finite transformations (shifts by
8 pixels, quarter turns). The Lie derivative (Gruver et al., "The Lie Derivative for Measuring
Learned Equivariance", ICLR 2023; DESIGN.md 1.11) looks at an infinitesimal one: how fast a
layer's features leave equivariance as the input starts to move.

Definition:
    For a one-parameter family of image maps ``g_t`` (``g_0`` the identity) with generator field
    ``xi(p) = d/dt g_t(p)`` at ``t = 0`` (input pixel coordinates, the convention of
    :mod:`equifast.groups`), the transformed image is ``(T_t x)(p) = x(g_t^-1 p)`` and a layer's
    feature map moves the same way on its grid, ``(T'_t phi)(q) = phi(g_t^-1 q)``. The Lie
    derivative of layer ``phi`` at image ``x`` is

        L phi(x) = d/dt [phi(T_t x) - T'_t phi(x)] at t = 0
                 = J_phi(x) v + xi . grad phi(x),     v = -xi . grad x,

    zero for every image when the layer is equivariant. ``J_phi(x) v`` is a Jacobian-vector
    product, computed with forward-mode automatic differentiation through the model
    (``torch.autograd.forward_ad``; one forward of the stacked tangents of all generators).
    The spatial gradients are central differences: of the image over its pixels (the sources
    carry a one-pixel margin, so the border pixels have real neighbours), of the features over
    their grid, divided by the layer's stride. Feature cell ``(i, j)`` sits at input position
    ``(offset_x + stride_x i, offset_y + stride_y j)``, with the offsets that ``align`` finds
    (:mod:`equifast.align`). Only interior cells count (one cell from each border: the central
    difference needs both neighbours). For a layer without a grid (pooled features, logits) the
    features do not move and ``L phi = J_phi v`` (invariance).

Generators (``GENERATORS``): ``translate_x`` and ``translate_y`` (per pixel), ``rotate`` (per
radian, counter-clockwise on screen about the image centre, as :class:`equifast.Rotation`) and
``scale`` (per unit of log-scale about the image centre).

Scores per image, layer and generator (``LIE_METRICS``):
    ``lee``: the mean of ``(L phi)^2`` over channels and interior cells (the local equivariance
    error of Gruver et al., per feature value);
    ``lee_rel``: ``lee`` over the variance of the features about each channel's mean (the
    mean of ``(phi - mean_c phi)^2`` over the whole grid, or over the channels of a vector): the
    squared Lie derivative relative to the features' own spread, comparable across layers and
    models, which ``lee`` is not. NaN where the features do not vary.

Example:
    >>> import torch, equifast
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.Conv2d(8, 4, 1))
    >>> result = equifast.lie_derivative(net, torch.rand(2, 3, 18, 18), progress=False,
    ...                                  layers=["1"], bootstrap=0)
    >>> bool((result.frame.value.abs() < 1e-9).all())  # pointwise maps commute with every move
    True
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn

from .align import widened_to
from .arguments import check_run_arguments
from .baseline import (
    INIT,
    TRAINED,
    InitCopy,
    WithBaseline,
    check_baseline,
    member_name,
    resolve_baseline,
)
from .data.folder import no_images_message, warn_skipped
from .data.geometry import LUMA_WEIGHTS, channel_normalization
from .groups import Rotation, Translation
from .layers import LayerHooks, LayerSpec, is_broad_selection, select_layers
from .layouts import FeatureLayout, grid_view
from .scores import FLAT_ABSOLUTE, FLAT_RELATIVE

GENERATORS = ("translate_x", "translate_y", "rotate", "scale")
DEFAULT_GENERATORS = ("translate_x", "translate_y", "rotate")
LIE_METRICS = ("lee", "lee_rel")
# The frame's columns, one row per layer x generator x metric.
LIE_COLUMNS = ["model", "layer", "depth", "kind", "layout", "stride_y", "stride_x", "grid_h",
               "grid_w", "generator", "metric", "value", "ci_low", "ci_high", "n", "init",
               "learned", "learned_lo", "learned_hi"]
# Step of the numerical derivative of a group map's matrix in its parameter (degrees, pixels):
# the matrices are smooth (linear or trigonometric), so a central difference is exact to ~1e-12.
_MATRIX_STEP = 1e-4


def check_generators(generators: str | Sequence[str]) -> tuple[str, ...]:
    """The generator names, checked (a single name is a list of one)."""
    names = (generators,) if isinstance(generators, str) else tuple(generators)
    if not names:
        raise ValueError(f"generators: expected at least one of {GENERATORS}, found none")
    unknown = [g for g in names if g not in GENERATORS]
    if unknown:
        raise ValueError(f"generators: expected names among {GENERATORS}, found {unknown}")
    if len(set(names)) != len(names):
        raise ValueError(f"generators: expected each name once, found {list(names)}")
    return names


def generator_field(name: str, height: int, width: int) -> np.ndarray:
    """``(2, 3)`` matrix ``G`` of a generator: the field ``xi(p) = G @ (x, y, 1)`` in input pixels.

    Read off the group maps of :mod:`equifast.groups` (the derivative of the element's matrix in
    its parameter), so that the directions and signs are those of :class:`equifast.Translation`
    and :class:`equifast.Rotation`; ``scale`` is ``p - centre``.
    """
    if name == "scale":
        cx, cy = (width - 1) / 2, (height - 1) / 2
        return np.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy]])
    # (the group's element of parameter t, and the parameter's unit per the field's)
    families = {
        "translate_x": (lambda t: Translation([(0.0, t)])[0], 1.0),
        "translate_y": (lambda t: Translation([(t, 0.0)])[0], 1.0),
        "rotate": (lambda t: Rotation([t])[0], 180.0 / math.pi),  # degrees -> radians
    }
    if name not in families:
        raise ValueError(f"generator: expected one of {GENERATORS}, found {name!r}")
    element, per_unit = families[name]
    step = _MATRIX_STEP
    ahead, back = element(step).matrix(height, width), element(-step).matrix(height, width)
    return (ahead - back)[:2] / (2 * step) * per_unit


def _field_at(matrix: np.ndarray, xs: torch.Tensor, ys: torch.Tensor):
    """``(xi_x, xi_y)`` of a generator at input positions ``(xs, ys)``."""
    a = [[float(v) for v in row] for row in matrix]
    return a[0][0] * xs + a[0][1] * ys + a[0][2], a[1][0] * xs + a[1][1] * ys + a[1][2]


def image_tangents(sources: torch.Tensor, generators: Sequence[str]) -> torch.Tensor:
    """Tangents ``v = -xi . grad x`` of the model inputs, one block per generator.

    Args:
        sources: ``(B, C, H + 2, W + 2)`` normalized images: the model input with a one-pixel
            margin, which the central differences of the border pixels read.
        generators: Names in :data:`GENERATORS`.

    Returns:
        ``(len(generators) * B, C, H, W)``: the derivative of the transformed input at ``t = 0``,
        generator by generator.
    """
    height, width = sources.shape[-2] - 2, sources.shape[-1] - 2
    grad_x = (sources[..., 1:-1, 2:] - sources[..., 1:-1, :-2]) / 2
    grad_y = (sources[..., 2:, 1:-1] - sources[..., :-2, 1:-1]) / 2
    ys, xs = torch.meshgrid(torch.arange(height, dtype=sources.dtype, device=sources.device),
                            torch.arange(width, dtype=sources.dtype, device=sources.device),
                            indexing="ij")
    blocks = []
    for name in generators:
        xi_x, xi_y = _field_at(generator_field(name, height, width), xs, ys)
        blocks.append(-(xi_x * grad_x + xi_y * grad_y))
    return torch.cat(blocks)


def lie_scores(primal: torch.Tensor, tangent: torch.Tensor, layout: FeatureLayout,
               offset: tuple[float, float], input_size: tuple[int, int],
               generator: str) -> dict[str, torch.Tensor]:
    """Per-image scores of one layer and generator from its features and their tangent.

    Args:
        primal: The layer's output for ``B`` images, in ``layout``.
        tangent: ``J_phi v`` for the same images (same shape).
        layout: The layer's layout (:class:`~equifast.layouts.FeatureLayout`).
        offset: ``(offset_y, offset_x)`` of the grid in input pixels (ignored for vectors).
        input_size: ``(H, W)`` of the model input.
        generator: Name in :data:`GENERATORS`.

    Returns:
        ``{metric: (B,) float64}`` for :data:`LIE_METRICS`; NaN where no cell is interior (a
        grid of fewer than 3 cells along an axis), or (``lee_rel``) where the features are flat
        (:func:`_relative`).
    """
    phi = grid_view(primal, layout).to(torch.float64)
    lie = grid_view(tangent, layout).to(torch.float64)
    if layout.kind == "vector":
        phi, lie = phi.flatten(1), lie.flatten(1)  # (B, C): the features do not move
        level = phi.mean(1, keepdim=True)
        variance = (phi - level).square().mean(1)
        lee = lie.square().mean(1)
        return {"lee": lee, "lee_rel": _relative(lee, variance, level.square().mean(1))}
    batch = phi.shape[0]
    grid_h, grid_w = phi.shape[-2:]
    if grid_h < 3 or grid_w < 3:  # no interior cell for a central difference
        nan = torch.full((batch,), math.nan, dtype=torch.float64)
        return {"lee": nan, "lee_rel": nan.clone()}
    stride_y, stride_x = (float(s) for s in layout.stride)
    offset_y, offset_x = (float(o) for o in offset)
    ys, xs = torch.meshgrid(torch.arange(1, grid_h - 1, dtype=torch.float64),
                            torch.arange(1, grid_w - 1, dtype=torch.float64), indexing="ij")
    xi_x, xi_y = _field_at(generator_field(generator, *input_size),
                           offset_x + stride_x * xs, offset_y + stride_y * ys)
    xi_x, xi_y = xi_x.to(phi.device), xi_y.to(phi.device)
    # d phi / d position in input pixels: central differences over the grid, over the stride
    grad_x = (phi[..., 1:-1, 2:] - phi[..., 1:-1, :-2]) / (2 * stride_x)
    grad_y = (phi[..., 2:, 1:-1] - phi[..., :-2, 1:-1]) / (2 * stride_y)
    derivative = lie[..., 1:-1, 1:-1] + xi_x * grad_x + xi_y * grad_y  # (B, C, h - 2, w - 2)
    level = phi.mean((2, 3), keepdim=True)  # each channel's mean over the whole grid
    variance = (phi - level).square().mean((1, 2, 3))
    lee = derivative.square().mean((1, 2, 3))
    return {"lee": lee, "lee_rel": _relative(lee, variance, level.square().mean((1, 2, 3)))}


def _relative(lee: torch.Tensor, variance: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """``lee / variance``; NaN where the features are flat: a spread within the rounding of a
    constant map (below 1e-6 of the mean level, or 1e-15 absolutely, the rule of
    :mod:`equifast.scores`), whose ratio would read rounding noise as a huge derivative."""
    flat = variance <= FLAT_RELATIVE**2 * level + FLAT_ABSOLUTE**2
    safe = torch.where(flat, torch.ones_like(variance), variance)
    return torch.where(flat, torch.full_like(lee, math.nan), lee / safe)


@dataclass
class LieResult:
    """What :func:`lie_derivative` returns.

    Attributes:
        frame: Tidy scores, one row per layer x generator x metric (``LIE_COLUMNS``): the mean
            over images with its 95% bootstrap interval and ``n`` (images with a score).
        config: How it was measured (model, generators, layers, layouts, offsets, input size,
            images, timings).
    """

    frame: pd.DataFrame
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self, metric: str = "lee_rel", column: str = "value") -> pd.DataFrame:
        """One row per layer (in depth order), one column per generator, of ``metric``: its
        ``value``, or with a baseline its ``init`` or ``learned`` column."""
        if metric not in LIE_METRICS:
            raise ValueError(f"metric: expected one of {LIE_METRICS}, found {metric!r}")
        if column not in ("value", "init", "learned"):
            raise ValueError(f"column: expected 'value', 'init' or 'learned', found {column!r}")
        rows = self.frame[self.frame.metric == metric]
        table = rows.pivot(index="layer", columns="generator", values=column)
        layers = rows.sort_values("depth").layer.drop_duplicates()
        table = table.reindex(index=layers, columns=self.config["generators"])
        table.columns.name = None
        return table

    def format_summary(self, metric: str = "lee_rel", column: str = "value") -> str:
        """The summary as text (``lee_rel``: squared Lie derivative relative to the spread)."""
        return self.summary(metric, column).to_string(float_format=lambda v: f"{v:.4g}")

    def save(self, path: str | Path) -> Path:
        """Save the frame to ``.parquet`` or ``.csv``, the config to a ``.json`` beside."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".parquet", ".csv"):
            raise ValueError(f"save: expected a path ending in .parquet or .csv, found {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".parquet":
            self.frame.to_parquet(path, index=False)
        else:
            self.frame.to_csv(path, index=False)
        path.with_name(path.name + ".json").write_text(
            json.dumps(self.config, indent=1, default=str))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LieResult:
        """Load what :meth:`save` (or ``equifast lie --out``) wrote."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Lie derivative result at {path}")
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
        elif suffix == ".csv":
            frame = pd.read_csv(path, dtype={"model": str, "layer": str})
        else:
            raise ValueError(f"load: expected a .parquet or .csv file, found {path}")
        sidecar = path.with_name(path.name + ".json")
        config = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        config.setdefault("generators", list(dict.fromkeys(frame.generator)))
        return cls(frame, config)

    def __repr__(self) -> str:
        return (f"LieResult(model={self.config.get('model')!r}, "
                f"layers={self.frame.layer.nunique()}, generators={self.config.get('generators')}, "
                f"images={self.config.get('images')})")


def _normalized(sources: torch.Tensor, preprocess, channels: int, dtype) -> torch.Tensor:
    """Model inputs from sources: uint8 -> ``(v / 255 - mean) / std`` (float sources as they
    are), the luma first for a model of one channel, in ``dtype``."""
    values = sources.to(torch.float64)
    if channels == 1 and values.shape[1] == 3:
        luma = torch.tensor(LUMA_WEIGHTS, dtype=torch.float64, device=values.device)
        values = torch.einsum("bchw,c->bhw", values, luma)[:, None]
    if sources.dtype == torch.uint8:
        mean, std = channel_normalization(preprocess, channels)
        mean_t = torch.tensor(mean, dtype=torch.float64, device=values.device).view(1, -1, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float64, device=values.device).view(1, -1, 1, 1)
        values = (values / 255.0 - mean_t) / std_t
    return values.to(dtype)


@contextlib.contextmanager
def _attention_with_forward_ad():
    """Attention by ops that have forward-mode derivatives: scaled dot-product attention by its
    math backend (the fused CPU and GPU kernels have none: ``NotImplementedError`` in a timm ViT),
    and ``nn.MultiheadAttention`` without its inference fast path
    (``_native_multi_head_attention``, torchvision's ViT). Both compute the same attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def lie_derivative(
    model: nn.Module | str,
    data: Any = "samples",
    generators: str | Sequence[str] = DEFAULT_GENERATORS,
    layers: LayerSpec = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    *,
    input_size: tuple[int, int] | None = None,
    layouts: Mapping[str, str] | None = None,
    align: Any = "auto",
    limit: int | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    num_workers: int | None = None,
    loader: str = "auto",
    progress: bool = True,
    model_name: str | None = None,
    baseline: str | nn.Module | InitCopy | None = None,
) -> LieResult:
    """Lie derivatives of every chosen layer of ``model`` (module docstring: the definition).

    Args:
        model: A module (put in eval mode here), or a timm name / ``"tv:<torchvision name>"``.
        data: Images, as for :func:`equifast.measure`. Tensors and batches are the sources: the
            model input plus one pixel on each side (the image's central differences read it),
            so ``(N, 3, 226, 226)`` gives 224 x 224 inputs; folders, files and ``"samples"`` are
            cropped so.
        generators: Names in :data:`GENERATORS` (default: both translations and the rotation).
        layers: Layers to measure (:func:`equifast.layers.select_layers`; default: stage outputs).
        batch_size: Images per forward (the forward holds ``len(generators)`` copies of each).
        device: ``"cpu"``, ``"cuda"``... (default: the model's device).
        input_size: ``N`` or ``(H, W)`` of the model input (default: from the data, or the
            model's config).
        layouts: Override the detected layout per layer, as for :func:`equifast.measure`.
        align: Grid offsets (:mod:`equifast.align`), as for :func:`equifast.measure`: where each
            feature cell sits in the image, which the rotation and scale fields depend on.
        limit: Use at most this many images.
        bootstrap: Resamples of the 95% bootstrap intervals over images (0: none).
        seed: Seed of the bootstrap, of a model built by name and of the alignment probe.
        num_workers, loader: How a folder is read, as for :func:`equifast.measure`.
        progress: Show a progress bar over the images, and one over the layers the
            ``align="auto"`` probe reads where that takes more than two seconds.
        model_name: Name recorded in the result (default: the timm name or the class name).
        baseline: ``"init"``: also differentiate a freshly initialized copy of the architecture
            (seeded with ``seed``; :mod:`equifast.baseline`), on the same images with the same
            tangents, at the model's layouts and offsets, and fill the frame's ``init`` and
            ``learned = value - init`` columns (``learned_lo``, ``learned_hi``: a paired 95%
            interval). A module or an :class:`~equifast.baseline.InitCopy`: that copy, as for
            :func:`equifast.measure`. None (default): those columns are NaN.

    Returns:
        A :class:`LieResult`.

    Raises:
        ValueError: An unknown generator, a bad argument, or no readable image.
    """
    from .engine import DataPlan, bootstrap_interval, bootstrap_means, probe_layers
    from .models import check_device, resolve_model

    started = time.perf_counter()
    names_of_generators = check_generators(generators)
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, found {batch_size}")
    input_size = check_run_arguments(input_size, align, limit, bootstrap)
    check_baseline(baseline)
    resolved = resolve_model(model, seed, input_size, model_name)
    module, preprocess, model_name = resolved.module, resolved.preprocess, resolved.name
    layers, layouts, align = resolved.own_names(layers, layouts, align)
    module.eval()
    if device is None:
        parameter = next(module.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = check_device(device)
    module.to(device)
    parameter = next(module.parameters(), None)
    # float64 models stay float64; anything else runs in float32: a derivative in 16 bits rounds
    # the small contributions away (as the alignment probe found), so 16-bit parameters and
    # buffers are widened in place for the measurement and narrowed back after, bit for bit.
    dtype = torch.float64 if parameter is not None and parameter.dtype == torch.float64 \
        else torch.float32
    sixteen_bit = any(t.dtype in (torch.float16, torch.bfloat16)
                      for t in [*module.parameters(), *module.buffers()])
    widening = widened_to(module, torch.float32, torch.bfloat16) if sixteen_bit \
        else contextlib.nullcontext()
    fresh = resolve_baseline(baseline, module, seed, resolved.by_name, input_size)
    runner: nn.Module = module
    # Hooked names: the model's own, and with a baseline those of both members of WithBaseline
    # (one forward of both on the same dual input; the copy takes the model's layouts and offsets).
    members = {TRAINED: None}
    if fresh is not None:
        fresh.module.to(device, dtype)  # the copy is ours: no need to narrow it back
        runner = WithBaseline(module, fresh.module)
        members = {TRAINED: TRAINED, INIT: INIT}

    with widening:
        # (a one-pixel crop margin: the central differences of the border pixels read it)
        plan = DataPlan(data, None, batch_size, input_size, preprocess, Translation([1]),
                        num_workers, limit, loader, None, device)
        height, width = plan.input_size
        names = select_layers(module, layers)
        offsets_report: dict[str, Any] = {}
        names, layer_layouts, offsets = probe_layers(
            module, names, (height, width), layouts or {}, align, device, dtype, seed,
            lenient=is_broad_selection(layers, module), report=offsets_report,
            # (no dtype argument here: the model's own, widened for 16-bit models)
            advice="If the model is built for another input size, pass input_size=(H, W) (and "
                   "sources of that size plus a one-pixel margin).",
            by_name=resolved.by_name is not None, progress=progress)
        values = {(member, n, g, m): [] for member in members for n in names
                  for g in names_of_generators for m in LIE_METRICS}
        hooked = {(member_name(prefix, n) if prefix else n): (member, n)
                  for member, prefix in members.items() for n in names}
        images = 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=plan.total, desc=f"lie derivative {model_name}", unit="img",
                       leave=False)
        captured: dict[str, torch.Tensor] = {}

        def keep(name: str, tensor: torch.Tensor) -> None:
            if name not in captured:  # a module run twice in a forward: its first call
                captured[name] = tensor

        count = len(names_of_generators)
        with LayerHooks(runner, list(hooked), keep), torch.no_grad(), \
                _attention_with_forward_ad():
            for batch in plan:
                sources = _normalized(batch.sources.to(device), preprocess, resolved.channels,
                                      dtype)
                size = sources.shape[0]
                inputs = sources[..., 1:-1, 1:-1]
                tangents = image_tangents(sources, names_of_generators)
                captured.clear()
                with forward_ad.dual_level():
                    dual = forward_ad.make_dual(inputs.repeat(count, 1, 1, 1), tangents)
                    runner(dual)
                    unpacked = {n: forward_ad.unpack_dual(t) for n, t in captured.items()}
                for key, (member, name) in hooked.items():
                    primal, tangent = unpacked[key]
                    if tangent is None:  # the layer does not depend on the input
                        tangent = torch.zeros_like(primal)
                    for k, generator in enumerate(names_of_generators):
                        block = slice(k * size, (k + 1) * size)
                        scores = lie_scores(primal[:size], tangent[block], layer_layouts[name],
                                            offsets[name], (height, width), generator)
                        for metric in LIE_METRICS:
                            values[member, name, generator, metric].append(
                                scores[metric].cpu().numpy())
                images += size
                if bar is not None:
                    bar.update(size)
        if bar is not None:
            bar.close()
        if images == 0:
            raise ValueError(no_images_message(plan.skipped))
    warn_skipped(plan.skipped, images)

    rows = []
    keys = [key[1:] for key in values if key[0] == TRAINED]
    per_image = np.stack([np.concatenate(values[(TRAINED, *key)]) for key in keys])  # (rows, N)
    distribution = bootstrap_means(per_image, bootstrap, seed)
    low, high = bootstrap_interval(distribution, len(keys))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: no interior cell
        means = np.nanmean(per_image, axis=1)
        nan = np.full(len(keys), math.nan)
        init, learned, learned_low, learned_high = nan, nan, nan, nan
        if fresh is not None:
            per_image_init = np.stack([np.concatenate(values[(INIT, *key)]) for key in keys])
            init = np.nanmean(per_image_init, axis=1)
            # paired: the difference image by image, resampled as the images are
            differences = per_image - per_image_init
            learned = np.nanmean(differences, axis=1)
            learned_low, learned_high = bootstrap_interval(
                bootstrap_means(differences, bootstrap, seed), len(keys))
    for i, (name, generator, metric) in enumerate(keys):
        layout = layer_layouts[name]
        rows.append({
            "model": model_name, "layer": name, "depth": names.index(name), "kind": layout.kind,
            "layout": layout.layout, "stride_y": layout.stride[0], "stride_x": layout.stride[1],
            "grid_h": layout.grid_h, "grid_w": layout.grid_w, "generator": generator,
            "metric": metric, "value": means[i], "ci_low": low[i], "ci_high": high[i],
            "n": int(np.isfinite(per_image[i]).sum()), "init": init[i], "learned": learned[i],
            "learned_lo": learned_low[i], "learned_hi": learned_high[i],
        })
    frame = pd.DataFrame(rows, columns=LIE_COLUMNS)
    config = {
        "model": model_name, "pretrained": resolved.pretrained, "note": resolved.note,
        "generators": list(names_of_generators), "layers": names,
        "layouts": {n: layer_layouts[n].layout for n in names},
        "offsets": {n: list(offsets[n]) for n in names if not np.isnan(offsets[n]).all()},
        "offset_readings": {n: offsets_report.get("offset_readings", {}).get(n) for n in names
                            if n in offsets_report.get("offset_readings", {})},
        "input_size": [height, width], "images": images, "bootstrap": bootstrap, "seed": seed,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "skipped": list(plan.skipped), "seconds": time.perf_counter() - started,
        "baseline": None if fresh is None else {"how": fresh.how, "kept": fresh.kept},
    }
    return LieResult(frame, config)


__all__ = [
    "DEFAULT_GENERATORS",
    "GENERATORS",
    "LIE_COLUMNS",
    "LIE_METRICS",
    "LieResult",
    "check_generators",
    "generator_field",
    "image_tangents",
    "lie_derivative",
    "lie_scores",
]
