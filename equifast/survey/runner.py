"""Surveys: measure many models with one configuration and keep each finished model in a store.

A survey is resumable by construction: each model's rows are written in one transaction of the
:class:`~equifast.survey.store.SurveyStore`, keyed by ``(model, config_hash)``; started again, a
survey skips the pairs that are done (and those that failed, unless ``retry_failed``). A model
that runs out of memory is retried with half the batch down to ``min_batch_size``; one that raises,
or whose features are not finite, is recorded with its traceback and the survey goes on. A model
whose features are not finite for some images only is kept, with a warning naming the layers
and how many images their scores leave out (``runs.warning``, shown by the report); so is one
whose grid offsets are estimates that the group's rotations or flips depend on.

Models run one after another in this process, or as one Ray task each (``ray=``), in which case
this process (the driver) is still the only writer of the store. Another survey may run on the
same store at the same time: each model is claimed in the store before it is measured, and a
survey skips (and names, in :attr:`SurveySummary.elsewhere`) the models that the other one
claimed or finished meanwhile.

Example:
    >>> from equifast.survey import run_survey
    >>> summary = run_survey(["resnet18", "convnext_atto"], "samples", store="survey.sqlite",
    ...                      group="translate:8,16")                     # doctest: +SKIP
    >>> summary.done, summary.failed                                     # doctest: +SKIP
    (['resnet18', 'convnext_atto'], [])
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import socket
import time
import traceback as traceback_module
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from equifast.survey.store import (
    DuplicateRunError,
    SurveyStore,
    config_hash,
    environment_info,
    model_key,
)

__all__ = ["ModelOutcome", "SurveySummary", "family_of", "resolve_models", "run_survey"]

_WILDCARDS = set("*?[")


class NonFiniteFeatures(RuntimeError):
    """A model whose features are NaN or infinite at some layer (nothing can be measured)."""


@dataclass
class ModelOutcome:
    """What measuring one model gave: a result, or the error that stopped it.

    ``errors`` lists every failure on the way (``(attempt, batch_size, kind, message,
    traceback)``), the out-of-memory attempts that a smaller batch got past included.
    """

    model: str
    result: Any = None  # equifast.Result
    errors: list[tuple[int, int, str, str, str]] = field(default_factory=list)
    attempts: int = 0
    started: str | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None


@dataclass
class SurveySummary:
    """The outcome of :func:`run_survey`: model names per outcome, and the wall time."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    store: str = ""
    failed_before: list[str] = field(default_factory=list)  # skipped: they failed in a past run
    # skipped too: another survey on the same store claimed or finished them while this one ran
    elsewhere: dict[str, str] = field(default_factory=dict)  # model -> why
    # done, with a warning about their numbers (stored as runs.warning)
    warned: dict[str, str] = field(default_factory=dict)  # model -> warning
    # the models of this survey recorded as failed under its configuration when it ended: failed
    # in this run, before (and not retried) or in another survey; --retry-failed measures them
    # again (the command line exits with status 1 while there are any)
    failures_left: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        before = f", {len(self.failed_before)} of them failed" if self.failed_before else ""
        other = f", {len(self.elsewhere)} left to another survey" if self.elsewhere else ""
        text = (f"survey: {len(self.done)} done, {len(self.skipped)} skipped (already in the "
                f"store{before}{other}), {len(self.failed)} failed, {self.seconds:.1f} s -> "
                f"{self.store}")
        if self.failed:
            text += "\n  failed: " + ", ".join(self.failed)
        if self.failed_before:
            text += ("\n  failed before (kept as they are; --retry-failed measures them again): "
                     + ", ".join(self.failed_before))
        for model, why in self.elsewhere.items():
            text += f"\n  left to another survey: {model}: {why}"
        for model, warning in self.warned.items():
            text += f"\n  warning: {model}: {warning}"
        if self.failures_left:
            count = len(self.failures_left)
            text += (f"\n  {count} model{'s' if count != 1 else ''} of this survey "
                     f"{'are' if count != 1 else 'is'} recorded as failed in the store for this "
                     "configuration (exit status 1); the same command with --retry-failed "
                     f"measures {'them' if count != 1 else 'it'} again: "
                     + ", ".join(self.failures_left))
        return text


def read_model_list(path: str | os.PathLike) -> list[str]:
    """Model names from a text file: one per line; blank lines and ``#`` comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model list {path} does not exist")
    names = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def resolve_models(patterns: Iterable[str] = (), model_list: str | os.PathLike | None = None,
                   pretrained_only: bool = False) -> list[str]:
    """Expand names, timm wildcards (``"resnet*"``) and a model-list file into model names.

    Wildcards go through ``timm.list_models``; with ``pretrained_only`` they list the names that
    have pretrained weights (with their tag, e.g. ``resnet18.a1_in1k``), and plain names of timm
    architectures without any pretrained weights are dropped (a name timm does not know is kept:
    its run fails naming the close names). Torchvision wildcards (``"tv:resnet*"``) use
    ``torchvision.models.list_models``. Names are the store's keys (:func:`model_key`:
    ``timm:resnet18`` is ``resnet18``, ``torchvision:vgg11`` is ``tv:vgg11``). Order is kept;
    duplicates are dropped.

    Raises:
        ValueError: a wildcard matches nothing, or nothing is left to measure.
    """
    import timm

    requested = list(patterns)
    if model_list is not None:
        requested += read_model_list(model_list)
    names: list[str] = []
    no_weights: list[str] = []  # left out by pretrained_only
    for pattern in map(model_key, requested):
        if _WILDCARDS & set(pattern):
            if pattern.startswith("tv:"):
                import torchvision

                prefix, inner = pattern.split(":", 1)
                found = [f"tv:{n}" for n in sorted(torchvision.models.list_models(
                    module=torchvision.models)) if fnmatch.fnmatchcase(n, inner)]
            else:
                found = timm.list_models(pattern, pretrained=pretrained_only)
            if not found:
                raise ValueError(f"model pattern {pattern!r} matches no "
                                 f"{'pretrained ' if pretrained_only else ''}model"
                                 f"{_close_to_pattern(pattern, pretrained_only)}")
            names += found
        else:
            arch = pattern.split(".")[0]
            # (a name timm does not know stays: it fails as a run that names the close ones,
            # where it was left out silently as a model without weights)
            if (pretrained_only and not pattern.startswith("tv:") and timm.is_model(arch)
                    and not timm.list_models(arch, pretrained=True)):
                no_weights.append(pattern)
                continue
            names.append(pattern)
    unique = list(dict.fromkeys(names))
    if not unique and no_weights:
        raise ValueError(f"no models to survey: --pretrained-only left out {', '.join(no_weights)}"
                         " (timm has no pretrained weights for them)")
    if not unique:
        raise ValueError("no models to survey: give --models names/wildcards or --model-list")
    return unique


def _close_to_pattern(pattern: str, pretrained_only: bool) -> str:
    """``; close names: ...`` for a wildcard that matches nothing: the names closest to its
    text with the wildcards left out (``resnt*``: resnet18, ...), or nothing where none is."""
    import difflib

    import timm

    torchvision_names = pattern.startswith("tv:")
    stem = re.sub(r"[*?\[\]]", "", pattern.split(":", 1)[1] if torchvision_names else pattern)
    if torchvision_names:
        import torchvision

        candidates = sorted(torchvision.models.list_models(module=torchvision.models))
    else:
        candidates = timm.list_models(pretrained=pretrained_only)
    # (a name longer than the stem is compared by as many characters, so that 'resnt' finds
    # the resnets rather than the shortest names)
    prefixes: dict[str, list[str]] = {}
    for name in candidates:
        prefixes.setdefault(name[:len(stem) + 1], []).append(name)
    close = [name for prefix in difflib.get_close_matches(stem, list(prefixes), n=4, cutoff=0.6)
             for name in prefixes[prefix][:3]]
    if torchvision_names:
        close = [f"tv:{name}" for name in close]
    return f"; close names: {', '.join(close[:8])}" if close else ""


def family_of(model: str) -> str:
    """Architecture family: timm's module (``resnet``, ``vision_transformer``, ...) or
    torchvision's; the name's leading letters when neither knows it."""
    if model.startswith(("tv:", "torchvision:")):
        try:
            import torchvision

            builder = torchvision.models.get_model_builder(model.split(":", 1)[1])
            return builder.__module__.rsplit(".", 1)[-1]
        except Exception:  # noqa: BLE001 - unknown names fall through to the name itself
            pass
    else:
        try:
            from timm.models import _registry

            arch = model.split(":", 1)[-1].split(".")[0]
            module = _registry._model_to_module.get(arch)
            if module:
                return module
        except Exception:  # noqa: BLE001 - a timm without the registry internals
            pass
    import re

    return re.match(r"[A-Za-z_]*", model.split(":")[-1]).group(0).rstrip("_") or model


def _fingerprint(value: Any, paths: bool = False) -> Any:
    """A JSON-able stand-in for a configuration value: arrays and tensors by content hash (their
    ``str`` elides the middle), ``os.PathLike`` values by absolute path. Strings are names (a
    metric ``corr`` stays ``corr`` where a file of that name happens to exist), except with
    ``paths``, where an existing file or folder is its absolute path (``data``)."""
    import hashlib

    import numpy as np
    import torch

    if isinstance(value, (torch.Tensor, np.ndarray)):
        array = value.detach().cpu().contiguous().numpy() if isinstance(
            value, torch.Tensor) else np.ascontiguousarray(value)
        digest = hashlib.sha256(array.tobytes()).hexdigest()[:16]
        return f"{type(value).__name__}{list(array.shape)}:{array.dtype}:{digest}"
    if isinstance(value, os.PathLike) or (paths and isinstance(value, str)
                                          and value != "samples" and Path(value).exists()):
        return str(Path(value).resolve())
    if isinstance(value, (list, tuple)):
        return [_fingerprint(v, paths) for v in value]
    if isinstance(value, dict):
        return {str(k): _fingerprint(v, paths or str(k) in _PATH_ARGUMENTS)
                for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, torch.dtype):
        return str(value)  # "torch.float64"
    return f"{type(value).__module__}.{type(value).__qualname__}"  # an iterable, a module...


# equifast.measure's arguments that do not change the numbers: not part of a survey's identity
# (``model_name`` and ``batch_size`` are the survey's own). The memory format and the chunking
# move them by rounding only. A dtype given is part of it (float64 against bfloat16 moves scores
# by about 1e-3, and a survey started again in another dtype should measure, not skip); left to
# the device's default it is not, as the device is not.
_NOT_IDENTITY = {"model", "data", "group", "model_name", "batch_size", "device", "num_workers",
                 "progress", "loader", "channels_last", "elements_per_chunk", "distributed"}
# Arguments whose strings are file paths (model_kwargs of timm.create_model).
_PATH_ARGUMENTS = {"checkpoint_path"}


def _measure_defaults() -> dict[str, Any]:
    """equifast.measure's defaults of the arguments that identify a measurement."""
    import inspect

    import equifast

    return {name: parameter.default
            for name, parameter in inspect.signature(equifast.measure).parameters.items()
            if parameter.default is not inspect.Parameter.empty and name not in _NOT_IDENTITY}


def _canonical_align(align: Any) -> Any:
    """An ``align`` spec with its numbers as floats (``0`` and ``0.0`` are the same offset)."""
    if isinstance(align, dict):
        return {str(k): _canonical_align(v) for k, v in sorted(align.items())}
    if isinstance(align, (list, tuple)):
        return [_canonical_align(v) for v in align]
    if isinstance(align, (int, float)) and not isinstance(align, bool):
        return float(align)
    return align


def survey_config(group: str, data: Any, measure_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The configuration that identifies a measurement (its hash keys the store): everything
    that changes the numbers, not the batch size, device or loader workers (a ``dtype`` given
    counts; left to the device's default it does not, as the device does not).

    Normalized, so that the same settings resume each other however they were written: an
    argument equal to :func:`equifast.measure`'s default is left out (the command line passes
    them all, Python code only some), the group is its list of elements and their protocols
    (``translate: 8`` and ``translate:8`` are one group), metrics are the names measured
    (``["cosine"]`` is ``["corr", "cosine"]``), ``input_size`` is ``[H, W]``, and strings are
    names except for ``data`` and ``checkpoint_path``, which are paths.

    Raises:
        ValueError: a group spec, metric, ``input_size`` or ``align`` that is not valid.
    """
    from equifast.align import check_align
    from equifast.data.geometry import check_input_size
    from equifast.groups import parse_group
    from equifast.scores import check_metrics

    def normalized(settings: dict[str, Any]) -> dict[str, Any]:
        settings = dict(settings)
        settings["metrics"] = sorted(check_metrics(settings.get("metrics")))
        # the same selection or option written otherwise: 'default' is the default layers, a
        # comparison alone is a list of one, in any order; no layout overrides are none
        if settings.get("layers") in ("default", ["default"], ("default",)):
            settings["layers"] = None
        elif isinstance(settings.get("layers"), str):  # a list of one, as the command line
            settings["layers"] = [settings["layers"]]  # gives it: `--layers leaves`
        comparisons = settings.get("comparisons")
        if isinstance(comparisons, str):
            comparisons = [comparisons]
        if comparisons is not None:
            order = ("eq", "inv", "chance")
            settings["comparisons"] = sorted(
                set(comparisons), key=lambda c: (order.index(c) if c in order else len(order), c))
        if not settings.get("layouts"):
            settings["layouts"] = None
        settings["input_size"] = check_input_size(settings.get("input_size"))
        settings["align"] = _canonical_align(check_align(settings.get("align", "auto")))
        return {k: _fingerprint(v) for k, v in settings.items()}

    signature_defaults = _measure_defaults()
    defaults = normalized(signature_defaults)
    given = normalized({**signature_defaults, **{
        k: v for k, v in measure_kwargs.items() if k not in _NOT_IDENTITY}})
    config = {"group": [[element.name, element.protocol] for element in parse_group(group)],
              "data": _fingerprint(data, paths=True)}
    # Only what differs from measure's defaults: given or left out, a default is the same
    # setting, and an argument measure gains later (with a default that keeps the numbers)
    # leaves the stores written before it resumable.
    config.update({k: v for k, v in given.items() if k not in defaults or defaults[k] != v})
    return config


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    # Some backends raise a plain RuntimeError for an allocation failure.
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text
                                                or "can't allocate memory" in text)


def _nonfinite_layers(model, names: list[str], input_size, device) -> list[str]:
    """The layers among ``names`` whose output on a random image holds NaN or infinity."""
    import torch

    from equifast.layers import LayerHooks, input_channels

    bad: list[str] = []

    def check(name: str, tensor: torch.Tensor) -> None:
        if name not in bad and not bool(torch.isfinite(tensor).all()):
            bad.append(name)

    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, input_channels(model), *input_size, generator=generator)
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    with torch.inference_mode(), LayerHooks(model, names, check):
        model(image.to(device=device, dtype=dtype))
    return bad


def _check_finite(result, model) -> None:
    """Raise when the model's features are not finite. A layer whose every eq score is NaN is
    either that or a layer without any valid position (a 2x2 map rotated by 45 degrees): one
    forward of a random image on the suspects tells which."""
    frame = result.frame
    rows = frame[(frame.comparison == "eq") & (frame.element == "mean")
                 & (frame.metric != "flat_frac")]
    if rows.empty:
        return
    dead = rows.groupby("layer", sort=False)["value"].apply(lambda v: v.isna().all())
    suspects = list(dead[dead].index)
    if not suspects:
        return
    layers = _nonfinite_layers(model, suspects, tuple(result.config["input_size"]),
                               result.config.get("device", "cpu"))
    if layers:
        raise NonFiniteFeatures(
            f"features are NaN or infinite at {len(layers)} layer(s), first {layers[0]!r}: "
            "nothing there can be measured (check the weights and the input dtype)"
        )


# Scores that stay defined on spatially constant features (a correlation and psnr do not): an
# image whose features leave one of them undefined has features that are NaN, infinite or zero.
_NORM_SCORES = ("cosine", "nde", "rel_err")


def _estimate_warning(result, group: str) -> str | None:
    """What to record of grid offsets that ``align="auto"`` could only estimate where the
    group's rotations or flips depend on them (:func:`equifast.align.estimated_offsets`); None
    where there are none."""
    from equifast.align import estimated_offsets
    from equifast.groups import parse_group
    from equifast.result import shown_names

    height, width = result.config["input_size"]
    matrices = parse_group(group).matrices(height, width, with_identity=False)
    names = estimated_offsets(result.config.get("offset_readings") or {}, matrices[:, :, :2])
    if not names:
        return None
    return (f"the grid offsets of {len(names)} layer(s) are estimates (the centroid of their "
            f"input-gradients, config['offset_readings']): {shown_names(names)}; their rotation "
            "and flip scores depend on them (align= sets them)")


def _partial_warning(result) -> str | None:
    """What to record of layers whose scores leave out some of the images (``n`` below the
    images measured; their means are over the other images); None where there are none.

    An image is left out where its features are NaN or infinite (a half-precision overflow on
    some inputs), or all zero (or, for correlations, constant); where no image there has a
    constant channel (``flat_frac`` 0), they can only be NaN or infinite.
    """
    frame = result.frame
    images = int(result.config.get("images") or 0)
    eq = frame[(frame.comparison == "eq") & (frame.element == "mean")]
    rows = eq[~eq.metric.isin(("flat_frac", "corr_vs_chance"))]
    if rows.empty or images < 1:
        return None
    norm = rows[rows.metric.isin(_NORM_SCORES)]
    counts = (norm if not norm.empty else rows).groupby("layer", sort=False)["n"].min()
    partial = counts[(counts > 0) & (counts < images)]
    if partial.empty:
        return None
    first, n = partial.index[0], int(partial.iloc[0])
    flat = eq[eq.metric == "flat_frac"].set_index("layer")["value"]
    if first in flat.index and flat[first] == 0:
        cause = "NaN or infinite"
    else:
        cause = "NaN, infinite or zero" if not norm.empty else "NaN, infinite or constant"
    names = ", ".join(partial.index[:8]) + (" ..." if len(partial) > 8 else "")
    return (f"{len(partial)} layer(s) leave out images, first {first!r}: scores from {n} of "
            f"{images} images (the other {images - n} have {cause} features there); the scores "
            f"of {names} are means over the images left")


def _clear_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load(model: str, input_size, model_kwargs: dict[str, Any]):
    """:func:`equifast.models.load_model_sized`: at a non-default ``input_size``, models that fix
    their input size when built (ViT, Swin: ``img_size``) are built for it."""
    from equifast.models import load_model_sized

    return load_model_sized(model, input_size, **model_kwargs)


def _init_copy(model: str, input_size, model_kwargs: dict[str, Any], seed: int):
    """The model built again without weights, seeded (``baseline="init"``): the same
    constructor as the model itself, so that an untrained model's ``learned`` is exactly 0."""
    from equifast.baseline import init_copy_by_name

    return init_copy_by_name(model, seed, input_size, **model_kwargs)


def import_plugins(modules: Sequence[str]) -> None:
    """Import modules that register models with timm (``@register_model``), by module name."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ImportError(f"imports: cannot import {module!r} ({error}); is it on "
                              "PYTHONPATH (on every Ray worker too)?") from error


def measure_model(model: str, data: Any, group: str, batch_size: int, min_batch_size: int,
                  measure_kwargs: dict[str, Any], seed: int = 0,
                  model_kwargs: dict[str, Any] | None = None,
                  imports: Sequence[str] = ()) -> ModelOutcome:
    """Measure one model of a survey, halving the batch on out-of-memory, and catch what fails.

    Never raises for a failing model (KeyboardInterrupt and SystemExit pass): the outcome carries
    the result or the errors. Runs in the survey process or in a Ray worker (``imports`` are
    imported first: modules registering models).
    """
    import torch

    import equifast

    outcome = ModelOutcome(model=model)
    import_plugins(imports)
    if measure_kwargs.get("device") is None:
        # Models are built on the CPU; measure on the GPU when this process has one (in a Ray
        # task, the GPU Ray gave it).
        measure_kwargs = {**measure_kwargs,
                          "device": "cuda" if torch.cuda.is_available() else "cpu"}
    from equifast.survey.store import _now

    outcome.started = _now()
    batch = batch_size
    while True:
        outcome.attempts += 1
        try:
            # Random init (no cached weights) is seeded, so that a survey can be repeated.
            torch.manual_seed(seed)
            loaded = _load(model, measure_kwargs.get("input_size"), model_kwargs or {})
            kwargs = dict(measure_kwargs)
            if kwargs.get("baseline") == "init":
                kwargs["baseline"] = _init_copy(model, measure_kwargs.get("input_size"),
                                                model_kwargs or {}, seed)
            result = equifast.measure(loaded.model, data, group=group, batch_size=batch,
                                      model_name=model, seed=seed, **kwargs)
            result.config.update(pretrained=loaded.pretrained, note=loaded.note,
                                 weights=loaded.weights, source=loaded.source)
            _check_finite(result, loaded.model)
            problems = [w for w in (_partial_warning(result), _estimate_warning(result, group))
                        if w is not None]
            if problems:
                result.config["warning"] = "; ".join(problems)  # stored as runs.warning
            outcome.result = result
            return outcome
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - a survey records every failure
            kind = ("out_of_memory" if _is_out_of_memory(error)
                    else "non_finite" if isinstance(error, NonFiniteFeatures)
                    else type(error).__name__)
            message = f"{type(error).__name__}: {error}".strip()
            outcome.errors.append((outcome.attempts, batch, kind, message,
                                   traceback_module.format_exc()))
            del error
            _clear_device_memory()
            if kind == "out_of_memory" and batch // 2 >= min_batch_size:
                batch //= 2
                continue
            return outcome


def _log_line(message: str, limit: int = 200) -> str:
    """An error's first line for the survey's log, cut at ``limit`` characters, but never inside
    the close names of an unknown model (:class:`equifast.models.UnknownModelError`): they say
    what to do."""
    line = (message.splitlines() or [""])[0]
    if len(line) <= limit:
        return line
    close = line.find(" Close names: ")
    end = line.find(". ", close) if close >= 0 else -1
    return line[:max(limit, end + 1)] if end >= 0 else line[:limit]


def _record(store: SurveyStore, outcome: ModelOutcome, key: str, group: str, env_id: int,
            config: dict[str, Any]) -> bool:
    """Write an outcome; True when the model is done.

    Raises:
        DuplicateRunError: another survey finished the model first (its rows stay).
    """
    family = family_of(outcome.model)
    last = len(outcome.errors) - (0 if outcome.ok else 1)
    for attempt, batch, kind, message, trace in outcome.errors[:last]:
        store.add_error(model=outcome.model, config_hash=key, attempt=attempt, batch_size=batch,
                        kind=kind, message=message, traceback=trace, env_id=env_id, fatal=False)
    if outcome.ok:
        store.add_result(outcome.result, model=outcome.model, config_hash=key, family=family,
                         group_spec=group, attempts=outcome.attempts, started=outcome.started,
                         env_id=env_id, survey_config=config)
        return True
    attempt, batch, kind, message, trace = outcome.errors[-1]
    if kind == "out_of_memory":
        message += " (still out of memory at the smallest batch size)"
    store.add_error(model=outcome.model, config_hash=key, attempt=attempt, batch_size=batch,
                    kind=kind, message=message, traceback=trace, env_id=env_id, fatal=True,
                    group_spec=group, family=family, config=config)
    return False


def run_survey(
    models: Sequence[str] | str = (),
    data: Any = "samples",
    store: str | os.PathLike = "survey.sqlite",
    group: str = "translate:8,16,32",
    *,
    model_list: str | os.PathLike | None = None,
    pretrained_only: bool = False,
    retry_failed: bool = False,
    batch_size: int = 32,
    min_batch_size: int = 1,
    seed: int = 0,
    ray: str | bool | None = None,
    model_kwargs: dict[str, Any] | None = None,
    imports: Sequence[str] = (),
    progress: bool = True,
    log=print,
    **measure_kwargs: Any,
) -> SurveySummary:
    """Measure every model of a survey under one configuration, keeping each in ``store``.

    Args:
        models: Names and wildcards (:func:`resolve_models`), e.g. ``["resnet*", "tv:vgg11"]``.
        data: What :func:`equifast.measure` takes: a folder, ``"samples"``, a tensor...
        store: The SQLite file (created when missing; an existing one is resumed).
        group: A group spec (``equifast.parse_group``); a string, so that it can be stored.
        model_list: A file with more model names (one per line).
        pretrained_only: Keep models with pretrained weights in timm (wildcards list tags).
        retry_failed: Measure again the models that failed before with this configuration.
        batch_size: Images per batch; halved on out-of-memory down to ``min_batch_size``.
        seed: Seed of random initialization, bootstrap and alignment.
        ray: Run one Ray task per model: an address (``"auto"``, ``"ray://host:10001"``), or
            True for a local Ray; the survey process stays the only writer of the store.
        model_kwargs: Passed to :func:`equifast.models.load_model` for every model (with an
            ``input_size``, models built for a fixed size get ``img_size`` when they take it).
        imports: Modules to import first, here and in every Ray worker: plugins that register
            models with timm (``@timm.models.register_model``).
        progress: Progress bars (survey and current model).
        log: Where one-line messages go (``print`` by default; ``None`` for silence).
        **measure_kwargs: More :func:`equifast.measure` arguments (``layers``, ``limit``,
            ``device``, ``pooled``, ``bootstrap``, ``input_size``...), the same for every model.
            Without ``device``, models run on the GPU when the process has one.

    Returns:
        A :class:`SurveySummary`.
    """
    started = time.perf_counter()
    log = log or (lambda *_: None)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank would measure every model and write it: one writer is the store's rule.
        raise RuntimeError("run_survey: started under torchrun (WORLD_SIZE > 1); a survey spreads "
                           "models over devices with ray=... (--ray), and torchrun spreads one "
                           "model's images (equifast measure)")
    if isinstance(models, str):
        models = [models]
    if batch_size < 1 or min_batch_size < 1 or min_batch_size > batch_size:
        raise ValueError(f"need 1 <= min_batch_size <= batch_size, found min_batch_size="
                         f"{min_batch_size}, batch_size={batch_size}")
    from equifast.groups import parse_group

    parse_group(group)  # a bad spec fails now, not once per model
    from equifast.engine import check_loader

    check_loader(measure_kwargs.get("loader", "auto"), data)  # as well
    group = "".join(group.split())  # as stored (group_spec): 'translate: 8' is 'translate:8'
    imports = list(imports)
    import_plugins(imports)
    if isinstance(data, (str, os.PathLike)) and str(data) != "samples":
        from equifast.data.folder import find_images

        # A missing or empty folder fails once here (naming the path), not once per model.
        find_images(data)
    names = resolve_models(models, model_list, pretrained_only)
    config = survey_config(group, data, {"seed": seed, "model_kwargs": model_kwargs or {},
                                         **measure_kwargs})
    key = config_hash(config)
    summary = SurveySummary(store=str(store))
    measure_kwargs = {"progress": progress, **measure_kwargs}
    if measure_kwargs.get("input_size") is not None:
        from equifast.data.geometry import check_input_size

        # one number is a square, as for measure (and the configuration): building a model
        # for the size read input_size[0] of it, and every model failed on 'int'
        measure_kwargs["input_size"] = check_input_size(measure_kwargs["input_size"])

    with SurveyStore(store, create=True) as db:
        # one configuration, one spelling in the store (and one group in the report)
        group = db.group_spec_of(key) or group
        pending = []
        for name in names:
            status = db.status(name, key)
            if status == "done" or (status == "failed" and not retry_failed):
                summary.skipped.append(name)
                if status == "failed":
                    summary.failed_before.append(name)
            else:
                pending.append(name)
        log(f"survey: {len(names)} models, {len(summary.skipped)} already in {store}, "
            f"{len(pending)} to measure (config {key})")
        env_id = db.environment_id(environment_info(measure_kwargs.get("device")))

        bar = None
        if progress and pending:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(pending), unit="model", desc="survey", position=0)

        def show(line: str) -> None:
            if bar is not None:
                bar.update(1)
                bar.set_postfix(done=len(summary.done), failed=len(summary.failed))
                bar.write(line)
            else:
                log(line)

        def leave(name: str, why: str) -> None:
            """Skip a model that another survey on this store claimed or finished meanwhile."""
            summary.skipped.append(name)
            summary.elsewhere[name] = why
            show(f"skip   {name}: {why}")

        def claimed(name: str) -> bool:
            why = db.claim(name, key, owner, retry_failed)
            if why is not None:
                leave(name, why)
            return why is None

        # Left to the device, the precision is the device's: float32 on the CPU, bfloat16
        # autocast on CUDA. The device is not part of the configuration (a survey resumes on
        # another machine), so a store resumed on the other kind would mix the two: said once.
        devices_seen = db.device_types_of(key) if measure_kwargs.get("dtype") is None else None

        def note_device(outcome: ModelOutcome) -> None:
            nonlocal devices_seen
            if devices_seen is None:
                return
            here = str(outcome.result.config.get("device", "cpu")).split(":")[0]
            others = devices_seen - {here}
            devices_seen = devices_seen | {here}
            if others and "cuda" in others | {here}:
                message = (
                    f"survey: {outcome.model} ran on {here}, earlier runs of this configuration "
                    f"in {store} on {', '.join(sorted(others))}; left to the device the "
                    "precision differs (float32 on the CPU, bfloat16 autocast on CUDA), so the "
                    "store now holds both. Give a dtype (--dtype float32) to measure in one "
                    "precision everywhere (a configuration of its own)")
                # attributed to run_survey's caller (note_device < finish < run_survey < caller)
                warnings.warn(message, stacklevel=4)
                devices_seen = None  # once per survey

        def finish(outcome: ModelOutcome) -> None:
            try:
                ok = _record(db, outcome, key, group, env_id, config)
            except DuplicateRunError:
                leave(outcome.model, "done: another survey finished it while this one measured "
                                     "it (its rows are kept)")
                return
            (summary.done if ok else summary.failed).append(outcome.model)
            if ok:
                note_device(outcome)
                rate = outcome.result.config.get("images_per_second") or math.nan
                warning = outcome.result.config.get("warning")
                if warning:
                    summary.warned[outcome.model] = warning
                show(f"done   {outcome.model}: {rate:.1f} img/s"
                     + (f"; warning: {warning}" if warning else ""))
            else:
                show(f"failed {outcome.model}: {_log_line(outcome.errors[-1][3])}")

        # Another survey may run on the same store: each model is claimed before it is
        # measured (all at once for Ray, which runs them together), and one that the other
        # claimed or finished meanwhile is skipped.
        owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        try:
            if ray is not None and ray is not False and pending:
                from equifast.survey.ray_tasks import run_with_ray

                mine = [name for name in pending if claimed(name)]
                if mine:
                    run_with_ray(mine, data, group, batch_size, min_batch_size, measure_kwargs,
                                 seed, model_kwargs, imports,
                                 address=None if ray is True else str(ray), on_outcome=finish)
            else:
                for name in pending:
                    if not claimed(name):
                        continue
                    if bar is not None:
                        bar.set_description(f"survey ({name})")
                    finish(measure_model(name, data, group, batch_size, min_batch_size,
                                         measure_kwargs, seed, model_kwargs, imports))
        finally:
            if bar is not None:
                bar.close()
            db.release(owner)
        # What the store holds when the survey ends: a rerun that skips the failed models
        # leaves them failed, and says so (the first run's exit status 1, not 0).
        summary.failures_left = [name for name in names if db.status(name, key) == "failed"]
    summary.seconds = time.perf_counter() - started
    log(str(summary))
    return summary
