"""Plots of measurement results (matplotlib figures for analysis code and reports).

Example:
    >>> fig = plot_depth(result)           # doctest: +SKIP
    >>> fig.savefig("depth.png")           # doctest: +SKIP
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no screen on survey machines; callers can switch backends before import

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

COMPARISON_STYLE = {
    "eq": ("equivariance", "tab:blue"),
    "inv": ("invariance", "tab:orange"),
    "chance": ("chance", "tab:grey"),
}


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
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    else:
        fig = ax.figure
    for comparison, (label, colour) in COMPARISON_STYLE.items():
        part = rows[rows.comparison == comparison].sort_values("depth")
        if part.empty:
            continue
        ax.plot(part.rel_depth, part.value, marker="o", color=colour, label=label)
        ax.fill_between(part.rel_depth, part.ci_low, part.ci_high, color=colour, alpha=0.2)
    layers = rows.drop_duplicates("layer").sort_values("depth")
    ax.set_xticks(layers.rel_depth, layers.layer, rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("layer (relative depth)")
    ax.set_ylabel(metric)
    model = result.config.get("model", "")
    group = result.config.get("group", "")
    ax.set_title(f"{model}: {metric} under {group} ({element})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig
