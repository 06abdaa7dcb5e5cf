"""From a study's trials to what verification measures: measured trials ranked by quality within a
predicted latency, distinct operating points, the local search that hill-climbs from the best
trial through one-move neighbours, and the quality-latency front."""
from __future__ import annotations

import json
import math
from typing import Any

import optuna

from calibrate.record import CalibrationRecord
from calibrate.search import (INFEASIBLE_MARGIN, KEEPS, LOCAL_ATTR, RESTORES, SELECTIONS, Objective, guidance_floor,
                              is_local, point_from_params, quality_of, search_bounds)
from stagevar.policy import OperatingPoint


def feasible_ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete, measured (not estimated), feasible trials, best quality first."""
    from optuna.study._constrained_optimization import _get_feasible_trials
    return _best_first(_get_feasible_trials(measured_trials(study)))


def _best_first(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Best quality first; among equals, the lowest predicted latency."""
    return sorted(trials, key=lambda t: (-quality_of(t), t.user_attrs.get("predicted_latency_s", math.inf)))


def measured_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete trials whose quality was measured (not estimated from the sensitivities) on every
    image set (in a study of several budgets, not ``stopped_early``: a pruned trial's equal)."""
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if not t.user_attrs.get("quality_estimated", False) and not t.user_attrs.get("stopped_early", False)]


def ranked_within(trials: list[optuna.trial.FrozenTrial], budget_s: float, low: float = 0.0,
                  high: float = 1.0) -> list[optuna.trial.FrozenTrial]:
    """Trials predicted in ``(budget_s * low, budget_s * high]``, best quality first. The predicted
    latency is absolute, so trials of another budget's study on the same record rank here too."""
    return _best_first([t for t in trials
                        if budget_s * low < t.user_attrs.get("predicted_latency_s", math.inf) <= budget_s * high])


def verification_candidates(record: CalibrationRecord, trials: list[optuna.trial.FrozenTrial], budget_s: float, k: int,
                            k_near: int, allow_skip: bool = True, near_s: float | None = None,
                            cushion_s: float | None = None) -> list[tuple]:
    """What verification re-measures for one budget, from measured ``trials`` (this budget's study
    and the other studies of the run, all on the same record): the ``k`` best distinct trials
    predicted within ``budget_s`` (the target: the budget less the latency margin), then the
    ``k_near`` best distinct ones predicted above it but within ``near_s`` (default
    ``INFEASIBLE_MARGIN`` over ``budget_s``; the calibrate command passes that margin over the
    budget itself: the latency model's error band, where verification measures the real latency
    and keeps a plan only if it meets the budget), never the same policy twice; without
    ``allow_skip`` (:func:`skipping_allowed`), no policy that skips a scale (another budget's study
    may have found some). With ``cushion_s`` (below ``budget_s``), when none of the ``k`` is
    predicted within it, the last of them gives its place to the best distinct trial that is: the
    best trials crowd the target, and where the latency model reads a few percent fast on the day
    (measured: 1-7% in runs of the 2-core VM), every one of them misses the budget."""
    if not allow_skip:
        trials = [t for t in trials if not any(p.skip for p in point_from_params(record, t.params).plans)]
    strict = distinct_candidates(record, ranked_within(trials, budget_s), k)
    if cushion_s is not None and strict and \
            not any(t.user_attrs.get("predicted_latency_s", math.inf) <= cushion_s for t, _ in strict):
        kept = strict[:k - 1] if len(strict) >= k else strict      # the last place is given up only when full
        keys = {_plan_key(pt) for _, pt in kept}
        safe = [(t, pt) for t, pt in distinct_candidates(record, ranked_within(trials, cushion_s), k)
                if _plan_key(pt) not in keys][:1]
        if safe:
            strict = kept + safe
    if k_near <= 0:
        return strict
    seen = {_plan_key(point) for _, point in strict}
    high = (near_s if near_s is not None else budget_s * INFEASIBLE_MARGIN) / budget_s
    near_ranked = ranked_within(trials, budget_s, 1.0, high)
    near = [(t, pt) for t, pt in distinct_candidates(record, near_ranked, k_near + len(strict))
            if _plan_key(pt) not in seen][:k_near]
    return strict + near


def _plan_key(point: OperatingPoint) -> str:
    return json.dumps([p.to_dict() for p in point.plans], sort_keys=True)


def distinct_candidates(record: CalibrationRecord, ranked: list[optuna.trial.FrozenTrial], k: int) -> list[tuple]:
    """The first ``k`` trials of ``ranked`` that describe different operating points, with their
    points. Different parameters can give the same policy (a skipped scale's keep ratio, the
    selection of a scale computed in full, ...), and TPE re-proposes good points, so without this
    identical policies would take verification slots."""
    out, seen = [], set()
    for t in ranked:
        point = point_from_params(record, t.params)
        key = _plan_key(point)
        if key in seen:
            continue
        seen.add(key)
        out.append((t, point))
        if len(out) == k:
            break
    return out


# ----------------------------------------------------------------------------------------- local search


def neighbours(record: CalibrationRecord, params: dict[str, Any], allow_skip: bool = True) -> list[dict[str, Any]]:
    """Every parameter set one move away from ``params``: a keep ratio one notch up or down, another
    token selection at one scale, the first accelerated scale / guidance-drop scale / first skipped
    scale / first pruned layer moved by one, or the other restoration. Moves stay in the space
    (without ``allow_skip``, nothing is skipped)."""
    lo, n = search_bounds(record)
    top_layer = max(0, record.inputs["num_layers"] // 4)
    out = []
    for name, low, high in (("first_accelerated", lo, n), ("cond_only_from", guidance_floor(record), n),
                            ("skip_from", lo if allow_skip else n, n),
                            ("layer_start", 0, top_layer)):
        out += [dict(params, **{name: params[name] + d}) for d in (-1, 1) if low <= params[name] + d <= high]
    out += [dict(params, restore=r) for r in RESTORES if r != params["restore"]]
    for k in range(lo, n):
        i = KEEPS.index(params[f"keep_{k}"])
        out += [dict(params, **{f"keep_{k}": KEEPS[j]}) for j in (i - 1, i + 1) if 0 <= j < len(KEEPS)]
        out += [dict(params, **{f"selection_{k}": s}) for s in SELECTIONS if s != params[f"selection_{k}"]]
    return out


def local_search(study: optuna.Study, objective: "Objective", record: CalibrationRecord,
                 pooled: list[optuna.trial.FrozenTrial], target_s: float, max_trials: int,
                 progress: bool = False, allow_skip: bool | None = None) -> list[optuna.trial.FrozenTrial]:
    """Local search after the sampler: hill-climb from the best measured trial predicted within
    ``target_s`` (and, in the first round, from the best one predicted up to
    :data:`INFEASIBLE_MARGIN` over it), measuring every neighbour (:func:`neighbours`) predicted
    within ``target_s`` that is a policy not measured yet, and moving to the best one while it
    improves. ``pooled``: measured trials of every study of the run (same record), so a climb may
    start from a trial another budget's study found. The neighbours run as trials of ``study``
    (user attribute :data:`LOCAL_ATTR`), so the local search is stored and resumes like the rest.
    Returns the trials this call measured; ``max_trials`` bounds the study's local-search trials
    across resumes (an interrupted search resumes: measured policies are not measured again).
    ``allow_skip``: whether the moves may skip scales (default: the objective's rule; a study of
    several budgets passes each budget's).

    In a study of several budgets, each budget's climb runs in the one study: ``max_trials`` then
    bounds the local-search trials that climb toward ``target_s`` (user attribute ``local_target_s``).

    The sampler explores a large space with few trials; near the budget, good policies differ by
    one notch of one scale, and the best trial it found is often just over the budget."""
    tokens = objective.tokens
    # an interrupted run left neighbours queued (or queued again after a kill): run them first,
    # so that they are measured once and not queued a second time
    added = _run_queued_neighbours(study, objective, progress)
    found = list(pooled) + added
    seen = {_plan_key(point_from_params(record, t.params)) for t in found}
    allow_skip = getattr(objective, "allow_skip", True) if allow_skip is None else allow_skip
    left = max_trials - sum(1 for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                            if is_local(t) and math.isclose(t.user_attrs.get("local_target_s", target_s), target_s))
    first_round = True
    while left > 0:
        best = ranked_within(found, target_s)[:1]
        starts = best + (ranked_within(found, target_s, 1.0, INFEASIBLE_MARGIN)[:1] if first_round else [])
        first_round = False
        queue = []
        for start in starts:
            for params in neighbours(record, start.params, allow_skip):
                point = point_from_params(record, params)
                key = _plan_key(point)
                if key in seen or objective.latency.predict(point, tokens) > target_s:
                    continue
                seen.add(key)
                queue.append((params, start.number))
        queue = queue[:left]
        if not queue:
            break
        for params, origin in queue:
            study.enqueue_trial(params, user_attrs={LOCAL_ATTR: origin, "local_target_s": target_s})
        new = _run_queued_neighbours(study, objective, progress)
        left -= len(queue)
        found += new
        added += new
        if not new or max(quality_of(t) for t in new) <= (quality_of(best[0]) if best else -math.inf):
            break                                # no better neighbour: a local optimum (or nothing ran)
    return added


def _run_queued_neighbours(study: optuna.Study, objective, progress: bool) -> list[optuna.trial.FrozenTrial]:
    """Run the study's queued local-search trials; the measured ones."""
    numbers = {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
               if is_local(t)}
    if numbers:
        study.optimize(objective, n_trials=len(numbers), show_progress_bar=progress, gc_after_trial=False)
    return [t for t in measured_trials(study) if t.number in numbers]


def pareto_front(points: list[tuple[float, float, Any]]) -> list[tuple[float, float, Any]]:
    """Non-dominated (quality high, latency low) points, by increasing latency.

    >>> [q for q, l, _ in pareto_front([(0.9, 2.0, 'a'), (0.8, 1.0, 'b'), (0.7, 1.5, 'c')])]
    [0.8, 0.9]
    """
    front = []
    for q, lat, tag in sorted(points, key=lambda p: (p[1], -p[0])):
        if not front or q > front[-1][0]:
            front.append((q, lat, tag))
    return front
