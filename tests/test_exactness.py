"""Exactness properties of the measure that need no oracle (DESIGN.md section 7)."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import equifast
from equifast import Rotation, Translation


def _rows(result, metric="corr", comparison="eq"):
    frame = result.frame
    return frame[(frame.metric == metric) & (frame.comparison == comparison)
                 & (frame.element != "mean")]


def _circular_net(strides=(1, 1, 1)):
    layers, channels = [], 3
    for stride in strides:
        layers += [nn.Conv2d(channels, 8, 3, stride=stride, padding=1, padding_mode="circular"),
                   nn.ReLU()]
        channels = 8
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("force_reference", [True, False])
def test_circular_stride1_net_is_exactly_equivariant(force_reference):
    net = _circular_net()
    images = torch.rand(4, 3, 15, 12)
    group = Translation([(0, 1), (3, 0), (-2, 5), (7, -4)], protocol="circular")
    result = equifast.measure(net, images, group=group, layers=["0", "1", "3", "5"],
                              progress=False, bootstrap=0, force_reference=force_reference)
    eq = _rows(result)
    assert len(eq) == 4 * 4 and eq.exact.all()
    np.testing.assert_allclose(eq.value, 1.0, atol=1e-5)
    # Invariance is far from 1 for a translation of noise: the check could fail.
    assert _rows(result, comparison="inv").value.max() < 0.9


def test_strided_net_exact_for_shifts_divisible_by_stride():
    net = _circular_net(strides=(2, 2, 1))
    images = torch.rand(3, 3, 16, 16)
    group = Translation([(0, 4), (8, 0), (4, -4), (0, 2)], protocol="circular")
    result = equifast.measure(net, images, group=group, layers=["1", "3", "5"], progress=False,
                              bootstrap=0)
    eq = _rows(result)
    divisible = eq[eq.element != "translate(0,2)"]
    np.testing.assert_allclose(divisible.value, 1.0, atol=1e-5)
    assert divisible.exact.all()
    by_two = eq[eq.element == "translate(0,2)"].set_index("layer")
    assert by_two.loc["1", "exact"] and abs(by_two.loc["1", "value"] - 1) < 1e-5  # stride 2
    assert not by_two.loc["3", "exact"]  # stride 4: half a feature pixel, bilinear
    assert by_two.loc["3", "value"] < 0.999
    assert set(result.frame.stride.dropna()) == {2.0, 4.0}


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_unpadded_net_exact_for_shifts_divisible_by_its_stride(implementation):
    """Valid (unpadded) convolutions lose a border: 48 px give a 5 x 5 map at stride 8 (9.6 px per
    cell). Features at positions both views cover come from the same pixels, so shifts by
    multiples of the true stride score exactly 1 there; a stride read off the one size would
    re-align by a fraction of a cell."""
    from equifast import naive

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
    ).eval()
    images = torch.rand(3, 3, 48 + 2 * 16, 48 + 2 * 16)
    group = Translation([(0, 8), (16, 0), (-8, 8)])
    measure = equifast.measure if implementation == "engine" else naive.measure
    result = measure(net, images, group=group, layers=["1", "3", "5"], input_size=(48, 48),
                     progress=False, bootstrap=0)
    eq = _rows(result)
    assert eq.exact.all() and len(eq) == 3 * 3
    np.testing.assert_allclose(eq.value, 1.0, atol=1e-5)
    strides = result.frame.drop_duplicates("layer").set_index("layer").stride
    assert strides.to_dict() == {"1": 2.0, "3": 4.0, "5": 8.0}


def _symmetrize(conv: nn.Conv2d) -> None:
    with torch.no_grad():
        weight = conv.weight
        conv.weight.copy_(sum(torch.rot90(weight, k, dims=(-2, -1)) for k in range(4)) / 4)


@pytest.mark.parametrize("align", ["auto", "corner"])
def test_rotation_symmetric_filters_are_rotation_equivariant(align):
    net = nn.Sequential(nn.Conv2d(3, 6, 5, padding=2), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                        nn.Tanh()).eval()
    _symmetrize(net[0])
    _symmetrize(net[2])
    images = torch.rand(4, 3, 13, 13)
    result = equifast.measure(net, images, group=Rotation([90, 180, 270]), layers=["1", "3"],
                              align=align, progress=False, bootstrap=0)
    eq = _rows(result)
    assert eq.exact.all()
    np.testing.assert_allclose(eq.value, 1.0, atol=1e-5)
    # Unsymmetrized filters are not: the test can fail.
    plain = nn.Sequential(nn.Conv2d(3, 6, 5, padding=2)).eval()
    other = equifast.measure(plain, images, group=Rotation([90]), layers=["0"], progress=False,
                             bootstrap=0)
    assert _rows(other).value.max() < 0.99


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_patch_embedding_is_exact_for_shifts_by_its_patch(implementation):
    """A ViT's patch embedding (no class token yet, though the model has one) is a stride-16
    convolution: shifts by 16 and 32 pixels along either axis score exactly 1 (before, its 196
    tokens were read as 1 + 13 x 15 and one axis scored about 0)."""
    import timm

    from equifast import naive

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1).eval()
    measure = equifast.measure if implementation == "engine" else naive.measure
    result = measure(model, torch.rand(2, 3, 224 + 64, 224 + 64),
                     group=Translation([(0, 16), (16, 0), (32, 32)]), layers=["patch_embed"],
                     progress=False, bootstrap=0)
    eq = _rows(result)
    assert len(eq) == 3 and eq.exact.all()
    np.testing.assert_allclose(eq.value, 1.0, atol=1e-5)


def test_mlp_on_pixels_scores_near_chance():
    torch.manual_seed(1)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 12 * 12, 256), nn.ReLU(),
                        nn.Linear(256, 64)).eval()
    images = torch.rand(48, 3, 20, 20)
    result = equifast.measure(mlp, images, group=Translation([4]), layers=["2", "3"],
                              batch_size=16, progress=False, bootstrap=200)
    frame = result.frame[(result.frame.metric == "corr") & (result.frame.element == "mean")]
    assert set(frame.kind) == {"vector"}
    eq = frame[frame.comparison == "eq"].set_index("layer").value
    chance = frame[frame.comparison == "chance"].set_index("layer").value
    inv = frame[frame.comparison == "inv"].set_index("layer").value
    np.testing.assert_allclose(eq, inv)  # vectors: equivariance and invariance coincide
    np.testing.assert_allclose(eq, chance, atol=0.05)
    normalized = result.frame[(result.frame.metric == "corr_vs_chance")
                              & (result.frame.element == "mean")]
    assert normalized.value.abs().max() < 0.2


def test_result_roundtrip_and_summary(tmp_path):
    net = _circular_net()
    images = torch.rand(4, 3, 10, 10)
    result = equifast.measure(net, images, group=Translation([1], protocol="circular"),
                              progress=False, bootstrap=50)
    summary = result.summary()
    assert list(summary.layer) == [str(i) for i in range(6)]
    assert {"eq", "eq_lo", "eq_hi", "inv", "chance", "flat_frac", "n"} <= set(summary.columns)
    for suffix in (".parquet", ".csv"):
        path = result.save(tmp_path / f"r{suffix}")
        loaded = equifast.Result.load(path)
        assert loaded.config["model"] == result.config["model"]
        np.testing.assert_allclose(loaded.frame.value.to_numpy(dtype=float),
                                   result.frame.value.to_numpy(dtype=float))
    assert "eq corr" in result.format_summary()
    # scores(): the same table for any metric and element, with summary()'s column names
    scores = result.scores()
    columns = ["eq", "eq_lo", "eq_hi", "inv", "inv_lo", "inv_hi", "chance", "chance_lo",
               "chance_hi"]
    assert list(scores.columns) == ["layer", "depth", *columns]
    pd.testing.assert_frame_equal(scores[["layer", "depth", *columns]],
                                  summary[["layer", "depth", *columns]], check_dtype=False)
    one = result.scores("nde", "translate(0,1)")
    rows = result.frame[(result.frame.metric == "nde") & (result.frame.comparison == "inv")
                        & (result.frame.element == "translate(0,1)")]
    np.testing.assert_allclose(one.inv, rows.value)
    with pytest.raises(ValueError, match=r"metric 'nde2' is not in the result; it holds \['corr'"):
        result.summary("nde2")
    with pytest.raises(ValueError, match=r"element .translate\(9,9\). is not in the result"):
        result.scores(element="translate(9,9)")
    # Without a bootstrap the intervals are NaN, and still there.
    plain = equifast.measure(net, images, group=Translation([1], protocol="circular"),
                             progress=False, bootstrap=0).scores()
    assert list(plain.columns) == ["layer", "depth", *columns] and plain.eq_lo.isna().all()


def test_result_plot_has_a_line_per_comparison():
    net = _circular_net()
    result = equifast.measure(net, torch.rand(3, 3, 10, 10),
                              group=Translation([1], protocol="circular"), progress=False,
                              bootstrap=20)
    figure = result.plot()
    (ax,) = figure.axes
    assert [line.get_label() for line in ax.lines] == ["equivariance", "invariance", "chance"]
    assert all(len(line.get_xdata()) == 6 for line in ax.lines)
    assert ax.get_ylabel() == "corr" and ax.get_xlabel()
