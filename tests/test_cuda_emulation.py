"""The CUDA kernel of equivariance_stats run on the CPU, under an emulation of CUDA execution.

``tests/cuda_emulation/emulate_stats.cpp`` compiles ``csrc/cuda/equivariance_stats_kernel.cuh``
(the kernel ``stats_kernel`` and the host helpers the CUDA launcher uses) for the host, with
blocks run one after another and the 256 threads of a block as cooperative fibers meeting at
``__syncthreads`` and warp shuffles. This checks the kernel's indexing, its split of the work over
lanes, warps and channel tiles and its merges without a GPU, against the float64 reference and
the CPU kernel.

Inputs in float32 or bfloat16 are compared with the reference fed the same values (upcast), so
the tolerances measure the kernel's arithmetic. Shapes are small: every block runs 256 emulated
threads.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from stats_checks import assert_stats_close

import equifast.ops  # noqa: F401  (loads the compiled CPU kernel, if built)
from equifast import _ext
from equifast.ops import _reference as R

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The emulated kernel, built once per session (a missing compiler fails, it does not skip)."""
    from torch.utils.cpp_extension import load

    assert shutil.which("c++") or shutil.which("g++"), "no C++ compiler to build the emulation"
    build = tmp_path_factory.mktemp("cuda_emulation_build")
    return load(
        name="equifast_cuda_emulation",
        sources=[str(REPO / "tests" / "cuda_emulation" / "emulate_stats.cpp")],
        extra_include_paths=[str(REPO / "csrc" / "include"), str(REPO / "csrc" / "cuda")],
        extra_cflags=["-O1", "-g0", "-std=c++20"],
        build_directory=str(build),
        verbose=False,
    )


# --------------------------------------------------------------------------------------------
# Feature-grid source maps (x, y order): output position (x, y) reads (m0 x + m1 y + m2, ...).


def shift(dx: float, dy: float) -> list[list[float]]:
    return [[1.0, 0.0, dx], [0.0, 1.0, dy]]


def rot90(h: int, w: int) -> list[list[float]]:
    """A quarter turn about the grid centre (integer when h + w is even)."""
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return [[0.0, -1.0, cx + cy], [1.0, 0.0, cy - cx]]


def rot180(h: int, w: int) -> list[list[float]]:
    return [[-1.0, 0.0, w - 1.0], [0.0, -1.0, h - 1.0]]


def flip_x(h: int, w: int) -> list[list[float]]:
    return [[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0]]


def flip_y(h: int, w: int) -> list[list[float]]:
    return [[1.0, 0.0, 0.0], [0.0, -1.0, h - 1.0]]


def rotation(degrees: float, h: int, w: int) -> list[list[float]]:
    """A rotation about the grid centre (bilinear)."""
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    cx, cy = (w - 1) / 2, (h - 1) / 2
    return [[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy]]


def affines_of(maps) -> torch.Tensor:
    return torch.tensor(maps, dtype=torch.float64).reshape(-1, 2, 3)


def mixed_maps(h: int, w: int):
    """(maps, wrap): integer shifts (crop and circular), quarter turn, flips, bilinear maps."""
    maps = [
        shift(1, 2),
        shift(2, -3),
        rot90(h, w),
        flip_x(h, w),
        flip_y(h, w),
        rotation(30, h, w),
        shift(0.5, 0.25),
    ]
    wrap = [0, 1, 0, 0, 0, 0, 1]
    return maps, wrap


# --------------------------------------------------------------------------------------------
# Features and comparisons


def make_feats(layout, images, channels, h, w, dtype, variant="plain", prefix=0, scale=1.0):
    base = scale * torch.randn(images, channels, h, w, dtype=torch.float64)
    if layout == "NCHW":
        feats = base
        if variant == "channels_last":  # NCHW shape, NHWC strides: the channels-inner kernel
            feats = base.contiguous(memory_format=torch.channels_last)
    elif layout == "NHWC":
        feats = base.permute(0, 2, 3, 1).contiguous()
    else:  # NLC with `prefix` tokens before the grid's
        tokens = base.flatten(2).transpose(1, 2)
        head = scale * torch.randn(images, prefix, channels, dtype=torch.float64)
        feats = torch.cat([head, tokens], 1).contiguous()
    return feats.to(dtype)


def rtol_for(dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-6


def check(
    emu,
    feats,
    affines,
    wrap,
    batch,
    layout,
    h,
    w,
    prefix=0,
    subpixel="bilinear",
    with_inv=True,
    with_chance=True,
    rtol=None,
    disc=None,
):
    """Emulated CUDA kernel against the float64 reference and the CPU kernel; returns it."""
    args = (affines, list(wrap), batch, layout, h, w, prefix, subpixel, with_inv, with_chance)
    got = emu.emulated_equivariance_stats(feats, *args, None, disc)
    rtol = rtol_for(feats.dtype) if rtol is None else rtol
    want = R.equivariance_stats(feats, *args, disc=disc)
    assert_stats_close(got, want, rtol, "against the reference")
    if _ext.has_kernel("equivariance_stats", "cpu"):
        cpu = torch.ops.equifast.equivariance_stats(feats, *args, None, disc)
        assert_stats_close(got, cpu, rtol, "against the CPU kernel")
    for i, wanted in enumerate((True, with_inv, with_chance)):
        if not wanted:
            assert bool((got[i] == 0).all())
    return got


# --------------------------------------------------------------------------------------------
# Tests

LAYOUT_CASES = [
    ("NCHW", "plain", 0),
    ("NCHW", "channels_last", 0),
    ("NHWC", "plain", 0),
    ("NLC", "plain", 0),
    ("NLC", "plain", 1),
    ("NLC", "plain", 4),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout,variant,prefix", LAYOUT_CASES)
def test_layouts_and_dtypes(emu, dtype, layout, variant, prefix):
    h, w, channels, batch = 7, 5, 33, 2  # odd grid; more than one tile of 8 and of 32 channels
    maps, wrap = mixed_maps(h, w)
    affines = affines_of(maps)
    assert [R.is_integer_map(a) for a in affines] == [True] * 5 + [False] * 2
    feats = make_feats(layout, (len(maps) + 1) * batch, channels, h, w, dtype, variant, prefix)
    inner, kx, ky, kz = emu.emulated_launch_shape(
        feats, affines, wrap, batch, layout, h, w, prefix, "bilinear"
    )
    assert inner == (variant == "channels_last" or layout != "NCHW")
    assert (kx, ky, kz) == (len(maps), math.ceil(channels / (32 if inner else 8)), batch)
    got = check(emu, feats, affines, wrap, batch, layout, h, w, prefix)
    assert (got[0, [1, 6], :, :, 0] == h * w).all()  # wrapped: all valid


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,variant,prefix", LAYOUT_CASES)
def test_identity_block_apart(emu, dtype, layout, variant, prefix):
    """``reference``: the identity block in a tensor of its own, whose images lie twice as far
    apart as the elements' (NaN between them), gives exactly the statistics of the two stacked."""
    h, w, channels, batch = 5, 6, 33, 3
    maps, wrap = mixed_maps(h, w)
    affines = affines_of(maps)
    feats = make_feats(layout, (len(maps) + 1) * batch, channels, h, w, dtype, variant, prefix)
    spread = torch.full((2 * batch, *feats.shape[1:]), float("nan"), dtype=dtype)
    spread = spread.contiguous(memory_format=torch.channels_last) if (
        variant == "channels_last") else spread
    identity = spread[::2]
    identity.copy_(feats[:batch])
    assert identity.stride()[1:] == feats.stride()[1:] and identity.stride(0) != feats.stride(0)
    args = (affines, list(wrap), batch, layout, h, w, prefix, "bilinear", True, True)
    stacked = emu.emulated_equivariance_stats(feats, *args)
    apart = emu.emulated_equivariance_stats(feats[batch:], *args, reference=identity)
    assert torch.equal(apart, stacked)
    assert_stats_close(apart, R.equivariance_stats(feats, *args), rtol_for(dtype))


SIZE_CASES = [(7, 5), (1, 9), (3, 3), (2, 4), (13, 11)]


@pytest.mark.parametrize(
    "layout,variant", [("NCHW", "plain"), ("NCHW", "channels_last"), ("NHWC", "plain")]
)
@pytest.mark.parametrize("h,w", SIZE_CASES)
@pytest.mark.parametrize("channels,batch", [(1, 1), (3, 3), (33, 1)])
def test_sizes(emu, layout, variant, h, w, channels, batch):
    # Grids with fewer positions than lanes (and one past kUnroll * 32), channel counts below,
    # at and past the tiles, batch 1 (chance compares the image with itself) and 3.
    maps = [shift(1, -1), shift(2, 1), flip_x(h, w), rot180(h, w), rotation(30, h, w)]
    wrap = [0, 1, 0, 0, 0]
    feats = make_feats(layout, (len(maps) + 1) * batch, channels, h, w, torch.float32, variant)
    got = check(emu, feats, affines_of(maps), wrap, batch, layout, h, w)
    if batch == 1:
        assert torch.equal(got[0], got[2])


@pytest.mark.parametrize(
    "layout,variant", [("NCHW", "plain"), ("NCHW", "channels_last"), ("NHWC", "plain")]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_integer_maps_whose_valid_positions_are_no_rectangle(emu, layout, variant, dtype):
    # Integer shears (crop): their valid positions form a parallelogram, so the kernel walks the
    # grid with the index maps rather than a rectangle; a shifted quarter turn and a flip with a
    # shift are rectangles whose source steps mix both axes. 13 x 11 positions take several
    # kUnroll rounds per thread.
    h, w, channels, batch = 13, 11, 9, 2
    maps = [
        [[1.0, 1.0, -3.0], [0.0, 1.0, 0.0]],
        [[1.0, 0.0, 0.0], [-1.0, 1.0, 2.0]],
        [[0.0, -1.0, w - 1.0 + 2.0], [1.0, 0.0, -1.0]],
        [[-1.0, 0.0, w - 1.0 - 3.0], [0.0, 1.0, 2.0]],
        shift(3, -2),
    ]
    feats = make_feats(layout, (len(maps) + 1) * batch, channels, h, w, dtype, variant)
    got = check(emu, feats, affines_of(maps), [0] * len(maps), batch, layout, h, w)
    counts = got[0, :, 0, 0, 0]
    assert 0 < counts[0] < h * w and 0 < counts[1] < h * w


def test_elements_go_to_the_launch_of_their_path(emu):
    # Rectangles (crop shifts, quarter turn, flips) first, then the other integer maps (circular
    # shift, shear), then the bilinear ones; a shift past the grid has no valid position and is
    # not launched (its statistics stay 0). 0 rectangle, 1 integer, 2 bilinear.
    h, w, batch = 7, 5, 2
    maps = [
        rotation(30, h, w),
        shift(1, 2),
        shift(2, -3),
        [[1.0, 1.0, -3.0], [0.0, 1.0, 0.0]],
        shift(9, 0),
        rot90(h, w),
        shift(0.5, 0.25),
        flip_y(h, w),
    ]
    wrap = [0, 0, 1, 0, 0, 0, 1, 0]
    affines = affines_of(maps)
    feats = make_feats("NCHW", (len(maps) + 1) * batch, 3, h, w, torch.float64)
    paths = emu.emulated_element_paths(feats, affines, wrap, batch, "NCHW", h, w, 0, "bilinear")
    assert paths == [(1, 0), (5, 0), (7, 0), (2, 1), (3, 1), (0, 2), (6, 2)]
    skipped = emu.emulated_element_paths(feats, affines, wrap, batch, "NCHW", h, w, 0, "skip")
    assert skipped == [(1, 0), (5, 0), (7, 0), (2, 1), (3, 1)]
    got = check(emu, feats, affines, wrap, batch, "NCHW", h, w)
    assert (got[:, 4] == 0).all()


def test_rectangle_offsets_must_fit_32_bits(emu):
    # A 56 x 56 rectangle; a thread's offsets run up to kThreads columns and rows past it.
    fits = emu.emulated_rectangle_fits
    assert fits(1, 56, 0, 0, 56, 56, 1, 56, 57)
    assert fits(256, 56 * 256, 0, 0, 56, 56, 256, 56 * 256, 0)  # NHWC, 256 channels
    # stride_y large enough that (rows + kThreads + 1) * stride_y passes 2^31 - 1
    rows = 56 + 256 + 1
    big = (2**31 - 1) // rows + 1
    assert not fits(1, big, 0, 0, 56, 56, 1, 1, 0)
    assert fits(1, big // 4, 0, 0, 56, 56, 1, big // 4, 0)
    # the source offsets count too, and together with the positions' offsets
    assert not fits(1, 1, 0, 0, 56, 56, 1, 1, 2**31 - 1)
    assert not fits(1, big // 2 + 1, 0, 0, 56, 56, 1, big // 2 + 1, 0)


SHIFTS = [(0, 1), (1, 0), (-2, 3), (3, -4), (0, 0), (4, 6), (0, -6), (6, 0), (9, 0), (-11, 5)]


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_integer_shifts(emu, layout):
    h, w, channels, batch = 7, 5, 9, 2
    maps = [shift(dx, dy) for dx, dy in SHIFTS] * 2
    wrap = [0] * len(SHIFTS) + [1] * len(SHIFTS)
    feats = make_feats(layout, (len(maps) + 1) * batch, channels, h, w, torch.float64)
    got = check(emu, feats, affines_of(maps), wrap, batch, layout, h, w)
    for k, (dx, dy) in enumerate(SHIFTS):
        valid = max(w - abs(dx), 0) * max(h - abs(dy), 0)
        assert (got[0, k, :, :, 0] == valid).all(), (dx, dy)
        if valid == 0:
            assert (got[:, k] == 0).all()
        assert (got[0, len(SHIFTS) + k, :, :, 0] == h * w).all()
    assert (got[0, SHIFTS.index((4, 6)), :, :, 0] == 1).all()  # a single valid position


@pytest.mark.parametrize("subpixel", ["bilinear", "skip"])
@pytest.mark.parametrize("layout,variant", [("NCHW", "plain"), ("NHWC", "plain")])
def test_subpixel(emu, subpixel, layout, variant):
    h = w = 6
    maps = [
        shift(2, 0),
        shift(0.5, 0),
        shift(1.5, -0.5),
        rot90(h, w),
        rotation(45, h, w),
        shift(-0.25, 0.75),
    ]
    wrap = [0, 0, 1, 0, 0, 1]
    exact = [R.is_integer_map(a) for a in affines_of(maps)]
    assert exact == [True, False, False, True, False, False]
    feats = make_feats(layout, (len(maps) + 1) * 2, 10, h, w, torch.float32, variant)
    got = check(emu, feats, affines_of(maps), wrap, 2, layout, h, w, subpixel=subpixel)
    for k, is_exact in enumerate(exact):
        assert bool((got[:, k] == 0).all()) == (subpixel == "skip" and not is_exact)


@pytest.mark.parametrize("with_inv,with_chance", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_comparisons_requested(emu, with_inv, with_chance, layout):
    h, w = 5, 7
    maps = [shift(1, 2), rotation(30, h, w)]
    feats = make_feats(layout, 3 * 3, 9, h, w, torch.float32)
    check(
        emu,
        feats,
        affines_of(maps),
        [0, 0],
        3,
        layout,
        h,
        w,
        with_inv=with_inv,
        with_chance=with_chance,
    )


def test_large_offset(emu):
    # Mean 1e4, spread 1: the shifted single-pass sums keep the spread and the co-moment.
    h, w = 6, 7
    maps = [shift(1, 1), shift(0.5, 0.5)]
    for layout in ("NCHW", "NHWC"):
        feats = 1e4 + make_feats(layout, 3 * 2, 9, h, w, torch.float64)
        check(emu, feats, affines_of(maps), [1, 0], 2, layout, h, w)


@pytest.mark.parametrize("layout,variant", [("NCHW", "plain"), ("NHWC", "plain")])
def test_nan_at_invalid_positions_stays_out(emu, layout, variant):
    # Element 0 reads (x + 1, y) (exact), element 1 (x + 1.5, y) (bilinear: columns x + 1 and
    # x + 2), both cropped: the last column is invalid for both. NaN there in their transformed
    # images, and in the identity's column 0 (which neither reads at a valid position once inv is
    # off, though the exact loop loads clamped addresses at invalid ones), must not reach their
    # statistics.
    h, w, channels, batch = 5, 6, 10, 2
    maps = [shift(1, 0), shift(1.5, 0), shift(-1, 0)]
    affines = affines_of(maps)
    images = (len(maps) + 1) * batch
    clean = make_feats("NCHW", images, channels, h, w, torch.float32)
    poisoned = clean.clone()
    poisoned[batch : 3 * batch, :, :, w - 1] = float("nan")  # transformed images of elements 0, 1
    poisoned[:batch, :, :, 0] = float("nan")  # identity column 0
    if layout == "NHWC":
        clean, poisoned = (t.permute(0, 2, 3, 1).contiguous() for t in (clean, poisoned))
    args = (affines, [0, 0, 0], batch, layout, h, w, 0, "bilinear", False, True)
    got = emu.emulated_equivariance_stats(poisoned, *args)
    want = R.equivariance_stats(clean, *args)
    # Elements 0 and 1 never use a NaN value: equal to the clean statistics.
    assert_stats_close(got[:, :2], want[:, :2], 1e-6, "NaN at invalid positions")
    assert (got[0, 0, :, :, 0] == h * (w - 1)).all()
    assert (got[0, 1, :, :, 0] == h * (w - 2)).all()
    # Element 2 (reads x - 1) compares against identity column 0 at x = 1: NaN must show.
    assert torch.isnan(got[0, 2, :, :, 2]).all()


# --------------------------------------------------------------------------------------------
# Bilinear maps whose taps are one pattern over a rectangle (path 3)


def quarter_turn_about(cx: float, cy: float) -> list[list[float]]:
    """A quarter turn about (cx, cy): on resnet-style grids (feature 0 centred on pixel 0) the
    image centre is off the grid, so the turn reads between feature positions."""
    return [[0.0, -1.0, cx + cy], [1.0, 0.0, cy - cx]]


def pattern_maps(h: int, w: int):
    """Fractional translations along one axis and both, quarter and half turns and a flip about
    points off the grid: non-integer maps with an integer linear part (crop)."""
    return [
        shift(0.25, 0),
        shift(0, -0.75),
        shift(1.5, 2.25),
        shift(-2.5, 0.5),
        quarter_turn_about((w - 1) / 2 - 0.25, (h - 1) / 2 - 0.5),
        quarter_turn_about((w - 1) / 2 + 0.25, (h - 1) / 2),
        [[-1.0, 0.0, w - 1.5], [0.0, -1.0, h - 1.75]],
        [[-1.0, 0.0, w - 1.5], [0.0, 1.0, 0.0]],
    ]


def test_bilinear_rectangles_go_to_their_own_launch(emu):
    h, w, batch = 7, 6, 2
    maps = pattern_maps(h, w)
    count = len(maps)
    maps += [
        rotation(30, h, w),  # weights vary over the grid
        shift(0.5, 0.25),  # wrapped
        [[1.0, 1.0, 0.5], [0.0, 1.0, 0.0]],  # integer shear, fractional: no rectangle
        # A source 1e-7 left of column 0 is valid (edge tolerance) and reads column 0 twice
        # (clamped), with other weights than the positions right of it: not one pattern.
        shift(-1e-7, 0.5),
        [[1.0 + 1e-3, 0.0, 0.5], [0.0, 1.0, 0.0]],  # linear part not an integer
    ]
    wrap = [0] * count + [0, 1, 0, 0, 0]
    affines = affines_of(maps)
    assert not any(R.is_integer_map(a) for a in affines)
    feats = make_feats("NCHW", (len(maps) + 1) * batch, 3, h, w, torch.float64)
    paths = emu.emulated_element_paths(feats, affines, wrap, batch, "NCHW", h, w, 0, "bilinear")
    assert paths == [(k, 3) for k in range(count)] + [(k, 2) for k in range(count, len(maps))]
    check(emu, feats, affines, wrap, batch, "NCHW", h, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout,variant,prefix", LAYOUT_CASES)
def test_bilinear_rectangles(emu, dtype, layout, variant, prefix):
    # Against the reference and the CPU kernel, over layouts and dtypes; 9 x 11 positions take
    # several steps of two positions per thread, 33 channels more than one tile.
    h, w, channels, batch = 9, 11, 33, 2
    maps = pattern_maps(h, w)
    affines = affines_of(maps)
    feats = make_feats(layout, (len(maps) + 1) * batch, channels, h, w, dtype, variant, prefix)
    paths = emu.emulated_element_paths(feats, affines, [0] * len(maps), batch, layout, h, w,
                                       prefix, "bilinear")
    assert {path for _, path in paths} == {3}
    got = check(emu, feats, affines, [0] * len(maps), batch, layout, h, w, prefix)
    # shift(0.25, 0) keeps every row and all but the last column
    assert (got[0, 0, :, :, 0] == h * (w - 1)).all()


@pytest.mark.parametrize("h,w", [(1, 9), (2, 4), (3, 3), (5, 8), (13, 11)])
@pytest.mark.parametrize("channels,batch", [(1, 1), (3, 3), (33, 1)])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_bilinear_rectangle_sizes(emu, h, w, channels, batch, layout):
    maps = pattern_maps(h, w)
    feats = make_feats(layout, (len(maps) + 1) * batch, channels, h, w, torch.float32)
    got = check(emu, feats, affines_of(maps), [0] * len(maps), batch, layout, h, w)
    if batch == 1:
        assert torch.equal(got[0], got[2])


@pytest.mark.parametrize("with_inv,with_chance", [(True, False), (False, True), (False, False)])
def test_bilinear_rectangle_comparisons_and_offset(emu, with_inv, with_chance):
    # The comparisons requested, and mean 1e4 with spread 1 (the shifts are blended values).
    h, w = 6, 7
    maps = pattern_maps(h, w)
    for layout in ("NCHW", "NHWC"):
        feats = 1e4 + make_feats(layout, (len(maps) + 1) * 2, 9, h, w, torch.float64)
        check(emu, feats, affines_of(maps), [0] * len(maps), 2, layout, h, w,
              with_inv=with_inv, with_chance=with_chance)


def test_bilinear_rectangle_agrees_with_the_bilinear_loop(emu):
    # The same maps, nudged by 1e-12 in their linear part so that the host finds no pattern,
    # go through the per-position bilinear loop: the statistics agree to rounding.
    h, w, channels, batch = 8, 9, 5, 2
    maps = pattern_maps(h, w)
    nudged = [[[m[0][0] + 1e-12, *m[0][1:]], m[1]] for m in maps]
    feats = make_feats("NHWC", (len(maps) + 1) * batch, channels, h, w, torch.float32)
    args = ([0] * len(maps), batch, "NHWC", h, w, 0, "bilinear")
    paths = emu.emulated_element_paths(feats, affines_of(nudged), *args)
    assert {path for _, path in paths} == {2}
    fast = emu.emulated_equivariance_stats(feats, affines_of(maps), *args, True, True)
    slow = emu.emulated_equivariance_stats(feats, affines_of(nudged), *args, True, True)
    assert torch.equal(fast[..., 0], slow[..., 0])  # the same valid positions
    assert_stats_close(fast, slow, 1e-6, "pattern against the per-position loop")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_bilinear_rectangle_reads_stay_in_the_grid(emu, layout):
    # Along an axis without a fraction the far taps weigh 0; they must still read inside the
    # grid: the features are a view of a larger tensor whose extra row and column are NaN.
    h, w, channels, batch = 5, 6, 4, 2
    maps = [shift(0, -0.75), shift(0.25, 0), shift(0.5, 1.0), [[-1.0, 0.0, w - 1.0],
                                                               [0.0, 1.0, 0.5]]]
    images = (len(maps) + 1) * batch
    clean = make_feats("NCHW", images, channels, h, w, torch.float32)
    padded = torch.full((images, channels, h + 1, w + 1), float("nan"))
    if layout == "NHWC":
        clean = clean.permute(0, 2, 3, 1).contiguous()
        padded = padded.permute(0, 2, 3, 1).contiguous()
        padded[:, :h, :w] = clean
        feats = padded[:, :h, :w]
    else:
        padded[:, :, :h, :w] = clean
        feats = padded[:, :, :h, :w]
    affines = affines_of(maps)
    args = (affines, [0] * len(maps), batch, layout, h, w, 0, "bilinear", True, True)
    paths = emu.emulated_element_paths(feats, *args[:-2])
    assert {path for _, path in paths} == {3}
    got = emu.emulated_equivariance_stats(feats, *args)
    assert not torch.isnan(got).any()
    assert_stats_close(got, R.equivariance_stats(clean, *args), 1e-6, "reads past the grid")


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_group_maps_on_a_grid_off_the_image_centre(emu, layout):
    # The engine's maps for a resnet-style layer (stride 4, feature 0 centred on pixel 0) of a
    # 28 x 28 input: quarter turns, flips and half-cell translations take the bilinear
    # rectangle path, a 30-degree turn the per-position loop.
    import numpy as np

    from equifast import groups

    h = w = 7
    elements = (groups.Rotation([90, 180, 270]).elements + groups.Flip(["h", "v"]).elements
                + groups.Translation([(2, 0), (0, -6)]).elements + groups.Rotation([30]).elements)
    matrices = np.stack([e.matrix(4 * h, 4 * w) for e in elements])
    affines = torch.from_numpy(groups.feature_source_affines(matrices, (4, 4), (0.0, 0.0)))
    wrap = [0] * len(elements)
    feats = make_feats(layout, (len(elements) + 1) * 2, 9, h, w, torch.float32)
    paths = emu.emulated_element_paths(feats, affines, wrap, 2, layout, h, w, 0, "bilinear")
    assert paths == [(k, 3) for k in range(len(elements) - 1)] + [(len(elements) - 1, 2)]
    check(emu, feats, affines, wrap, 2, layout, h, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,variant,prefix", LAYOUT_CASES)
def test_disc(emu, dtype, layout, variant, prefix):
    # mask="disc" (an ellipse here: radii 3.5 and 2.5 on a 9 x 8 grid): the shifts and turns whose
    # valid positions filled a rectangle leave the rectangle loops for the per-position loops,
    # which test the disc there; the counts are those of the reference.
    h, w, batch = 9, 8, 2
    maps = [shift(1, 2), rot180(h, w), flip_x(h, w), rotation(30, h, w), shift(0.5, 0.25),
            [[1.0, 1.0, -3.0], [0.0, 1.0, 0.0]]]
    disc = [3.5, 4.0, 3.5, 2.5]
    feats = make_feats(layout, (len(maps) + 1) * batch, 5, h, w, dtype, variant, prefix)
    got = check(emu, feats, affines_of(maps), [0] * len(maps), batch, layout, h, w, prefix,
                disc=disc)
    plain = check(emu, feats, affines_of(maps), [0] * len(maps), batch, layout, h, w, prefix)
    assert (0 < got[0, :, 0, 0, 0]).all() and (got[0, :, 0, 0, 0] < plain[0, :, 0, 0, 0]).all()
    paths = emu.emulated_element_paths(feats, affines_of(maps), [0] * len(maps), batch, layout,
                                       h, w, prefix, "bilinear", disc)
    assert sorted(path for _, path in paths) == [1, 1, 1, 1, 2, 2]


def test_disc_that_holds_the_grid_keeps_the_rectangle_loops(emu):
    # A disc around the whole grid removes nothing: the same statistics and the same launches.
    h, w, batch = 6, 7, 2
    maps = [shift(1, 2), rot180(h, w), shift(0.5, 0.0)]
    feats = make_feats("NCHW", (len(maps) + 1) * batch, 4, h, w, torch.float64)
    wide = [3.0, 2.5, 50.0, 50.0]
    got = check(emu, feats, affines_of(maps), [0] * 3, batch, "NCHW", h, w, disc=wide)
    plain = check(emu, feats, affines_of(maps), [0] * 3, batch, "NCHW", h, w)
    assert torch.equal(got, plain)
    args = (feats, affines_of(maps), [0] * 3, batch, "NCHW", h, w, 0, "bilinear")
    assert emu.emulated_element_paths(*args, wide) == emu.emulated_element_paths(*args)
