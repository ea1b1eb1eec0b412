"""``equifast.measure`` against an independent implementation of the measure.

The oracle is ``independent_reference.py`` beside this file: float64, written from DESIGN.md
section 1 alone, blind to equifast's code, importing none of it (its docstring lists the
conventions it settles). The naive loop and the reference ops check the engine from the reading of
the specification that ``groups.py`` embodies; this one checks that reading. Here equifast is used
only through its public API (``measure``, the groups, ``Result.frame``), on a small float64 CNN
with strides 1, 2, 4 and 8, with grid offsets given (``align="auto"``, a gradient probe, is not
part of what the reference computes).

Every row of equifast's frame must have a partner in the reference's and the other way round (no
row dropped on either side), with the same value to 1e-9 (NaN in the same places), the same
``exact`` flag and the same stride and grid offset.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import independent_reference as reference
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import equifast

TOLERANCE = 1e-9
IMAGES = 4
LAYERS = ["1", "3", "4", "6"]  # strides 1, 2, 4, 8
KEYS = ["layer", "element", "comparison", "metric"]
GEOMETRY = ["stride_y", "stride_x", "offset_y", "offset_x"]

# The grid offsets: the centred grid, one number for every layer, and per layer numbers and
# (y, x) pairs that are neither centred nor equal on both axes, so that an axis mixed up shows.
ALIGNS = {
    "center": "center",
    "number": 0.0,
    "per-layer": {"1": 0.0, "3": 0.5, "4": (1.0, 2.0), "6": (3.5, 1.0)},
}


@dataclass(frozen=True)
class Case:
    """One group, as equifast builds it and as the reference spells it out."""

    group: Callable[[], equifast.Group]
    elements: list[reference.Element]
    input_size: tuple[int, int]
    margin: tuple[int, int] = (0, 0)


def translations(shifts: list[tuple[int, int]], protocol: str = "crop") -> list:
    return [(f"translate({dy},{dx})", reference.translation(dy, dx), protocol) for dy, dx in shifts]


def rotations(angles: list[int], input_size: tuple[int, int]) -> list:
    return [
        (f"rotate({angle})", reference.rotation(angle, *input_size), "crop") for angle in angles
    ]


def flips(axes: list[str], input_size: tuple[int, int]) -> list:
    return [(f"flip({axis})", reference.flip(axis, *input_size), "crop") for axis in axes]


def translations_after_vertical_flip(
    shifts: list[tuple[int, int]], input_size: tuple[int, int]
) -> list:
    vertical = reference.flip("vertical", *input_size)
    return [
        (
            f"translate({dy},{dx})*flip(vertical)",
            reference.compose(reference.translation(dy, dx), vertical),
            "crop",
        )
        for dy, dx in shifts
    ]


SQUARE = (40, 40)
WIDE = (40, 48)  # 5 x 6 cells at stride 8
# Shifts by 2, 3, 5 and 6 pixels are not multiples of every stride (bilinear re-alignment there);
# (8, -8) is a multiple of all of them (exact everywhere).
CROP_SHIFTS = [(0, 2), (3, 5), (-6, 8), (8, -8)]
SHIFTS = [(0, 2), (3, 5)]
PRODUCT_SHIFTS = [(0, 3), (5, 0)]
OUT_OF_VIEW_SHIFTS = [(0, 2), (0, 40)]
OUT_OF_VIEW_NAMES = {"translate(0,40)"}  # equifast names such an element in a warning

CASES = {
    "translate-crop": Case(
        lambda: equifast.Translation(CROP_SHIFTS), translations(CROP_SHIFTS), SQUARE, (8, 8)
    ),
    "translate-circular": Case(
        lambda: equifast.Translation(SHIFTS, protocol="circular"),
        translations(SHIFTS, "circular"),
        SQUARE,
    ),
    "translate-zero": Case(
        lambda: equifast.Translation(SHIFTS, protocol="zero"), translations(SHIFTS, "zero"), SQUARE
    ),
    # A shift by the whole width leaves no valid position anywhere: NaN on both sides.
    "translate-zero-out-of-view": Case(
        lambda: equifast.Translation(OUT_OF_VIEW_SHIFTS, protocol="zero"),
        translations(OUT_OF_VIEW_SHIFTS, "zero"),
        SQUARE,
    ),
    "rotate-30-90": Case(lambda: equifast.Rotation([30, 90]), rotations([30, 90], SQUARE), SQUARE),
    "flips": Case(
        lambda: equifast.Flip(["horizontal", "vertical"]),
        flips(["horizontal", "vertical"], SQUARE),
        SQUARE,
    ),
    # Not square: the centre's coordinates differ between the axes, so a height and width swapped
    # anywhere show.
    "wide-flips-rotate-180": Case(
        lambda: equifast.Flip(["horizontal", "vertical"]) + equifast.Rotation([180]),
        flips(["horizontal", "vertical"], WIDE) + rotations([180], WIDE),
        WIDE,
    ),
    # A product: the factors' elements and their compositions (the shift acts after the flip).
    "wide-translate-times-flip": Case(
        lambda: equifast.Translation(PRODUCT_SHIFTS) * equifast.Flip("vertical"),
        translations(PRODUCT_SHIFTS)
        + flips(["vertical"], WIDE)
        + translations_after_vertical_flip(PRODUCT_SHIFTS, WIDE),
        WIDE,
        (5, 3),
    ),
}


def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),  # "1": stride 1
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),  # "3": stride 2
        nn.AvgPool2d(2, stride=2),  # "4": stride 4
        nn.Conv2d(16, 16, 5, stride=2, padding=2),
        nn.ReLU(),  # "6": stride 8
    )
    # Biases of a visible size give channels offsets of their own, which the channel-centred
    # scores must remove and cosine and nde must not.
    with torch.no_grad():
        for module in model:
            if isinstance(module, nn.Conv2d):
                module.bias.normal_(0, 0.3)
    return model.double().eval()


def check_frames_agree(frame: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert not frame.duplicated(KEYS).any() and not expected.duplicated(KEYS).any()
    merged = frame[KEYS + ["value", "exact"] + GEOMETRY].merge(
        expected, on=KEYS, how="outer", suffixes=("", "_reference"), indicator=True
    )
    unmatched = merged[merged["_merge"] != "both"]
    assert unmatched.empty, (
        "rows without a partner (left_only: equifast's, right_only: the reference's):\n"
        + unmatched[KEYS + ["_merge"]].to_string()
    )

    got, want = merged["value"].to_numpy(float), merged["value_reference"].to_numpy(float)
    nan_got, nan_want = np.isnan(got), np.isnan(want)
    difference = np.abs(np.where(nan_got | nan_want, 0.0, got - want))
    bad = (nan_got != nan_want) | (difference > TOLERANCE)
    merged["difference"] = difference
    assert not bad.any(), (
        f"{int(bad.sum())} of {len(merged)} values differ by more than {TOLERANCE} "
        f"(largest {difference.max():.3g}):\n"
        + merged.loc[bad, KEYS + ["value", "value_reference", "difference"]].head(20).to_string()
    )

    exact_differs = merged["exact"].astype(bool) != merged["exact_reference"].astype(bool)
    assert not exact_differs.any(), merged.loc[exact_differs, KEYS + ["exact", "exact_reference"]]
    for column in GEOMETRY:
        differs = ~np.isclose(merged[column], merged[column + "_reference"], rtol=0, atol=1e-12)
        assert not differs.any(), merged.loc[differs, KEYS + [column, column + "_reference"]]


@pytest.mark.parametrize("align_name", list(ALIGNS))
@pytest.mark.parametrize("case_name", list(CASES))
def test_measure_matches_independent_reference(case_name: str, align_name: str):
    case, align = CASES[case_name], ALIGNS[align_name]
    height, width = case.input_size
    margin_y, margin_x = case.margin
    model = small_cnn()
    generator = torch.Generator().manual_seed(1)
    # Float images are taken as already normalized, so the zero protocol fills with 0; + 0.5 moves
    # their mean off 0, so that the fill differs from the content it replaces.
    shape = (IMAGES, 3, height + 2 * margin_y, width + 2 * margin_x)
    sources = 0.5 + torch.randn(shape, dtype=torch.float64, generator=generator)
    undefined = [name for name, _, _ in case.elements if name in OUT_OF_VIEW_NAMES]
    named = (pytest.warns(UserWarning, match=rf"group elements \['{re.escape(undefined[0])}'\]")
             if undefined else contextlib.nullcontext())
    with named:
        result = equifast.measure(
            model,
            sources,
            group=case.group(),
            layers=LAYERS,
            metrics=list(reference.METRICS),
            batch_size=IMAGES,
            align=align,
            bootstrap=0,
            progress=False,
            dtype=torch.float64,
        )
    expected = reference.measure(
        model, sources, case.elements, LAYERS, case.input_size, case.margin, align
    )
    check_frames_agree(result.frame, pd.DataFrame(expected))


# ------------------------------------------------------------------------------------------------
# The oracle itself


def test_reference_transforms_agree_with_torch():
    # The reference's conventions against torch's own ops, which need no reading of the spec:
    # a translation rolls like torch.roll, 90 degrees counter-clockwise is torch.rot90, the flips
    # are torch.flip, and a crop-protocol shift reads the source window moved the other way.
    images = torch.rand(2, 3, 6, 8, dtype=torch.float64)
    size = (6, 8)

    def transform(affine, protocol="circular", margin=(0, 0), input_size=size, sources=images):
        return reference.transform_images(sources, affine, protocol, margin, input_size)

    assert torch.equal(
        transform(reference.translation(1, -2)), torch.roll(images, (1, -2), dims=(-2, -1))
    )
    assert torch.equal(transform(reference.flip("horizontal", *size)), images.flip(-1))
    assert torch.equal(transform(reference.flip("vertical", *size)), images.flip(-2))
    assert torch.equal(transform(reference.rotation(180, *size)), images.flip(-2, -1))
    square = images[..., :6]
    assert torch.equal(
        transform(reference.rotation(90, 6, 6), input_size=(6, 6), sources=square),
        torch.rot90(square, 1, dims=(-2, -1)),
    )
    sources = torch.rand(1, 3, 10, 10, dtype=torch.float64)
    shifted = transform(reference.translation(1, -2), "crop", (2, 2), (6, 6), sources)
    assert torch.equal(shifted, sources[:, :, 1:7, 4:10])


def test_reference_imports_no_equifast():
    tree = ast.parse(inspect.getsource(reference))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not any(name.startswith((".", "equifast")) for name in imported), imported
