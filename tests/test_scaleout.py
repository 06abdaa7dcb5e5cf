"""Scale-out: ``stagevar-calibrate worker`` processes sharing one study in PostgreSQL, a worker
killed mid-trial, then the normal calibrate command picking the study up; and sharded calibration
records merged into the single-process record.

Everything runs on ``infinity-tiny`` with tiny measurement settings, one torch thread per process.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from pg import postgres  # noqa: F401 - fixture

TINY_KW = dict(keeps=(0.5,), selections=("random_projection",), sensitivity_from=5, guidance_from=5, latency_repeats=1,
               latency_check_policies=1, stage_images=4)      # the convergence pass adds seed 1 to the record's seed 0
TRIALS = 8
BUDGET = "1.01x"


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_settings():
    from calibrate.calibration import MeasureSettings
    return MeasureSettings(**TINY_KW)


@pytest.fixture
def tiny_defaults(monkeypatch):
    """The calibrate command measures with the default MeasureSettings (slow on tiny): make the
    tiny settings the default, so that it finds the record measured with them (same key)."""
    import calibrate.calibration as cal
    monkeypatch.setitem(cal.measure.__kwdefaults__, "settings", tiny_settings())


@pytest.fixture(scope="module")
def tiny():
    from stagevar.models.registry import load_model
    return load_model("infinity-tiny")


@pytest.fixture(scope="module")
def tiny_record(tiny, tmp_path_factory):
    """(out directory, record) measured once with the tiny settings (2 bundled prompts in batches of 1,
    seed 0): the workers' record, and the single-process reference of the shard test."""
    from calibrate.calibration import measure
    from calibrate.prompts import bundled
    out = tmp_path_factory.mktemp("cal")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rec = measure(tiny, bundled("infinity-tiny", "calibration", 2), [0], out=out, batch_size=1,
                      settings=tiny_settings(), progress=False)
    finally:
        torch.set_num_threads(old)
    return out, rec


def _study(url: str, name: str):
    import optuna
    from calibrate.storage import storage_url
    return optuna.load_study(study_name=name, storage=storage_url(url))


HOLD_SITECUSTOMIZE = """
import os, time
if os.environ.get("HOLD_MARK"):
    from calibrate.measure.common import Subject
    _run = Subject.run
    def run(self, point, *args, **kwargs):
        if point is not None:                 # a trial's measurement (the reference run passes None)
            try:
                fd = os.open(os.environ["HOLD_MARK"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return _run(self, point, *args, **kwargs)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            time.sleep(3600)
        return _run(self, point, *args, **kwargs)
    Subject.run = run
"""
HANG_S = 1800.0          # only a hung process takes this long: no assertion depends on the machine's speed


def _holding_env(tmp_path) -> tuple[dict, "Path"]:
    """Environment for worker processes of which the first to measure a trial stops inside it
    (writing its PID to the returned marker) until it is killed: a kill point that every machine
    reaches, however fast its trials run."""
    site = tmp_path / "hold"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HOLD_SITECUSTOMIZE)
    mark = tmp_path / "held.pid"
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONPATH=path, HOLD_MARK=str(mark)), mark


def _wait_for(cond, proc, what: str):
    """Poll ``cond()`` until it returns something truthy (fails if ``proc`` exits first)."""
    deadline = time.time() + HANG_S
    while True:
        try:
            hit = cond()
        except Exception:  # noqa: BLE001 - the study may not exist yet
            hit = None
        if hit:
            return hit
        assert proc.poll() is None, f"exited (rc {proc.returncode}) before {what}"
        assert time.time() < deadline, f"hung: {what} not seen"
        time.sleep(0.05)


def _running_measured_trial(study, pid: int):
    """(trial number, pid) of the RUNNING trial of worker ``pid`` that is generating images (not estimated)."""
    from optuna.trial import TrialState
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        ua = t.user_attrs
        if "worker" in ua and "predicted_speedup" in ua and "quality_estimated" not in ua \
                and int(ua["worker"].rsplit(":", 1)[1]) == pid:
            return t.number, pid
    return None


def test_workers_survive_a_killed_worker_then_calibrate_writes_policy(postgres, tmp_path, tiny_record, one_thread,  # noqa: F811
                                                                    tiny_defaults, capsys):
    import shutil

    from calibrate.calibration import record_dir
    from calibrate.storage import retried_trial_number
    from calibrate.study import study_counts
    from optuna.trial import TrialState
    from stagevar.policy import load_policy

    out = tmp_path / "cal"
    shutil.copytree(tiny_record[0], out)
    rec = tiny_record[1]
    rdir = record_dir(out, rec.key)
    study_name = "scaleout-test"
    env, mark = _holding_env(tmp_path)
    cmd = [sys.executable, "-m", "calibrate.cli", "worker", "--storage", postgres.url, "--study", study_name,
           "--model", "infinity-tiny", "--budget", BUDGET, "--trials", str(TRIALS), "--record", str(rdir), "--n-workers", "4", "--search-images", "4",
           "--threads", "1", "--heartbeat", "1", "--grace-period", "8", "--quiet"]
    parent = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    killed = None
    try:
        pid = int(_wait_for(lambda: mark.exists() and mark.read_text(), parent, "a worker measuring a trial"))
        study = _study(postgres.url, study_name)
        killed = _wait_for(lambda: _running_measured_trial(study, pid), parent, f"the running trial of worker {pid}")
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = parent.communicate(timeout=HANG_S)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.communicate()
    assert killed is not None, "never saw a running (measured) trial to kill"
    # the parent reports the worst child: the one killed by SIGKILL
    assert parent.returncode == 128 + signal.SIGKILL, (parent.returncode, stdout, stderr)
    assert "Traceback" not in stderr, stderr
    assert f"killed by signal {int(signal.SIGKILL)}" in stderr

    study = _study(postgres.url, study_name)
    trials = study.get_trials(deepcopy=False)
    c = study_counts(study)
    assert c["finished"] >= TRIALS
    assert c["running"] == 0 and c["waiting"] == 0, c
    by_number = {t.number: t for t in trials}
    assert by_number[killed[0]].state == TrialState.FAIL, "the killed worker's trial is marked FAIL"
    for f in (t for t in trials if t.state == TrialState.FAIL):      # every lost trial has a retry ...
        assert any(t.system_attrs.get("retry_history", [])[-1:] == [f.number] and t.params == f.params for t in trials), f.number
    originals = {retried_trial_number(t) for t in trials if retried_trial_number(t) is not None}
    assert killed[0] in originals
    # ... and each retry chain ends finished. On a loaded machine a live worker's heartbeat can
    # starve past the grace period, so a trial besides the killed one may be failed as lost and
    # re-run; a re-run sampler trial may then be PRUNED (it ranks below the trials finished by then)
    for number in originals:
        assert any(retried_trial_number(t) == number and t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                   for t in trials), (number, [(t.number, t.state) for t in trials if retried_trial_number(t) == number])
    workers = {t.user_attrs.get("worker") for t in trials}
    assert len(workers) >= 2, workers
    seeds = [t.user_attrs.get("seed_policy") for t in trials if t.user_attrs.get("seed_policy") and retried_trial_number(t) is None]
    # enqueued exactly once each, the fixed ones first (the FastVAR-like one only where the latency
    # table, measured on this machine, leaves skipping scales to the search); budget-fitted ones
    # after them when it says no fixed seed meets the budget; within --trials
    fixed = 3 if seeds[2:3] == ["fastvar-like"] else 2
    assert seeds[:2] == ["identity", "paper-like"], [(t.number, t.state, t.user_attrs, t.system_attrs) for t in trials]
    assert len(set(seeds)) == len(seeds) <= TRIALS and all(s.startswith("fitted:") for s in seeds[fixed:]), seeds
    n_before = len(trials)

    # the normal command picks the finished study up: no new sampler trials, its local search
    # (bounded by --local-trials), verify, write the policy
    from calibrate.cli import main
    policy_path = tmp_path / "policy.yaml"
    capsys.readouterr()
    rc = main(["--model", "infinity-tiny", "--num-prompts", "2", "--batch-size", "1", "--seeds", "0", "--out", str(out),
               "--budget", BUDGET, "--storage", postgres.url, "--study", study_name, "--trials", str(TRIALS), "--search-images", "4",
               "--num-heldout", "2", "--num-report", "2", "--verify-candidates", "1", "--local-trials", "4", "--policy-out", str(policy_path),
               "--quiet", "--threads", "1"])
    o, e = capsys.readouterr()
    assert rc in (0, 3), (rc, o, e)
    assert "Traceback" not in e
    policy = load_policy(policy_path)
    point = policy.operating_point(BUDGET)
    assert point.measured["verified"] is True
    assert point.measured["study"] == study_name
    assert policy.provenance["calibration_record"] == rec.key
    assert "s3cret" not in policy_path.read_text()                 # the storage URL is stored redacted
    after = _study(postgres.url, study_name).get_trials(deepcopy=False)
    added = after[n_before:]
    assert len(added) <= 4 and all("local_from" in t.user_attrs for t in added)


def test_sigterm_requeues_the_running_trial(postgres, tiny_record, tmp_path):  # noqa: F811
    """SIGTERM (a scheduler's polite kill) re-queues the running trial at once, exit 130."""
    from calibrate.calibration import record_dir
    from calibrate.storage import retried_trial_number
    from optuna.trial import TrialState

    out, rec = tiny_record
    env, mark = _holding_env(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "calibrate.cli", "worker", "--storage", postgres.url, "--study", "sigterm",
                          "--model", "infinity-tiny", "--budget", BUDGET, "--trials", "50", "--record", str(record_dir(out, rec.key)), "--search-images", "4",
                          "--threads", "1", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _wait_for(lambda: mark.exists() and mark.read_text(), p, "the worker measuring a trial")
        hit = _wait_for(lambda: _running_measured_trial(_study(postgres.url, "sigterm"), p.pid), p, "its running trial")
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=HANG_S)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, err
    assert "re-queued" in err and "Traceback" not in err, err
    trials = _study(postgres.url, "sigterm").get_trials(deepcopy=False)
    assert trials[hit[0]].state == TrialState.FAIL
    retry = [t for t in trials if retried_trial_number(t) == hit[0]]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING and retry[0].params == trials[hit[0]].params


def test_join_refuses_another_record_or_budget(tiny_record, tmp_path):
    """Workers of one study must share the record (its SHA-256) and the budget."""
    import dataclasses

    from calibrate.budget import parse_budget
    from calibrate.storage import open_storage
    from calibrate.study import join_study
    from stagevar.errors import StageVarError

    rec = tiny_record[1]
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=3)
    study = join_study("s", storage, rec, parse_budget("2x"), 0.1, 8, sampler_seed=0)
    assert [t.user_attrs["seed_policy"] for t in study.trials] == ["identity", "paper-like", "fastvar-like"]
    again = join_study("s", storage, rec, parse_budget("2x"), 0.1, 8, sampler_seed=1)       # joins, no new seeds
    assert len(again.trials) == 3
    other = dataclasses.replace(rec, latency={**rec.latency, "overhead_s": rec.latency["overhead_s"] + 1.0})
    with pytest.raises(StageVarError, match="same record"):
        join_study("s", storage, other, parse_budget("2x"), 0.1, 8, sampler_seed=2)
    with pytest.raises(StageVarError, match="budget 2x, not 3x"):
        join_study("s", storage, rec, parse_budget("3x"), 0.1, 8, sampler_seed=3)
    # the budget-fitted seeds go in once, with the fixed ones, as in a single-process search
    from calibrate.seeds import seed_params
    fitted = {"fitted:x": dict(seed_params(rec)["paper-like"], keep_6=0.1)}
    study = join_study("f", storage, rec, parse_budget("3x"), 0.05, 8, sampler_seed=0, fitted=fitted)
    assert [t.user_attrs["seed_policy"] for t in study.trials] == ["identity", "paper-like", "fastvar-like", "fitted:x"]
    assert len(join_study("f", storage, rec, parse_budget("3x"), 0.05, 8, sampler_seed=1, fitted=fitted).trials) == 4


def test_workers_search_several_budgets_in_one_study_that_calibrate_then_verifies(tmp_path, tiny_record, one_thread,
                                                                                  tiny_defaults, capsys):
    """``--budget 2x,50x``: the worker joins one study of two objectives (quality, latency) and runs
    --trials x budgets trials; the calibrate command with the same options runs no sampler trial
    and writes both points from that study. A study of one budget is not joined as one of several."""
    import shutil

    from calibrate.budget import BudgetSet, parse_budget
    from calibrate.calibration import record_dir
    from calibrate.cli import main
    from calibrate.storage import open_storage
    from calibrate.study import join_study, study_counts
    from stagevar.errors import StageVarError
    from stagevar.policy import load_policy

    out = tmp_path / "cal"
    shutil.copytree(tiny_record[0], out)
    rec = tiny_record[1]
    url = f"sqlite:///{tmp_path / 'study.db'}"
    common = ["--model", "infinity-tiny", "--budget", "2x,50x", "--storage", url, "--study", "front", "--trials", "3",
              "--search-images", "2", "--threads", "1", "--quiet"]
    assert main(["worker", *common, "--record", str(record_dir(out, rec.key))]) == 0
    study = _study(url, "front")
    assert len(study.directions) == 2 and study.user_attrs["stagevar"]["budget"] == "2x-50x"
    assert study_counts(study)["finished"] == 2 * 3
    assert all(len(t.values) == 2 for t in study.trials if t.values is not None)
    capsys.readouterr()
    policy_path = tmp_path / "policy.yaml"
    rc = main([*common, "--num-prompts", "2", "--batch-size", "1", "--seeds", "0", "--out", str(out), "--num-heldout", "2",
               "--num-report", "0", "--verify-candidates", "1", "--verify-near", "0", "--verify-repeats", "1",
               "--local-trials", "0", "--policy-out", str(policy_path)])
    o, e = capsys.readouterr()
    assert rc in (0, 3) and "Traceback" not in e, (rc, o, e)
    assert len(_study(url, "front").trials) == len(study.trials)           # no new trial
    policy = load_policy(policy_path)
    assert list(policy.operating_points) == ["2x", "50x"]
    assert {p.measured["study"] for p in policy.operating_points.values()} == {"front"}
    storage = open_storage(url, heartbeat_interval=1, grace_period=3)
    with pytest.raises(StageVarError, match="'front' has two objectives .* needs one objective"):
        join_study("front", storage, rec, parse_budget("2x"), 0.1, 3, sampler_seed=0)
    join_study("one", storage, rec, parse_budget("2x"), 0.1, 3, sampler_seed=0)
    with pytest.raises(StageVarError, match="'one' has one objective .* needs two objectives"):
        join_study("one", storage, rec, BudgetSet("2x-3x"), 0.1, 3, sampler_seed=0, objectives=2)


def test_a_live_trial_taken_for_lost_does_not_stop_the_worker(tmp_path):
    """A worker whose trial another worker failed as stale (a heartbeat starved for longer than the
    grace period) logs it and goes on; the retry runs; the cap is reached."""
    import optuna
    from optuna.trial import TrialState

    from calibrate.storage import open_storage, retried_trial_number, retry_callback
    from calibrate.study import TaggedObjective, run_trials

    storage = open_storage(f"sqlite:///{tmp_path / 's.db'}", heartbeat_interval=1, grace_period=3)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    calls = []

    def objective(trial):
        x = trial.suggest_float("x", 0, 1)
        calls.append(trial.number)
        if len(calls) == 2:               # another worker decides this trial is lost, meanwhile
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            retry_callback(2)(study, storage.get_trial(trial._trial_id))
        return x

    tagged = TaggedObjective(objective, "me")
    ran = run_trials(study, tagged, total=4, poll_s=0.1)
    trials = study.get_trials(deepcopy=False)
    assert ran == 5
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 4
    assert trials[1].state == TrialState.FAIL
    assert [t.state for t in trials if retried_trial_number(t) == 1] == [TrialState.COMPLETE]


@pytest.mark.parametrize("what", ["wrong_password", "unreachable", "no_database"])
def test_worker_storage_errors_are_one_paragraph(postgres, tmp_path, capsys, what):  # noqa: F811
    from calibrate.cli import main
    from pg import free_port
    url = {"wrong_password": postgres.url_with_password("not-the-pw-123"),
           "unreachable": f"postgresql://stagevar:hunter2-pw@127.0.0.1:{free_port()}/stagevar",
           "no_database": postgres.url.rsplit("/", 1)[0] + "/nodb"}[what]
    secret = {"wrong_password": "not-the-pw-123", "unreachable": "hunter2-pw", "no_database": postgres.password}[what]
    rc = main(["worker", "--storage", url, "--study", "x", "--model", "infinity-tiny", "--budget", "2x", "--trials", "4",
               "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert rc == 1, (out, err)
    text = err.strip()
    assert text.startswith("error:") and "\n" not in text and "Traceback" not in err, err
    assert secret not in err and "***" in err
    assert url.split("@", 1)[1] in err                                # names the server and database
    assert not (tmp_path / "out").exists()                            # failed before loading or measuring anything


# ------------------------------------------------------------------------------------- shards
def _close(a, b, path="", tol=1e-9) -> None:
    """Equal structures, floats within ``tol`` (NaN equals NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, sorted(set(a) ^ set(b)) if isinstance(b, dict) else b)
        for k in a:
            _close(a[k], b[k], f"{path}.{k}", tol)
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]", tol)
    elif isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return
        assert abs(a - b) <= tol, (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_sharded_record_merges_to_the_single_process_record(tmp_path, tiny, tiny_record, one_thread):
    """The module's record (2 prompts in batches of 1) measured again as 2 shards of 1 prompt each:
    the merged record has the key, convergence curves, sensitivity table, spectra, stages and
    spectra arrays of the single process (within 1e-9; on one machine bit-identical); latency
    comes from shard 0 (timings: only its shape is compared)."""
    from calibrate.calibration import record_dir
    from calibrate.record import CalibrationRecord
    from calibrate.shards import measure_shard, merge_records

    single = tiny_record[1]
    prompts, seeds = single.inputs["prompts"], single.inputs["seeds"]
    kw = dict(batch_size=1, settings=tiny_settings(), progress=False)
    dirs = [measure_shard(tiny, prompts, seeds, i, 2, out=tmp_path / f"machine{i}", **kw) for i in (1, 0)]
    merged = merge_records(dirs, out=tmp_path / "merged")
    assert merged.key == single.key
    loaded = CalibrationRecord.load(record_dir(tmp_path / "merged", single.key))
    for rec in (merged, loaded):
        a, b = rec.to_json(), single.to_json()
        for field in ("latency", "latency_check"):
            a.pop(field), b.pop(field)
        _close(a, b)
        _close(a, b, tol=0.0)
        assert set(rec.spectra_arrays) == set(single.spectra_arrays)
        for k, v in single.spectra_arrays.items():
            np.testing.assert_array_equal(rec.spectra_arrays[k], v)
        assert {r["variant"] for r in rec.latency["rows"]} == {r["variant"] for r in single.latency["rows"]}
        assert rec.latency["batch_size"] == 1 and len(rec.latency_check) == 1
        assert rec.stages == single.stages
    # a finished shard is reused, not measured again
    mtime = (dirs[0] / "shard.json").stat().st_mtime_ns
    assert measure_shard(tiny, prompts, seeds, 1, 2, out=tmp_path / "machine1", **kw) == dirs[0]
    assert (dirs[0] / "shard.json").stat().st_mtime_ns == mtime
    # an interrupted shard resumes: finished units are kept, the missing one is measured, same result
    (dirs[0] / "shard.json").unlink()
    lost = dirs[0] / "units" / "sensitivity__k06__cond.json"
    lost.unlink()
    kept = {p: p.stat().st_mtime_ns for p in (dirs[0] / "units").glob("*.json")}
    measure_shard(tiny, prompts, seeds, 1, 2, out=tmp_path / "machine1", **kw)
    assert lost.is_file() and {p: p.stat().st_mtime_ns for p in kept} == kept
    again = merge_records(dirs)
    _close(again.to_json(), merged.to_json(), tol=0.0)


def _fake_shard(tmp_path, index, values, prompt_range, seeds=(0, 1), n=3):
    """A complete shard.json whose per-image values are ``values`` (seed-major within the shard)."""
    import json

    from calibrate.shards import SHARD_FORMAT, SHARD_VERSION
    inputs = {"model": {"model": "fake", "scale_schedule": [[1, 1, 1]] * n}, "num_layers": 2, "prompts": ["a", "b"],
              "seeds": list(seeds), "batch_size": 1, "guidance": 3.0, "device": "x", "device_type": "cpu",
              "dtype": "float32", "settings": {}}
    conv = {"semantic_measure": "coarse_agreement",
            "ssim": [values] * n, "semantic": [values] * n,
            "spectra": [{"scale": 2, "layer": 1, "tokens": 4, "full_rank": 2, "spectrum": [[v, 0.0] for v in values],
                         "ranks": {"0.9": [1] * len(values), "0.95": [1] * len(values), "0.99": [2] * len(values)}}]}
    sens = [{"scale": 2, "variant": "cond", "guidance": "cond_only", "keep": 1.0, "selection": "random_projection",
             "ssim": values, "agree": values, "hf": values, "const": {"score": None, "score_full": None}}]
    d = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "key": "k", "inputs": inputs, "shard_index": index,
         "num_shards": 2, "prompt_range": list(prompt_range), "device_info": {}, "convergence": conv, "sensitivity": sens}
    if index == 0:
        d["latency"], d["latency_check"] = {"rows": [], "overhead_s": 0.0}, []
    path = tmp_path / f"fake{index}.json"
    path.write_text(json.dumps(d))
    return path


def test_merge_uses_the_single_process_order(tmp_path):
    """Means are taken over the images in the single-process order (seed-major, then prompt), so
    even float rounding matches: with values where summation order matters, the shard-major order
    would give 0.5 instead of 0.25."""
    from calibrate.shards import merge_records

    big = 1e16
    # single process: seed 0 -> prompts a, b; seed 1 -> prompts a, b
    s0a, s0b, s1a, s1b = big, 1.0, -big, 1.0
    canonical = float(np.mean(np.array([s0a, s0b, s1a, s1b])))
    shard_major = float(np.mean(np.array([s0a, s1a, s0b, s1b])))
    assert canonical == 0.25 and shard_major != canonical
    rec = merge_records([_fake_shard(tmp_path, 1, [s0b, s1b], (1, 2)), _fake_shard(tmp_path, 0, [s0a, s1a], (0, 1))])
    assert rec.convergence["ssim"] == [canonical] * 3
    assert rec.sensitivity[0]["ssim"] == canonical and rec.sensitivity[0]["quality_worst"] == -big
    assert rec.sensitivity[0]["score"] is None
    assert float(rec.spectra_arrays["scale02_layer01"][0]) == np.float32(canonical)


def test_merge_refuses_incomplete_or_mismatched_shards(tmp_path):
    import json

    from calibrate.shards import SHARD_FORMAT, SHARD_VERSION, merge_records, shard_range
    from stagevar.errors import StageVarError

    def fake(i, n, **inputs):
        d = tmp_path / f"s{i}-{n}-{len(inputs)}"
        d.mkdir()
        (d / "shard.json").write_text(json.dumps({"format": SHARD_FORMAT, "version": SHARD_VERSION, "key": "k",
                                                  "inputs": {"prompts": ["a", "b"], "device": "x", "device_type": "cpu", **inputs},
                                                  "shard_index": i, "num_shards": n, "prompt_range": [i, i + 1]}))
        return d

    with pytest.raises(StageVarError, match="complete set"):
        merge_records([fake(0, 3), fake(2, 3)])
    with pytest.raises(StageVarError, match="other inputs"):
        merge_records([fake(0, 2), fake(1, 2, seeds=[5])])
    with pytest.raises(StageVarError, match="no finished calibration shard"):
        merge_records([tmp_path / "nothing"])
    with pytest.raises(StageVarError, match="fewer shards"):
        shard_range(2, 2, 0, 2)
    assert [shard_range(5, 2, i, 2) for i in range(2)] == [(0, 2), (2, 5)]       # whole batches, uneven
    assert [shard_range(3, 1, i, 3) for i in range(3)] == [(0, 1), (1, 2), (2, 3)]


def test_shard_records_per_scale_guidance_as_measure_does(tmp_path, tiny, one_thread):
    """A per-scale guidance list is accepted by a shard and recorded as ``measure`` records it
    (a list), so the merged record's key matches the single-process one."""
    from calibrate.calibration import record_inputs
    from calibrate.record import content_key
    from calibrate.shards import measure_shard
    n = len(tiny.scale_schedule)
    guidance = [1.0, 1.0] + [3.0] * (n - 2)
    prompts = ["a red circle", "two blue squares"]
    d = measure_shard(tiny, prompts, [0], 1, 2, out=tmp_path, batch_size=1, guidance=tuple(guidance),
                      settings=tiny_settings(), progress=False)
    shard = json.loads((d / "shard.json").read_text())
    assert shard["inputs"]["guidance"] == guidance
    assert shard["key"] == content_key(record_inputs(tiny, prompts, [0], 1, guidance, tiny_settings()))
