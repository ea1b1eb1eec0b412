"""Scores from statistics against numpy on random data, and the reference statistics op."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from equifast.ops import _reference, merge_stats
from equifast.scores import METRICS, corr_vs_chance, score_stats


def _numpy_scores(a, b):
    """Scores of (C, P) arrays straight from their definitions, in float64."""
    ac = a - a.mean(1, keepdims=True)
    bc = b - b.mean(1, keepdims=True)
    corr = (ac * bc).sum() / np.sqrt((ac**2).sum() * (bc**2).sum())
    var_a, var_b = ac.var(1), bc.var(1)
    flat = (var_a <= (1e-6 * a.mean(1)) ** 2 + 1e-30) | (var_b <= (1e-6 * b.mean(1)) ** 2 + 1e-30)
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
        "psnr": 10 * np.log10((4 * b.std()) ** 2 / (diff2 / a.size)),
    }


def _stats(a, b):
    """Six statistics of (C, P) arrays per channel."""
    count = np.full(a.shape[0], a.shape[1], dtype=np.float64)
    ma, mb = a.mean(1), b.mean(1)
    return torch.from_numpy(np.stack([
        count, ma, mb, ((a - ma[:, None]) ** 2).sum(1), ((b - mb[:, None]) ** 2).sum(1),
        ((a - ma[:, None]) * (b - mb[:, None])).sum(1)], -1))


@settings(max_examples=40, deadline=None)
@given(channels=st.integers(1, 6), positions=st.integers(2, 40), seed=st.integers(0, 10_000),
       flat_channel=st.booleans())
def test_scores_match_numpy(channels, positions, seed, flat_channel):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(channels, positions)) * rng.uniform(0.1, 3, (channels, 1))
    b = 0.7 * a + rng.normal(size=(channels, positions)) + rng.normal(size=(channels, 1))
    if flat_channel:
        a[0] = 2.5
    scores = score_stats(_stats(a, b), METRICS)
    with np.errstate(invalid="ignore"):  # one flat channel: corr is 0 / 0, NaN on both sides
        expected = _numpy_scores(a, b)
    for metric in METRICS:
        np.testing.assert_allclose(float(scores[metric]), expected[metric], rtol=1e-9, atol=1e-12,
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


def test_zero_count_gives_nan_and_corr_vs_chance():
    scores = score_stats(torch.zeros(2, 6, dtype=torch.float64), METRICS)
    assert all(np.isnan(float(v)) for v in scores.values())
    assert corr_vs_chance(0.8, 0.6) == pytest.approx(0.5)
    assert np.isnan(corr_vs_chance(0.8, 1.0))
