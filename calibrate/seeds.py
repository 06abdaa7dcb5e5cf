"""The policies a study is seeded with (``enqueue_trial``), each given as search parameters
(:func:`calibrate.search.suggest_policy`):

* the baselines (:func:`seed_params`): the identity policy, a paper-like policy (refinement = the
  last three scales, guidance dropped, a fixed random-projection keep ratio) and a FastVAR-like
  policy (deviation-selected tokens in the middle layers at the two scales before the last two,
  60% / 50% kept, the last two skipped: :func:`stagevar.baselines.fastvar_policy` within this
  search space);
* when none of them (nor a warm-start point) meets the budget without skipping scales, the
  budget-fitted seeds (:func:`budget_seed_params`): for each first accelerated scale of the
  search range, guidance dropped there and the largest uniform keep ratio predicted to meet the
  target, and variants that spend what is left on one scale, so that plans accelerating every
  late scale are measured at tight budgets, not only plans that skip scales; the same again with
  guidance dropped from :func:`calibrate.search.guidance_floor` (before the token range, where
  the sensitivity pass found dropping it harmless), and a plan whose keep ratios follow the
  spectra's effective ranks (:func:`spectral_seed_params`);
* with ``--warm-start POLICY``, the operating points of an earlier policy
  (:func:`params_for_point`), so recalibrating after a change (new weights, another default
  guidance) starts from the plans that worked before; the sampler and the local search go on
  from there.
"""
from __future__ import annotations

import logging
from typing import Any

import optuna

from calibrate.measure.latency import LatencyModel
from calibrate.record import CalibrationRecord
from calibrate.search import (KEEPS, RESTORES, SELECTIONS, guidance_floor, identity_params, point_from_params,
                              search_bounds)
from stagevar.policy import OperatingPoint

log = logging.getLogger(__name__)


def seed_params(record: CalibrationRecord) -> dict[str, dict[str, Any]]:
    """Parameters of the enqueued baselines: identity, paper-like, FastVAR-like."""
    lo, n = search_bounds(record)
    depth = record.inputs["num_layers"]
    identity = base = identity_params(record)
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
    (``fitted:spectral@factor``, :func:`spectral_seed_params`). A start that cannot meet the budget even at the smallest keep
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


def fitted_seeds(record: CalibrationRecord, latency: LatencyModel, tokens: list[int], budgets, budgets_s: list[float],
                 margin: float, enqueued: list[dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The budget-fitted seeds (:func:`budget_seed_params`) of every budget a study searches, each
    fitted to its budget less ``margin``; with several budgets (one study for all), each seed's
    name ends in ``@`` and its budget (``fitted:g3:6@0.3@3x``)."""
    out: dict[str, dict[str, Any]] = {}
    for budget, budget_s in zip(budgets, budgets_s):
        seeds = budget_seed_params(record, latency, tokens, budget_s * (1 - margin), enqueued)
        out.update(seeds if len(budgets) == 1 else {f"{name}@{budget.name}": params for name, params in seeds.items()})
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
        params = dict(identity_params(record), first_accelerated=lo, cond_only_from=guidance_floor(record))
        for k, frac in fractions.items():
            keep = min(KEEPS, key=lambda r: (abs(r - min(1.0, frac * factor)), r))
            params[f"keep_{k}"] = keep
            params[f"selection_{k}"] = least_damaging_selection(record, k, keep)
        if fits(params):
            return f"fitted:spectral@{factor:g}", params
    return None


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
