"""Crash safety on one machine: ``stagevar-calibrate`` SIGKILLed during the measurement, during the
search, during the local search or verification and between writing the report and the policy; each re-run resumes,
and the last one completes with everything intact and nothing half-written.

The child process is the real command on ``infinity-tiny``; only the default MeasureSettings are
replaced by tiny ones (a subprocess cannot be monkeypatched, so the child patches
``measure``'s keyword default before calling ``main``). Where the kill must land before a given
step, the child is told to stop there (``HOLD_AT``: that function writes a marker and sleeps
until the SIGKILL), so every kill point is reached whatever the machine's speed. Work is bounded
by counts (trials, prompts); the time limits below only stop a hung child.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHILD = """
import importlib, os, sys, time
import calibrate.calibration as c
c.measure.__kwdefaults__["settings"] = c.MeasureSettings(keeps=(0.5,), selections=("random_projection",),
    sensitivity_from=5, guidance_from=5, latency_repeats=1, latency_check_policies=1, stage_images=4)
if os.environ.get("HOLD_AT"):
    module, name = os.environ["HOLD_AT"].rsplit(".", 1)
    def hold(*args, **kwargs):
        open(os.environ["HOLD_MARK"], "w").close()
        time.sleep(3600)
    setattr(importlib.import_module(module), name, hold)
from calibrate.cli import main
raise SystemExit(main(sys.argv[1:]))
"""
TRIALS = 6
LOCAL_TRIALS = 8
HANG_S = 1800.0          # only a hung child takes this long: no assertion depends on the machine's speed


def _journal_states(path: Path) -> dict[int, int]:
    """trial id -> last state written (complete lines only; a torn last line is ignored)."""
    from optuna.storages.journal._storage import JournalOperation
    states: dict[int, int] = {}
    if not path.is_file():
        return states
    for line in path.read_bytes().splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            op = json.loads(line)
        except json.JSONDecodeError:
            break
        if op.get("op_code") == JournalOperation.CREATE_TRIAL:
            states[len(states)] = op.get("state", 0)
        elif op.get("op_code") == JournalOperation.SET_TRIAL_STATE_VALUES:
            states[op["trial_id"]] = op["state"]
    return states


def _complete(path: Path) -> int:
    from optuna.trial import TrialState
    return sum(1 for s in _journal_states(path).values() if s == TrialState.COMPLETE.value)


def _temp_files(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs if d.exists() for p in d.rglob("*") if ".tmp" in p.name or p.name.endswith(".lock"))


def _load_study(journal: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    storage = JournalStorage(JournalFileBackend(str(journal)))
    (name,) = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    return optuna.load_study(study_name=name, storage=storage)


class Child:
    def __init__(self, argv: list[str], log: Path, hold_at: str | None = None):
        self.log = log
        self.f = open(log, "w")
        self.mark = log.with_suffix(".held")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        if hold_at:
            env.update(HOLD_AT=hold_at, HOLD_MARK=str(self.mark))
        self.p = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=self.f, stderr=subprocess.STDOUT, env=env)

    def held(self) -> bool:
        """The child reached its ``hold_at`` function (and sleeps there)."""
        return self.mark.exists()

    def kill_when(self, cond, timeout: float = HANG_S, delay: float = 0.0) -> None:
        """SIGKILL the child as soon as ``cond()`` holds (fails if it exits or times out first)."""
        deadline = time.time() + timeout
        while not cond():
            assert self.p.poll() is None, f"finished before the kill point (rc {self.p.returncode}):\n{self.text()}"
            assert time.time() < deadline, f"kill point not reached in {timeout}s:\n{self.text()}"
            time.sleep(0.02)
        if delay:
            time.sleep(delay)
        assert self.p.poll() is None, f"finished before the kill point (rc {self.p.returncode}):\n{self.text()}"
        self.p.send_signal(signal.SIGKILL)
        assert self.p.wait(timeout=30) == -signal.SIGKILL
        self.f.close()

    def finish(self, timeout: float = HANG_S) -> int:
        rc = self.p.wait(timeout=timeout)
        self.f.close()
        return rc

    def text(self) -> str:
        if not self.f.closed:
            self.f.flush()
        return self.log.read_text(errors="replace")[-4000:]


def test_calibrate_survives_sigkill_at_every_stage(tmp_path):
    from calibrate.record import CalibrationRecord
    from optuna.trial import TrialState
    from stagevar.policy import load_policy

    out = tmp_path / "cal"
    policy_path = tmp_path / "policies" / "tiny.yaml"
    journal = out / "study.journal"
    argv = ["--model", "infinity-tiny", "--num-prompts", "2", "--batch-size", "2", "--num-heldout", "8", "--num-report", "4",
            "--trials", str(TRIALS), "--local-trials", str(LOCAL_TRIALS), "--verify-candidates", "1", "--budget", "1.05x",
            "--out", str(out), "--search-images", "4",
            "--policy-out", str(policy_path), "--threads", "1", "--quiet"]
    units = lambda: sorted(out.glob("calibration-*/units/*.json"))  # noqa: E731

    # 1. during the measurement: after the first unit is written, before the record
    Child(argv, tmp_path / "run1.log").kill_when(lambda: len(units()) >= 1)
    assert not list(out.glob("calibration-*/record.json"))
    before = {p: p.stat().st_mtime_ns for p in units()}
    assert before

    # 2. during the search: after two trials completed
    c = Child(argv, tmp_path / "run2.log")
    c.kill_when(lambda: _complete(journal) >= 2)
    assert {p: p.stat().st_mtime_ns for p in before} == before, "finished units were measured again"
    (rec_dir,) = out.glob("calibration-*/")
    rec = CalibrationRecord.load(rec_dir)
    rec_mtime = (rec_dir / "record.json").stat().st_mtime_ns
    study = _load_study(journal)
    done_before = {t.number: (t.value, t.datetime_complete) for t in study.trials if t.state == TrialState.COMPLETE}
    assert 2 <= len(done_before) < TRIALS

    # 3. after the sampler's trials: during the local search, or at the latest when verification
    #    starts (the child stops there), the policy not written yet
    c = Child(argv, tmp_path / "run3.log", hold_at="calibrate.verify.verify_candidates")
    c.kill_when(lambda: _complete(journal) >= TRIALS or c.held())
    assert not policy_path.exists()

    # 4. while writing: the report and plots are written, the policy is not (the child stops there)
    c = Child(argv, tmp_path / "run4.log", hold_at="calibrate.cli.keep_replaced_policy")
    c.kill_when(c.held)
    assert (rec_dir / "report.md").exists() and not policy_path.exists()

    # 5. to completion
    c = Child(argv, tmp_path / "run5.log")
    rc = c.finish()
    log = c.text()
    assert rc in (0, 3), log
    assert "Traceback" not in log, log
    assert _temp_files(out, policy_path.parent) == []
    assert (rec_dir / "record.json").stat().st_mtime_ns == rec_mtime            # the record was reused ...
    assert CalibrationRecord.load(rec_dir).sha256() == rec.sha256()
    assert {p: p.stat().st_mtime_ns for p in before} == before                 # ... and so were its units
    policy = load_policy(policy_path)
    point = policy.operating_point("1.05x")
    assert point.measured["verified"] is True
    assert policy.provenance["calibration_record"] == rec.key
    assert (rec_dir / "report.md").is_file()
    study = _load_study(journal)
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                and "local_from" not in t.user_attrs]
    assert len(finished) == TRIALS, [(t.number, t.state) for t in study.trials]     # not reset, not run again
    local = [t for t in study.trials if "local_from" in t.user_attrs and t.state == TrialState.COMPLETE]
    assert len(local) <= LOCAL_TRIALS and len({json.dumps(t.params, sort_keys=True) for t in local}) == len(local)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]          # killed trials were re-queued
    for number, (value, when) in done_before.items():                             # trials before the kill are kept
        t = study.trials[number]
        assert (t.state, t.value, t.datetime_complete) == (TrialState.COMPLETE, value, when)
    # the trial killed in step 2 stays RUNNING in the journal (no heartbeat in a journal study); it
    # is not counted as done, so another trial replaced it
    assert sum(t.state == TrialState.RUNNING for t in study.trials) <= 1
    # the FastVAR-like seed (it skips scales) is enqueued only where this machine's latency table says
    # no plan computing every scale meets the target (on the tiny model the cheapest such plan is
    # close to 1.05x, so either may happen); budget-fitted seeds follow only where it says the
    # paper-like one misses the target
    from calibrate.measure.latency import LatencyModel
    from calibrate.search import LATENCY_MARGIN, skipping_allowed
    lm = LatencyModel.of_record(rec, rec.inputs["num_layers"])
    tokens = [a * b * c for a, b, c in rec.inputs["model"]["scale_schedule"]]
    skips = skipping_allowed(rec, lm, tokens, lm.baseline(tokens) / 1.05 * (1 - LATENCY_MARGIN))
    fixed = ["identity", "paper-like"] + (["fastvar-like"] if skips else [])
    seeds = list(dict.fromkeys(t.user_attrs.get("seed_policy") for t in study.trials if t.user_attrs.get("seed_policy")))
    assert seeds[:len(fixed)] == fixed and all(s.startswith("fitted:") for s in seeds[len(fixed):]), (seeds, skips)


def test_torn_journal_line_is_repaired(tmp_path):
    """A write cut short (SIGKILL in the middle of a large append, a full disk, a power loss) leaves
    a torn last line. Optuna skips it when reading, but the next append is glued onto it and the
    resumed run crashes; :func:`calibrate.storage.repair_journal` truncates it first."""
    import warnings

    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from calibrate.storage import repair_journal

    path = tmp_path / "study.journal"
    storage = lambda: JournalStorage(JournalFileBackend(str(path)))  # noqa: E731
    objective = lambda t: t.suggest_float("x", 0, 1)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        optuna.create_study(study_name="s", storage=storage()).optimize(objective, n_trials=2)
        good = path.read_bytes()
        assert repair_journal(path) is False and path.read_bytes() == good
        with open(path, "ab") as f:
            f.write(b'{"op_code":4,"worker_id":"w","study_id":0,"datetime_st')
        broken = tmp_path / "broken.journal"
        broken.write_bytes(path.read_bytes())
        # without the repair the resumed run fails
        with pytest.raises(Exception):
            study = optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(broken))))
            study.optimize(objective, n_trials=1)
            optuna.load_study(study_name="s", storage=JournalStorage(JournalFileBackend(str(broken)))).trials
        # with it, it resumes
        assert repair_journal(path) is True
        assert path.read_bytes() == good
        study = optuna.load_study(study_name="s", storage=storage())
        study.optimize(objective, n_trials=1)
        assert [t.state.name for t in optuna.load_study(study_name="s", storage=storage()).trials] == ["COMPLETE"] * 3
