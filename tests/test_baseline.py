"""The initialization baseline (``baseline="init"``, DESIGN.md section 1.9): the copy is built
right, measured on the same images, and ``learned`` is the paired difference."""

from __future__ import annotations

import copy
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from torch import nn

import equifast
from equifast.baseline import InitCopy, WithBaseline, init_copy, init_copy_by_name
from equifast.cli import main
from equifast.result import BASELINE_COLUMNS, FRAME_COLUMNS
from equifast.survey import open_store, run_survey

sys.path.insert(0, str(Path(__file__).parent))
import survey_models  # noqa: E402,F401 - registers the eqtest_* models with timm

KEY = ["layer", "element", "comparison", "metric"]


class SmallNet(nn.Module):
    """Strided convolutions, batch norm and a head: every kind of parameter a reset covers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(self.stem(x)).mean((2, 3)))


def _trained(model: nn.Module, seed: int = 1) -> nn.Module:
    """``model`` with weights moved away from any initialization (a stand-in for training)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
    return model.eval()


def _sources(count: int, group: equifast.Group, size: int = 32, seed: int = 0) -> torch.Tensor:
    my, mx = group.margin(size, size)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size + 2 * my, size + 2 * mx), generator=generator,
                         dtype=torch.uint8)


GROUP = equifast.Translation([3, 8]) + equifast.Rotation([90, 30])
SETTINGS = dict(group=GROUP, layers=["stem", "down", "head"], input_size=(32, 32), batch_size=3,
                bootstrap=64, progress=False, seed=5)


@pytest.mark.parametrize("pooled", [False, True])
@pytest.mark.parametrize("elements_per_chunk", [None, 1])
def test_both_models_score_as_when_measured_alone(pooled: bool, elements_per_chunk) -> None:
    model = _trained(SmallNet())
    images = _sources(7, GROUP)  # three batches, the last one short
    settings = dict(SETTINGS, pooled=pooled, elements_per_chunk=elements_per_chunk)
    fresh = init_copy(model, seed=5)
    both = equifast.measure(model, images, baseline="init", **settings)
    alone = equifast.measure(model, images, **settings)
    copy_alone = equifast.measure(fresh.module, images, **settings)

    assert list(both.frame.columns) == FRAME_COLUMNS
    # The model's own columns are those of a run without a baseline, to the bit.
    own = [c for c in FRAME_COLUMNS if c not in BASELINE_COLUMNS]
    pd.testing.assert_frame_equal(both.frame[own], alone.frame[own])
    # The copy's columns are those of the copy measured alone (same offsets: the copy of a conv
    # net has the same geometry).
    merged = both.frame.merge(copy_alone.frame, on=KEY, suffixes=("", "_alone"))
    assert len(merged) == len(both.frame)
    np.testing.assert_array_equal(merged["init"], merged["value_alone"])
    np.testing.assert_array_equal(merged["init_lo"], merged["ci_low_alone"])
    np.testing.assert_array_equal(merged["init_hi"], merged["ci_high_alone"])
    np.testing.assert_array_equal(both.frame["learned"], both.frame["value"] - both.frame["init"])
    # The copy really is another network: its scores differ from the model's.
    eq = both.frame.query("comparison == 'eq' and metric == 'corr' and layer == 'down'")
    assert (eq["learned"].abs() > 1e-3).any()
    assert both.config["baseline"]["seed"] == 5
    assert both.has_baseline and not alone.has_baseline
    assert alone.frame[BASELINE_COLUMNS].isna().all().all()


def test_learned_interval_is_paired() -> None:
    """A copy with the model's own weights learned nothing: 0 with an interval of [0, 0], while
    each score's own interval is wide (unpaired intervals side by side would not say 0)."""
    model = _trained(SmallNet())
    images = _sources(6, GROUP)
    result = equifast.measure(model, images, baseline=copy.deepcopy(model), **SETTINGS)
    frame = result.frame.dropna(subset=["value"])
    assert (frame["learned"] == 0).all()
    assert (frame["learned_lo"] == 0).all() and (frame["learned_hi"] == 0).all()
    assert ((frame["init_hi"] - frame["init_lo"]) > 0).mean() > 0.5

    # With another copy, the paired interval holds the point and is narrower than the sum of
    # the two intervals where the scores move together across images.
    other = equifast.measure(model, images, baseline="init", **SETTINGS).frame.dropna(
        subset=["learned_lo"])
    assert ((other["learned_lo"] <= other["learned"] + 1e-12)
            & (other["learned"] <= other["learned_hi"] + 1e-12)).all()


def test_pooled_learned_interval_is_filled() -> None:
    """Pooled scores have intervals from two batches on; the learned one too (it was NaN in every
    row: the pooled resamples never reached the baseline)."""
    model = _trained(SmallNet())
    settings = dict(SETTINGS, pooled=True, batch_size=2)
    frame = equifast.measure(model, _sources(6, GROUP), baseline="init", **settings).frame
    rows = frame.dropna(subset=["value", "init"])
    assert len(rows) and rows["learned_lo"].notna().all() and rows["learned_hi"].notna().all()
    assert ((rows["learned_lo"] <= rows["learned"] + 1e-12)
            & (rows["learned"] <= rows["learned_hi"] + 1e-12)).all()


def test_summary_scores_and_text_show_the_baseline() -> None:
    model = _trained(SmallNet())
    images = _sources(4, GROUP)
    result = equifast.measure(model, images, baseline="init", **SETTINGS)
    summary = result.summary()
    for column in ("eq_init", "eq_learned", "eq_learned_lo", "eq_learned_hi",
                   "vs_chance_learned"):
        assert column in summary.columns
    np.testing.assert_allclose(summary["eq_learned"], summary["eq"] - summary["eq_init"])
    scores = result.scores()
    assert {"eq_init", "eq_learned", "chance_learned_hi"} <= set(scores.columns)
    text = result.format_summary()
    assert "eq learned" in text.splitlines()[0]
    row = summary.set_index("layer").loc["down"]
    assert f"{row['eq_learned']:+7.4f}" in text


def test_init_copy_ways_and_random_state() -> None:
    timm_model = timm.create_model("resnet10t", pretrained=False, num_classes=7)
    small = _trained(SmallNet())
    state = torch.get_rng_state()
    built = init_copy(timm_model, seed=3)
    assert "timm.create_model" in built.how and not built.kept
    assert built.module is not timm_model
    again = init_copy(timm_model, seed=3).module.state_dict()
    for key, value in built.module.state_dict().items():
        assert torch.equal(value, again[key]), key  # seeded
    other = init_copy(timm_model, seed=4).module
    assert not torch.equal(other.conv1[0].weight, built.module.conv1[0].weight)

    by_name = init_copy_by_name("resnet10t", seed=3)
    assert "pretrained=False" in by_name.how
    generic = init_copy(small, seed=3)
    assert "reset_parameters" in generic.how and not generic.kept
    fresh_bn = generic.module.stem[1]
    assert torch.equal(fresh_bn.running_var, torch.ones(8))  # running statistics reset too
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched


def test_parameters_without_initializer_are_named() -> None:
    class WithRawParameter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.position = nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            return self.conv(x) + self.position

    model = WithRawParameter().eval()
    with pytest.warns(UserWarning, match=r"1 parameters have no initializer.*position"):
        made = init_copy(model, seed=7)
    assert made.kept == ["position"]
    assert torch.equal(made.module.position, model.position)
    assert not torch.equal(made.module.conv.weight, model.conv.weight)


def test_a_given_copy_and_bad_baselines() -> None:
    model = _trained(SmallNet())
    images = _sources(3, GROUP)
    given = InitCopy(SmallNet().eval(), "my own init")
    result = equifast.measure(model, images, baseline=given, **SETTINGS)
    assert result.config["baseline"]["how"] == "my own init"
    with pytest.raises(ValueError, match=r"baseline: expected None, 'init'.*'random'"):
        equifast.measure(model, images, baseline="random", **SETTINGS)
    with pytest.raises(ValueError, match=r"same parameter names and shapes.*Conv2d"):
        equifast.measure(model, images, baseline=nn.Conv2d(3, 8, 3), **SETTINGS)


def test_with_baseline_runs_both_and_returns_the_model_output() -> None:
    calls = []
    first, second = nn.Linear(4, 2), nn.Linear(4, 2)
    first.register_forward_hook(lambda *_: calls.append("trained"))
    second.register_forward_hook(lambda *_: calls.append("init"))
    both = WithBaseline(first, second)
    x = torch.randn(3, 4)
    assert torch.equal(both(x), first(x))
    assert calls == ["trained", "init", "trained"]


def test_cli_measure_and_survey_store_the_baseline(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    code = main(["measure", "--model", "eqtest_tiny", "--baseline", "init", "--limit", "3",
                 "--batch-size", "3", "--input-size", "32,32", "--group", "translate:4,8",
                 "--bootstrap", "10", "--no-plot", "--quiet", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "eq learned" in printed
    saved = equifast.Result.load(out)
    assert saved.has_baseline
    # eqtest_tiny has no weights: the model is the seeded init itself, and learned nothing.
    assert (saved.frame["learned"].dropna() == 0).all()

    store_path = tmp_path / "s.sqlite"
    run_survey(["eqtest_tiny"], "samples", store_path, group="translate:4,8", limit=4,
               input_size=(32, 32), bootstrap=10, progress=False, log=None, baseline="init")
    with open_store(store_path) as store:
        scores = store.scores
        config = store.runs["config"].iloc[0]
    assert scores["init"].notna().any() and (scores["learned"].dropna() == 0).all()
    assert "pretrained=False" in config

    from equifast.report import build_report

    page = build_report(store_path, tmp_path / "report", progress=False).read_text()
    assert "learned eq translate:4,8" in page
    models = pd.read_csv(tmp_path / "report" / "models.csv")
    assert models["mean_learned"].tolist() == [0.0]


def test_a_version_1_store_is_upgraded(tmp_path: Path) -> None:
    """A store written before baselines (no init / learned columns) opens, reads NULL there and
    takes new runs with a baseline."""
    store_path = tmp_path / "old.sqlite"
    run_survey(["eqtest_tiny"], "samples", store_path, group="translate:4", limit=2,
               input_size=(32, 32), bootstrap=0, progress=False, log=None)
    with sqlite3.connect(store_path) as db:  # back to the version-1 schema
        for column in BASELINE_COLUMNS:
            db.execute(f"ALTER TABLE scores DROP COLUMN {column}")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with open_store(store_path) as store:
        assert store.scores[BASELINE_COLUMNS].isna().all().all()
    with sqlite3.connect(store_path) as db:
        version = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        columns = {row[1] for row in db.execute("PRAGMA table_info(scores)")}
    assert version == ("3",) and set(BASELINE_COLUMNS) <= columns
    run_survey(["eqtest_tiny"], "samples", store_path, group="translate:4", limit=2,
               input_size=(32, 32), bootstrap=0, progress=False, log=None, baseline="init")
    with open_store(store_path) as store:
        assert len(store.runs) == 2 and store.scores["init"].notna().any()


def test_depth_plot_draws_the_initialized_copy_dashed() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from equifast.plots import plot_depth

    model = _trained(SmallNet())
    images = _sources(3, GROUP)
    with_baseline = equifast.measure(model, images, baseline="init", **SETTINGS)
    lines = {line.get_label(): line for line in plot_depth(with_baseline).axes[0].lines}
    dashed = lines["equivariance at init"]
    assert dashed.get_linestyle() == "--"
    eq = with_baseline.summary()
    np.testing.assert_allclose(dashed.get_ydata(), eq["eq_init"])
    plain = equifast.measure(model, images, **SETTINGS)
    assert "equivariance at init" not in {ln.get_label() for ln in plot_depth(plain).axes[0].lines}


def test_a_model_given_by_name_is_seeded_like_on_the_command_line() -> None:
    # eqtest_tiny has no weights: built by name, it is a random init, seeded with `seed` as the
    # CLI and the survey seed it, so a run repeats and the model is its own init copy.
    images = _sources(3, equifast.Translation([4]))
    settings = dict(group="translate:4", layers=["conv1", "conv2"], bootstrap=0, progress=False,
                    baseline="init", seed=5)
    state = torch.get_rng_state()
    first = equifast.measure("eqtest_tiny", images, **settings)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    torch.manual_seed(123)  # another global random state changes nothing
    second = equifast.measure("eqtest_tiny", images, **settings)
    pd.testing.assert_frame_equal(first.frame, second.frame)
    assert first.frame["init"].notna().any()
    assert (first.frame["learned"].dropna() == 0).all()
    other = equifast.measure("eqtest_tiny", images, **{**settings, "seed": 6})
    assert not np.allclose(other.frame["value"], first.frame["value"], equal_nan=True)


def test_naive_builds_a_model_by_name_as_the_engine_does() -> None:
    """The naive loop seeds (and sizes) a model given by name as equifast.measure does, so the two
    measure the same weights."""
    from equifast import naive

    images = _sources(3, equifast.Translation([4]))
    settings = dict(group="translate:4", layers=["conv1", "conv2"], bootstrap=0, progress=False,
                    seed=5)
    engine = equifast.measure("eqtest_tiny", images, **settings).frame
    reference = naive.measure("eqtest_tiny", images, **settings).frame
    merged = engine.merge(reference, on=["layer", "element", "comparison", "metric"])
    assert len(merged) == len(engine) > 0
    np.testing.assert_allclose(merged.value_x, merged.value_y, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"in_chans": 1}, {"features_only": True},
                                    {"features_only": True, "out_indices": (1, 3)}])
def test_timm_models_built_with_other_arguments_get_timms_initialization(kwargs):
    """A greyscale model and features_only wrappers are rebuilt by timm with the arguments they
    show (they fell back to reset_parameters(), which is not timm's initialization: another
    init score for the same architecture)."""
    model = timm.create_model("resnet18", **kwargs).eval()
    fresh = init_copy(model, seed=0)
    assert fresh.how.startswith("timm.create_model")
    assert fresh.kept == []
