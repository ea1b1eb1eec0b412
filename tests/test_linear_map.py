"""channel_map="linear" (DESIGN.md 1.6, Lenc & Vedaldi): each channel against a linear map of all
channels of the other map, fitted on one fold of the images and scored on the other."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import equifast
from equifast import engine, naive, ops
from equifast.ops import _reference


def _flip_mixing_net() -> nn.Module:
    """Two filters ``h`` and ``2 h + 3 flip(h)``: a horizontal flip of the input flips the maps
    and mixes the two channels linearly (``flip(h) = (f2 - 2 f1) / 3``), a mix that is no
    permutation, so neither the channels themselves nor their best match follow the flip."""
    torch.manual_seed(0)
    h = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    conv = nn.Conv2d(3, 2, 5, padding=2).double()
    with torch.no_grad():
        conv.weight.copy_(torch.cat([h, 2 * h + 3 * torch.flip(h, (-1,))]))
        conv.bias.copy_(torch.tensor([0.5, -1.0]))
    return nn.Sequential(conv).eval()


@pytest.mark.parametrize("implementation", ["engine", "naive"])
def test_a_linear_mix_of_channels_is_equivariance_once_fitted(implementation):
    measure = equifast.measure if implementation == "engine" else naive.measure
    images = torch.rand(6, 3, 25, 25, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(1))
    settings = dict(group="flip:horizontal", layers=["0"], bootstrap=0, progress=False,
                    batch_size=4)
    plain = measure(_flip_mixing_net(), images, **settings).summary()
    matched = measure(_flip_mixing_net(), images, channel_map="match", **settings).summary()
    fitted = measure(_flip_mixing_net(), images, channel_map="linear", ridge=1e-10,
                     **settings)
    assert float(plain["eq"].iloc[0]) < 0.9
    assert float(matched["eq"].iloc[0]) < 0.99
    np.testing.assert_allclose(fitted.summary()["eq"], 1.0, atol=1e-6)
    # the images are not flipped versions of each other: a map fitted on other pairs does not
    # make the chance comparison equivariant
    assert float(fitted.summary()["chance"].iloc[0]) < 0.9
    assert fitted.config["channel_map"] == "linear"
    assert fitted.config["ridge"] == 1e-10 and fitted.config["folds"] == 2
    rows = fitted.frame.query("comparison == 'eq' and metric == 'corr'")
    assert rows.value.notna().all() and (rows.n == 6).all()
    if implementation == "engine":
        assert fitted.config["backend"] in ("reference", "compiled transform, reference "
                                            "statistics")


def test_the_engine_and_the_naive_loop_fit_and_score_alike():
    """Exact and bilinear re-alignment, a vector layer, folds that cross batches (5 images in
    batches of 3 and 2), forwards of one element (kept identity features), per-image and pooled
    scores; the engine's normal equations against the naive loop's least squares."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).eval().double()
    images = torch.rand(5, 3, 36, 36, dtype=torch.float64)
    for pooled, chunk in ((False, None), (True, 1)):
        settings = dict(group="translate:2,3+rotate:90,30", layers=["1", "3", "6"],
                        bootstrap=0, progress=False, channel_map="linear", batch_size=3,
                        pooled=pooled, metrics=["corr", "cosine", "nde", "corr_channelwise"],
                        input_size=(24, 24), ridge=0.01)
        result = equifast.measure(net, images, elements_per_chunk=chunk, **settings)
        reference = naive.measure(net, images, **settings).frame
        frame = result.frame
        keys = ["layer", "element", "comparison", "metric"]
        merged = frame.merge(reference, on=keys, suffixes=("", "_naive"))
        assert len(merged) == len(frame) == len(reference)
        assert merged.value.notna().any()
        np.testing.assert_allclose(merged.value, merged.value_naive, atol=1e-8, rtol=0)
        pd.testing.assert_series_equal(merged.n, merged.n_naive, check_names=False)
        if chunk == 1:
            assert result.config["elements_per_chunk"] == 1


def test_the_maps_are_scored_out_of_sample():
    """More channels than one fold has positions: fitted on an image's own pairs, the map
    predicts them exactly, whatever they are; fitted on the other fold, it does not."""
    torch.manual_seed(5)
    feats = torch.randn(2 * 4, 24, 3, 3, dtype=torch.float64)  # identity block + one element
    affines = torch.tensor([[[1.0, 0, 1], [0, 1, 0]]], dtype=torch.float64)  # shift by one
    args = (feats, affines, [0], 4, "NCHW", 3, 3, 0, "bilinear", True, True)
    folds = torch.tensor([0, 1, 0, 1])
    maps = ops.solve_linear_maps(ops.linear_fit_sums(*args, folds=folds, num_folds=2), 1e-9)

    def eq_corr(map_folds):
        stats = ops.equivariance_stats(*args, channel_map="linear", linear_maps=maps,
                                       map_folds=map_folds)
        count, _, _, m2_a, m2_b, c_ab = stats[0, 0].unbind(-1)  # (B, C)
        assert (count == 6).all()  # 3 x 2 positions of the shifted grid
        return (c_ab / (m2_a * m2_b).sqrt()).mean().item()

    assert eq_corr(folds) > 0.999999  # each image by the map of its own fold: overfitted
    assert eq_corr((folds + 1) % 2) < 0.5  # by the other fold's: random features, no relation


def test_fit_sums_merge_like_one_batch_and_solve_the_ridge_problem():
    torch.manual_seed(7)
    feats = torch.randn(3 * 6, 4, 7, 8, dtype=torch.float64)
    affines = torch.tensor([[[1.0, 0, -2], [0, 1, 1]], [[0.8, -0.6, 3.1], [0.6, 0.8, -1.7]]],
                           dtype=torch.float64)  # a shift and a bilinear rotation
    folds = torch.tensor([0, 1, 1, 0, 1, 0])
    whole = _reference.linear_fit_sums(feats, affines, [0, 0], 6, "NCHW", 7, 8, 0, "bilinear",
                                       True, True, folds, 2)
    # the same images in two batches of 3 (chance pairs within each batch, as the engine does)
    halves = [_reference.linear_fit_sums(torch.cat([feats[b * 6 + half * 3:b * 6 + half * 3 + 3]
                                                    for b in range(3)]), affines, [0, 0], 3,
                                         "NCHW", 7, 8, 0, "bilinear", True, False,
                                         folds[half * 3:half * 3 + 3], 2)
              for half in (0, 1)]
    merged = _reference.merge_linear_sums(*halves)
    for key in ("count", "mean_a", "mean_b", "s_bb", "s_ab"):
        torch.testing.assert_close(merged[key][:, :2], whole[key][:, :2], rtol=1e-12,
                                   atol=1e-10)
    assert (whole["count"][:, 2] > 0).all() and (merged["count"][:, 2] == 0).all()
    maps = _reference.solve_linear_maps(whole, ridge=0.05)
    # the naive loop's least squares on the same pairs (fold 1, eq, the rotation)
    grid = feats.reshape(3, 6, 4, 7, 8)
    moved, valid = _reference.realign(grid[0], affines[1], False)
    a = grid[2][folds == 1][..., valid].transpose(0, 1).reshape(4, -1)
    b = moved[folds == 1][..., valid].transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(maps[1, 0, 1], naive.fit_linear_map(a, b, 0.05), rtol=1e-9,
                               atol=1e-11)
    # an element whose pairs are all outside the grid leaves no map to score with
    empty = _reference.empty_linear_sums(2, 1, 4)
    assert torch.isnan(_reference.solve_linear_maps(empty, 0.1)).all()


def test_constant_features_get_a_constant_prediction_not_an_error():
    feats = torch.full((2 * 4, 3, 5, 5), 2.5, dtype=torch.float64)
    affines = torch.tensor([[[1.0, 0, 1], [0, 1, 0]]], dtype=torch.float64)
    args = (feats, affines, [0], 4, "NCHW", 5, 5, 0, "bilinear", True, True)
    maps = ops.solve_linear_maps(ops.linear_fit_sums(*args, folds=[0, 1, 0, 1], num_folds=2),
                                 1e-3)
    assert torch.isfinite(maps).all()
    torch.testing.assert_close(maps[..., :-1], torch.zeros_like(maps[..., :-1]))
    torch.testing.assert_close(maps[..., -1], torch.full_like(maps[..., -1], 2.5))


def test_linear_is_checked_before_anything_runs():
    net = _flip_mixing_net()
    images = torch.rand(4, 3, 25, 25, dtype=torch.float64)
    for bad in (0, -1.0, math.nan, math.inf, True, "0.1"):
        with pytest.raises(ValueError, match="ridge: expected a positive finite number"):
            equifast.measure(net, images, group="flip", channel_map="linear", ridge=bad,
                             progress=False)
        with pytest.raises(ValueError, match="ridge: expected a positive finite number"):
            naive.measure(net, images, group="flip", channel_map="linear", ridge=bad,
                          progress=False)
    with pytest.raises(ValueError, match="one-shot iterator .*cannot be read twice"):
        equifast.measure(net, (batch for batch in [images]), group="flip", channel_map="linear",
                         progress=False)
    for measure in (equifast.measure, naive.measure):
        with pytest.raises(ValueError, match="expected at least 2 images .* found 1"):
            measure(net, images[:1], group="flip", channel_map="linear", progress=False,
                    bootstrap=0)
    # a list of batches can be read twice
    result = equifast.measure(net, [images[:2], images[2:]], group="flip", channel_map="linear",
                              progress=False, bootstrap=0)
    assert result.config["images"] == 4


def test_the_memory_of_the_fits_is_checked_against_a_limit():
    layout = equifast.layouts.FeatureLayout("NCHW", 7, 7, 2048)
    wide = engine._Layer("layer4", 0, layout, (0.0, 0.0), np.zeros((6, 2, 3)), np.ones(6, bool),
                         [0] * 6, None)
    with pytest.raises(ValueError, match=r"the fits of one layer would hold 2\.2 GiB .*'layer4', "
                                         r"has C = 2048.*expected at most 1\.0 GiB"):
        engine.check_linear_memory({"layer4": wide}, 6, limit=1 << 30)
    assert engine.check_linear_memory({"layer4": wide}, 6) == [["layer4"]]  # the default holds it
    # Two such layers: each pass fits one, but all maps are kept for the scoring pass.
    assert engine.check_linear_memory({"a": wide, "b": wide}, 6, limit=5 << 29) == [["a"], ["b"]]
    with pytest.raises(ValueError, match=r"the fitted maps of all layers would hold 4\.5 GiB"):
        engine.check_linear_memory({"a": wide, "b": wide, "c": wide, "d": wide}, 6,
                                   limit=5 << 29)


class _CountedBatches:
    """A list of batches that counts how often it is read."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


def test_fits_beyond_the_memory_limit_take_a_pass_per_group_and_score_the_same(monkeypatch):
    """Layers whose fits together pass LINEAR_FIT_BYTES are fitted in groups, one pass over the
    data each (the naive loop fits layer by layer): the same sums, so the same scores."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4)).eval().double()
    images = torch.rand(5, 3, 36, 36, dtype=torch.float64)
    settings = dict(group="translate:2,3+rotate:90,30", layers=["1", "3", "6"], bootstrap=0,
                    progress=False, channel_map="linear", batch_size=3, input_size=(24, 24),
                    metrics=["corr", "nde"])
    whole = equifast.measure(net, images, **settings)
    assert whole.config["fit_passes"] == 1
    # K = 6; sums: layer 1 (C = 6) 20736 bytes, layer 3 (C = 5) 14400, layer 6 (C = 4) 9216;
    # the maps of all three 22176
    monkeypatch.setattr(engine, "LINEAR_FIT_BYTES", 24000)
    data = _CountedBatches([images[:3], images[3:]])
    grouped = equifast.measure(net, data, **settings)
    assert grouped.config["fit_passes"] == 2 and data.reads == 3  # [1], [3, 6], then scoring
    keys = ["layer", "element", "comparison", "metric"]
    merged = grouped.frame.merge(whole.frame, on=keys, suffixes=("", "_whole"))
    assert len(merged) == len(whole.frame) == len(grouped.frame)
    assert merged.value.notna().sum() > 50
    np.testing.assert_allclose(merged.value, merged.value_whole, rtol=0, atol=1e-12)
    reference = naive.measure(net, images, **settings).frame
    merged = grouped.frame.merge(reference, on=keys, suffixes=("", "_naive"))
    np.testing.assert_allclose(merged.value, merged.value_naive, rtol=0, atol=1e-8)
    monkeypatch.setattr(engine, "LINEAR_FIT_BYTES", 20000)  # layer 1 alone is more
    with pytest.raises(ValueError, match=r"the fits of one layer would hold .*'1', has C = 6"):
        equifast.measure(net, images, **settings)


def test_the_op_checks_the_maps_it_is_given():
    feats = torch.randn(2 * 3, 4, 5, 5, dtype=torch.float64)
    affines = torch.tensor([[[1.0, 0, 1], [0, 1, 0]]], dtype=torch.float64)
    args = (feats, affines, [0], 3, "NCHW", 5, 5)
    with pytest.raises(ValueError, match="expected linear_maps .* found no linear_maps"):
        ops.equivariance_stats(*args, channel_map="linear")
    with pytest.raises(ValueError, match=r"linear_maps: expected \(F, 3, K, C, C \+ 1\) = "
                                         r"\(F, 3, 1, 4, 5\), found \(2, 3, 1, 4, 4\)"):
        ops.equivariance_stats(*args, channel_map="linear", linear_maps=torch.zeros(2, 3, 1, 4, 4),
                               map_folds=[0, 1, 0])
    with pytest.raises(ValueError, match=r"map_folds: expected 3 fold indices in \[0, 2\)"):
        ops.equivariance_stats(*args, channel_map="linear", linear_maps=torch.zeros(2, 3, 1, 4, 5),
                               map_folds=[0, 2, 0])
    with pytest.raises(ValueError, match=r"folds: expected one fold per image \(3\), found 2"):
        ops.linear_fit_sums(*args, 0, "bilinear", True, True, folds=[0, 1], num_folds=2)
    with pytest.raises(ValueError, match="layout: expected one of"):
        ops.linear_fit_sums(feats, affines, [0], 3, "NHCW", 5, 5, 0, "bilinear", True, True,
                            folds=[0, 1, 0], num_folds=2)


def test_the_command_line_takes_linear_and_its_ridge(tmp_path, capsys):
    from equifast.cli import main

    with pytest.raises(SystemExit):
        main(["measure", "--model", "resnet18", "--channel-map", "linear", "--ridge", "0"])
    assert "expected a positive number such as 0.001, found '0'" in capsys.readouterr().err
    for command in (["measure", "--model", "resnet18"],
                    ["survey", "--models", "resnet18", "--store", str(tmp_path / "s.sqlite")]):
        for channel_map in ([], ["--channel-map", "match"]):
            assert main([*command, *channel_map, "--ridge", "0.1"]) == 2
            assert "--ridge 0.1: applies to --channel-map linear only" in capsys.readouterr().err
    out = tmp_path / "run"
    code = main(["measure", "--model", "resnet18", "--samples", "--limit", "4", "--input-size",
                 "32", "--group", "flip", "--channel-map", "linear", "--ridge", "0.01",
                 "--bootstrap", "0", "--no-plot", "--quiet", "--out", str(out)])
    assert code == 0
    assert "a linear map of the channels (ridge 0.01, fitted on one half" in capsys.readouterr().out
    loaded = equifast.Result.load(out)
    assert loaded.config["channel_map"] == "linear" and loaded.config["ridge"] == 0.01
    assert loaded.frame.query("comparison == 'eq'").value.notna().any()


@pytest.mark.cuda
def test_linear_on_a_gpu_equals_the_cpu():
    """The whole run: fits and scores of GPU features (bfloat16 autocast off: float64 model)."""
    net = _flip_mixing_net()
    images = torch.rand(5, 3, 25, 25, dtype=torch.float64)
    settings = dict(group="flip:horizontal+translate:2", layers=["0"], bootstrap=0,
                    progress=False, batch_size=2, channel_map="linear", ridge=0.01)
    want = equifast.measure(net, images, device="cpu", **settings).frame
    got = equifast.measure(net, images, device="cuda", **settings).frame
    np.testing.assert_allclose(got.value, want.value, rtol=0, atol=1e-9)


def _random_sums(seed: int = 11, channels: int = 48) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    feats = torch.randn(2 * 6, channels, 6, 6, dtype=torch.float64)
    affines = torch.tensor([[[1.0, 0, 1], [0, 1, 0]]], dtype=torch.float64)
    return ops.linear_fit_sums(feats, affines, [0], 6, "NCHW", 6, 6, 0, "bilinear", True, True,
                               folds=[0, 1, 0, 1, 0, 1], num_folds=2)


def test_the_fits_survive_a_change_of_the_thread_count():
    """torch 2.14's batched LU (torch.linalg.solve) fails after torch.set_num_threads changed
    the thread count (as the benchmarks do in the test process); the fits use Cholesky."""
    sums = _random_sums(channels=256)  # (smaller matrices did not show it)
    before = ops.solve_linear_maps(sums, 1e-3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.set_num_threads(max(2, threads))
        after = ops.solve_linear_maps(sums, 1e-3)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-12)


def test_a_matrix_cholesky_refuses_is_solved_by_least_squares(monkeypatch):
    sums = _random_sums()
    want = ops.solve_linear_maps(sums, 1e-3)
    cholesky_ex = torch.linalg.cholesky_ex

    def refusing(matrix):
        factor, info = cholesky_ex(matrix)
        info = info.clone()
        info[0, 1] = 3  # fold 0, inv: as if not positive definite
        return factor, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", refusing)
    got = _reference.solve_linear_maps(sums, 1e-3)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_an_iterable_read_twice_warns_about_a_cut_batch_once():
    """A later, larger batch of an iterable is cut to the first's size with a warning: once per
    run, although channel_map="linear" reads the batches twice."""
    net = _flip_mixing_net()
    batches = [torch.rand(2, 3, 25, 25, dtype=torch.float64),
               torch.rand(2, 3, 29, 29, dtype=torch.float64)]
    with pytest.warns(UserWarning, match="larger than the 25x25 of the first batch") as caught:
        result = equifast.measure(net, batches, group="flip", layers=["0"], channel_map="linear",
                                  bootstrap=0, progress=False)
    assert sum("larger than the 25x25" in str(w.message) for w in caught) == 1
    assert result.config["images"] == 4
