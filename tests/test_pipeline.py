"""The Python API (:mod:`calibrate.pipeline`): the calibration the command runs, called directly on
``infinity-tiny`` with the smallest settings. It returns the policy unsaved, writes the record and
report into ``out``, and resumes: a second call reuses the record and the finished trials."""
from __future__ import annotations

import shutil

import pytest
import torch

from calib import PROMPTS
from calibrate import calibration
from calibrate.calibration import record_dir
from calibrate.pipeline import CalibrationResult, SearchSettings, calibrate
from calibrate.search import LOCAL_ATTR
from stagevar.errors import StageVarError
from stagevar.models.registry import load_model
from stagevar.policy import Policy

HELDOUT = ["a green triangle", "a blue circle"]
FAST = SearchSettings(trials=3, local_trials=1, verify_candidates=1, verify_near=0, verify_repeats=1, search_images=4)


@pytest.fixture(scope="module")
def tiny():
    return load_model("infinity-tiny")


def test_calibrate_returns_an_unsaved_policy_and_resumes(tiny, measured, tmp_path, small_measure, monkeypatch):
    torch.set_num_threads(1)
    out = tmp_path / "cal"
    shutil.copytree(record_dir(measured[0], measured[1].key), record_dir(out, measured[1].key))   # the session's record
    res = calibrate(tiny, "2x,50x", PROMPTS, [0], heldout=HELDOUT, report_prompts=HELDOUT[:1], out=out, batch_size=2,
                    settings=FAST, progress=False)
    assert isinstance(res, CalibrationResult) and isinstance(res.policy, Policy)
    assert list(res.policy.operating_points) == ["2x", "50x"] and res.policy.default == "2x"
    fifty = res.policy.operating_points["50x"].measured
    assert fifty["feasible"] is False and ("50x", fifty["speedup"]) in res.infeasible
    for name, point in res.policy.operating_points.items():
        m = point.measured
        assert m["budget"] == name and m["quality_from"].startswith("report set") and m["speedup"] > 0
        assert res.chosen_trials[name]["number"] == m["trial"]
    res.policy.check_compatible(tiny)
    prov = res.policy.provenance
    assert prov["calibration_record"] == res.record.key and prov["trials_per_budget"] == 3
    assert prov["optuna_storage"] == "journal file in --out" and prov["metrics"]["semantic"] == ["codes"]
    assert res.record_dir == out / f"calibration-{res.record.key}" and res.report.is_file()
    assert not list(tmp_path.rglob("*.yaml"))                           # the caller saves the policy
    assert res.record.key == measured[1].key
    # the two budgets share one study (quality and latency), of --trials x budgets sampler trials
    assert {t["budget"] for t in res.trials} == {"2x-50x"} and len({t["number"] for t in res.trials}) == len(res.trials)
    assert all(m.measured["study"].startswith(f"infinity-tiny.{tiny.resolution}.2x-50x.{res.record.key}.s")
               for m in res.policy.operating_points.values())
    sampler_trials = sum(1 for t in res.trials if LOCAL_ATTR not in t)
    assert sampler_trials == 2 * 3

    def no_measure(*a, **k):
        raise AssertionError("the record should have been reused")
    monkeypatch.setattr(calibration, "measure_variant", no_measure)
    again = calibrate(tiny, "2x,50x", PROMPTS, [0], heldout=HELDOUT, report_prompts=HELDOUT[:1], out=out, batch_size=2,
                      settings=FAST, progress=False)
    assert again.record.key == res.record.key
    assert sum(1 for t in again.trials if LOCAL_ATTR not in t) == sampler_trials


@pytest.mark.parametrize("field, value, words", [
    ("trials", 0, "--trials must be >= 1"),
    ("local_trials", -1, "--local-trials must be >= 0"),
    ("latency_margin", 0.7, "--latency-margin must be in [0, 0.5)"),
])
def test_bad_settings_are_one_clear_error_before_any_work(field, value, words, tiny, tmp_path):
    import dataclasses
    with pytest.raises(StageVarError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        calibrate(tiny, "2x", PROMPTS, heldout=HELDOUT, out=tmp_path, settings=dataclasses.replace(FAST, **{field: value}),
                  progress=False)
    assert not any(tmp_path.iterdir())


def test_a_study_of_the_same_record_key_with_other_content_is_refused_with_the_reason():
    import types

    import optuna

    from calibrate.study import open_owned_study
    from calibrate.budget import parse_budget
    storage = optuna.storages.InMemoryStorage()
    budget = parse_budget("3x")

    def record(key, sha):
        return types.SimpleNamespace(key=key, sha256=lambda: sha)
    open_owned_study("s", storage, record("k1", "aaa"), budget, 1.0, "m", 3, 0)
    open_owned_study("s", storage, record("k1", "aaa"), budget, 1.0, "m", 3, 0)          # the same record: resumes
    with pytest.raises(StageVarError, match="record k1 .*the same key but other content .*another version of stagevar"):
        open_owned_study("s", storage, record("k1", "bbb"), budget, 1.0, "m", 3, 0)
    with pytest.raises(StageVarError, match="searched with calibration record k1 .*, but this run's record is k2"):
        open_owned_study("s", storage, record("k2", "ccc"), budget, 1.0, "m", 3, 0)
    # a study of one budget is not resumed as the study of several (two objectives), nor the reverse
    with pytest.raises(StageVarError, match="'s' has one objective .* needs two objectives .* another --study"):
        open_owned_study("s", storage, record("k1", "aaa"), budget, 1.0, "m", 3, 0, objectives=2)
    open_owned_study("f", storage, record("k1", "aaa"), budget, 1.0, "m", 3, 0, objectives=2)
    with pytest.raises(StageVarError, match="'f' has two objectives"):
        open_owned_study("f", storage, record("k1", "aaa"), budget, 1.0, "m", 3, 0)
