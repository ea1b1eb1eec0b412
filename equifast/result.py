"""The result of a measurement: a tidy pandas frame plus the run's configuration.

Columns of ``Result.frame`` (one row per layer x element x comparison x metric):

``model, layer, depth, rel_depth, kind, layout, grid_h, grid_w, channels, prefix, stride_y,
stride_x, stride, offset_y, offset_x, element, exact, comparison, metric, value, ci_low, ci_high,
n, pooled``

``element == "mean"`` rows average each image's scores over the elements; ``comparison`` is
``"eq"`` (equivariance), ``"inv"`` (invariance) or ``"chance"``; the derived ``corr_vs_chance``
metric sits under ``"eq"``. ``Result.model_frame`` holds model-level numbers (top-1, top-5,
consistency) with the same value/CI/n columns.

Example:
    >>> result = Result.load("run.parquet")                     # doctest: +SKIP
    >>> result.summary()                                        # doctest: +SKIP
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .scores import CHANCE_MARGIN

# Filled by measure(..., baseline="init") (equifast.baseline): the initialized copy's score of the
# row with its 95% interval, and learned = value - init with its paired interval; NaN without.
BASELINE_COLUMNS = ["init", "init_lo", "init_hi", "learned", "learned_lo", "learned_hi"]
FRAME_COLUMNS = [
    "model", "layer", "depth", "rel_depth", "kind", "layout", "grid_h", "grid_w", "channels",
    "prefix", "stride_y", "stride_x", "stride", "offset_y", "offset_x", "element", "exact",
    "comparison", "metric", "value", "ci_low", "ci_high", "n", "pooled", *BASELINE_COLUMNS,
]
MODEL_COLUMNS = ["model", "metric", "value", "ci_low", "ci_high", "n"]
# Columns of names: a CSV gives them back as written, as text (the layers "0", "1" of an
# nn.Sequential are not numbers, and a name such as "NA" is not a missing value).
TEXT_COLUMNS = ["model", "layer", "kind", "layout", "element", "comparison", "metric"]
# What reads as missing in the other columns of a CSV (to_csv writes NaN as an empty cell).
_CSV_MISSING = ["", "nan", "NaN", "NA", "N/A", "<NA>", "null", "None"]


def warn_undefined_elements(frame: pd.DataFrame, subpixel: str = "bilinear") -> list[str]:
    """Warn about group elements whose every score is NaN, in every layer; returns them.

    Such an element leaves no position where the moved features and the re-aligned original
    both exist (a shift as large as the feature grids), no layer re-aligns it exactly under
    ``subpixel="skip"``, or every feature it compares is constant.
    """
    elements = frame[frame.element != "mean"]
    if elements.empty:
        return []
    undefined = elements.groupby("element", sort=False)["value"].apply(lambda v: v.isna().all())
    names = [name for name, empty in undefined.items() if empty]
    if names:
        skip = ", no layer re-aligns them exactly (subpixel='skip')," if subpixel == "skip" else ""
        warnings.warn(
            f"group elements {names}: every score is NaN in every layer: the moved features share "
            f"no position with the original ones (a shift as large as the feature grids?){skip} "
            "or they are constant",
            stacklevel=3,
        )
    _warn_undefined_layers(elements[~elements.element.isin(names)], subpixel)
    return names


def warn_undefined_chance(frame: pd.DataFrame) -> bool:
    """Warn when the chance comparison is undefined for every image; returns whether it was.

    Chance pairs each image with another one of its batch: a batch of one image has none (NaN,
    not counted in ``n``). Where every batch held one image (``batch_size=1``, or one image in
    all) the chance rows and ``corr_vs_chance``, the headline of summaries and surveys, are NaN
    while ``eq`` and ``inv`` carry numbers, which used to pass without a word.
    """
    rows = frame[frame.element != "mean"]
    chance = rows[rows.comparison == "chance"]
    others = rows[rows.comparison != "chance"]
    if chance.empty or others.empty or (chance.n > 0).any() or not (others.n > 0).any():
        _warn_chance_at_one(frame)
        return False
    warnings.warn(
        "the chance comparison is undefined for every image (NaN, n = 0), and so is "
        "corr_vs_chance: chance pairs each image with another image of its batch, and every "
        "batch held one image; measure at least two images with batch_size >= 2",
        stacklevel=3,
    )
    return True


def _warn_chance_at_one(frame: pd.DataFrame) -> list[str]:
    """Warn about layers whose chance corr (over the elements) is 1 within ``CHANCE_MARGIN``:
    unrelated images give them the same features up to rounding (or to a part of 1e-9 of their
    spread, which the ratio would magnify into noise), and their ``corr_vs_chance`` is NaN.
    Returns them."""
    chance = frame[(frame.element == "mean") & (frame.comparison == "chance")
                   & (frame.metric == "corr")]
    names = list(dict.fromkeys(chance.loc[chance.value >= 1 - CHANCE_MARGIN, "layer"]))
    if names:
        warnings.warn(
            f"{len(names)} layer(s) give unrelated images the same features, up to rounding "
            f"or nearly (chance corr within {CHANCE_MARGIN:g} of 1): {shown_names(names)}; "
            "their corr_vs_chance is NaN (its denominator, 1 - chance, would magnify the "
            "rounding of corr into the result)",
            stacklevel=4)
    return names


def _warn_undefined_layers(elements: pd.DataFrame, subpixel: str = "bilinear") -> list[str]:
    """Warn about layers whose correlations are NaN for every element (those of elements
    undefined everywhere left out): spatially constant features (a random-init LeViT stage, the
    zero-initialized branch of a MobileViT block; cosine and nde stay defined there), every
    element skipped there (``subpixel="skip"`` and no exact re-alignment) or no valid position.
    Returns them."""
    correlations = elements[elements.metric.isin(("corr", "one_minus_corr", "corr_channelwise"))]
    scores = correlations if not correlations.empty else elements[
        elements.metric != "flat_frac"]
    if scores.empty:
        return []
    undefined = scores.groupby("layer", sort=False)["value"].apply(lambda v: v.isna().all())
    names = [name for name, empty in undefined.items() if empty]
    if names:
        flat = elements[(elements.metric == "flat_frac") & elements.layer.isin(names)]
        constant = [n for n in names if n in set(flat.loc[flat.value == 1.0, "layer"])]
        skipped = []
        if subpixel == "skip" and "exact" in elements.columns:
            exact = elements[elements.layer.isin(names)].groupby("layer", sort=False)["exact"]
            skipped = [n for n, any_exact in exact.any().items() if not any_exact
                       and n not in constant]
        other = [n for n in names if n not in constant and n not in skipped]
        causes = []
        if constant:
            causes.append(f"{shown_names(constant)}: spatially constant features (flat_frac 1: "
                          "constant, to rounding, over the positions compared, which on a small "
                          "grid may be one or two)")
        if skipped:
            causes.append(f"{shown_names(skipped)}: every element moves them by a fraction of a "
                          "feature pixel, which subpixel='skip' leaves out (subpixel='bilinear' "
                          "re-aligns them)")
        if other:
            causes.append(f"{shown_names(other)}: no position where the moved and the re-aligned "
                          "features both exist, or constant features")
        what = "correlations" if not correlations.empty else "scores"
        warnings.warn(f"{len(names)} layer(s) have no defined {what} (NaN for every element): "
                      + "; ".join(causes), stacklevel=4)
    return names


# The widest layer column of format_summary: a longer name keeps its start and its end (where
# names differ: stages.2.blocks.11.attn.proj against ...attn.qkv) around "...".
LAYER_WIDTH = 48


def _fit(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters: cut in the middle, keeping more of its end."""
    if len(name) <= width:
        return name
    head = (width - 3) // 3
    return f"{name[:head]}...{name[len(name) - (width - 3 - head):]}"


def _with_interval(value: float, low: float, high: float, sign: str = "") -> str:
    """``value [low, high]``; the value alone where there is no interval (``bootstrap=0``, or
    too few images), so that a table does not fill with ``[nan, nan]``."""
    if pd.isna(low) and pd.isna(high):
        return f"{value:{sign}7.4f}"
    return f"{value:{sign}7.4f} [{low:{sign}6.3f},{high:{sign}6.3f}]"


def shown_names(names: list[str], most: int = 8) -> str:
    """``names`` for a message: the first ``most``, then how many more."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most
                                      else "")


def is_headless(module) -> bool:
    """Whether a model says it has no classifier (timm's ``num_classes=0``, or
    ``reset_classifier(0)``): its (batch, C) output is pooled features, not logits."""
    return getattr(module, "num_classes", None) == 0


def logits_of(output, headless: bool):
    """The (batch, classes) logits of a model's output as float, or None where it has none."""
    import torch

    if isinstance(output, torch.Tensor) and output.dim() == 2 and not headless:
        return output.float()
    return None


def warn_not_logits(output, stacklevel: int, headless: bool = False) -> None:
    """Warn that a model's output (not a tensor, or a headless model's features) gives no
    model-level scores."""
    import torch

    # (per image: a forward stacks the images of several elements, whose count means nothing here)
    what = (f"a headless model's (num_classes=0) pooled features ({output.shape[-1]} per image)"
            if headless and isinstance(output, torch.Tensor)
            else f"a {type(output).__name__}")
    warnings.warn(
        f"the model's output is {what}, not (batch, classes) logits: the "
        "result has no consistency or top-1 / top-5 (model_frame is empty); the layers' scores "
        "are unaffected",
        stacklevel=stacklevel + 1,
    )


def deserves_logits_warning(output, headless: bool) -> bool:
    """Whether an output without logits deserves the warning: not a tensor, or a headless
    model's vector output (a tensor of another shape is a backbone's feature map: nothing to
    say)."""
    import torch

    if not isinstance(output, torch.Tensor):
        return True
    return headless and output.dim() == 2


@dataclass
class Result:
    """Scores of one measurement.

    Attributes:
        frame: The tidy per-layer frame (module docstring).
        model_frame: Model-level scores (top1, top5, consistency).
        config: The run's configuration (model, group, layers, sizes, versions, timing).
        skipped: ``[(path, reason)]`` of inputs that could not be read.
    """

    frame: pd.DataFrame
    model_frame: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=MODEL_COLUMNS))
    config: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def _check_metric(self, metric: str, element: str = "mean") -> None:
        metrics = self.frame.metric.unique().tolist()
        if metric not in metrics:
            raise ValueError(f"metric {metric!r} is not in the result; it holds {metrics}")
        elements = self.frame.element.unique().tolist()
        if element not in elements:
            raise ValueError(f"element {element!r} is not in the result; it holds {elements}")

    def scores(self, metric: str = "corr", element: str = "mean") -> pd.DataFrame:
        """Wide table: one row per layer (``layer``, ``depth``), and per comparison its
        ``metric`` for ``element`` with the 95% CI, named as in :meth:`summary` (``eq``,
        ``eq_lo``, ``eq_hi``, ``inv``, ...; with a baseline also ``eq_init``, ``eq_learned``,
        ``eq_learned_lo``, ...)."""
        self._check_metric(metric, element)
        rows = self.frame[(self.frame.metric == metric) & (self.frame.element == element)]
        # unstack, not pivot_table: an interval that is NaN throughout (bootstrap=0) keeps its
        # column
        suffix = {"value": "", "ci_low": "_lo", "ci_high": "_hi"}
        if self.has_baseline:
            suffix.update({c: f"_{c}" for c in BASELINE_COLUMNS})
        wide = (rows.drop_duplicates(["depth", "layer", "comparison"])
                .set_index(["depth", "layer", "comparison"])[list(suffix)]
                .unstack("comparison").sort_index(level="depth"))
        wide.columns = [f"{comp}{suffix[what]}" for what, comp in wide.columns]
        order = [f"{comp}{end}" for comp in ("eq", "inv", "chance") for end in suffix.values()]
        columns = [c for c in order if c in wide.columns]
        columns += [c for c in wide.columns if c not in columns]
        table = wide[columns].reset_index()
        return table[["layer", "depth", *columns]]

    @property
    def has_baseline(self) -> bool:
        """Whether the result holds an initialization baseline (``baseline="init"``)."""
        return "init" in self.frame.columns and bool(self.frame["init"].notna().any())

    def summary(self, metric: str = "corr") -> pd.DataFrame:
        """Per-layer table: stride, eq / inv / chance ``metric`` with 95% CIs, flat_frac, n, and
        the normalized equivariance ``corr_vs_chance`` (``vs_chance``). With a baseline, each
        comparison also has ``<comparison>_init`` and ``<comparison>_learned`` with its interval
        (``_learned_lo``, ``_learned_hi``), and ``vs_chance_learned``."""
        self._check_metric(metric)
        frame = self.frame[self.frame.element == "mean"]
        layers = frame.drop_duplicates("layer").set_index("layer")
        table = pd.DataFrame(index=layers.index)
        table["depth"] = layers["depth"]
        table["kind"] = layers["kind"]
        table["stride"] = layers["stride"]
        for comparison in ("eq", "inv", "chance"):
            part = frame[(frame.metric == metric) & (frame.comparison == comparison)]
            part = part.set_index("layer")
            if part.empty:
                continue
            table[f"{comparison}"] = part["value"]
            table[f"{comparison}_lo"] = part["ci_low"]
            table[f"{comparison}_hi"] = part["ci_high"]
            if self.has_baseline:
                table[f"{comparison}_init"] = part["init"]
                table[f"{comparison}_learned"] = part["learned"]
                table[f"{comparison}_learned_lo"] = part["learned_lo"]
                table[f"{comparison}_learned_hi"] = part["learned_hi"]
        normalized = frame[(frame.metric == "corr_vs_chance")].set_index("layer")
        if not normalized.empty:
            table["vs_chance"] = normalized["value"]
            if self.has_baseline:
                table["vs_chance_learned"] = normalized["learned"]
        flat = frame[(frame.metric == "flat_frac") & (frame.comparison == "eq")].set_index("layer")
        if not flat.empty:
            table["flat_frac"] = flat["value"]
        # Positions compared: eq's, or (eq not measured) those of the first comparison there is.
        present = [c for c in ("eq", "inv", "chance") if (frame.comparison == c).any()]
        n = frame[(frame.metric == metric)
                  & (frame.comparison == (present[0] if present else "eq"))].set_index("layer")
        table["n"] = n["n"]
        return table.reset_index().sort_values("depth").reset_index(drop=True)

    def format_summary(self, metric: str = "corr") -> str:
        """The summary as aligned text, with CIs as ``value [low, high]``; with a baseline, the
        initialized copy's eq score and the learned part of it (``eq - init``) follow."""
        table = self.summary(metric)
        baseline = self.has_baseline
        lines = []
        # As wide as the longest layer name (timm's run past 24 characters), up to a cap
        names = [str(name) for name in table["layer"]]
        width = min(max([len("layer"), *map(len, names)]), LAYER_WIDTH)
        header = f"{'layer':<{width}} {'stride':>6} " + " ".join(
            f"{c + ' ' + metric:>22}" for c in ("eq", "inv", "chance")
        ) + f" {'vs_chance':>9} {'flat_frac':>9} {'n':>5}"
        if baseline:
            header += f" {'eq init':>8} {'eq learned':>22}"
        lines.append(header)
        for _, row in table.iterrows():
            cells = []
            for comparison in ("eq", "inv", "chance"):
                if comparison in row and pd.notna(row.get(comparison)):
                    cells.append(_with_interval(row[comparison], row[comparison + "_lo"],
                                                row[comparison + "_hi"]))
                else:
                    cells.append("-")
            stride = "-" if pd.isna(row["stride"]) else f"{row['stride']:g}"
            line = (
                f"{_fit(str(row['layer']), width):<{width}} {stride:>6} "
                + " ".join(f"{c:>22}" for c in cells)
                + f" {row.get('vs_chance', float('nan')):9.4f} "
                f"{row.get('flat_frac', float('nan')):9.3f} "
                f"{'-' if pd.isna(row['n']) else int(row['n']):>5}"
            )
            if baseline and "eq_init" in row:
                learned = _with_interval(row["eq_learned"], row["eq_learned_lo"],
                                         row["eq_learned_hi"], sign="+")
                line += f" {row['eq_init']:8.4f} {learned:>22}"
            lines.append(line)
        if not self.model_frame.empty:
            for _, row in self.model_frame.iterrows():
                lines.append(f"{row['metric']}: {row['value']:.4f} (n={int(row['n'])})")
        return "\n".join(lines)

    def plot(self, metric: str = "corr", element: str = "mean", ax=None):
        """Scores against depth with CI bands (:func:`equifast.plots.plot_depth`); a Figure."""
        from .plots import plot_depth

        return plot_depth(self, metric=metric, element=element, ax=ax)

    def save(self, path: str | Path) -> Path:
        """Save to ``.parquet`` or ``.csv`` (config and model scores go to a ``.json`` beside)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() == ".parquet":
            self.frame.to_parquet(path, index=False)
        elif path.suffix.lower() == ".csv":
            self.frame.to_csv(path, index=False)
        else:
            raise ValueError(f"save: expected a path ending in .parquet or .csv, found {path}")
        sidecar = {
            "config": self.config,
            "model_frame": self.model_frame.to_dict(orient="records"),
            "skipped": [list(s) for s in self.skipped],
        }
        path.with_suffix(path.suffix + ".json").write_text(json.dumps(sidecar, indent=2,
                                                                      default=str))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Result:
        """Load what :meth:`save` wrote (a folder: its ``result.parquet``, as the CLI writes)."""
        path = Path(path)
        if path.is_dir() and (path / "result.parquet").is_file():
            path = path / "result.parquet"
        if not path.exists():
            raise FileNotFoundError(f"no result at {path}")
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path)
        elif path.suffix.lower() == ".csv":
            missing = {c: _CSV_MISSING for c in FRAME_COLUMNS if c not in TEXT_COLUMNS}
            frame = pd.read_csv(path, dtype={c: str for c in TEXT_COLUMNS},
                                keep_default_na=False, na_values=missing)
        else:
            raise ValueError(f"load: expected a .parquet or .csv file, found {path}")
        sidecar_path = path.with_suffix(path.suffix + ".json")
        sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.exists() else {}
        for column in BASELINE_COLUMNS:  # a result saved before baselines existed
            if column not in frame.columns:
                frame[column] = float("nan")
        model_frame = pd.DataFrame(sidecar.get("model_frame", []), columns=MODEL_COLUMNS)
        skipped = [tuple(s) for s in sidecar.get("skipped", [])]
        return cls(frame=frame, model_frame=model_frame, config=sidecar.get("config", {}),
                   skipped=skipped)

    def __repr__(self) -> str:
        layers = self.frame["layer"].nunique() if len(self.frame) else 0
        return (f"Result(model={self.config.get('model')!r}, layers={layers}, "
                f"images={self.config.get('images')}, rows={len(self.frame)})")
