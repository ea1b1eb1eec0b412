"""The HTML report of a survey: ``equifast report STORE -o DIR`` writes ``DIR/index.html``.

The report is one self-contained page (inline CSS and JavaScript, no CDN: it works offline, e.g.
copied off a cluster) with its figures beside it in ``DIR/figures`` as PNG and SVG:

- accuracy against mean equivariance over every model, coloured by architecture family, with
  Pearson and Spearman correlations and their bootstrap CIs (one panel per group);
- a table of models (family, top-1, consistency, mean equivariance per group, images/s) that sorts
  when a column header is clicked;
- the failed models with their error, the warnings of finished ones (layers whose scores leave
  out images with NaN features), and how many input files each run skipped;
- per model, scores against relative depth for equivariance, invariance and chance with 95% CI
  bands (one panel per group);
- the environments the runs ran in.

A group measured with other settings too (``channel_map``, ``subpixel``, ``align``, ``pooled``,
the data, input size, layers, layouts or model_kwargs of the survey:
:data:`equifast.plots.CONFIGURATION_KEYS`) is one column and panel per configuration, labelled
by what differs, e.g. ``rotate:90 (channel_map=match)`` or ``translate:8 (data=val,
input_size=160x160)``; the latest run of a model counts per
configuration (:func:`equifast.plots.configuration_labels`). The failed models and the warnings
name the configuration by the same label.

``DIR/models.csv`` holds the numbers of the models table (one row per model and configuration).
``DIR/figures/.equifast-report.json`` lists the figures the report wrote: written again into
the same folder, it removes those of the earlier report that it no longer writes (a model gone
from the store), and no other file.

Example:
    >>> from equifast.report import build_report
    >>> build_report("survey.sqlite", "report")                       # doctest: +SKIP
    PosixPath('report/index.html')
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, unquote

import pandas as pd

__all__ = ["build_report"]

FORMATS = ("png", "svg")
# A progress bar over the per-model figures from this many models on (progress=None).
PROGRESS_FROM = 10
_EXPECTED_FOLDER = "expected a folder (for index.html and figures/)"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1400px; padding: 0 1.5em; color: #1a1a1a; background: #fff; line-height: 1.4; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.meta { color: #555; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: #f3f5f8; }
table.sortable thead th { cursor: pointer; user-select: none; white-space: nowrap; }
table.sortable thead th:hover { background: #e4e9f0; }
table.sortable thead th::after { content: " \\2195"; color: #aaa; }
table.sortable thead th[aria-sort="ascending"]::after { content: " \\25B2"; color: #333; }
table.sortable thead th[aria-sort="descending"]::after { content: " \\25BC"; color: #333; }
tbody tr:nth-child(even) { background: #fafafa; }
.error { font-family: ui-monospace, monospace; font-size: 0.85em; white-space: pre-wrap; }
#js-errors { background: #fee; border: 1px solid #c00; padding: 0.5em; white-space: pre-wrap; }
nav a { margin-right: 1em; }
"""

# In <head>, before anything else runs: every script error, failed image and console.error is
# written into #js-errors (and counted in <html data-js-errors>), so that a reader sees it and a
# headless browser's DOM dump shows it.
_ERRORS_JS = """
(function () {
  var errors = [];
  function show() {
    document.documentElement.setAttribute('data-js-errors', String(errors.length));
    var box = document.getElementById('js-errors');
    if (!box) { return; }
    box.hidden = errors.length === 0;
    box.textContent = errors.join('\\n');
  }
  function record(text) { errors.push(String(text)); show(); }
  window.addEventListener('error', function (event) {
    var target = event.target;
    if (target && target !== window && (target.src || target.href)) {
      record('failed to load ' + (target.src || target.href));
    } else {
      record('error: ' + event.message + ' (' + (event.filename || '') + ':'
             + (event.lineno || '') + ')');
    }
  }, true);
  window.addEventListener('unhandledrejection', function (event) {
    record('unhandled rejection: ' + event.reason);
  });
  var consoleError = console.error;
  console.error = function () {
    record('console.error: ' + Array.prototype.join.call(arguments, ' '));
    return consoleError.apply(console, arguments);
  };
  document.addEventListener('DOMContentLoaded', show);
})();
"""

# Click (or Enter on) a header to sort by that column; again to reverse. Cells sort by their
# data-sort value (numbers for columns with data-type="number"); empty values stay last.
_SORT_JS = """
(function () {
  function value(cell) {
    var v = cell.getAttribute('data-sort');
    return v === null ? cell.textContent.trim() : v;
  }
  function sortBy(table, th, column) {
    var numeric = th.getAttribute('data-type') === 'number';
    var ascending = th.getAttribute('aria-sort') !== 'ascending';
    Array.prototype.forEach.call(th.parentNode.cells, function (h) {
      h.removeAttribute('aria-sort');
    });
    th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = value(a.cells[column]), y = value(b.cells[column]);
      if (x === '' || y === '') { return (x === '') - (y === ''); }
      var order;
      if (numeric) {
        x = parseFloat(x); y = parseFloat(y);
        if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); }
        order = x - y;
      } else {
        order = x.localeCompare(y, undefined, {numeric: true});
      }
      return ascending ? order : -order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
      th.tabIndex = 0;
      th.title = 'sort by ' + th.textContent.trim();
      th.addEventListener('click', function () { sortBy(table, th, column); });
      th.addEventListener('keydown', function (event) {
        if (event.key === 'Enter' || event.key === ' ') {
          event.preventDefault();
          sortBy(table, th, column);
        }
      });
    });
  });
  document.documentElement.setAttribute('data-sortable', 'ready');
})();
"""


def _slug(name: str, taken: set[str]) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.") or "model"
    unique, i = slug, 2
    while unique.lower() in taken:
        unique, i = f"{slug}-{i}", i + 1
    taken.add(unique.lower())
    return unique


def _number(value, digits: int = 3) -> tuple[str, str]:
    """``(text, data-sort)`` of a number; ``("–", "")`` when missing."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)) or pd.isna(value):
        return "–", ""
    return f"{float(value):.{digits}f}", repr(float(value))


def _cell(text: str, sort: str | None = None, numeric: bool = False, title: str = "") -> str:
    attrs = ' class="num"' if numeric else ""
    if sort is not None:
        attrs += f' data-sort="{html.escape(sort)}"'
    if title:
        attrs += f' title="{html.escape(title)}"'
    return f"<td{attrs}>{text}</td>"


def _save(fig, stem: Path) -> list[Path]:
    import matplotlib
    import matplotlib.pyplot as plt

    paths = []
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        for fmt in FORMATS:
            path = stem.with_suffix(f".{fmt}")
            fig.savefig(path, dpi=110)
            paths.append(path)
    plt.close(fig)
    return paths


# The figures a report wrote, listed beside them: a rewritten report removes those it no longer
# writes (a model gone from the store, another metric's failed figure) and no other file.
_MANIFEST = ".equifast-report.json"
_TITLE = "<h1>equifast survey report</h1>"


def _own_figures(out_dir: Path) -> set[str]:
    """The names of the files in ``out_dir/figures`` that an earlier report wrote: those its
    manifest lists, or, for a report written before there was one, those its ``index.html``
    (an equifast report's) links to. Plain names only: nothing outside ``figures`` is named."""
    figures = out_dir / "figures"
    names: list = []
    try:
        names = json.loads((figures / _MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        try:
            page = (out_dir / "index.html").read_text(encoding="utf-8")
        except (OSError, ValueError):
            page = ""
        if _TITLE in page:
            names = [unquote(name) for name in re.findall(r'(?:src|href)="figures/([^"/]+)"',
                                                          page)]
    if not isinstance(names, list):
        return set()
    return {name for name in names if isinstance(name, str) and name == Path(name).name
            and name not in ("", ".", "..", _MANIFEST)}


class _FigureFiles:
    """The figures this report writes into ``figures``, listed in the manifest as they are
    written, beside those an earlier report left (:func:`_own_figures`): a report that fails
    half-way leaves every figure it wrote named there, so the next report removes those it does
    not write again."""

    def __init__(self, figures: Path, before: set[str]):
        self.figures, self.before, self.written = figures, before, []

    def save(self, fig, stem: str) -> None:
        self.written += _save(fig, self.figures / stem)
        self._list(self.before | {path.name for path in self.written})

    def finish(self) -> list[Path]:
        """Remove the files an earlier report wrote that this one did not write again, then
        list only this report's. Returns the removed paths."""
        kept = {path.name for path in self.written}
        removed = []
        for name in sorted(self.before - kept):
            path = self.figures / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
                removed.append(path)
        self._list(kept)
        return removed

    def _list(self, names: set[str]) -> None:
        (self.figures / _MANIFEST).write_text(
            json.dumps({"written_by": "equifast report", "files": sorted(names)}, indent=1)
            + "\n", encoding="utf-8")


def _figure_html(stem: str, alt: str, caption: str, lazy: bool = False) -> str:
    png, svg = quote(f"figures/{stem}.png"), quote(f"figures/{stem}.svg")
    loading = ' loading="lazy"' if lazy else ""
    return (f'<figure><a href="{svg}"><img src="{png}" alt="{html.escape(alt)}"{loading}></a>'
            f'<figcaption>{caption} <a href="{png}">PNG</a> · <a href="{svg}">SVG</a>'
            f"</figcaption></figure>")


def _correlation_text(stats: dict) -> str:
    def one(name: str) -> str:
        value = stats[name]
        if stats["n"] < 3:
            return "n/a (needs 3 models)"
        if not math.isfinite(value):
            return "n/a (a side is constant)"
        low, high = stats[f"{name}_low"], stats[f"{name}_high"]
        return f"{value:.3f}" + (f" [{low:.3f}, {high:.3f}]" if math.isfinite(low) else "")

    return one("pearson"), one("spearman")


def build_report(store_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 metric: str = "corr", progress: bool | None = None, n_boot: int = 1000,
                 seed: int = 0) -> Path:
    """Write the HTML report of a survey store to ``out_dir/index.html`` (figures in
    ``out_dir/figures``, PNG and SVG; the models table in ``out_dir/models.csv``).

    Args:
        store_path: The survey's SQLite store.
        out_dir: The report folder (created; files of an earlier report are overwritten, and
            the figures it wrote that this one does not write again are removed: those listed
            in ``figures/.equifast-report.json``, or linked from an earlier report's
            ``index.html``; no other file is touched).
        metric: The score shown (default ``corr``; e.g. ``corr_vs_chance``, ``cosine``).
        progress: A progress bar over the per-model figures (default: from 10 models on).
        n_boot: Bootstrap resamples of the models for the correlation CIs.
        seed: Seed of the bootstrap.

    Returns:
        The path of ``index.html``.

    Raises:
        FileNotFoundError: no store at ``store_path``.
        ValueError: the store holds no finished run, or no score ``metric``; ``out_dir`` (or a
            parent) is an existing file, or a folder that cannot be created or written.
    """
    from equifast import plots
    from equifast.paths import check_folder
    from equifast.survey import open_store

    # (created once the store is read: a report that fails on its store leaves no empty folder)
    check_folder(out_dir, "out_dir", expected=_EXPECTED_FOLDER, create=False)
    store_path = Path(store_path)
    if not store_path.exists():
        raise FileNotFoundError(f"no survey store at {store_path} (run `equifast survey --store "
                                f"{store_path} ...` first)")
    with open_store(store_path) as store:
        runs = store.runs
        scores = store.scores
        frames = {"runs": runs, "scores": scores, "model_scores": store.model_scores}
        skipped = store.skipped
        errors = store.errors
        environments = store.environments
    # one column / panel per configuration: a group measured with other settings (another
    # channel_map, subpixel...) is kept apart from it, labelled by what differs; a failed run
    # is labelled as the finished runs of its configuration (without changing their labels)
    runs = runs.assign(group_label=plots.configuration_labels(runs))
    done = runs[runs.status == "done"]
    failed = runs[runs.status == "failed"]
    # Finished models with a warning about their numbers (runs.warning).
    warned = done[done.warning.notna() & (done.warning != "")]
    if done.empty:
        raise ValueError(f"{store_path} holds no finished run ({len(failed)} failed): nothing "
                         "to report; run the survey first (`equifast survey --store "
                         f"{store_path} ...`)")
    metrics = sorted(scores.metric.dropna().unique())
    if metric == "flat_frac":  # (the share of constant channels, a diagnostic of each layer)
        raise ValueError("flat_frac is not an equivariance score: it is the fraction of "
                         "spatially constant channels, which the report's mean equivariance and "
                         "its correlations with accuracy would read as equivariance; scores "
                         f"there: {[m for m in metrics if m != 'flat_frac']}")
    if metric not in metrics:
        raise ValueError(f"no score {metric!r} in {store_path}; scores there: {metrics}")

    out_dir = Path(out_dir)
    check_folder(out_dir, "out_dir", expected=_EXPECTED_FOLDER)
    figures = out_dir / "figures"
    check_folder(figures, "out_dir", out_dir, _EXPECTED_FOLDER)
    # (read before index.html is written again)
    figure_files = _FigureFiles(figures, _own_figures(out_dir))
    summary = plots.model_summary(frames, metric)
    # one_minus_corr, nde, rel_err: lower is more equivariant, and correlations change sign
    direction = plots.more_equivariant(metric)
    mean_name = plots.mean_score_name(metric)
    code = f"<code>{html.escape(metric)}</code>"
    sign_note = ("" if direction == "higher" else
                 " A negative correlation therefore says that the more equivariant models are "
                 "the more accurate.")
    accuracy_title = ("Accuracy against equivariance" if direction == "higher" else
                      f"Accuracy against mean {code} (lower: more equivariant)")
    summary.to_csv(out_dir / "models.csv", index=False)
    groups = list(dict.fromkeys(summary.group_label))
    scores = scores.assign(group_label=scores.run_id.map(dict(zip(done.run_id,
                                                                  done.group_label))))

    # All models: accuracy against mean equivariance.
    fig = plots.plot_accuracy_vs_equivariance(summary, metric, groups=groups, n_boot=n_boot,
                                              seed=seed)
    figure_files.save(fig, "accuracy_vs_equivariance")
    correlation_rows = []
    for group in groups:
        part = summary[summary.group_label == group]
        column = plots.accuracy_column(part)
        points = part[part[column].notna()]
        stats = plots.correlations(points.mean_eq, points[column], n_boot=n_boot, seed=seed)
        pearson, spearman = _correlation_text(stats)
        correlation_rows.append(
            f"<tr><td>{html.escape(str(group))}</td><td>"
            f"{'top-1' if column == 'top1' else 'consistency (no top-1)'}</td>"
            f'<td class="num">{stats["n"]}</td><td class="num">{pearson}</td>'
            f'<td class="num">{spearman}</td></tr>')

    # Per model: scores against depth, one panel per group.
    models = list(dict.fromkeys(done.model))
    taken: set[str] = {"accuracy_vs_equivariance"}
    depth_sections, anchors = [], {}
    show_bar = len(models) >= PROGRESS_FROM if progress is None else progress
    from tqdm.auto import tqdm

    for model in tqdm(models, desc="report", unit="model", disable=not show_bar):
        slug = _slug(model, taken)
        anchors[model] = slug
        rows = scores[scores.model == model]
        title = f'<h3 id="depth-{html.escape(slug)}">{html.escape(model)}</h3>'
        try:
            fig = plots.plot_model_depth(rows, metric)
        except ValueError as error:
            depth_sections.append(f"{title}<p>No depth figure: {html.escape(str(error))}</p>")
            continue
        figure_files.save(fig, f"depth-{slug}")
        depth_sections.append(title + _figure_html(
            f"depth-{slug}", f"{model}: {metric} against relative depth",
            f"{html.escape(model)}: {html.escape(metric)} against relative depth; shaded: 95% "
            "bootstrap CI over images.", lazy=len(models) > 8))

    # The models table: one row per model, mean equivariance per group.
    latest = summary.sort_values("run_id").groupby("model", sort=False).last()
    # dropna=False: a finished model whose eq scores are all NaN keeps its row (a '–' cell)
    mean_eq = summary.pivot_table(index="model", columns="group_label", values="mean_eq",
                                  aggfunc="last", dropna=False)
    # baseline="init" runs: the learned part of the mean equivariance, per group
    mean_learned = summary.pivot_table(index="model", columns="group_label",
                                       values="mean_learned", aggfunc="last", dropna=False)
    learned_groups = [g for g in groups
                      if g in mean_learned.columns and mean_learned[g].notna().any()]
    header = ['<th>model</th>', '<th>family</th>', '<th>pretrained</th>',
              '<th data-type="number">top-1</th>', '<th data-type="number">consistency</th>']
    header += [f'<th data-type="number" title="mean over layers of the eq {html.escape(metric)}; '
               f'{direction}: more equivariant">mean eq {html.escape(str(g))}</th>'
               for g in groups]
    header += [f'<th data-type="number" title="mean eq minus that of the initialized copy '
               f'({"positive" if direction == "higher" else "negative"}: more equivariant than '
               f'at init)">learned eq {html.escape(str(g))}</th>' for g in learned_groups]
    header += ['<th data-type="number">images/s</th>', '<th data-type="number">images</th>']
    body = []
    for model in models:
        row = latest.loc[model]
        warning = "; ".join(warned.warning[warned.model == model])
        mark = (f' <a href="#warnings" title="{html.escape(warning)}">(warning)</a>'
                if warning else "")
        cells = [_cell(f'<a href="#depth-{html.escape(anchors[model])}">{html.escape(model)}'
                       f"</a>{mark}", model),
                 _cell(html.escape(str(row.family)), str(row.family)),
                 _cell({True: "yes", False: "no"}.get(row.pretrained, "–"))]
        for name in ("top1", "consistency"):
            text, sort = _number(row[name])
            ci = ""
            if sort and math.isfinite(row[f"{name}_low"]):
                ci = f"95% CI [{row[f'{name}_low']:.3f}, {row[f'{name}_high']:.3f}]"
            cells.append(_cell(text, sort, numeric=True, title=ci))
        for group in groups:
            value = (mean_eq.at[model, group]
                     if group in mean_eq.columns and model in mean_eq.index else math.nan)
            cells.append(_cell(*_number(value), numeric=True))
        for group in learned_groups:
            value = mean_learned.at[model, group] if model in mean_learned.index else math.nan
            cells.append(_cell(*_number(value), numeric=True))
        cells.append(_cell(*_number(row.images_per_second, 1), numeric=True))
        cells.append(_cell(*_number(row.images, 0), numeric=True))
        body.append("<tr>" + "".join(cells) + "</tr>")

    if warned.empty:
        warned_html = "<p>No finished model has a warning.</p>"
    else:
        warned_html = (
            "<table><thead><tr><th>model</th><th>group</th><th>warning</th></tr></thead><tbody>"
            + "".join(f"<tr><td>{html.escape(str(run.model))}</td>"
                      f"<td>{html.escape(str(run.group_label))}</td>"
                      f'<td class="error">{html.escape(str(run.warning))}</td></tr>'
                      for _, run in warned.iterrows())
            + "</tbody></table>")

    # Failed models and skipped files.
    if failed.empty:
        failed_html = "<p>No model failed.</p>"
    else:
        attempts = errors.groupby(["model", "config_hash"]).size() if not errors.empty else None
        items = []
        for _, run in failed.iterrows():
            count = 0 if attempts is None else int(attempts.get((run.model, run.config_hash), 0))
            items.append(
                f"<tr><td>{html.escape(str(run.model))}</td>"
                f"<td>{html.escape(str(run.group_label))}</td>"
                f'<td class="num">{count}</td>'
                f'<td class="error">{html.escape(str(run.error or "?"))}</td></tr>')
        failed_html = ("<table><thead><tr><th>model</th><th>group</th><th>errors recorded</th>"
                       "<th>error</th></tr></thead><tbody>" + "".join(items)
                       + "</tbody></table>")
    if skipped.empty:
        skipped_html = "<p>No input file was skipped.</p>"
    else:
        counts = skipped.groupby("model", sort=False).agg(
            files=("path", "size"), reason=("reason", "first"), example=("path", "first"))
        skipped_html = (
            f"<p>{len(skipped)} unreadable input file(s) over {len(counts)} model(s).</p>"
            "<table><thead><tr><th>model</th><th>skipped files</th><th>example</th>"
            "<th>reason</th></tr></thead><tbody>"
            + "".join(f"<tr><td>{html.escape(str(m))}</td>"
                      f'<td class="num">{int(r.files)}</td>'
                      f"<td>{html.escape(str(r.example))}</td>"
                      f"<td>{html.escape(str(r.reason))}</td></tr>"
                      for m, r in counts.iterrows())
            + "</tbody></table>")

    env_columns = [c for c in ("hostname", "device", "device_name", "torch", "timm", "equifast",
                               "git_commit") if c in environments.columns]
    env_html = "<p>No environment recorded.</p>" if environments.empty else (
        "<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in env_columns)
        + "</tr></thead><tbody>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(str(e[c]))}</td>" for c in env_columns)
                  + "</tr>" for _, e in environments.iterrows())
        + "</tbody></table>")

    accuracy_note = ("Accuracy is top-1 over the survey's labelled images; in a group without "
                     "labels it falls back to consistency (the axis label says so).")
    generated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>equifast report: {html.escape(store_path.name)}</title>
<script>{_ERRORS_JS}</script>
<style>{_CSS}</style>
</head>
<body>
<div id="js-errors" hidden></div>
{_TITLE}
<p class="meta">Store <code>{html.escape(str(store_path))}</code> · {len(done)} finished run(s)
of {len(models)} model(s), {len(failed)} failed, {len(warned)} with a warning · group(s):
{html.escape(", ".join(groups))}
· score <code>{html.escape(metric)}</code> · generated {generated}</p>
<nav><a href="#accuracy">accuracy vs {html.escape(mean_name.removeprefix("mean "))}</a>
<a href="#models">models</a>
<a href="#failed">failed ({len(failed)})</a><a href="#warnings">warnings ({len(warned)})</a>
<a href="#skipped">skipped files</a>
<a href="#depth">depth profiles</a><a href="#environments">environments</a></nav>

<h2 id="accuracy">{accuracy_title}</h2>
{_figure_html("accuracy_vs_equivariance", f"accuracy against {mean_name}",
              f"One point per model; {html.escape(mean_name)} is the mean over layers of the "
              f"{code} score of the eq comparison (element mean): {direction} is more "
              f"equivariant.{sign_note} " + accuracy_note)}
<table><thead><tr><th>group</th><th>accuracy</th><th>models</th>
<th>Pearson r [95% CI]</th><th>Spearman ρ [95% CI]</th></tr></thead>
<tbody>{"".join(correlation_rows)}</tbody></table>
<p class="meta">CIs: percentile bootstrap over models, {n_boot} resamples (seed {seed}).
{sign_note}</p>

<h2 id="models">Models</h2>
<p class="meta">Click a column header to sort. top-1, consistency and images/s are of each model's
latest run; mean eq is the mean over layers of the {code} score of the eq comparison, per
group ({direction}: more equivariant).</p>
<table id="models-table" class="sortable"><thead><tr>{"".join(header)}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody></table>

<h2 id="failed">Failed models</h2>
{failed_html}

<h2 id="warnings">Warnings</h2>
<p class="meta">Finished models whose numbers need a second look: layers whose scores leave out
images (features NaN, infinite or zero there) are means over the images left.</p>
{warned_html}

<h2 id="skipped">Skipped files</h2>
{skipped_html}

<h2 id="depth">Scores against depth</h2>
<p class="meta">Per model: equivariance, invariance and chance (an unrelated image) of
{code} against relative depth, one panel per group{"" if direction == "higher" else
 f" (lower {code}: the compared maps agree more; for eq, more equivariant)"}.</p>
{chr(10).join(depth_sections)}

<h2 id="environments">Environments</h2>
{env_html}
<script>{_SORT_JS}</script>
</body>
</html>
"""
    index = out_dir / "index.html"
    index.write_text(page, encoding="utf-8")
    figure_files.finish()
    return index
