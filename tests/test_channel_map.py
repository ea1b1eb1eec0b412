"""channel_map="match" (DESIGN.md 1.6): each channel against its best-correlated channel."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import equifast
from equifast import naive, ops
from equifast.ops import _reference


def _rotation_orbit_net() -> nn.Module:
    """One filter and its three quarter turns as four channels: a quarter turn of the input
    turns the maps and moves each channel's content to the next channel, as a C4 group
    convolution does."""
    torch.manual_seed(0)
    filter_ = torch.randn(1, 3, 5, 5)
    conv = nn.Conv2d(3, 4, 5, padding=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.cat([torch.rot90(filter_, k, (-2, -1)) for k in range(4)]))
    return nn.Sequential(conv, nn.ReLU()).eval()


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_permutation_of_channels_is_equivariance_once_matched(implementation):
    measure = equifast.measure if implementation == "engine" else naive.measure
    images = torch.rand(4, 3, 24, 24)
    settings = dict(group="rotate:90,180,270", layers=["0", "1"], bootstrap=0, progress=False)
    plain = measure(_rotation_orbit_net(), images, **settings).summary()
    matched = measure(_rotation_orbit_net(), images, channel_map="match", **settings)
    assert (plain["eq"] < 0.5).all()  # each channel against itself: another filter's map
    np.testing.assert_allclose(matched.summary()["eq"], 1.0, atol=1e-9)
    assert matched.config["channel_map"] == "match"
    if implementation == "engine":
        assert "reference statistics" in matched.config["backend"] or matched.config[
            "backend"] == "reference"
    rows = matched.frame.query("comparison == 'eq' and metric == 'corr'")
    assert rows.value.notna().all()


def test_the_engine_and_the_naive_loop_match_alike():
    """Exact and bilinear re-alignment, a vector layer, per-image and pooled scores."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).eval().double()
    images = torch.rand(5, 3, 36, 36, dtype=torch.float64)
    for pooled in (False, True):
        settings = dict(group="translate:2,3+rotate:90,30", layers=["1", "3", "6"],
                        bootstrap=0, progress=False, channel_map="match", batch_size=3,
                        pooled=pooled, metrics=["corr", "cosine", "corr_channelwise"],
                        input_size=(24, 24))
        engine = equifast.measure(net, images, **settings).frame
        reference = naive.measure(net, images, **settings).frame
        keys = ["layer", "element", "comparison", "metric"]
        merged = engine.merge(reference, on=keys, suffixes=("", "_naive"))
        assert len(merged) == len(engine) == len(reference)
        np.testing.assert_allclose(merged.value, merged.value_naive, atol=1e-9, rtol=0)
        pd.testing.assert_series_equal(merged.n, merged.n_naive, check_names=False)


def test_match_channels_finds_a_permutation_and_skips_constant_channels():
    torch.manual_seed(1)
    a = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    order = torch.tensor([3, 0, 4, 1, 2])
    b = torch.empty_like(a)
    b[:, order] = a  # channel c of a is channel order[c] of b
    valid = torch.ones(6, 7, dtype=torch.bool)
    valid[0] = False
    matched = _reference.match_channels(a, b, valid)
    torch.testing.assert_close(matched, a, rtol=0, atol=0)
    # a constant channel of b is never chosen; a constant channel of a keeps its own
    b[:, order[1]] = 2.0
    a_flat = a.clone()
    a_flat[:, 2] = -1.0
    matched = _reference.match_channels(a_flat, b, valid)
    kept = [0, 3, 4]
    torch.testing.assert_close(matched[:, kept], a[:, kept], rtol=0, atol=0)
    torch.testing.assert_close(matched[:, 2], b[:, 2], rtol=0, atol=0)
    assert not (matched[:, 1] == 2.0).all()


@pytest.mark.parametrize("matching", [_reference.match_channels, naive.match_channels],
                         ids=["reference", "naive"])
def test_channels_constant_to_rounding_are_flat_to_the_match(matching):
    """A constant channel re-aligned by bilinear weights varies by an ulp. Those ulps can follow
    any pattern, here exactly the pattern of channel 0 of ``a``: they must not be chosen, or the
    choice is made by rounding (engine and naive differed on a random-init HGNetV2)."""
    torch.manual_seed(5)
    a = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    b = a[:, [1, 0, 3, 2]] + 0.3 * torch.randn_like(a)  # channel c of a best in b[:, c ^ 1]
    ulps = a[:, 0].sign() * 2.0**-52  # +-1 ulp of 1.0, correlated 1 with a's channel 0
    b[:, 3] = 1.0 + ulps
    valid = torch.ones(5, 6, dtype=torch.bool)
    matched = matching(a, b, valid)
    assert not (matched[:, 0] == b[:, 3]).all(), "chose the rounding noise"
    torch.testing.assert_close(matched[:, 0], b[:, 1], rtol=0, atol=0)
    # and a channel of a constant to rounding keeps its own
    a[:, 2] = 0.25 + ulps / 4
    torch.testing.assert_close(matching(a, b, valid)[:, 2], b[:, 2], rtol=0, atol=0)


def test_the_op_takes_match_through_the_reference_and_checks_the_name():
    torch.manual_seed(2)
    feats = torch.randn(3 * 2, 4, 5, 5)
    affines = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]], [[0.0, 1.0, 0.0],
                                                                 [-1.0, 0.0, 4.0]]],
                           dtype=torch.float64)
    args = (feats, affines, [0, 0], 2, "NCHW", 5, 5, 0, "bilinear", True, True)
    got = ops.equivariance_stats(*args, channel_map="match")
    want = _reference.equivariance_stats(*args, channel_map="match")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # identity: the compiled kernel (where built) agrees with the reference
    torch.testing.assert_close(ops.equivariance_stats(*args),
                               _reference.equivariance_stats(*args), rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match=r"channel_map: expected one of \('identity', "
                                         r"'match', 'linear'\), found 'best'"):
        ops.equivariance_stats(*args, channel_map="best")
    with pytest.raises(ValueError, match="channel_map: expected one of"):
        equifast.measure(nn.Conv2d(3, 2, 3), torch.rand(2, 3, 12, 12), group="rotate:90",
                         channel_map="permute", progress=False)


def test_the_command_line_and_the_survey_take_the_channel_map(tmp_path):
    from equifast import cli
    from equifast.survey.runner import survey_config

    assert cli.CHANNEL_MAPS == ops.CHANNEL_MAPS
    args = cli.build_parser().parse_args([
        "measure", "--model", "resnet18", "--channel-map", "match"])
    assert args.channel_map == "match"
    # a default left out or given is one configuration; match is another
    plain = survey_config("rotate:90", "samples", {})
    assert survey_config("rotate:90", "samples", {"channel_map": "identity"}) == plain
    assert survey_config("rotate:90", "samples", {"channel_map": "match"}) != plain
    assert "channel_map" not in plain  # stores written before the argument existed resume


@pytest.mark.parametrize("positions", [1, 2, 9])
def test_the_two_matchings_agree_on_small_and_flat_regions(positions):
    """The engine's reference op and the naive loop match channels with code of their own: on
    regions of one or a few positions, and with constant channels, they choose alike."""
    torch.manual_seed(positions)
    a = torch.randn(3, 6, 3, 3, dtype=torch.float64).relu()
    b = torch.randn(3, 6, 3, 3, dtype=torch.float64).relu()
    a[:, 1] = 0.0
    b[:, 4] = 0.5
    valid = torch.zeros(3, 3, dtype=torch.bool)
    valid.view(-1)[:positions] = True
    torch.testing.assert_close(naive.match_channels(a, b, valid),
                               _reference.match_channels(a, b, valid), rtol=0, atol=0)


@pytest.mark.cuda
def test_match_on_gpu_features_equals_the_cpu():
    torch.manual_seed(4)
    feats = torch.randn(3 * 2, 5, 6, 6)
    affines = torch.tensor([[[0.0, -1.0, 5.0], [1.0, 0.0, 0.0]], [[1.0, 0.0, 0.5],
                                                                  [0.0, 1.0, 0.0]]],
                           dtype=torch.float64)
    args = (affines, [0, 0], 2, "NCHW", 6, 6, 0, "bilinear", True, True)
    want = ops.equivariance_stats(feats, *args, channel_map="match")
    got = ops.equivariance_stats(feats.cuda(), *args, channel_map="match")
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
