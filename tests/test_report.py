"""Reports of a survey: the figures (checked on the matplotlib objects), the HTML page (opened in
headless Chromium), the correlations, the command line and clear errors.

A small real survey is measured once for the module (three timm models at 64x64, and a model
registered here that raises, so that the report has a failed model); edge cases use synthetic
stores written through :class:`equifast.survey.SurveyStore`.
"""

from __future__ import annotations

import html
import json
import math
import re
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from timm.models import register_model
from torch import nn

from equifast.cli import main
from equifast.plots import (
    configuration_labels,
    correlations,
    model_summary,
    plot_accuracy_vs_equivariance,
    plot_depth,
    plot_model_depth,
)
from equifast.report import build_report
from equifast.result import FRAME_COLUMNS, MODEL_COLUMNS, Result
from equifast.survey import SurveyStore, open_store, run_survey

GROUP = "translate:8,16"
SECOND_GROUP = "flip"
MODELS = ["resnet10t", "convnext_atto", "vit_tiny_patch16_224"]
FAILING = "eqtest_report_broken"
CHROMIUM_INSTALL = ("headless Chromium is needed to check the HTML report: install it with "
                    "`apt-get install -y chromium` (Debian package `chromium`; .ci/run does this)")


class _Broken(nn.Module):
    def __init__(self, **_):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("report test: this model is broken on purpose <64x64>")


@register_model
def eqtest_report_broken(pretrained: bool = False, **kwargs) -> nn.Module:
    return _Broken(**kwargs)


def _labelled_folder(root: Path) -> Path:
    """A tiny ImageNet-style folder: 3 class subfolders, 2 JPEGs each (the embedded samples)."""
    from equifast.data.samples import load_sample_image, sample_names

    classes = ["n01440764", "n01443537", "n01484850"]
    for i, name in enumerate(sample_names()[:6]):
        folder = root / classes[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        load_sample_image(name).convert("RGB").save(folder / f"{name}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def survey(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    data = _labelled_folder(root / "data")
    store = root / "survey.sqlite"
    started = time.perf_counter()
    common = dict(limit=4, input_size=(64, 64), bootstrap=50, progress=False, log=None,
                  loader="folder")
    first = run_survey(MODELS + [FAILING], data, store, group=GROUP, **common)
    second = run_survey(["convnext_atto"], data, store, group=SECOND_GROUP, **common)
    measured = time.perf_counter() - started
    assert sorted(first.done) == sorted(MODELS) and first.failed == [FAILING]
    assert second.done == ["convnext_atto"]
    started = time.perf_counter()
    index = build_report(store, root / "out")
    reported = time.perf_counter() - started
    print(f"survey {measured:.1f} s, report {reported:.1f} s")
    return SimpleNamespace(store=store, out=root / "out", index=index, root=root)


# ---------------------------------------------------------------------------------------------
# the report of a real survey


def test_report_writes_page_and_figures(survey):
    assert survey.index == survey.out / "index.html"
    page = survey.index.read_text()
    sources = re.findall(r'(?:src|href)="(figures/[^"]+)"', page)
    assert sources, "the page references no figure"
    for source in sources:
        assert (survey.out / source).is_file(), f"{source} is referenced but missing"
    stems = ["accuracy_vs_equivariance"] + [f"depth-{m}" for m in MODELS]
    for stem in stems:
        png = survey.out / "figures" / f"{stem}.png"
        svg = survey.out / "figures" / f"{stem}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert b"<svg" in svg.read_bytes()[:2000]
        assert f'src="figures/{stem}.png"' in page
    # No external resource: the page works offline.
    assert not re.search(r'(?:src|href)="(?:https?:)?//', page)
    # The models table: one row per model, a mean-equivariance column per group, sortable.
    table = page.split('id="models-table"')[1].split("</table>")[0]
    assert 'class="sortable"' in page and "<script>" in page
    assert table.count("<tr>") == 1 + len(MODELS)
    assert f"mean eq {GROUP}" in table and f"mean eq {SECOND_GROUP}" in table
    for header in ("top-1", "consistency", "images/s"):
        assert f">{header}</th>" in table
    # The failed model with its error; skipped files.
    failed = page.split('id="failed"')[1].split("<h2")[0]
    assert FAILING in failed and "broken on purpose &lt;64x64&gt;" in failed
    assert "No input file was skipped." in page
    summary = pd.read_csv(survey.out / "models.csv")
    assert len(summary) == len(MODELS) + 1  # convnext_atto under both groups


def test_model_depth_figures_have_a_panel_per_group(survey):
    with open_store(survey.store) as store:
        scores, layers = store.scores, store.layers
    for model in MODELS:
        rows = scores[scores.model == model]
        groups = list(dict.fromkeys(rows.group_spec))
        assert len(groups) == (2 if model == "convnext_atto" else 1)
        fig = plot_model_depth(rows)
        assert len(fig.axes) == len(groups)
        for ax, group in zip(fig.axes, groups):
            run_id = rows[rows.group_spec == group].run_id.iloc[0]
            n_layers = int((layers.run_id == run_id).sum())
            assert n_layers >= 3
            assert ax.get_xlabel() and ax.get_ylabel() == "corr" and group in ax.get_title()
            lines = ax.get_lines()
            assert [line.get_label() for line in lines] == ["equivariance", "invariance",
                                                            "chance"]
            for line in lines:
                assert len(line.get_xdata()) == n_layers
            assert len(ax.collections) == 3  # a CI band per comparison
            eq = rows[(rows.group_spec == group) & (rows.metric == "corr")
                      & (rows.element == "mean") & (rows.comparison == "eq")]
            np.testing.assert_allclose(lines[0].get_ydata(), eq.sort_values("depth").value)
        plt.close(fig)


def test_accuracy_figure_has_a_point_per_model(survey):
    with open_store(survey.store) as store:
        fig = plot_accuracy_vs_equivariance(store, n_boot=200)
        scores = store.scores
    assert [ax.get_title().split(" (")[0] for ax in fig.axes] == [GROUP, SECOND_GROUP]
    counts = {GROUP: len(MODELS), SECOND_GROUP: 1}
    for ax, (group, count) in zip(fig.axes, counts.items()):
        assert len(ax.collections) == 1
        offsets = ax.collections[0].get_offsets()
        assert len(offsets) == count
        assert ax.get_xlabel().startswith("mean equivariance")
        assert ax.get_ylabel() == "top-1 accuracy"  # the folder has labels
        text = _correlation_text(ax)
        assert "Pearson" in text or "correlation: n/a" in text
        # x = the mean over layers of the eq corr at element mean, per model and group
        eq = scores[(scores.group_spec == group) & (scores.metric == "corr")
                    & (scores.comparison == "eq") & (scores.element == "mean")]
        expected = sorted(eq.groupby("model").value.mean())
        np.testing.assert_allclose(sorted(offsets[:, 0]), expected)
        legend = ax.get_legend()
        assert legend is not None and legend.get_title().get_text() == "family"
    plt.close(fig)


def _correlation_text(ax) -> str:
    (text,) = [t for t in ax.texts if t.get_gid() == "correlation"]
    return text.get_text()


def test_result_plot_of_a_stored_run(survey):
    with open_store(survey.store) as store:
        result = store.result("resnet10t")
    fig = result.plot()
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 3
    assert len(ax.get_lines()[0].get_xdata()) == result.frame.layer.nunique()
    plt.close(fig)
    fig = plot_depth(result, element=result.frame.element.iloc[0])
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# headless Chromium


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(CHROMIUM_INSTALL)
    return path


def _run_chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--enable-logging=stderr",
               "--v=0", "--window-size=1280,2000", *extra, page.resolve().as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def _console_lines(stderr: str, page: Path) -> list[str]:
    """What the page wrote to its console (Chromium logs each message as `...:CONSOLE...]
    "text", source: file:///...`); Chromium's own dbus/GPU noise is not the page's."""
    return [line for line in stderr.splitlines()
            if ":CONSOLE" in line and page.name in line]


def test_report_in_headless_chromium(survey, tmp_path):
    """The page renders (a screenshot that is not blank) without console errors, its scripts
    run (errors, failed images and console.error would be written into the DOM, checked in a
    DOM dump) and clicking a header sorts the table.

    Two signals for errors, because each alone can miss: Chromium's stderr log shows console
    messages and uncaught exceptions of the page; the page's own handler (installed first in
    <head>) also sees images that fail to load, and writes every error into the DOM, which
    ``--dump-dom`` prints once the page has loaded. A negative control checks that the handler
    does report a broken image and a script error.
    """
    shot = tmp_path / "screenshot.png"
    done = _run_chromium(survey.index, tmp_path / "profile", f"--screenshot={shot}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.is_file(), done.stderr[-2000:]
    assert _console_lines(done.stderr, survey.index) == []

    from PIL import Image

    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape[:2] == (2000, 1280)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # not one colour
    non_white = (image < 245).any(axis=2).mean()
    assert 0.03 < non_white < 0.9, f"{non_white:.3f} of the pixels are not white"

    dom = _run_chromium(survey.index, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_lines(dom.stderr, survey.index) == []
    assert 'data-sortable="ready"' in dom.stdout  # the sort script ran to its end
    assert 'data-js-errors="0"' in dom.stdout, re.findall(
        r'<div id="js-errors"[^>]*>(.*?)</div>', dom.stdout, re.S)

    # Sorting: a copy of the page clicks a header twice and writes the row order into the DOM.
    harness = survey.out / "sort-check.html"
    probe = """<script>
    (function () {
      var table = document.getElementById('models-table');
      var th = Array.prototype.filter.call(table.tHead.rows[0].cells, function (h) {
        return h.textContent.trim() === 'mean eq translate:8,16'; })[0];
      function order() {
        return Array.prototype.map.call(table.tBodies[0].rows, function (r) {
          // the model's link: a model with a warning has a second one, "(warning)"
          return r.cells[0].querySelector('a').textContent.trim(); }).join(',');
      }
      th.click(); var up = order() + '|' + th.getAttribute('aria-sort');
      th.click(); var down = order() + '|' + th.getAttribute('aria-sort');
      var out = document.createElement('pre'); out.id = 'sort-result';
      out.textContent = up + ';' + down; document.body.appendChild(out);
    })();
    </script></body>"""
    harness.write_text(survey.index.read_text().replace("</body>", probe))
    try:
        sorted_dom = _run_chromium(harness, tmp_path / "profile", "--dump-dom")
    finally:
        harness.unlink()
    found = re.search(r'<pre id="sort-result">([^<]*)</pre>', sorted_dom.stdout)
    assert found, sorted_dom.stdout[-3000:]
    up, down = found.group(1).split(";")
    summary = pd.read_csv(survey.out / "models.csv").query("group_spec == @GROUP")
    ascending = ",".join(summary.sort_values("mean_eq").model)
    assert up == f"{ascending}|ascending"
    assert down == ",".join(reversed(ascending.split(","))) + "|descending"

    # Negative control: a broken image and a script error are reported.
    broken = survey.out / "broken-check.html"
    broken.write_text(survey.index.read_text().replace(
        "</body>", '<img src="figures/missing.png"><script>notDefined();</script></body>'))
    try:
        bad = _run_chromium(broken, tmp_path / "profile", "--dump-dom")
    finally:
        broken.unlink()
    assert 'data-js-errors="0"' not in bad.stdout
    assert "failed to load" in bad.stdout and "notDefined" in bad.stdout
    assert any("notDefined" in line for line in _console_lines(bad.stderr, broken))


# ---------------------------------------------------------------------------------------------
# synthetic stores: edge cases


def _result(model: str, eq: list[float], *, top1: float | None = 0.5, consistency: float = 0.8,
            nan_ci: bool = False, group: str = GROUP) -> Result:
    rows = []
    n_layers = len(eq)
    for depth, value in enumerate(eq):
        layer = f"layer{depth}"
        rel = depth / max(n_layers - 1, 1)
        for comparison, v in (("eq", value), ("inv", value / 2), ("chance", 0.1)):
            low, high = (math.nan, math.nan) if nan_ci else (v - 0.05, v + 0.05)
            row = dict(model=model, layer=layer, depth=depth, rel_depth=rel, kind="spatial",
                       layout="NCHW", grid_h=8, grid_w=8, channels=16, prefix=0, stride_y=8.0,
                       stride_x=8.0, stride=8.0, offset_y=0.0, offset_x=0.0, element="mean",
                       exact=True, comparison=comparison, metric="corr", value=v, ci_low=low,
                       ci_high=high, n=4, pooled=False)
            rows.append(row)
    model_rows = [(model, "consistency", consistency, consistency - 0.1, consistency + 0.1, 4)]
    if top1 is not None:
        model_rows += [(model, "top1", top1, top1 - 0.1, top1 + 0.1, 4),
                       (model, "top5", min(1.0, top1 + 0.2), 0.0, 1.0, 4)]
    return Result(frame=pd.DataFrame(rows, columns=FRAME_COLUMNS),
                  model_frame=pd.DataFrame(model_rows, columns=MODEL_COLUMNS),
                  config={"model": model, "group": group, "images": 4,
                          "images_per_second": 10.0, "pretrained": False})


def _store(path: Path, results: list[Result], failed: list[str] = ()) -> Path:
    with SurveyStore(path, create=True) as store:
        for i, result in enumerate(results):
            store.add_result(result, model=result.config["model"], config_hash=f"h{i}",
                             family=result.config["model"].rstrip("0123456789"),
                             group_spec=result.config["group"])
        for model in failed:
            store.add_error(model=model, config_hash="hf", attempt=1, batch_size=8,
                            kind="RuntimeError", message="RuntimeError: <boom> & bust",
                            traceback="Traceback ...", group_spec=GROUP, family="x")
    return path


def test_correlations_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=30)
    y = 0.6 * x + rng.normal(size=30)
    stats = correlations(x, y, n_boot=1000, seed=0)
    assert stats["n"] == 30 and stats["n_boot"] == 1000
    assert stats["pearson"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    ranks = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    assert stats["spearman"] == pytest.approx(np.corrcoef(*ranks)[0, 1])
    for name in ("pearson", "spearman"):
        assert stats[f"{name}_low"] < stats[name] < stats[f"{name}_high"]
    assert correlations(x, y, n_boot=1000, seed=0) == stats  # seeded
    # Monotone but not linear: Spearman 1, Pearson below.
    stats = correlations(np.arange(10.0), np.exp(np.arange(10.0)), n_boot=100)
    assert stats["spearman"] == pytest.approx(1.0) and stats["pearson"] < 0.9
    # Fewer than 3 models, or a constant side: no correlation (NaN), no error.
    assert math.isnan(correlations([1.0, 2.0], [3.0, 4.0])["pearson"])
    assert math.isnan(correlations([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])["spearman"])
    assert correlations([1.0, np.nan, 2.0, 3.0], [1.0, 5.0, 2.0, 3.5])["n"] == 3


@pytest.mark.parametrize("crowded", ["top left", "top right"])
def test_the_correlation_box_and_legend_leave_the_points_free(tmp_path, crowded):
    """The box goes to the corner with the fewest points, the legend where matplotlib finds
    room: with models crowded in a top corner, neither covers a point."""
    rng = np.random.default_rng(0)
    left = crowded == "top left"
    results = []
    for i in range(12):  # mean equivariance near one side, accuracy high
        eq = (0.32 + 0.02 * rng.random()) if left else (0.88 + 0.02 * rng.random())
        results.append(_result(f"net{i}", [eq, eq], top1=0.9 - 0.01 * i))
    results.append(_result("anchor20", [0.6, 0.6], top1=0.1))  # far corner of the range
    results.append(_result("anchor21", [0.9 if left else 0.3] * 2, top1=0.12))
    store = _store(tmp_path / "crowd.sqlite", results)
    fig = plot_accuracy_vs_equivariance(store, n_boot=50, annotate=False)
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    points = ax.transData.transform(ax.collections[0].get_offsets())
    (text,) = [t for t in ax.texts if t.get_gid() == "correlation"]
    for artist in (text.get_bbox_patch(), ax.get_legend()):
        box = artist.get_window_extent(renderer)
        inside = [box.contains(x, y) for x, y in points]
        assert not any(inside), f"{artist.__class__.__name__} covers {sum(inside)} points"
    plt.close(fig)


def test_synthetic_edge_cases(tmp_path):
    # A model without top-1 among models with one: left out of the top-1 panel, and said so.
    results = [_result("net1", [0.9, 0.8, 0.7], top1=0.7),
               _result("net2", [0.8, 0.6, 0.4], top1=0.5),
               _result("net3", [0.7, 0.5, 0.3], top1=0.2),
               _result("other4", [0.6, 0.6], top1=None, nan_ci=True)]
    store = _store(tmp_path / "a.sqlite", results, failed=["broken7"])
    summary = model_summary(store)
    assert summary.set_index("model").mean_eq.to_dict() == pytest.approx(
        {"net1": 0.8, "net2": 0.6, "net3": 0.5, "other4": 0.6})
    assert math.isnan(summary.set_index("model").top1["other4"])
    fig = plot_accuracy_vs_equivariance(store, n_boot=100)
    ax = fig.axes[0]
    assert len(ax.collections[0].get_offsets()) == 3
    assert "1 without top1" in ax.get_title() and ax.get_ylabel() == "top-1 accuracy"
    text = _correlation_text(ax)
    pearson = np.corrcoef([0.8, 0.6, 0.5], [0.7, 0.5, 0.2])[0, 1]
    assert f"Pearson r = {pearson:.2f} [" in text and "Spearman ρ = 1.00 [" in text
    assert "100 resamples, n = 3" in text
    plt.close(fig)
    # NaN CIs: the bands are empty, the lines are there.
    with open_store(store) as opened:
        rows = opened.scores.query("model == 'other4'")
    fig = plot_model_depth(rows)
    assert [len(line.get_xdata()) for line in fig.axes[0].get_lines()] == [2, 2, 2]
    plt.close(fig)
    # The report: failed model escaped, a missing top-1 shown as a dash.
    index = build_report(store, tmp_path / "out", n_boot=100)
    page = index.read_text()
    assert "broken7" in page and "&lt;boom&gt; &amp; bust" in page
    row = re.search(r"<tr><td[^>]*><a[^>]*>other4</a>.*?</tr>", page).group(0)
    assert "–" in row

    # No model with top-1 (data without labels): consistency, and the axis says so.
    store = _store(tmp_path / "b.sqlite", [_result("net1", [0.9, 0.8], top1=None),
                                            _result("net2", [0.5, 0.4], top1=None,
                                                    consistency=0.3)])
    fig = plot_accuracy_vs_equivariance(store)
    ax = fig.axes[0]
    assert "consistency" in ax.get_ylabel() and "no top-1" in ax.get_ylabel()
    assert len(ax.collections[0].get_offsets()) == 2
    assert "n/a" in _correlation_text(ax)
    plt.close(fig)
    assert "consistency (no top-1)" in build_report(store, tmp_path / "out-b").read_text()

    # One model only.
    store = _store(tmp_path / "c.sqlite", [_result("solo1", [0.9, 0.8, 0.7])])
    fig = plot_accuracy_vs_equivariance(store)
    assert len(fig.axes) == 1 and len(fig.axes[0].collections[0].get_offsets()) == 1
    plt.close(fig)
    assert build_report(store, tmp_path / "out-c").is_file()
    assert (tmp_path / "out-c" / "figures" / "depth-solo1.svg").is_file()


def test_a_model_whose_eq_scores_are_all_nan_keeps_its_row(tmp_path):
    # What resnet18 restricted to layer4 at 64 px gives under rotate:90 (no valid position on
    # its 2 x 2 map), surveyed beside a model with scores: the report raised a KeyError on the
    # model's name (pivot_table left its all-NaN row out).
    results = [_result("net1", [0.9, 0.8], top1=0.6, group="rotate:90"),
               _result("nan2", [math.nan], top1=0.4, group="rotate:90")]
    store = _store(tmp_path / "s.sqlite", results)
    index = build_report(store, tmp_path / "out", n_boot=50)
    page = index.read_text()
    table = page.split('id="models-table"')[1].split("</table>")[0]
    assert table.count("<tr>") == 1 + 2
    row = re.search(r"<tr><td[^>]*><a[^>]*>nan2</a>.*?</tr>", table).group(0)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    header = re.findall(r"<th[^>]*>(.*?)</th>", table)
    assert cells[header.index("mean eq rotate:90")] == "–"
    assert cells[header.index("top-1")] == "0.400"
    models = pd.read_csv(tmp_path / "out" / "models.csv").set_index("model")
    assert math.isnan(models.mean_eq["nan2"]) and models.mean_eq["net1"] == pytest.approx(0.85)


def test_a_warning_of_a_finished_model_is_shown(tmp_path):
    warned = _result("net2", [0.8, 0.7])
    warned.config["warning"] = ("1 layer(s) leave out images, first 'layer1': scores from 3 of "
                                "4 images (the other 1 have NaN or infinite features there)")
    store = _store(tmp_path / "s.sqlite", [_result("net1", [0.9, 0.8]), warned])
    page = build_report(store, tmp_path / "out", n_boot=50).read_text()
    section = page.split('<h2 id="warnings">')[1].split("<h2")[0]
    assert "net2" in section and "net1" not in section
    assert "first &#x27;layer1&#x27;: scores from 3 of 4 images" in section
    assert 'href="#warnings">warnings (1)</a>' in page and "1 with a warning" in page
    row = re.search(r"<tr><td[^>]*><a[^>]*>net2</a>.*?</tr>", page).group(0)
    assert 'href="#warnings"' in row and "(warning)" in row
    row = re.search(r"<tr><td[^>]*><a[^>]*>net1</a>.*?</tr>", page).group(0)
    assert "(warning)" not in row


def test_plot_model_depth_needs_one_model(tmp_path):
    store = _store(tmp_path / "s.sqlite", [_result("net1", [0.9]), _result("net2", [0.8])])
    with open_store(store) as opened:
        scores = opened.scores
    with pytest.raises(ValueError, match="2 models"):
        plot_model_depth(scores)
    fig = plot_model_depth(scores, model="net2")
    assert len(fig.axes) == 1
    plt.close(fig)
    with pytest.raises(ValueError, match="no rows for metric 'cosine'"):
        plot_model_depth(scores, metric="cosine", model="net1")


def test_a_rewritten_report_removes_the_figures_it_no_longer_writes(tmp_path):
    """A report written again into its folder removes its own figures that it does not write
    again (those of a model no longer in the store), listed in its manifest or, for a report
    written before the manifest existed, linked from its index.html; files of the user stay."""
    out = tmp_path / "out"
    three = _store(tmp_path / "three.sqlite", [_result(f"net{i}", [0.9, 0.5]) for i in (1, 2, 3)])
    build_report(three, out, n_boot=10)
    figures = out / "figures"
    depth = {f"depth-net{i}.{fmt}" for i in (1, 2, 3) for fmt in ("png", "svg")}
    assert depth <= {p.name for p in figures.iterdir()}
    mine = ["depth-mine.png", "notes.txt", "accuracy_vs_equivariance.pdf"]
    for name in mine:
        (figures / name).write_text("the user's")
    (out / "elsewhere.png").write_text("the user's")
    one = _store(tmp_path / "one.sqlite", [_result("net2", [0.9, 0.5])])
    build_report(one, out, n_boot=10)
    left = {p.name for p in figures.iterdir()}
    assert left == {"depth-net2.png", "depth-net2.svg", "accuracy_vs_equivariance.png",
                    "accuracy_vs_equivariance.svg", ".equifast-report.json", *mine}
    assert all((figures / name).read_text() == "the user's" for name in mine)
    assert (out / "elsewhere.png").is_file()
    # a report written before the manifest: the figures its index.html links to are its own
    build_report(three, out, n_boot=10)
    (figures / ".equifast-report.json").unlink()
    build_report(one, out, n_boot=10)
    assert {p.name for p in figures.iterdir()} == left
    # a manifest that names anything but a plain file name in figures/ removes nothing there
    (figures / ".equifast-report.json").write_text(
        '{"files": ["../elsewhere.png", "/etc/passwd", "", "..", 3]}')
    build_report(one, out, n_boot=10)
    assert (out / "elsewhere.png").is_file() and {p.name for p in figures.iterdir()} == left


def test_a_report_that_fails_half_way_names_the_figures_it_wrote(tmp_path, monkeypatch):
    """A report that stops on an error after some figures leaves them listed in its manifest
    (with the earlier report's), so that the next report removes those it does not write."""
    import equifast.plots

    out = tmp_path / "out"
    figures = out / "figures"
    build_report(_store(tmp_path / "old.sqlite", [_result("old1", [0.9, 0.5])]), out, n_boot=10)
    three = _store(tmp_path / "three.sqlite", [_result(f"net{i}", [0.9, 0.5]) for i in (1, 2, 3)])
    plot_depth = equifast.plots.plot_model_depth

    def fail_on_net3(rows, metric):
        if set(rows.model) == {"net3"}:
            raise RuntimeError("disk full")
        return plot_depth(rows, metric)

    monkeypatch.setattr(equifast.plots, "plot_model_depth", fail_on_net3)
    with pytest.raises(RuntimeError, match="disk full"):
        build_report(three, out, n_boot=10)
    listed = set(json.loads((figures / ".equifast-report.json").read_text())["files"])
    written = {f"depth-{name}.{fmt}" for name in ("net1", "net2", "old1") for fmt in ("png", "svg")}
    assert listed == written | {"accuracy_vs_equivariance.png", "accuracy_vs_equivariance.svg"}
    assert written <= {path.name for path in figures.iterdir()}
    monkeypatch.undo()
    build_report(_store(tmp_path / "one.sqlite", [_result("net2", [0.9, 0.5])]), out, n_boot=10)
    assert {path.name for path in figures.iterdir()} == {
        "depth-net2.png", "depth-net2.svg", "accuracy_vs_equivariance.png",
        "accuracy_vs_equivariance.svg", ".equifast-report.json"}


def test_a_score_that_is_lower_for_equivariant_maps_is_named_so(tmp_path):
    """--metric one_minus_corr: the page and the figure called its mean "mean equivariance",
    whose correlations with accuracy then had the opposite sign of what they read as; they name
    the score and say that lower is more equivariant (and what a negative correlation means)."""
    results = []
    for i, (eq, top1) in enumerate([([0.9, 0.8], 0.7), ([0.6, 0.5], 0.5), ([0.4, 0.2], 0.2)]):
        result = _result(f"net{i + 1}", eq, top1=top1)
        flipped = result.frame.assign(metric="one_minus_corr", value=1 - result.frame.value,
                                      ci_low=1 - result.frame.ci_high,
                                      ci_high=1 - result.frame.ci_low)
        result.frame = pd.concat([result.frame, flipped], ignore_index=True)
        results.append(result)
    store = _store(tmp_path / "s.sqlite", results)
    pages = {metric: build_report(store, tmp_path / metric, metric=metric, n_boot=20).read_text()
             for metric in ("corr", "one_minus_corr")}
    lower = pages["one_minus_corr"]
    assert "mean equivariance" not in lower and "Accuracy against equivariance" not in lower
    assert ('<h2 id="accuracy">Accuracy against mean <code>one_minus_corr</code> (lower: more '
            "equivariant)</h2>") in lower
    assert ("mean one_minus_corr is the mean over layers of the <code>one_minus_corr</code> "
            "score of the eq comparison (element mean): lower is more equivariant. A negative "
            "correlation therefore says that the more equivariant models are the more "
            "accurate.") in lower
    assert "group (lower: more equivariant)" in lower
    assert 'title="mean over layers of the eq one_minus_corr; lower: more equivariant"' in lower
    higher = pages["corr"]
    assert "<h2 id=\"accuracy\">Accuracy against equivariance</h2>" in higher
    assert "score of the eq comparison (element mean): higher is more equivariant." in higher
    assert "lower:" not in higher and "negative correlation" not in higher

    def pearson(page: str) -> float:
        row = re.search(r"<tr><td>translate:8,16</td>.*?</tr>", page).group(0)
        return float(re.findall(r'<td class="num">([-0-9.]+)', row)[1])

    assert pearson(higher) > 0.9 and pearson(lower) == pytest.approx(-pearson(higher), abs=1e-3)
    for metric, words in (("corr", "mean equivariance (corr, eq, mean over layers; higher: more "
                                   "equivariant)"),
                          ("one_minus_corr", "mean one_minus_corr (eq, mean over layers; "
                                             "lower: more equivariant)")):
        fig = plot_accuracy_vs_equivariance(store, metric, n_boot=20)
        assert fig.axes[0].get_xlabel() == words
        box = _correlation_text(fig.axes[0])
        assert ("lower one_minus_corr: more equivariant\n(r < 0: the more equivariant, the "
                "more accurate)" in box) == (metric != "corr")
        plt.close(fig)


def test_report_errors_are_clear(tmp_path):
    missing = tmp_path / "nowhere.sqlite"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_report(missing, tmp_path / "out")
    only_failed = _store(tmp_path / "failed.sqlite", [], failed=["broken7"])
    with pytest.raises(ValueError, match="no finished run"):
        build_report(only_failed, tmp_path / "out")
    store = _store(tmp_path / "ok.sqlite", [_result("net1", [0.9, 0.8])])
    with pytest.raises(ValueError, match="no score 'psnr'.*corr"):
        build_report(store, tmp_path / "out", metric="psnr")
    # flat_frac (the share of constant channels) would be read as mean equivariance
    with pytest.raises(ValueError, match="flat_frac is not an equivariance score"):
        build_report(store, tmp_path / "out", metric="flat_frac")


def test_report_progress_bar(tmp_path, capsys):
    store = _store(tmp_path / "s.sqlite", [_result(f"net{i}", [0.9, 0.5]) for i in range(3)])
    build_report(store, tmp_path / "out", progress=True, n_boot=50)
    assert "report" in capsys.readouterr().err
    build_report(store, tmp_path / "out", n_boot=50)  # 3 models: no bar by default
    assert "report" not in capsys.readouterr().err


def test_cli_report(tmp_path, capsys):
    store = _store(tmp_path / "s.sqlite", [_result("net1", [0.9, 0.8]), _result("net2", [0.5])])
    out = tmp_path / "rep"
    assert main(["report", str(store), "-o", str(out)]) == 0
    assert str(out / "index.html") in capsys.readouterr().out
    assert (out / "figures" / "depth-net2.png").is_file()
    assert main(["report", str(store), "--out", str(out), "--metric", "corr_vs_chance"]) == 2
    assert "no score 'corr_vs_chance'" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.sqlite")]) == 2
    assert "missing.sqlite" in capsys.readouterr().err


def test_report_output_folder_errors_name_the_path(tmp_path, make_unwritable):
    """From Python as on the command line: an out_dir that is a file, lies under one, or takes no
    file is one ValueError naming the path, before anything is written."""
    store = _store(tmp_path / "s.sqlite", [_result("net1", [0.9, 0.8])])
    afile = tmp_path / "afile"
    afile.write_text("x")
    expected = "; expected a folder (for index.html and figures/)"
    with pytest.raises(ValueError, match=re.escape(f"out_dir {afile}: is an existing file"
                                                   + expected)):
        build_report(store, afile, n_boot=10)
    with pytest.raises(ValueError, match=re.escape(
            f"out_dir {afile / 'sub'}: cannot create the folder '{afile / 'sub'}': "
            f"'{afile}' is an existing file" + expected)):
        build_report(store, afile / "sub", n_boot=10)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "figures").write_text("x")
    with pytest.raises(ValueError, match=re.escape(
            f"out_dir {blocked}: cannot create the folder '{blocked / 'figures'}': it is an "
            "existing file" + expected)):
        build_report(store, blocked, n_boot=10)
    assert afile.read_text() == "x" and sorted(p.name for p in blocked.iterdir()) == ["figures"]
    locked = tmp_path / "locked"
    locked.mkdir()
    make_unwritable(locked)
    with pytest.raises(ValueError, match=re.escape(
            f"out_dir {locked}: cannot write in the folder '{locked}': Permission denied")):
        build_report(store, locked, n_boot=10)
    assert list(locked.iterdir()) == []


class _TwoConvs(nn.Module):
    def __init__(self, num_classes: int = 10, **_):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


@register_model
def eqtest_report_two_convs(pretrained: bool = False, **kwargs) -> nn.Module:
    return _TwoConvs(**kwargs)


def test_a_disc_mask_is_a_configuration_of_its_own(tmp_path):
    """The same group with and without mask="disc": two runs, labelled by the mask."""
    store = tmp_path / "s.sqlite"
    common = dict(group="rotate:90,45", limit=2, input_size=(32, 32), bootstrap=0,
                  progress=False, log=None)
    for settings in ({}, {"mask": "disc"}):
        summary = run_survey(["eqtest_report_two_convs"], "samples", store, **common, **settings)
        assert summary.done == ["eqtest_report_two_convs"]
    summary = model_summary(store)
    assert summary.group_label.tolist() == ["rotate:90,45 (mask=None)",
                                            "rotate:90,45 (mask=disc)"]
    assert summary.mean_eq[0] != summary.mean_eq[1]  # the disc changes the numbers
    with open_store(store) as opened:
        masked = opened.result("eqtest_report_two_convs", mask="disc")
    assert masked.config["mask"] == "disc"


def test_configurations_of_one_group_are_kept_apart(tmp_path):
    """One model under one group with channel_map identity and match, and with subpixel skip:
    three configurations, three columns and panels, each labelled by what differs (the report
    kept one column per group_spec, where the latest run won)."""
    store = tmp_path / "s.sqlite"
    common = dict(group="rotate:90", limit=2, input_size=(32, 32), bootstrap=0, progress=False,
                  log=None)
    for settings in ({}, {"channel_map": "match"}, {"subpixel": "skip"}):
        summary = run_survey(["eqtest_report_two_convs"], "samples", store, **common, **settings)
        assert summary.done == ["eqtest_report_two_convs"]
    labels = ["rotate:90 (subpixel=bilinear, channel_map=identity)",
              "rotate:90 (subpixel=bilinear, channel_map=match)",
              "rotate:90 (subpixel=skip, channel_map=identity)"]
    summary = model_summary(store)
    assert summary.group_label.tolist() == labels
    assert summary.group_spec.tolist() == ["rotate:90"] * 3
    assert summary.run_id.nunique() == 3  # each its own run, not the latest run three times
    assert summary.mean_eq[0] != summary.mean_eq[1]  # the channel map changes the numbers
    index = build_report(store, tmp_path / "out", n_boot=10)
    page = index.read_text()
    table = page.split('id="models-table"')[1].split("</table>")[0]
    header = re.findall(r"<th[^>]*>(.*?)</th>", table)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", table.split("<tbody>")[1])
    for label, value in zip(labels, summary.mean_eq):
        assert cells[header.index(f"mean eq {label}")] == f"{value:.3f}"
    models = pd.read_csv(tmp_path / "out" / "models.csv")
    assert models.group_label.tolist() == labels
    fig = plot_accuracy_vs_equivariance(store, n_boot=10)
    assert [ax.get_title().split(" (1 model")[0] for ax in fig.axes] == labels
    plt.close(fig)
    with open_store(store) as opened:
        scores, runs = opened.scores, opened.runs
    label_of = dict(zip(runs.run_id, configuration_labels(runs)))
    fig = plot_model_depth(scores.assign(group_label=scores.run_id.map(label_of)))
    assert [ax.get_title().split(": corr under ")[1].rsplit(" (mean)", 1)[0]
            for ax in fig.axes] == labels
    plt.close(fig)
    # Only the group_spec where every run of the group was measured alike (a store of one
    # configuration, or one written before a setting existed: its runs lack the key).
    alike = runs.assign(config=['{"channel_map": "identity"}', "{}", None])
    assert configuration_labels(alike).tolist() == ["rotate:90"] * 3
    # A pair of offsets as the engine writes it (its Python text: a finished run) and as the
    # survey's configuration does (JSON, floats: a failed run), or with ints: one setting.
    offsets = runs.assign(config=['{"align": "(0.5, 1.0)"}', '{"align": [0.5, 1]}',
                                  '{"align": "center"}'])
    assert configuration_labels(offsets).tolist() == ["rotate:90 (align=[0.5,1])"] * 2 + [
        "rotate:90 (align=center)"]
    mapping = runs.assign(config=['{"align": "{\'conv2\': 0, \'conv1\': (1, 1)}"}',
                                  '{"align": {"conv1": [1.0, 1.0], "conv2": 0.0}}', "{}"])
    assert configuration_labels(mapping).tolist() == [
        'rotate:90 (align={"conv1":[1,1],"conv2":0})'] * 2 + ["rotate:90 (align=auto)"]


def test_runs_with_another_input_size_data_or_layers_are_other_configurations(tmp_path):
    """One model under one group at two input sizes, on the sample photographs and on a folder,
    and with other layers: four configurations, where the report kept one column (the label
    covered subpixel, channel_map, align and pooled only, so that the latest run won and the
    correlations mixed the others). Each is labelled by what differs, the failed run of the
    folder's survey by its configuration's label; store.result picks each by label or setting;
    a store whose finished runs do not keep their survey's configuration still reads, from a
    run of the same config_hash, from the model's own input size, or as unknown data."""
    store = tmp_path / "s.sqlite"
    photos = _labelled_folder(tmp_path / "photos")
    model = "eqtest_report_two_convs"
    common = dict(group="translate:4", limit=2, bootstrap=0, progress=False, log=None)
    small = (32, 32)
    for data, settings, models in (("samples", {"input_size": small}, [model]),
                                   ("samples", {"input_size": (48, 48)}, [model]),
                                   (photos, {"input_size": small, "loader": "folder"},
                                    [model, FAILING]),
                                   ("samples", {"input_size": small, "layers": "conv1"}, [model])):
        summary = run_survey(models, data, store, **common, **settings)
        assert summary.done == [model]
    labels = ["translate:4 (data=samples, input_size=32x32, layers=default)",
              "translate:4 (data=samples, input_size=48x48, layers=default)",
              "translate:4 (data=photos, input_size=32x32, layers=default)",
              "translate:4 (data=samples, input_size=32x32, layers=conv1)"]
    summary = model_summary(store)
    assert summary.group_label.tolist() == labels
    assert summary.run_id.nunique() == 4 and summary.mean_eq.nunique() == 4
    page = build_report(store, tmp_path / "out", n_boot=10).read_text()
    table = page.split('id="models-table"')[1].split("</table>")[0]
    header = re.findall(r"<th[^>]*>(.*?)</th>", table)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", table.split("<tbody>")[1])
    for label, value in zip(labels, summary.mean_eq):
        assert cells[header.index(f"mean eq {label}")] == f"{value:.3f}"
    assert _failed_section(page) == [(FAILING, labels[2])]
    with open_store(store) as opened:
        runs = opened.runs
        hashes = runs[runs.model == model].config_hash.tolist()
        for label, key in zip(labels, hashes):
            assert opened.result(model, label).config == opened.result(
                model, config_hash=key).config
        with pytest.warns(UserWarning, match="4 configurations"):
            opened.result(model)
        for settings, index in (({"input_size": 48}, 1), ({"input_size": (48, 48)}, 1),
                                ({"data": str(photos)}, 2), ({"data": photos}, 2),
                                ({"layers": "conv1"}, 3), ({"layers": ["conv1"]}, 3),
                                ({"data": "samples", "input_size": 32, "layers": None}, 0)):
            assert opened.result(model, **settings).config["survey"]["group"] == [
                ["translate(0,4)", "crop"], ["translate(4,0)", "crop"]]
            assert opened.result(model, **settings).config == opened.result(
                model, config_hash=hashes[index]).config, settings
        with pytest.raises(KeyError, match="input_size=64.*'translate:4 \\(data=samples"):
            opened.result(model, input_size=64)

    # Finished runs stored without their survey's configuration (before runs kept it): the
    # folder's run reads it from its failed run (the same config_hash), the input size is told
    # from the model's own (32 and 48 are not its 224), the data of the others is unknown, and
    # the layers are taken as the default (so that the conv1 run counts as the first one's).
    with sqlite3.connect(store) as db:
        for run_id, text in db.execute("SELECT run_id, config FROM runs WHERE status = 'done'"
                                       ).fetchall():
            config = json.loads(text)
            del config["survey"]
            db.execute("UPDATE runs SET config = ? WHERE run_id = ?", (json.dumps(config),
                                                                       run_id))
    assert model_summary(store).group_label.tolist() == [
        "translate:4 (data=?, input_size=48x48)", "translate:4 (data=photos, input_size=32x32)",
        "translate:4 (data=?, input_size=32x32)"]


def test_labels_show_folders_by_the_parts_that_tell_them_apart():
    """Data folders are shown by the last parts of their paths that tell the runs' folders
    apart (never two configurations under one label); layouts and model_kwargs as JSON, their
    absence as 'default'."""
    surveys = [{"data": "/data/a/val"}, {"data": "/data/b/val"}, {"data": "samples"},
               {"data": "/data/samples/", "layouts": {"conv2": "NHWC"}},
               {"data": "/data/a/val", "model_kwargs": {"drop_rate": 0.5}}]
    runs = pd.DataFrame({"group_spec": "flip", "status": "done",
                         "config": [json.dumps({"survey": {"group": [], **survey}})
                                    for survey in surveys]})
    assert configuration_labels(runs).tolist() == [
        "flip (data=a/val, layouts=default, model_kwargs=default)",
        "flip (data=b/val, layouts=default, model_kwargs=default)",
        "flip (data=samples, layouts=default, model_kwargs=default)",
        'flip (data=data/samples, layouts={"conv2":"NHWC"}, model_kwargs=default)',
        'flip (data=a/val, layouts=default, model_kwargs={"drop_rate":0.5})']
    # one folder: not shown
    same = runs.assign(config=[json.dumps({"survey": {"data": "/data/a/val"}})] * 5)
    assert configuration_labels(same).tolist() == ["flip"] * 5


def _failed_section(page: str) -> list[tuple[str, str]]:
    """(model, group) of each row of the report's failed-models table."""
    section = page.split('<h2 id="failed">')[1].split("<h2")[0]
    return [tuple(re.findall(r"<td[^>]*>(.*?)</td>", row)[:2])
            for row in re.findall(r"<tr><td.*?</tr>", section)]


def test_failed_configurations_of_one_group_are_told_apart(tmp_path):
    """Failed runs are labelled like finished ones (the table showed the bare group_spec, so
    that two failed configurations of one group looked alike): a failed run measured as a
    finished one gets its label; one measured otherwise is labelled among all runs of its group;
    the finished runs' labels (the report's columns) do not change."""
    offsets = _result("net1", [0.9, 0.8], group="rotate:90")
    offsets.config["align"] = "(0.5, 0.5)"  # as the engine writes a pair of offsets
    match = _result("net2", [0.7, 0.6], group="rotate:90")
    match.config["channel_map"] = "match"
    store = _store(tmp_path / "s.sqlite", [offsets, match])
    failures = [("broken3", "fa", {}), ("broken3", "fb", {"channel_map": "match"}),
                ("broken3", "fc", {"subpixel": "skip"}),
                ("broken4", "fd", {"align": [0.5, 0.5]}), ("broken4", "fe", {"align": "auto"})]
    with SurveyStore(store) as opened:
        for model, key, config in failures:
            opened.add_error(model=model, config_hash=key, attempt=1, batch_size=8,
                             kind="RuntimeError", message="RuntimeError: boom",
                             traceback="Traceback ...", group_spec="rotate:90", family="x",
                             config=config)
        runs = opened.runs
    done_labels = ["rotate:90 (channel_map=identity, align=[0.5,0.5])",
                   "rotate:90 (channel_map=match, align=auto)"]
    expected = [("broken3", "rotate:90 (subpixel=bilinear, channel_map=identity, align=auto)"),
                ("broken3", "rotate:90 (channel_map=match, align=auto)"),
                ("broken3", "rotate:90 (subpixel=skip, channel_map=identity, align=auto)"),
                ("broken4", "rotate:90 (channel_map=identity, align=[0.5,0.5])"),
                ("broken4", "rotate:90 (subpixel=bilinear, channel_map=identity, align=auto)")]
    assert configuration_labels(runs).tolist() == done_labels + [g for _, g in expected]
    done = runs[runs.status == "done"]
    assert configuration_labels(done).tolist() == done_labels  # the failed runs change nothing
    page = build_report(store, tmp_path / "out", n_boot=10).read_text()
    assert _failed_section(page) == [(m, html.escape(g)) for m, g in expected]
    header = re.findall(r"<th[^>]*>(.*?)</th>",
                        page.split('id="models-table"')[1].split("</thead>")[0])
    assert [h for h in header if h.startswith("mean eq")] == [f"mean eq {g}"
                                                             for g in done_labels]

    # A store written before runs kept their configuration: the group_spec, as before.
    with sqlite3.connect(store) as db:
        db.execute("ALTER TABLE runs DROP COLUMN config")
    page = build_report(store, tmp_path / "old", n_boot=10).read_text()
    assert _failed_section(page) == [(m, "rotate:90") for m, _, _ in failures]


def test_linear_maps_of_two_ridges_are_configurations_of_their_own(tmp_path):
    """channel_map="linear" at the default ridge and at another: two runs, labelled by the
    ridge (the first run's survey configuration leaves the default out)."""
    store = tmp_path / "s.sqlite"
    common = dict(group="flip", limit=4, input_size=(32, 32), bootstrap=0, progress=False,
                  log=None, channel_map="linear")
    for settings in ({}, {"ridge": 0.5}):
        summary = run_survey(["eqtest_report_two_convs"], "samples", store, **common, **settings)
        assert summary.done == ["eqtest_report_two_convs"]
    summary = model_summary(store)
    assert summary.group_label.tolist() == ["flip (ridge=0.001)", "flip (ridge=0.5)"]
    with open_store(store) as opened:
        fitted = opened.result("eqtest_report_two_convs", ridge=0.5)
    assert fitted.config["ridge"] == 0.5 and fitted.config["channel_map"] == "linear"
