"""equifast.bench and ``equifast bench``: equifast against the naive loop on one model, the
check before the times (never asserts speed)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import equifast
from equifast import bench, naive
from equifast.cli import main


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 6, 3, padding=1)).eval()


def _sources(count: int = 5, size: int = 40, margin: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (count, 3, size + 2 * margin, size + 2 * margin),
                         generator=generator, dtype=torch.uint8)


MEASURE = dict(group="translate:2,4", batch_size=2, input_size=40, layers=["1", "3", "4"])


@pytest.fixture(scope="module")
def result() -> equifast.Result:
    return equifast.measure(_small_net(), _sources(), bootstrap=0, progress=False, **MEASURE)


def test_compare_checks_then_times_every_variant():
    comparison = bench.compare(_small_net(), _sources(), repeats=2, **MEASURE)
    check = comparison.agreement
    assert check.passed, check.describe()
    assert check.rows > 0 and check.unmatched_rows == 0 and check.nan_mismatch == 0
    assert check.max_abs_diff_corr < bench.TOLERANCE_FLOAT32
    assert comparison.images == 5
    assert set(comparison.seconds) == {"equifast", "naive", "floor"}
    assert all(len(times) == 2 and min(times) > 0 for times in comparison.seconds.values())
    assert len(comparison.timings) == 2
    assert {"setup", "probe", "batches", "frame"} <= set(comparison.timings[0])
    # the floor forwards every image of every block once: (K + 1) x the images, by batch of 2
    elements = len(comparison.config["elements"])
    assert [sum(sizes) for sizes in comparison.floor_plan] == [
        (elements + 1) * n for n in (2, 2, 1)]
    assert math.isfinite(comparison.speedup) and comparison.speedup > 0
    assert math.isfinite(comparison.steady_overhead)
    assert comparison.machine["torch_threads"] == torch.get_num_threads()
    text = comparison.format()
    for words in ("the same numbers", "equifast", "naive PyTorch loop", "bare forward (floor)",
                  "5 images", "the naive loop's images/s"):
        assert words in text
    data = comparison.as_dict()
    assert data["summary"]["speedup"] == comparison.speedup
    assert set(data["summary"]["median_seconds"]) == {"equifast", "naive", "floor"}


def test_compare_without_floor_times_the_two_loops():
    comparison = bench.compare(_small_net(), _sources(3), repeats=1, floor=False, **MEASURE)
    assert set(comparison.seconds) == {"equifast", "naive"}
    assert comparison.floor_plan == []
    assert math.isnan(comparison.overhead)
    assert "bare forward" not in comparison.format()


def _with_frame(result: equifast.Result, frame) -> equifast.Result:
    return dataclasses.replace(result, frame=frame)


def test_agreement_finds_every_kind_of_difference(result):
    same = bench.agreement(result, _with_frame(result, result.frame.copy()))
    assert same.passed and same.max_abs_diff_corr == 0 and same.rows == len(result.frame)

    frame = result.frame.copy()
    corr_rows = np.flatnonzero((frame["metric"] == "corr").to_numpy()
                               & frame["value"].notna().to_numpy())
    moved = corr_rows[len(corr_rows) // 2]
    frame.loc[frame.index[moved], "value"] += 2e-4
    check = bench.agreement(result, _with_frame(result, frame))
    assert not check.passed
    assert check.max_abs_diff_corr == pytest.approx(2e-4, rel=1e-6)
    assert check.worst_row == {key: frame.iloc[moved][key] for key in bench.KEYS}
    assert "corr differs by up to 2.0e-04" in check.describe()
    # the same gap passes a looser tolerance
    assert bench.agreement(result, _with_frame(result, frame), tolerance=1e-3).passed

    dropped = bench.agreement(result, _with_frame(result, result.frame.drop(
        result.frame.index[0])))
    assert not dropped.passed and dropped.unmatched_rows == 1
    assert "1 rows on one side only" in dropped.describe()

    frame = result.frame.copy()
    frame.loc[frame.index[corr_rows[0]], "value"] = math.nan
    nan = bench.agreement(result, _with_frame(result, frame))
    assert not nan.passed and nan.nan_mismatch == 1
    assert "1 rows NaN on one side only" in nan.describe()


@pytest.mark.parametrize("config,tolerance", [
    ({"dtype": "float64", "device": "cpu"}, bench.TOLERANCE_FLOAT64),
    ({"dtype": "float32", "device": "cpu"}, bench.TOLERANCE_FLOAT32),
    ({"dtype": "bfloat16", "device": "cpu"}, bench.TOLERANCE_GPU_OR_16_BIT),
    ({"dtype": "float32", "device": "cuda:0"}, bench.TOLERANCE_GPU_OR_16_BIT),
    ({"dtype": "bfloat16-autocast", "device": "cuda"}, bench.TOLERANCE_GPU_OR_16_BIT),
])
def test_default_tolerance_by_dtype_and_device(config, tolerance):
    assert bench.default_tolerance(config) == tolerance


def test_compare_times_nothing_when_the_numbers_differ(monkeypatch, result):
    measure = naive.measure

    def shifted(*args, **kwargs):
        out = measure(*args, **kwargs)
        frame = out.frame.copy()
        frame["value"] = frame["value"] + 0.01
        return _with_frame(out, frame)

    monkeypatch.setattr(naive, "measure", shifted)
    comparison = bench.compare(_small_net(), _sources(), repeats=3, **MEASURE)
    assert not comparison.agreement.passed
    assert comparison.seconds == {} and comparison.timings == []
    text = comparison.format()
    assert "DIFFERENT numbers" in text and "nothing timed" in text and "nan" not in text


@pytest.mark.parametrize("kwargs,message", [
    ({"repeats": 0}, "repeats: expected an integer >= 1"),
    ({"baseline": "init"}, "baseline: equifast.naive.measure has no such argument"),
    ({"loader": "folder", "distributed": False}, "distributed, loader: equifast.naive"),
])
def test_compare_refuses_what_it_cannot_compare(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench.compare(_small_net(), _sources(), **{**MEASURE, **kwargs})


def test_floor_plan_follows_the_engines_forwards():
    # 7 elements, forwards of at most 3 elements and 4 blocks: 8 blocks in 3 forwards, spread
    # evenly (3 + 3 + 2, the identity block with the first), 10 images in batches of 4, 4, 2
    config = {"images": 10, "batch_size": 4, "elements": ["e"] * 7, "elements_per_chunk": 3,
              "blocks_per_forward": 4}
    plan = [[12, 12, 8], [12, 12, 8], [6, 6, 4]]
    assert bench.floor_plan(config) == plan
    # channel_map="linear" reads the data once more per fit pass
    assert bench.floor_plan({**config, "fit_passes": 1}) == plan * 2


def test_bench_command_prints_the_check_and_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--model", "resnet18", "--samples", "--limit", "2", "--batch-size",
                 "2", "--input-size", "64", "--group", "translate:8", "--repeats", "1",
                 "--quiet", "--memory", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "check: the same numbers" in printed and "naive PyTorch loop" in printed
    data = json.loads(out.read_text())  # no NaN: JSON has none
    assert data["model"] == "resnet18" and data["agreement"]["passed"] is True
    assert {name: len(times) for name, times in data["seconds"].items()} == {
        "equifast": 1, "naive": 1, "floor": 1}
    assert data["images"] == 2 and data["config"]["input_size"] == [64, 64]
    assert data["summary"]["speedup"] > 0
    assert set(data["peak_rss_mib"]) == {"equifast", "naive"} and not data["memory_errors"]
    assert printed.count("MiB resident") == 2


def test_bench_command_fails_when_the_numbers_differ(monkeypatch, capsys):
    measure = naive.measure

    def dropped_row(*args, **kwargs):
        out = measure(*args, **kwargs)
        return _with_frame(out, out.frame.iloc[1:])

    monkeypatch.setattr(naive, "measure", dropped_row)
    code = main(["bench", "--model", "resnet18", "--samples", "--limit", "2", "--batch-size",
                 "2", "--input-size", "64", "--group", "translate:8", "--quiet"])
    captured = capsys.readouterr()
    assert code == 1
    assert "DIFFERENT numbers: 1 rows on one side only" in captured.out
    assert "equifast and the naive loop gave different numbers" in captured.err


@pytest.mark.parametrize("argv,message", [
    (["--json", "out.txt"], "--json out.txt: expected a .json file name"),
    (["--loader", "dali"], "unrecognized arguments: --loader dali"),
    (["--baseline", "init"], "unrecognized arguments: --baseline init"),
    (["--repeats", "0"], "argument --repeats: expected an integer >= 1, found 0"),
    (["--workers", "2"], "--workers 2: expected --data DIR, an image folder for the loader"),
])
def test_bench_command_refuses_before_any_work(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(bench, "compare", lambda *a, **k: pytest.fail("ran"))
    try:
        code = main(["bench", "--model", "resnet18", *argv])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_bench_command_on_a_folder_names_its_unreadable_files(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        pixels = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"photo{index}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    code = main(["bench", "--model", "resnet18", "--data", str(folder), "--batch-size", "2",
                 "--input-size", "64", "--group", "translate:8", "--repeats", "1", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "note: every image of" in printed and "2 times through each loop" in printed
    assert "check: the same numbers" in printed and "2 images" in printed
    assert "skipped 1 unreadable files (in both loops):" in printed
    assert "broken.jpg" in printed


@pytest.mark.cuda
def test_compare_on_a_gpu_reports_peak_memory():
    # The device defaults of both loops (bfloat16 autocast, channels-last) and the floor run as
    # the engine ran; the check's tolerance is the GPU's, and each variant's peak is recorded.
    comparison = bench.compare(_small_net(), _sources(), repeats=1, device="cuda", **MEASURE)
    assert comparison.agreement.passed, comparison.agreement.describe()
    assert comparison.agreement.tolerance_corr == bench.TOLERANCE_GPU_OR_16_BIT
    assert comparison.config["dtype"] == "bfloat16-autocast"
    assert set(comparison.peak_cuda_mib) == {"equifast", "naive", "floor"}
    assert all(peak >= 0 for peak in comparison.peak_cuda_mib.values())
    assert "peak" in comparison.format()
    assert torch.cuda.get_device_name() == comparison.machine["device_name"]


def test_peak_memory_of_each_loop_in_a_fresh_process():
    comparison = bench.compare(_small_net(), _sources(), repeats=1, floor=False, memory=True,
                               **MEASURE)
    assert comparison.memory_errors == {}
    assert set(comparison.peak_rss_mib) == {"equifast", "naive"}
    # each call holds at least its stacked images' features, far above 0 and below a GiB
    assert all(0 < peak < 1024 for peak in comparison.peak_rss_mib.values())
    assert comparison.format().count("MiB resident") == 2


def test_peak_memory_says_why_a_model_cannot_be_sent():
    class Local(nn.Module):  # a class defined in a function: pickle cannot name it
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    found = bench.peak_memory(Local().eval(), _sources(2), **{**MEASURE, "layers": None})
    assert set(found) == {"equifast", "naive"}
    for out in found.values():
        assert out["error"].startswith("the model or data cannot be sent to a fresh process")
    with pytest.raises(ValueError, match="peak_memory: the resident size of a CPU run; found "
                                         "device cuda"):
        bench.peak_memory(_small_net(), _sources(2), device="cuda", **MEASURE)


def test_compare_refuses_data_it_can_read_only_once():
    batches = (batch for batch in _sources().split(2))
    with pytest.raises(ValueError, match="needs data that can be read again: .* found a one-shot "
                                         "iterator \\(generator\\)"):
        bench.compare(_small_net(), batches, **MEASURE)
    # a list of the same batches can be read again
    assert bench.compare(_small_net(), list(_sources().split(2)), repeats=1, floor=False,
                         **MEASURE).agreement.passed
