"""The tolerance check of equivariance_stats outputs, shared by the kernel tests.

``test_kernels.py`` compares the CPU and CUDA kernels with the float64 reference, and
``test_cuda_emulation.py`` the emulated CUDA kernel with the reference and the CPU kernel: both
judge ``(3, K, B, C, 6)`` statistics with this one rule.
"""

from __future__ import annotations

import torch

FIELDS = ("count", "mean_a", "mean_b", "m2_a", "m2_b", "c_ab")


def assert_stats_close(
    got: torch.Tensor, want: torch.Tensor, rtol: float = 2e-5, what: str = "kernel"
) -> None:
    """Compare (3, K, B, C, 6) statistics with tolerances on each field's natural scale.

    Means are compared on the scale of their values, sums of squares relatively, co-moments
    relative to sqrt(m2_a * m2_b) (an exact zero co-moment cannot be matched relatively by
    float32 arithmetic). A kernel value (say a bilinear interpolation in float32) may be off by
    about rtol * |value|; in a sum of squares that moves by up to 2 * error * sqrt(n * m2), which
    matters when the spread is tiny next to the values: that term is allowed too. Counts must be
    equal. ``what`` names the comparison in the failure message.
    """
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert got.dtype == torch.float64
    got = got.detach().cpu().double()
    want = want.double()
    assert torch.isfinite(got).all(), f"{what}: non-finite statistics"
    count, mean_a, mean_b, m2_a, m2_b, c_ab = want.unbind(-1)
    if not torch.equal(got[..., 0], count):
        index = tuple(int(i) for i in (got[..., 0] != count).nonzero()[0])
        raise AssertionError(
            f"{what}: counts differ at {index}: got {got[index].tolist()}, "
            f"expected {want[index].tolist()}"
        )
    safe = count.clamp(min=1)
    error_a = rtol * (mean_a.abs() + (m2_a / safe).sqrt())  # error of one value of a
    error_b = rtol * (mean_b.abs() + (m2_b / safe).sqrt())
    tiny = 1e-30
    checks = {
        "mean_a": (got[..., 1] - mean_a).abs() <= error_a + tiny,
        "mean_b": (got[..., 2] - mean_b).abs() <= error_b + tiny,
        "m2_a": (got[..., 3] - m2_a).abs()
        <= rtol * m2_a + 2 * error_a * (count * m2_a).sqrt() + tiny,
        "m2_b": (got[..., 4] - m2_b).abs()
        <= rtol * m2_b + 2 * error_b * (count * m2_b).sqrt() + tiny,
        "c_ab": (got[..., 5] - c_ab).abs()
        <= rtol * (m2_a * m2_b).sqrt()
        + error_a * (count * m2_b).sqrt()
        + error_b * (count * m2_a).sqrt()
        + tiny,
    }
    for name, ok in checks.items():
        if not bool(ok.all()):
            index = tuple(int(i) for i in (~ok).nonzero()[0])
            field = FIELDS.index(name)
            raise AssertionError(
                f"{what}: {name} differs at (comparison, k, b, c) = {index}: got "
                f"{got[index][field].item()!r}, expected {want[index][field].item()!r} "
                f"(rows: got {got[index].tolist()}, expected {want[index].tolist()})"
            )
