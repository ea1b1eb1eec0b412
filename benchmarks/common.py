"""Shared machinery of the equifast benchmarks: timing, metadata, JSON results, the README table.

The method is written down in ``benchmarks/README.md``. In short: every benchmark checks its fast
path against its baseline before it times anything; timings take the median (with IQR and min) of
``repeats`` runs after ``warmup`` runs, with the device synchronised inside the timed region; seeds
are fixed; every result file carries the metadata of the run (git commit, dirty flag, versions,
device, threads, date).

Only torch, numpy and the standard library are used (the GPU machine has no pandas).

Run as a script, this module rewrites the results table of ``benchmarks/README.md`` from the JSON
files under ``benchmarks/results/`` (it accepts and ignores the ``--device``/``--out`` flags that
``make bench`` passes to every ``benchmarks/*.py``)::

    python benchmarks/common.py
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
README = BENCH_DIR / "README.md"
TABLE_START = "<!-- results:start -->"
TABLE_END = "<!-- results:end -->"
SCHEMA_VERSION = 1

if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(1, str(REPO_ROOT))


# --------------------------------------------------------------------------------------------------
# Timing


def synchronizer(device: torch.device | str) -> Callable[[], None]:
    """The function that waits for all queued work of ``device`` (a no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return lambda: torch.cuda.synchronize(index)
    return lambda: None


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of sorted values."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times: list[float]) -> dict[str, Any]:
    """``median``, ``iqr`` (q75 - q25), ``min``, ``repeats`` and the raw ``times`` (seconds)."""
    ordered = sorted(times)
    return {
        "median": statistics.median(ordered) if ordered else math.nan,
        "iqr": _quantile(ordered, 0.75) - _quantile(ordered, 0.25),
        "min": ordered[0] if ordered else math.nan,
        "repeats": len(ordered),
        "times": list(times),
    }


def time_function(
    fn: Callable[[], Any],
    warmup: int = 2,
    repeats: int = 7,
    sync: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    Each timed call is bracketed by ``sync()`` (e.g. ``torch.cuda.synchronize``) *inside* the timed
    region, so that asynchronous device work is counted in full and nothing queued before leaks in.

    Args:
        fn: The work to time (its result is dropped after each call).
        warmup: Untimed calls first (allocator, caches, lazy initialisation, autotuning).
        repeats: Timed calls (at least 1).
        sync: Waits for the device; ``None`` for CPU-only work.

    Returns:
        ``dict(median, iqr, min, repeats, times)`` in seconds.
    """
    sync = sync or (lambda: None)
    for _ in range(max(0, warmup)):
        fn()
    sync()
    times = []
    for _ in range(max(1, repeats)):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return summarize(times)


def time_interleaved(
    fns: dict[str, Callable[[], Any]],
    warmup: int = 2,
    repeats: int = 7,
    sync: Callable[[], None] | None = None,
    before_each: Callable[[], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Time several functions with their repeats interleaved (A B A B ...).

    Same protocol as :func:`time_function` per call, but round-robin, so that slow drifts of the
    machine (other processes, clocks, thermals) hit every contender alike. ``before_each`` runs
    before every timed call, outside the timed region (e.g. :func:`release_free_memory`).

    Returns:
        ``{name: dict(median, iqr, min, repeats, times)}``.
    """
    sync = sync or (lambda: None)
    before_each = before_each or (lambda: None)
    for fn in fns.values():
        for _ in range(max(0, warmup)):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            before_each()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in times.items()}


# --------------------------------------------------------------------------------------------------
# The CPU heap

# What a timed call on the CPU costs can depend on what ran before it: glibc's malloc serves a
# large buffer either from memory it kept (no page faults) or fresh from the kernel (a page fault
# and the zeroing of every 4 KiB page on first write, 8-10 ms for a 40 MB output on the 2-core
# machines here). Which one depends on its moving mmap threshold and on what the heap holds free
# after the calls before (freed temporaries that coalesce can serve the next output): two runs
# of the same script gave one op 14 ms and 2.3 ms. cpu_heap pins one behaviour while a row is
# timed.
HEAP_MODES = ("fresh", "reused")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc's <malloc.h>
_FRESH_FROM = 1 << 20  # "fresh": buffers from this size on are mapped and unmapped each time
_GLIBC_DEFAULTS = {_M_TRIM_THRESHOLD: 128 << 10, _M_MMAP_THRESHOLD: 128 << 10, _M_MMAP_MAX: 65536}


def _glibc() -> Any | None:
    """The running glibc (for ``mallopt``), or ``None`` on another C library or system."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl has mallopt too, a no-op)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Give the pages of glibc's free chunks back to the kernel (``malloc_trim(0)``, every arena):
    a buffer served from one of them afterwards faults its pages in again, as a fresh mapping
    does. Does nothing without glibc."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def cpu_heap(mode: str | None):
    """Pin how glibc's malloc serves large buffers while CPU work is timed.

    Args:
        mode: ``"fresh"``: buffers of 1 MiB and more come from the kernel and go back to it when
            freed (and the heap keeps no more than 1 MiB free at its top), so that the calls pay
            the page faults of their outputs and large temporaries, however many; free chunks the
            heap held before stay in it, though, so call :func:`release_free_memory` before each
            timed call too. ``"reused"``: no memory goes back to the kernel, so a call's buffers
            reuse the pages of the last one's without faults: the kernels' own speed. ``None``:
            leave the allocator as it is.

    Yields:
        Whether the heap is pinned (``False`` where glibc's ``mallopt`` is not available; the
        timings then depend on the allocator's state, as without this).

    Afterwards glibc's default parameters are set again (its moving threshold stays off) and
    the memory kept is given back (``malloc_trim``).
    """
    if mode is not None and mode not in HEAP_MODES:
        raise ValueError(f"cpu_heap mode must be one of {HEAP_MODES} or None, but got {mode!r}")
    libc = _glibc() if mode is not None else None
    if libc is None:
        yield False
        return
    if mode == "fresh":
        settings = {_M_MMAP_THRESHOLD: _FRESH_FROM, _M_TRIM_THRESHOLD: _FRESH_FROM}
        release_free_memory()  # start from a heap that holds no free pages
    else:
        # No release here: it would leave the heap's free chunks without pages, and the first
        # calls would fault them in one chunk after another as malloc picks among them.
        settings = {_M_MMAP_MAX: 0, _M_TRIM_THRESHOLD: 2**31 - 1}
    try:
        pinned = all(libc.mallopt(param, value) == 1 for param, value in settings.items())
        yield pinned
    finally:
        for param, value in _GLIBC_DEFAULTS.items():
            libc.mallopt(param, value)
        release_free_memory()


def minor_faults() -> int:
    """This process's minor page faults so far (a page first touched: mapped, zeroed)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# Page faults a call may take and still count as settled (4 KiB each: 256 KiB, against the
# thousands of a fresh output of a few MB).
SETTLED_FAULTS = 64


def settle_heap(
    fns: dict[str, Callable[[], Any]],
    max_rounds: int = 32,
    sync: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Under ``cpu_heap("reused")``, call the functions in rounds (as ``time_interleaved`` will)
    until a whole round runs with at most :data:`SETTLED_FAULTS` page faults per call.

    Keeping every freed page is not enough at first: malloc may still place a buffer in a free
    chunk or in new heap it has not touched yet, faulting its pages in once, and it takes some
    calls (up to about ten of an 8 MiB buffer, measured here) until each buffer lands on pages
    the last call used. One warm-up call then leaves some of the timed calls paying page faults.

    Returns:
        ``dict(rounds=<rounds run>, settled=<whether the last round was settled>,
        faults={name: <page faults of its call in the last round>})``.
    """
    sync = sync or (lambda: None)
    faults: dict[str, int] = {}
    rounds = 0
    for rounds in range(1, max(1, max_rounds) + 1):
        for name, fn in fns.items():
            before = minor_faults()
            fn()
            sync()
            faults[name] = minor_faults() - before
        if all(count <= SETTLED_FAULTS for count in faults.values()):
            return {"rounds": rounds, "settled": True, "faults": faults}
    return {"rounds": rounds, "settled": False, "faults": faults}


# --------------------------------------------------------------------------------------------------
# Metadata


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect_metadata(device: torch.device | str) -> dict[str, Any]:
    """Everything needed to read a result later: code, versions, device, threads, date."""
    device = torch.device(device)
    status = _git("status", "--porcelain", "--untracked-files=no")
    untracked = _git("ls-files", "--others", "--exclude-standard")
    untracked_files = [
        f for f in (untracked or "").splitlines() if f and not f.startswith("benchmarks/results/")
    ]
    meta: dict[str, Any] = {
        "git_commit": _git("rev-parse", "HEAD"),
        # Dirty: modified tracked files, or untracked files (new sources) besides results.
        "git_dirty": None if status is None else bool(status) or bool(untracked_files),
        "git_untracked": untracked_files if untracked is not None else None,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_version": torch.__version__,
        "numpy_version": None,
        "equifast_version": None,
        "equifast_build": None,
        "device_type": device.type,
        "device_name": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_cuda_version": torch.version.cuda,
    }
    try:
        import numpy

        meta["numpy_version"] = numpy.__version__
    except ImportError:
        pass
    try:
        import equifast
        from equifast import _ext

        meta["equifast_version"] = getattr(equifast, "__version__", None)
        meta["equifast_build"] = _ext.build_info()
    except Exception as error:  # noqa: BLE001 - metadata must never stop a benchmark
        meta["equifast_build"] = {"loaded": False, "error": f"{type(error).__name__}: {error}"}
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        meta["device_name"] = torch.cuda.get_device_name(index)
        meta["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        meta["gpu_capability"] = f"{props.major}.{props.minor}"
        meta["cpu_name"] = _cpu_name()
    return meta


# --------------------------------------------------------------------------------------------------
# Results


def _jsonable(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), tuples -> lists, torch dtypes/devices -> strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value).replace("torch.", "")
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return _jsonable(value.item())
    return value


def write_result(out_dir: str | os.PathLike, name: str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as ``<out_dir>/<name>.json`` (atomically) and return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def default_out(device: torch.device | str) -> Path:
    """``benchmarks/results/cpu`` or ``benchmarks/results/gpu``."""
    return RESULTS_DIR / ("gpu" if torch.device(device).type == "cuda" else "cpu")


def is_under_results(path: str | os.PathLike) -> bool:
    """Whether ``path`` lies inside ``benchmarks/results`` (its results belong in the README)."""
    try:
        Path(path).resolve().relative_to(RESULTS_DIR.resolve())
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# README table


def format_seconds(seconds: float | None) -> str:
    """``0.00123 -> '1.23 ms'``; ``None`` -> ``'-'``."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} us"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def _run_label(meta: dict[str, Any]) -> str:
    commit = (meta.get("git_commit") or "unknown")[:10]
    dirty = "+dirty" if meta.get("git_dirty") else ""
    threads = meta.get("torch_threads")
    where = meta.get("device_name") or meta.get("device_type")
    extra = f", {threads} torch threads" if meta.get("device_type") == "cpu" else ""
    return (
        f"{where}{extra}, torch {meta.get('torch_version')}, commit {commit}{dirty}, "
        f"{meta.get('date')}"
    )


def case_label(row: dict[str, Any]) -> str:
    """A row's case name, with the heap mode it was timed under (CPU transform_images)."""
    heap = row.get("heap")
    return f"{row.get('case', '?')} ({heap} heap)" if heap else str(row.get("case", "?"))


def render_table(results: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown for the README from ``[(relative path, payload), ...]`` of benchmark results."""
    if not results:
        return "_No results yet: run `python benchmarks/bench_ops.py --device cpu`._"
    blocks = []
    for rel, payload in sorted(results):
        meta = payload.get("meta", {})
        if payload.get("benchmark") == "end_to_end":
            heap = payload.get("settings", {}).get("heap")
            timed_under = f"; timed under the {heap} heap" if heap and heap != "default" else ""
            blocks.append(
                f"**{rel}**: {_run_label(meta)}{timed_under}"
                + (" (quick run)" if payload.get("quick") else "")
                + "\n\n" + render_end_to_end_rows(payload.get("rows", []))
                + "\n\n" + END_TO_END_NOTE
            )
            continue
        lines = [
            f"**{rel}**: {_run_label(meta)}" + (" (quick run)" if payload.get("quick") else "")
        ]
        extra = payload.get("copy_bandwidth_gbs")
        if extra:
            lines[0] += f"; device copy bandwidth {extra:.0f} GB/s"
        lines += [
            "",
            "| op | case | dtype | batch | baseline | compiled | speedup | GB/s | % copy "
            "| fresh output | speedup beyond it | torch path | speedup vs it | check |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in payload.get("rows", []):
            check = row.get("check", {})
            ok = "ok" if check.get("passed") else ("FAIL" if check else "-")
            compiled = row.get("compiled_time") or {}
            baseline = row.get("baseline_time") or {}
            comp = format_seconds(compiled.get("median")) if row.get("compiled") else "n/a"
            ratio = row.get("copy_ratio")
            fresh = (row.get("fresh_output_time") or {}).get("median")
            path = (row.get("torch_path_time") or {}).get("median")
            lines.append(
                "| {op} | {case} | {dtype} | {batch} | {base} | {comp} | {speed} | {gbs} | {ratio} "
                "| {fresh} | {beyond} | {path} | {versus} | {ok} |".format(
                    op=row.get("op", "?"),
                    case=case_label(row),
                    dtype=row.get("dtype", "?"),
                    batch=row.get("batch", "?"),
                    base=format_seconds(baseline.get("median")),
                    comp=comp,
                    speed=_fmt(row.get("speedup"), ".2f", "x"),
                    gbs=_fmt(row.get("gbs"), ".1f"),
                    ratio=_fmt(None if ratio is None else 100 * ratio, ".0f", "%"),
                    fresh="-" if fresh is None else format_seconds(fresh),
                    beyond=_fmt(row.get("speedup_beyond_fresh_output"), ".2f", "x"),
                    path="-" if path is None else format_seconds(path),
                    versus=_fmt(row.get("speedup_vs_torch_path"), ".2f", "x"),
                    ok=ok,
                )
            )
        blocks.append("\n".join(lines))
    note = (
        "Times are medians; `baseline` is the torch-ops baseline, `compiled` the equifast kernel "
        "(`n/a`: not built for this device). GB/s: bytes(feats) / time for equivariance_stats, "
        "(bytes(src) + bytes(out)) / time for transform_images, of the compiled op (of the "
        "baseline without one); `% copy` compares it with the device's measured copy bandwidth "
        "(read + write); `fresh output` (transform_images) the time to allocate and write an "
        "output of the same shape once, which both sides pay, and the speedup beyond it (`-` where "
        "the compiled op is within 10% of it); "
        "`fresh heap` / `reused heap` (transform_images on the CPU): timed with every buffer of "
        "1 MiB and more fresh from the kernel each call (page faults), then with the pages of "
        "the last call reused; "
        "`torch path` (transform_images) the textbook roll / rot90 / grid_sample path issue 3 "
        "names (float blocks joined by `torch.cat`), and the compiled op's speedup against it. "
        "Method and caveats: see above."
    )
    return "\n\n".join(blocks + [note])


END_TO_END_NOTE = (
    "End to end (`bench_end_to_end.py`): images/s from the median time of a whole measurement "
    "(bootstrap=0); `floor` the fastest bare forward of the same stacked images with no hooks; "
    "`fixed` equifast's per-call cost outside the loop over the batches (model setup, layout and "
    "alignment probe, result frame); `overhead` equifast's whole call over the floor, `steady` its "
    "loop over the batches over the floor; peak MiB: peak RSS growth of a fresh process per "
    "variant (CPU) or max_memory_allocated (CUDA); on the CPU the times are taken under a pinned "
    "glibc heap (`--heap`, named above the table). Targets: steady overhead <= 15%, speedup >= "
    "1.5x, peak memory below naive's."
)


def render_end_to_end_rows(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows of ``bench_end_to_end.py`` (stdout and README)."""

    def mib(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines = [
        "| model | group | layers | images | equifast img/s | naive img/s | speedup | floor "
        "| fixed | overhead | steady | peak MiB equifast / naive | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ok = "ok" if row.get("check", {}).get("passed") else "FAIL"
        lines.append(
            "| {m} | {g} | {lay} | {n}x{s}px | {e} | {nv} | {sp} | {fl} | {fx} | {ov} | {st} "
            "| {mem} | {ok} |"
            .format(
                m=row.get("model"),
                g=row.get("group"),
                lay=row.get("layers") or "stages",
                n=row.get("images"),
                s=row.get("size"),
                e=_fmt(row.get("equifast_images_per_s"), ".2f"),
                nv=_fmt(row.get("naive_images_per_s"), ".2f"),
                sp=_fmt(row.get("speedup"), ".2f", "x"),
                fl=format_seconds(row.get("floor_time")),
                fx=format_seconds(row.get("fixed_seconds")),
                ov=_fmt(row.get("overhead_pct"), ".0f", "%"),
                st=_fmt(row.get("overhead_steady_pct"), ".0f", "%"),
                mem=f"{mib(row.get('equifast_peak_mib'))} / {mib(row.get('naive_peak_mib'))}",
                ok=ok,
            )
        )
    return "\n".join(lines)


def load_results(root: str | os.PathLike = RESULTS_DIR) -> list[tuple[str, dict[str, Any]]]:
    """All ``*.json`` result files under ``root`` as ``[(path relative to root, payload)]``.

    Files under an ``experiments`` folder (variants timed to choose between them, kept as the
    evidence of a choice) are left out: the table shows the tree as it is.
    """
    root = Path(root)
    found = []
    for path in sorted(root.rglob("*.json")) if root.is_dir() else []:
        if "experiments" in path.relative_to(root).parts[:-1]:
            continue
        try:
            payload = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(payload, dict) and "rows" in payload:
            found.append((path.relative_to(root).as_posix(), payload))
    return found


def update_readme_table(
    readme: str | os.PathLike = README, results_root: str | os.PathLike = RESULTS_DIR
) -> bool:
    """Rewrite the text between the results markers of ``readme`` from the JSON results.

    Returns:
        True when the README changed. A README without both markers is left alone (False).
    """
    readme = Path(readme)
    text = readme.read_text() if readme.exists() else ""
    start, end = text.find(TABLE_START), text.find(TABLE_END)
    if start < 0 or end < start:
        return False
    table = render_table(load_results(results_root))
    new = text[: start + len(TABLE_START)] + "\n" + table + "\n" + text[end:]
    if new == text:
        return False
    readme.write_text(new)
    return True


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark takes: ``--device``, ``--out``, ``--threads``, ``--quick``, ..."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    parser.add_argument(
        "--out",
        default=None,
        help="folder for the JSON result (default: benchmarks/results/cpu or /gpu by device)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 2 on the CPU, torch's default with a GPU)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, one repeat: a smoke test, not a timing"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--no-readme",
        action="store_true",
        help="do not rewrite the README table (it is rewritten only for --out under "
        "benchmarks/results anyway)",
    )
    return parser


def setup_run(args: argparse.Namespace) -> torch.device:
    """Resolve the device, set threads and seeds, fill in ``args.out``; returns the device."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available on this machine")
    threads = args.threads if args.threads is not None else (2 if device.type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        if device.index is not None:
            torch.cuda.set_device(device.index)
        # No TF32 anywhere: the baselines and the kernels must compute the same float32 numbers.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    seed_everything(args.seed)
    if args.out is None:
        args.out = str(default_out(device))
    return device


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rewrite the README results table from JSON.")
    parser.add_argument("--results", default=str(RESULTS_DIR), help="results root")
    parser.add_argument("--readme", default=str(README))
    args, _ = parser.parse_known_args(argv)  # `make bench` passes --device/--out: ignored
    changed = update_readme_table(args.readme, args.results)
    print(f"{args.readme}: results table {'rewritten' if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
