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
* The study is seeded with baselines, budget-fitted and spectral plans and a warm start's points:
  :mod:`calibrate.seeds`.
* After the sampler, :func:`local_search` hill-climbs from the best trial through one-move
  neighbours (:func:`neighbours`) predicted within the target (the budget less a margin).
* Several budgets share one study (``band``): its objectives are quality (maximised) and predicted
  latency (minimised), the sampler searches their front over the budgets' latency range, and each
  budget's plan is chosen from that front. A trial goes on to more image sets while it ranks in the
  top quarter of the trials predicted within 10% of its latency (the pruner compares a budget's
  trials, which all lie near the budget; on a front, only neighbours are comparable).
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
#: a study of several budgets measures trials predicted from this share of the fastest budget's
#: latency up to :data:`INFEASIBLE_MARGIN` over the slowest's; the others are estimated
FRONT_LOW = 0.8
#: on a front, a trial is compared with the trials predicted within this factor of its latency
FRONT_BAND = 1.10
#: ... once this many of them were measured on as many images (before: it goes on)
FRONT_STARTUP = 4
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


def identity_params(record: CalibrationRecord) -> dict[str, Any]:
    """The parameters of the identity policy: nothing accelerated, every keep 1.0."""
    lo, n = search_bounds(record)
    params: dict[str, Any] = {"restore": "cached_update", "layer_start": 0}
    for k in range(lo, n):
        params[f"keep_{k}"] = 1.0
        params[f"selection_{k}"] = "random_projection"
    return dict(params, skip_from=n, first_accelerated=n, cond_only_from=n)


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
        params = dict(identity_params(record), first_accelerated=lo, cond_only_from=guidance_floor(record))
        params.update({f"keep_{k}": min(KEEPS) for k in range(lo, n)})
        params.update({f"selection_{k}": sel for k in range(lo, n)})
        if latency.predict(point_from_params(record, params), tokens) <= budget_s:
            return False
    return True


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
        sets.append(ImageSet.of(subject.reseeded(EXTRA_SEED_STEP * r), scorer))
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
    infeasible trials are estimated from the sensitivities instead of measured.

    With ``band`` (the fastest and the slowest budget's latency, seconds; ``budget_s`` is then
    None) the objective serves one study of several budgets: it returns (quality, predicted
    latency), a trial is feasible when predicted from :data:`FRONT_LOW` x the fastest latency to
    :data:`INFEASIBLE_MARGIN` x the slowest (outside, estimated), and a trial that falls behind
    the trials predicted near its latency (:meth:`keeps_up`) stops after the set it ranked on: it
    completes, marked ``stopped_early``, and is never a verification candidate, as a pruned trial."""

    def __init__(self, record: CalibrationRecord, subject: Subject, latency: LatencyModel, budget_s: float | None,
                 scorer, reference, reference_semantic=None, more: Sequence[ImageSet] = (), margin: float = LATENCY_MARGIN,
                 band: tuple[float, float] | None = None):
        self.record, self.subject, self.latency = record, subject, latency
        self.budget_s, self.scorer, self.band = budget_s, scorer, band
        self.sets = [ImageSet(subject, reference, reference_semantic), *more]
        self.tokens = subject.adapter.tokens_per_scale()
        # skipping is judged against the target the search aims at (the budget less the margin);
        # on a front, the fastest budget's
        tight = band[0] if band is not None else budget_s
        self.allow_skip = skipping_allowed(record, latency, self.tokens, None if tight is None else tight * (1 - margin))

    @classmethod
    def for_budgets(cls, record: CalibrationRecord, subject: Subject, latency: LatencyModel, budgets_s: Sequence[float],
                    scorer, sets: Sequence[ImageSet], margin: float = LATENCY_MARGIN) -> "Objective":
        """The objective of a study of these budgets (seconds): one budget, the constraint; several,
        the ``band`` from the fastest to the slowest."""
        several = len(budgets_s) > 1
        return cls(record, subject, latency, None if several else budgets_s[0], scorer, sets[0].reference,
                   sets[0].reference_semantic, more=sets[1:], margin=margin,
                   band=(min(budgets_s), max(budgets_s)) if several else None)

    def __call__(self, trial: optuna.trial.Trial) -> float | tuple[float, float]:
        point = suggest_policy(trial, self.record, self.allow_skip)
        predicted = self.latency.predict(point, self.tokens)
        trial.set_user_attr("predicted_latency_s", predicted)
        trial.set_user_attr("predicted_speedup", self.latency.baseline(self.tokens) / predicted)
        over = self._over(predicted)
        if over is not None:
            trial.set_constraint("latency", over)
            if over > 0 and (self.band is not None or predicted > self.budget_s * INFEASIBLE_MARGIN):
                trial.set_user_attr("quality_estimated", True)
                estimate = estimated_quality(self.record, point)
                return (estimate, predicted) if self.band is not None else estimate
        parts: list[dict[str, Any]] = []
        m: dict[str, Any] = {}
        steps: dict[str, float] = {}
        sets = self.sets if over is not None else self.sets[:1]
        for extra in sets:
            if parts:                                    # after a set: go on only while the trial ranks well
                if self.band is not None:
                    if not self.keeps_up(trial, m["quality"], m["images"], predicted):
                        trial.set_user_attr("stopped_early", True)
                        break
                else:
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
            steps[str(m["images"])] = m["quality"]
            trial.set_user_attr("quality_steps", steps)
        if self.budget_s is None:
            return m["quality"], predicted
        return m["quality"]

    def _over(self, predicted: float) -> float | None:
        """The latency constraint's value (<= 0: feasible; None: no budget). On a front, how far
        ``predicted`` lies outside the measured range, in seconds."""
        if self.band is not None:
            return max(predicted - self.band[1] * INFEASIBLE_MARGIN, self.band[0] * FRONT_LOW - predicted)
        return None if self.budget_s is None else predicted - self.budget_s

    @staticmethod
    def keeps_up(trial: optuna.trial.Trial, quality: float, images: int, predicted: float) -> bool:
        """Whether a trial of a front study goes on to the next image set: its ``quality`` on
        ``images`` images ranks in the top quarter of the other trials predicted within
        :data:`FRONT_BAND` of its latency, on as many images (the pruner's rule, among the trials
        it is comparable with); with fewer than :data:`FRONT_STARTUP` such trials, it goes on."""
        others = []
        for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            q = (t.user_attrs.get("quality_steps") or {}).get(str(images))
            p = t.user_attrs.get("predicted_latency_s")
            if t.number != trial.number and q is not None and p and predicted / FRONT_BAND <= p <= predicted * FRONT_BAND:
                others.append(q)
        return len(others) < FRONT_STARTUP or quality >= float(np.percentile(others, 75.0))

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


def quality_of(t: optuna.trial.FrozenTrial) -> float:
    """A finished trial's quality, in a study of one budget (one objective) or of several (quality
    and latency)."""
    return t.values[0]


def summarize_trial(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {"number": t.number, "quality": None if t.values is None else quality_of(t),
            **{k: v for k, v in t.user_attrs.items() if isinstance(v, (int, float, str, bool))}}


def quality_table(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "worst": float(np.min(values))}
