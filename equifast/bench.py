"""equifast against the naive PyTorch loop on one model: the same numbers, the time of each.

:func:`compare` runs :func:`equifast.measure` and :func:`equifast.naive.measure` (the loop a
careful user would write: one forward per element, batched over the images, statistics by torch
ops; DESIGN.md section 8) with the same arguments, checks that their scores agree row by row
(:func:`agreement`), then times both in alternating rounds beside the floor: bare forwards of the
same number of stacked images with no hooks (:func:`floor_plan`, :func:`floor_forwards`), and on
request the peak memory of one call of each (:func:`peak_memory`). ``equifast bench`` is its
command line; the repository's ``benchmarks/bench_end_to_end.py`` is the fixed benchmark built on
the same pieces.

Example:
    >>> from equifast.bench import compare
    >>> comparison = compare("resnet18", "samples", group="translate:8,16", limit=4,
    ...                      batch_size=4, input_size=64, repeats=1)  # doctest: +SKIP
    >>> comparison.agreement.passed, round(comparison.speedup, 1)     # doctest: +SKIP
    (True, 2.4)
    >>> print(comparison.format())                                     # doctest: +SKIP
"""

from __future__ import annotations

import collections.abc
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .result import Result

# The rows both results are matched on.
KEYS = ("layer", "element", "comparison", "metric")
# Largest difference of corr taken as the same number, by how the models ran. The two loops
# stack different images into a forward, so the model's own rounding differs between them: in
# float32 on the CPU 4e-9 (resnet18, convnext_atto, vit_tiny at 64 px), in bfloat16 / float16 on
# the CPU 1e-15 (the same products), on a GPU under bfloat16 autocast or TF32 convolutions up to
# 5e-4 (cuDNN picks its algorithm by batch size).
TOLERANCE_FLOAT64 = 1e-6
TOLERANCE_FLOAT32 = 1e-4
TOLERANCE_GPU_OR_16_BIT = 1e-3
VARIANTS = ("equifast", "naive", "floor")


@dataclass
class Agreement:
    """How two results of the same measurement agree, row by row (:func:`agreement`)."""

    passed: bool  # every row on both sides, NaN in the same rows, corr within the tolerance
    rows: int  # rows on both sides
    unmatched_rows: int  # rows on one side only
    nan_mismatch: int  # rows NaN on one side only
    max_abs_diff_corr: float  # largest |difference| of corr (NaN: no corr row to compare)
    max_abs_diff_all_metrics: float  # the same over every metric (psnr in dB among them)
    tolerance_corr: float
    worst_row: dict[str, Any] = field(default_factory=dict)  # the keys of the largest corr gap

    def describe(self) -> str:
        """One line: the same numbers, or what differs."""
        if self.passed:
            return (f"the same numbers: largest |difference| of corr {self.max_abs_diff_corr:.1e} "
                    f"over {self.rows} rows (tolerance {self.tolerance_corr:.0e})")
        why = []
        if self.unmatched_rows:
            why.append(f"{self.unmatched_rows} rows on one side only")
        if self.nan_mismatch:
            why.append(f"{self.nan_mismatch} rows NaN on one side only")
        if not self.max_abs_diff_corr < self.tolerance_corr:
            where = ", ".join(f"{k} {v}" for k, v in self.worst_row.items())
            why.append(f"corr differs by up to {self.max_abs_diff_corr:.1e} (tolerance "
                       f"{self.tolerance_corr:.0e}{'; ' + where if where else ''})")
        return "DIFFERENT numbers: " + "; ".join(why)


def default_tolerance(config: dict[str, Any]) -> float:
    """The corr tolerance for a measurement's ``config``: by its dtype and device (see
    ``TOLERANCE_*``)."""
    dtype, device = str(config.get("dtype", "float32")), str(config.get("device", "cpu"))
    if dtype == "float64" and not device.startswith("cuda"):
        return TOLERANCE_FLOAT64
    if dtype == "float32" and not device.startswith("cuda"):
        return TOLERANCE_FLOAT32
    return TOLERANCE_GPU_OR_16_BIT


def agreement(fast: Result, slow: Result, tolerance: float | None = None) -> Agreement:
    """Compare two results of the same measurement row by row (layer, element, comparison,
    metric).

    Args:
        fast, slow: the results (:func:`equifast.measure` and :func:`equifast.naive.measure`).
        tolerance: the largest |difference| of ``corr`` that passes (default:
            :func:`default_tolerance` of ``fast``'s config).

    Returns:
        An :class:`Agreement`; ``passed`` needs every row on both sides, NaN in the same rows and
        at least one corr row, every corr within ``tolerance``.
    """
    keys = list(KEYS)
    tolerance = default_tolerance(fast.config) if tolerance is None else tolerance
    merged = fast.frame[keys + ["value"]].merge(slow.frame[keys + ["value"]], on=keys,
                                                how="outer", suffixes=("_fast", "_slow"),
                                                indicator=True)
    unmatched = int((merged["_merge"] != "both").sum())
    both = merged[merged["_merge"] == "both"]
    diff = (both["value_fast"] - both["value_slow"]).abs()
    nan_mismatch = int((both["value_fast"].isna() != both["value_slow"].isna()).sum())
    corr = diff[both["metric"] == "corr"]
    max_corr = float(corr.max()) if corr.notna().any() else math.nan
    worst = {}
    if corr.notna().any():
        worst = {key: (value.item() if hasattr(value, "item") else value)
                 for key, value in both.loc[corr.idxmax(), keys].items()}
    passed = unmatched == 0 and nan_mismatch == 0 and len(corr) > 0 and max_corr < tolerance
    return Agreement(
        passed=bool(passed), rows=int(len(both)), unmatched_rows=unmatched,
        nan_mismatch=nan_mismatch, max_abs_diff_corr=max_corr,
        max_abs_diff_all_metrics=float(diff.max()) if diff.notna().any() else math.nan,
        tolerance_corr=float(tolerance), worst_row=worst)


@dataclass
class Comparison:
    """What :func:`compare` found: the check, and the times of each variant."""

    agreement: Agreement
    images: int  # images measured per call
    seconds: dict[str, list[float]]  # per variant ("equifast", "naive", "floor"), each round
    timings: list[dict[str, float]]  # equifast's own split of each timed call (config["timings"])
    config: dict[str, Any]  # equifast's result config (elements, plan, dtype, device...)
    floor_plan: list[list[int]] = field(default_factory=list)  # images per bare forward, by batch
    peak_cuda_mib: dict[str, float] = field(default_factory=dict)  # per variant, on a GPU
    # CPU (memory=True): per loop, the peak resident growth of one call in a fresh process, or
    # why it could not be read (peak_memory)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)
    memory_errors: dict[str, str] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)  # where it ran (machine_info)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files, both loops

    def median(self, variant: str) -> float:
        """The median seconds of a variant's timed calls (NaN when it was not timed)."""
        times = self.seconds.get(variant) or []
        return statistics.median(times) if times else math.nan

    def images_per_second(self, variant: str) -> float:
        median = self.median(variant)
        return self.images / median if median > 0 else math.nan

    @property
    def speedup(self) -> float:
        """The naive loop's time over equifast's: the median of the ratios within a round."""
        return _paired_median(self.seconds.get("naive", []), self.seconds.get("equifast", []))

    @property
    def overhead(self) -> float:
        """equifast's whole call over the bare forwards, minus 1 (NaN without a floor)."""
        return _paired_median(self.seconds.get("equifast", []), self.seconds.get("floor", [])) - 1

    @property
    def steady_overhead(self) -> float:
        """equifast's loop over the batches (its per-image work: transforms, forwards,
        statistics, scores) over the bare forwards, minus 1: the call's fixed costs (model setup,
        the layout and alignment probe, the result frame) left out."""
        loops = [t["batches"] for t in self.timings]
        return _paired_median(loops, self.seconds.get("floor", [])) - 1

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON: the fields, and the medians and ratios derived from them."""
        data = asdict(self)
        data["summary"] = {
            "median_seconds": {v: self.median(v) for v in VARIANTS if v in self.seconds},
            "images_per_second": {v: self.images_per_second(v) for v in VARIANTS
                                  if v in self.seconds},
            "speedup": self.speedup, "overhead": self.overhead,
            "steady_overhead": self.steady_overhead,
        }
        return data

    def format(self) -> str:
        """A readable table: the check, each variant's time and images/s, the ratios."""
        config = self.config
        rounds = len(self.seconds.get("equifast", []))
        lines = [
            f"check: {self.agreement.describe()}",
            f"{self.images} images, group {config.get('group')} "
            f"({len(config.get('elements', []))} elements), input "
            f"{'x'.join(map(str, config.get('input_size', [])))}, "
            f"{config.get('device')}, {config.get('dtype')}"
            f"{', channels-last' if config.get('channels_last') else ''}; "
            f"{rounds} timed round{'s' if rounds != 1 else ''}, medians",
            f"  {'':<22}{'seconds':>10}{'images/s':>11}",
        ]
        if not self.seconds:
            lines[1:] = ["nothing timed: a comparison of speed means something only for the same "
                         "numbers"]
            return "\n".join(lines)
        names = {"equifast": "equifast", "naive": "naive PyTorch loop",
                 "floor": "bare forward (floor)"}
        for variant in VARIANTS:
            if variant not in self.seconds:
                continue
            line = (f"  {names[variant]:<22}{self.median(variant):>10.3f}"
                    f"{self.images_per_second(variant):>11.1f}")
            if variant == "equifast" and self.timings:
                fixed = statistics.median(t["setup"] + t["frame"] for t in self.timings)
                loop = statistics.median(t["batches"] for t in self.timings)
                line += f"   (fixed {fixed:.3f} s: setup and probe, frame; loop {loop:.3f} s)"
            if variant == "floor" and self.floor_plan:
                line += f"   (images per forward: {_plan_words(self.floor_plan)})"
            if variant in self.peak_cuda_mib:
                line += f"   peak {self.peak_cuda_mib[variant]:.0f} MiB"
            if variant in self.peak_rss_mib:
                line += f"   peak +{self.peak_rss_mib[variant]:.0f} MiB resident"
            if variant in self.memory_errors:
                line += f"   (peak memory not read: {self.memory_errors[variant]})"
            lines.append(line)
        ratio = f"equifast: {self.speedup:.2f}x the naive loop's images/s"
        if "floor" in self.seconds:
            ratio += (f"; over the bare forward: {100 * self.overhead:+.0f}% the whole call, "
                      f"{100 * self.steady_overhead:+.0f}% its loop over the batches (the fixed "
                      "costs left out)")
        lines.append(ratio)
        return "\n".join(lines)


def _plan_words(plan: list[list[int]]) -> str:
    """``8 x (32 + 24)`` for 8 batches of the same forwards, else each batch's."""
    words = [" + ".join(map(str, sizes)) for sizes in plan]
    if len(set(words)) == 1:
        return f"{len(words)} x ({words[0]})" if len(words) > 1 else words[0]
    return ", ".join(f"({w})" for w in words)


def _paired_median(numerators: list[float], denominators: list[float]) -> float:
    """The median over rounds of numerator / denominator taken within each round: the machine's
    drift between rounds cancels."""
    ratios = [n / d for n, d in zip(numerators, denominators) if d > 0]
    return statistics.median(ratios) if ratios else math.nan


def forward_blocks(config: dict[str, Any]) -> list[int]:
    """Blocks of images in each forward of a batch, as the engine's ``config`` ran them
    (``elements_per_chunk`` elements and ``blocks_per_forward`` blocks at most; the identity
    block with the first forward only, as the engine keeps its features)."""
    from .engine import _forward_bounds

    bounds = _forward_bounds(len(config["elements"]), int(config["elements_per_chunk"]),
                             int(config["blocks_per_forward"]))
    return [hi - lo + (i == 0) for i, (lo, hi) in enumerate(bounds)]


def batch_sizes(config: dict[str, Any]) -> list[int]:
    """Images in each batch of one pass over the data: ``batch_size`` each, the last one what
    is left of ``images``."""
    images, batch = int(config["images"]), int(config["batch_size"])
    return [batch] * (images // batch) + ([images % batch] if images % batch else [])


def floor_plan(config: dict[str, Any]) -> list[list[int]]:
    """Images per bare forward, by batch, as the engine's ``config`` ran them: its batches
    (:func:`batch_sizes`), each in its forwards (:func:`forward_blocks`), once per pass over the
    data (``channel_map="linear"`` fits in passes of its own)."""
    blocks = forward_blocks(config)
    passes = 1 + int(config.get("fit_passes", 0))
    return [[n * size for n in blocks] for size in batch_sizes(config)] * passes


def floor_forwards(model: torch.nn.Module, config: dict[str, Any], channels: int,
                   plan: list[list[int]]) -> Callable[[], None]:
    """A function that runs the bare forwards of ``plan`` (images per forward, by batch, as
    :func:`floor_plan` gives them) on random inputs of ``channels`` channels, as the engine's
    ``config`` ran the model (device, dtype or bfloat16 autocast, memory format), under
    ``inference_mode`` with no hooks. The inputs are made once, outside the timed calls."""
    device = torch.device(config["device"])
    autocast = config["dtype"] == "bfloat16-autocast"
    dtype = torch.float32 if autocast else getattr(torch, config["dtype"])
    memory_format = torch.channels_last if config.get("channels_last") else torch.contiguous_format
    height, width = config["input_size"]
    generator = torch.Generator().manual_seed(0)
    inputs = {n: torch.randn(n, channels, height, width, generator=generator)
              .to(device, dtype).contiguous(memory_format=memory_format)
              for sizes in plan for n in sizes}

    def run() -> None:
        with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16,
                                                    enabled=autocast):
            for sizes in plan:
                for n in sizes:
                    model(inputs[n])

    return run


def _cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what ``platform`` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where a comparison ran: the device's name, CPU count, torch threads, platform, date."""
    import datetime
    import os
    import platform

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {"device_name": name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _status_kib(field: str) -> float | None:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process in KiB, from
    Linux's /proc/self/status; None elsewhere. (Not ``ru_maxrss``: Linux carries it over
    ``execve`` from the forking parent, so a spawned child would report the parent's peak.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _memory_worker(variant: str, model, data, threads: int, kwargs: dict[str, Any],
                   queue) -> None:
    """One call of ``variant`` in this fresh process; puts ``(variant, {...})`` on ``queue``."""
    try:
        import equifast
        from equifast import naive

        torch.set_num_threads(threads)
        before = _status_kib("VmRSS")
        (equifast.measure if variant == "equifast" else naive.measure)(model, data, **kwargs)
        peak = _status_kib("VmHWM")
        if before is None or peak is None:
            raise OSError("no /proc/self/status: the peak resident size is read on Linux only")
        queue.put((variant, {"rss_peak_growth_mib": (peak - before) / 1024.0,
                             "rss_peak_mib": peak / 1024.0}))
    except Exception as error:  # noqa: BLE001 - reported, never hangs the parent
        queue.put((variant, {"error": f"{type(error).__name__}: {error}"}))


def peak_memory(model: torch.nn.Module, data: Any, timeout: float = 1800,
                **measure_kwargs: Any) -> dict[str, dict[str, Any]]:
    """The CPU memory one call of each loop takes: each in a freshly spawned process (the two
    side by side), the peak resident size during the call (``VmHWM``) minus the resident size
    just before it (the model and data already there), in MiB.

    A process of its own per loop, because a process that ran anything before keeps heap pages
    that the next call reuses, and its peak would then say what ran first. The model and data
    reach the processes pickled (a module whose class cannot be imported there, one defined in
    an interactive session, cannot be sent: that is reported as the variant's ``error``).

    Args:
        model: the module (as both loops get it).
        data: images, as :func:`equifast.measure`.
        timeout: seconds to wait for each process.
        measure_kwargs: passed to both loops (as :func:`compare`); ``device`` must be the CPU.

    Returns:
        ``{"equifast": {...}, "naive": {...}}``, each ``rss_peak_growth_mib`` and
        ``rss_peak_mib``, or ``error``.
    """
    import multiprocessing
    import queue as queues

    device = torch.device(measure_kwargs.get("device") or "cpu")
    if device.type != "cpu":
        raise ValueError(f"peak_memory: the resident size of a CPU run; found device {device} "
                         "(on a GPU, compare() records torch.cuda.max_memory_allocated)")
    kwargs = {"bootstrap": 0, **measure_kwargs, "progress": False}
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    processes = {variant: context.Process(
        target=_memory_worker,
        args=(variant, model, data, torch.get_num_threads(), kwargs, results))
        for variant in ("equifast", "naive")}
    found: dict[str, dict[str, Any]] = {}
    started = {}
    for variant, process in processes.items():
        try:
            process.start()  # (pickles the model and data here, in this process)
        except Exception as error:  # noqa: BLE001 - said as the variant's error
            found[variant] = {"error": f"the model or data cannot be sent to a fresh process "
                                       f"({type(error).__name__}: {error})"}
        else:
            started[variant] = process
    for _ in started:
        try:
            variant, out = results.get(timeout=timeout)
        except queues.Empty:
            break
        found[variant] = out
    for variant, process in started.items():
        process.join(timeout=60)
        if process.is_alive():
            process.terminate()
        found.setdefault(variant, {"error": f"no answer within {timeout:.0f} s (exit code "
                                            f"{process.exitcode})"})
    return found


def compare(model: torch.nn.Module | str, data: Any = "samples", repeats: int = 3,
            floor: bool = True, memory: bool = False, tolerance: float | None = None,
            progress: bool = False, log: Callable[[str], None] | None = None,
            **measure_kwargs: Any) -> Comparison:
    """Run equifast and the naive loop on the same measurement, check the numbers, time both.

    The first call of each is the check (and their warm-up); then ``repeats`` rounds, each
    equifast, the naive loop and the floor in turn, so that the machine's drift hits all alike.
    Timed: whole calls, data loading included (both loops read ``data`` the same way).

    Args:
        model: a module (eval mode) or a timm / ``tv:`` name, as :func:`equifast.measure`. A name
            is built once (random init seeded by ``measure_kwargs["seed"]``, or the cached
            pretrained weights) and both loops measure that module.
        data: images, as :func:`equifast.measure` (default the embedded photographs).
        repeats: timed rounds, at least 1.
        floor: also time the bare forwards (no hooks) of the same stacked images.
        memory: on the CPU, also the peak resident growth of one call of each loop, each in a
            fresh process (:func:`peak_memory`; a few seconds more per loop). On a GPU the peak
            of ``torch.cuda.max_memory_allocated`` is recorded in every case.
        tolerance: the corr tolerance of the check (default :func:`default_tolerance`).
        progress: progress bars of each call.
        log: called with a line of text as each stage starts (``print`` for the command line).
        measure_kwargs: passed to both loops (``group``, ``layers``, ``batch_size``, ``limit``,
            ``input_size``, ``device``, ``dtype`` ...); ``bootstrap`` defaults to 0 (both would
            spend the same time on it), ``loader``, ``distributed`` and ``baseline`` are refused
            (the naive loop has none of them).

    Returns:
        A :class:`Comparison`; when the check fails nothing is timed (``seconds`` is empty) and
        ``agreement.passed`` is False.

    Raises:
        ValueError: ``repeats`` below 1, an argument the naive loop does not take, or ``data``
            that can be read only once (a generator).
    """
    import equifast
    from equifast import naive

    from .data.geometry import check_input_size
    from .models import input_channels, load_model_sized

    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats: expected an integer >= 1 (timed rounds), found {repeats!r}")
    refused = sorted({"loader", "distributed", "baseline"} & set(measure_kwargs))
    if refused:
        raise ValueError(f"{', '.join(refused)}: equifast.naive.measure has no such argument, so "
                         "the two loops could not run the same measurement; leave "
                         f"{'them' if len(refused) > 1 else 'it'} out")
    if isinstance(data, collections.abc.Iterator):
        raise ValueError(f"data: compare reads the images {repeats + 2} times or more (the check "
                         "and each round, both loops), so it needs data that can be read again: "
                         "a tensor, a folder, 'samples', a list of batches or a DataLoader; found "
                         f"a one-shot iterator ({type(data).__name__})")
    say = log or (lambda line: None)
    kwargs = {"bootstrap": 0, **measure_kwargs, "progress": progress}
    if isinstance(model, str):
        torch.manual_seed(int(kwargs.get("seed", 0)))
        loaded = load_model_sized(model, check_input_size(kwargs.get("input_size")))
        model, kwargs["model_name"] = loaded.model, kwargs.get("model_name", loaded.name)

    def run_equifast() -> Result:
        return equifast.measure(model, data, **kwargs)

    def run_naive() -> Result:
        return naive.measure(model, data, **kwargs)

    say("check: equifast and the naive loop, once each (also their warm-up)")
    fast = run_equifast()
    slow = run_naive()
    check = agreement(fast, slow, tolerance)
    config = fast.config
    device = torch.device(config["device"])
    comparison = Comparison(agreement=check, images=int(config["images"]), seconds={},
                            timings=[], config=config, machine=machine_info(device),
                            skipped=[(str(path), str(why)) for path, why in fast.skipped])
    if not check.passed:
        return comparison
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    variants: dict[str, Callable[[], Any]] = {"equifast": run_equifast, "naive": run_naive}
    if floor:
        comparison.floor_plan = floor_plan(config)
        variants["floor"] = floor_forwards(model, config, input_channels(model),
                                           comparison.floor_plan)
        variants["floor"]()  # its warm-up (allocator, kernel choices)
    if memory and not cuda:
        say("peak memory: one call of each loop, each in a fresh process")
        for variant, found in peak_memory(model, data, **kwargs).items():
            if "error" in found:
                comparison.memory_errors[variant] = found["error"]
            else:
                comparison.peak_rss_mib[variant] = found["rss_peak_growth_mib"]
    comparison.seconds = {name: [] for name in variants}
    for round_ in range(repeats):
        say(f"round {round_ + 1} of {repeats}: {', '.join(variants)}")
        for name, run in variants.items():
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            sync()
            started = time.perf_counter()
            out = run()
            sync()
            comparison.seconds[name].append(time.perf_counter() - started)
            if name == "equifast":
                comparison.timings.append(dict(out.config["timings"]))
            if cuda:
                peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                comparison.peak_cuda_mib[name] = max(peak, comparison.peak_cuda_mib.get(name, 0))
    return comparison
