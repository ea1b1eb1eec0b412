"""The command line: measure on the embedded samples, info, and clear errors."""

import json

import pandas as pd
import pytest

from equifast import _ext
from equifast.cli import main


def test_measure_samples_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["measure", "--model", "resnet18", "--samples", "--limit", "3", "--group",
                 "translate:8", "--layers", "layer1", "layer3", "--bootstrap", "50", "--quiet",
                 "--input-size", "64", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "random init" in printed or "pretrained weights" in printed
    assert "layer1" in printed and "layer3" in printed and "eq corr" in printed
    frame = pd.read_parquet(out / "result.parquet")
    assert set(frame.layer) == {"layer1", "layer3"}
    assert (out / "depth.png").stat().st_size > 1000
    sidecar = json.loads((out / "result.parquet.json").read_text())
    assert sidecar["config"]["input_size"] == [64, 64]
    assert sidecar["config"]["images"] == 3


def test_info_lists_kernels(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert set(info["kernels"]) == {"transform_images", "equivariance_stats", "score_stats"}
    assert info["kernels"]["score_stats"]["cpu"] is _ext.has_kernel("score_stats", "cpu")
    assert info["kernels"]["score_stats"]["cuda"] is False  # scored with torch ops on a GPU
    assert info["torch"]


def test_bad_group_and_model_are_clear_errors(capsys):
    assert main(["measure", "--model", "resnet18", "--group", "spin:3", "--limit", "1"]) == 2
    assert "unknown kind 'spin'" in capsys.readouterr().err
    assert main(["measure", "--model", "resnet1888", "--limit", "1"]) == 2
    assert "resnet18" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "measure" in capsys.readouterr().out
