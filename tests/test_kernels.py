"""The compiled kernels (``torch.ops.equifast.*``) against the float64 references.

The oracle is :mod:`equifast.ops._reference` (pure PyTorch, float64). Every test runs on the CPU,
and on CUDA (marker ``cuda``) when a GPU and the CUDA kernels are there. Inputs in half precision
are compared with the reference run on the *same* half values upcast, so the tolerances measure
the kernels' arithmetic, not the input rounding.

The ops allocate their outputs uninitialized; ``conftest.py`` sets ``EQUIFAST_POISON_OUTPUTS=1``, so
they fill them with NaN first. Every element is compared and outputs must be finite, which catches
an element a kernel leaves unwritten (stale heap memory could otherwise hold the right values).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stats_checks import assert_stats_close

import equifast.ops  # noqa: F401  (registers the fake kernels used by opcheck)
from equifast import _ext, groups
from equifast.ops import _reference as R

pytestmark = pytest.mark.skipif(
    not (
        _ext.has_kernel("equivariance_stats", "cpu") and _ext.has_kernel("transform_images", "cpu")
    ),
    reason=f"the compiled CPU kernels are not built ({_ext.load_error()})",
)

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    if request.param == "cuda" and not (
        _ext.has_kernel("equivariance_stats", "cuda")
        and _ext.has_kernel("transform_images", "cuda")
    ):
        pytest.skip("equifast._C was built without its CUDA kernels")
    return request.param


# --------------------------------------------------------------------------------------------
# Helpers


def stats_op(
    feats,
    affines,
    wrap,
    batch,
    layout,
    grid_h,
    grid_w,
    prefix=0,
    subpixel="bilinear",
    with_inv=True,
    with_chance=True,
    disc=None,
):
    """Kernel and reference statistics for the same arguments (reference on the CPU, float64)."""
    args = (
        affines,
        list(wrap),
        batch,
        layout,
        grid_h,
        grid_w,
        prefix,
        subpixel,
        with_inv,
        with_chance,
    )
    got = torch.ops.equifast.equivariance_stats(feats, *args, None, disc)
    want = R.equivariance_stats(feats.detach().cpu(), *args, disc=disc)
    return got, want


def rtol_for(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 2e-5


def feature_affines(elements, height, width, stride=(1, 1), offset=(0.0, 0.0)) -> torch.Tensor:
    """(K, 2, 3) feature-grid source maps of group elements, as the engine builds them."""
    matrices = np.stack([e.matrix(height * stride[0], width * stride[1]) for e in elements])
    return torch.from_numpy(groups.feature_source_affines(matrices, stride, offset))


def wrap_flags(elements) -> list[int]:
    return [int(e.protocol == "circular") for e in elements]


def make_feats(
    layout: str,
    images: int,
    channels: int,
    height: int,
    width: int,
    dtype,
    device,
    variant: str = "plain",
    prefix: int = 0,
) -> torch.Tensor:
    """Features in a layout, contiguous or as the views met in practice (non-contiguous)."""
    if layout == "NCHW":
        if variant == "sliced":  # every other channel of a wider map: non-contiguous
            base = torch.randn(images, 2 * channels, height, width, dtype=torch.float64)
            feats = base[:, ::2]
        elif variant == "channels_last":
            base = torch.randn(images, channels, height, width, dtype=torch.float64)
            feats = base.contiguous(memory_format=torch.channels_last)
        else:
            feats = torch.randn(images, channels, height, width, dtype=torch.float64)
    elif layout == "NHWC":
        base = torch.randn(images, channels, height, width, dtype=torch.float64)
        # A permuted view (how channels-last blocks hand their output over) or a contiguous copy.
        feats = base.permute(0, 2, 3, 1)
        if variant != "permuted":
            feats = feats.contiguous()
    else:  # NLC
        if variant == "sliced":  # tokens of a wider embedding: channel stride 1, token stride 2C
            base = torch.randn(images, prefix + height * width, 2 * channels, dtype=torch.float64)
            feats = base[..., :channels]
        else:
            feats = torch.randn(images, prefix + height * width, channels, dtype=torch.float64)
    return feats.to(device=device, dtype=dtype)


def mixed_elements(size: int):
    """Integer shifts (all protocols), rotations, flips and bilinear rotations on a square grid."""
    return (
        groups.Translation([(1, 2), (-2, 0)], protocol="crop").elements
        + groups.Translation([(2, -3)], protocol="circular").elements
        + groups.Translation([(0, 1)], protocol="zero").elements
        + groups.Rotation([90, 180, 270, 30, 45]).elements
        + groups.Flip(["horizontal", "vertical"]).elements
        + groups.Translation([(0.5, 1.25)], protocol="circular").elements
    )


# --------------------------------------------------------------------------------------------
# equivariance_stats


LAYOUT_CASES = [
    ("NCHW", "plain", 0),
    ("NCHW", "sliced", 0),
    ("NCHW", "channels_last", 0),
    ("NHWC", "permuted", 0),
    ("NHWC", "plain", 0),
    ("NLC", "plain", 0),
    ("NLC", "plain", 1),
    ("NLC", "plain", 4),
    ("NLC", "sliced", 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout,variant,prefix", LAYOUT_CASES)
def test_stats_layouts_and_dtypes(device, dtype, layout, variant, prefix):
    size, channels, batch = 9, 37, 2  # odd grid; channels not a multiple of a vector width
    elements = mixed_elements(size)
    affines = feature_affines(elements, size, size)
    images = (len(elements) + 1) * batch
    feats = make_feats(layout, images, channels, size, size, dtype, device, variant, prefix)
    got, want = stats_op(feats, affines, wrap_flags(elements), batch, layout, size, size, prefix)
    assert got.device.type == device
    assert_stats_close(got, want, rtol_for(dtype))


@pytest.mark.parametrize(
    "layout,variant", [("NCHW", "plain"), ("NHWC", "plain"), ("NCHW", "channels_last")]
)
@pytest.mark.parametrize("height,width", [(8, 8), (7, 7), (6, 10), (1, 1), (1, 13)])
@pytest.mark.parametrize("channels", [1, 8, 64, 300])
def test_stats_sizes(device, layout, variant, height, width, channels):
    # Even and odd, tiny and wide grids; channel counts at and past the vector and tile widths.
    elements = (
        groups.Translation([(1, -1), (0, 3)], protocol="crop").elements
        + groups.Translation([(2, 1)], protocol="circular").elements
        + groups.Flip().elements
        + groups.Rotation([180, 30]).elements
    )
    affines = feature_affines(elements, height, width)
    batch = 2
    feats = make_feats(
        layout, (len(elements) + 1) * batch, channels, height, width, torch.float32, device, variant
    )
    got, want = stats_op(feats, affines, wrap_flags(elements), batch, layout, height, width)
    assert_stats_close(got, want)


@pytest.mark.parametrize("protocol", ["crop", "circular", "zero"])
@pytest.mark.parametrize("shift", [(0, 1), (1, 0), (-2, 3), (3, -4), (0, 0), (9, 0), (-11, 5)])
def test_stats_integer_shifts(device, protocol, shift):
    height, width, channels, batch = 7, 8, 12, 3
    elements = groups.Translation([shift], protocol=protocol).elements
    affines = feature_affines(elements, height, width)
    feats = make_feats("NCHW", 2 * batch, channels, height, width, torch.float32, device)
    got, want = stats_op(feats, affines, wrap_flags(elements), batch, "NCHW", height, width)
    assert_stats_close(got, want)
    if protocol == "circular" or shift == (0, 0):
        assert (got[0, :, :, :, 0] == height * width).all()  # everything valid
    if abs(shift[0]) >= height or abs(shift[1]) >= width:
        if protocol != "circular":
            assert (got == 0).all()  # nothing valid: all statistics 0


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("size", [6, 7])
def test_stats_rotations_and_flips(device, layout, size):
    elements = (
        groups.Rotation([90, 180, 270]).elements
        + groups.Flip(["horizontal", "vertical"]).elements
        + groups.Rotation([30, 45, -60]).elements
    )
    affines = feature_affines(elements, size, size)
    feats = make_feats(layout, (len(elements) + 1) * 2, 10, size, size, torch.float32, device)
    got, want = stats_op(feats, affines, wrap_flags(elements), 2, layout, size, size)
    assert_stats_close(got, want)
    # 90-degree rotations of square grids and flips are exact and valid everywhere.
    assert (got[0, :5, :, :, 0] == size * size).all()


@pytest.mark.parametrize("stride", [2, 4, 8, 16, 32])
def test_stats_fractional_realignment(device, stride):
    # Translations by t input pixels are t / s feature pixels: exact when divisible, else bilinear.
    size = 6
    shifts = [(0, stride), (stride, 0), (0, 3), (5, -7), (stride // 2, stride + 1)]
    elements = (
        groups.Translation(shifts, protocol="crop").elements
        + groups.Translation([(3, 1)], protocol="circular").elements
    )
    offset = ((stride - 1) / 2, (stride - 1) / 2)
    affines = feature_affines(elements, size, size, (stride, stride), offset)
    exact = [R.is_integer_map(a) for a in affines]
    assert exact[0] and exact[1] and not exact[2]
    feats = make_feats("NHWC", (len(elements) + 1) * 2, 16, size, size, torch.float32, device)
    got, want = stats_op(feats, affines, wrap_flags(elements), 2, "NHWC", size, size)
    assert_stats_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout,variant,prefix", [("NCHW", "plain", 0), ("NCHW", "channels_last",
                                                   0), ("NHWC", "plain", 0), ("NLC", "plain", 1)])
@pytest.mark.parametrize("height,width", [(7, 7), (6, 9)])
def test_stats_turns_about_a_centre_off_the_grid(device, dtype, layout, variant, prefix, height,
                                                 width):
    # Grids whose feature 0 is centred on input pixel 0 (resnet-style padding) at stride 4: the
    # image centre lies between feature positions, so quarter turns, flips and half-cell
    # translations read between them with the same weights everywhere (the CUDA kernel's
    # bilinear rectangle path); a 30-degree turn beside them does not.
    elements = (
        groups.Rotation([90, 180, 270]).elements
        + groups.Flip(["horizontal", "vertical"]).elements
        + groups.Translation([(2, 0), (0, -6), (3, 5)]).elements
        + groups.Rotation([30]).elements
    )
    affines = feature_affines(elements, height, width, (4, 4), (0.0, 0.0))
    assert not any(R.is_integer_map(a) for a in affines)
    feats = make_feats(layout, (len(elements) + 1) * 3, 35, height, width, dtype, device, variant,
                       prefix)
    got, want = stats_op(feats, affines, wrap_flags(elements), 3, layout, height, width, prefix)
    assert_stats_close(got, want, rtol_for(dtype))


def disc_elements():
    """Elements a disc mask takes (every protocol but circular): integer and fractional shifts,
    quarter turns, flips, bilinear turns."""
    return (
        groups.Translation([(1, 2), (-2, 0), (0.5, -1.25)], protocol="crop").elements
        + groups.Translation([(0, 1)], protocol="zero").elements
        + groups.Rotation([90, 180, 270, 30, -77.5]).elements
        + groups.Flip(["horizontal", "vertical"]).elements
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout,variant,prefix", LAYOUT_CASES)
@pytest.mark.parametrize("stride,offset", [((1, 1), (0.0, 0.0)), ((2, 2), (0.5, 0.5)),
                                           ((4, 2), (0.0, 1.5))])
def test_stats_disc(device, dtype, layout, variant, prefix, stride, offset):
    # mask="disc": only positions inside the disc inscribed in the input, with their sources,
    # count; an ellipse on a grid whose strides differ.
    height, width = 9, 8
    elements = disc_elements()
    affines = feature_affines(elements, height, width, stride, offset)
    disc = groups.feature_disc((height * stride[0], width * stride[1]), stride, offset)
    feats = make_feats(layout, (len(elements) + 1) * 2, 19, height, width, dtype, device, variant,
                       prefix)
    wrap = wrap_flags(elements)
    got, want = stats_op(feats, affines, wrap, 2, layout, height, width, prefix, disc=disc)
    assert_stats_close(got, want, rtol_for(dtype))
    plain, _ = stats_op(feats, affines, wrap, 2, layout, height, width, prefix)
    counts, plain_counts = got[0, :, 0, 0, 0], plain[0, :, 0, 0, 0]
    assert (counts > 0).all() and (counts <= plain_counts).all()
    assert (counts < plain_counts).all()  # the disc cuts every element's region


@pytest.mark.parametrize("size", [7, 8, 13])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_stats_disc_gives_every_rotation_the_same_positions(device, size, layout):
    # The disc through the centres of the edge pixels: a turn about the centre by any angle keeps
    # every position of it inside the grid, so all turns compare the positions of the disc itself
    # (counted here apart), while without it each angle keeps the square less its own corners.
    elements = groups.Rotation([90, 180, 270, 30, 45, -77.5, 123.4]).elements
    affines = feature_affines(elements, size, size)
    disc = groups.feature_disc((size, size), (1, 1), (0.0, 0.0))
    centre, radius = (size - 1) / 2, (size - 1) / 2
    ys, xs = np.mgrid[:size, :size]
    in_disc = int((((xs - centre) ** 2 + (ys - centre) ** 2) <= radius**2).sum())
    feats = make_feats(layout, (len(elements) + 1) * 2, 5, size, size, torch.float32, device)
    got, want = stats_op(feats, affines, [0] * len(elements), 2, layout, size, size, disc=disc)
    assert_stats_close(got, want)
    assert (got[:, :, :, :, 0] == in_disc).all()
    plain, _ = stats_op(feats, affines, [0] * len(elements), 2, layout, size, size)
    assert len(set(plain[0, :, 0, 0, 0].tolist())) > 1


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    layout=st.sampled_from(["NCHW", "NHWC", "NLC"]),
    height=st.integers(1, 11),
    width=st.integers(1, 11),
    channels=st.integers(1, 20),
    shift=st.tuples(st.integers(-6, 6), st.integers(-6, 6)),
    angle=st.floats(-180, 180, allow_nan=False),
    fraction=st.floats(-3, 3, allow_nan=False),
    centre=st.tuples(st.floats(-2, 12), st.floats(-2, 12)),
    radii=st.tuples(st.floats(0.3, 9), st.floats(0.3, 9)),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_stats_disc_hypothesis(device, layout, height, width, channels, shift, angle, fraction,
                               centre, radii, dtype):
    elements = [
        groups.Element("shift", groups._translation_matrix(*shift)),
        groups.Element("rot", groups._rotation_matrix(angle), protocol="zero"),
        groups.Element("frac", groups._translation_matrix(fraction, -fraction / 3)),
    ]
    affines = feature_affines(elements, height, width)
    prefix = 1 if layout == "NLC" else 0
    feats = make_feats(layout, 4 * 2, channels, height, width, dtype, device, prefix=prefix)
    disc = (*centre, *radii)
    got, want = stats_op(feats, affines, [0, 0, 0], 2, layout, height, width, prefix, disc=disc)
    assert_stats_close(got, want, 5e-5)


def test_stats_disc_opcheck(device):
    size, batch = 5, 2
    elements = groups.Translation([(1, 0)]).elements + groups.Rotation([30]).elements
    affines = feature_affines(elements, size, size)
    feats = torch.randn(3 * batch, 4, size, size, device=device)
    disc = list(groups.feature_disc((size, size), (1, 1), (0.0, 0.0)))
    torch.library.opcheck(torch.ops.equifast.equivariance_stats.default,
                          (feats, affines, [0, 0], batch, "NCHW", size, size, 0, "bilinear", True,
                           True, None, disc))


def test_stats_subpixel_skip(device):
    size = 8
    elements = (
        groups.Translation([(0, 4), (0, 3), (2, 2)]).elements + groups.Rotation([90, 30]).elements
    )
    affines = feature_affines(elements, size, size, (2, 2), (0.5, 0.5))
    exact = [R.is_integer_map(a) for a in affines]
    assert exact == [True, False, True, True, False]
    feats = make_feats("NCHW", (len(elements) + 1) * 2, 5, size, size, torch.float32, device)
    got, want = stats_op(
        feats, affines, wrap_flags(elements), 2, "NCHW", size, size, subpixel="skip"
    )
    assert_stats_close(got, want)
    for k, is_exact in enumerate(exact):
        assert bool((got[:, k] == 0).all()) == (not is_exact)


@pytest.mark.parametrize(
    "with_inv,with_chance", [(True, True), (True, False), (False, True), (False, False)]
)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_stats_comparisons_requested(device, with_inv, with_chance, layout):
    size = 7
    elements = groups.Translation([(1, 2)]).elements + groups.Rotation([30]).elements
    affines = feature_affines(elements, size, size)
    feats = make_feats(layout, 3 * 3, 9, size, size, torch.float32, device)
    got, want = stats_op(
        feats,
        affines,
        wrap_flags(elements),
        3,
        layout,
        size,
        size,
        with_inv=with_inv,
        with_chance=with_chance,
    )
    assert_stats_close(got, want)
    assert bool((got[1] == 0).all()) == (not with_inv)
    assert bool((got[2] == 0).all()) == (not with_chance)


def test_stats_batch_one_chance_is_the_image_itself(device):
    size = 6
    elements = groups.Translation([(1, 1)], protocol="circular").elements
    affines = feature_affines(elements, size, size)
    feats = make_feats("NCHW", 2, 4, size, size, torch.float32, device)
    got, want = stats_op(feats, affines, [1], 1, "NCHW", size, size)
    assert_stats_close(got, want)
    assert torch.equal(got[0], got[2])


def test_stats_vectors(device):
    # Pooled features / logits: (N, C) viewed as NCHW (N, 1, 1, C), grid 1 x C.
    batch, channels = 3, 50
    elements = groups.Translation([(0, 1), (0, 2)]).elements
    affines = feature_affines(elements, 1, channels)
    feats = torch.randn(3 * batch, channels, device=device).reshape(3 * batch, 1, 1, channels)
    got, want = stats_op(feats, affines, [0, 0], batch, "NCHW", 1, channels)
    assert_stats_close(got, want)


def test_stats_large_offset_keeps_correlation(device):
    # A map with mean 1e4 and spread 1: the channel-centred correlation from the kernel's float32
    # statistics must match float64 numpy to 1e-4 (sum-of-squares formulas lose every digit).
    generator = torch.Generator().manual_seed(1)
    batch, channels, size = 2, 16, 24
    identity = 1e4 + torch.randn(
        batch, channels, size, size, generator=generator, dtype=torch.float64
    )
    moved = torch.roll(identity, (2, 3), dims=(-2, -1))
    transformed = moved + 0.3 * torch.randn(moved.shape, generator=generator, dtype=torch.float64)
    feats64 = torch.cat([identity, transformed])
    elements = groups.Translation([(2, 3)], protocol="circular").elements
    affines = feature_affines(elements, size, size)
    for dtype in (torch.float32, torch.float64):
        feats = feats64.to(dtype)
        stats = (
            torch.ops.equifast.equivariance_stats(
                feats.to(device), affines, [1], batch, "NCHW", size, size, 0, "bilinear", True, True
            )
            .cpu()
            .double()
        )
        data = feats.double().numpy()
        for b in range(batch):
            a = data[batch + b]
            ref = np.roll(data[b], (2, 3), axis=(-2, -1))
            ac = a - a.mean(axis=(-2, -1), keepdims=True)
            bc = ref - ref.mean(axis=(-2, -1), keepdims=True)
            expected = (ac * bc).sum() / math.sqrt((ac**2).sum() * (bc**2).sum())
            eq = stats[0, 0, b]
            corr = eq[:, 5].sum() / math.sqrt(eq[:, 3].sum() * eq[:, 4].sum())
            assert expected > 0.9
            assert abs(corr.item() - expected) < 1e-4, (dtype, corr.item(), expected)


def test_cpu_isa_cap_must_be_known(monkeypatch):
    # EQUIFAST_CPU_ISA caps the vector ISA of the CPU kernels; a value it does not know is an
    # error that names the choices, not a silent fallback to some copy of the loops.
    monkeypatch.setenv("EQUIFAST_CPU_ISA", "sse9")
    size = 6
    affines, protocols = image_affines(groups.Translation([(1, 0)]).elements, size, size)
    src = source_images(torch.uint8, "cpu", 2, size + 2, size + 2)
    message = r"EQUIFAST_CPU_ISA must be one of default, avx2, avx512 \(or unset\), but got 'sse9'"
    with pytest.raises(RuntimeError, match=message):
        transform_op(src, affines, protocols, (1, 1), (size, size))
    feats = torch.randn(4, 3, 5, 5)
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.equifast.equivariance_stats(
            feats, identity, [0], 2, "NCHW", 5, 5, 0, "bilinear", True, True
        )


def assert_stats_same_for_thread_counts(feats, args, counts) -> None:
    """The CPU op with each of torch's thread ``counts``: the reference's numbers every time, and
    the same bits (deterministic: no reduction across threads)."""
    threads = torch.get_num_threads()
    try:
        results = []
        for count in counts:
            torch.set_num_threads(count)
            got, want = stats_op(feats, *args)
            assert_stats_close(got, want)
            results.append(got)
    finally:
        torch.set_num_threads(threads)
    for got in results[1:]:
        assert torch.equal(results[0], got)


@pytest.mark.parametrize("isa", ["default", "avx2", "best"])
@pytest.mark.parametrize("layout,variant", [("NCHW", "plain"), ("NHWC", "plain")])
def test_stats_cpu_code_paths(monkeypatch, isa, layout, variant):
    # The CPU kernel has an SSE2, an AVX2 and an AVX-512 build of its loops (the best the processor
    # runs is chosen at run time; EQUIFAST_CPU_ISA caps it), and runs on torch's threads: every
    # path gives the reference's numbers, with any thread count.
    if isa != "best":
        monkeypatch.setenv("EQUIFAST_CPU_ISA", isa)
    size, batch = 10, 3
    elements = mixed_elements(size)
    affines = feature_affines(elements, size, size)
    feats = make_feats(
        layout, (len(elements) + 1) * batch, 48, size, size, torch.float32, "cpu", variant
    )
    args = (affines, wrap_flags(elements), batch, layout, size, size)
    assert_stats_same_for_thread_counts(feats, args, (1, 2))


@pytest.mark.parametrize("layout,prefix", [("NHWC", 0), ("NLC", 1)])
@pytest.mark.parametrize("channels,batch", [(384, 1), (392, 3), (800, 2), (1030, 1)])
def test_stats_cpu_channel_tiles(layout, prefix, channels, batch):
    # Channels-contiguous features go in tasks of whole rows up to 384 channels, split into equal
    # tiles when wider and narrowed while a small batch would leave a thread idle: every split
    # (with any thread count) gives the reference's numbers.
    size = 5
    elements = mixed_elements(size)
    affines = feature_affines(elements, size, size)
    feats = make_feats(
        layout,
        (len(elements) + 1) * batch,
        channels,
        size,
        size,
        torch.float32,
        "cpu",
        "plain",
        prefix,
    )
    args = (affines, wrap_flags(elements), batch, layout, size, size, prefix)
    assert_stats_same_for_thread_counts(feats, args, (1, 2, 3))


@pytest.mark.parametrize("isa", ["default", "avx2", "best"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize(
    "layout,variant,height,width",
    [
        ("NCHW", "plain", 18, 40),  # long runs: translations along runs, the rest transposed
        ("NCHW", "sliced", 18, 40),
        ("NCHW", "plain", 66, 64),  # past the transposed tiles' size: everything along runs
        ("NCHW", "channels_last", 18, 40),
    ],
)
def test_stats_cpu_loop_nests(monkeypatch, isa, dtype, layout, variant, height, width):
    # The CPU kernel picks a loop nest per memory order, grid size and element: every one of them,
    # in every ISA build, gives the reference's numbers.
    if isa != "best":
        monkeypatch.setenv("EQUIFAST_CPU_ISA", isa)
    elements = (
        groups.Translation([(1, 3), (-2, 0)], protocol="crop").elements
        + groups.Translation([(0, -5)], protocol="circular").elements
        + groups.Flip().elements
        + groups.Rotation([180, 20]).elements
        + groups.Translation([(0.5, 0)], protocol="zero").elements
    )
    affines = feature_affines(elements, height, width)
    feats = make_feats(layout, (len(elements) + 1) * 2, 19, height, width, dtype, "cpu", variant)
    got, want = stats_op(feats, affines, wrap_flags(elements), 2, layout, height, width)
    assert_stats_close(got, want, rtol_for(dtype))


def test_stats_flat_maps_are_exactly_flat(device):
    # Maps constant in exact arithmetic give exactly zero spread (the scores call them undefined)
    # rather than rounding noise: a constant channel, and a 2 x 2 grid shifted by half a pixel
    # with wrapping (every position averages the same four values).
    batch = 2
    elements = groups.Translation([(8, -8)], protocol="circular").elements
    affines = feature_affines(elements, 2, 2, (16, 16), (7.5, 7.5))
    assert not R.is_integer_map(affines[0])
    for layout in ("NCHW", "NHWC"):
        feats = make_feats(layout, 2 * batch, 5, 2, 2, torch.float32, device)
        got, want = stats_op(feats, affines, [1], batch, layout, 2, 2)
        assert_stats_close(got, want)
        assert (got[0, ..., 4] == 0).all() and (got[0, ..., 5] == 0).all()
    size = 9
    elements = groups.Rotation([30]).elements + groups.Translation([(1, 2)]).elements
    affines = feature_affines(elements, size, size)
    feats = torch.full((3 * batch, 4, size, size), 0.1, device=device)
    stats = torch.ops.equifast.equivariance_stats(
        feats, affines, [0, 0], batch, "NCHW", size, size, 0, "bilinear", True, True
    )
    assert (stats[..., 3:] == 0).all()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    layout=st.sampled_from(["NCHW", "NHWC", "NLC"]),
    height=st.integers(1, 11),
    width=st.integers(1, 11),
    channels=st.integers(1, 20),
    batch=st.integers(1, 3),
    prefix=st.integers(0, 3),
    shifts=st.lists(st.tuples(st.integers(-12, 12), st.integers(-12, 12)), min_size=1, max_size=3),
    angle=st.floats(-180, 180, allow_nan=False),
    fraction=st.floats(-3, 3, allow_nan=False),
    protocol=st.sampled_from(["crop", "circular", "zero"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_stats_hypothesis(
    device, layout, height, width, channels, batch, prefix, shifts, angle, fraction, protocol, dtype
):
    shifts = list(dict.fromkeys(shifts))  # Translation wants distinct shifts
    elements = (
        groups.Translation(shifts, protocol=protocol).elements
        + [groups.Element("rot", groups._rotation_matrix(angle), protocol=protocol)]
        + [
            groups.Element(
                "frac", groups._translation_matrix(fraction, -fraction / 3), protocol=protocol
            )
        ]
    )
    elements = list({e.name: e for e in elements}.values())
    affines = feature_affines(elements, height, width)
    prefix = prefix if layout == "NLC" else 0
    feats = make_feats(
        layout, (len(elements) + 1) * batch, channels, height, width, dtype, device, prefix=prefix
    )
    got, want = stats_op(feats, affines, wrap_flags(elements), batch, layout, height, width, prefix)
    assert_stats_close(got, want, 5e-5)


def stats_sample_args(device):
    size, batch = 5, 2
    elements = groups.Translation([(1, 0)]).elements + groups.Rotation([30]).elements
    affines = feature_affines(elements, size, size)
    nchw = torch.randn(3 * batch, 4, size, size, device=device)
    nlc = torch.randn(3 * batch, 1 + size * size, 6, device=device)
    return [
        (nchw, affines, [0, 0], batch, "NCHW", size, size, 0, "bilinear", True, True),
        (
            nchw.permute(0, 2, 3, 1),
            affines,
            [0, 1],
            batch,
            "NHWC",
            size,
            size,
            0,
            "skip",
            False,
            True,
        ),
        (nlc.half(), affines, [0, 0], batch, "NLC", size, size, 1, "bilinear", True, False),
    ]


def _split_identity(feats: torch.Tensor, batch: int, gap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The identity block as a tensor of its own whose images are ``gap`` images apart (another
    image stride than the elements'), laid out like ``feats`` after the batch axis."""
    identity = feats[:batch]
    # One image of feats spans this many elements (its strides after the batch axis included).
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(feats.shape[1:], feats.stride()[1:]))
    holder = torch.full((batch * gap * span,), float("nan"), dtype=feats.dtype,
                        device=feats.device)
    slots = holder.as_strided(identity.shape, (gap * span, *feats.stride()[1:]))
    slots.copy_(identity)
    return slots, feats[batch:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout,variant,prefix", LAYOUT_CASES)
def test_stats_identity_block_apart(device, dtype, layout, variant, prefix):
    """``reference``: the identity block in a tensor of its own (the engine's later forwards)
    gives exactly the statistics of the two stacked, in every layout and loop nest."""
    size, batch = 7, 3
    elements = mixed_elements(size)
    affines = feature_affines(elements, size, size)
    wrap = wrap_flags(elements)
    feats = make_feats(layout, (len(elements) + 1) * batch, 20, size, size, dtype, device,
                       variant, prefix)
    args = (affines, wrap, batch, layout, size, size, prefix, "bilinear", True, True)
    stacked = torch.ops.equifast.equivariance_stats(feats, *args)
    for gap in (1, 3):
        identity, rest = _split_identity(feats, batch, gap)
        apart = torch.ops.equifast.equivariance_stats(rest, *args, identity)
        assert torch.equal(apart, stacked), f"gap {gap}"
    want = R.equivariance_stats(rest.cpu(), *args, identity.cpu())
    assert_stats_close(apart, want, rtol_for(dtype))
    assert_stats_close(stacked, R.equivariance_stats(feats.cpu(), *args), rtol_for(dtype))


def test_stats_identity_block_apart_errors():
    size, batch = 4, 2
    affines = feature_affines(groups.Translation([(1, 0)]).elements, size, size)
    feats = torch.randn(2 * batch, 3, size, size)
    identity, rest = feats[:batch].clone(), feats[batch:]
    args = (affines, [0], batch, "NCHW", size, size, 0, "bilinear", True, True)
    with pytest.raises(RuntimeError, match=r"expected shape \(2, \*feats.shape\[1:\]\)"):
        torch.ops.equifast.equivariance_stats(rest, *args, identity[:1])
    with pytest.raises(RuntimeError, match="reference must lay out its images like feats"):
        torch.ops.equifast.equivariance_stats(
            rest, *args, identity.contiguous(memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match="must have the dtype and device of feats"):
        torch.ops.equifast.equivariance_stats(rest, *args, identity.double())
    with pytest.raises(RuntimeError, match=r"K \* batch = 1 \* 2 = 2 were expected"):
        torch.ops.equifast.equivariance_stats(feats, *args, identity)
    # An axis of size 1 may have any stride: it is never stepped along.
    one = torch.randn(2 * batch, 1, size, size)
    odd = torch.randn(batch, 1, size, size).as_strided((batch, 1, size, size),
                                                        (size * size, 7, size, 1))
    got = torch.ops.equifast.equivariance_stats(one[batch:], *args, odd)
    want = R.equivariance_stats(torch.cat([odd, one[batch:]]), *args)
    assert_stats_close(got, want, rtol_for(torch.float32))


def test_stats_opcheck(device):
    for args in stats_sample_args(device):
        torch.library.opcheck(torch.ops.equifast.equivariance_stats.default, args)
        feats, affines, batch = args[0], args[1], args[3]
        identity, rest = feats[:batch].clone(), feats[batch:]  # the identity block apart
        torch.library.opcheck(torch.ops.equifast.equivariance_stats.default,
                              (rest, affines, *args[2:], identity))


def _stats_error_cases():
    size, batch = 4, 2
    affines = feature_affines(groups.Translation([(1, 0)]).elements, size, size)
    good = torch.randn(2 * batch, 3, size, size)
    return [
        (
            (good[0], affines, [0], batch, "NCHW", size, size, 0, "bilinear", True, True),
            r"feats must be a 4-D tensor",
        ),
        (
            (good, affines, [0], batch, "NCWH", size, size, 0, "bilinear", True, True),
            r"layout must be one of",
        ),
        (
            (good, affines, [0], batch, "NCHW", size, size, 0, "nearest", True, True),
            r"subpixel must be one of",
        ),
        (
            (good, affines, [0], batch, "NCHW", size + 1, size, 0, "bilinear", True, True),
            r"does not match the grid",
        ),
        (
            (good, affines, [0], 3, "NCHW", size, size, 0, "bilinear", True, True),
            r"\(K \+ 1\) \* batch",
        ),
        (
            (good, affines, [0, 1], batch, "NCHW", size, size, 0, "bilinear", True, True),
            r"wrap must have 1 entries",
        ),
        (
            (good, affines.float(), [0], batch, "NCHW", size, size, 0, "bilinear", True, True),
            r"source_affines must have dtype Double",
        ),
        (
            (good, affines[:, :1], [0], batch, "NCHW", size, size, 0, "bilinear", True, True),
            r"source_affines must have shape \(K, 2, 3\)",
        ),
        (
            (good.int(), affines, [0], batch, "NCHW", size, size, 0, "bilinear", True, True),
            r"feats must have one of the dtypes",
        ),
        (
            (
                torch.randn(4, 17, 3),
                affines,
                [0],
                batch,
                "NLC",
                size,
                size,
                0,
                "bilinear",
                True,
                True,
            ),
            r"L = prefix \+ grid_h \* grid_w",
        ),
        (
            (good, affines, [0], 0, "NCHW", size, size, 0, "bilinear", True, True),
            r"batch must be > 0",
        ),
        (
            (good, affines, [0], batch, "NCHW", 0, size, 0, "bilinear", True, True),
            r"grid_h must be > 0",
        ),
        (
            (good, affines, [1], batch, "NCHW", size, size, 0, "bilinear", True, True, None,
             [1.5, 1.5, 2.0, 2.0]),
            r"disc masks the border of the image, which a wrapping element",
        ),
        (
            (good, affines, [0], batch, "NCHW", size, size, 0, "bilinear", True, True, None,
             [1.5, 1.5, 2.0]),
            r"disc must be 4 numbers",
        ),
        (
            (good, affines, [0], batch, "NCHW", size, size, 0, "bilinear", True, True, None,
             [1.5, 1.5, 0.0, 2.0]),
            r"disc must have a finite centre and finite positive radii",
        ),
    ]


@pytest.mark.parametrize("case", range(len(_stats_error_cases())))
def test_stats_errors_name_the_argument(case):
    args, message = _stats_error_cases()[case]
    with pytest.raises((RuntimeError, ValueError), match=message):
        torch.ops.equifast.equivariance_stats(*args)


# --------------------------------------------------------------------------------------------
# transform_images


def image_affines(elements, height, width) -> tuple[torch.Tensor, list[int]]:
    """(E, 2, 3) source maps (identity first) and protocol codes, as the engine builds them."""
    everything = [groups.IDENTITY] + list(elements)
    matrices = np.stack([groups.invert_affine(e.matrix(height, width)) for e in everything])
    return torch.from_numpy(matrices), [groups.PROTOCOL_CODES[e.protocol] for e in everything]


def transform_op(
    src,
    affines,
    protocols,
    margin,
    size,
    mean=MEAN,
    std=STD,
    out_dtype=torch.float32,
    channels_last=False,
):
    args = (
        affines,
        protocols,
        margin[0],
        margin[1],
        size[0],
        size[1],
        mean,
        std,
        out_dtype,
        channels_last,
    )
    got = torch.ops.equifast.transform_images(src, *args)
    want = R.transform_images(src.cpu(), *args)
    return got, want


def assert_images_close(got: torch.Tensor, want: torch.Tensor, out_dtype) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == out_dtype
    on_cpu = got.device.type == "cpu"
    got = got.cpu()
    assert torch.isfinite(got).all()
    # Against the float64 reference, rounded once to the output dtype: the CPU kernel normalizes
    # and sums bilinear taps in float64 and rounds once too (one unit in the last place); the
    # CUDA kernel sums in float32 (a few units).
    eps = torch.finfo(out_dtype).eps
    scale = want.double().abs().clamp(min=1.0)
    tolerance = 1e-12 if out_dtype == torch.float64 else (1 if on_cpu else 4) * eps
    diff = (got.double() - want.double()).abs()
    assert bool((diff <= tolerance * scale).all()), f"max difference {diff.max().item()}"


def source_images(dtype, device, batch, height, width, sliced=False) -> torch.Tensor:
    src = torch.randint(0, 256, (batch, 3, height, width + (3 if sliced else 0)), dtype=torch.uint8)
    if dtype != torch.uint8:
        src = (src.double() / 255).to(dtype)
    if sliced:  # a non-contiguous view
        src = src[..., 1 : width + 1]
    return src.to(device)


@pytest.mark.parametrize(
    "src_dtype", [torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16]
)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_transform_dtypes_and_formats(device, src_dtype, out_dtype, channels_last):
    size, margin = 9, (3, 4)
    elements = mixed_elements(size)
    affines, protocols = image_affines(elements, size, size)
    src = source_images(
        src_dtype, device, 2, size + 2 * margin[0], size + 2 * margin[1], sliced=True
    )
    got, want = transform_op(
        src,
        affines,
        protocols,
        margin,
        (size, size),
        out_dtype=out_dtype,
        channels_last=channels_last,
    )
    assert got.device.type == device
    assert got.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    assert_images_close(got, want, out_dtype)


@pytest.mark.parametrize("height,width", [(8, 8), (7, 9), (1, 5)])
@pytest.mark.parametrize("protocol", ["crop", "circular", "zero"])
def test_transform_integer_maps_are_exact(device, height, width, protocol):
    # uint8 sources under integer maps: bit for bit the reference (one table lookup per pixel).
    elements = groups.Translation([(1, 2), (-3, 1), (0, -4)], protocol=protocol).elements
    if height == width:
        elements += groups.Rotation([90, 180, 270], protocol=protocol).elements
    elements += groups.Flip(["horizontal", "vertical"]).elements
    affines, protocols = image_affines(elements, height, width)
    margin = (3, 4)
    src = source_images(torch.uint8, device, 3, height + 6, width + 8)
    got, want = transform_op(src, affines, protocols, margin, (height, width))
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("height,width", [(16, 16), (17, 17), (23, 23), (16, 24), (21, 13)])
@pytest.mark.parametrize("src_layout", ["contiguous", "sliced", "channels_last"])
@pytest.mark.parametrize("protocol", ["crop", "circular", "zero"])
def test_transform_quarter_turns_and_flips_are_exact(device, height, width, src_layout, protocol):
    # The CPU kernel reads a quarter turn eight output rows at a time, as eight neighbouring
    # source columns transposed in registers, and reverses flipped rows eight bytes at a time;
    # sizes that are and are not multiples of eight leave partial blocks and column tails, the
    # crop margin keeps the turns of non-square images inside the source (whole rows valid), a
    # channels-last source takes the byte-by-byte path, and both output formats are written.
    elements = groups.Rotation([90, 180, 270], protocol=protocol).elements
    elements += groups.Flip(["horizontal", "vertical"]).elements
    affines, protocols = image_affines(elements, height, width)
    margin = (6, 6)
    sliced = src_layout == "sliced"
    src = source_images(torch.uint8, device, 2, height + 12, width + 12, sliced=sliced)
    if src_layout == "channels_last":
        src = src.contiguous(memory_format=torch.channels_last)
    for channels_last in (False, True):
        got, want = transform_op(
            src, affines, protocols, margin, (height, width), channels_last=channels_last
        )
        assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("stream_bytes", ["0", "1048576", "", None])
def test_transform_large_output_streams_rows(device, monkeypatch, stream_bytes):
    # Outputs of at least EQUIFAST_STREAM_BYTES (default: the size of the last-level cache) are
    # written with non-temporal stores on the CPU, through a staged row: an odd width leaves rows
    # unaligned, so the copy's head and tail run too. "0" streams every output, 1 MiB this one
    # (about 2.5 MB), "" and unset leave it to the cache size. Integer maps stay bit for bit; a
    # rotation by 10 degrees goes through the bilinear rows.
    if stream_bytes is None:
        monkeypatch.delenv("EQUIFAST_STREAM_BYTES", raising=False)
    else:
        monkeypatch.setenv("EQUIFAST_STREAM_BYTES", stream_bytes)
    size, margin = (97, 131), (2, 3)
    elements = groups.Translation([(1, -2), (-3, 0)]).elements + groups.Flip("vertical").elements
    elements += groups.Rotation([10]).elements
    affines, protocols = image_affines(elements, *size)
    src = source_images(torch.uint8, device, 3, size[0] + 4, size[1] + 6)
    out_bytes = len(protocols) * 3 * 3 * size[0] * size[1] * 4
    assert out_bytes > 1 << 21
    got, want = transform_op(src, affines, protocols, margin, size)
    exact = 4 * 3  # the identity, two translations and the flip, 3 images each
    assert torch.equal(got[:exact].cpu(), want[:exact])
    assert_images_close(got, want, torch.float32)


@pytest.mark.parametrize("value", ["-1", "32MB", "1e6", "99999999999999999999"])
def test_transform_stream_bytes_must_be_bytes(monkeypatch, value):
    monkeypatch.setenv("EQUIFAST_STREAM_BYTES", value)
    src = source_images(torch.uint8, torch.device("cpu"), 1, 8, 8)
    affines, protocols = image_affines(groups.Rotation([90]).elements, 8, 8)
    expected = f"EQUIFAST_STREAM_BYTES must be a number of bytes .* but got '{value}'"
    with pytest.raises(RuntimeError, match=expected):
        transform_op(src, affines, protocols, (0, 0), (8, 8))


@pytest.mark.parametrize("isa", ["default", "avx2", "best"])
@pytest.mark.parametrize("width", [8, 13, 24, 31])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_transform_paired_bilinear_rows(device, monkeypatch, isa, width, out_dtype, channels_last):
    # Bilinear rows whose taps pair up (x1 the byte after x0) in a uint8 source. The AVX-512 copy
    # reads eight pixels at a time and leaves the tail (widths that are not multiples of eight)
    # to the scalar loop: through 16-byte windows of at most four source rows and a byte
    # permutation where the rows are near horizontal and the processor has VBMI (shifts, small
    # rotations), else by gathering each pair as a 32-bit word (steep rows: the turns by 50 and
    # -75 degrees, which the margin of 16 keeps inside the source). The other copies copy the
    # pairs first. Both read bytes beyond the taps, so a row whose last pair ends the source
    # (the half-pixel shift with a margin of one, last image and channel) takes the scalar loop.
    # Pixels outside the source (the turns under a margin of 0, as the engine crops rotations)
    # read their inside neighbours' taps at a weight of 0, so that their rows pair up too.
    # Two source maps that shrink by about 2 (custom maps, slightly turned) put a window's last
    # pair at its bytes 14 and 15, and just past them, where the row must gather instead.
    # Every output dtype and format, against the reference.
    if isa != "best":
        monkeypatch.setenv("EQUIFAST_CPU_ISA", isa)
    height = 9
    elements = groups.Translation([(-0.5, -0.5), (0.25, 0.75)]).elements
    elements += groups.Rotation([7, -12, 50, -75]).elements
    elements += groups.Rotation([20], protocol="zero").elements
    affines, protocols = image_affines(elements, height, width)
    shrinks = []
    for scale, turn in ((2.05, 0.03), (2.15, -0.02)):
        c, s = scale * np.cos(turn), scale * np.sin(turn)
        shrinks.append([[c, -s, 0.3], [s, c, 0.45]])
    affines = torch.cat([affines, torch.tensor(shrinks, dtype=affines.dtype)])
    protocols = protocols + [groups.PROTOCOL_CODES["crop"]] * len(shrinks)
    for margin in ((0, 0), (1, 1), (3, 4), (16, 16)):
        src = source_images(torch.uint8, device, 2, height + 2 * margin[0], width + 2 * margin[1])
        got, want = transform_op(
            src,
            affines,
            protocols,
            margin,
            (height, width),
            out_dtype=out_dtype,
            channels_last=channels_last,
        )
        assert_images_close(got, want, out_dtype)


@pytest.mark.parametrize("threads", [1, 2])
def test_transform_rows_of_any_kind_follow_each_other(device, threads):
    # The CPU kernel builds each row's sampling plan in a slot it reuses for the next task's
    # rows, which may be of another element and kind: bilinear rows whose taps pair up (a
    # rotation by 30 degrees) before integer rows that gather (a shift under the zero protocol,
    # a circular shift that wraps). Nothing of the bilinear plan may leak into the next rows.
    # Integer maps stay bit for bit the reference, in any order and on any number of threads.
    size, margin = (16, 16), (4, 4)
    shifts = groups.Translation([(0, 3), (2, -1)], protocol="zero").elements
    shifts += groups.Translation([(2, -3)], protocol="circular").elements
    turns = groups.Rotation([30, -45]).elements
    src = source_images(torch.uint8, device, 2, size[0] + 8, size[1] + 8)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for elements in (turns + shifts, shifts[:1] + turns + shifts[1:]):
            affines, protocols = image_affines(elements, *size)
            got, want = transform_op(src, affines, protocols, margin, size)
            assert_images_close(got, want, torch.float32)
            for i, element in enumerate(elements):
                if element in shifts:  # block i + 1 (the identity is first)
                    block = slice(2 * (i + 1), 2 * (i + 2))
                    assert torch.equal(got[block].cpu(), want[block]), element.name
    finally:
        torch.set_num_threads(previous)


def test_transform_circular_shift_is_roll(device):
    height, width, margin = 6, 7, (2, 2)
    elements = groups.Translation([(2, -3)], protocol="circular").elements
    affines, protocols = image_affines(elements, height, width)
    src = source_images(torch.uint8, device, 2, height + 4, width + 4)
    got, _ = transform_op(src, affines, protocols, margin, (height, width), mean=None, std=None)
    window = src[:, :, 2 : 2 + height, 2 : 2 + width].cpu().float() / 255
    assert torch.equal(got[:2].cpu(), window)
    assert torch.equal(got[2:].cpu(), torch.roll(window, (2, -3), dims=(-2, -1)))


def test_transform_no_normalization_and_batch_one(device):
    size = 5
    elements = groups.Rotation([90, 45]).elements
    affines, protocols = image_affines(elements, size, size)
    src = source_images(torch.float32, device, 1, size, size)
    got, want = transform_op(src, affines, protocols, (0, 0), (size, size), mean=None, std=None)
    assert_images_close(got, want, torch.float32)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    height=st.integers(1, 10),
    width=st.integers(1, 26),  # past 8 and 16: the vector loops and their tails
    batch=st.integers(1, 3),
    margin=st.tuples(st.integers(0, 8), st.integers(0, 8)),
    shifts=st.lists(st.tuples(st.integers(-6, 6), st.integers(-6, 6)), min_size=1, max_size=3),
    angle=st.floats(-180, 180, allow_nan=False),
    fraction=st.floats(-2, 2, allow_nan=False),
    protocol=st.sampled_from(["crop", "circular", "zero"]),
    src_dtype=st.sampled_from([torch.uint8, torch.float32]),
    channels_last=st.booleans(),
    bilinear_first=st.booleans(),
)
def test_transform_hypothesis(
    device,
    height,
    width,
    batch,
    margin,
    shifts,
    angle,
    fraction,
    protocol,
    src_dtype,
    channels_last,
    bilinear_first,
):
    shifts = list(dict.fromkeys(shifts))  # Translation wants distinct shifts
    elements = (
        groups.Translation(shifts, protocol=protocol).elements
        + [groups.Element("rot", groups._rotation_matrix(angle), protocol=protocol)]
        + [groups.Element("frac", groups._translation_matrix(fraction, 0.5), protocol=protocol)]
    )
    elements = list({e.name: e for e in elements}.values())
    if bilinear_first:  # rows of every kind after bilinear ones (the CPU kernel reuses plans)
        elements.reverse()
    affines, protocols = image_affines(elements, height, width)
    src = source_images(src_dtype, device, batch, height + 2 * margin[0] + 1, width + 2 * margin[1])
    got, want = transform_op(
        src, affines, protocols, margin, (height, width), channels_last=channels_last
    )
    assert_images_close(got, want, torch.float32)


def transform_sample_args(device):
    size = 6
    elements = groups.Translation([(1, 0)]).elements + groups.Rotation([30]).elements
    affines, protocols = image_affines(elements, size, size)
    src = source_images(torch.uint8, device, 2, size + 2, size + 2)
    return [
        (src, affines, protocols, 1, 1, size, size, MEAN, STD, torch.float32, False),
        (src.float() / 255, affines, [0, 1, 2], 1, 1, size, size, None, None, torch.float16, True),
    ]


def test_transform_opcheck(device):
    for args in transform_sample_args(device):
        torch.library.opcheck(torch.ops.equifast.transform_images.default, args)


def _transform_error_cases():
    size = 4
    affines, protocols = image_affines(groups.Translation([(1, 0)]).elements, size, size)
    src = torch.randint(0, 256, (2, 3, size + 2, size + 2), dtype=torch.uint8)
    base = (src, affines, protocols, 1, 1, size, size, MEAN, STD, torch.float32, False)

    def with_(index, value):
        args = list(base)
        args[index] = value
        return tuple(args)

    return [
        (with_(0, src[0]), r"src must be a 4-D tensor"),
        (with_(0, src[:, :2]), r"src.size\(1\) \(RGB channels\) must be 3"),
        (with_(0, src.int()), r"src must have one of the dtypes"),
        (with_(1, affines.float()), r"source_affines must have dtype Double"),
        (with_(1, affines[:, :, :2]), r"source_affines must have shape \(E, 2, 3\)"),
        (with_(2, [0]), r"protocols must have 2 entries"),
        (with_(2, [0, 7]), r"protocols\[1\] must be 0 \(crop\), 1 \(circular\) or 2 \(zero\)"),
        (with_(3, 3), r"identity window .* does not fit"),
        (with_(4, -1), r"margin_x must be >= 0"),
        (with_(5, 0), r"out_h must be > 0"),
        (with_(7, [0.5, 0.5]), r"mean must have 3 entries"),
        (with_(8, None), r"mean and std must be given together"),
        (with_(8, [1.0, 0.0, 1.0]), r"std\[1\] must be finite and non-zero"),
        (with_(9, torch.int32), r"out_dtype must be one of"),
    ]


@pytest.mark.parametrize("case", range(len(_transform_error_cases())))
def test_transform_errors_name_the_argument(case):
    args, message = _transform_error_cases()[case]
    with pytest.raises((RuntimeError, ValueError), match=message):
        torch.ops.equifast.transform_images(*args)
