"""Policy search with Optuna under a latency budget.

* :func:`suggest_policy` is the one pure function that names every parameter (fixed-size space:
  "off" is a value - ``first_accelerated = N`` means nothing is accelerated, ``skip_from = N``
  that no scale is skipped - never a missing parameter), so :class:`optuna.trial.FixedTrial`
  replays any policy through the same code.
* The objective is quality against the full model (mean over images; the worst image is kept as
  a user attribute), measured on the record's images and then, while the trial ranks in the top
  quarter of the trials measured that far (:func:`search_pruner`), on more sets of images (the
  same prompts, other seeds; ``--search-images``, 32 by default): most trials cost one set, and the
  plans that compete near the budget are compared on four times as many images. Latency is
  predicted from the calibration record's latency table and is a constraint
  (``trial.set_constraint``): a trial is feasible when predicted latency <= budget. Clearly
  infeasible trials (predicted more than 10% over budget) are not generated: their quality is
  estimated from the per-scale sensitivities instead, and marked.
* The study is seeded (``enqueue_trial``) with the identity policy, a paper-like policy
  (refinement = the last three scales, guidance dropped, a fixed random-projection keep ratio) and
  a FastVAR-like policy (deviation-selected tokens in the middle layers at the two scales before
  the last two, 60% / 50% kept, the last two skipped: :func:`stagevar.baselines.fastvar_policy`
  within this search space).
* When no seed (nor warm-start point) meets the budget without skipping scales, budget-fitted
  seeds (:func:`budget_seed_params`) are enqueued too: for each first accelerated scale of the
  search range, guidance dropped there and the largest uniform keep ratio predicted to meet the
  target, and variants that spend what is left on one scale, so that plans accelerating every
  late scale are measured at tight budgets, not only plans that skip scales; the same again with
  guidance dropped from :func:`guidance_floor` (before the token range, where the sensitivity
  pass found dropping it harmless), and a plan whose keep ratios follow the spectra's effective
  ranks (:func:`spectral_seed_params`).
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
import logging
import math
from typing import Any, Sequence

import numpy as np
import optuna

from calibrate.measure.common import Subject, Variant
from calibrate.measure.latency import LatencyModel
from calibrate.measure.sensitivity import concat_values, per_image, summarize
from calibrate.record import CalibrationRecord
from stagevar.policy import OperatingPoint, ScalePlan

log = logging.getLogger(__name__)

KEEPS = (1.0, 0.75, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
SELECTIONS = ("random_projection", "deviation", "uniform")
RESTORES = ("cached_update", "cached_output")
INFEASIBLE_MARGIN = 1.10
#: default share of the budget that the local search, the choice of candidates and the fitted
#: seeds aim under (``--latency-margin``): a policy predicted just inside the budget often misses it
LATENCY_MARGIN = 0.05


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


#: version of the search space (what the parameters mean); a study records it, and one made with
#: another version is not resumed (its trials would replay as other policies)
SEARCH_SPACE = 2


#: a guidance drop is harmless where its measured damage, less two standard errors, is at most this
GUIDANCE_FREE_DAMAGE = 0.02


def guidance_floor(record: CalibrationRecord) -> int:
    """The lowest scale the search may drop guidance from: the start of the token range
    (:func:`search_bounds`), or lower, down through the scales below it whose guidance drop the
    sensitivity pass measured harmless (``cond`` rows: damage less two standard errors at most
    :data:`GUIDANCE_FREE_DAMAGE`; the first scale that is not, or not measured, stops the walk).
    Dropping guidance halves a scale's work, and at a tight budget the time it saves on the
    scales just before the token range buys more tokens on the late ones.

    >>> from calibrate.record import CalibrationRecord
    >>> stages = {"semantic": [0, 7], "structure": [8, 8], "refinement": [9, 9]}
    >>> cond = lambda k, d: {"scale": k, "variant": "cond", "damage": d, "damage_se": 0.01}
    >>> rec = CalibrationRecord("k", {"model": {"scale_schedule": [[1, k, k] for k in range(1, 11)]}}, {},
    ...                         [cond(2, 0.01), cond(3, 0.2), cond(4, 0.03), cond(5, 0.0)], [], {}, [], stages)
    >>> search_bounds(rec), guidance_floor(rec)
    ((6, 10), 4)
    """
    lo, _ = search_bounds(record)
    damage = {r["scale"]: r["damage"] - 2 * r.get("damage_se", 0.0) for r in record.sensitivity
              if r.get("variant") == "cond" and "damage" in r}
    floor = lo
    while floor - 1 >= 1 and damage.get(floor - 1, math.inf) <= GUIDANCE_FREE_DAMAGE:
        floor -= 1
    return floor


def suggest_policy(trial: optuna.trial.BaseTrial, record: CalibrationRecord, allow_skip: bool = True) -> OperatingPoint:
    """Every Optuna parameter of the space, and the operating point they describe: token subsets
    (``keep_k``, ``selection_k``) and skipped scales from ``first_accelerated`` on, within the
    search range (:func:`search_bounds`); guidance dropped from ``cond_only_from`` on, which may lie
    before that range, down to :func:`guidance_floor`. Without ``allow_skip``
    (:func:`skipping_allowed`) ``skip_from`` has the one value N (nothing skipped)."""
    lo, n = search_bounds(record)
    depth = record.inputs["num_layers"]
    first = trial.suggest_int("first_accelerated", lo, n)           # n: no token subset
    cond_from = trial.suggest_int("cond_only_from", guidance_floor(record), n)   # n: guidance never dropped
    skip_from = trial.suggest_int("skip_from", lo if allow_skip else n, n)   # n: no scale skipped (SkipVAR-style stop)
    restore = trial.suggest_categorical("restore", RESTORES)
    layer_start = trial.suggest_int("layer_start", 0, max(0, depth // 4))
    keeps, sels = {}, {}
    for k in range(lo, n):
        keeps[k] = trial.suggest_categorical(f"keep_{k}", KEEPS)
        sels[k] = trial.suggest_categorical(f"selection_{k}", SELECTIONS)
    skip_from = max(skip_from, first)
    plans = []
    for k in range(n):
        if k < first:                            # before the token range: at most guidance dropped
            plans.append(ScalePlan(k, guidance="cond_only") if k >= cond_from else ScalePlan(k))
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
    return OperatingPoint(stages_for(record, min(first, cond_from)), tuple(plans))


def stages_for(record: CalibrationRecord, first_accelerated: int) -> dict[str, tuple[int, int]]:
    n = record.num_scales
    s_end = record.stages["semantic"][1]
    first = max(1, min(first_accelerated, n))
    s_end = min(s_end, first - 1)
    return {"semantic": (0, s_end), "structure": (s_end + 1, first - 1), "refinement": (first, n - 1)}


def skipping_allowed(record: CalibrationRecord, latency: LatencyModel, tokens: list[int], budget_s: float | None) -> bool:
    """Whether the search may skip scales at ``budget_s``: only when no plan that computes every
    scale can meet it, i.e. when even the cheapest one (guidance dropped from
    :func:`guidance_floor` and 10% of the tokens kept on every scale of the search range) is
    predicted over it. Callers pass the target the search aims at, the budget less the latency
    margin: at a budget that the cheapest such plan meets only within the margin (infinity-mini
    at 4x), forbidding skips left the study no plan within the target. A skipped scale
    leaves the image at the previous scale's resolution; on held-out prompts every skipping 3x
    plan the search found lost more than the plans that compute every scale with fewer tokens
    (``benchmarks/RESULTS.md``), and on 8 calibration images their blur scored deceptively well."""
    if budget_s is None:
        return True
    lo, n = search_bounds(record)
    for sel in SELECTIONS:
        params = dict(seed_params(record)["identity"], first_accelerated=lo, cond_only_from=guidance_floor(record))
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
    plan usually leaves some). When the guidance range reaches below the token range
    (:func:`guidance_floor`), each of these comes again with guidance dropped from the floor
    (named ``fitted:gG:s@keep``): the time saved there is spent on tokens. Last, the spectral seed
    (:func:`spectral_seed_params`). A start that cannot meet the budget even at the smallest keep
    gives no seed. None are made when one of the fixed seeds (:func:`seed_params`) or of
    ``enqueued`` (e.g. a warm start's points) skips no scale and is predicted to meet the budget.
    Callers pass the budget less the latency margin (:data:`LATENCY_MARGIN`), the target the local
    search climbs within.

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

    def fits(params):
        return latency.predict(point_from_params(record, params), tokens) <= budget_s

    floor = guidance_floor(record)
    out: dict[str, dict[str, Any]] = {}
    for g_first in (False, True) if floor < lo else (False,):
        for s in range(lo, n):
            tag = f"g{floor}:{s}" if g_first else f"{s}"
            for keep in KEEPS:
                params = dict(fixed["identity"], first_accelerated=s, cond_only_from=floor if g_first else s)
                for k in range(s, n):
                    params[f"keep_{k}"] = keep
                    params[f"selection_{k}"] = least_damaging_selection(record, k, keep)
                if fits(params):
                    out[f"fitted:{tag}@{keep:g}"] = params
                    out.update(_spend_left_over(record, params, s, n, fits, f"fitted:{tag}@{keep:g}"))
                    break
    spectral = spectral_seed_params(record, fits)
    if spectral is not None and spectral[1] not in out.values():
        out[spectral[0]] = spectral[1]
    return out


def _spend_left_over(record: CalibrationRecord, params: dict[str, Any], s: int, n: int, fits,
                     name: str) -> dict[str, dict[str, Any]]:
    """For each scale ``f`` from ``s``: ``params`` with that one scale raised as many notches of
    :data:`KEEPS` as still ``fits``, named ``name,f@keep`` (none where not one notch fits)."""
    out = {}
    keep = params[f"keep_{s}"]
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
            out[f"{name},{f}@{raised[f'keep_{f}']:g}"] = raised
    return out


def spectral_fractions(record: CalibrationRecord) -> dict[int, float]:
    """Per scale of the search range, the effective rank the spectra measured as a fraction of the
    scale's tokens (95% of the energy; the largest over the layers measured). Empty without spectra."""
    lo, n = search_bounds(record)
    out: dict[int, float] = {}
    for r in record.spectra:
        if lo <= r["scale"] < n and r.get("eff_rank_frac_95") is not None:
            out[r["scale"]] = max(out.get(r["scale"], 0.0), float(r["eff_rank_frac_95"]))
    return out if len(out) == n - lo else {}


#: the factors the spectral seed scales the effective-rank fractions by, largest first
SPECTRAL_FACTORS = tuple(round(3.0 * 0.9 ** i, 3) for i in range(30))


def spectral_seed_params(record: CalibrationRecord, fits) -> tuple[str, dict[str, Any]] | None:
    """The seed whose keep ratio at each scale of the search range follows the effective rank the
    spectra measured there (:func:`spectral_fractions`): the fractions times the largest factor of
    :data:`SPECTRAL_FACTORS` whose plan ``fits``, each rounded to the nearest ratio of
    :data:`KEEPS` (at most 1), guidance dropped from :func:`guidance_floor`, the least damaging
    selection per scale. A scale whose features have few directions keeps few tokens; where the
    scales differ, the budget goes where the features are richest. (name, parameters), or None
    without spectra or when no factor fits."""
    fractions = spectral_fractions(record)
    if not fractions:
        return None
    lo, n = search_bounds(record)
    for factor in SPECTRAL_FACTORS:
        params = dict(seed_params(record)["identity"], first_accelerated=lo, cond_only_from=guidance_floor(record))
        for k, frac in fractions.items():
            keep = min(KEEPS, key=lambda r: (abs(r - min(1.0, frac * factor)), r))
            params[f"keep_{k}"] = keep
            params[f"selection_{k}"] = least_damaging_selection(record, k, keep)
        if fits(params):
            return f"spectral@{factor:g}", params
    return None


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


#: seeds of the objective's extra image sets: the record's seeds + this x the set's number
EXTRA_SEED_STEP = 100


@dataclasses.dataclass
class ImageSet:
    """Images a trial is measured on: prompts x seeds (a :class:`Subject`) and the full model's
    images of them, with the scorer's verdicts on those."""

    subject: Subject
    reference: Any
    reference_semantic: Any = None

    @classmethod
    def of(cls, subject: Subject, scorer) -> "ImageSet":
        ref = subject.run(None)
        return cls(subject, ref, scorer.reference_verdicts(ref.images, subject.item_prompts))


def set_count(items: int, images: int) -> int:
    """How many image sets of ``items`` images make ``images`` (rounded up; at least one).

    >>> set_count(8, 32), set_count(8, 8), set_count(8, 20), set_count(8, 1)
    (4, 1, 3, 1)
    """
    return max(1, -(-int(images) // int(items)))


def objective_sets(subject: Subject, scorer, images: int) -> list[ImageSet]:
    """The image sets a trial may be measured on, ``images`` in all (rounded up to whole sets): the
    record's prompts x seeds first, then the same prompts with other seeds (``EXTRA_SEED_STEP``)."""
    rounds = set_count(len(subject.items), images)
    sets = [ImageSet.of(subject, scorer)]
    for r in range(1, rounds):
        more = Subject(subject.adapter, subject.prompts, [s + EXTRA_SEED_STEP * r for s in subject.seeds],
                       subject.batch_size, subject.guidance, engine=subject.engine)
        sets.append(ImageSet.of(more, scorer))
    return sets


def search_pruner() -> optuna.pruners.BasePruner:
    """After each image set, a trial goes on only while its quality so far ranks in the top quarter
    of the trials measured that far (the first five trials are never stopped)."""
    return optuna.pruners.PercentilePruner(75.0, n_startup_trials=5, n_warmup_steps=0)


class Objective:
    """Quality against the full model of the policy a trial suggests, on the record's images and,
    while the trial ranks in the top quarter (:func:`search_pruner`), on the ``more`` image sets
    (:func:`objective_sets`): most trials cost one set and the plans that compete for the budget
    are compared on all of them. Latency is predicted from the record (the constraint); clearly
    infeasible trials are estimated from the sensitivities instead of measured."""

    def __init__(self, record: CalibrationRecord, subject: Subject, latency: LatencyModel, budget_s: float | None,
                 scorer, reference, reference_semantic=None, more: Sequence[ImageSet] = (), margin: float = LATENCY_MARGIN):
        self.record, self.subject, self.latency = record, subject, latency
        self.budget_s, self.scorer = budget_s, scorer
        self.sets = [ImageSet(subject, reference, reference_semantic), *more]
        self.tokens = subject.adapter.tokens_per_scale()
        # skipping is judged against the target the search aims at (the budget less the margin)
        self.allow_skip = skipping_allowed(record, latency, self.tokens, None if budget_s is None else budget_s * (1 - margin))

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
        parts: list[dict[str, Any]] = []
        m: dict[str, Any] = {}
        for extra in self.sets if self.budget_s is not None else self.sets[:1]:
            if parts:                                    # after a set: go on only while the trial ranks well
                trial.report(m["quality"], step=m["images"])
                if trial.should_prune():
                    raise optuna.TrialPruned()
            out = extra.subject.run(point)
            if not parts:
                trial.set_user_attr("measured_latency_s", out.seconds)
                trial.set_user_attr("quality_estimated", False)
            parts.append(per_image(out, extra.reference, extra.subject.item_prompts, self.scorer,
                                   extra.reference_semantic))
            m = self._attrs(trial, parts)
        if self.budget_s is None:
            return m["quality"], predicted
        return m["quality"]

    @staticmethod
    def _attrs(trial, parts) -> dict[str, Any]:
        """The quality over the image sets measured so far, with its attributes on the trial."""
        m = summarize(concat_values(parts))
        for key in ("quality_se", "quality_worst", "ssim", "semantic", "images"):
            trial.set_user_attr(key, m[key])
        return m


#: user attribute of a local-search trial (the number of the trial it was a neighbour of)
LOCAL_ATTR = "local_from"


def is_local(t: optuna.trial.FrozenTrial) -> bool:
    """A trial of :func:`local_search`, not of the sampler (it does not count against ``--trials``)."""
    return LOCAL_ATTR in t.user_attrs


def open_study(name: str, storage, direction_multi: bool, seed: int) -> optuna.Study:
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True)
    if direction_multi:
        return optuna.create_study(study_name=name, storage=storage, load_if_exists=True, sampler=sampler,
                                   directions=["maximize", "minimize"])
    return optuna.create_study(study_name=name, storage=storage, load_if_exists=True, sampler=sampler,
                               pruner=search_pruner(), direction="maximize")


def params_for_point(record: CalibrationRecord, point: OperatingPoint) -> dict[str, Any] | None:
    """The search parameters that describe ``point`` (e.g. an operating point of an earlier
    policy), or None when it lies outside this record's search space (it computes a token subset
    or skips a scale before the search range, drops guidance before :func:`guidance_floor`, uses a
    keep ratio the space lacks, or mixes restore modes / layer ranges across scales). The inverse of :func:`point_from_params` on the plans."""
    lo, n = search_bounds(record)
    depth = record.inputs["num_layers"]
    plans = list(point.plans)
    if len(plans) != n:
        return None
    changed = [p.scale for p in plans if not p.is_identity]
    if any(k < guidance_floor(record) for k in changed) or any(k < lo and (p.skip or p.is_subset) for k, p in enumerate(plans)):
        return None
    subsets = [p for p in plans if p.is_subset and not p.skip]
    params: dict[str, Any] = {
        "first_accelerated": min((k for k in changed if k >= lo), default=n),
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
