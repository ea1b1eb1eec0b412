"""Lie derivatives (equifast.lie): the generator fields, the image tangents, the forward-mode
Jacobian-vector products, exact zeros where the maps commute, and the result."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torch import nn

import equifast
from equifast import naive
from equifast.groups import Rotation, Translation, invert_affine
from equifast.lie import (
    GENERATORS,
    LIE_COLUMNS,
    check_generators,
    generator_field,
    image_tangents,
    lie_derivative,
)
from equifast.plots import plot_lie_depth


def _run(model, images, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("bootstrap", 0)
    return lie_derivative(model, images, **kwargs)


def _values(result, metric="lee"):
    rows = result.frame[result.frame.metric == metric]
    return {(r.layer, r.generator): r.value for r in rows.itertuples()}


@pytest.mark.parametrize("height,width", [(9, 9), (8, 13)])
def test_generator_fields_follow_the_group_maps(height, width):
    # The field moves a point the way the group's element of a small parameter does.
    rng = np.random.default_rng(0)
    points = np.c_[rng.uniform(0, width, 5), rng.uniform(0, height, 5), np.ones(5)]
    cases = {"translate_x": (Translation([(0, 0.01), (0, -0.01)]), 0.01),
             "translate_y": (Translation([(0.01, 0), (-0.01, 0)]), 0.01),
             "rotate": (Rotation([0.01, -0.01]), math.radians(0.01))}
    for name, (group, step) in cases.items():  # central differences of the group's maps
        ahead, back = (points @ e.matrix(height, width).T for e in group)
        field = points @ generator_field(name, height, width).T
        np.testing.assert_allclose((ahead - back) / (2 * step), field, atol=1e-6)
    # rotations are counter-clockwise on screen (y down): a point right of the centre moves up
    right = np.array([(width - 1) / 2 + 3, (height - 1) / 2, 1.0])
    assert (generator_field("rotate", height, width) @ right)[1] < -2.9
    scale = generator_field("scale", height, width) @ right
    np.testing.assert_allclose(scale, [3, 0], atol=1e-12)


@pytest.mark.parametrize("generator", ["translate_x", "translate_y", "rotate", "scale"])
def test_image_tangents_are_the_derivative_of_the_transformed_image(generator):
    # On a ramp (plus a constant) central differences and bilinear sampling are both exact, so
    # the tangent equals the central difference in t of the images that the naive loop's
    # transform makes, up to the O(t^2) of that difference.
    height, width = 11, 14
    ys, xs = torch.meshgrid(torch.arange(-1.0, height + 1, dtype=torch.float64),
                            torch.arange(-1.0, width + 1, dtype=torch.float64), indexing="ij")
    ramp = torch.stack([0.3 * xs - 0.7 * ys + 2, -0.2 * xs + 0.1 * ys, 0.05 * xs])[None]
    tangent = image_tangents(ramp, [generator])[0]
    step = 1e-3
    field = generator_field(generator, height, width)
    moved = []
    for t in (step, -step):
        forward = np.eye(3)[:2] + t * field
        source = invert_affine(forward)
        moved.append(naive.transform(ramp, source, "crop", (1, 1), (height, width))[0])
    finite = (moved[0] - moved[1]) / (2 * step)
    torch.testing.assert_close(tangent, finite, atol=1e-5, rtol=1e-5)


class _Pointwise(nn.Module):
    """Two 1 x 1 convolutions: a pointwise linear map, which commutes with every move."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 6, 1)
        self.second = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        return self.second(self.first(x))


class _Unpadded(nn.Module):
    """Linear 3 x 3 convolutions without padding or stride: equivariant to translations (the
    grid's cell (i, j) sits at input pixel (i + 1, j + 1), then (i + 2, j + 2)), not to turns."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 5, 3)
        self.second = nn.Conv2d(5, 4, 3)

    def forward(self, x):
        return self.second(self.first(x))


def test_a_pointwise_linear_map_has_no_lie_derivative():
    torch.manual_seed(0)
    result = _run(_Pointwise(), torch.rand(3, 3, 20, 17), generators=GENERATORS,
                  layers=["first", "second"])
    values = _values(result)
    assert len(values) == 2 * len(GENERATORS)
    assert all(abs(v) < 1e-10 for v in values.values()), values
    # ... while the features vary, so lee_rel is defined (and as small)
    relative = _values(result, "lee_rel")
    assert all(abs(v) < 1e-10 for v in relative.values()), relative


class _Crop(nn.Module):
    """Drops 2 cells on every side: cell (i, j) of its output sits at input pixel (i + 2, j + 2)
    behind a 1 x 1 convolution, where the rotation and scale fields must be evaluated."""

    def forward(self, x):
        return x[..., 2:-2, 2:-2]


def test_the_fields_are_taken_where_the_grid_sits():
    torch.manual_seed(0)
    model, images = nn.Sequential(nn.Conv2d(3, 4, 1), _Crop()), torch.rand(2, 3, 17, 21)
    result = _run(model, images, generators=["rotate", "scale"], layers=["1"])
    assert result.config["offsets"] == {"1": [2.0, 2.0]}
    assert all(abs(v) < 1e-10 for v in _values(result, "lee_rel").values())
    misplaced = _run(model, images, generators=["rotate", "scale"], layers=["1"], align=0)
    assert all(v > 1e-3 for v in _values(misplaced, "lee_rel").values())


def test_unpadded_convolutions_are_equivariant_to_translations_only():
    torch.manual_seed(0)
    result = _run(_Unpadded(), torch.rand(3, 3, 20, 17),
                  layers=["first", "second"], generators=GENERATORS)
    assert result.config["offsets"] == {"first": [1.0, 1.0], "second": [2.0, 2.0]}
    relative = _values(result, "lee_rel")
    for layer in ("first", "second"):
        assert relative[layer, "translate_x"] < 1e-10 and relative[layer, "translate_y"] < 1e-10
        assert relative[layer, "rotate"] > 1e-3 and relative[layer, "scale"] > 1e-3


@pytest.mark.parametrize("name", ["convnext_atto", "vit_tiny_patch16_224"])
def test_the_jacobian_vector_product_is_the_derivative_of_the_logits(name):
    # For the logits (a vector: they do not move) the Lie derivative is J v alone: forward-mode
    # differentiation against a central finite difference in float64. The ViT runs its attention
    # through the math backend, whose ops have forward derivatives (the fused ones do not).
    torch.manual_seed(0)
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2} if name.startswith("vit") else {}
    model = timm.create_model(name, num_classes=7, **kwargs).double().eval()
    sources = torch.rand(2, 3, 34, 34, dtype=torch.float64)
    generators = ["translate_x", "rotate"]
    head = "head" if name.startswith("vit") else "head.fc"
    result = _run(model, sources, generators=generators, layers=[head])
    got = _values(result)
    tangents = image_tangents(sources, generators)
    inputs = sources[..., 1:-1, 1:-1]
    step = 1e-5
    with torch.no_grad():
        for k, generator in enumerate(generators):
            v = tangents[2 * k:2 * k + 2]
            finite = (model(inputs + step * v) - model(inputs - step * v)) / (2 * step)
            want = finite.square().mean(1).mean().item()
            assert got[head, generator] == pytest.approx(want, rel=1e-6)
    assert result.config["dtype"] == "float64"


def test_the_result_and_its_summary(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5).eval()
    result = lie_derivative(model, "samples", input_size=(48, 48), limit=3, batch_size=2,
                            bootstrap=50, progress=False)
    frame = result.frame
    assert list(frame.columns) == LIE_COLUMNS
    assert set(frame.generator) == {"translate_x", "translate_y", "rotate"}
    assert set(frame.metric) == {"lee", "lee_rel"}
    assert result.config["images"] == 3 and result.config["input_size"] == [48, 48]
    spatial = frame[frame.grid_h >= 3]
    assert (spatial.n == 3).all() and (spatial.value > 0).all()
    assert (spatial.ci_low <= spatial.value).all() and (spatial.value <= spatial.ci_high).all()
    # a 48 px input leaves layer4 a 2 x 2 grid: no interior cell, NaN with n = 0
    small = frame[frame.grid_h < 3]
    assert set(small.layer) == {"layer4"} and small.value.isna().all() and (small.n == 0).all()
    summary = result.summary()
    assert list(summary.index) == result.config["layers"]
    assert list(summary.columns) == ["translate_x", "translate_y", "rotate"]
    assert "layer1" in result.format_summary("lee")
    with pytest.raises(ValueError, match="metric: expected one of"):
        result.summary("corr")
    for name in ("lie.parquet", "lie.csv"):  # saved and loaded back alike
        loaded = equifast.LieResult.load(result.save(tmp_path / name))
        pd.testing.assert_frame_equal(loaded.frame, frame, check_dtype=False)
        assert loaded.config["layers"] == result.config["layers"]
        pd.testing.assert_frame_equal(loaded.summary(), summary)
    with pytest.raises(ValueError, match="ending in .parquet or .csv"):
        result.save(tmp_path / "lie.json")
    figure = plot_lie_depth(result)
    ax = figure.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["translate_x", "translate_y",
                                                             "rotate"]
    assert ax.get_yscale() == "log" and len(ax.get_xticks()) == 5
    plt.close(figure)


def test_a_half_precision_model_is_differentiated_in_float32_and_left_as_it_was():
    torch.manual_seed(0)
    model = _Unpadded().to(torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = _run(model, torch.rand(2, 3, 14, 14), layers=["second"])
    assert result.config["dtype"] == "float32"
    assert _values(result, "lee_rel")["second", "translate_x"] < 1e-8
    for key, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, before[key])


def test_generators_are_checked():
    assert check_generators("rotate") == ("rotate",)
    with pytest.raises(ValueError, match=r"names among .*'translate_x'.*found \['shear'\]"):
        check_generators(["rotate", "shear"])
    with pytest.raises(ValueError, match="at least one"):
        check_generators([])
    with pytest.raises(ValueError, match="each name once"):
        check_generators(["rotate", "rotate"])
    with pytest.raises(ValueError, match="shear"):
        equifast.lie_derivative(_Pointwise(), torch.rand(1, 3, 8, 8), generators="shear",
                                progress=False)


def test_a_baseline_is_differentiated_on_the_same_images():
    torch.manual_seed(0)
    model = _Unpadded()
    torch.manual_seed(1)
    copy = _Unpadded()
    images = torch.rand(3, 3, 16, 19)
    kwargs = dict(layers=["first", "second"], generators=["translate_x", "rotate"],
                  bootstrap=20)
    result = _run(model, images, baseline=copy, **kwargs)
    alone = _run(copy, images, align=result.config["offsets"], **kwargs)
    frame, other = result.frame, alone.frame
    np.testing.assert_allclose(frame.init, other.value, rtol=1e-12)
    np.testing.assert_allclose(frame.learned, frame.value - frame.init, rtol=1e-9, atol=1e-15)
    assert (frame.learned_lo <= frame.learned).all() and (frame.learned <= frame.learned_hi).all()
    assert "a module given as baseline=" in result.config["baseline"]["how"]
    plain = _run(model, images, **kwargs).frame
    np.testing.assert_array_equal(plain.value, frame.value)  # the copy changes nothing else
    assert plain.init.isna().all() and plain.learned.isna().all()
    with pytest.raises(ValueError, match="the model's architecture"):
        _run(model, images, baseline=_Pointwise(), **kwargs)


def test_a_model_at_its_seeded_initialization_learns_exactly_nothing():
    # A timm model built under torch.manual_seed(seed) is the copy that baseline="init" builds
    # with that seed (timm's own initialization): learned is exactly 0.
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=5).eval()
    result = lie_derivative(model, "samples", input_size=(40, 40), limit=2, batch_size=2,
                            bootstrap=0, progress=False, baseline="init", seed=0,
                            generators=["translate_y"], layers=["layer1", "layer2"])
    frame = result.frame
    assert "timm" in result.config["baseline"]["how"]
    assert (frame.learned == 0).all() and (frame.init == frame.value).all()
    assert (result.summary("lee", "learned") == 0).all().all()
    with pytest.raises(ValueError, match="column: expected"):
        result.summary("lee", "ci_low")


class _FixedSize(nn.Module):
    """A model built for 16 x 16 inputs only (a flattening linear layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)
        self.head = nn.Linear(2 * 16 * 16, 4)

    def forward(self, x):
        return self.head(self.conv(x).flatten(1))


def test_a_model_that_fails_on_its_probe_is_told_what_lie_derivative_can_change():
    with pytest.raises(RuntimeError, match=r"failed on its probe input .*pass input_size=\(H, W\) "
                                           r"\(and sources of that size plus a one-pixel margin\)"
                       ) as error:
        equifast.lie_derivative(_FixedSize().eval(), torch.rand(2, 3, 22, 22), progress=False,
                                layers=["conv"])
    assert "pass dtype" not in str(error.value)  # lie_derivative takes none
    # measure takes a dtype, and says so
    with pytest.raises(RuntimeError, match="if it runs in another dtype, pass dtype="):
        equifast.measure(_FixedSize().eval(), torch.rand(2, 3, 22, 22), group="translate:1",
                         progress=False, layers=["conv"])
