"""One Optuna study shared by many worker processes: joining it (exactly one process creates and
seeds it; the others check that it was made for their record and budget), counting its trials,
running trials up to the cap while lost trials are retried, and giving a trial back on Ctrl-C or
SIGTERM."""
from __future__ import annotations

import hashlib
import logging
import os
import signal
import socket
import time
import warnings

from calibrate.storage import retried_trial_number, retry_callback
from stagevar.errors import StageVarError

log = logging.getLogger("stagevar.calibrate.worker")

#: the study's user attribute naming the record (key and SHA-256), budget and model it was made for
STUDY_ATTR = "stagevar"


def study_info(record, budget, budget_s: float, model_name: str | None, trials: int, images: int | None) -> dict:
    """What a study stores about the search it holds (:data:`STUDY_ATTR`); ``images``: how many
    images a trial may be measured on (``--search-images``)."""
    from calibrate.search import SEARCH_SPACE
    return {"record_key": record.key, "record_sha256": record.sha256(), "budget": budget.name, "budget_s": budget_s,
            "model": model_name, "trials": trials, "search_images": images, "search_space": SEARCH_SPACE}


def check_study_record(name: str, theirs: dict | None, record, hint: str, images: int | None = None) -> None:
    """Refuse a study made with another calibration record, in another version of the search space
    (:data:`calibrate.search.SEARCH_SPACE`), or whose trials are measured on another number of
    images (``--search-images``): its trials are not comparable. One paragraph naming
    both, ending (for the record) with ``hint``, what to do."""
    if theirs and theirs.get("record_sha256") not in (None, record.sha256()):
        their_sha, my_sha = str(theirs.get("record_sha256"))[:16], record.sha256()[:16]
        if theirs.get("record_key") == record.key:
            raise StageVarError(
                f"study {name!r} was searched with calibration record {record.key} (sha256 {their_sha}); this run's "
                f"record has the same key but other content (sha256 {my_sha}): it was measured on another machine "
                "(other latencies) or its stages were derived by another version of stagevar, so the study's trials "
                f"are not comparable. {hint}")
        raise StageVarError(
            f"study {name!r} was searched with calibration record {theirs.get('record_key')} (sha256 {their_sha}), but "
            f"this run's record is {record.key} (sha256 {my_sha}). {hint}")
    from calibrate.search import SEARCH_SPACE
    space = (theirs or {}).get("search_space", 1 if theirs else SEARCH_SPACE)    # studies before the version: 1
    if space != SEARCH_SPACE:
        raise StageVarError(f"study {name!r} was searched in version {space} of the search space, this stagevar "
                            f"searches version {SEARCH_SPACE} (the parameters mean other policies): pass another "
                            "--study name (or remove the study) to search again.")
    have = (theirs or {}).get("search_images")
    if have is not None and images is not None and have != images:
        raise StageVarError(f"study {name!r} measures its trials on up to {have} images, this run on {images} "
                            f"(--search-images): pass --search-images {have}, or another --study name.")


def open_owned_study(name: str, storage, record, budget, budget_s: float, model_name: str, trials: int, seed: int,
                     images: int | None = None, objectives: int = 1):
    """Open (or create) the study of a single-process search and check that it was searched with
    this calibration record and has ``objectives`` objectives (one budget: quality; several:
    quality and latency)."""
    from calibrate.search import open_study
    study = open_study(name, storage, direction_multi=objectives > 1, seed=seed)
    check_objectives(name, study, objectives)
    theirs = study.user_attrs.get(STUDY_ATTR)
    check_study_record(name, theirs, record, "Run on the machine and with the options that measured the record (same "
                       "--out, prompts, seeds, device), or pass another --study name (or remove the study) to search "
                       "again with this record.", images)
    if not theirs:
        study.set_user_attr(STUDY_ATTR, study_info(record, budget, budget_s, model_name, trials, images))
    return study


#: what a study of one budget (one objective) and of several (two) optimise, for messages
OBJECTIVES = {1: "one objective (quality under one budget)", 2: "two objectives (quality and latency, several budgets)"}


def check_objectives(name: str, study, objectives: int) -> None:
    """Refuse a study with another number of objectives than this search's (one budget: 1;
    several: 2): one paragraph naming both."""
    have = len(study.directions)
    if have != objectives:
        raise StageVarError(f"study {name!r} has {OBJECTIVES.get(have, have)}, but this search needs "
                            f"{OBJECTIVES[objectives]}: pass another --study name.")


def join_study(name: str, storage, rec, budget, budget_s: float, trials: int, sampler_seed: int, wait_s: float = 120.0,
               fitted: dict | None = None, allow_skip: bool = True, images: int | None = None, objectives: int = 1):
    """Create the study (exactly one process succeeds) or load it; check that it was made for the
    same record and budget (``budget``: one budget, or the :class:`calibrate.budget.BudgetSet` of
    several, whose study has ``objectives=2``); enqueue the seed policies once (with the
    budget-fitted seeds ``fitted``, as :func:`calibrate.seeds.fitted_seeds` makes them; those that
    skip scales only with ``allow_skip``)."""
    import optuna
    from calibrate.search import search_pruner
    from calibrate.seeds import enqueue_seeds

    info = study_info(rec, budget, budget_s, rec.inputs["model"].get("model"), trials, images)
    directions = ["maximize", "minimize"][:objectives]
    try:
        optuna.create_study(study_name=name, storage=storage, directions=directions, load_if_exists=False)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        created = False
    sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=10, multivariate=True, constant_liar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler,
                                  pruner=search_pruner() if objectives == 1 else None)
    check_objectives(name, study, objectives)
    if created:
        study.set_user_attr(STUDY_ATTR, info)
        enqueue_seeds(study, rec, fitted=fitted, limit=trials, allow_skip=allow_skip)
        log.info("created study %s", name)
        return study
    deadline = time.time() + wait_s
    while not study.user_attrs.get("seeded"):   # the creator sets it after the record info and the seed trials
        if time.time() > deadline:            # the creator died before seeding: take over
            log.warning("study %s has no seed trials after %.0fs; enqueueing them", name, wait_s)
            if STUDY_ATTR not in study.user_attrs:
                study.set_user_attr(STUDY_ATTR, info)
            enqueue_seeds(study, rec, fitted=fitted, limit=trials, allow_skip=allow_skip)
            break
        time.sleep(0.5)
    theirs = study.user_attrs.get(STUDY_ATTR)
    if theirs is None:
        log.warning("study %s was not created by a worker: cannot check that it uses record %s", name, rec.key)
    else:
        check_study_record(name, theirs, rec, "Every worker must use the same record: pass --record with the record "
                           "the study was started with (copy its directory to this machine), or use another --study name.",
                           images)
        if theirs.get("budget") != budget.name:
            raise StageVarError(f"study {name!r} searches budget {theirs.get('budget')}, not {budget.name}. "
                                "Use the same --budget for every worker of a study, or another --study name.")
    return study


def study_counts(study) -> dict[str, int]:
    from optuna.trial import TrialState

    from calibrate.search import is_local
    c = {"complete": 0, "pruned": 0, "fail": 0, "running": 0, "waiting": 0, "retry_waiting": 0}
    for t in study.get_trials(deepcopy=False):
        if is_local(t):                         # the coordinator's local search, not the sampler's trials
            continue
        if t.state == TrialState.COMPLETE:
            c["complete"] += 1
        elif t.state == TrialState.PRUNED:
            c["pruned"] += 1
        elif t.state == TrialState.FAIL:
            c["fail"] += 1
        elif t.state == TrialState.RUNNING:
            c["running"] += 1
        elif t.state == TrialState.WAITING:
            c["waiting"] += 1
            if retried_trial_number(t) is not None:
                c["retry_waiting"] += 1
    c["finished"] = c["complete"] + c["pruned"]
    return c


def run_trials(study, objective, total: int, poll_s: float = 2.0, on_trial=None) -> int:
    """Run trials until the study holds ``total`` finished trials, no trial is running and no retry
    is waiting. Returns the number of trials this process ran."""
    import optuna
    from optuna.storages import fail_stale_trials

    ran = 0
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fail_stale_trials(study)              # lost trials -> FAIL + a WAITING retry
        c = study_counts(study)
        if c["finished"] >= total and c["running"] == 0 and c["retry_waiting"] == 0:
            return ran
        if c["retry_waiting"] or c["finished"] + c["running"] < total:
            if hasattr(objective, "last_trial"):
                objective.last_trial = None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.optimize(objective, n_trials=1, gc_after_trial=False, show_progress_bar=False)
            except Exception as exc:  # noqa: BLE001
                number = getattr(objective, "last_trial", None)
                if number is None or not _taken_for_lost(study, number, exc):
                    raise
                log.warning("trial %d was taken for lost by another worker (no heartbeat got through for "
                            "--grace-period seconds) and re-queued; its result is discarded. Raise --grace-period "
                            "if this repeats.", number)
            ran += 1
            if on_trial is not None:
                on_trial(study)
        else:
            time.sleep(poll_s)                    # the last trials run elsewhere: wait (and watch for lost ones)


def _taken_for_lost(study, number: int, exc: BaseException) -> bool:
    """Did ``exc`` come from reporting a trial that another worker had meanwhile failed as stale
    (rather than from the objective)?"""
    import optuna
    from optuna.trial import TrialState
    trials = study.get_trials(deepcopy=False)
    mine = next((t for t in trials if t.number == number), None)
    if mine is None or mine.state != TrialState.FAIL:
        return False
    if any(t.system_attrs.get("retry_history", [])[-1:] == [number] for t in trials):
        return True
    return isinstance(exc, optuna.exceptions.UpdateFinishedTrialError) or (
        isinstance(exc, (AssertionError, ValueError)) and ("Should not reach" in str(exc) or "Cannot tell" in str(exc)))


def sampler_seed(base: int, index: int) -> int:
    h = hashlib.sha256(f"{base}:{socket.gethostname()}:{os.getpid()}:{index}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


class TaggedObjective:
    """The search objective, tagging each trial with the worker that runs it."""

    def __init__(self, objective, worker: str):
        self.objective, self.worker = objective, worker
        self.last_trial: int | None = None

    def __call__(self, trial):
        self.last_trial = trial.number
        trial.set_user_attr("worker", self.worker)
        return self.objective(trial)


def sigterm_as_interrupt():
    """SIGTERM (a scheduler's polite kill) behaves like Ctrl-C: the running trial is re-queued at
    once instead of after the grace period. Returns the previous handler (None: not installed)."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def requeue_interrupted(study, number: int | None) -> None:
    """Ctrl-C: Optuna marks the running trial FAIL; queue it again (as a lost trial would be)."""
    if number is None:
        return
    try:
        from optuna.trial import TrialState
        t = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if t is not None and t.state == TrialState.FAIL:
            storage = study._storage
            cb = None
            get = getattr(storage, "get_heartbeat_stale_trial_callback", None) or getattr(storage, "get_failed_trial_callback", None)
            if get is not None:
                cb = get()
            (cb or retry_callback(2))(study, t)
    except Exception:  # noqa: BLE001 - best effort on the way out
        log.debug("could not re-queue trial %s", number, exc_info=True)
