"""The end-to-end benchmark runs and its agreement check passes (never asserts speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "bench_end_to_end.py"


def test_bench_end_to_end_quick(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--models", "resnet18", "--repeats", "1",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "end_to_end.json").read_text())
    assert payload["benchmark"] == "end_to_end"
    assert payload["quick"] is True
    assert {"git_commit", "torch_version", "device_name", "date"} <= set(payload["meta"])
    rows = payload["rows"]
    # the timed rounds ran under the pinned heap wherever glibc can pin it
    sys.path.insert(0, str(REPO / "benchmarks"))
    import common

    pinned = common._glibc() is not None
    assert payload["settings"]["heap"] == "reused"
    assert {r["heap"] for r in rows} == {"reused" if pinned else "default"}
    for row in rows if pinned else []:
        assert row["heap_settle"]["rounds"] >= 1
        assert set(row["heap_settle"]["faults"]) == set(row["floor_times"])
    assert {(r["group"], r["layers"]) for r in rows} == {
        ("translation", None), ("translation", "leaves"), ("rotation", None)
    }
    for row in rows:
        assert row["model"] == "resnet18"
        check = row["check"]
        assert check["passed"] is True
        assert check["unmatched_rows"] == 0 and check["rows"] > 0
        assert check["max_abs_diff_corr"] < 1e-3
        for key in ("equifast_images_per_s", "naive_images_per_s", "speedup", "floor_time",
                    "overhead_pct", "overhead_steady_pct", "fixed_seconds", "batches_seconds",
                    "elements_per_chunk", "blocks_per_forward"):
            assert isinstance(row[key], (int, float)), key
        assert set(row["equifast_phases"]) == {"setup", "probe", "batches", "frame"}
        assert row["equifast_time"]["repeats"] == 1
        assert row["floor_chunking"] in row["floor_times"]
        assert set(row["targets"]) == {"overhead_ok", "overhead_total_ok", "speedup_ok",
                                       "memory_ok"}
        assert "equifast_peak_mib" in row and "naive_peak_mib" in row
        if sys.platform == "linux":  # read from /proc in a fresh process per loop: a number
            assert not any("error" in found for found in row["memory"].values()), row["memory"]
            assert row["equifast_peak_mib"] > 0 and row["naive_peak_mib"] > 0
    assert "| resnet18 |" in proc.stdout
