"""The calibration pipeline as a Python API: measure -> search -> verify -> policy.

    from stagevar import load_model
    from calibrate.pipeline import calibrate

    model = load_model("infinity-mini")
    result = calibrate(model, "3x", prompts, seeds=[0], heldout=heldout, out="runs/cal")
    result.policy.save("my-policy.yaml")

:func:`calibrate` runs the whole pass (``stagevar-calibrate`` is this call with arguments parsed
and results printed); its steps are :func:`calibrate.calibration.measure` (the record),
:func:`search` (one Optuna study for all budgets, then each budget's local search) and :func:`verify` (the
candidates re-measured end to end on held-out prompts, the chosen one measured again on a report
set). Everything it writes lives in ``out``: the record, the report and, unless another Optuna
storage is given, the study journal; killing a run and calling it again resumes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

from calibrate.search import LATENCY_MARGIN
from calibrate.verify import SELECTION_IMAGES
from calibrate.study import open_owned_study
from stagevar.errors import StageVarError

log = logging.getLogger("stagevar.calibrate")

@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """How hard the search and the verification work (the CLI's options of the same names)."""

    trials: int = 60                       # sampler trials per budget, enqueued seeds included
    local_trials: int = 30                 # local-search trials per budget after the sampler
    search_images: int = 32                # images a trial that ranks in the top quarter is measured on
    seed: int = 0                          # the sampler's seed
    latency_margin: float = LATENCY_MARGIN  # aim this fraction under each budget's latency
    verify_candidates: int = 5             # best feasible trials re-measured end to end
    verify_near: int = 2                   # and best trials predicted up to 10% over the target
    verify_repeats: int = 5                # timed rounds of the verification latency
    selection_images: int = SELECTION_IMAGES  # most images the race compares a contender on (calibrate.verify.race)
    study: str | None = None               # study name (default: model, budget and record key)

    def check(self) -> None:
        """A clear error naming the first setting out of range (by its CLI option)."""
        for name, low in (("trials", 1), ("verify_repeats", 1), ("local_trials", 0), ("verify_candidates", 1),
                          ("verify_near", 0), ("search_images", 1), ("selection_images", 1)):
            if getattr(self, name) < low:
                raise StageVarError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}.")
        if not 0.0 <= self.latency_margin < 0.5:
            raise StageVarError(f"--latency-margin must be in [0, 0.5), got {self.latency_margin} (0.03 aims 3% under "
                                "the budget).")

    @classmethod
    def for_model(cls, name: str, **given) -> "SearchSettings":
        """The settings model ``name``'s registry entry asks for (``calibration``: a model that
        is slow to generate asks for fewer trials), with ``given`` on top, else the defaults."""
        from stagevar.models.registry import calibration_defaults
        asked = calibration_defaults(name)
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**{k: v for k, v in asked.items() if k in fields}, **given})


@dataclasses.dataclass
class Searched:
    """One budget after the search: its target (the budget less the margin), latency (``budget_s``),
    whether its plans may skip scales, and the study and objective that searched it (several
    budgets share one study: ``label`` names its budgets)."""

    budget: Any
    target_s: float
    name: str
    study: Any
    objective: Any
    budget_s: float
    allow_skip: bool
    label: str


@dataclasses.dataclass
class CalibrationResult:
    """What :func:`calibrate` produced. ``infeasible``: (budget, best verified speedup) of each
    budget no candidate met (its operating point is written, marked ``feasible: false``)."""

    policy: Any
    record: Any
    record_dir: Path
    report: Path
    trials: list[dict[str, Any]]
    chosen_trials: dict[str, dict[str, Any]]
    infeasible: list[tuple[str, float]]
    seconds: float
    scorer: Any


def default_study_name(model, budget, record, study: str | None, several: bool, sets: int = 1) -> str:
    """``--study`` (with the budget when there are several), or model, resolution, budget, record
    key, the version of the search space (``s2``: a study of an earlier version is not resumed
    after an upgrade, a new one starts) and, when trials are measured on more than the record's
    images, the number of image sets."""
    from calibrate.search import SEARCH_SPACE
    if study:
        return f"{study}.{budget.name}" if several else study
    return (f"{model.name}.{model.resolution}.{budget.name}.{record.key}.s{SEARCH_SPACE}"
            + (f".x{sets}" if sets > 1 else ""))


def journal_storage(path: Path):
    """The default storage: an Optuna journal file (a torn last line from a kill is repaired first)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    from calibrate.storage import repair_journal
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = Path(str(path) + ".lock")
    if os.path.lexists(lock):            # held only for the instant of a write: still there a second later = stale
        time.sleep(1.0)
        if os.path.lexists(lock):
            log.info("removing the stale lock %s left by a killed run", lock)
            lock.unlink(missing_ok=True)
    if path.exists():
        repair_journal(path)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def requeue_stale(study) -> None:
    """Trials left RUNNING by a killed single-writer run are marked failed and queued again."""
    import warnings

    import optuna
    from optuna.trial import TrialState
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # "experimental" notice of the retry callback
        cb = optuna.storages.RetryHeartbeatStaleTrialCallback() if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback") \
            else optuna.storages.RetryFailedTrialCallback()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        cb(study, study._storage.get_trial(t._trial_id))
        log.info("trial %d was interrupted: queued again", t.number)


def search(model, record, subject, budgets, scorer, storage, *, settings: SearchSettings = SearchSettings(),
           warm_start=None, single_writer: bool = True, progress: bool = True) -> tuple[list[Searched], list, dict]:
    """The Optuna search (resumed where it stopped), then the local search from the best trials.

    One budget: one study, quality maximised under the latency constraint. Several budgets: one
    study for all of them (a plan's quality does not depend on the budget), quality and predicted
    latency as its two objectives over the budgets' latency range, ``--trials`` x budgets trials,
    the seeds of every budget; then each budget's local search climbs toward its own target in
    that study. Every measured trial (same record, so comparable quality; absolute predicted
    latency) competes for every budget. Returns (one :class:`Searched` per budget, the pooled
    measured trials, id(trial) -> (study name, the budgets it searched))."""
    from calibrate.budget import BudgetSet
    from calibrate.measure.latency import LatencyModel
    from calibrate.candidates import local_search, measured_trials
    from calibrate.search import Objective, objective_sets, skipping_allowed
    from calibrate.seeds import params_for_point

    lat_model = LatencyModel.of_record(record, model.num_layers)
    tokens = model.tokens_per_scale()
    baseline_pred = lat_model.baseline(tokens)
    sets = objective_sets(subject, scorer, settings.search_images)
    warm_points = dict(warm_start.operating_points) if warm_start is not None else {}
    warm_params = [p for p in (params_for_point(record, pt) for pt in warm_points.values()) if p is not None]
    budgets_s = [b.target_seconds(baseline_pred) for b in budgets]
    label = BudgetSet.of(budgets)
    name = default_study_name(model, label, record, settings.study, False, len(sets))
    study = open_owned_study(name, storage, record, label, max(budgets_s), model.name, settings.trials, settings.seed,
                             settings.search_images, objectives=2 if len(budgets) > 1 else 1)
    if single_writer:
        requeue_stale(study)            # a journal study has one writer: RUNNING trials were killed
    objective = Objective.for_budgets(record, subject, lat_model, budgets_s, scorer, sets, settings.latency_margin)
    _run_sampler(study, objective, record, lat_model, tokens, budgets, budgets_s, warm_points, warm_params, settings,
                 progress)
    margin = settings.latency_margin
    searched = [Searched(b, b_s * (1 - margin), name, study, objective, b_s,
                         skipping_allowed(record, lat_model, tokens, b_s * (1 - margin)), label.name)
                for b, b_s in zip(budgets, budgets_s)]
    pooled = list(measured_trials(study))
    found_by = {id(t): (name, label.name) for t in pooled}
    if settings.local_trials:
        for sd in searched:
            log.info("budget %s: local search (up to %d trials)", sd.budget.name, settings.local_trials)
            for t in local_search(study, objective, record, pooled, sd.target_s, settings.local_trials, progress=progress,
                                  allow_skip=sd.allow_skip):
                pooled.append(t)
                found_by[id(t)] = (name, label.name)
    return searched, pooled, found_by


def _run_sampler(study, objective, record, lat_model, tokens, budgets, budgets_s, warm_points, warm_params,
                 settings: SearchSettings, progress: bool) -> None:
    """Seed the study (the baselines, each budget's fitted seeds, a warm start's points) and run the
    sampler up to ``--trials`` x budgets finished trials."""
    import optuna

    from calibrate.search import drop_queued_seeds, is_local
    from calibrate.seeds import enqueue_seeds, fitted_seeds

    fitted = fitted_seeds(record, lat_model, tokens, budgets, budgets_s, settings.latency_margin, warm_params)
    total = settings.trials * len(budgets)
    left_out = enqueue_seeds(study, record, warm_points, fitted=fitted, limit=total, allow_skip=objective.allow_skip)
    if left_out:
        log.warning("warm start: operating point(s) %s lie outside this search space and were left out",
                    ", ".join(left_out))
    # failed trials do not count: an interrupted one was queued again and its retry takes its place
    done = len([t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
                and not is_local(t)])
    remaining = max(0, total - done)
    if remaining:
        log.info("budget%s %s: %d trials (%d already in study %s)", "s" if len(budgets) > 1 else "",
                 ", ".join(b.name for b in budgets), remaining, done, study.study_name)
        study.optimize(objective, n_trials=remaining, show_progress_bar=progress, gc_after_trial=False)
    drop_queued_seeds(study)


def verify(model, record, searched: Sequence[Searched], pooled, found_by, scorer, held_subject, report_subject=None, *,
           settings: SearchSettings = SearchSettings(), progress: bool = True):
    """Per budget: the candidates re-measured end to end on ``held_subject``, the winner measured
    again on ``report_subject``. Returns (operating points, chosen trials, all trials, infeasible)."""
    import optuna

    from calibrate.candidates import verification_candidates
    from calibrate.search import INFEASIBLE_MARGIN, point_from_params, quality_of, summarize_trial
    from calibrate.verify import verify_candidates
    from stagevar.policy import OperatingPoint

    points, chosen, trials, infeasible = {}, {}, [], []
    cache: dict[str, Any] = {}
    listed: set[int] = set()
    for sd in searched:
        budget = sd.budget
        cand_points = verification_candidates(record, pooled, sd.target_s, settings.verify_candidates, settings.verify_near,
                                              allow_skip=sd.allow_skip, near_s=sd.budget_s * INFEASIBLE_MARGIN,
                                              cushion_s=sd.target_s * (1 - settings.latency_margin))
        if not cand_points:
            # best effort: the measured trial with the lowest predicted latency
            done_trials = [t for t in sd.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))]
            best_effort = sorted(done_trials, key=lambda t: t.user_attrs.get("predicted_latency_s", float("inf")))[:1]
            cand_points = [(t, point_from_params(record, t.params)) for t in best_effort]
        trial, point, measured = verify_candidates(model, held_subject, cand_points, budget, scorer, cache,
                                                   repeats=settings.verify_repeats, progress=progress,
                                                   report_subject=report_subject,
                                                   selection_images=settings.selection_images)
        study_name, study_budget = found_by.get(id(trial), (sd.name, sd.label))
        measured.update({"budget": budget.name, "predicted_latency_s": trial.user_attrs.get("predicted_latency_s"),
                         "calibration_quality": quality_of(trial), "trial": trial.number, "study": study_name})
        if not measured["feasible"]:
            infeasible.append((budget.name, measured["speedup"]))
        points[budget.name] = OperatingPoint(point.stages, point.plans, measured)
        chosen[budget.name] = {"study_budget": study_budget, "number": trial.number}
        if id(sd.study) not in listed:             # a study of several budgets is listed once
            listed.add(id(sd.study))
            trials += [dict(summarize_trial(t), budget=sd.label) for t in sd.study.get_trials(deepcopy=False)
                       if t.values is not None]
    return points, chosen, trials, infeasible


def measured_stages(rec) -> dict[str, list[int] | None]:
    """The stages the calibration pass found (the record's), for a policy's provenance: an
    operating point's own ``stages`` name the scales its plan leaves untouched and may start
    earlier (a plan may drop guidance inside the measured semantic stage where the sensitivity
    pass found it harmless)."""
    from stagevar.policy import stage_ranges
    return stage_ranges(rec.stages)


def calibrate(model, budgets, prompts: Sequence[str], seeds: Sequence[int] = (0,), *, heldout: Sequence[str],
              report_prompts: Sequence[str] = (), out: str | Path = "runs/calibration", batch_size: int = 8,
              guidance=None, scorer=None, engine: str | None = None, storage=None, storage_label: str | None = None,
              warm_start=None, settings: SearchSettings | None = None, progress: bool = True) -> CalibrationResult:
    """Measure ``model`` on ``prompts`` x ``seeds``, search a plan per budget (``"3x"``,
    ``"2x,3x,4x"``, ``"700ms"`` or :class:`calibrate.budget.Budget` objects), verify on
    ``heldout`` (and measure the winner on ``report_prompts`` with the seeds + 1000) and return
    the policy, unsaved, with the record and report written into ``out``.

    ``scorer``: how images are compared (default: the model's own, :func:`calibrate.metrics.build_scorer`).
    ``storage``: an Optuna storage (default: a journal file in ``out``, whose interrupted trials
    are queued again); ``storage_label`` names it in the policy's provenance (credentials
    redacted by the caller). ``warm_start``: an earlier :class:`stagevar.policy.Policy` whose
    operating points are tried first. ``settings`` None: the model's own
    (:meth:`SearchSettings.for_model`)."""
    import optuna

    from calibrate.calibration import measure, record_dir, weights_hash
    from calibrate.measure.common import Subject
    from calibrate.metrics import build_scorer
    from calibrate.report import write_report
    from calibrate.budget import parse_budgets
    from calibrate.verify import REPORT_SEED_OFFSET
    from stagevar.policy import Policy, base_provenance, binding_for

    budgets = parse_budgets(budgets) if isinstance(budgets, str) else list(budgets)
    settings = settings or SearchSettings.for_model(model.name)
    settings.check()
    prompts, seeds, heldout, report_prompts = list(prompts), list(seeds), list(heldout), list(report_prompts)
    if warm_start is not None:
        warm_start.check_compatible(model)
    scorer = scorer if scorer is not None else build_scorer(model.name, device=model.device)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.time()
    out = Path(out)
    rec = measure(model, prompts, seeds, out=out, batch_size=batch_size, guidance=guidance, progress=progress,
                  engine=engine, scorer=scorer)
    single_writer = storage is None
    if storage is None:
        storage = journal_storage(out / "study.journal")
    engine = rec.inputs["engine"]
    subject = Subject(model, prompts, seeds, batch_size, guidance, engine=engine)
    searched, pooled, found_by = search(model, rec, subject, budgets, scorer, storage, settings=settings,
                                        warm_start=warm_start, single_writer=single_writer, progress=progress)
    held = Subject(model, heldout, seeds, batch_size, guidance, engine=engine)
    report_subject = Subject(model, report_prompts, [s + REPORT_SEED_OFFSET for s in seeds], batch_size, guidance,
                             engine=engine) if report_prompts else None
    points, chosen, trials, infeasible = verify(model, rec, searched, pooled, found_by, scorer, held, report_subject,
                                                settings=settings, progress=progress)
    policy = Policy(model=binding_for(model), operating_points=points, default=budgets[0].name, provenance=base_provenance(
        model=model.name, device=rec.inputs["device"], device_type=rec.inputs["device_type"], dtype=rec.inputs["dtype"],
        batch_size=batch_size, guidance=rec.inputs["guidance"], engine=engine,
        weights_sha256=weights_hash(model), calibrated=True,
        calibration_record=rec.key, calibration_record_sha256=rec.sha256()[:16], measured_stages=measured_stages(rec),
        calibration_prompts=len(prompts),
        verification_prompts=len(heldout), report_prompts=len(report_prompts), seeds=seeds, metrics=scorer.describe(),
        optuna_storage=storage_label or ("journal file in --out" if single_writer else "given storage"),
        optuna_sampler_seed=settings.seed, trials_per_budget=settings.trials))
    rdir = record_dir(out, rec.key)
    search_info = {"points": {k: v.to_dict() for k, v in points.items()}, "trials": trials, "chosen_trials": chosen}
    report = write_report(rec, rdir, search_info, metric_cost=scorer.metric_cost())
    return CalibrationResult(policy=policy, record=rec, record_dir=rdir, report=report, trials=trials, chosen_trials=chosen,
                             infeasible=infeasible, seconds=time.time() - t0, scorer=scorer)
