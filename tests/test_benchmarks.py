"""The benchmark scripts run and their correctness checks pass (structure only, never speed)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

TIMING_KEYS = {"median", "iqr", "min", "repeats", "times"}
ROW_KEYS = {
    "op",
    "case",
    "dtype",
    "batch",
    "elements",
    "bytes",
    "compiled",
    "check",
    "baseline_time",
    "gbs",
    "copy_ratio",
}
META_KEYS = {
    "git_commit",
    "git_dirty",
    "date",
    "torch_version",
    "equifast_version",
    "device_name",
    "cpu_count",
    "torch_threads",
}


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "bench_ops.py"),
            "--quick",
            "--threads",
            "1",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    path = out / "ops.json"
    assert path.exists(), proc.stdout
    return json.loads(path.read_text())


def test_quick_run_structure(quick_result):
    payload = quick_result
    assert payload["benchmark"] == "ops"
    assert payload["quick"] is True
    assert payload["device"] == "cpu"
    assert META_KEYS <= set(payload["meta"])
    assert payload["meta"]["torch_threads"] == 1
    assert set(payload["compiled"]) == {"equivariance_stats", "transform_images"}
    assert payload["copy_bandwidth_gbs"] > 0
    assert TIMING_KEYS <= set(payload["copy"]["time"])
    rows = payload["rows"]
    ops = {row["op"] for row in rows}
    assert ops == {"equivariance_stats", "transform_images"}
    cases = {row["case"] for row in rows}
    for name in ("nchw_256x56x56", "nchw_2048x7x7", "nhwc_56x56x256", "nlc_197x384"):
        assert name in cases
    assert any("fractional" in c for c in cases) and any("rot90" in c for c in cases)
    for row in rows:
        assert ROW_KEYS <= set(row), row["case"]
        assert TIMING_KEYS <= set(row["baseline_time"])
        assert row["baseline_time"]["repeats"] == 1
        assert row["baseline_time"]["median"] > 0
        if row["compiled"]:
            assert TIMING_KEYS <= set(row["compiled_time"])
            assert row["speedup"] > 0
            assert "compiled_vs_baseline" in row["check"]
        else:
            assert "compiled_time" not in row


def test_quick_run_checks_passed(quick_result):
    assert quick_result["all_checks_passed"] is True
    for row in quick_result["rows"]:
        check = row["check"]
        assert check["passed"] is True, (row["case"], check)
        assert check["baseline_vs_reference"]["passed"] is True
    stats = [r for r in quick_result["rows"] if r["op"] == "equivariance_stats"]
    assert all(r["check"]["baseline_vs_reference"]["max_err"]["count"] == 0 for r in stats)
    # The textbook torch path of transform_images is checked against the reference and timed.
    images = [r for r in quick_result["rows"] if r["op"] == "transform_images"]
    assert images
    # On the CPU each case is timed twice: outputs fresh from the kernel, then reused pages.
    for case in {r["case"] for r in images}:
        assert [r["heap"] for r in images if r["case"] == case] == ["fresh", "reused"]
    for row in images:
        assert row["check"]["torch_path_vs_reference"]["passed"] is True
        if row["heap"] == "reused" and row["heap_pinned"]:  # warmed up until fault-free
            assert set(row["heap_settle"]["faults"]) >= {"baseline", "torch_path"}
        assert row["torch_path_time"]["median"] > 0
        if row["compiled"]:
            assert row["speedup_vs_torch_path"] > 0


def test_cpu_heap_pins_where_large_buffers_come_from(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    if common._glibc() is None:
        pytest.skip("needs glibc (mallopt, malloc_trim)")

    def faults_writing(nbytes: int) -> int:
        # Page faults of allocating a buffer, writing it once and freeing it.
        before = common.minor_faults()
        torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        return common.minor_faults() - before

    size = 8 << 20  # 2048 pages of 4 KiB
    with common.cpu_heap("fresh") as pinned:
        assert pinned is True
        for _ in range(2):  # every call pays for its pages, whatever the heap held before
            common.release_free_memory()
            assert faults_writing(size) >= 1024
    with common.cpu_heap("reused") as pinned:
        assert pinned is True
        # At first malloc may place the buffer in free chunks or new heap it has not touched
        # yet, faulting each in once; as nothing goes back to the kernel, the calls then settle
        # on pages they keep: three calls in a row without faults, where fresh pages fault on
        # every call.
        in_a_row = 0
        for _ in range(64):
            in_a_row = in_a_row + 1 if faults_writing(size) < 64 else 0
            if in_a_row == 3:
                break
        assert in_a_row == 3
        # settle_heap finds that point itself, where fresh pages never reach it
        write = {"write": lambda: torch.empty(size, dtype=torch.uint8).fill_(1)}
        settled = common.settle_heap(write, max_rounds=64)
        assert settled["settled"] is True and settled["faults"]["write"] <= common.SETTLED_FAULTS
    with common.cpu_heap("fresh"):
        # (free chunks earlier tests left would serve the buffer: given back before each call)
        write_fresh = {"write": lambda: (common.release_free_memory(), write["write"]())}
        unsettled = common.settle_heap(write_fresh, max_rounds=3)
        assert unsettled == {"rounds": 3, "settled": False, "faults": {"write": unsettled[
            "faults"]["write"]}}
        assert unsettled["faults"]["write"] >= 1024
    with common.cpu_heap(None) as pinned:
        assert pinned is False
    with pytest.raises(ValueError, match=r"one of \('fresh', 'reused'\) or None, but got 'warm'"):
        with common.cpu_heap("warm"):
            pass


def test_compiled_path_with_reference_standing_in(tmp_path, monkeypatch):
    """The compiled-op branch (check, timing, speedup) runs even where no kernel is built: the
    float64 reference stands in for the kernels."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_ops

    monkeypatch.setattr(bench_ops._ext, "has_kernel", lambda op, device: True)
    for name in ("equivariance_stats", "transform_images"):
        original = getattr(bench_ops.ops, name)
        monkeypatch.setattr(bench_ops.ops, name, functools.partial(original, force_reference=True))
    threads = torch.get_num_threads()
    try:
        status = bench_ops.main(
            ["--quick", "--threads", "1", "--out", str(tmp_path), "--cases", "nlc,rot90,shift_"]
        )
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    payload = json.loads((tmp_path / "ops.json").read_text())
    # nlc and rot90 of equivariance_stats, shift_ of transform_images under both heaps
    assert len(payload["rows"]) == 4
    for row in payload["rows"]:
        assert row["compiled"] is True
        assert row["check"]["compiled_vs_baseline"]["passed"] is True
        assert row["speedup"] > 0


def test_timing_and_readme_table(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    calls = []
    timing = common.time_function(lambda: calls.append(1), warmup=2, repeats=3)
    assert len(calls) == 5
    assert timing["repeats"] == 3 and len(timing["times"]) == 3
    assert timing["min"] <= timing["median"] and timing["iqr"] >= 0

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{common.TABLE_START}\nold\n{common.TABLE_END}\nafter\n")
    results = tmp_path / "results"
    payload = {
        "meta": {"device_type": "cpu", "device_name": "test cpu", "git_commit": "abc"},
        "rows": [
            {
                "op": "equivariance_stats",
                "case": "c1",
                "dtype": "float32",
                "batch": 2,
                "compiled": False,
                "check": {"passed": True},
                "baseline_time": {"median": 0.5},
                "gbs": 1.0,
            }
        ],
    }
    common.write_result(results / "cpu", "ops", payload)
    assert common.update_readme_table(readme, results) is True
    text = readme.read_text()
    assert "old" not in text and "| equivariance_stats | c1 |" in text and text.endswith("after\n")
    assert "cpu/ops.json" in text
    assert common.update_readme_table(readme, results) is False  # idempotent
    # Variants timed to choose between them stay out of the table.
    variant = dict(payload, rows=[dict(payload["rows"][0], case="variant")])
    common.write_result(results / "cpu" / "experiments", "ops-variant", variant)
    assert [name for name, _ in common.load_results(results)] == ["cpu/ops.json"]
    assert common.update_readme_table(readme, results) is False
    assert "| variant |" not in readme.read_text()
    # A transform_images row timed under a pinned CPU heap names the heap.
    heaped = dict(payload["rows"][0], op="transform_images", case="t1", heap="reused")
    table = common.render_table([("cpu/ops.json", dict(payload, rows=[heaped]))])
    assert "| transform_images | t1 (reused heap) |" in table
