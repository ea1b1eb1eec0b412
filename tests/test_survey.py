"""Surveys: the SQLite store, resuming, failures (raise, NaN, out of memory), SIGKILL, Ray, CLI."""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import equifast
from equifast.cli import main
from equifast.result import BASELINE_COLUMNS, FRAME_COLUMNS
from equifast.survey import (
    SCHEMA_VERSION,
    SurveyStore,
    export_store,
    family_of,
    open_store,
    resolve_models,
    run_survey,
)

sys.path.insert(0, str(Path(__file__).parent))
import survey_models  # noqa: E402,F401 - registers the eqtest_* models with timm

TESTS = Path(__file__).parent
# Small and quick: 4 sample photos at 32x32, two shifts, few bootstrap resamples.
SETTINGS = dict(group="translate:4,8", limit=4, input_size=(32, 32), bootstrap=20,
                progress=False, log=None)
REAL_MODELS = ["resnet10t", "convnext_atto", "mobilenetv3_small_050"]


def _survey(models, store, **overrides):
    return run_survey(models, "samples", store, **{**SETTINGS, **overrides})


def _rows(store_path) -> pd.DataFrame:
    """Scores of a store, keyed and sorted, without the run ids (which differ between stores)."""
    with open_store(store_path) as store:
        frame = store.scores.drop(columns=["run_id"])
    return frame.sort_values(["model", "layer", "element", "comparison", "metric"]).reset_index(
        drop=True)


def test_store_round_trip_matches_measure(tmp_path):
    store_path = tmp_path / "s.sqlite"
    summary = _survey(["eqtest_tiny"], store_path)
    assert summary.done == ["eqtest_tiny"] and not summary.failed and not summary.skipped
    torch.manual_seed(0)  # the survey's seed: the same random init
    direct = equifast.measure(
        survey_models.TinyNet(), "samples", group="translate:4,8", limit=4, input_size=(32, 32),
        bootstrap=20, progress=False, batch_size=32, seed=0, model_name="eqtest_tiny",
    )
    with open_store(store_path) as store:
        assert list(store.scores.columns[:2]) == ["run_id", "group_spec"]
        assert set(FRAME_COLUMNS) <= set(store.scores.columns)
        result = store.result("eqtest_tiny")
        runs = store.runs
        env = store.environments
    # Same weights (seeded random init), same numbers as measuring the module directly.
    merged = result.frame.merge(direct.frame, on=["layer", "element", "comparison", "metric"],
                                suffixes=("", "_direct"))
    assert len(merged) == len(direct.frame) == len(result.frame) > 0
    np.testing.assert_allclose(merged["value"], merged["value_direct"], rtol=1e-9, atol=1e-12)
    assert (merged["n"] == merged["n_direct"]).all()
    assert runs.loc[0, "status"] == "done" and runs.loc[0, "images"] == 4
    assert runs.loc[0, "family"] == "survey_models"
    assert runs.loc[0, "images_per_second"] > 0
    assert env.loc[0, "torch"] and env.loc[0, "device"] == "cpu"
    assert list(result.model_frame.metric) == ["consistency"]
    assert equifast.open_store is open_store and equifast.run_survey is run_survey


def test_rerun_skips_finished_and_writes_no_duplicate(tmp_path):
    store_path = tmp_path / "s.sqlite"
    _survey(["eqtest_tiny"], store_path)
    before = _rows(store_path)
    again = _survey(["eqtest_tiny", "resnet10t"], store_path)
    assert again.skipped == ["eqtest_tiny"] and again.done == ["resnet10t"]
    with open_store(store_path) as store:
        assert store.runs.groupby("model").size().to_dict() == {"eqtest_tiny": 1, "resnet10t": 1}
    pd.testing.assert_frame_equal(_rows(store_path).query("model == 'eqtest_tiny'")
                                  .reset_index(drop=True), before)
    # Another configuration of the same model is another run, not a duplicate.
    other = _survey(["eqtest_tiny"], store_path, group="rotate:90")
    assert other.done == ["eqtest_tiny"]
    with open_store(store_path) as store:
        assert sorted(store.runs.group_spec) == ["rotate:90", "translate:4,8", "translate:4,8"]
        rotated = store.result("eqtest_tiny", "rotate:90")
        assert rotated.config["elements"] == equifast.parse_group("rotate:90").names


def test_a_store_resumed_on_another_kind_of_device_says_the_precisions_mix(tmp_path):
    """Left to the device, a model runs in float32 on the CPU and under bfloat16 autocast on
    CUDA, and the device is not part of the configuration: resuming a GPU survey on a CPU (or
    back) mixes the two in one store, which is said once. Resuming on the same kind, or with a
    dtype given, says nothing."""
    import sqlite3
    import warnings

    store_path = tmp_path / "s.sqlite"
    _survey(["eqtest_tiny"], store_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _survey(["eqtest_tiny_b"], store_path)  # the same kind of device: nothing to say
    assert not [w for w in caught if "precision differs" in str(w.message)]
    with sqlite3.connect(store_path) as connection:  # as if eqtest_tiny had run on a GPU
        connection.execute("UPDATE runs SET device = 'cuda:0' WHERE model = 'eqtest_tiny'")
    with pytest.warns(UserWarning, match=r"survey: resnet10t ran on cpu, earlier runs of this "
                                         r"configuration in .* on cuda; .*precision differs.*"
                                         r"--dtype float32") as caught:
        summary = _survey(["resnet10t", "mobilenetv3_small_050"], store_path)
    assert summary.done == ["resnet10t", "mobilenetv3_small_050"]
    assert len([w for w in caught if "precision differs" in str(w.message)]) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _survey(["eqtest_tiny"], store_path, dtype=torch.float32)  # a configuration of its own
    assert not [w for w in caught if "precision differs" in str(w.message)]


def test_result_picks_one_configuration_of_a_group(tmp_path, monkeypatch):
    """One model under rotate:90 with channel_map identity and match, align auto, center and a
    pair of offsets, and under translate:4,8 twice (another limit: one configuration). result()
    returned the latest run of the group whichever configuration was meant, silently; it still
    does (analysis code calls result(model)), with a warning that names it and lists the others,
    and config_hash=, a setting or a label picks one."""
    store_path = tmp_path / "s.sqlite"
    rotate = dict(group="rotate:90", bootstrap=0)
    for settings in ({}, {"channel_map": "match"}, {"align": "center"}, {"align": (0.5, 0.5)}):
        assert _survey(["eqtest_tiny"], store_path, **rotate, **settings).done
    assert _survey(["eqtest_tiny"], store_path, bootstrap=0).done
    assert _survey(["eqtest_tiny"], store_path, bootstrap=0, limit=2).done
    labels = ["rotate:90 (channel_map=identity, align=auto)",
              "rotate:90 (channel_map=match, align=auto)",
              "rotate:90 (channel_map=identity, align=center)",
              "rotate:90 (channel_map=identity, align=[0.5,0.5])"]
    with open_store(store_path) as store:
        hashes = store.runs.config_hash.tolist()
        # Several configurations match: the latest run, and a warning that names it and lists
        # each label with its config hash.
        with pytest.warns(UserWarning, match="4 configurations") as caught:
            latest = store.result("eqtest_tiny", "rotate:90")
        message = str(caught[0].message)
        assert f"returning the latest run, {labels[3]!r} (config_hash={hashes[3]!r})" in message
        assert latest.config["align"] == "(0.5, 0.5)"
        for label, key in zip(labels, hashes):
            assert f"{label!r}: config_hash={key!r}" in message
        assert "channel_map=" in message
        with pytest.warns(UserWarning, match="5 configurations") as caught:
            latest = store.result("eqtest_tiny")  # two groups: ambiguous too
        assert "'translate:4,8'" in str(caught[0].message)
        assert latest.config["images"] == 2 and latest.config["group"] == "translation"
        with pytest.warns(UserWarning, match="2 configurations"):
            store.result("eqtest_tiny", "rotate:90", align="auto")
        # A setting, several settings, or the config hash picks one.
        assert store.result("eqtest_tiny", "rotate:90", channel_map="match").config[
            "channel_map"] == "match"
        picked = store.result("eqtest_tiny", "rotate:90", channel_map="identity", align="auto")
        assert (picked.config["channel_map"], picked.config["align"]) == ("identity", "auto")
        assert store.result("eqtest_tiny", align="center").config["align"] == "center"
        for label, key in zip(labels, hashes):  # a label, as the error and the report write it
            assert store.result("eqtest_tiny", label).config == store.result(
                "eqtest_tiny", config_hash=key).config
        assert store.result("eqtest_tiny", align=[0.5, 0.5]).config["align"] == "(0.5, 0.5)"
        assert store.result("eqtest_tiny", align=(0.5, 0.5)).config["align"] == "(0.5, 0.5)"
        for key in hashes:
            run_id = int(store.runs.set_index("config_hash").run_id[key])
            frame = store.result("timm:eqtest_tiny", config_hash=key).frame
            expected = store.scores[store.scores.run_id == run_id]
            assert len(frame) == len(expected) > 0
            np.testing.assert_array_equal(frame.value, expected.value)
        # One configuration measured twice (another limit): its latest run, as in the report.
        assert store.result("eqtest_tiny", "translate:4,8").config["images"] == 2
        assert store.result("eqtest_tiny", config_hash=hashes[4]).config["images"] == 4
        # Nothing matches: the model's configurations are listed.
        with pytest.raises(KeyError, match="channel_map='match'.*config_hash=") as error:
            store.result("eqtest_tiny", "translate:4,8", channel_map="match")
        assert labels[1] in str(error.value)
        with pytest.raises(KeyError, match="config_hash='0123'"):
            store.result("eqtest_tiny", config_hash="0123")
        with pytest.raises(KeyError, match=r"finished models: \['eqtest_tiny'\]"):
            store.result("resnet10t")
        with pytest.raises(TypeError,
                           match="limit.*subpixel, channel_map, ridge, mask, align, pooled"):
            store.result("eqtest_tiny", "rotate:90", limit=4)
        # One run's rows are read by its id: the tables of every run are not (a loop over the
        # models of a 400-model store read them all once per model).
        whole = store.result("eqtest_tiny", config_hash=hashes[1])
        for table in ("scores", "model_scores", "skipped"):
            monkeypatch.setattr(SurveyStore, table, property(lambda self: pytest.fail("read")))
        alone = store.result("eqtest_tiny", config_hash=hashes[1])
        pd.testing.assert_frame_equal(alone.frame, whole.frame)
        pd.testing.assert_frame_equal(alone.model_frame, whole.model_frame)


def test_store_refuses_a_duplicate_inside_one_transaction(tmp_path):
    store_path = tmp_path / "s.sqlite"
    _survey(["eqtest_tiny"], store_path)
    with SurveyStore(store_path) as store:
        result = store.result("eqtest_tiny")
        key = store.runs.loc[0, "config_hash"]
        with pytest.raises(ValueError, match="already in"):
            store.add_result(result, model="eqtest_tiny", config_hash=key, family=None,
                             group_spec="translate:4,8")
        scores = len(store.scores)
    assert scores == len(result.frame)


def test_columns_of_nulls_read_as_float_nan(tmp_path):
    store_path = tmp_path / "s.sqlite"
    _survey(["eqtest_tiny"], store_path, bootstrap=0)  # no intervals, no baseline: NULL columns
    with open_store(store_path) as store:
        scores, model_scores = store.scores, store.model_scores
        frame = store.result("eqtest_tiny").frame
    empty = ["ci_low", "ci_high", *BASELINE_COLUMNS]
    assert scores[empty].isna().all().all() and model_scores.ci_low.isna().all()
    for table, columns in ((scores, ["value", *empty]), (frame, empty),
                           (model_scores, ["ci_low", "ci_high"])):
        assert (table[columns].dtypes == np.float64).all(), table[columns].dtypes
    assert (scores.ci_high - scores.ci_low).isna().all()  # arithmetic, not None - None
    failed_path = tmp_path / "failed.sqlite"
    _survey(["eqtest_raises"], failed_path)
    with open_store(failed_path) as store:
        runs = store.runs
    assert runs.images.isna().all() and runs.images.dtype == np.float64


def test_a_second_survey_on_the_same_store_skips_what_the_first_claimed(tmp_path,
                                                                        monkeypatch):
    from equifast.survey import runner

    store_path = tmp_path / "s.sqlite"
    models = ["eqtest_tiny", "eqtest_tiny_b"]
    measure = runner.measure_model
    started = []

    def measure_while_another_survey_runs(model, *args, **kwargs):
        # The first survey holds its claim on eqtest_tiny: the second one starts now (and
        # measures with the plain measure_model).
        if not started:
            started.append(model)
            started.append(_survey(models, store_path))
        return measure(model, *args, **kwargs)

    monkeypatch.setattr(runner, "measure_model", measure_while_another_survey_runs)
    first = _survey(models, store_path)
    second = started[1]
    assert first.done == ["eqtest_tiny"] and second.done == ["eqtest_tiny_b"]
    assert first.skipped == ["eqtest_tiny_b"] and second.skipped == ["eqtest_tiny"]
    assert first.elsewhere["eqtest_tiny_b"] == "done: another survey finished it"
    assert f"process {os.getpid()} on " in second.elsewhere["eqtest_tiny"]
    assert "another survey is measuring it" in str(second)
    with SurveyStore(store_path) as store:
        assert sorted(store.runs.model) == models and (store.runs.status == "done").all()
        assert not store._connection.execute("SELECT * FROM claims").fetchall()


def test_a_model_finished_by_another_survey_meanwhile_is_skipped(tmp_path, monkeypatch):
    # Another survey that did not see the claim (a claim it took for a dead survey's, or an
    # equifast before claims) writes the model between this survey's claim and its write.
    from equifast.survey import runner
    from equifast.survey.runner import survey_config
    from equifast.survey.store import config_hash

    store_path = tmp_path / "s.sqlite"
    measure = runner.measure_model

    def measure_and_let_another_survey_write_first(model, *args, **kwargs):
        outcome = measure(model, *args, **kwargs)
        if model == "eqtest_tiny":
            settings = {k: v for k, v in SETTINGS.items() if k not in ("group", "progress", "log")}
            key = config_hash(survey_config("translate:4,8", "samples",
                                            {"seed": 0, "model_kwargs": {}, **settings}))
            with SurveyStore(store_path) as other:
                other.add_result(outcome.result, model=model, config_hash=key, family="other",
                                 group_spec="translate:4,8", attempts=7)
        return outcome

    monkeypatch.setattr(runner, "measure_model", measure_and_let_another_survey_write_first)
    summary = _survey(["eqtest_tiny", "eqtest_tiny_b"], store_path)
    assert summary.done == ["eqtest_tiny_b"] and summary.skipped == ["eqtest_tiny"]
    assert "another survey finished it while this one measured it" in summary.elsewhere[
        "eqtest_tiny"]
    with open_store(store_path) as store:
        runs = store.runs.set_index("model")
    assert len(runs) == 2 and runs.attempts["eqtest_tiny"] == 7  # the other survey's rows


def test_claims_of_surveys_that_died_are_taken_over(tmp_path):
    from equifast.survey.store import CLAIM_HOURS

    store_path = tmp_path / "s.sqlite"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = pd.Timestamp.now(tz="UTC") - pd.Timedelta(hours=CLAIM_HOURS + 1)
    with SurveyStore(store_path, create=True) as store:
        with store._connection:
            store._connection.executemany("INSERT INTO claims VALUES (?, 'h', ?, ?, ?, ?)", [
                ("m_dead", "killed", socket.gethostname(), dead.pid, "2026-01-01T00:00:00+00:00"),
                ("m_alive", "running", socket.gethostname(), os.getpid(), "2026-01-01"),
                ("m_away", "elsewhere", "another-host", 1, pd.Timestamp.now(tz="UTC").isoformat()),
                ("m_old", "long gone", "another-host", 1, old.isoformat())])
        assert store.claim("m_dead", "h", "me") is None
        assert "process 1 on another-host" in store.claim("m_away", "h", "me")
        assert "another survey is measuring it" in store.claim("m_alive", "h", "me")
        assert store.claim("m_old", "h", "me") is None
        assert store.claim("m_alive", "h", "running") is None  # its own claim
        store.release("me")
        owners = store._connection.execute("SELECT owner FROM claims ORDER BY owner").fetchall()
    assert [o for (o,) in owners] == ["elsewhere", "running"]


def test_failures_are_recorded_and_the_survey_goes_on(tmp_path):
    store_path = tmp_path / "s.sqlite"
    summary = _survey(["eqtest_raises", "eqtest_nan", "eqtest_tiny", "no_such_model_xyz"],
                      store_path)
    assert summary.done == ["eqtest_tiny"]
    assert sorted(summary.failed) == ["eqtest_nan", "eqtest_raises", "no_such_model_xyz"]
    with open_store(store_path) as store:
        runs = store.runs.set_index("model")
        errors = store.errors.set_index("model")
    assert runs.loc["eqtest_raises", "status"] == "failed"
    assert "broken on purpose" in runs.loc["eqtest_raises", "error"]
    assert errors.loc["eqtest_raises", "kind"] == "RuntimeError"
    assert "Traceback" in errors.loc["eqtest_raises", "traceback"]
    assert "survey_models.py" in errors.loc["eqtest_raises", "traceback"]
    assert errors.loc["eqtest_nan", "kind"] == "non_finite"
    assert "NaN" in errors.loc["eqtest_nan", "message"]
    assert errors.loc["no_such_model_xyz", "kind"] == "UnknownModelError"
    assert errors["fatal"].all()

    # Failed pairs are skipped next time, measured again with retry_failed.
    again = _survey(["eqtest_raises"], store_path)
    assert again.skipped == ["eqtest_raises"] and not again.failed
    assert again.failed_before == ["eqtest_raises"]  # named, not counted as merely done
    assert "1 of them failed" in str(again) and "--retry-failed" in str(again)
    retried = _survey(["eqtest_raises"], store_path, retry_failed=True)
    assert retried.failed == ["eqtest_raises"]
    with open_store(store_path) as store:
        assert (store.runs.model == "eqtest_raises").sum() == 1
        assert (store.errors.model == "eqtest_raises").sum() == 2


def test_nan_features_in_some_images_are_recorded_with_the_run(tmp_path):
    # eqtest_nan_dark: NaN features after conv1 for one of the four photos; the scores of conv2
    # and head are means over the other three, and the store says so.
    store_path = tmp_path / "s.sqlite"
    summary = _survey(["eqtest_nan_dark", "eqtest_tiny"], store_path)
    assert summary.done == ["eqtest_nan_dark", "eqtest_tiny"] and not summary.failed
    with open_store(store_path) as store:
        runs = store.runs.set_index("model")
        scores = store.scores
    warning = runs.warning["eqtest_nan_dark"]
    assert warning == summary.warned["eqtest_nan_dark"]
    assert warning.startswith("2 layer(s) leave out images, first 'conv2': scores from 3 of 4 "
                              "images (the other 1 have NaN or infinite features there)")
    assert "conv2, head" in warning and list(summary.warned) == ["eqtest_nan_dark"]
    assert pd.isna(runs.warning["eqtest_tiny"])
    eq = scores.query("model == 'eqtest_nan_dark' and comparison == 'eq' and element == 'mean' "
                      "and metric == 'cosine'").set_index("layer")["n"]
    assert eq.to_dict() == {"conv1": 4, "conv2": 3, "head": 3}


def test_a_version_2_store_gets_the_warning_column(tmp_path, monkeypatch):
    store_path = tmp_path / "old.sqlite"
    _survey(["eqtest_tiny"], store_path)
    db = sqlite3.connect(store_path)
    with db:  # back to the version-2 schema
        db.execute("ALTER TABLE runs DROP COLUMN warning")
        db.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    db.close()
    real = sqlite3.connect

    def read_only(database, *args, **kwargs):  # (as in a read-only folder)
        if "immutable=1" not in str(database):
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return real(database, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(sqlite3, "connect", read_only)
        with open_store(store_path) as store:  # read as it is
            assert store.read_only and "warning" not in store._columns("runs")
            assert store.runs.warning.isna().all()
    with open_store(store_path) as store:  # upgraded
        assert store.runs.warning.isna().all()
        assert store.meta.set_index("key").value["schema_version"] == str(SCHEMA_VERSION) == "3"
    assert _survey(["eqtest_nan_dark"], store_path).warned


def test_layers_without_valid_positions_are_not_a_failure(tmp_path):
    # 45 degrees on 24x24: the 6x6 map of resnet10t's last stage keeps no valid position (its
    # scores are NaN), which is not a broken model.
    summary = _survey(["resnet10t"], tmp_path / "s.sqlite", group="rotate:45",
                      input_size=(24, 24))
    assert summary.done == ["resnet10t"] and not summary.failed
    with open_store(tmp_path / "s.sqlite") as store:
        scores = store.scores
    eq = scores[(scores.comparison == "eq") & (scores.metric == "corr")
                & (scores.element == "mean")].set_index("layer")["value"]
    assert eq.isna().any() and eq.notna().any()


def test_out_of_memory_halves_the_batch_until_it_fits(tmp_path):
    store_path = tmp_path / "s.sqlite"
    with pytest.warns(UserWarning, match="out of memory"):
        summary = _survey(["eqtest_oom_above_4"], store_path, batch_size=16, limit=8)
    assert summary.done == ["eqtest_oom_above_4"]
    with open_store(store_path) as store:
        run = store.runs.iloc[0]
        errors = store.errors
        assert store.result("eqtest_oom_above_4").config["images"] == 8
    # Batches of 16 (all 8 photos) and 8 do not fit even at one block of images per forward
    # (the engine shrinks its forwards first, down to the identity block alone): 8 images > 4;
    # a batch of 4 does.
    assert run["batch_size"] == 4 and run["attempts"] == 3
    assert list(errors.batch_size) == [16, 8] and list(errors.kind) == ["out_of_memory"] * 2
    assert not errors.fatal.any()


@pytest.mark.filterwarnings("ignore:out of memory")
def test_out_of_memory_gives_up_at_the_floor(tmp_path):
    store_path = tmp_path / "s.sqlite"
    summary = _survey(["eqtest_oom_always", "eqtest_tiny"], store_path, batch_size=8,
                      min_batch_size=2)
    assert summary.failed == ["eqtest_oom_always"] and summary.done == ["eqtest_tiny"]
    with open_store(store_path) as store:
        errors = store.errors
        run = store.runs.set_index("model").loc["eqtest_oom_always"]
    assert list(errors.batch_size) == [8, 4, 2]
    assert list(errors.fatal) == [False, False, True]
    assert "smallest batch size" in errors.message.iloc[-1]
    assert run["status"] == "failed" and run["batch_size"] == 2


def test_a_loader_for_data_that_is_not_files_fails_before_any_model(tmp_path):
    """Once, naming the data, as measure would for every model (each a failed run)."""
    store_path = tmp_path / "s.sqlite"
    with pytest.raises(ValueError, match="loader='folder': a loader reads an image folder.*the "
                                         "data is the sample photographs"):
        _survey(["eqtest_tiny"], store_path, loader="folder")
    assert not store_path.exists()


def test_resolve_models_names_wildcards_and_lists(tmp_path):
    listing = tmp_path / "models.txt"
    listing.write_text("# my survey\nresnet10t\n\nconvnext_atto  # a comment\nresnet10t\n")
    names = resolve_models(["resnet1?t", "tv:resnet1*"], model_list=listing)
    assert names[:2] == ["resnet10t", "resnet14t"]
    assert "tv:resnet18" in names and "convnext_atto" in names
    assert len(names) == len(set(names))
    pretrained = resolve_models(["resnet10t*"], pretrained_only=True)
    assert pretrained and all(n.startswith("resnet10t.") for n in pretrained)
    with pytest.raises(ValueError, match="matches no model$"):  # and nothing close
        resolve_models(["nothing_like_this_*"])
    # a misspelled wildcard names what it may have meant, timm's and torchvision's alike
    with pytest.raises(ValueError, match=r"'resnt\*' matches no model; close names: .*resnet18"):
        resolve_models(["resnt*"])
    with pytest.raises(ValueError, match=r"'tv:resnt1\*' matches no model; close names: "
                                         r".*tv:resnet18"):
        resolve_models(["tv:resnt1*"])
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        resolve_models([], model_list=tmp_path / "missing.txt")
    assert family_of("resnet50.a1_in1k") == "resnet"
    assert family_of("vit_tiny_patch16_224") == "vision_transformer"
    assert family_of("tv:resnet50") == "resnet"


def test_a_misspelled_model_fails_naming_the_close_names(tmp_path, capsys):
    """A misspelled name is a failed run whose recorded error and printed line name the close
    names (as `equifast measure` does: the same UnknownModelError): with --pretrained-only it
    was left out silently (timm lists no weights for a name it does not know), the printed line
    cut the close names at 200 characters, and a misspelled tagged name was matched whole
    (resnet101_clip for resnet1B.a1_in1k)."""
    store_path = tmp_path / "s.sqlite"
    summary = run_survey(["resnet1B", "tv:resnt18", "resnet1B.a1_in1k"], "samples", store_path,
                         **{**SETTINGS, "log": print}, pretrained_only=True)
    assert sorted(summary.failed) == ["resnet1B", "resnet1B.a1_in1k", "tv:resnt18"]
    printed = capsys.readouterr().out
    with open_store(store_path) as store:
        errors = store.runs.set_index("model").error
    for model, first in (("resnet1B", "resnet18"), ("tv:resnt18", "tv:resnet18"),
                         ("resnet1B.a1_in1k", "resnet18.a1_in1k")):
        close = re.search(r"Close names: [^ ].*?\.(?= )", errors[model]).group(0)
        assert close.startswith(f"Close names: {first}, "), errors[model]
        line = next(ln for ln in printed.splitlines() if ln.startswith(f"failed {model}: "))
        assert f"UnknownModelError: unknown model {model!r}" in line and close in line
    # a timm architecture without pretrained weights is what --pretrained-only leaves out
    with pytest.raises(ValueError, match="--pretrained-only left out eqtest_tiny, eqtest_tiny_b "
                                         r"\(timm has no pretrained weights for them\)"):
        resolve_models(["eqtest_tiny", "eqtest_tiny_b"], pretrained_only=True)
    assert resolve_models(["eqtest_tiny", "resnet1B"], pretrained_only=True) == ["resnet1B"]


def test_a_model_has_one_key_whatever_its_prefix(tmp_path):
    names = resolve_models(["timm:eqtest_tiny", "eqtest_tiny", " tv:resnet18 ",
                            "torchvision:resnet18", "resnet18", "timm:resnet1?t"])
    # torchvision's resnet18 is another model than timm's: it keeps its prefix.
    assert names == ["eqtest_tiny", "tv:resnet18", "resnet18", "resnet10t", "resnet14t"]
    assert resolve_models(["timm:resnet10t"], pretrained_only=True) == ["resnet10t"]
    assert resolve_models(["torchvision:resnet1*"]) == resolve_models(["tv:resnet1*"])
    store_path = tmp_path / "s.sqlite"
    assert _survey(["timm:eqtest_tiny"], store_path).done == ["eqtest_tiny"]
    again = _survey(["eqtest_tiny", "timm:eqtest_tiny"], store_path)
    assert again.skipped == ["eqtest_tiny"] and not again.done
    with SurveyStore(store_path) as store:
        assert store.runs.model.tolist() == ["eqtest_tiny"]
        assert store.status("timm:eqtest_tiny", store.runs.config_hash[0]) == "done"
        assert store.result("timm:eqtest_tiny").config["images"] == 4


def test_open_store_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no survey store at .*absent.sqlite"):
        open_store(tmp_path / "absent.sqlite")
    other = tmp_path / "other.sqlite"
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(ValueError, match="not an equifast survey store"):
        open_store(other)
    text = tmp_path / "text.sqlite"
    text.write_text("hello, not a database " * 100)
    with pytest.raises(ValueError, match="not an equifast survey store"):
        open_store(text)


def test_a_store_path_that_is_a_folder_or_under_a_file_says_so(tmp_path, capsys):
    # not "read-only": a folder given as the store, or a store path under an existing file
    folder = tmp_path / "results"
    folder.mkdir()
    for action in (lambda: open_store(folder), lambda: _survey(["eqtest_tiny"], folder)):
        with pytest.raises(ValueError, match="is a folder, not a survey store") as error:
            action()
        assert "read-only" not in str(error.value)
    assert main(["report", str(folder), "-o", str(tmp_path / "report")]) == 2
    assert "is a folder, not a survey store" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(PermissionError, match="notes.txt is an existing file, not a folder"):
        _survey(["eqtest_tiny"], tmp_path / "notes.txt" / "s.sqlite")


def _read_only_folder(folder: Path, monkeypatch, readable: tuple[str, ...]) -> None:
    """Make ``folder`` read-only. Where that does not stop this process (root ignores the mode),
    make SQLite fail as it fails there, for any connection to a file in ``folder`` whose URI has
    none of ``readable``: a WAL database's reader cannot create the ``-shm`` file beside it."""
    folder.chmod(0o555)
    if not os.access(folder, os.W_OK):
        return
    connect = sqlite3.connect

    def read_only_connect(database, *args, **kwargs):
        target = str(database)
        if str(folder) in target and not any(part in target for part in readable):
            error = sqlite3.OperationalError("attempt to write a readonly database")
            error.sqlite_errorcode = 1544  # SQLITE_READONLY_DIRECTORY
            raise error
        return connect(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", read_only_connect)


def test_a_store_in_a_read_only_folder_is_read_and_not_written(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "finished"
    store_path = folder / "s.sqlite"
    _survey(["eqtest_tiny"], store_path)
    expected = _rows(store_path)
    try:
        # With WAL and no -shm beside the file (the survey closed it), only immutable=1 reads.
        _read_only_folder(folder, monkeypatch, readable=("immutable=1",))
        with open_store(store_path) as store:
            assert store.read_only == "mode=ro&immutable=1"
            assert store.runs.status.tolist() == ["done"]
            with pytest.raises(PermissionError, match="opened read-only"):
                store.add_error(model="x", config_hash="h", attempt=1, batch_size=1, kind="k",
                                message="m", traceback="t")
        pd.testing.assert_frame_equal(_rows(store_path), expected)
        assert main(["report", str(store_path), "-o", str(tmp_path / "report")]) == 0
        assert (tmp_path / "report" / "index.html").is_file()
        # Writing is a clear error, before any model is measured.
        writable = r"cannot write the survey store .*s.sqlite: its folder or file is read-only"
        with pytest.raises(PermissionError, match=writable):
            SurveyStore(store_path, create=True)
        with pytest.raises(PermissionError, match=writable):
            _survey(["eqtest_tiny", "eqtest_raises"], store_path)
        capsys.readouterr()
        assert main(["survey", "--models", "eqtest_tiny", "--samples", "--store",
                     str(store_path), "--quiet"]) == 2
        assert "copy it to a writable place" in capsys.readouterr().err
        assert sorted(p.name for p in folder.iterdir()) == ["s.sqlite"]
        # A new store in that folder: it cannot be created, and there is nothing to read.
        with pytest.raises(PermissionError, match=r"cannot create the survey store .*new.sqlite: "
                                                  r"its folder is read-only"):
            SurveyStore(folder / "new.sqlite", create=True)
    finally:
        folder.chmod(0o755)


def test_a_read_only_store_is_read_with_mode_ro_where_that_suffices(tmp_path, monkeypatch):
    store_path = tmp_path / "s.sqlite"
    _survey(["eqtest_tiny"], store_path)
    expected = _rows(store_path)
    # (simulated: mode=ro reads a WAL database whose -shm is there, e.g. beside a live writer)
    real = sqlite3.connect

    def connect(database, *args, **kwargs):
        if "mode=ro" not in str(database):
            error = sqlite3.OperationalError("attempt to write a readonly database")
            error.sqlite_errorcode = 1544
            raise error
        return real(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    with open_store(store_path) as store:
        assert store.read_only == "mode=ro"
    pd.testing.assert_frame_equal(_rows(store_path), expected)


def _schema_and_bytes(path) -> tuple[list, bytes]:
    connection = sqlite3.connect(path)
    try:
        schema = connection.execute("SELECT type, name, sql FROM sqlite_master ORDER BY name")
        schema = schema.fetchall()
    finally:
        connection.close()
    return schema, Path(path).read_bytes()


@pytest.mark.parametrize("tables", [["parts"], ["meta", "parts"]])
def test_a_foreign_database_is_refused_and_left_unchanged(tmp_path, tables):
    foreign = tmp_path / "inventory.sqlite"
    connection = sqlite3.connect(foreign)
    with connection:
        connection.execute("CREATE TABLE parts (id INTEGER PRIMARY KEY, name TEXT)")
        connection.execute("INSERT INTO parts (name) VALUES ('bolt')")
        if "meta" in tables:
            connection.execute("CREATE TABLE meta (owner TEXT)")  # a meta, but not equifast's
    connection.close()
    before = _schema_and_bytes(foreign)
    found = ", ".join(tables)
    for open_it in (lambda: SurveyStore(foreign, create=True), lambda: open_store(foreign),
                    lambda: _survey(["eqtest_tiny"], foreign)):
        with pytest.raises(ValueError, match=r"inventory.sqlite is not an equifast survey store: "
                           rf"expected the tables meta, .*found {found}; it was left unchanged"):
            open_it()
        assert _schema_and_bytes(foreign) == before  # no equifast table, not even WAL mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inventory.sqlite"]
    # An empty database file is no one's: it becomes a store.
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()
    with SurveyStore(empty, create=True) as store:
        assert store.meta.set_index("key").value["schema_version"] == str(SCHEMA_VERSION)


def test_survey_argument_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="min_batch_size"):
        _survey(["eqtest_tiny"], tmp_path / "s.sqlite", batch_size=2, min_batch_size=4)
    with pytest.raises(ValueError):
        _survey(["eqtest_tiny"], tmp_path / "s.sqlite", group="translate:banana")
    with pytest.raises(FileNotFoundError, match="nowhere' does not exist"):
        run_survey(["eqtest_tiny"], tmp_path / "nowhere", tmp_path / "s.sqlite", log=None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files found"):
        run_survey(["eqtest_tiny"], tmp_path / "empty", tmp_path / "s.sqlite", log=None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="torchrun"):
        _survey(["eqtest_tiny"], tmp_path / "s.sqlite")
    assert not (tmp_path / "s.sqlite").exists()


def _cli_survey(store_path, models) -> list[str]:
    # The real command line in a fresh interpreter (the test models through --import).
    return [sys.executable, "-m", "equifast", "survey", "--import", "survey_models",
            "--models", *models, "--samples",
            "--group", "translate:4,8", "--limit", "4", "--input-size", "32", "--bootstrap",
            "20", "--store", str(store_path), "--quiet"]


def _done_models(store_path) -> list[str]:
    if not Path(store_path).exists():
        return []
    try:
        connection = sqlite3.connect(store_path, timeout=10)
        try:
            rows = connection.execute("SELECT model FROM runs WHERE status = 'done'").fetchall()
        finally:
            connection.close()
    except sqlite3.OperationalError:  # the schema is not there yet
        return []
    return [r[0] for r in rows]


def test_sigkill_at_a_random_moment_loses_nothing_and_duplicates_nothing(tmp_path):
    models = ["eqtest_tiny", "resnet10t", "convnext_atto", "mobilenetv3_small_050",
              "resnet14t", "regnetx_002"]
    store_path = tmp_path / "killed.sqlite"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    rng = random.Random(1234)
    kills = 0
    for _ in range(4):  # kill up to two times, then let it finish
        done_before = _done_models(store_path)
        process = subprocess.Popen(_cli_survey(store_path, models), env=env,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < 2:
            # Wait for this run to commit one model, then kill at a random moment after it
            # (inside the next model's measurement or its transaction).
            deadline = time.monotonic() + 120
            while (len(_done_models(store_path)) <= len(done_before)
                   and process.poll() is None and time.monotonic() < deadline):
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.6))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                assert process.wait(timeout=30) == -signal.SIGKILL
                kills += 1
                after = _done_models(store_path)
                assert set(done_before) < set(after)  # nothing committed was lost
                continue
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr.decode()[-2000:]
        break
    assert kills >= 1  # a run may finish before its random moment comes; one kill is a must
    done = _done_models(store_path)
    assert sorted(done) == sorted(models) and len(done) == len(models)

    # The killed-and-resumed store holds exactly what an uninterrupted survey writes.
    clean_path = tmp_path / "clean.sqlite"
    subprocess.run(_cli_survey(clean_path, models), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    killed, clean = _rows(store_path), _rows(clean_path)
    assert len(killed) == len(clean) > 0
    pd.testing.assert_frame_equal(killed.drop(columns="value"), clean.drop(columns="value"))
    np.testing.assert_allclose(killed["value"], clean["value"], rtol=1e-6, atol=1e-9)
    with open_store(store_path) as store:
        assert store.runs.groupby(["model", "config_hash"]).size().max() == 1
        assert store.layers.groupby(["run_id", "layer"]).size().max() == 1


def test_cli_survey_and_export(tmp_path, capsys):
    store_path = tmp_path / "s.sqlite"
    code = main(["survey", "--models", "eqtest_tiny", "eqtest_raises", "--samples", "--group",
                 "translate:4,8", "--limit", "4", "--input-size", "32", "--bootstrap", "20",
                 "--store", str(store_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1  # one model failed: the exit status says so
    assert "1 done" in out and "1 failed" in out and "eqtest_raises" in out
    for fmt in ("parquet", "csv"):
        assert main(["export", str(store_path), "--format", fmt, "-o",
                     str(tmp_path / fmt)]) == 0
        scores_file = tmp_path / fmt / f"scores.{fmt}"
        frame = pd.read_parquet(scores_file) if fmt == "parquet" else pd.read_csv(scores_file)
        assert set(frame.model) == {"eqtest_tiny"} and len(frame) > 0
        errors_file = tmp_path / fmt / f"errors.{fmt}"
        errors = pd.read_parquet(errors_file) if fmt == "parquet" else pd.read_csv(errors_file)
        assert list(errors.model) == ["eqtest_raises"]
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == sorted(
        f"{t}.csv" for t in ("runs", "scores", "layers", "model_scores", "skipped", "errors",
                             "environments", "meta"))
    assert main(["export", str(tmp_path / "absent.sqlite")]) == 2
    assert "no survey store" in capsys.readouterr().err
    with pytest.raises(ValueError, match="format"):
        export_store(store_path, tmp_path / "x", "xlsx")


def test_a_rerun_exits_1_while_failures_are_left_in_the_store(tmp_path, capsys):
    """The first run exits 1 (a model failed); a rerun that skips the failed model without
    --retry-failed exited 0 although the store still held the failure: it exits 1 too, and says
    how many failures are left and how to retry them. Once nothing failed is left: 0."""
    store_path = tmp_path / "s.sqlite"
    argv = ["survey", "--models", "eqtest_tiny", "eqtest_raises", "--samples", "--group",
            "translate:4,8", "--limit", "4", "--input-size", "32", "--bootstrap", "0",
            "--store", str(store_path), "--quiet"]
    retry = ("1 model of this survey is recorded as failed in the store for this configuration "
             "(exit status 1); the same command with --retry-failed measures it again: "
             "eqtest_raises")
    assert main(argv) == 1
    assert retry in capsys.readouterr().out
    assert main(argv) == 1  # nothing measured, the failure left as it is
    out = capsys.readouterr().out
    assert "0 done, 2 skipped" in out and retry in out
    assert main([*argv, "--retry-failed"]) == 1  # retried, failed again
    assert retry in capsys.readouterr().out
    # the survey's own models count: another model's failure under this configuration does not
    assert main([a for a in argv if a != "eqtest_raises"]) == 0
    assert "recorded as failed" not in capsys.readouterr().out
    summary = _survey(["eqtest_raises", "eqtest_tiny"], store_path, bootstrap=0)
    assert summary.failures_left == ["eqtest_raises"] and not summary.failed


def test_ray_survey_gives_the_sequential_rows(tmp_path, monkeypatch):
    sequential, distributed = tmp_path / "seq.sqlite", tmp_path / "ray.sqlite"
    _survey(REAL_MODELS, sequential)
    # Ray's local workers inherit the driver's environment: they find the eqtest_* models too.
    monkeypatch.setenv("PYTHONPATH", f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    summary = _survey(REAL_MODELS + ["eqtest_raises"], distributed, ray=True,
                      imports=["survey_models"])
    assert sorted(summary.done) == sorted(REAL_MODELS)
    assert summary.failed == ["eqtest_raises"]
    seq, ray_rows = _rows(sequential), _rows(distributed)
    assert len(seq) == len(ray_rows) > 0
    pd.testing.assert_frame_equal(seq.drop(columns="value"), ray_rows.drop(columns="value"))
    np.testing.assert_allclose(seq["value"], ray_rows["value"], rtol=1e-6, atol=1e-9)
    with open_store(distributed) as store:
        assert "broken on purpose" in store.errors.traceback.iloc[0]


def test_one_number_is_a_square_input_size_for_a_survey(tmp_path):
    # input_size=32 hashed as (32, 32), but every model failed on it: "TypeError: 'int' object
    # is not subscriptable" (building the model for the size)
    store_path = tmp_path / "s.sqlite"
    summary = _survey(["eqtest_tiny", "vit_tiny_patch16_224"], store_path, input_size=32,
                      layers=None, bootstrap=0)
    assert summary.done == ["eqtest_tiny", "vit_tiny_patch16_224"] and not summary.failed
    with open_store(store_path) as store:
        assert store.result("vit_tiny_patch16_224").config["input_size"] == [32, 32]
    assert _survey(["eqtest_tiny"], store_path, bootstrap=0).skipped == ["eqtest_tiny"]


def test_the_same_settings_have_one_config_however_written(tmp_path, monkeypatch):
    from equifast.scores import DEFAULT_METRICS
    from equifast.survey.runner import survey_config
    from equifast.survey.store import config_hash

    def key(group="translate:4,8", data="samples", **kwargs):
        return config_hash(survey_config(group, data, {"seed": 0, "model_kwargs": {}, **kwargs}))

    base = key()
    # The command line passes every default; the Python API leaves them out.
    assert base == key(layers=None, metrics=None, limit=None, align="auto", pooled=False,
                       bootstrap=1000, subpixel="bilinear", baseline=None, loader="auto",
                       num_workers=None, device="cpu")
    for spec in ("translate: 4, 8", " translate:4,8 ", "translate:4.0,8", "shift:4,8",
                 "translate[crop]:4,8", "translate:0/4,4/0,0/8,8/0"):
        assert key(spec) == base, spec
    assert key(metrics=list(DEFAULT_METRICS)) == base
    assert key(metrics=["cosine"]) == key(metrics=["corr", "cosine"])
    assert key(input_size=32) == key(input_size=(32, 32)) == key(input_size=[32, 32])
    assert key(align=0) == key(align=0.0)
    assert key(layers="default") == key(layers=["default"]) == base
    assert key(layers="leaves") == key(layers=["leaves"]) != base  # Python, command line
    assert key(comparisons=("chance", "inv", "eq")) == base
    assert key(comparisons="eq") == key(comparisons=["eq"]) != base
    assert key(layouts={}) == base
    assert key(mask=None) == base and key(mask="disc") != base
    # the dtype, where given (left to the device, as the device itself, it is not)
    assert key(dtype=None) == base and key(channels_last=True) == base
    assert len({base, key(dtype=torch.float64), key(dtype=torch.bfloat16)}) == 3
    # Metric and layer names are names, also where a file of that name happens to exist.
    named = key(metrics=["corr", "cosine"], layers=["conv1"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cosine").write_text("")
    (tmp_path / "conv1").write_text("")
    assert key(metrics=["corr", "cosine"], layers=["conv1"]) == named
    # ... while data and checkpoints are paths: relative or absolute, the same file.
    (tmp_path / "w.pth").write_text("")
    assert key(model_kwargs={"checkpoint_path": "w.pth"}) == key(
        model_kwargs={"checkpoint_path": str(tmp_path / "w.pth")})
    # What changes the numbers still changes the configuration.
    others = [key("translate:4"), key("translate[circular]:4,8"), key("translate:8,4"),
              key(metrics=["nde"]), key(bootstrap=20), key(align="center"), key(pooled=True),
              key(layers=["conv1"]), key(limit=4), key(input_size=32), key(seed=1),
              key(baseline="init"), key(model_kwargs={"checkpoint_path": "w.pth"}),
              key(data=tmp_path)]
    assert len({base, *others}) == 1 + len(others)


def test_a_command_line_survey_resumes_a_python_one(tmp_path, capsys):
    store_path = tmp_path / "s.sqlite"
    assert main(["survey", "--models", "eqtest_tiny", "--samples", "--group", "translate:4,8",
                 "--limit", "4", "--input-size", "32", "--bootstrap", "20", "--store",
                 str(store_path), "--quiet"]) == 0
    summary = _survey(["eqtest_tiny"], store_path, group="translate: 4, 8")
    assert summary.skipped == ["eqtest_tiny"] and not summary.done
    with open_store(store_path) as store:
        assert store.runs.group_spec.tolist() == ["translate:4,8"]


def test_config_hash_follows_what_changes_the_numbers(tmp_path):
    from equifast.survey.runner import survey_config
    from equifast.survey.store import config_hash

    images = torch.zeros(2, 3, 8, 8)
    base = config_hash(survey_config("translate:4", images, {"labels": torch.arange(2)}))
    assert base == config_hash(survey_config("translate:4", images.clone(),
                                             {"labels": torch.arange(2), "batch_size": 7,
                                              "device": "cpu", "num_workers": 3}))
    changed = images.clone()
    changed[1, 2, 4, 4] = 1  # one pixel: str(tensor) would not show it, the hash does
    assert base != config_hash(survey_config("translate:4", changed, {"labels": torch.arange(2)}))
    assert base != config_hash(survey_config("translate:4", images, {"labels": torch.ones(2)}))
    assert base != config_hash(survey_config("translate:8", images, {"labels": torch.arange(2)}))
    assert config_hash(survey_config("flip", tmp_path, {})) == config_hash(
        survey_config("flip", str(tmp_path), {}))


def test_one_configuration_keeps_one_group_spelling_in_the_store(tmp_path):
    """A later survey of the same configuration, its group spelt otherwise, stores the first
    spelling with its models: the report shows one group, not two columns."""
    store_path = tmp_path / "s.sqlite"
    _survey(["eqtest_tiny"], store_path, group="translate:4,8")
    summary = _survey(["eqtest_tiny", "eqtest_tiny_b"], store_path,
                      group="translate:0/4,4/0,0/8,8/0")
    assert summary.skipped == ["eqtest_tiny"] and summary.done == ["eqtest_tiny_b"]
    with open_store(store_path) as store:
        assert store.runs.group_spec.tolist() == ["translate:4,8", "translate:4,8"]


def test_export_store_output_folder_errors_name_the_path(tmp_path, make_unwritable):
    """From Python as on the command line: an ``out`` that is a file, lies under one, or takes no
    file is one ValueError naming the path, before anything is written."""
    store_path = tmp_path / "s.sqlite"
    with SurveyStore(store_path, create=True):
        pass
    afile = tmp_path / "afile"
    afile.write_text("x")
    expected = "; expected a folder (for <table>.csv files)"
    with pytest.raises(ValueError, match=re.escape(f"out {afile}: is an existing file"
                                                   + expected)):
        export_store(store_path, afile, "csv")
    with pytest.raises(ValueError, match=re.escape(
            f"out {afile / 'sub'}: cannot create the folder '{afile / 'sub'}': '{afile}' is an "
            "existing file" + expected)):
        export_store(store_path, afile / "sub", "csv")
    assert afile.read_text() == "x"
    with pytest.raises(FileNotFoundError, match="no survey store"):
        export_store(tmp_path / "absent.sqlite", tmp_path / "new")
    assert not (tmp_path / "new").exists()  # a missing store leaves no empty folder behind
    locked = tmp_path / "locked"
    locked.mkdir()
    make_unwritable(locked)
    with pytest.raises(ValueError, match=re.escape(
            f"out {locked}: cannot write in the folder '{locked}': Permission denied")):
        export_store(store_path, locked)
    assert list(locked.iterdir()) == []


def test_estimated_grid_offsets_are_recorded_where_the_group_depends_on_them(tmp_path):
    # eqtest_bf16_cast is probed in bfloat16, whose gradients show no footprint: its offsets
    # are centroid estimates, which flips depend on and translations do not.
    flipped = tmp_path / "flip.sqlite"
    summary = _survey(["eqtest_bf16_cast", "eqtest_tiny"], flipped, group="flip")
    assert summary.done == ["eqtest_bf16_cast", "eqtest_tiny"]
    with open_store(flipped) as store:
        runs = store.runs.set_index("model")
    warning = runs.warning["eqtest_bf16_cast"]
    assert "grid offsets of 2 layer(s) are estimates" in warning and "conv1, conv2" in warning
    assert pd.isna(runs.warning["eqtest_tiny"]) or not runs.warning["eqtest_tiny"]
    shifted = tmp_path / "shift.sqlite"
    _survey(["eqtest_bf16_cast"], shifted)  # translations
    with open_store(shifted) as store:
        runs = store.runs.set_index("model")
    assert pd.isna(runs.warning["eqtest_bf16_cast"]) or not runs.warning["eqtest_bf16_cast"]
