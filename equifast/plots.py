"""Plots of measurement results and surveys (matplotlib figures for analysis code and reports).

Every function returns a matplotlib ``Figure`` (Agg backend: no screen needed); save it with
``fig.savefig("depth.png")``.

- :func:`plot_depth`: one :class:`equifast.Result`, scores against relative depth.
- :func:`plot_model_depth`: one model of a survey, one panel per group.
- :func:`plot_accuracy_vs_equivariance`: every model of a survey, accuracy against mean
  equivariance, coloured by architecture family, with Pearson and Spearman correlations and their
  bootstrap CIs (one panel per group).
- :func:`model_summary` and :func:`correlations`: the numbers behind the survey plots.

Example:
    >>> fig = plot_depth(result)                                        # doctest: +SKIP
    >>> fig.savefig("depth.png")                                        # doctest: +SKIP
    >>> from equifast.survey import open_store
    >>> store = open_store("survey.sqlite")                             # doctest: +SKIP
    >>> plot_accuracy_vs_equivariance(store).savefig("acc.svg")         # doctest: +SKIP
    >>> plot_model_depth(store.scores.query("model == 'resnet18'"))     # doctest: +SKIP
"""

from __future__ import annotations

import ast
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no screen on survey machines; callers can switch backends before import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

__all__ = [
    "COMPARISON_STYLE",
    "CONFIGURATION_KEYS",
    "LOWER_IS_MORE_EQUIVARIANT",
    "SURVEY_KEYS",
    "UNKNOWN_SETTING",
    "accuracy_column",
    "configuration_labels",
    "correlations",
    "mean_score_name",
    "model_summary",
    "more_equivariant",
    "plot_accuracy_vs_equivariance",
    "plot_depth",
    "plot_lie_depth",
    "plot_model_depth",
]

# Scores that are 0 for equal maps and grow as the maps differ: their lower values are the more
# equivariant ones. Every other score (corr, corr_vs_chance, corr_channelwise, cosine, psnr) is
# higher for the more equivariant maps.
LOWER_IS_MORE_EQUIVARIANT = frozenset({"one_minus_corr", "nde", "rel_err"})


def more_equivariant(metric: str) -> str:
    """``"higher"`` or ``"lower"``: which values of ``metric`` are the more equivariant."""
    return "lower" if metric in LOWER_IS_MORE_EQUIVARIANT else "higher"


def mean_score_name(metric: str) -> str:
    """What the survey figures and the report call the mean over layers of a model's ``eq``
    ``metric``: ``"mean equivariance"`` for a score that is higher for the more equivariant
    maps, else the score's own name (``"mean one_minus_corr"``), which rises as equivariance
    falls."""
    return "mean equivariance" if more_equivariant(metric) == "higher" else f"mean {metric}"


COMPARISON_STYLE = {
    "eq": ("equivariance", "tab:blue"),
    "inv": ("invariance", "tab:orange"),
    "chance": ("chance", "tab:grey"),
}


def _draw_depth(ax, rows: pd.DataFrame, metric: str) -> None:
    """One line per comparison (eq, inv, chance) against relative depth, with 95% CI bands."""
    for comparison, (label, colour) in COMPARISON_STYLE.items():
        part = rows[rows.comparison == comparison].sort_values("depth")
        if part.empty:
            continue
        ax.plot(part.rel_depth, part.value, marker="o", color=colour, label=label)
        ax.fill_between(part.rel_depth, part.ci_low.astype(float), part.ci_high.astype(float),
                        color=colour, alpha=0.2)
        # baseline="init": the initialized copy's equivariance, dashed; the gap is what was learned
        init = pd.to_numeric(part["init"], errors="coerce") if "init" in part else None
        if comparison == "eq" and init is not None and init.notna().any():
            ax.plot(part.rel_depth, init, linestyle="--", marker=".", color=colour,
                    label=f"{label} at init")
    _label_depth_axes(ax, rows, metric)


def _label_depth_axes(ax, rows: pd.DataFrame, metric: str) -> None:
    """Layer names at their relative depths on x, the metric on y, grid and legend."""
    layers = rows.drop_duplicates("layer").sort_values("depth")
    ax.set_xticks(layers.rel_depth, layers.layer, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("layer (relative depth)")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _figure_of(ax):
    """``(figure, axes)``: a new 7 x 4 figure when ``ax`` is None, else ``ax``'s."""
    if ax is None:
        return plt.subplots(figsize=(7, 4), constrained_layout=True)
    return ax.figure, ax


def plot_depth(result, metric: str = "corr", element: str = "mean", ax=None):
    """Scores against relative depth, one line per comparison, with 95% CI bands.

    Args:
        result: A :class:`equifast.Result`.
        metric: Which score (default ``corr``).
        element: A group element name, or ``"mean"`` (the average over elements).
        ax: Axes to draw on (default: a new figure).

    Returns:
        The matplotlib ``Figure``.
    """
    frame: pd.DataFrame = result.frame
    rows = frame[(frame.metric == metric) & (frame.element == element)]
    if rows.empty:
        raise ValueError(f"no rows for metric {metric!r} and element {element!r} in the result")
    fig, ax = _figure_of(ax)
    _draw_depth(ax, rows, metric)
    model = result.config.get("model", "")
    group = result.config.get("group", "")
    ax.set_title(f"{model}: {metric} under {group} ({element})")
    return fig


def plot_lie_depth(result, metric: str = "lee_rel", ax=None):
    """Lie derivatives against relative depth, one line per generator, with 95% CI bands, on a
    logarithmic axis (they span orders of magnitude between layers and generators).

    Args:
        result: A :class:`equifast.lie.LieResult`.
        metric: ``"lee_rel"`` (default) or ``"lee"``.
        ax: Axes to draw on (default: a new figure).

    Returns:
        The matplotlib ``Figure``.
    """
    frame: pd.DataFrame = result.frame
    rows = frame[frame.metric == metric]
    if rows.empty:
        raise ValueError(f"no rows for metric {metric!r} in the result")
    fig, ax = _figure_of(ax)
    depth = rows.depth.astype(float)
    rows = rows.assign(rel_depth=depth / max(float(depth.max()), 1.0))
    for generator in dict.fromkeys(rows.generator):
        part = rows[rows.generator == generator].sort_values("depth")
        line, = ax.plot(part.rel_depth, part.value, marker="o", label=generator)
        ax.fill_between(part.rel_depth, part.ci_low.astype(float), part.ci_high.astype(float),
                        color=line.get_color(), alpha=0.2)
    if (rows.value > 0).any():
        ax.set_yscale("log")
    _label_depth_axes(ax, rows, metric)
    ax.set_title(f"{result.config.get('model', '')}: Lie derivative ({metric})")
    return fig


# Settings that change what is measured under a group, not only how many images or resamples
# (limit, bootstrap, and the seed of a pretrained model's bootstrap) nor what else is reported
# (metrics, comparisons, baseline): runs of one group that differ in one of them are other
# configurations, kept apart in the survey plots and the report (see configuration_labels).
# The first six are equifast.measure's, as the run's engine configuration records them; the
# others are the survey's (SURVEY_KEYS), read from the survey configuration that config_hash
# hashes, as given: the engine records what they came to for each model (its own input size,
# its layer names), which differ between models measured alike.
CONFIGURATION_KEYS = ("subpixel", "channel_map", "ridge", "mask", "align", "pooled", "data",
                      "input_size", "layers", "layouts", "model_kwargs")
SURVEY_KEYS = ("data", "input_size", "layers", "layouts", "model_kwargs")
# The text of a setting a run does not record: the data of a run stored before runs kept their
# survey's configuration (and no run of the same config_hash has it).
UNKNOWN_SETTING = "?"
_UNKNOWN = object()


def _configuration_defaults() -> dict[str, Any]:
    """What a run whose stored configuration lacks a key of :data:`CONFIGURATION_KEYS` was
    measured with: equifast.measure's default (a store written before the setting existed, and
    the survey's configuration, which leaves defaults out); the data has none (unknown)."""
    from equifast.survey.runner import _measure_defaults

    defaults = {**_measure_defaults(),  # (the survey's own reading of measure's signature)
                "data": _UNKNOWN, "model_kwargs": None}
    return {key: defaults[key] for key in CONFIGURATION_KEYS}


def _canonical_setting(value: Any) -> Any:
    """A setting as one value however it was written: the engine writes a pair or mapping of
    offsets as its Python text (``"(0.5, 0.5)"``), the survey's configuration as JSON with floats
    (``[0.5, 0.5]``); both are the list ``[0.5, 0.5]``, and ``0.0`` is ``0``."""
    if isinstance(value, str) and value[:1] in "([{":
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value
    if isinstance(value, Mapping):
        return {str(k): _canonical_setting(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical_setting(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # the survey's configuration writes offsets as floats: 0.0 is 0
    return value


def _survey_setting_text(key: str, value: Any) -> str:
    """The text of a setting of :data:`SURVEY_KEYS`, as given to a survey (stored in its
    configuration) or to :meth:`SurveyStore.result <equifast.survey.SurveyStore.result>`:
    ``default`` for the default, an input size as ``HxW``, layers as the command line writes
    them (``layer1 layer2``), a folder by its absolute path."""
    from equifast.survey.runner import _fingerprint

    if value is _UNKNOWN:
        return UNKNOWN_SETTING
    if key == "input_size":
        from equifast.data.geometry import check_input_size

        try:
            size = check_input_size(value)
        except ValueError:
            return str(value)
        return "default" if size is None else f"{size[0]}x{size[1]}"
    if key == "data":
        return str(_fingerprint(value, paths=True))
    if key == "layers" and value in (None, "default", ["default"], ("default",)):
        return "default"
    if value is None or (isinstance(value, Mapping) and not value):
        return "default"  # no layout overrides, no model_kwargs
    value = _fingerprint(value)
    if key == "layers" and isinstance(value, list):
        return " ".join(map(str, value))
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True,
                                                           separators=(",", ":"))


def _setting_text(value: Any, key: str | None = None) -> str:
    """The text of a setting in a label (and what :meth:`SurveyStore.result
    <equifast.survey.SurveyStore.result>` compares); ``key`` one of :data:`SURVEY_KEYS` reads it
    as that setting (:func:`_survey_setting_text`)."""
    if key in SURVEY_KEYS:
        return _survey_setting_text(key, value)
    value = _canonical_setting(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    return str(value)


def _survey_configuration(config: dict[str, Any], status: Any) -> dict[str, Any] | None:
    """The survey's configuration of a run (what its ``config_hash`` hashes), or None where the
    run does not keep it: a finished run keeps it under ``"survey"`` in its configuration (since
    2026-11-27), a failed run's configuration is that one (its ``group`` a list of elements)."""
    survey = config.get("survey")
    if isinstance(survey, dict):
        return survey
    if status == "failed" or (status is None and isinstance(config.get("group"), list)):
        return config
    return None


def _inferred_setting(config: dict[str, Any], key: str, default: Any) -> Any:
    """A setting of :data:`SURVEY_KEYS` of a finished run stored without its survey's
    configuration: an input size other than the model's own (its preprocessing) was asked for;
    the data is unknown; the rest is taken as the default."""
    if key == "input_size":
        used = config.get("input_size")
        preprocess = config.get("preprocess")
        own = preprocess.get("input_size") if isinstance(preprocess, dict) else None
        if isinstance(used, list) and isinstance(own, list) and used != own:
            return used
        return None
    return default


def _configuration_settings(runs: pd.DataFrame) -> pd.DataFrame:
    """The settings of :data:`CONFIGURATION_KEYS` of each run, as the text the labels write
    (:func:`configuration_labels`), indexed like ``runs``: what tells configurations of one group
    apart.

    Args:
        runs: Rows of :attr:`SurveyStore.runs <equifast.survey.SurveyStore.runs>` (``config``,
            the run's configuration as JSON; a setting missing there, or no ``config`` column,
            is :func:`equifast.measure`'s default). The settings of :data:`SURVEY_KEYS` come from
            the survey's configuration that the run keeps, else from another run of the same
            ``config_hash`` in ``runs``, else :func:`_inferred_setting` (the data
            :data:`UNKNOWN_SETTING`).
    """
    defaults = _configuration_defaults()

    def parsed(text: Any) -> dict[str, Any]:
        try:
            config = json.loads(text) if isinstance(text, str) and text else {}
        except ValueError:
            config = {}
        return config if isinstance(config, dict) else {}

    configs = [parsed(text) for text in
               (runs["config"] if "config" in runs.columns else [None] * len(runs))]
    statuses = runs["status"] if "status" in runs.columns else [None] * len(runs)
    surveys = [_survey_configuration(config, status)
               for config, status in zip(configs, statuses)]
    hashes = runs["config_hash"] if "config_hash" in runs.columns else [None] * len(runs)
    # a run stored before finished runs kept their survey's configuration: that of a run of
    # the same configuration (a failed run keeps it), where there is one
    by_hash = {key: survey for key, survey in zip(hashes, surveys)
               if survey is not None and key is not None}
    rows = []
    for config, survey, key in zip(configs, surveys, hashes):
        survey = survey if survey is not None else by_hash.get(key)
        row = {}
        for name in CONFIGURATION_KEYS:
            if name not in SURVEY_KEYS:
                value = config.get(name, defaults[name])
            elif survey is not None:
                value = survey.get(name, defaults[name])
            else:
                value = _inferred_setting(config, name, defaults[name])
            row[name] = _setting_text(value, name)
        rows.append(row)
    return pd.DataFrame(rows, index=runs.index, columns=list(CONFIGURATION_KEYS))


def _shown_settings(key: str, texts: list[str]) -> dict[str, str]:
    """How a label shows each of the different ``texts`` of a setting: folders by the last
    parts of their paths that tell them apart (``val`` beside ``train`` for
    ``/data/imagenet/val`` and ``/data/imagenet/train``), anything else as it is."""
    unique = list(dict.fromkeys(texts))
    if key != "data":
        return {text: text for text in unique}
    parts = {text: text.rstrip("/").split("/") if text.startswith("/") else [text]
             for text in unique}
    deepest = max(len(p) for p in parts.values())
    for depth in range(1, deepest + 1):
        shown = {text: "/".join(p[-depth:]) if depth < len(p) else text
                 for text, p in parts.items()}
        if len(set(shown.values())) == len(unique):
            return shown
    return {text: text for text in unique}


def _labels_among(groups: pd.Series, table: pd.DataFrame) -> pd.Series:
    """Each run's group, followed by the settings in which the runs of its group differ."""
    labels = groups.copy()
    for group, rows in table.groupby(groups, sort=False):
        differing = [key for key in CONFIGURATION_KEYS if rows[key].nunique() > 1]
        if differing:
            shown = {key: _shown_settings(key, rows[key].tolist()) for key in differing}
            labels[rows.index] = [
                f"{group} ({', '.join(f'{key}={shown[key][row[key]]}' for key in differing)})"
                for _, row in rows.iterrows()]
    return labels


def configuration_labels(runs: pd.DataFrame) -> pd.Series:
    """The label of each run's configuration: its ``group_spec``, followed by the settings of
    :data:`CONFIGURATION_KEYS` in which runs of that group differ, e.g. ``rotate:90
    (channel_map=match)`` beside ``rotate:90 (channel_map=identity)``, or ``translate:8
    (data=val, input_size=default)`` beside ``translate:8 (data=train, input_size=160x160)``;
    the ``group_spec`` alone where every run of the group was measured alike. The default of a
    setting reads ``default`` (``input_size``, ``layers``, ``layouts``, ``model_kwargs``) or
    the default's name (``align=auto``); a folder is shown by the last parts of its path that
    tell it apart from the others; the data of a run stored before runs kept their survey's
    configuration is ``?`` (:data:`UNKNOWN_SETTING`) unless a run of the same ``config_hash``
    has it.

    The finished runs (``status`` ``'done'``, where ``runs`` has a ``status`` column) are
    labelled among themselves: a failed run does not change their labels (the report's columns).
    A failed run gets the label of the finished runs measured as it was; one measured otherwise
    is labelled among every run of its group, finished or failed, so that two failed
    configurations of one group are told apart.

    Args:
        runs: Rows of :attr:`SurveyStore.runs <equifast.survey.SurveyStore.runs>` (``group_spec``
            and ``config``, the run's configuration as JSON; a setting missing there, as in a
            store written before it existed, is :func:`equifast.measure`'s default).

    Returns:
        The labels, indexed like ``runs``.
    """
    groups = runs["group_spec"].astype(object).where(runs["group_spec"].notna(), "?").astype(str)
    if "config" not in runs.columns or runs.empty:
        return groups
    table = _configuration_settings(runs)
    if "status" not in runs.columns:
        return _labels_among(groups, table)
    done = (runs["status"] == "done").to_numpy()
    labels = _labels_among(groups[done], table[done]).reindex(runs.index)
    if done.all():
        return labels
    among_all = _labels_among(groups, table)
    finished = {(group, *settings): label for group, settings, label
                in zip(groups[done], table[done].itertuples(index=False), labels[done])}
    for index, group, settings in zip(runs.index[~done], groups[~done],
                                      table[~done].itertuples(index=False)):
        labels[index] = finished.get((group, *settings), among_all[index])
    return labels


def _panel_column(frame: pd.DataFrame) -> str:
    """What a frame's runs are grouped by in panels and columns: ``group_label`` where it has
    one (configurations apart), else ``group_spec``."""
    return "group_label" if "group_label" in frame.columns else "group_spec"


def _latest_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """Keep, per ``(model, group_label)``, the rows of the latest ``run_id`` (a store can hold a
    model twice under one configuration with settings that change only how many images or
    resamples, e.g. another ``limit``); ``group_spec`` where there is no ``group_label``."""
    if "run_id" not in frame.columns or frame.empty:
        return frame
    keys = [c for c in ("model", "group_spec", "group_label") if c in frame.columns]
    latest = frame.groupby(keys, dropna=False)["run_id"].transform("max")
    return frame[frame["run_id"] == latest]


def plot_model_depth(scores, metric: str = "corr", element: str = "mean", *,
                     model: str | None = None, ncols: int = 2):
    """One model's scores against relative depth: equivariance, invariance and chance with 95% CI
    bands, one panel per group.

    Args:
        scores: The rows of one model: a slice of :attr:`SurveyStore.scores
            <equifast.survey.SurveyStore.scores>` (panels per ``group_spec``, or per
            ``group_label`` where the frame has that column, as the report's does: see
            :func:`configuration_labels`; the latest run per panel), a :attr:`Result.frame
            <equifast.Result.frame>`, or a :class:`equifast.Result`.
        metric: Which score (default ``corr``).
        element: A group element name, or ``"mean"`` (the average over elements).
        model: Pick this model when ``scores`` holds several.
        ncols: Panels per row.

    Returns:
        The matplotlib ``Figure`` (one Axes per group, in order of first appearance).

    Raises:
        ValueError: no rows for the metric/element, or several models and no ``model``.
    """
    groups_default = None
    if hasattr(scores, "frame") and hasattr(scores, "config"):  # a Result
        groups_default = str(scores.config.get("group", ""))
        scores = scores.frame
    frame = scores
    if model is not None:
        frame = frame[frame.model == model]
        if frame.empty:
            known = sorted(scores.model.unique())
            raise ValueError(f"no rows of model {model!r} (models: {known})")
    models = list(dict.fromkeys(frame.model))
    if len(models) > 1:
        raise ValueError(f"plot_model_depth: the frame holds {len(models)} models {models[:5]}; "
                         "pass model=NAME or a frame of one model")
    rows = frame[(frame.metric == metric) & (frame.element == element)]
    if rows.empty:
        found = sorted(frame.metric.unique()) if not frame.empty else []
        raise ValueError(f"no rows for metric {metric!r} and element {element!r} "
                         f"(metrics there: {found})")
    rows = _latest_runs(rows)
    panel = _panel_column(rows)
    groups = list(dict.fromkeys(rows[panel])) if panel in rows.columns else [groups_default]
    ncols = max(1, min(ncols, len(groups)))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows),
                             constrained_layout=True, squeeze=False)
    name = models[0] if models else ""
    for ax, group in zip(axes.flat, groups):
        part = rows if group is None or panel not in rows.columns else rows[rows[panel] == group]
        _draw_depth(ax, part, metric)
        ax.set_title(f"{name}: {metric} under {group or '?'} ({element})", fontsize=10)
    for ax in list(axes.flat)[len(groups):]:
        ax.remove()
    return fig


# ---------------------------------------------------------------------------------------------
# surveys


def _survey_frames(source) -> dict[str, pd.DataFrame]:
    """``runs``, ``scores`` and ``model_scores`` frames from a store, a store's path, or a mapping
    holding them."""
    if isinstance(source, Mapping):
        missing = {"runs", "scores", "model_scores"} - set(source)
        if missing:
            raise ValueError(f"expected frames runs, scores, model_scores; missing "
                             f"{sorted(missing)}")
        return {k: source[k] for k in ("runs", "scores", "model_scores")}
    if isinstance(source, (str, os.PathLike)):
        from equifast.survey import open_store

        with open_store(source) as store:
            return {"runs": store.runs, "scores": store.scores,
                    "model_scores": store.model_scores}
    if all(hasattr(source, k) for k in ("runs", "scores", "model_scores")):
        return {"runs": source.runs, "scores": source.scores, "model_scores": source.model_scores}
    raise TypeError(f"expected a SurveyStore, a store path or a mapping of frames, found "
                    f"{type(source).__name__}")


def model_summary(source, metric: str = "corr") -> pd.DataFrame:
    """One row per finished ``(model, configuration)`` (its latest run): what the survey plots
    show. A configuration is a group and the settings that change what is measured under it
    (``group_label``, :func:`configuration_labels`): the same group measured with another
    ``channel_map`` or ``subpixel`` is another row, not replaced by the latest run.

    Args:
        source: A :class:`~equifast.survey.SurveyStore`, its path, or a mapping with the frames
            ``runs``, ``scores`` and ``model_scores``.
        metric: The score whose equivariance is averaged (default ``corr``).

    Returns:
        Columns ``run_id, model, family, group_spec, group_label, pretrained, images,
        images_per_second, top1, top1_low, top1_high, top5, consistency, consistency_low,
        consistency_high, mean_eq, mean_learned, layers``: ``mean_eq`` is the mean over layers
        of the ``eq`` ``metric`` at element ``"mean"`` (NaN layers left out), ``mean_learned``
        the same of its ``learned`` part (``baseline="init"``; NaN without); a missing top-1
        (data without labels) is NaN.
    """
    frames = _survey_frames(source)
    runs = frames["runs"]
    done = runs[runs.status == "done"].copy()
    columns = ["run_id", "model", "family", "group_spec", "group_label", "pretrained", "images",
               "images_per_second", "top1", "top1_low", "top1_high", "top5", "consistency",
               "consistency_low", "consistency_high", "mean_eq", "mean_learned", "layers"]
    if done.empty:
        return pd.DataFrame(columns=columns)
    # labelled among every run (a finished run stored before runs kept their survey's
    # configuration reads it from a run of the same config_hash), as the report labels them
    done["group_label"] = configuration_labels(runs)[done.index]
    done = _latest_runs(done)
    scores = frames["scores"]
    eq = scores[(scores.metric == metric) & (scores.comparison == "eq")
                & (scores.element == "mean")]
    per_run = eq.groupby("run_id")["value"].agg(["mean", "count"])
    summary = done[["run_id", "model", "family", "group_spec", "group_label", "pretrained",
                    "images", "images_per_second"]].set_index("run_id")
    summary["mean_eq"] = per_run["mean"]
    learned = (pd.to_numeric(eq["learned"], errors="coerce") if "learned" in eq
               else pd.Series(np.nan, index=eq.index))
    summary["mean_learned"] = learned.groupby(eq["run_id"]).mean()
    summary["layers"] = per_run["count"].reindex(summary.index).fillna(0).astype(int)
    model_scores = frames["model_scores"]
    for name in ("top1", "top5", "consistency"):
        part = model_scores[model_scores.metric == name].drop_duplicates("run_id", keep="last")
        part = part.set_index("run_id")
        summary[name] = part["value"].reindex(summary.index).astype(float)
        if name != "top5":
            summary[f"{name}_low"] = part["ci_low"].reindex(summary.index).astype(float)
            summary[f"{name}_high"] = part["ci_high"].reindex(summary.index).astype(float)
    summary["family"] = summary["family"].fillna("unknown")
    return summary.reset_index()[columns]


def _pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r of each row pair (NaN where a row is constant)."""
    x = x - x.mean(axis=1, keepdims=True)
    y = y - y.mean(axis=1, keepdims=True)
    denominator = np.sqrt((x * x).sum(axis=1) * (y * y).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (x * y).sum(axis=1) / denominator
    r[~(denominator > 1e-300)] = np.nan
    return r


def correlations(x, y, n_boot: int = 1000, seed: int = 0, level: float = 0.95
                 ) -> dict[str, Any]:
    """Pearson and Spearman correlations of paired values, with percentile bootstrap CIs over
    the pairs (models), resampled with replacement.

    Spearman's rho is Pearson's r of the ranks (average ranks for ties). Pairs with a NaN are left
    out. Resamples where one side is constant have no correlation and are left out of the CI.

    Returns:
        ``{"n", "pearson", "pearson_low", "pearson_high", "spearman", "spearman_low",
        "spearman_high", "n_boot"}``; NaN where fewer than 3 pairs or a side is constant.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = len(x)
    out: dict[str, Any] = {"n": n, "n_boot": n_boot}
    for name in ("pearson", "spearman"):
        out.update({name: math.nan, f"{name}_low": math.nan, f"{name}_high": math.nan})
    if n < 3:
        return out
    rank_x = pd.Series(x).rank().to_numpy()
    rank_y = pd.Series(y).rank().to_numpy()
    out["pearson"] = float(_pearson_rows(x[None], y[None])[0])
    out["spearman"] = float(_pearson_rows(rank_x[None], rank_y[None])[0])
    if n_boot > 0:
        index = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        bx, by = x[index], y[index]
        boot = {
            "pearson": _pearson_rows(bx, by),
            "spearman": _pearson_rows(pd.DataFrame(bx).rank(axis=1).to_numpy(),
                                      pd.DataFrame(by).rank(axis=1).to_numpy()),
        }
        tail = (1 - level) / 2 * 100
        for name, values in boot.items():
            values = values[np.isfinite(values)]
            if len(values) and math.isfinite(out[name]):
                low, high = np.percentile(values, [tail, 100 - tail])
                out[f"{name}_low"], out[f"{name}_high"] = float(low), float(high)
    return out


def _format_correlation(stats: dict[str, Any], metric: str = "corr") -> str:
    def one(name: str, symbol: str) -> str:
        value = stats[name]
        if not math.isfinite(value):
            return f"{symbol} = n/a"
        low, high = stats[f"{name}_low"], stats[f"{name}_high"]
        ci = f" [{low:.2f}, {high:.2f}]" if math.isfinite(low) else ""
        return f"{symbol} = {value:.2f}{ci}"

    if stats["n"] < 3:
        return f"correlation: n/a ({stats['n']} model{'s' if stats['n'] != 1 else ''}, need 3)"
    text = f"{one('pearson', 'Pearson r')}\n{one('spearman', 'Spearman ρ')}"
    if not math.isfinite(stats["pearson"]):
        text += "\n(one side is constant)"
    if more_equivariant(metric) == "lower":
        # the sign reads the other way round than for corr
        text += (f"\nlower {metric}: more equivariant\n"
                 "(r < 0: the more equivariant, the more accurate)")
    return text + f"\n95% bootstrap CI, {stats['n_boot']} resamples, n = {stats['n']}"


def accuracy_column(summary: pd.DataFrame) -> str:
    """``"top1"`` when some model of ``summary`` has a top-1 accuracy, else ``"consistency"``
    (data without labels)."""
    return "top1" if summary["top1"].notna().any() else "consistency"


def _emptiest_corner(ax, xs, ys, width: float = 0.45, height: float = 0.2
                     ) -> tuple[float, float, str, str]:
    """``(x, y, ha, va)`` in axes coordinates of the corner whose ``width x height`` box (axes
    fractions) holds the fewest points, top left on a tie: where the correlation box covers
    least."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    fx = (np.asarray(xs, dtype=float) - x0) / ((x1 - x0) or 1.0)
    fy = (np.asarray(ys, dtype=float) - y0) / ((y1 - y0) or 1.0)
    corners = [(0.02, 0.98, "left", "top"), (0.98, 0.98, "right", "top"),
               (0.02, 0.02, "left", "bottom"), (0.98, 0.02, "right", "bottom")]

    def covered(corner) -> int:
        _, _, ha, va = corner
        in_x = fx <= width if ha == "left" else fx >= 1 - width
        in_y = fy >= 1 - height if va == "top" else fy <= height
        return int(np.count_nonzero(in_x & in_y))

    return min(corners, key=covered)


def plot_accuracy_vs_equivariance(source, metric: str = "corr", *, groups=None,
                                  n_boot: int = 1000, seed: int = 0, ncols: int = 2,
                                  annotate: bool | None = None):
    """Accuracy against mean equivariance, one point per model, coloured by architecture family;
    one panel per group, with Pearson and Spearman correlations and their bootstrap CIs.

    The x axis is the mean over layers of the ``eq`` ``metric``: "mean equivariance" for a score
    that is higher for the more equivariant maps, else named by the score (``one_minus_corr``,
    ``nde``, ``rel_err``: lower is more equivariant, and the correlation box says that the sign
    reads the other way round); the axis label says which.

    Accuracy is top-1 (``model_scores``); in a group where no model has one (data without
    labels) it falls back to ``consistency``, and the axis label says so. Models without either
    number, or without a finite mean equivariance, are left out (the title counts them).

    Args:
        source: A :class:`~equifast.survey.SurveyStore`, its path, a mapping with the frames
            ``runs``, ``scores``, ``model_scores``, or a :func:`model_summary` frame.
        metric: The score averaged over layers (default ``corr``).
        groups: Which configurations, in order (default: all, in order of appearance): the
            ``group_label`` values of :func:`model_summary` (the ``group_spec`` unless the store
            holds the group measured with other settings too).
        n_boot: Bootstrap resamples of the models for the CIs (seeded by ``seed``).
        ncols: Panels per row.
        annotate: Write model names next to points (default: when at most 30 models).

    Returns:
        The matplotlib ``Figure``: per panel, one scatter (``ax.collections[0]``) with a point
        per model.
    """
    if isinstance(source, pd.DataFrame):
        summary = source
    else:
        summary = model_summary(source, metric)
    if summary.empty:
        raise ValueError("no finished model to plot")
    panel = _panel_column(summary)
    if groups is None:
        groups = list(dict.fromkeys(summary[panel]))
    families = sorted(summary.family.fillna("unknown").unique())
    cmap = plt.get_cmap("tab10" if len(families) <= 10 else "tab20")
    colour = {f: cmap(i % cmap.N) for i, f in enumerate(families)}
    ncols = max(1, min(ncols, len(groups)))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 5.0 * nrows),
                             constrained_layout=True, squeeze=False)
    for ax, group in zip(axes.flat, groups):
        part = summary[summary[panel] == group]
        column = accuracy_column(part)
        points = part[part[column].notna() & np.isfinite(part.mean_eq.astype(float))]
        left_out = len(part) - len(points)
        ax.scatter(points.mean_eq.astype(float), points[column].astype(float),
                   c=[colour[f] for f in points.family.fillna("unknown")], s=40,
                   edgecolors="black", linewidths=0.5, zorder=3)
        if annotate or (annotate is None and len(points) <= 30):
            for _, row in points.iterrows():
                ax.annotate(str(row.model), (row.mean_eq, row[column]), fontsize=7,
                            xytext=(4, 3), textcoords="offset points")
        stats = correlations(points.mean_eq, points[column], n_boot=n_boot, seed=seed)
        x, y, ha, va = _emptiest_corner(ax, points.mean_eq.astype(float),
                                        points[column].astype(float))
        ax.text(x, y, _format_correlation(stats, metric), transform=ax.transAxes, va=va, ha=ha,
                fontsize=8, gid="correlation",
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
        named = f"{metric}, " if mean_score_name(metric) == "mean equivariance" else ""
        ax.set_xlabel(f"{mean_score_name(metric)} ({named}eq, mean over layers; "
                      f"{more_equivariant(metric)}: more equivariant)")
        ax.set_ylabel("top-1 accuracy" if column == "top1" else
                      "consistency (no top-1: data without labels)")
        title = f"{group} ({len(points)} model{'s' if len(points) != 1 else ''})"
        if left_out:
            title += f", {left_out} without {column} or equivariance left out"
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        shown = sorted(points.family.fillna("unknown").unique())
        if shown:
            handles = [Line2D([], [], marker="o", linestyle="", markerfacecolor=colour[f],
                              markeredgecolor="black", markersize=7, label=f) for f in shown]
            # "best": matplotlib's own search for the place that covers the fewest points
            ax.legend(handles=handles, title="family", loc="best", fontsize=7,
                      title_fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.remove()
    return fig
