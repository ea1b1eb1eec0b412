"""Scores from statistics against numpy on random data, and the reference statistics op."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equifast import _ext
from equifast.ops import _reference, merge_stats
from equifast.scores import METRICS, corr_vs_chance, score_stats


def _numpy_scores(a, b, pooled=False):
    """Scores of (C, P) arrays straight from their definitions, in float64 (``pooled``: values
    merged over images, whose corr is undefined where every channel is constant to rounding)."""
    ac = a - a.mean(1, keepdims=True)
    bc = b - b.mean(1, keepdims=True)
    var_a, var_b = ac.var(1), bc.var(1)
    flat = (var_a <= (1e-6 * a.mean(1)) ** 2 + 1e-30) | (var_b <= (1e-6 * b.mean(1)) ** 2 + 1e-30)
    # pooled, every channel constant to rounding (spread below 1e-12 of the level): undefined
    rounding = (var_a <= (1e-12 * a.mean(1)) ** 2) | (var_b <= (1e-12 * b.mean(1)) ** 2)
    corr = (np.nan if pooled and rounding.all()
            else (ac * bc).sum() / np.sqrt((ac**2).sum() * (bc**2).sum()))
    per_channel = [np.corrcoef(a[c], b[c])[0, 1] for c in range(a.shape[0]) if not flat[c]]
    diff2 = ((a - b) ** 2).sum()
    return {
        "corr": corr,
        "one_minus_corr": 1 - corr,
        "corr_channelwise": np.mean(per_channel) if per_channel else np.nan,
        "flat_frac": flat.mean(),
        "cosine": (a * b).sum() / np.sqrt((a**2).sum() * (b**2).sum()),
        "nde": diff2 / ((a**2).sum() + (b**2).sum()),
        "rel_err": np.sqrt(diff2 / (b**2).sum()),
        # (the spread of b about its first value: exact for b = 1 + 1e-8 x, where b.std()
        # keeps 8 digits)
        "psnr": 10 * np.log10((4 * (b - b.flat[0]).std()) ** 2 / (diff2 / a.size)),
    }


def _stats(a, b):
    """Six statistics of (C, P) arrays per channel."""
    count = np.full(a.shape[0], a.shape[1], dtype=np.float64)
    ma, mb = a.mean(1), b.mean(1)
    return torch.from_numpy(np.stack([
        count, ma, mb, ((a - ma[:, None]) ** 2).sum(1), ((b - mb[:, None]) ** 2).sum(1),
        ((a - ma[:, None]) * (b - mb[:, None])).sum(1)], -1))


# Both ways of computing the scores: the compiled op (CPU) and the torch ops (every device).
PATHS = [pytest.param(False, id="compiled"), pytest.param(True, id="torch")]


@pytest.mark.parametrize("force_reference", PATHS)
@settings(max_examples=40, deadline=None)
@given(channels=st.integers(1, 6), positions=st.integers(2, 40), seed=st.integers(0, 10_000),
       flat=st.sampled_from(["none", "one constant", "all rounding", "all 1e-8"]),
       pooled=st.booleans())
def test_scores_match_numpy(force_reference, channels, positions, seed, flat, pooled):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(channels, positions)) * rng.uniform(0.1, 3, (channels, 1))
    b = 0.7 * a + rng.normal(size=(channels, positions)) + rng.normal(size=(channels, 1))
    if flat == "one constant":
        a[0] = 2.5
    elif flat == "all rounding":
        # 0.5 give or take an ulp in every channel (an SE gate's sigmoid of values near 1e-16):
        # pooled, the merge of the images' rounded means would leave a corr of rounding errors;
        # it is NaN
        a = 0.5 + np.spacing(0.5) * rng.integers(-1, 2, size=a.shape)
    elif flat == "all 1e-8":
        # spreads of 1e-8 of the level (deep layers at random init): flat (flat_frac 1), and
        # still far above rounding in float64, so corr is scored
        a, b = 1.0 + 1e-8 * a, 1.0 + 1e-8 * b
    scores = score_stats(_stats(a, b), METRICS, force_reference=force_reference, pooled=pooled)
    with np.errstate(invalid="ignore"):  # one flat channel: corr is 0 / 0, NaN on both sides
        expected = _numpy_scores(a, b, pooled)
    for metric in METRICS:
        # psnr of spreads of 1e-8: the statistics built here (numpy, about means rounded to
        # 1e-16, a relative error of up to 1e-7 of the smallest deviations) carry that into its
        # log: 1e-5 dB
        atol = 1e-5 if metric == "psnr" and flat == "all 1e-8" else 1e-12
        np.testing.assert_allclose(float(scores[metric]), expected[metric], rtol=1e-9, atol=atol,
                                   err_msg=metric)


def test_large_offset_map_has_no_cancellation():
    """A map of mean 1e4 and spread 1: corr correct to 1e-4 through the float32 statistics."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(1, 4, 9, 9))
    moved = np.roll(base, 1, axis=-1) * 0.8 + 0.2 * rng.normal(size=base.shape)
    feats = torch.from_numpy(np.concatenate([base, moved]) + 1e4).float()
    affine = torch.tensor([[[1.0, 0, -1], [0, 1, 0]]], dtype=torch.float64)
    stats = _reference.equivariance_stats(feats, affine, [1], 1, "NCHW", 9, 9, 0, "bilinear",
                                          True, True)
    corr = float(score_stats(stats[0, 0, 0], ["corr"])["corr"])
    a = feats[1].double().numpy().reshape(4, -1)
    b = np.roll(feats[0].double().numpy(), 1, axis=-1).reshape(4, -1)
    assert abs(corr - _numpy_scores(a, b)["corr"]) < 1e-4
    assert corr > 0.9


def test_merge_stats_equals_stats_of_concatenation():
    rng = np.random.default_rng(3)
    parts = [rng.normal(loc=5, size=(3, n)) for n in (4, 7, 1)]
    others = [p * 0.5 + rng.normal(size=p.shape) for p in parts]
    stacked = torch.stack([_stats(a, b) for a, b in zip(parts, others)])
    merged = merge_stats(stacked, dim=0)
    whole = _stats(np.concatenate(parts, 1), np.concatenate(others, 1))
    torch.testing.assert_close(merged, whole)


def test_merge_stats_of_one_part_taken_several_times_keeps_its_spread():
    # A bootstrap resample that draws one batch three times (its counts and sums about the mean
    # times 3, the others' times 0): the merged mean must be that batch's mean exactly, or its
    # last bit passes for a spread. Here one value per channel: no spread at all, so corr is NaN.
    values = np.random.default_rng(4).normal(size=1000)
    values = values[values * 3 / 3 != values][:12]  # those whose (3 m) / 3 rounds off m
    means = values.reshape(3, 2, 2)  # (part, channel, a / b)
    stacked = torch.zeros(3, 2, 6, dtype=torch.float64)
    stacked[..., 0] = 1.0
    stacked[..., 1:3] = torch.from_numpy(means)
    for taken in range(3):
        weights = torch.zeros(3, 1, dtype=torch.float64)
        weights[taken] = 3.0
        scaled = stacked.clone()
        for field in (0, 3, 4, 5):
            scaled[..., field] *= weights
        merged = merge_stats(scaled, dim=0)
        assert torch.equal(merged[..., 1:3], stacked[taken, :, 1:3])
        assert torch.equal(merged[..., 3:], torch.zeros(2, 3, dtype=torch.float64))
        assert np.isnan(float(score_stats(merged, ["corr"])["corr"]))


def test_corr_vs_chance_is_undefined_where_chance_is_one_up_to_rounding():
    from equifast import naive

    eq = np.array([0.9, 1.0, 0.5, 1.0 - 2e-16, 1.0, 1.0 - 1.4e-11])
    chance = np.array([0.8, 1.0 - 1e-8, 1.0 - 1e-13, 1.0 - 4e-16, 1.0 + 2e-16, 1.0 - 1.5e-11])
    for implementation in (corr_vs_chance, naive._vs_chance):
        value = implementation(eq, chance)
        np.testing.assert_allclose(value[:2], [0.5, 1.0], rtol=1e-6)
        # 1 - chance of 1e-13, 4e-16 and -2e-16: rounding; 1.5e-11: the ratio would magnify
        # corr's rounding (1e-15) to 1e-4
        assert np.isnan(value[2:]).all()


@pytest.mark.parametrize("force_reference", PATHS)
def test_zero_count_gives_nan_and_corr_vs_chance(force_reference):
    scores = score_stats(torch.zeros(2, 6, dtype=torch.float64), METRICS,
                         force_reference=force_reference)
    assert all(np.isnan(float(v)) for v in scores.values())
    assert corr_vs_chance(0.8, 0.6) == pytest.approx(0.5)
    assert np.isnan(corr_vs_chance(0.8, 1.0))


@pytest.mark.parametrize("force_reference", PATHS)
def test_psnr_of_identical_maps_is_infinite(force_reference):
    """mse exactly 0 (an exact re-alignment) is +inf dB, not NaN; b constant and a equal to it
    (0 / 0) stays NaN; the other metrics keep their values."""
    count, mean = 12.0, 3.0
    identical = torch.tensor([count, mean, mean, 5.0, 5.0, 5.0], dtype=torch.float64)
    constant = torch.tensor([count, mean, mean, 0.0, 0.0, 0.0], dtype=torch.float64)
    different = torch.tensor([count, mean, mean, 5.0, 5.0, 4.0], dtype=torch.float64)
    stats = torch.stack([identical, constant, different])[:, None]  # (3, channels=1, 6)
    scores = score_stats(stats, METRICS, force_reference=force_reference)
    psnr = scores["psnr"].tolist()
    assert psnr[0] == math.inf
    assert math.isnan(psnr[1])
    assert math.isfinite(psnr[2]) and psnr[2] > 0
    assert scores["corr"][0].item() == pytest.approx(1.0) and scores["nde"][0].item() == 0.0


@pytest.mark.parametrize("force_reference", PATHS)
@settings(max_examples=30, deadline=None)
@given(channel_counts=st.lists(st.integers(1, 7), min_size=1, max_size=5),
       seed=st.integers(0, 10_000), flat_channels=st.integers(0, 3), empty_layer=st.booleans())
def test_layers_scored_together_equal_layers_scored_one_by_one(force_reference, channel_counts,
                                                               seed, flat_channels, empty_layer):
    """``channel_counts``: several layers' channels in one call give each layer's own scores."""
    rng = np.random.default_rng(seed)
    layers = []
    for channels in channel_counts:
        a = rng.normal(size=(2, channels, 30)) * rng.uniform(0.1, 3, (2, channels, 1))
        b = 0.7 * a + rng.normal(size=a.shape) + rng.normal(size=(2, channels, 1))
        a[:, :min(flat_channels, channels)] = 1.5  # flat channels (flat_frac, corr_channelwise)
        layers.append(torch.stack([_stats(a[i], b[i]) for i in range(2)]))  # (2, C, 6)
    if empty_layer:
        layers[-1][1] = 0  # no valid position for the second pair of the last layer
    together = score_stats(torch.cat(layers, 1), METRICS, channel_counts=channel_counts,
                           force_reference=force_reference)
    for i, stats in enumerate(layers):
        alone = score_stats(stats, METRICS, force_reference=True)
        for metric in METRICS:
            assert together[metric].shape == (2, len(channel_counts))
            torch.testing.assert_close(together[metric][:, i], alone[metric], rtol=1e-12,
                                       atol=1e-14, equal_nan=True, msg=metric)


def test_channel_counts_must_cover_the_channels():
    stats = torch.ones(2, 5, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="add up to the 5 channels"):
        score_stats(stats, ["corr"], channel_counts=[2, 2])
    with pytest.raises(ValueError, match="positive"):
        score_stats(stats, ["corr"], channel_counts=[5, 0])
    with pytest.raises(ValueError, match=r"\(\.\.\., C, 6\)"):
        score_stats(torch.ones(4, 5), ["corr"])


needs_compiled = pytest.mark.skipif(
    not _ext.has_kernel("score_stats", "cpu"),
    reason="equifast._C has no CPU score_stats (extension not built)")


@needs_compiled
@settings(max_examples=60, deadline=None)
@given(leading=st.lists(st.integers(1, 3), min_size=0, max_size=3),
       channel_counts=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       seed=st.integers(0, 10_000), psnr_range=st.sampled_from([None, 2.0, 255.0]),
       specials=st.booleans())
def test_compiled_scores_equal_torch_scores(leading, channel_counts, seed, psnr_range, specials):
    """The compiled op against the torch ops on raw statistics: offsets, flat channels, pairs
    without valid positions, NaN statistics, any leading shape."""
    rng = np.random.default_rng(seed)
    shape = (*leading, sum(channel_counts))
    count = rng.integers(1, 200, shape).astype(np.float64)
    mean_a = rng.normal(size=shape) * 10 ** rng.uniform(-3, 4, shape)
    mean_b = mean_a + rng.normal(size=shape)
    m2_a = rng.uniform(0, 5, shape) * count
    m2_b = rng.uniform(0, 5, shape) * count
    c_ab = rng.uniform(-1, 1, shape) * np.sqrt(m2_a * m2_b)
    stats = torch.from_numpy(np.stack([count, mean_a, mean_b, m2_a, m2_b, c_ab], -1))
    if specials:
        flat = torch.from_numpy(rng.random(shape) < 0.2)
        stats[..., 3][flat] = 0.0  # flat on the a side
        empty = torch.from_numpy(rng.random(shape) < 0.1)
        stats[empty] = 0.0  # no valid position
        if stats.numel() > 6:
            stats.view(-1, 6)[0, 5] = math.nan
    compiled = score_stats(stats, METRICS, psnr_range, channel_counts)
    torch_ops = score_stats(stats, METRICS, psnr_range, channel_counts, force_reference=True)
    for metric in METRICS:
        assert compiled[metric].shape == (*leading, len(channel_counts))
        torch.testing.assert_close(compiled[metric], torch_ops[metric], rtol=1e-11, atol=1e-12,
                                   equal_nan=True, msg=metric)


@needs_compiled
def test_compiled_scores_opcheck_and_errors():
    import equifast.ops  # noqa: F401  (registers the fake kernel)

    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 5, 20))
    b = a + rng.normal(size=a.shape)
    stats = torch.stack([_stats(x, y) for x, y in zip(a, b)]).view(2, 3, 5, 6)
    assert not torch.ops.equifast.score_stats(stats, [2, 3], None).isnan().any()  # opcheck: no NaN
    torch.library.opcheck(torch.ops.equifast.score_stats.default, (stats, [2, 3], None))
    torch.library.opcheck(torch.ops.equifast.score_stats.default, (stats, [5], 10.0))
    with pytest.raises(ValueError, match="add up to 4, but the stats have 5 channels"):
        torch.ops.equifast.score_stats(stats, [1, 3], None)
    with pytest.raises(RuntimeError, match="stats must have dtype Double, but got Float"):
        torch.ops.equifast.score_stats(stats.float(), [5], None)
    with pytest.raises(ValueError, match=r"channel_counts\[1\] must be > 0, but got 0"):
        torch.ops.equifast.score_stats(stats, [5, 0], None)


@pytest.mark.parametrize("metrics", [["corr", "flat_frac"], ["corr", "corr_channelwise"],
                                     ["corr", "psnr"]])
def test_a_subset_of_metrics_scores_as_all_of_them_do(metrics):
    """The torch path with some metrics only (the flat-channel sums are built for flat_frac and
    corr_channelwise alike): the values of the full set."""
    stats = _stats(*np.random.default_rng(3).normal(size=(2, 5, 30)))
    every = score_stats(stats, METRICS, force_reference=True)
    some = score_stats(stats, metrics, force_reference=True)
    assert list(some) == metrics
    for metric in metrics:
        torch.testing.assert_close(some[metric], every[metric], rtol=0, atol=0)
