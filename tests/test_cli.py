"""The command line: measure on the embedded samples, info, and clear errors."""

import argparse
import json
from pathlib import Path

import pandas as pd
import pytest
import torch

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


def test_measure_takes_the_dtype_and_memory_format(tmp_path, capsys):
    out = tmp_path / "run.parquet"
    common = ["measure", "--model", "resnet10t", "--samples", "--limit", "2", "--group",
              "translate:8", "--layers", "layer1", "--bootstrap", "0", "--quiet",
              "--input-size", "48", "--device", "cpu", "--no-plot", "--out", str(out)]
    assert main(common + ["--dtype", "float64", "--channels-last"]) == 0, capsys.readouterr().err
    config = json.loads(out.with_name("run.parquet.json").read_text())["config"]
    assert config["dtype"] == "float64" and config["channels_last"] is True
    wide = pd.read_parquet(out)
    assert main(common + ["--no-channels-last"]) == 0, capsys.readouterr().err
    config = json.loads(out.with_name("run.parquet.json").read_text())["config"]
    assert config["dtype"] == "float32" and config["channels_last"] is False
    # the same scores, to the float32 rounding of the narrower run
    narrow = pd.read_parquet(out)
    assert (wide.value - narrow.value).abs().max() < 1e-5
    with pytest.raises(SystemExit):
        main(common + ["--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_survey_passes_the_dtype_and_memory_format(monkeypatch):
    import types

    import equifast.survey

    seen = {}

    def fake_survey(*args, **kwargs):
        seen.update(kwargs)
        return types.SimpleNamespace(failed=[], failures_left=0)

    monkeypatch.setattr(equifast.survey, "run_survey", fake_survey)
    assert main(["survey", "--models", "resnet10t", "--dtype", "bfloat16", "--channels-last",
                 "--quiet"]) == 0
    assert seen["dtype"] is torch.bfloat16 and seen["channels_last"] is True
    seen.clear()
    assert main(["survey", "--models", "resnet10t", "--quiet"]) == 0
    assert "dtype" not in seen and "channels_last" not in seen  # measure's defaults


def test_measure_selects_layers_by_class_name(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["measure", "--model", "resnet10t", "--samples", "--limit", "2", "--group",
                 "translate:8", "--layers", "BasicBlock", "--bootstrap", "0", "--quiet",
                 "--input-size", "48", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    frame = pd.read_parquet(out / "result.parquet")
    assert sorted(set(frame.layer)) == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]


def test_measure_with_a_disc_mask(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["measure", "--model", "resnet10t", "--samples", "--limit", "2", "--group",
                 "rotate:30,90", "--mask", "disc", "--bootstrap", "0", "--quiet",
                 "--input-size", "48", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "disc mask" in capsys.readouterr().out
    sidecar = json.loads((out / "result.parquet.json").read_text())
    assert sidecar["config"]["mask"] == "disc"
    # the circular protocol wraps the image around: it has no border for a disc to mask
    assert main(["measure", "--model", "resnet10t", "--group", "translate[circular]:8",
                 "--mask", "disc", "--limit", "1", "--quiet", "--out", str(out)]) == 2
    assert "circular elements ['translate(0,8)', 'translate(8,0)']" in capsys.readouterr().err


def test_lie_writes_the_frame_and_its_config(tmp_path, capsys):
    out = tmp_path / "lie.parquet"
    code = main(["lie", "--model", "resnet10t", "--samples", "--limit", "2", "--input-size", "48",
                 "--generators", "rotate", "scale", "--bootstrap", "0", "--quiet", "--out",
                 str(out), "--baseline", "init"])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "lee_rel" in printed and "layer1" in printed and "rotate" in printed
    assert "learned (lee_rel of the model minus that of its initialized copy)" in printed
    frame = pd.read_parquet(out)
    assert set(frame.generator) == {"rotate", "scale"} and set(frame.metric) == {"lee", "lee_rel"}
    config = json.loads((tmp_path / "lie.parquet.json").read_text())
    assert config["generators"] == ["rotate", "scale"] and config["images"] == 2
    assert (tmp_path / "lie.png").stat().st_size > 1000
    assert main(["lie", "--model", "resnet10t", "--out", str(tmp_path / "lie.png")]) == 2
    assert "expected a .parquet or .csv file name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["lie", "--model", "resnet10t", "--generators", "shear"])
    assert "invalid choice: 'shear'" in capsys.readouterr().err


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
    # timm's hub scheme is not a registry name: say so and name the timm model, not "no such
    # architecture"
    assert main(["measure", "--model", "hf-hub:timm/resnet18.a1_in1k", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "hf-hub: scheme is not supported" in err and "'resnet18.a1_in1k'" in err


@pytest.mark.parametrize("model,message", [
    ("eqtest_nan", "features are NaN or infinite at 2 layer(s), first 'conv2'"),
    ("eqtest_nan_dark", "scores from 3 of 4 images (the other 1 have NaN or infinite features"),
])
def test_measure_says_when_features_are_not_finite(model, message, tmp_path, monkeypatch,
                                                   capsys):
    # a survey fails the first model and records a warning for the second; measure wrote only
    # '-' or n=3 in the table (and, for the first, blamed positions or constant features)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    code = main(["measure", "--import", "survey_models", "--model", model, "--samples",
                 "--limit", "4", "--input-size", "32", "--group", "translate:4", "--bootstrap",
                 "0", "--quiet", "--no-plot", "--out", str(tmp_path / "r.csv")])
    assert code == 0
    assert message in capsys.readouterr().err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "measure" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["measure", "bench", "survey", "report", "export"])
def test_every_option_is_explained_with_its_default(command, capsys):
    # --help of each subcommand: no option without a help text, and every default that is a
    # value (not None, not a flag's False) is shown (--batch-size is 16 for measure, 32 for survey)
    from equifast.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    actions = [a for a in sub.choices[command]._actions
               if a.option_strings and a.dest != "help"]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for action in actions:
        assert action.help, f"{command} {action.option_strings[-1]} has no help text"
        if action.default not in (None, False, []):
            assert f"default: {action.default}" in text or f"default {action.default}" in text, (
                f"{command} {action.option_strings[-1]}: default {action.default!r} not shown")


@pytest.mark.parametrize("argv,message", [
    (["--limit", "0"], "argument --limit: expected an integer >= 1, found 0"),
    (["--bootstrap", "-5"], "argument --bootstrap: expected an integer >= 0, found -5"),
    (["--bootstrap", "1"], "argument --bootstrap: expected 0 (no intervals) or at least 2"),
    (["--batch-size", "two"], "argument --batch-size: expected an integer, found 'two'"),
    (["--align", "nan"], "argument --align: align: expected 'auto', 'center', 'corner', a finite"),
    # --input-size is N or HxW: '3x' was read as 3x3, '3x4x5' and '3,' as something else
    *[(["--input-size", text], "argument --input-size: expected N (a square input) or HxW, "
       f"positive integers such as 224 or 192x256; found {text!r}")
      for text in ("3x", "x3", "3x4x5", "3,", "0", "3x0", "-3", "3.5", "axb", "")],
])
def test_bad_numbers_are_refused_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["measure", "--model", "resnet18", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_input_size_is_n_or_h_x_w():
    from equifast.cli import build_parser

    for command in ("measure", "survey"):
        for text, size in (("64", (64, 64)), ("64x96", (64, 96)), ("64X96", (64, 96)),
                           ("64,96", (64, 96))):
            args = build_parser().parse_args([command, "--model" if command == "measure"
                                              else "--models", "resnet18", "--input-size", text])
            assert args.input_size == size, (command, text)


def test_a_loader_without_data_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """--loader dali (or folder) reads a --data folder; with the embedded photographs (--samples,
    or no --data) it was ignored silently."""
    import equifast.models
    import equifast.survey
    from equifast import cli

    def never(*args, **kwargs):
        raise AssertionError("worked although --loader could not apply")

    monkeypatch.setattr(equifast.models, "load_model_sized", never)
    monkeypatch.setattr(equifast.survey, "run_survey", never)
    for command, model in (("measure", "--model"), ("survey", "--models")):
        for loader, source, found in (
                ("dali", ["--samples"], "found --samples:"),
                ("folder", [], "found no --data (the embedded photographs, --samples, are the "
                               "default):")):
            argv = [command, model, "resnet10t", "--loader", loader, *source,
                    "--out" if command == "measure" else "--store",
                    str(tmp_path / ("o" if command == "measure" else "s.sqlite"))]
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"equifast: error: --loader {loader}: expected --data DIR, an "
                                  f"image folder for the loader to read; {found}"), err
            assert "leave --loader out" in err
        # --workers, the number of the loader's processes, likewise
        argv = [command, model, "resnet10t", "--workers", "4", "--samples",
                "--out" if command == "measure" else "--store",
                str(tmp_path / ("o" if command == "measure" else "s.sqlite"))]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("equifast: error: --workers 4: expected --data DIR, an image "
                              "folder for the loader to read; found --samples:"), err
        assert "leave --workers out" in err
    assert not (tmp_path / "s.sqlite").exists()
    args = cli.build_parser().parse_args(["measure", "--model", "m", "--loader", "dali",
                                          "--data", str(tmp_path)])
    cli._check_loader(args)  # a folder: the loader applies


def test_bad_out_and_device_are_refused_before_the_measurement(tmp_path, capsys, monkeypatch):
    import equifast

    def never(*args, **kwargs):
        raise AssertionError("measured although the command could not finish")

    existing = tmp_path / "afile"
    existing.write_text("x")
    monkeypatch.setattr(equifast, "measure", never)
    for out, message in [(existing, "is an existing file"), (tmp_path / "r.json", "a .json file")]:
        assert main(["measure", "--model", "resnet18", "--limit", "1", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["measure", "--model", "resnet10t", "--limit", "1", "--device", "bogus",
                 "--out", str(tmp_path / "o")]) == 2
    assert "device: expected 'cpu', 'cuda' or 'cuda:N', found 'bogus'" in capsys.readouterr().err


def test_upper_case_csv_and_folder_results_load(tmp_path):
    import equifast

    out = tmp_path / "R.CSV"
    assert main(["measure", "--model", "resnet10t", "--limit", "2", "--group", "translate:8",
                 "--input-size", "64", "--bootstrap", "0", "--quiet", "--no-plot",
                 "--out", str(out)]) == 0
    assert out.is_file()
    assert equifast.Result.load(out).config["images"] == 2
    folder = tmp_path / "run"
    assert main(["measure", "--model", "resnet10t", "--limit", "2", "--group", "translate:8",
                 "--input-size", "64", "--bootstrap", "0", "--quiet", "--no-plot",
                 "--out", str(folder)]) == 0
    assert equifast.Result.load(folder).config["images"] == 2


def test_interrupt_is_one_line(monkeypatch, capsys):
    from equifast import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run_survey", interrupted)
    assert main(["survey", "--models", "resnet10t", "--store", "s.sqlite"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "equifast: interrupted (the store keeps every finished model: run the same command "
        "to resume)"]


def test_the_table_shows_the_first_metric_asked_for(capsys):
    assert main(["measure", "--model", "resnet10t", "--limit", "2", "--group", "translate:8",
                 "--input-size", "64", "--bootstrap", "0", "--quiet", "--no-plot",
                 "--metrics", "cosine", "psnr", "--out", "/dev/null/unused.csv"]) == 2
    assert "cannot create the folder '/dev/null'" in capsys.readouterr().err  # before measuring
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        assert main(["measure", "--model", "resnet10t", "--limit", "2", "--group", "translate:8",
                     "--input-size", "64", "--bootstrap", "0", "--quiet", "--no-plot",
                     "--metrics", "cosine", "psnr", "--out", folder + "/r.parquet"]) == 0
    printed = capsys.readouterr().out
    assert "eq cosine" in printed and "eq corr" not in printed


def test_input_size_builds_a_fixed_size_model_and_its_copy_for_it(tmp_path, capsys):
    import equifast

    # a timm ViT fixes its input size when built: --input-size must reach img_size, for the model
    # and for the initialized copy built by name (whose position embedding must match)
    out = tmp_path / "vit.csv"
    code = main(["measure", "--model", "vit_tiny_patch16_224", "--limit", "1", "--group",
                 "translate:16", "--layers", "blocks.0", "--input-size", "64", "--bootstrap",
                 "0", "--baseline", "init", "--quiet", "--no-plot", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    result = equifast.Result.load(out)
    assert result.config["input_size"] == [64, 64]
    assert result.config["baseline"]["how"] == ("'vit_tiny_patch16_224' built again with "
                                                "pretrained=False")
    assert result.frame["init"].notna().any()


def test_unusable_output_paths_are_one_line_errors(tmp_path, capsys, monkeypatch):
    import equifast

    def never(*args, **kwargs):
        raise AssertionError("measured although the command could not finish")

    monkeypatch.chdir(tmp_path)  # short relative paths: the messages cut paths past 80 characters
    monkeypatch.setattr(equifast, "measure", never)
    Path("afile").write_text("x")
    long = "a" * 300  # past the file system's 255-byte limit on a name: ENAMETOOLONG
    cases = [
        (["measure", "--model", "resnet10t", "--out", "afile/sub/r.csv"],
         "--out afile/sub/r.csv: cannot create the folder 'afile/sub': 'afile' is an existing "
         "file; expected a folder to hold r.csv"),
        (["measure", "--model", "resnet10t", "--out", "afile/sub"],
         "'afile' is an existing file; expected a .parquet or .csv file name, or a folder"),
        (["measure", "--model", "resnet10t", "--out", f"{long}.csv"],
         f"--out {'a' * 40}...{'a' * 16}.csv (304 characters): unusable path: File name too long "
         "(a name in the path is longer than the file system allows, 255 bytes on most); expected"
         " a .parquet or .csv file name"),
        (["measure", "--model", "resnet10t", "--out", long], "File name too long"),
        (["export", "afile", "-o", "afile"],
         "-o/--out afile: is an existing file; expected a folder (for <table>.parquet files)"),
        (["export", "afile", "-o", long], "(300 characters): unusable path: File name too long"),
        (["report", "afile", "-o", "afile"],
         "-o/--out afile: is an existing file; expected a folder (for index.html and figures/)"),
        (["survey", "--models", "resnet10t", "--quiet", "--store", f"{long}.sqlite"],
         "(307 characters): File name too long"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("equifast: error: "), err
    monkeypatch.undo()  # an unusable --data path fails inside measure, before any forward
    assert main(["measure", "--model", "resnet10t", "--data", str(tmp_path / long), "--out",
                 str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("equifast: error: ") and len(err.strip().splitlines()) == 1, err
    assert "characters): File name too long" in err


def test_a_model_that_fails_on_its_input_is_a_one_line_error(capsys, monkeypatch, tmp_path):
    """A RuntimeError of the model (torchvision's ViT, built for 224 px, on a 64 x 96 input:
    its side must be square) is printed as one line; EQUIFAST_TRACEBACK=1 raises it."""
    argv = ["measure", "--model", "tv:vit_b_16", "--input-size", "64,96", "--limit", "2",
            "--layers", "encoder.layers.encoder_layer_0", "--quiet", "--out", str(tmp_path / "out")]
    monkeypatch.delenv("EQUIFAST_TRACEBACK", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("equifast: error: the model failed on its probe")
    monkeypatch.setenv("EQUIFAST_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="failed on its probe input"):
        main(argv)


def test_a_bad_group_or_metric_fails_before_the_model_is_built(capsys, monkeypatch, tmp_path):
    import equifast.models

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the arguments were checked")

    monkeypatch.setattr(equifast.models, "load_model_sized", never)
    out = str(tmp_path / "out")
    assert main(["measure", "--model", "resnet18", "--group", "rotate:abc", "--out", out]) == 2
    assert "group spec 'rotate:abc': expected a number" in capsys.readouterr().err
    assert main(["measure", "--model", "resnet18", "--metrics", "bogus", "--out", out]) == 2
    assert "unknown metrics ['bogus']" in capsys.readouterr().err


def test_measure_imports_plugin_models(capsys, tmp_path, monkeypatch):
    """--import registers models with timm before the model is built, as on survey."""
    plugin = tmp_path / "equifast_plugin_for_test.py"
    plugin.write_text(
        "import timm\n"
        "from torch import nn\n"
        "from timm.models import register_model\n\n"
        "@register_model\n"
        "def plugin_tiny_for_test(pretrained=False, **kwargs):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["measure", "--model", "plugin_tiny_for_test", "--import",
                 "equifast_plugin_for_test", "--limit", "2", "--input-size", "32",
                 "--group", "translate:4", "--bootstrap", "0", "--quiet", "--no-plot",
                 "--out", str(tmp_path / "out")])
    assert code == 0
    assert "2 images" in capsys.readouterr().out
