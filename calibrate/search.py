"""Policy search with Optuna under a latency budget.

* :func:`suggest_policy` is the one pure function that names every parameter (fixed-size space:
  "off" is a value - ``first_accelerated = N`` means nothing is accelerated, ``skip_from = N``
  that no scale is skipped - never a missing parameter), so :class:`optuna.trial.FixedTrial`
  replays any policy through the same code.
* The objective is quality against the full model on the calibration prompts (mean over prompts;
  the worst prompt is kept as a user attribute). Latency is predicted from the calibration
  record's latency table and is a constraint (``trial.set_constraint``): a trial is feasible when
  predicted latency <= budget. Clearly infeasible trials (predicted more than 10% over budget) are
  not generated: their quality is estimated from the per-scale sensitivities instead, and marked.
* The study is seeded (``enqueue_trial``) with the identity policy, a paper-like policy
  (refinement = the last three scales, guidance dropped, a fixed random-projection keep ratio) and
  a FastVAR-like policy (deviation-selected tokens in the middle layers at the two scales before
  the last two, 60% / 50% kept, the last two skipped: :func:`stagevar.baselines.fastvar_policy`
  within this search space).
* When no seed (nor warm-start point) meets the budget without skipping scales, budget-fitted
  seeds (:func:`budget_seed_params`) are enqueued too: for each first accelerated scale of the
  search range, guidance dropped there and the largest uniform keep ratio predicted to meet the
  target, and variants that spend what is left on one scale, so that plans accelerating every
  late scale are measured at tight budgets, not only plans that skip scales.
* ``--warm-start POLICY`` also enqueues the operating points of an earlier policy
  (:func:`params_for_point`), so recalibrating after a change (new weights, another default
  guidance) starts from the plans that worked before; the sampler and the local search go on
  from there.
* After the sampler, :func:`local_search` hill-climbs from the best trial through one-move
  neighbours (:func:`neighbours`) predicted within the target (the budget less a margin).
* Storage is resumable: a journal file in the output directory by default, or any Optuna storage
  URL (``sqlite:///...``, ``postgresql://...``) for several workers.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from typing import Any

import numpy as np
import optuna

from calibrate.measure.common import Subject, Variant
from calibrate.measure.latency import LatencyModel
from calibrate.measure.sensitivity import compare
from calibrate.record import CalibrationRecord
from stagevar.errors import StageVarError
from stagevar.policy import OperatingPoint, ScalePlan

log = logging.getLogger(__name__)

KEEPS = (1.0, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
SELECTIONS = ("random_projection", "deviation", "uniform")
RESTORES = ("cached_update", "cached_output")
INFEASIBLE_MARGIN = 1.10
#: default share of the budget that the local search, the choice of candidates and the fitted
#: seeds aim under (``--latency-margin``): a policy predicted just inside the budget often misses it
LATENCY_MARGIN = 0.05


class BudgetError(StageVarError):
    exit_code = 2


@dataclasses.dataclass(frozen=True)
class Budget:
    """``3x`` (speedup over the full model) or ``700ms`` / ``1.5s`` (latency of one batch)."""

    text: str
    speedup: float | None = None
    seconds: float | None = None

    def target_seconds(self, baseline_s: float) -> float:
        return baseline_s / self.speedup if self.speedup is not None else self.seconds

    @property
    def name(self) -> str:
        return self.text


_BUDGET = re.compile(r"(\d+(?:\.\d+)?)(x|ms|s)")


def parse_budget(text: str) -> Budget:
    """A budget from its text.

    >>> parse_budget("3x").speedup, parse_budget("700ms").seconds
    (3.0, 0.7)
    """
    t = str(text).strip().lower()
    m = _BUDGET.fullmatch(t)
    if not m:
        raise BudgetError(f"invalid budget {text!r}: use a speedup such as 3x or 2.5x, or a latency per batch such as "
                          "700ms or 1.5s (several: --budget 2x,3x,4x).")
    v, unit = float(m.group(1)), m.group(2)
    if unit == "x":
        if v <= 1.0:
            raise BudgetError(f"invalid budget {text!r}: a speedup budget must be greater than 1x (1x is the full model).")
        return Budget(t, speedup=v)
    secs = v / 1000 if unit == "ms" else v
    if secs <= 0:
        raise BudgetError(f"invalid budget {text!r}: a latency budget must be positive.")
    return Budget(t, seconds=secs)


def parse_budgets(text: str) -> list[Budget]:
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise BudgetError("no budget given: use e.g. --budget 3x or --budget 2x,3x,4x.")
    out = [parse_budget(p) for p in parts]
    if len({(b.speedup, b.seconds) for b in out}) != len(out):
        raise BudgetError(f"budget list {text!r} repeats a budget.")
    return out


# ----------------------------------------------------------------------------------------- space
#: The search may always reach this many last scales: the span the published hand-set policies
#: touch (StageVAR the last three, FastVAR the last four), so that it can find them or better.
MIN_SEARCH_SPAN = 4


def search_bounds(record: CalibrationRecord) -> tuple[int, int]:
    """(lowest scale the search may accelerate, number of scales).

    The search may start the refinement stage one scale before the detected boundary, and in any
    case may reach the last :data:`MIN_SEARCH_SPAN` scales, never scale 0. When the measured
    stages leave fewer late scales (a model whose content settles late), the quality objective,
    not the boundary, decides how far those scales can be accelerated."""
    n = record.num_scales
    lo = max(1, min(record.stages["refinement"][0] - 1, n - MIN_SEARCH_SPAN))
    return lo, n


def suggest_policy(trial: optuna.trial.BaseTrial, record: CalibrationRecord, allow_skip: bool = True) -> OperatingPoint:
    """Every Optuna parameter of the space, and the operating point they describe. Without
    ``allow_skip`` (:func:`skipping_allowed`) ``skip_from`` has the one value N (nothing skipped)."""
    lo, n = search_bounds(record)
    depth = record.inputs["num_layers"]
    first = trial.suggest_int("first_accelerated", lo, n)           # n: nothing accelerated
    cond_from = trial.suggest_int("cond_only_from", lo, n)          # n: guidance never dropped
    skip_from = trial.suggest_int("skip_from", lo if allow_skip else n, n)   # n: no scale skipped (SkipVAR-style stop)
    restore = trial.suggest_categorical("restore", RESTORES)
    layer_start = trial.suggest_int("layer_start", 0, max(0, depth // 4))
    keeps, sels = {}, {}
    for k in range(lo, n):
        keeps[k] = trial.suggest_categorical(f"keep_{k}", KEEPS)
        sels[k] = trial.suggest_categorical(f"selection_{k}", SELECTIONS)
    cond_from = max(cond_from, first)
    skip_from = max(skip_from, first)
    plans = []
    for k in range(n):
        if k < first:
            plans.append(ScalePlan(k))
            continue
        if k >= skip_from:
            plans.append(ScalePlan(k, skip=True))
            continue
        keep = keeps[k]
        guidance = "cond_only" if k >= cond_from else "cfg"
        if keep >= 1.0:                          # all tokens computed: selection, restoration, layers do not apply
            plans.append(ScalePlan(k, guidance=guidance))
            continue
        plans.append(ScalePlan(k, guidance=guidance, keep=keep, selection=sels[k], restore=restore,
                               layers=(layer_start, depth) if layer_start > 0 else None))
    return OperatingPoint(stages_for(record, first), tuple(plans))


def stages_for(record: CalibrationRecord, first_accelerated: int) -> dict[str, tuple[int, int]]:
    n = record.num_scales
    s_end = record.stages["semantic"][1]
    first = max(1, min(first_accelerated, n))
    s_end = min(s_end, first - 1)
    return {"semantic": (0, s_end), "structure": (s_end + 1, first - 1), "refinement": (first, n - 1)}


def skipping_allowed(record: CalibrationRecord, latency: LatencyModel, tokens: list[int], budget_s: float | None) -> bool:
    """Whether the search may skip scales at ``budget_s``: only when no plan that computes every
    scale can meet it, i.e. when even the cheapest one (guidance dropped and 10% of the tokens
    kept on every scale of the search range) is predicted over the budget. A skipped scale
    leaves the image at the previous scale's resolution; on held-out prompts every skipping 3x
    plan the search found lost more than the plans that compute every scale with fewer tokens
    (``benchmarks/RESULTS.md``), and on 8 calibration images their blur scored deceptively well."""
    if budget_s is None:
        return True
    lo, n = search_bounds(record)
    for sel in SELECTIONS:
        params = dict(seed_params(record)["identity"], first_accelerated=lo, cond_only_from=lo)
        params.update({f"keep_{k}": min(KEEPS) for k in range(lo, n)})
        params.update({f"selection_{k}": sel for k in range(lo, n)})
        if latency.predict(point_from_params(record, params), tokens) <= budget_s:
            return False
    return True


def seed_params(record: CalibrationRecord) -> dict[str, dict[str, Any]]:
    """Parameters of the enqueued baselines: identity, paper-like, FastVAR-like."""
    lo, n = search_bounds(record)
    depth = record.inputs["num_layers"]
    base = {"restore": "cached_update", "layer_start": 0}
    for k in range(lo, n):
        base[f"keep_{k}"] = 1.0
        base[f"selection_{k}"] = "random_projection"
    base["skip_from"] = n
    identity = dict(base, first_accelerated=n, cond_only_from=n)
    paper_first = max(lo, n - 3)
    paper = dict(base, first_accelerated=paper_first, cond_only_from=paper_first)
    for k in range(paper_first, n):
        paper[f"keep_{k}"] = 0.5
    fv_first = max(lo, n - 4)
    fastvar = dict(base, first_accelerated=fv_first, cond_only_from=n, skip_from=max(lo, n - 2),
                   layer_start=min(max(0, depth // 4), max(1, round(depth * 3 / 32))))
    for k, keep in zip(range(n - 4, n - 2), (0.6, 0.5)):
        if k < fv_first:
            continue
        fastvar[f"keep_{k}"] = keep
        fastvar[f"selection_{k}"] = "deviation"
    return {"identity": identity, "paper-like": paper, "fastvar-like": fastvar}


def least_damaging_selection(record: CalibrationRecord, scale: int, keep: float) -> str:
    """The token selection whose measured damage at ``scale`` is lowest at the measured keep ratio
    nearest to ``keep`` (random projection when the record measured none at that scale)."""
    rows = [r for r in record.sensitivity if r["scale"] == scale and r["keep"] < 1.0 and r["selection"] in SELECTIONS]
    if not rows:
        return "random_projection"
    near = min({r["keep"] for r in rows}, key=lambda r: (abs(r - keep), r))
    return min((r for r in rows if r["keep"] == near), key=lambda r: r["damage"])["selection"]


def budget_seed_params(record: CalibrationRecord, latency: LatencyModel, tokens: list[int], budget_s: float,
                       enqueued: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Seeds that compute every scale within a budget that no other seed meets without skipping
    scales: for each first accelerated scale ``s`` of the search range, guidance dropped from
    ``s`` and the largest keep ratio of :data:`KEEPS`, the same on every scale from ``s``, whose
    predicted latency meets ``budget_s`` (the paper-like seed refitted to the budget); each scale
    takes the selection the sensitivity measurement found least damaging
    (:func:`least_damaging_selection`). Then, for each such plan and each of its scales, the same
    plan with that one scale raised as many notches as the budget left over allows (the uniform
    plan usually leaves some). A start that cannot meet the budget even at the smallest keep gives
    no seed. None are made when one of the fixed seeds (:func:`seed_params`) or of ``enqueued``
    (e.g. a warm start's points) skips no scale and is predicted to meet the budget. Callers pass
    the budget less the latency margin (:data:`LATENCY_MARGIN`), the target the local search
    climbs within.

    The fixed seeds compute every scale only up to about 2x; at a tighter budget the sampler,
    started from them, tends to reach the budget by skipping scales, and the plans that
    accelerate every late scale a little lie far from anything it has measured. Where such a
    plan is already enqueued, these seeds only move the search elsewhere: with the paper-like
    seed meeting 2x, and with a warm start's 3x point, the searches that had them did worse
    (``benchmarks/RESULTS.md``)."""
    lo, n = search_bounds(record)
    fixed = seed_params(record)
    for params in [*fixed.values(), *(enqueued or [])]:
        point = point_from_params(record, params)
        if not any(p.skip for p in point.plans) and latency.predict(point, tokens) <= budget_s:
            return {}
    base = fixed["identity"]
    out = {}

    def fits(params):
        return latency.predict(point_from_params(record, params), tokens) <= budget_s

    for s in range(lo, n):
        for keep in KEEPS:
            params = dict(base, first_accelerated=s, cond_only_from=s)
            for k in range(s, n):
                params[f"keep_{k}"] = keep
                params[f"selection_{k}"] = least_damaging_selection(record, k, keep)
            if fits(params):
                out[f"fitted:{s}@{keep:g}"] = params
                # the budget left over: spent on one scale at a time, as many notches as fit
                for f in range(s, n):
                    raised = dict(params)
                    i = KEEPS.index(keep)
                    while i > 0:
                        trial = dict(raised, **{f"keep_{f}": KEEPS[i - 1],
                                                f"selection_{f}": least_damaging_selection(record, f, KEEPS[i - 1])})
                        if not fits(trial):
                            break
                        raised, i = trial, i - 1
                    if raised != params:
                        out[f"fitted:{s}@{keep:g},{f}@{raised[f'keep_{f}']:g}"] = raised
                break
    return out


# ----------------------------------------------------------------------------------------- objective
def estimated_quality(record: CalibrationRecord, point: OperatingPoint) -> float:
    """Additive-damage estimate from the per-scale sensitivities (used for infeasible trials)."""
    table = {(r["scale"], r["variant"]): r["damage"] for r in record.sensitivity}
    damage = 0.0
    cond_counted = False
    for p in point.plans:
        if p.skip:
            damage += 0.5
            continue
        if p.is_identity:
            continue
        if p.guidance == "cond_only" and not cond_counted:
            damage += table.get((p.scale, "cond"), 0.5)
            cond_counted = True
        if p.is_subset:
            keeps = sorted({r["keep"] for r in record.sensitivity if r["keep"] < 1.0})
            if keeps:
                near = min(keeps, key=lambda r: abs(r - p.keep))
                sel = p.selection if p.selection != "uniform" else "random_projection"
                damage += table.get((p.scale, Variant("cfg", near, sel).name), 0.5)
    return max(0.0, 1.0 - damage)


class Objective:
    def __init__(self, record: CalibrationRecord, subject: Subject, latency: LatencyModel, budget_s: float | None,
                 scorer, reference, reference_semantic=None):
        self.record, self.subject, self.latency = record, subject, latency
        self.budget_s, self.scorer = budget_s, scorer
        self.reference, self.reference_semantic = reference, reference_semantic
        self.tokens = subject.adapter.tokens_per_scale()
        self.allow_skip = skipping_allowed(record, latency, self.tokens, budget_s)

    def __call__(self, trial: optuna.trial.Trial) -> float | tuple[float, float]:
        point = suggest_policy(trial, self.record, self.allow_skip)
        predicted = self.latency.predict(point, self.tokens)
        trial.set_user_attr("predicted_latency_s", predicted)
        trial.set_user_attr("predicted_speedup", self.latency.baseline(self.tokens) / predicted)
        if self.budget_s is not None:
            trial.set_constraint("latency", predicted - self.budget_s)
            if predicted > self.budget_s * INFEASIBLE_MARGIN:
                trial.set_user_attr("quality_estimated", True)
                return estimated_quality(self.record, point)
        out = self.subject.run(point)
        m = compare(out, self.reference, self.subject.item_prompts, self.scorer, self.reference_semantic)
        trial.set_user_attr("quality_se", m["quality_se"])
        trial.set_user_attr("quality_worst", m["quality_worst"])
        trial.set_user_attr("ssim", m["ssim"])
        trial.set_user_attr("semantic", m["semantic"])
        trial.set_user_attr("measured_latency_s", out.seconds)
        trial.set_user_attr("quality_estimated", False)
        if self.budget_s is None:
            return m["quality"], predicted
        return m["quality"]


def feasible_ranked(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete, measured (not estimated), feasible trials, best quality first."""
    from optuna.study._constrained_optimization import _get_feasible_trials
    return _best_first(_get_feasible_trials(measured_trials(study)))


def _best_first(trials: list[optuna.trial.FrozenTrial]) -> list[optuna.trial.FrozenTrial]:
    """Best quality first; among equals, the lowest predicted latency."""
    return sorted(trials, key=lambda t: (-t.value, t.user_attrs.get("predicted_latency_s", math.inf)))


def measured_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Complete trials whose quality was measured (not estimated from the sensitivities)."""
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if not t.user_attrs.get("quality_estimated", False)]


def ranked_within(trials: list[optuna.trial.FrozenTrial], budget_s: float, low: float = 0.0,
                  high: float = 1.0) -> list[optuna.trial.FrozenTrial]:
    """Trials predicted in ``(budget_s * low, budget_s * high]``, best quality first. The predicted
    latency is absolute, so trials of another budget's study on the same record rank here too."""
    return _best_first([t for t in trials
                        if budget_s * low < t.user_attrs.get("predicted_latency_s", math.inf) <= budget_s * high])


def verification_candidates(record: CalibrationRecord, trials: list[optuna.trial.FrozenTrial], budget_s: float, k: int,
                            k_near: int, allow_skip: bool = True) -> list[tuple]:
    """What verification re-measures for one budget, from measured ``trials`` (this budget's study
    and the other studies of the run, all on the same record): the ``k`` best distinct trials
    predicted within the budget, then the ``k_near`` best distinct ones predicted up to
    ``INFEASIBLE_MARGIN`` over it (the latency model's error band: verification measures their
    real latency and keeps them only if it meets the budget), never the same policy twice; without
    ``allow_skip`` (:func:`skipping_allowed`), no policy that skips a scale (another budget's study
    may have found some)."""
    if not allow_skip:
        trials = [t for t in trials if not any(p.skip for p in point_from_params(record, t.params).plans)]
    strict = distinct_candidates(record, ranked_within(trials, budget_s), k)
    if k_near <= 0:
        return strict
    seen = {_plan_key(point) for _, point in strict}
    near_ranked = ranked_within(trials, budget_s, 1.0, INFEASIBLE_MARGIN)
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
#: user attribute of a local-search trial (the number of the trial it was a neighbour of)
LOCAL_ATTR = "local_from"


def is_local(t: optuna.trial.FrozenTrial) -> bool:
    """A trial of :func:`local_search`, not of the sampler (it does not count against ``--trials``)."""
    return LOCAL_ATTR in t.user_attrs


def neighbours(record: CalibrationRecord, params: dict[str, Any], allow_skip: bool = True) -> list[dict[str, Any]]:
    """Every parameter set one move away from ``params``: a keep ratio one notch up or down, another
    token selection at one scale, the first accelerated scale / guidance-drop scale / first skipped
    scale / first pruned layer moved by one, or the other restoration. Moves stay in the space
    (without ``allow_skip``, nothing is skipped)."""
    lo, n = search_bounds(record)
    top_layer = max(0, record.inputs["num_layers"] // 4)
    out = []
    for name, low, high in (("first_accelerated", lo, n), ("cond_only_from", lo, n), ("skip_from", lo if allow_skip else n, n),
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
                 progress: bool = False) -> list[optuna.trial.FrozenTrial]:
    """Local search after the sampler: hill-climb from the best measured trial predicted within
    ``target_s`` (and, in the first round, from the best one predicted up to
    :data:`INFEASIBLE_MARGIN` over it), measuring every neighbour (:func:`neighbours`) predicted
    within ``target_s`` that is a policy not measured yet, and moving to the best one while it
    improves. ``pooled``: measured trials of every study of the run (same record), so a climb may
    start from a trial another budget's study found. The neighbours run as trials of ``study``
    (user attribute :data:`LOCAL_ATTR`), so the local search is stored and resumes like the rest.
    Returns the trials this call measured; ``max_trials`` bounds the study's local-search trials
    across resumes (an interrupted search resumes: measured policies are not measured again).

    The sampler explores a large space with few trials; near the budget, good policies differ by
    one notch of one scale, and the best trial it found is often just over the budget."""
    tokens = objective.tokens
    # an interrupted run left neighbours queued (or queued again after a kill): run them first,
    # so that they are measured once and not queued a second time
    added = _run_queued_neighbours(study, objective, progress)
    found = list(pooled) + added
    seen = {_plan_key(point_from_params(record, t.params)) for t in found}
    left = max_trials - sum(1 for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                            if is_local(t))
    first_round = True
    while left > 0:
        best = ranked_within(found, target_s)[:1]
        starts = best + (ranked_within(found, target_s, 1.0, INFEASIBLE_MARGIN)[:1] if first_round else [])
        first_round = False
        queue = []
        for start in starts:
            for params in neighbours(record, start.params, getattr(objective, "allow_skip", True)):
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
            study.enqueue_trial(params, user_attrs={LOCAL_ATTR: origin})
        new = _run_queued_neighbours(study, objective, progress)
        left -= len(queue)
        found += new
        added += new
        if not new or max(t.value for t in new) <= (best[0].value if best else -math.inf):
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


def open_study(name: str, storage, direction_multi: bool, seed: int) -> optuna.Study:
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True)
    if direction_multi:
        return optuna.create_study(study_name=name, storage=storage, load_if_exists=True, sampler=sampler,
                                   directions=["maximize", "minimize"])
    return optuna.create_study(study_name=name, storage=storage, load_if_exists=True, sampler=sampler, direction="maximize")


def params_for_point(record: CalibrationRecord, point: OperatingPoint) -> dict[str, Any] | None:
    """The search parameters that describe ``point`` (e.g. an operating point of an earlier
    policy), or None when it lies outside this record's search space (it accelerates a scale
    before the search range, uses a keep ratio the space lacks, or mixes restore modes / layer
    ranges across scales). The inverse of :func:`point_from_params` on the plans."""
    lo, n = search_bounds(record)
    depth = record.inputs["num_layers"]
    plans = list(point.plans)
    if len(plans) != n:
        return None
    changed = [p.scale for p in plans if not p.is_identity]
    if any(k < lo for k in changed):
        return None
    subsets = [p for p in plans if p.is_subset and not p.skip]
    params: dict[str, Any] = {
        "first_accelerated": min(changed, default=n),
        "cond_only_from": min((p.scale for p in plans if p.guidance == "cond_only" and not p.skip), default=n),
        "skip_from": min((p.scale for p in plans if p.skip), default=n),
        "restore": subsets[0].restore if subsets else "cached_update",
        "layer_start": subsets[0].layers[0] if subsets and subsets[0].layers else 0,
    }
    if params["restore"] not in RESTORES or params["layer_start"] > max(0, depth // 4):
        return None
    for k in range(lo, n):
        pl = plans[k]
        use = pl.is_subset and not pl.skip
        params[f"keep_{k}"] = pl.keep if use else 1.0
        params[f"selection_{k}"] = pl.selection if use else "random_projection"
        if params[f"keep_{k}"] not in KEEPS or params[f"selection_{k}"] not in SELECTIONS:
            return None
    return params if point_from_params(record, params).plans == tuple(plans) else None


def enqueue_seeds(study: optuna.Study, record: CalibrationRecord,
                  warm_start: dict[str, OperatingPoint] | None = None,
                  fitted: dict[str, dict[str, Any]] | None = None, limit: int | None = None,
                  allow_skip: bool = True) -> list[str]:
    """Enqueue the baselines once (a resumed or joined study already has them), the budget-fitted
    seeds ``fitted`` (:func:`budget_seed_params`), and the operating points of ``warm_start``
    (e.g. the policy being recalibrated) that fit the search space, in that order.

    ``limit`` (``--trials``) bounds the sampler trials of the study, enqueued seeds included: only
    the first ``limit`` seeds are enqueued (the others are named in a warning), so that no seed is
    left queued when the sampler stops. Returns the names of the warm-start points that did not
    fit the search space (they are left out). Without ``allow_skip`` (:func:`skipping_allowed`)
    the seeds that skip scales (the FastVAR-like one, a warm start's) are left out too: they lie
    outside the study's space."""
    if study.user_attrs.get("seeded"):
        return []
    seeds = [(name, params) for name, params in {**seed_params(record), **(fitted or {})}.items()]
    left_out = []
    for name, point in (warm_start or {}).items():
        params = params_for_point(record, point)
        if params is None:
            left_out.append(name)
            continue
        seeds.append((f"warm-start:{name}", params))
    if not allow_skip:
        skipping = [name for name, params in seeds if params["skip_from"] < record.num_scales]
        if skipping:
            log.info("no scale is skipped at this budget (plans computing every scale meet it): seed(s) %s left out",
                     ", ".join(skipping))
        seeds = [(name, params) for name, params in seeds if params["skip_from"] >= record.num_scales]
    if limit is not None and len(seeds) > limit:
        log.warning("--trials %d is fewer than the %d seed policies: %s not tried (raise --trials to try them)",
                    limit, len(seeds), ", ".join(name for name, _ in seeds[limit:]))
        seeds = seeds[:limit]
    for name, params in seeds:
        study.enqueue_trial(params, user_attrs={"seed_policy": name}, skip_if_exists=True)
    study.set_user_attr("seeded", True)
    return left_out


def drop_queued_seeds(study: optuna.Study) -> int:
    """Mark the sampler's trials still queued (WAITING) as failed, so that the local search, which
    runs queued trials through ``study.optimize`` (oldest first), never runs them as its own. They
    exist only when a study is resumed with a lower ``--trials`` than it was started with.
    Returns how many were dropped."""
    waiting = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)) if not is_local(t)]
    for t in waiting:
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
    if waiting:
        log.warning("%d queued trial(s) beyond --trials were not run: %s", len(waiting),
                    ", ".join(str(t.user_attrs.get("seed_policy", t.number)) for t in waiting))
    return len(waiting)


def point_from_params(record: CalibrationRecord, params: dict[str, Any]) -> OperatingPoint:
    return suggest_policy(optuna.trial.FixedTrial(params), record)


def summarize_trial(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {"number": t.number, "quality": t.value if t.values is None or len(t.values) == 1 else t.values[0],
            **{k: v for k, v in t.user_attrs.items() if isinstance(v, (int, float, str, bool))}}


def quality_table(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "worst": float(np.min(values))}
