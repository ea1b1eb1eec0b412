"""Benchmark of the equifast operators against well-written torch-ops baselines.

``equivariance_stats``: the statistics (count, means, centred second moments, co-moment) of the
equivariance / invariance / chance comparisons of one layer, for feature maps of the sizes of real
layers: ``(K + 1) * B`` maps (``K = 8`` elements) of NCHW ``256x56x56``, ``512x28x28``,
``2048x7x7``, NHWC ``56x56x256`` (channels-last memory, seen through a permuted view) and ViT NLC
``197x384`` (one class token and a ``14x14`` token grid). The group is 8 translations by
multiples of the layer's stride (exact), and, for ``512x28x28``, 8 fractional translations
(bilinear) and the rotations by 90, 180 and 270 degrees.

``transform_images``: ``B`` uint8 sources ``(B, 3, 224 + 64, 224 + 64)`` to the ``(K + 1) * B``
normalized images of the model, for 8 translations (crop windows) and for rotations by
90/180/270 degrees, a flip and two bilinear rotations by +-15 degrees. Beside them it times the
floor both share, a fresh output of the same shape allocated and written once (``fresh_output``),
and reports the speedup beyond it.

For each case the script first checks the baseline against the float64 reference
(``equifast/ops/_reference.py``) on a few images, then the compiled op (when it has a kernel for the
device) against the baseline on the full batch; only then it times both. With no compiled kernel the
row says ``"compiled": false`` and only the baseline is timed, so the script runs anywhere.

Usage::

    python benchmarks/bench_ops.py --device cpu            # -> benchmarks/results/cpu/ops.json
    python benchmarks/bench_ops.py --device cuda           # -> benchmarks/results/gpu/ops.json
    python benchmarks/bench_ops.py --quick --out /tmp/x    # tiny smoke run (used by the tests)

Needs only torch, numpy and the standard library (and equifast itself).
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (benchmarks/common.py; also puts the repository on sys.path)

from equifast import _ext, ops  # noqa: E402
from equifast.groups import (  # noqa: E402
    IDENTITY,
    Flip,
    Group,
    Rotation,
    Translation,
    feature_source_affines,
    invert_affine,
)
from equifast.ops import _reference  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ELEMENTS = 8  # K: group elements besides the identity
GPU_BATCH = 32  # B on CUDA: (K + 1) * B = 9 * 32 maps, as in a real measurement
# B on the CPU: (K + 1) * 8 = 72 maps, a batch's worth of the engine's statistics calls at 8
# images per batch; the run takes about 20 s on 2 cores (`--batch 32`: about 2 min).
CPU_BATCH = 8
QUICK_BATCH = 2
CHECK_IMAGES = 2  # images per block for the float64 reference check of the baseline

# Tolerances of the correctness checks (README, "Correctness first").
STATS_RTOL = 1e-4  # statistics, normalized per field (see compare_stats)
IMAGE_ATOL = {"exact": 1e-4, "bilinear": 2e-3}  # float32 images, normalized units
BF16_IMAGE_TOL = 1.0 / 32  # bf16 images: two bf16 ulps for |v| in [2, 4)


# --------------------------------------------------------------------------------------------------
# Cases


@dataclass
class StatsCase:
    """One ``equivariance_stats`` benchmark: a layer's feature shape and a group."""

    name: str
    layout: str  # "NCHW", "NHWC" or "NLC"
    channels: int
    grid: int  # square grid h = w
    stride: int  # input pixels per grid cell (input = grid * stride)
    group: str  # "shift" (exact), "fractional" (bilinear) or "rot90"
    prefix: int = 0

    def image_group(self) -> Group:
        s = self.stride
        if self.group == "shift":
            return Translation(
                [(0, s), (s, 0), (0, -s), (-s, 0), (0, 2 * s), (2 * s, 0), (0, -2 * s), (-2 * s, 0)]
            )
        if self.group == "fractional":
            # Half and quarter grid cells, along each axis and diagonally: all bilinear.
            h, q = s / 2, s / 4
            return Translation(
                [(0, h), (h, 0), (0, -3 * h), (-3 * h, 0), (h, h), (-h, 3 * h), (q, 0), (0, -q)]
            )
        if self.group == "rot90":
            return Rotation([90, 180, 270])
        raise ValueError(f"unknown group {self.group!r}")


@dataclass
class TransformCase:
    """One ``transform_images`` benchmark: output size, crop margin and a group."""

    name: str
    size: int
    margin: int
    group: str  # "shift" or "rotflip"

    def image_group(self) -> Group:
        m, h = self.margin, self.margin // 2
        if self.group == "shift":
            return Translation([(0, h), (h, 0), (0, -h), (-h, 0), (0, m), (m, 0), (0, -m), (-m, 0)])
        if self.group == "rotflip":
            return Rotation([90, 180, 270]) + Flip("horizontal") + Rotation([15, -15])
        raise ValueError(f"unknown group {self.group!r}")


def stats_cases(quick: bool) -> list[StatsCase]:
    div = 16 if quick else 1  # quick: 1/16 of the channels, same grids
    return [
        StatsCase("nchw_256x56x56", "NCHW", 256 // div, 56, 4, "shift"),
        StatsCase("nchw_512x28x28", "NCHW", 512 // div, 28, 8, "shift"),
        StatsCase("nchw_512x28x28_fractional", "NCHW", 512 // div, 28, 8, "fractional"),
        StatsCase("nchw_512x28x28_rot90", "NCHW", 512 // div, 28, 8, "rot90"),
        StatsCase("nchw_2048x7x7", "NCHW", 2048 // div, 7, 32, "shift"),
        StatsCase("nhwc_56x56x256", "NHWC", 256 // div, 56, 4, "shift"),
        StatsCase("nlc_197x384", "NLC", 384 // div, 14, 16, "shift", prefix=1),
    ]


def transform_cases(quick: bool) -> list[TransformCase]:
    size, margin = (64, 16) if quick else (224, 32)
    return [
        TransformCase(f"shift_{size}", size, margin, "shift"),
        TransformCase(f"rotflip_{size}", size, margin, "rotflip"),
    ]


# --------------------------------------------------------------------------------------------------
# Baseline: equivariance_stats with torch ops (float32 accumulation)


def _spatial_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last two (spatial) axes of ``(B, C, h, w)`` in float32.

    A strided slice with the channels innermost (NHWC, NLC) reduces about 8x faster as
    ``(B, h, w, C).sum(1).sum(1)`` than with one 2-D reduction of the NCHW view (measured with
    torch 2.14 on the CPU: the reduction then writes contiguous rows of channels); dense tensors
    reduce best in one call.
    """
    dense = x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    if x.stride(1) == 1 and not dense:
        return x.permute(0, 2, 3, 1).sum(1, dtype=torch.float32).sum(1)
    return x.sum((-2, -1), dtype=torch.float32)


def _axis_plan(shift: float, size: int) -> tuple[int, int, int, float]:
    """Re-alignment along one axis for a shift of ``shift`` grid cells (content moves +shift).

    The re-aligned map at ``u`` reads ``u - shift``: ``(1 - f) * x[u - c] + f * x[u - c + 1]`` with
    ``c = ceil(shift)`` and ``f = c - shift`` (``f = 0`` for integer shifts). Valid positions are
    those whose source lies in the grid: ``ceil(shift) <= u < size + floor(shift)``.

    Returns:
        ``(lo, hi, src_lo, f)``: valid outputs ``[lo, hi)``, first source index, weight of the upper
        neighbour.
    """
    c, fl = math.ceil(shift - 1e-9), math.floor(shift + 1e-9)
    if c - fl > 0 and abs(shift - round(shift)) <= 1e-9:  # integer within rounding
        c = fl = round(shift)
    lo, hi = max(0, c), min(size, size + fl)
    return lo, hi, lo - c, float(c - shift)


class TorchStatsBaseline:
    """``equivariance_stats`` written with torch ops, as a careful PyTorch user would.

    Vectorized over images and channels, one loop over the K elements. Exact translations realign
    the identity block by slicing (a view, no copy) and the valid region is a slice; fractional ones
    blend two (or four) slices; 90-degree rotations use ``torch.rot90``. Means are taken first and
    the second moments are sums of centred products (numerically sound in float32, unlike raw power
    sums); the chance comparison reuses the realigned, centred identity of the next image without
    a copy; ``m2_a`` and ``mean_a`` are shared by the three comparisons.

    Args:
        case: The benchmark case (layout, grid, group).
        batch: Images per block ``B``.
    """

    def __init__(self, case: StatsCase, batch: int):
        self.case, self.batch = case, batch
        self.plans: list[tuple] = []
        for element in case.image_group():
            params = dict(element.params)
            if element.kind == "translation":
                dy, dx = params["dy"] / case.stride, params["dx"] / case.stride
                self.plans.append(
                    ("shift", _axis_plan(dy, case.grid), _axis_plan(dx, case.grid), (dy, dx))
                )
            elif element.kind == "rotation" and float(params["angle"]) % 90 == 0:
                self.plans.append(("rot90", int(params["angle"]) // 90 % 4))
            else:
                raise ValueError(f"baseline: unsupported element {element.name}")

    def grid_view(self, feats: torch.Tensor) -> torch.Tensor:
        """``(N, C, h, w)`` view of ``feats`` (no copy)."""
        c = self.case
        if c.layout == "NCHW":
            return feats
        if c.layout == "NHWC":
            return feats.permute(0, 3, 1, 2)
        return feats[:, c.prefix :, :].unflatten(1, (c.grid, c.grid)).permute(0, 3, 1, 2)

    @staticmethod
    def _realign_shift(ident: torch.Tensor, py, px) -> torch.Tensor:
        (lo_y, hi_y, sy, fy), (lo_x, hi_x, sx, fx) = py, px
        hv, wv = hi_y - lo_y, hi_x - lo_x
        terms = []
        for oy, wy in ((0, 1.0 - fy), (1, fy)):
            for ox, wx in ((0, 1.0 - fx), (1, fx)):
                if wy * wx != 0.0:
                    sl = ident[..., sy + oy : sy + oy + hv, sx + ox : sx + ox + wv]
                    terms.append((wy * wx, sl))
        if len(terms) == 1:
            return terms[0][1]  # exact: a view of the identity block
        moved = terms[0][1].to(torch.float32) * terms[0][0]
        for weight, sl in terms[1:]:
            moved.add_(sl, alpha=weight)
        return moved

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        b = self.batch
        grid = self.grid_view(feats)
        channels = grid.shape[1]
        ident = grid[:b]
        out = torch.zeros(3, len(self.plans), b, channels, 6, device=feats.device)
        for k, plan in enumerate(self.plans):
            block = grid[(k + 1) * b : (k + 2) * b]
            if plan[0] == "shift":
                py, px = plan[1], plan[2]
                a = block[..., py[0] : py[1], px[0] : px[1]]
                inv_b = ident[..., py[0] : py[1], px[0] : px[1]]
                eq_b = self._realign_shift(ident, py, px)
            else:  # rot90: square grid, everything valid
                a, inv_b = block, ident
                eq_b = torch.rot90(ident, plan[1], dims=(-2, -1))
            count = a.shape[-2] * a.shape[-1]
            if count == 0:
                continue
            mean_a = _spatial_sum(a) / count
            mean_e = _spatial_sum(eq_b) / count
            mean_i = _spatial_sum(inv_b) / count
            da = a - mean_a[..., None, None]  # float32 (promotion from bf16 too)
            de = eq_b - mean_e[..., None, None]
            di = inv_b - mean_i[..., None, None]
            m2_a = _spatial_sum(da * da)
            m2_e = _spatial_sum(de * de)
            m2_i = _spatial_sum(di * di)
            c_e = _spatial_sum(da * de)
            c_i = _spatial_sum(da * di)
            # chance: image n against the realigned identity of image (n + 1) % B.
            c_c = torch.empty_like(c_e)
            if b > 1:
                c_c[:-1] = _spatial_sum(da[:-1] * de[1:])
            c_c[-1:] = _spatial_sum(da[-1:] * de[:1])
            nxt = lambda t: torch.roll(t, -1, 0)  # noqa: E731
            for idx, (mb, m2b, cab) in enumerate(
                ((mean_e, m2_e, c_e), (mean_i, m2_i, c_i), (nxt(mean_e), nxt(m2_e), c_c))
            ):
                o = out[idx, k]
                o[..., 0] = count
                o[..., 1] = mean_a
                o[..., 2] = mb
                o[..., 3] = m2_a
                o[..., 4] = m2b
                o[..., 5] = cab
        return out


# --------------------------------------------------------------------------------------------------
# Baseline: transform_images with torch ops


class TorchTransformBaseline:
    """``transform_images`` (crop protocol) written with torch ops.

    The output is allocated once; each element writes its block with one fused
    ``addcmul(bias, window, scale)`` (``(v / 255 - mean) / std`` in float32, cast on write).
    Translations are slices of the source (views); 90-degree rotations and flips are
    ``torch.rot90`` / ``flip`` of the uint8 identity window; other angles use ``F.grid_sample``
    (bilinear, ``align_corners=True``) on the normalized source with a sampling grid built once.
    """

    def __init__(self, case: TransformCase, src_shape, out_dtype, channels_last, device):
        self.case, self.out_dtype, self.channels_last = case, out_dtype, channels_last
        b, _, hs, ws = src_shape
        self.batch, size, m = b, case.size, case.margin
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
        self.scale = (1.0 / (255.0 * std)).to(device, torch.float32)
        self.bias = (-mean / std).to(device, torch.float32)
        self.plans: list[tuple] = []
        for element in [IDENTITY, *case.image_group()]:
            params = dict(element.params)
            if element.kind in ("identity", "translation") or element is IDENTITY:
                dy, dx = int(params.get("dy", 0)), int(params.get("dx", 0))
                self.plans.append(("window", m - dy, m - dx))
            elif element.kind == "rotation" and float(params["angle"]) % 90 == 0:
                self.plans.append(("rot90", int(params["angle"]) // 90 % 4))
            elif element.kind == "flip":
                self.plans.append(("flip", -1 if params["axis"] == "horizontal" else -2))
            else:  # bilinear: grid_sample grid in normalized source coordinates, built once
                src_map = torch.from_numpy(invert_affine(element.matrix(size, size)))
                ys, xs = torch.meshgrid(
                    torch.arange(size, dtype=torch.float64),
                    torch.arange(size, dtype=torch.float64),
                    indexing="ij",
                )
                sx = src_map[0, 0] * xs + src_map[0, 1] * ys + src_map[0, 2] + m
                sy = src_map[1, 0] * xs + src_map[1, 1] * ys + src_map[1, 2] + m
                g = torch.stack([2 * sx / (ws - 1) - 1, 2 * sy / (hs - 1) - 1], -1)
                self.plans.append(("grid", g[None].to(device, torch.float32).expand(b, -1, -1, -1)))

    def __call__(self, src: torch.Tensor) -> torch.Tensor:
        b, size, m = self.batch, self.case.size, self.case.margin
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty(
            (len(self.plans) * b, 3, size, size),
            dtype=self.out_dtype,
            device=src.device,
            memory_format=fmt,
        )
        window = src[..., m : m + size, m : m + size]
        normalized = None
        for e, plan in enumerate(self.plans):
            block = out[e * b : (e + 1) * b]
            if plan[0] == "window":
                y, x = plan[1], plan[2]
                torch.addcmul(
                    self.bias, src[..., y : y + size, x : x + size], self.scale, out=block
                )
            elif plan[0] == "rot90":
                rotated = torch.rot90(window, plan[1], dims=(-2, -1))
                torch.addcmul(self.bias, rotated, self.scale, out=block)
            elif plan[0] == "flip":
                torch.addcmul(self.bias, window.flip(plan[1]), self.scale, out=block)
            else:
                if normalized is None:
                    normalized = torch.addcmul(self.bias, src, self.scale)
                block.copy_(
                    F.grid_sample(
                        normalized,
                        plan[1],
                        mode="bilinear",
                        padding_mode="zeros",
                        align_corners=True,
                    )
                )
        return out


class TorchPathBaseline(TorchTransformBaseline):
    """``transform_images`` the textbook way issue 3 names: torch's roll / rot90 / grid_sample path.

    The sources are normalized to float once; each element is one torch op on that float tensor
    (``torch.roll`` of the source then the central crop for a translation, ``rot90`` / ``flip``
    of the central crop, ``grid_sample`` for other angles), and the ``K + 1`` blocks are joined
    with ``torch.cat`` and cast to the output dtype and memory format. It allocates a block per
    element where :class:`TorchTransformBaseline` writes each block once into the output; both
    are reported (``speedup`` against the tuned one, ``speedup_vs_torch_path`` against this).
    """

    def __call__(self, src: torch.Tensor) -> torch.Tensor:
        size, m = self.case.size, self.case.margin
        normalized = torch.addcmul(self.bias, src, self.scale)
        window = normalized[..., m : m + size, m : m + size]
        blocks = []
        for plan in self.plans:
            if plan[0] == "window":
                # the window at (y, x) is the central window of the source rolled by (m - y, m - x)
                rolled = torch.roll(normalized, (m - plan[1], m - plan[2]), dims=(-2, -1))
                blocks.append(rolled[..., m : m + size, m : m + size])
            elif plan[0] == "rot90":
                blocks.append(torch.rot90(window, plan[1], dims=(-2, -1)))
            elif plan[0] == "flip":
                blocks.append(window.flip(plan[1]))
            else:
                blocks.append(F.grid_sample(normalized, plan[1], mode="bilinear",
                                            padding_mode="zeros", align_corners=True))
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return torch.cat(blocks).to(self.out_dtype).contiguous(memory_format=fmt)


# --------------------------------------------------------------------------------------------------
# Inputs


def make_features(case: StatsCase, batch: int, dtype, device, gen) -> torch.Tensor:
    """Stacked layer output ``(K + 1) * B`` of ``case.layout``: blocks are noisy transforms of the
    identity block (so the equivariance correlation is high, as in a trained net), with per-channel
    offsets and scales (so centring matters)."""
    c, g = case.channels, case.grid
    plans = TorchStatsBaseline(case, batch).plans
    pad = max([math.ceil(abs(v)) for p in plans if p[0] == "shift" for v in p[3]] + [0])

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    scene = randn(batch, c, g + 2 * pad, g + 2 * pad)
    ident = scene[..., pad : pad + g, pad : pad + g]
    grid = torch.empty((len(plans) + 1) * batch, c, g, g, device=device)
    grid[:batch] = ident
    for k, plan in enumerate(plans, start=1):
        if plan[0] == "shift":
            ry, rx = (round(v) for v in plan[3])
            source = scene[..., pad - ry : pad - ry + g, pad - rx : pad - rx + g]
        else:
            source = torch.rot90(ident, plan[1], dims=(-2, -1))
        grid[k * batch : (k + 1) * batch] = source
    del scene, ident
    for block in grid.split(batch):  # noise block by block: small temporaries
        block.add_(randn(*block.shape), alpha=0.3)
    grid.mul_(torch.exp(0.5 * randn(1, c, 1, 1))).add_(3.0 * randn(1, c, 1, 1))
    if case.layout == "NCHW":
        feats = grid
    elif case.layout == "NHWC":
        feats = grid.permute(0, 2, 3, 1).contiguous()
    else:
        tokens = grid.flatten(2).transpose(1, 2)
        feats = torch.cat([randn(grid.shape[0], case.prefix, c), tokens], 1)
    del grid
    return feats.to(dtype)


def stats_affines(case: StatsCase) -> torch.Tensor:
    """``(K, 2, 3)`` feature-grid source maps (centred grid offset, as ``align="center"``)."""
    size = case.grid * case.stride
    matrices = case.image_group().matrices(size, size, with_identity=False)
    offset = (case.stride - 1) / 2.0
    affines = feature_source_affines(matrices, (case.stride, case.stride), (offset, offset))
    return torch.from_numpy(affines)


def _subset(feats: torch.Tensor, blocks: int, batch: int, images: int) -> torch.Tensor:
    """The first ``images`` images of every block, as a stacked batch of the same layout."""
    return feats.unflatten(0, (blocks, batch))[:, :images].flatten(0, 1).contiguous()


# --------------------------------------------------------------------------------------------------
# Checks


def compare_stats(got: torch.Tensor, want: torch.Tensor) -> dict[str, Any]:
    """Largest normalized difference per statistic of ``(..., 6)`` tensors.

    Counts must be equal; means are compared relative to ``std + |mean|`` of the wanted side, second
    moments relative to themselves, and the co-moment relative to ``sqrt(m2_a * m2_b)`` (so that the
    error reads as an error of the correlation).
    """
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return {"passed": False, "error": f"shape {tuple(got.shape)} != {tuple(want.shape)}"}
    count = want[..., 0]
    tiny = 1e-30
    safe = count.clamp(min=1)
    scale_a = (want[..., 3] / safe).sqrt() + want[..., 1].abs() + tiny
    scale_b = (want[..., 4] / safe).sqrt() + want[..., 2].abs() + tiny
    err = {
        "count": (got[..., 0] - count).abs(),
        "mean_a": (got[..., 1] - want[..., 1]).abs() / scale_a,
        "mean_b": (got[..., 2] - want[..., 2]).abs() / scale_b,
        "m2_a": (got[..., 3] - want[..., 3]).abs() / (want[..., 3].abs() + tiny),
        "m2_b": (got[..., 4] - want[..., 4]).abs() / (want[..., 4].abs() + tiny),
        "c_ab": (got[..., 5] - want[..., 5]).abs() / ((want[..., 3] * want[..., 4]).sqrt() + tiny),
    }
    valid = count > 0
    worst = {k: float(v[valid].max()) if bool(valid.any()) else 0.0 for k, v in err.items()}
    finite = bool(torch.isfinite(got).all())
    passed = (
        finite
        and worst["count"] < 0.5
        and all(worst[k] <= STATS_RTOL for k in worst if k != "count")
    )
    return {"passed": passed, "rtol": STATS_RTOL, "max_err": worst, "finite": finite}


def compare_images(got: torch.Tensor, want: torch.Tensor, atol: float) -> dict[str, Any]:
    """Largest absolute difference of two image batches (normalized units)."""
    if got.shape != want.shape:
        return {"passed": False, "error": f"shape {tuple(got.shape)} != {tuple(want.shape)}"}
    diff = (got.detach().float().cpu() - want.detach().float().cpu()).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    finite = bool(torch.isfinite(got).all())
    return {"passed": finite and worst <= atol, "atol": atol, "max_abs_err": worst}


# --------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Settings:
    device: torch.device
    batch: int
    warmup: int
    repeats: int
    quick: bool
    sync: Any = field(repr=False, default=None)
    seed: int = 0


def measure_copy_bandwidth(settings: Settings) -> dict[str, Any]:
    """Device-to-device ``dst.copy_(src)`` bandwidth, GB/s counted as read + write bytes."""
    dev = settings.device
    numel = (1 << 20) if settings.quick else ((1 << 28) if dev.type == "cuda" else (1 << 26))
    src = torch.rand(numel, device=dev)
    dst = torch.empty_like(src)
    timing = common.time_function(
        lambda: dst.copy_(src), settings.warmup + 1, max(settings.repeats, 5), settings.sync
    )
    moved = 2 * src.numel() * src.element_size()
    return {"bytes": moved, "time": timing, "gbs": moved / timing["median"] / 1e9}


def run_stats_case(case: StatsCase, dtype, settings: Settings, copy_gbs: float) -> dict[str, Any]:
    dev, b = settings.device, settings.batch
    gen = torch.Generator(device=dev).manual_seed(settings.seed + 1234)
    feats = make_features(case, b, dtype, dev, gen)
    affines = stats_affines(case)
    k = affines.shape[0]
    baseline = TorchStatsBaseline(case, b)
    compiled = _ext.has_kernel("equivariance_stats", dev.type)
    row: dict[str, Any] = {
        "op": "equivariance_stats",
        "case": case.name,
        "layout": case.layout,
        "group": case.group,
        "elements": k,
        "element_names": case.image_group().names,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": b,
        "feats_shape": list(feats.shape),
        "bytes": feats.numel() * feats.element_size(),
        "compiled": compiled,
    }

    def run_compiled(x, batch):
        return ops.equivariance_stats(
            x,
            affines,
            [0] * k,
            batch,
            case.layout,
            case.grid,
            case.grid,
            case.prefix,
            "bilinear",
            True,
            True,
        )

    # 1. The baseline against the float64 reference, on a few images per block.
    n = min(CHECK_IMAGES, b)
    small = _subset(feats, k + 1, b, n)
    ref_args = (affines, [0] * k, n, case.layout, case.grid, case.grid, case.prefix, "bilinear")
    start = time.perf_counter()
    want = _reference.equivariance_stats(small.cpu(), *ref_args, True, True)
    ref_seconds = time.perf_counter() - start
    check = {"baseline_vs_reference": compare_stats(TorchStatsBaseline(case, n)(small), want)}
    check["baseline_vs_reference"]["images"] = n
    check["reference_seconds"] = ref_seconds
    # 2. The compiled op against the baseline on the full batch.
    if compiled:
        check["compiled_vs_baseline"] = compare_stats(run_compiled(feats, b), baseline(feats))
    check["passed"] = all(v["passed"] for v in check.values() if isinstance(v, dict))
    row["check"] = check
    if not check["passed"]:
        return row  # never time what does not compute the same numbers
    # 3. Timings (baseline and compiled op interleaved).
    fns = {"baseline": lambda: baseline(feats)}
    if compiled:
        fns["compiled"] = lambda: run_compiled(feats, b)
    _time_row(row, fns, settings)
    fast = row["compiled_time"] if compiled else row["baseline_time"]
    row["gbs"] = row["bytes"] / fast["median"] / 1e9
    row["gbs_basis"] = "bytes(feats) / time of the " + ("compiled op" if compiled else "baseline")
    row["copy_ratio"] = row["gbs"] / copy_gbs if copy_gbs else None
    return row


def run_transform_case(
    case: TransformCase, dtype, channels_last: bool, settings: Settings, copy_gbs: float
) -> list[dict[str, Any]]:
    """Check a ``transform_images`` case, then time it: on the CPU once per heap mode
    (:func:`common.cpu_heap`: outputs fresh from the kernel, then reused), a row each."""
    dev, b = settings.device, settings.batch
    gen = torch.Generator(device=dev).manual_seed(settings.seed + 4321)
    side = case.size + 2 * case.margin
    src = torch.randint(0, 256, (b, 3, side, side), generator=gen, device=dev, dtype=torch.uint8)
    group = case.image_group()
    elements = [IDENTITY, *group]
    source_affines = torch.from_numpy(
        np.stack([invert_affine(e.matrix(case.size, case.size)) for e in elements])
    )
    protocols = [0] * len(elements)
    exact = all(e.is_exact(case.size, case.size) for e in elements)
    if dtype == torch.bfloat16:
        atol = BF16_IMAGE_TOL
    else:
        atol = IMAGE_ATOL["exact" if exact else "bilinear"]
    compiled = _ext.has_kernel("transform_images", dev.type)
    out_bytes = len(elements) * b * 3 * case.size**2 * torch.empty((), dtype=dtype).element_size()
    row: dict[str, Any] = {
        "op": "transform_images",
        "case": case.name,
        "group": case.group,
        "elements": len(group),
        "element_names": group.names,
        "dtype": str(dtype).replace("torch.", ""),
        "channels_last": channels_last,
        "batch": b,
        "src_shape": list(src.shape),
        "out_shape": [len(elements) * b, 3, case.size, case.size],
        "bytes": out_bytes + src.numel(),
        "compiled": compiled,
    }

    def run_compiled(x):
        return ops.transform_images(
            x,
            source_affines,
            protocols,
            (case.margin, case.margin),
            (case.size, case.size),
            IMAGENET_MEAN,
            IMAGENET_STD,
            dtype,
            channels_last,
        )

    baseline = TorchTransformBaseline(case, src.shape, dtype, channels_last, dev)
    n = min(CHECK_IMAGES, b)
    small = src[:n].contiguous()
    start = time.perf_counter()
    want = _reference.transform_images(
        small.cpu(),
        source_affines,
        protocols,
        case.margin,
        case.margin,
        case.size,
        case.size,
        IMAGENET_MEAN,
        IMAGENET_STD,
        torch.float64,
        False,
    )
    ref_seconds = time.perf_counter() - start
    small_baseline = TorchTransformBaseline(case, small.shape, dtype, channels_last, dev)
    check = {"baseline_vs_reference": compare_images(small_baseline(small), want, atol)}
    check["baseline_vs_reference"]["images"] = n
    torch_path = TorchPathBaseline(case, src.shape, dtype, channels_last, dev)
    small_path = TorchPathBaseline(case, small.shape, dtype, channels_last, dev)
    check["torch_path_vs_reference"] = compare_images(small_path(small), want, atol)
    check["torch_path_vs_reference"]["images"] = n
    check["reference_seconds"] = ref_seconds
    if compiled:
        got = run_compiled(src)
        check["compiled_vs_baseline"] = compare_images(got, baseline(src), atol)
        check["compiled_vs_baseline"]["memory_format_ok"] = (
            got.is_contiguous(memory_format=torch.channels_last)
            if channels_last
            else got.is_contiguous()
        )
        check["compiled_vs_baseline"]["passed"] &= check["compiled_vs_baseline"]["memory_format_ok"]
    check["passed"] = all(v["passed"] for v in check.values() if isinstance(v, dict))
    row["check"] = check
    if not check["passed"]:
        return [row]
    fns = {"baseline": lambda: baseline(src), "torch_path": lambda: torch_path(src)}
    if compiled:
        fns["compiled"] = lambda: run_compiled(src)
    # The floor both sides share: a fresh output of this shape, allocated and written once. On the
    # CPU a tensor this large is fresh memory from the kernel each call, and its page faults
    # (zeroing included) can cost more than the transform.
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out_shape = row["out_shape"]
    fns["fresh_output"] = lambda: torch.empty(
        out_shape, dtype=dtype, device=dev, memory_format=fmt
    ).fill_(0)
    rows = []
    for heap in common.HEAP_MODES if dev.type == "cpu" else (None,):
        timed = dict(row, heap=heap)
        with common.cpu_heap(heap) as pinned:
            between = common.release_free_memory if heap == "fresh" else None
            if heap == "reused" and pinned:
                # until the calls land on pages the calls before them used (see settle_heap)
                timed["heap_settle"] = common.settle_heap(fns, sync=settings.sync)
            timings = _time_row(timed, fns, settings, between)
        timed["heap_pinned"] = pinned
        rows.append(_transform_speeds(timed, timings, compiled, copy_gbs))
    return rows


def _transform_speeds(row, timings, compiled: bool, copy_gbs: float) -> dict[str, Any]:
    """The speedups and throughput of a timed ``transform_images`` row."""
    floor = timings["fresh_output"]["median"]
    row["fresh_output_time"] = timings["fresh_output"]
    row["torch_path_time"] = timings["torch_path"]
    if compiled:
        row["speedup_vs_torch_path"] = (
            timings["torch_path"]["median"] / row["compiled_time"]["median"]
        )
    # Beyond the floor only where the op costs clearly more than it: within 10% of it, the
    # difference is the size of the noise and its ratio meaningless.
    if compiled and row["compiled_time"]["median"] > 1.1 * floor:
        row["speedup_beyond_fresh_output"] = (row["baseline_time"]["median"] - floor) / (
            row["compiled_time"]["median"] - floor
        )
    fast = row["compiled_time"] if compiled else row["baseline_time"]
    row["gbs"] = row["bytes"] / fast["median"] / 1e9
    row["gbs_basis"] = "(bytes(src) + bytes(out)) / time of the " + (
        "compiled op" if compiled else "baseline"
    )
    row["copy_ratio"] = row["gbs"] / copy_gbs if copy_gbs else None
    return row


def _time_row(
    row: dict[str, Any], fns: dict, settings: Settings, before_each=None
) -> dict[str, Any]:
    """Fill ``baseline_time`` (and ``compiled_time``, ``speedup``) of a row; interleaved repeats
    (``before_each`` untimed before each call).

    Returns the timings of every function in ``fns``.
    """
    row["load_average"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    timings = common.time_interleaved(
        fns, settings.warmup, settings.repeats, settings.sync, before_each
    )
    row["baseline_time"] = timings["baseline"]
    row["baseline_gbs"] = row["bytes"] / timings["baseline"]["median"] / 1e9
    if "compiled" in timings:
        row["compiled_time"] = timings["compiled"]
        row["speedup"] = timings["baseline"]["median"] / timings["compiled"]["median"]
    return timings


def print_table(rows: list[dict[str, Any]], copy: dict[str, Any]) -> None:
    print(f"device copy bandwidth (read + write): {copy['gbs']:.1f} GB/s")
    header = (
        f"{'op':<19} {'case':<27} {'dtype':<9} {'B':>3} {'baseline':>10} {'compiled':>10} "
        f"{'speedup':>8} {'GB/s':>7} {'%copy':>6}  check"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        base = row.get("baseline_time", {}).get("median")
        comp = row.get("compiled_time", {}).get("median") if row["compiled"] else None
        ratio = row.get("copy_ratio")
        print(
            f"{row['op']:<19} {common.case_label(row):<27} {row['dtype']:<9} {row['batch']:>3} "
            f"{common.format_seconds(base):>10} "
            f"{(common.format_seconds(comp) if row['compiled'] else 'n/a'):>10} "
            f"{(format(row['speedup'], '.2f') + 'x') if row.get('speedup') else '-':>8} "
            f"{(format(row['gbs'], '.1f') if row.get('gbs') else '-'):>7} "
            f"{(format(100 * ratio, '.0f') + '%') if ratio else '-':>6}  "
            f"{'ok' if row['check']['passed'] else 'FAIL'}"
        )
        if "fresh_output_time" in row:
            beyond = row.get("speedup_beyond_fresh_output")
            print(
                f"{'':<19} {'  a fresh output alone':<27} {'':<9} {'':>3} "
                f"{common.format_seconds(row['fresh_output_time']['median']):>10} "
                f"{'':>10} {(format(beyond, '.2f') + 'x') if beyond else '-':>8}  "
                "(speedup beyond it)"
            )
        if "torch_path_time" in row:
            versus = row.get("speedup_vs_torch_path")
            print(
                f"{'':<19} {'  torch path (roll/rot90/cat)':<27} {'':<9} {'':>3} "
                f"{common.format_seconds(row['torch_path_time']['median']):>10} "
                f"{'':>10} {(format(versus, '.2f') + 'x') if versus else '-':>8}  "
                "(speedup against it)"
            )


def main(argv: list[str] | None = None) -> int:
    parser = common.build_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help=f"images per block B (default: {GPU_BATCH} on CUDA, {CPU_BATCH} on the CPU, "
        f"{QUICK_BATCH} with --quick)",
    )
    parser.add_argument(
        "--cases", default=None, help="comma-separated substrings: run only matching cases"
    )
    parser.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated feature/output dtypes (default: float32 on the CPU, "
        "float32,bfloat16 on CUDA)",
    )
    args = parser.parse_args(argv)
    device = common.setup_run(args)
    cuda = device.type == "cuda"
    batch = args.batch or (QUICK_BATCH if args.quick else (GPU_BATCH if cuda else CPU_BATCH))
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else (3 if cuda else 1))
    repeats = (
        args.repeats if args.repeats is not None else (1 if args.quick else (10 if cuda else 5))
    )
    settings = Settings(
        device, batch, warmup, repeats, args.quick, common.synchronizer(device), args.seed
    )
    if args.dtypes:
        dtypes = [getattr(torch, name.strip()) for name in args.dtypes.split(",")]
    else:
        dtypes = [torch.float32, torch.bfloat16] if cuda else [torch.float32]
    wanted = [w.strip() for w in args.cases.split(",")] if args.cases else None

    def selected(name: str) -> bool:
        return wanted is None or any(w in name for w in wanted)

    started = time.perf_counter()
    copy = measure_copy_bandwidth(settings)
    jobs = [
        (
            "equivariance_stats",
            case,
            dtype,
            lambda c, d: run_stats_case(c, d, settings, copy["gbs"]),
        )
        for case in stats_cases(args.quick)
        for dtype in dtypes
    ] + [
        (
            "transform_images",
            case,
            dtype,
            lambda c, d: run_transform_case(c, d, cuda, settings, copy["gbs"]),
        )
        for case in transform_cases(args.quick)
        for dtype in dtypes
    ]
    rows = []
    for op, case, dtype, run in jobs:
        if not selected(case.name):
            continue
        try:
            result = run(case, dtype)
            new_rows = result if isinstance(result, list) else [result]
        except Exception as error:  # noqa: BLE001 - one broken case must not hide the others
            new_rows = [_error_row(op, case, dtype, batch, device, error)]
        for row in new_rows:
            _progress(row)
        rows += new_rows
        if cuda:
            torch.cuda.empty_cache()
    passed = all(r["check"]["passed"] for r in rows)
    payload = {
        "schema": common.SCHEMA_VERSION,
        "benchmark": "ops",
        "device": str(device),
        "quick": bool(args.quick),
        "meta": common.collect_metadata(device),
        "settings": {
            "batch": batch,
            "elements": ELEMENTS,
            "warmup": warmup,
            "repeats": repeats,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "check_images": CHECK_IMAGES,
            "stats_rtol": STATS_RTOL,
            "image_atol": IMAGE_ATOL,
            "bf16_image_atol": BF16_IMAGE_TOL,
        },
        "compiled": {
            op: _ext.has_kernel(op, device.type)
            for op in ("equivariance_stats", "transform_images")
        },
        "copy_bandwidth_gbs": copy["gbs"],
        "copy": copy,
        "rows": rows,
        "all_checks_passed": passed,
        "wall_seconds": time.perf_counter() - started,
    }
    path = common.write_result(args.out, "ops", payload)
    print()
    print_table(rows, copy)
    print(f"\nwrote {path} ({payload['wall_seconds']:.0f} s)")
    if not args.no_readme and common.is_under_results(args.out):
        if common.update_readme_table():
            print(f"rewrote the results table of {common.README}")
    if not passed:
        failed = [f"{r['op']}/{r['case']}/{r['dtype']}" for r in rows if not r["check"]["passed"]]
        print(f"CORRECTNESS CHECK FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _error_row(op, case, dtype, batch, device, error: Exception) -> dict[str, Any]:
    """A row for a case that raised: the check fails and the traceback is kept."""
    return {
        "op": op,
        "case": case.name,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "compiled": _ext.has_kernel(op, device.type),
        "check": {
            "passed": False,
            "error": f"{type(error).__name__}: {error}",
            "traceback": traceback.format_exc(),
        },
    }


def _progress(row: dict[str, Any]) -> None:
    t = row.get("baseline_time", {}).get("median")
    status = "ok" if row["check"]["passed"] else "CHECK FAILED"
    if "error" in row["check"]:
        status += f" ({row['check']['error']})"
    print(
        f"  {row['op']} {common.case_label(row)} {row['dtype']}: {status}, baseline "
        f"{common.format_seconds(t)}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
