"""The policy search: its space, seeds and budget-fitted seeds, skipping, candidates, local
search, budgets and the objective's constraints, on hand-built records and the small measured
one."""
from __future__ import annotations

import json

import numpy as np
import optuna
import pytest

import calibrate.measure.common as common
from calibrate.measure.common import variant_grid
from calibrate.measure.latency import LatencyModel
from calibrate.metrics import scorer_for
from calibrate.budget import BudgetError, parse_budget, parse_budgets
from calibrate.candidates import feasible_ranked, neighbours
from calibrate.search import Objective, open_study, point_from_params, search_bounds, suggest_policy
from calibrate.seeds import enqueue_seeds, seed_params
from stagevar.models.registry import load_model
from stagevar.policy import OperatingPoint, ScalePlan

from calib import hand_record, record_variants

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------ 8. search
def test_seed_policies_expected_plans():
    rec = hand_record(n=7, depth=2, refinement_start=4)        # search may start at scale 3
    seeds = seed_params(rec)
    assert list(seeds) == ["identity", "paper-like", "fastvar-like"]
    ident = suggest_policy(optuna.trial.FixedTrial(seeds["identity"]), rec)
    assert len(ident.plans) == 7 and all(p.is_identity for p in ident.plans)
    assert [p.scale for p in ident.plans] == list(range(7))

    paper = suggest_policy(optuna.trial.FixedTrial(seeds["paper-like"]), rec)
    for p in paper.plans:
        if p.scale < 4:
            assert p.is_identity, p
        else:                                       # the last three: guidance dropped, keep 0.5
            assert (p.guidance, p.keep, p.selection, p.layers) == ("cond_only", 0.5, "random_projection", None), p
    assert paper.stages["refinement"] == (4, 6)

    fv = suggest_policy(optuna.trial.FixedTrial(seeds["fastvar-like"]), rec)
    assert all(p.is_identity for p in fv.plans[:3])
    assert [p.keep for p in fv.plans[3:5]] == [0.6, 0.5] and all(p.skip for p in fv.plans[5:])
    assert all(p.selection == "deviation" and p.guidance == "cfg" for p in fv.plans[3:5])
    assert fv.stages["refinement"] == (3, 6)


def test_warm_start_points_round_trip_through_the_search_space():
    """An earlier policy's operating points become search parameters that replay to the same
    plans; points outside the space are refused (None), and enqueue_seeds reports them."""
    from calibrate.seeds import params_for_point
    rec = hand_record(n=7, depth=8, refinement_start=4)            # search range 3..6, layer_start <= 2
    seeds = seed_params(rec)
    rng = np.random.default_rng(0)
    cases = list(seeds.values()) + [dict(seeds["paper-like"], first_accelerated=3, cond_only_from=5, skip_from=6,
                                         keep_3=0.2, selection_3="deviation", keep_4=1.0, restore="cached_output",
                                         layer_start=2)]
    for _ in range(20):                                              # random points of the space
        c = dict(seeds["identity"], first_accelerated=int(rng.integers(3, 8)), cond_only_from=int(rng.integers(3, 8)),
                 skip_from=int(rng.integers(3, 8)), layer_start=int(rng.integers(0, 3)))
        for k in range(3, 7):
            c[f"keep_{k}"] = float(rng.choice([1.0, 0.5, 0.2, 0.1]))
            c[f"selection_{k}"] = str(rng.choice(["random_projection", "deviation", "uniform"]))
        cases.append(c)
    for c in cases:
        point = point_from_params(rec, c)
        back = params_for_point(rec, point)
        assert back is not None and point_from_params(rec, back).plans == point.plans, c
    ident = point_from_params(rec, seeds["identity"])
    early = OperatingPoint(ident.stages, (ScalePlan(0), ScalePlan(1, keep=0.5)) + ident.plans[2:])   # before the range
    odd_keep = OperatingPoint(ident.stages, ident.plans[:5] + (ScalePlan(5, keep=0.33), ScalePlan(6)))
    short = OperatingPoint(ident.stages, ident.plans[:6])
    assert params_for_point(rec, early) is None and params_for_point(rec, odd_keep) is None
    assert params_for_point(rec, short) is None

    study = open_study("warm", optuna.storages.InMemoryStorage(), direction_multi=False, seed=0)
    left_out = enqueue_seeds(study, rec, {"3x": point_from_params(rec, cases[-1]), "odd": odd_keep})
    assert left_out == ["odd"]
    queued = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert [t.user_attrs["seed_policy"] for t in queued] == ["identity", "paper-like", "fastvar-like", "warm-start:3x"]
    asked = [suggest_policy(study.ask(), rec) for _ in queued]          # the sampler hands out the queue in order
    assert asked[-1].plans == point_from_params(rec, cases[-1]).plans
    assert enqueue_seeds(study, rec, {"3x": point_from_params(rec, cases[-1])}) == []        # seeded once


def _linear_latency(n: int, tokens: list[int]) -> LatencyModel:
    """Per-scale time proportional to the tokens computed: cfg 2 rows per token, cond 1, a subset
    at keep r computes r of them (random projection and deviation alike)."""
    variants = variant_grid((0.5, 0.25), ("random_projection", "deviation"))
    rows = [{"scale": k, "variant": v.name, "seconds": 1e-3 * tokens[k] * (1 if v.guidance == "cond_only" else 2) * v.keep,
             "p90": 0.0} for v in variants for k in range(n)]
    return LatencyModel({"rows": rows, "overhead_s": 0.01}, variants, depth=2)


def test_budget_seeds_fit_the_budget_with_the_largest_uniform_keep_then_spend_what_is_left():
    from calibrate.search import KEEPS
    from calibrate.seeds import budget_seed_params, least_damaging_selection
    rec = hand_record(n=7, depth=2, refinement_start=4)                 # search range 3..6
    rec.sensitivity = [{"scale": 5, "keep": 0.5, "selection": "deviation", "damage": 0.01},
                       {"scale": 5, "keep": 0.5, "selection": "random_projection", "damage": 0.20},
                       {"scale": 5, "keep": 0.25, "selection": "deviation", "damage": 0.30},
                       {"scale": 5, "keep": 0.25, "selection": "random_projection", "damage": 0.10},
                       {"scale": 6, "keep": 1.0, "selection": "random_projection", "damage": 0.00}]   # guidance row
    assert least_damaging_selection(rec, 5, 0.6) == "deviation"           # nearest measured keep: 0.5
    assert least_damaging_selection(rec, 5, 0.2) == "random_projection"   # nearest: 0.25
    assert least_damaging_selection(rec, 6, 0.5) == "random_projection"   # nothing measured: the default
    tokens = [1, 4, 16, 36, 64, 100, 169]
    lm = _linear_latency(7, tokens)
    full = lm.baseline(tokens)
    paper = lm.predict(point_from_params(rec, seed_params(rec)["paper-like"]), tokens)   # 2.7x
    assert budget_seed_params(rec, lm, tokens, paper) == {}               # the paper-like seed meets it: none added
    for budget in (paper * 0.99, full / 3, full / 4, full / 5):
        assert budget < paper
        seeds = budget_seed_params(rec, lm, tokens, budget)
        assert seeds
        starts = []
        uniform = {name: params for name, params in seeds.items() if "," not in name}
        for name, params in seeds.items():
            if "," in name:                       # the parent's left-over budget spent on one scale
                parent = uniform[name.split(",")[0]]
                changed = [k for k in params if params[k] != parent[k]]
                f = int(changed[0].split("_")[1])
                assert set(changed) <= {f"keep_{f}", f"selection_{f}"} and params[f"keep_{f}"] > parent[f"keep_{f}"]
                assert name == f"{name.split(',')[0]},{f}@{params[f'keep_{f}']:g}"
                assert lm.predict(point_from_params(rec, params), tokens) <= budget
                i = KEEPS.index(params[f"keep_{f}"])
                if i > 0:                          # one notch more on that scale misses the budget
                    assert lm.predict(point_from_params(rec, dict(params, **{f"keep_{f}": KEEPS[i - 1]})), tokens) > budget
        for name, params in uniform.items():
            point = point_from_params(rec, params)
            s, keep = params["first_accelerated"], params[f"keep_{params['first_accelerated']}"]
            starts.append(s)
            assert name == f"fitted:{s}@{keep:g}"
            assert lm.predict(point, tokens) <= budget
            assert all(p.is_identity for p in point.plans[:s])
            assert all(p.guidance == "cond_only" and not p.skip and p.keep == keep for p in point.plans[s:])
            if keep < 1.0:
                assert [p.selection for p in point.plans[s:]] == [least_damaging_selection(rec, k, keep) for k in range(s, 7)]
            if keep != KEEPS[0]:                                          # one notch more tokens misses the budget
                looser = dict(params, **{f"keep_{k}": KEEPS[KEEPS.index(keep) - 1] for k in range(s, 7)})
                assert lm.predict(point_from_params(rec, looser), tokens) > budget
        assert starts == sorted(starts) and set(starts) <= set(range(3, 7))
        for s in set(range(3, 7)) - set(starts):                          # a missing start cannot meet the budget
            tight = dict(seed_params(rec)["identity"], first_accelerated=s, cond_only_from=s,
                         **{f"keep_{k}": KEEPS[-1] for k in range(s, 7)})
            assert lm.predict(point_from_params(rec, tight), tokens) > budget
    assert [k for k in budget_seed_params(rec, lm, tokens, paper * 0.99) if "," not in k] == \
        ["fitted:3@0.6", "fitted:4@0.4", "fitted:5@0.1"]
    assert any("," in k for k in budget_seed_params(rec, lm, tokens, full / 4))
    assert budget_seed_params(rec, lm, tokens, full / 100) == {}          # an impossible budget: none
    # an enqueued plan (a warm start's point) that computes every scale within the budget: none;
    # one that gets there by skipping scales does not count
    budget = full / 4
    fitted = budget_seed_params(rec, lm, tokens, budget)
    every_scale = next(iter(fitted.values()))
    assert every_scale["first_accelerated"] == 3
    skipping = dict(seed_params(rec)["identity"], first_accelerated=3, cond_only_from=3, skip_from=4)
    assert lm.predict(point_from_params(rec, skipping), tokens) <= budget
    assert budget_seed_params(rec, lm, tokens, budget, [every_scale]) == {}
    assert budget_seed_params(rec, lm, tokens, budget, [skipping]) == fitted

    study = open_study("fitted", optuna.storages.InMemoryStorage(), direction_multi=False, seed=0)
    fitted = budget_seed_params(rec, lm, tokens, full / 3)
    enqueue_seeds(study, rec, fitted=fitted)
    queued = [t.user_attrs["seed_policy"] for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert queued == ["identity", "paper-like", "fastvar-like", *fitted]


def test_scales_are_skipped_only_when_no_plan_computing_every_scale_meets_the_budget():
    from types import SimpleNamespace

    from calibrate.candidates import verification_candidates
    from calibrate.search import skipping_allowed
    rec = hand_record(n=7, depth=2, refinement_start=4)                 # search range 3..6
    tokens = [1, 4, 16, 36, 64, 100, 169]
    lm = _linear_latency(7, tokens)
    full = lm.baseline(tokens)
    cheapest = dict(seed_params(rec)["identity"], first_accelerated=3, cond_only_from=3,
                    **{f"keep_{k}": 0.1 for k in range(3, 7)})
    floor = lm.predict(point_from_params(rec, cheapest), tokens)        # the cheapest plan computing every scale
    assert full / 3 > floor
    assert not skipping_allowed(rec, lm, tokens, full / 3) and not skipping_allowed(rec, lm, tokens, floor)
    assert skipping_allowed(rec, lm, tokens, floor * 0.99) and skipping_allowed(rec, lm, tokens, None)
    # the objective judges against its target, the budget less the margin: a budget the cheapest
    # plan meets only within the margin allows skipping
    subject = SimpleNamespace(adapter=SimpleNamespace(tokens_per_scale=lambda: tokens))
    assert not Objective(rec, subject, lm, floor / 0.99, None, None, margin=0.0).allow_skip
    assert Objective(rec, subject, lm, floor / 0.99, None, None, margin=0.05).allow_skip
    assert not Objective(rec, subject, lm, floor / 0.9, None, None, margin=0.05).allow_skip
    # the study's space, its seeds, the local search's moves and the candidates follow the rule
    study = open_study("noskip", optuna.storages.InMemoryStorage(), direction_multi=False, seed=0)
    enqueue_seeds(study, rec, allow_skip=False)
    queued = [t.user_attrs["seed_policy"] for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert queued == ["identity", "paper-like"]                           # the FastVAR-like seed skips two scales
    for _ in range(30):
        t = study.ask()
        point = suggest_policy(t, rec, allow_skip=False)
        assert not any(p.skip for p in point.plans)
        study.tell(t, 0.5)
    skipping = dict(cheapest, skip_from=5)
    assert any(nb["skip_from"] < 7 for nb in neighbours(rec, cheapest))
    assert all(nb["skip_from"] == 7 for nb in neighbours(rec, cheapest, allow_skip=False))
    trials = [SimpleNamespace(number=i, params=params, value=value, values=[value], user_attrs={"predicted_latency_s": 0.5})
              for i, (params, value) in enumerate(((skipping, 0.9), (cheapest, 0.8)))]
    assert [t.value for t, _ in verification_candidates(rec, trials, 1.0, k=3, k_near=0)] == [0.9, 0.8]
    assert [t.value for t, _ in verification_candidates(rec, trials, 1.0, k=3, k_near=0, allow_skip=False)] == [0.8]


def test_search_reaches_the_span_of_the_published_policies():
    """Stages measured late (refinement = the last scale only) still leave the last four scales to
    the search, so the FastVAR-like seed is the published FastVAR plan, not a truncated one."""
    from stagevar.baselines import fastvar_policy
    rec = hand_record(n=10, depth=8, refinement_start=9)
    assert search_bounds(rec) == (6, 10)
    assert search_bounds(hand_record(n=10, depth=8, refinement_start=5)) == (4, 10)   # early stages: earlier
    fv = suggest_policy(optuna.trial.FixedTrial(seed_params(rec)["fastvar-like"]), rec)
    ref = fastvar_policy(load_model("infinity-mini"))
    for got, want in zip(fv.plans, ref.plans):
        assert (got.skip, got.keep, got.selection, got.guidance) == (want.skip, want.keep, want.selection, want.guidance)


def test_verification_candidates_are_distinct_policies():
    from types import SimpleNamespace

    from calibrate.candidates import distinct_candidates
    rec = hand_record(n=7, depth=2, refinement_start=4)
    seeds = seed_params(rec)
    # identity with other keep ratios / selections: nothing is accelerated, so the same policy
    ident2 = dict(seeds["identity"], keep_4=0.1, selection_5="deviation")
    # a skipped scale's keep ratio does not matter either
    skip_a = dict(seeds["paper-like"], skip_from=6, keep_6=0.5)
    skip_b = dict(seeds["paper-like"], skip_from=6, keep_6=0.1)
    ranked = [SimpleNamespace(number=i, params=p) for i, p in
              enumerate([seeds["identity"], ident2, skip_a, skip_b, seeds["paper-like"], seeds["fastvar-like"]])]
    got = distinct_candidates(rec, ranked, 3)
    assert [t.number for t, _ in got] == [0, 2, 4]                 # best first, duplicates skipped
    assert got[1][1].plans[6].skip and not got[2][1].plans[6].skip
    assert [t.number for t, _ in distinct_candidates(rec, ranked, 10)] == [0, 2, 4, 5]


def test_verification_also_measures_trials_just_over_the_budget():
    """Trials predicted up to 10% over the budget are verified too (the latency model's error band),
    best quality first and never the same policy twice; trials further out are not."""
    from calibrate.candidates import measured_trials, verification_candidates
    rec = hand_record(n=7, depth=2, refinement_start=4)
    seeds = seed_params(rec)
    rows = [(seeds["paper-like"], 0.80, 0.90),                      # 0 feasible
            (seeds["fastvar-like"], 0.95, 1.05),                    # 1 near
            (seeds["identity"], 1.00, 1.30),                        # 2 too slow even for the margin
            (dict(seeds["paper-like"], keep_6=0.1), 0.99, 1.08),    # 3 near
            (dict(seeds["paper-like"], keep_3=0.1), 0.97, 1.02)]    # 4 near, but trial 0's policy (scale 3 not accelerated)
    study = optuna.create_study(direction="maximize")
    for params, _, _ in rows:
        study.enqueue_trial(params)

    def objective(trial):
        suggest_policy(trial, rec)
        _, quality, predicted = rows[trial.number]
        trial.set_user_attr("predicted_latency_s", predicted)
        trial.set_constraint("latency", predicted - 1.0)
        return quality

    study.optimize(objective, n_trials=len(rows))
    trials = measured_trials(study)
    got = verification_candidates(rec, trials, 1.0, k=3, k_near=2)
    assert [t.number for t, _ in got] == [0, 3, 1]
    assert [t.number for t, _ in verification_candidates(rec, trials, 1.0, k=3, k_near=0)] == [0]
    # the near band may reach further (the calibrate command: 10% over the budget, not the target)
    got = verification_candidates(rec, trials, 1.0, k=3, k_near=3, near_s=1.31)
    assert [t.number for t, _ in got] == [0, 2, 3, 1]
    assert [t.number for t, _ in verification_candidates(rec, trials, 1.0, k=3, k_near=2, near_s=1.06)] == [0, 1]
    # the predicted latency is absolute: for a budget of 1.1 s, trials 3 and 4 are within it, and
    # trial 4 (trial 0's policy) counts once; a trial from another budget's study ranks the same way
    got = verification_candidates(rec, trials, 1.1, k=3, k_near=0)
    assert [t.number for t, _ in got] == [3, 4, 1]
    # a cushion: when no candidate is predicted within it, the last slot goes to the best one that is
    assert [t.number for t, _ in verification_candidates(rec, trials, 1.1, k=2, k_near=0)] == [3, 4]
    assert [t.number for t, _ in verification_candidates(rec, trials, 1.1, k=2, k_near=0, cushion_s=1.0)] == [3, 0]
    assert [t.number for t, _ in verification_candidates(rec, trials, 1.1, k=2, k_near=0, cushion_s=1.03)] == [3, 4]
    assert [t.number for t, _ in verification_candidates(rec, trials, 1.1, k=2, k_near=0, cushion_s=0.5)] == [3, 4]


def test_neighbours_are_single_moves_inside_the_space():
    from calibrate.search import KEEPS
    rec = hand_record(n=7, depth=8, refinement_start=4)
    params = dict(seed_params(rec)["paper-like"], keep_5=0.5, layer_start=2)
    got = neighbours(rec, params)
    for nb in got:
        assert set(nb) == set(params)
        assert sum(nb[k] != params[k] for k in params) == 1
        suggest_policy(optuna.trial.FixedTrial(nb), rec)            # a valid point of the space
    moved = [next(k for k in params if nb[k] != params[k]) for nb in got]
    # 4 searched scales: keep 0.5 -> 0.6 / 0.4, keep 1.0 -> 0.75 only; two other selections each
    assert sorted(nb["keep_5"] for nb in got if moved[got.index(nb)] == "keep_5") == [0.4, 0.6]
    assert [nb["keep_3"] for nb, m in zip(got, moved) if m == "keep_3"] == [KEEPS[1]]
    assert moved.count("selection_6") == 2 and moved.count("restore") == 1
    assert sorted(nb["layer_start"] for nb, m in zip(got, moved) if m == "layer_start") == [1]   # 2 is the top (8 // 4)
    assert sorted(nb["first_accelerated"] for nb, m in zip(got, moved) if m == "first_accelerated") == [3, 5]
    assert len({json.dumps(nb, sort_keys=True) for nb in got}) == len(got)


def test_scales_computed_in_full_carry_no_token_settings():
    """Selection, restoration and layer range mean nothing for a scale computed in full: they are
    not written, so two parameter sets differing only there are the same policy."""
    rec = hand_record(n=7, depth=8, refinement_start=4)
    params = dict(seed_params(rec)["paper-like"], keep_6=1.0, selection_6="uniform", restore="cached_output", layer_start=2)
    point = point_from_params(rec, params)
    assert point.plans[6] == ScalePlan(6, guidance="cond_only")
    assert point.plans[5].keep == 0.5 and point.plans[5].layers == (2, 8) and point.plans[5].restore == "cached_output"
    other = point_from_params(rec, dict(params, selection_6="deviation"))
    assert other == point


class _ToyObjective:
    """Stands in for :class:`Objective`: latency and quality are known functions of the point."""

    tokens = None

    def __init__(self, rec):
        self.rec, self.calls = rec, []
        self.latency = type("L", (), {"predict": staticmethod(lambda point, tokens: self.cost(point))})()

    @staticmethod
    def cost(point):
        return sum(0.0 if p.skip else 2.0 ** p.scale * p.keep * (0.5 if p.guidance == "cond_only" else 1.0)
                   for p in point.plans)

    @staticmethod
    def quality(point):
        damage = 0.0
        for p in point.plans:
            if p.skip:
                damage += 0.4
            elif not p.is_identity:
                damage += (1 - p.keep) * (0.05 if p.selection == "deviation" else 0.2) + (0.02 if p.guidance == "cond_only" else 0)
        return 1.0 - damage

    def __call__(self, trial):
        point = suggest_policy(trial, self.rec)
        self.calls.append(json.dumps([p.to_dict() for p in point.plans], sort_keys=True))
        trial.set_user_attr("predicted_latency_s", self.cost(point))
        return self.quality(point)


def test_local_search_climbs_to_a_better_policy_within_the_target():
    from calibrate.candidates import local_search, measured_trials, ranked_within
    rec = hand_record(n=7, depth=2, refinement_start=4)
    obj = _ToyObjective(rec)
    full = obj.cost(point_from_params(rec, seed_params(rec)["identity"]))
    target = 0.6 * full
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    # the sampler's result: random-projection subsets, the best of them just over the target
    start = dict(seed_params(rec)["identity"], first_accelerated=5, keep_5=0.5, keep_6=0.5)
    inside = dict(start, keep_6=0.3)
    for params in (start, inside):
        study.enqueue_trial(params)
    study.optimize(obj, n_trials=2)
    sampled = measured_trials(study)
    assert sampled[0].user_attrs["predicted_latency_s"] > target >= sampled[1].user_attrs["predicted_latency_s"]
    before = ranked_within(sampled, target)[0].value
    obj.calls.clear()
    added = local_search(study, obj, rec, sampled, target, max_trials=200)
    assert added and all("local_from" in t.user_attrs for t in added)
    assert all(t.user_attrs["predicted_latency_s"] <= target for t in added)     # nothing over the target is measured
    assert len(set(obj.calls)) == len(obj.calls)                              # no policy measured twice
    best = ranked_within(measured_trials(study), target)[0]
    assert best.value > before
    best_point = point_from_params(rec, best.params)
    assert best_point.plans[6].selection == "deviation"                       # the cheap, better selection was found
    # a local optimum: no unmeasured neighbour within the target is better
    for nb in neighbours(rec, best.params):
        pt = point_from_params(rec, nb)
        if obj.cost(pt) <= target:
            assert obj.quality(pt) <= best.value + 1e-12
    # resumed: the study already holds the climb, so nothing is measured again
    obj.calls.clear()
    assert local_search(study, obj, rec, measured_trials(study), target, max_trials=200) == []
    assert obj.calls == []


def test_local_search_runs_neighbours_an_interrupted_run_left_queued_once():
    from calibrate.candidates import _plan_key, local_search, measured_trials
    rec = hand_record(n=7, depth=2, refinement_start=4)
    obj = _ToyObjective(rec)
    study = optuna.create_study(direction="maximize")
    start = dict(seed_params(rec)["identity"], first_accelerated=5, keep_5=0.5, keep_6=0.5)
    study.enqueue_trial(start)
    study.optimize(obj, n_trials=1)
    target = obj.cost(point_from_params(rec, seed_params(rec)["identity"]))
    left_over = [nb for nb in neighbours(rec, start) if obj.cost(point_from_params(rec, nb)) <= target][:2]
    for nb in left_over:                                          # queued, then the run was killed
        study.enqueue_trial(nb, user_attrs={"local_from": 0})
    local_search(study, obj, rec, measured_trials(study), target, max_trials=40)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.WAITING not in states
    local = [t for t in measured_trials(study) if "local_from" in t.user_attrs]
    keys = [_plan_key(point_from_params(rec, t.params)) for t in local]
    assert len(set(keys)) == len(keys)                            # each policy measured once
    assert {_plan_key(point_from_params(rec, nb)) for nb in left_over} <= set(keys)


def test_trials_bound_the_enqueued_seeds_and_the_local_search_runs_only_its_own(caplog):
    """``--trials`` counts every sampler trial, enqueued seeds included: with more seeds than trials
    only the first ones are queued (the rest named in a warning), so the sampler's ``optimize``
    consumes the whole queue; a queue left by a run with a higher ``--trials`` is dropped before
    the local search, which would otherwise run those seeds as its own trials."""
    from calibrate.candidates import local_search, measured_trials
    from calibrate.search import drop_queued_seeds, is_local
    from calibrate.seeds import budget_seed_params
    rec = hand_record(n=7, depth=2, refinement_start=4)
    tokens = [1, 4, 16, 36, 64, 100, 169]
    lm = _linear_latency(7, tokens)
    fitted = budget_seed_params(rec, lm, tokens, lm.baseline(tokens) / 4)
    assert len(fitted) >= 3
    obj = _ToyObjective(rec)
    for trials in (2, 4, 3 + len(fitted)):
        study = open_study(f"cap{trials}", optuna.storages.InMemoryStorage(), direction_multi=False, seed=0)
        with caplog.at_level("WARNING", logger="calibrate.seeds"):
            enqueue_seeds(study, rec, fitted=fitted, limit=trials)
        names = ["identity", "paper-like", "fastvar-like", *fitted]
        assert [t.user_attrs["seed_policy"] for t in study.trials] == names[:trials]
        if trials < len(names):
            assert f"--trials {trials} is fewer than the {len(names)} seed policies" in caplog.text
            named = caplog.text.split("seed policies: ", 1)[1].split(" not tried", 1)[0].split(", ")
            assert named == names[trials:]
        else:
            assert "not tried" not in caplog.text
        caplog.clear()
        study.optimize(obj, n_trials=trials)
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * trials
    # a study seeded for 3 + len(fitted) trials, resumed with --trials 4: the queue beyond is dropped
    study = open_study("lowered", optuna.storages.InMemoryStorage(), direction_multi=False, seed=0)
    enqueue_seeds(study, rec, fitted=fitted, limit=3 + len(fitted))
    study.optimize(obj, n_trials=4)
    assert drop_queued_seeds(study) == len(fitted) - 1
    target = obj.cost(point_from_params(rec, seed_params(rec)["identity"]))
    local_search(study, obj, rec, measured_trials(study), target, max_trials=5)
    sampled = [t for t in study.trials if not is_local(t) and t.state == optuna.trial.TrialState.COMPLETE]
    assert len(sampled) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials if is_local(t))
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]


def test_local_search_respects_its_trial_budget_across_calls():
    from calibrate.candidates import local_search, measured_trials
    rec = hand_record(n=7, depth=2, refinement_start=4)
    obj = _ToyObjective(rec)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(dict(seed_params(rec)["identity"], first_accelerated=5, keep_5=0.5, keep_6=0.5))
    study.optimize(obj, n_trials=1)
    target = obj.cost(point_from_params(rec, seed_params(rec)["identity"]))
    first = local_search(study, obj, rec, measured_trials(study), target, max_trials=3)
    assert len(first) == 3 and {t.user_attrs["local_target_s"] for t in first} == {target}
    assert local_search(study, obj, rec, measured_trials(study), target, max_trials=3) == []
    assert len(local_search(study, obj, rec, measured_trials(study), target, max_trials=5)) <= 2
    # several budgets share a study: another target's climb has its own trials
    assert len(local_search(study, obj, rec, measured_trials(study), 0.9 * target, max_trials=3)) == 3


def test_fastvar_seed_uses_middle_layers_on_deep_models():
    rec = hand_record(n=7, depth=32, refinement_start=4)
    fv = suggest_policy(optuna.trial.FixedTrial(seed_params(rec)["fastvar-like"]), rec)
    assert all(p.layers == (3, 32) for p in fv.plans[3:5])


def test_search_space_is_fixed_size(record):
    rec = hand_record(n=7, depth=2, refinement_start=4)
    expected = {"first_accelerated", "cond_only_from", "skip_from", "restore", "layer_start"} | \
        {f"{w}_{k}" for k in range(3, 7) for w in ("keep", "selection")}
    for params in seed_params(rec).values():
        assert set(params) == expected
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        t = study.ask()
        point = suggest_policy(t, rec)
        assert set(t.params) == expected
        assert len(point.plans) == 7
        # any sampled policy replays exactly through FixedTrial
        assert suggest_policy(optuna.trial.FixedTrial(t.params), rec) == point
        study.tell(t, 0.0)
    # the measured record: the seeds cover the same space as suggest_policy
    names = None
    for params in seed_params(record).values():
        suggest_policy(optuna.trial.FixedTrial(params), record)
        names = names or set(params)
        assert set(params) == names


@pytest.mark.parametrize("text,speedup,seconds", [
    ("3x", 3.0, None), ("2.5x", 2.5, None), ("700ms", None, 0.7), ("1.5s", None, 1.5), (" 3X ", 3.0, None)])
def test_parse_budget_accepts(text, speedup, seconds):
    b = parse_budget(text)
    assert b.speedup == speedup
    assert b.seconds == pytest.approx(seconds) if seconds is not None else b.seconds is None
    assert b.target_seconds(2.0) == pytest.approx(2.0 / speedup if speedup else seconds)


def test_parse_budgets_list():
    bs = parse_budgets("2x,3x")
    assert [b.speedup for b in bs] == [2.0, 3.0] and [b.name for b in bs] == ["2x", "3x"]
    assert [b.seconds for b in parse_budgets("700ms, 1.5s")] == pytest.approx([0.7, 1.5])


@pytest.mark.parametrize("text", ["0x", "-3x", "1x", "3", "fastest", "0ms", "3x,fastest"])
def test_parse_budget_rejects(text):
    with pytest.raises(BudgetError) as exc:
        parse_budgets(text)
    bad = text.split(",")[-1]
    assert repr(bad) in str(exc.value)
    assert exc.value.exit_code == 2


def test_parse_budgets_rejects_empty_and_repeats():
    with pytest.raises(BudgetError, match="no budget"):
        parse_budgets("")
    with pytest.raises(BudgetError, match="no budget"):
        parse_budgets(" , ")
    with pytest.raises(BudgetError, match="'3x,3x'.*repeats"):
        parse_budgets("3x,3x")


# -------------------------------------------------------------------------- 9. constraints
def test_objective_impossible_budget_all_infeasible_and_estimated(model, record, subject, reference, monkeypatch):
    lm = LatencyModel(record.latency, record_variants(), model.num_layers)
    study = open_study("impossible", None, direction_multi=False, seed=0)
    enqueue_seeds(study, record)
    enqueue_seeds(study, record)                                   # a second call does not duplicate
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["seed_policy"] for t in waiting] == ["identity", "paper-like", "fastvar-like"]

    def boom(*a, **k):
        raise AssertionError("a clearly infeasible trial was generated")

    monkeypatch.setattr(common.Subject, "run", boom)
    obj = Objective(record, subject, lm, 1e-6, scorer_for(model.name), reference)
    study.optimize(obj, n_trials=4)
    trials = study.trials
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert [t.user_attrs.get("seed_policy") for t in trials[:3]] == ["identity", "paper-like", "fastvar-like"]
    for t in trials:
        assert t.constraints and all(c > 0 for c in t.constraints.values())
        assert t.user_attrs["quality_estimated"] is True
        assert 0.0 <= t.value <= 1.0
    assert trials[0].value == 1.0                                  # identity: no damage
    assert feasible_ranked(study) == []


def test_objective_feasible_trial_is_measured(model, record, subject, reference):
    lm = LatencyModel(record.latency, record_variants(), model.num_layers)
    study = open_study("generous", None, direction_multi=False, seed=0)
    enqueue_seeds(study, record)
    obj = Objective(record, subject, lm, 1e6, scorer_for(model.name), reference)
    study.optimize(obj, n_trials=1)                                # the identity seed, generated for real
    t = study.trials[0]
    assert t.user_attrs["seed_policy"] == "identity"
    assert t.user_attrs["quality_estimated"] is False
    assert t.value == 1.0 and t.user_attrs["ssim"] == 1.0
    assert all(c <= 0 for c in t.constraints.values())
    assert [x.number for x in feasible_ranked(study)] == [0]


def test_objective_measures_promising_trials_on_more_images(model, record, subject, reference):
    """With more image sets, a trial reports its quality after each set: those that keep up with
    the completed trials are measured on every set (their quality is over all the images), the
    others are pruned after the first, and pruned trials are never verification candidates."""
    from calibrate.candidates import measured_trials
    from calibrate.search import EXTRA_SEED_STEP, ImageSet, objective_sets, search_pruner
    scorer = scorer_for(model.name)
    sets = objective_sets(subject, scorer, 3 * len(subject.items) - 1)           # rounded up to three sets
    assert len(sets) == 3 and sets[0].subject is subject
    assert [s.subject.prompts for s in sets[1:]] == [subject.prompts] * 2
    assert sets[2].subject.seeds == [s + 2 * EXTRA_SEED_STEP for s in subject.seeds]
    assert not np.array_equal(sets[1].reference.images, sets[0].reference.images)   # other seeds, other images
    assert isinstance(search_pruner(), optuna.pruners.PercentilePruner)

    lm = LatencyModel(record.latency, record_variants(), model.num_layers)
    study = open_study("sets", None, direction_multi=False, seed=0)
    obj = Objective(record, subject, lm, 1e6, scorer, sets[0].reference, sets[0].reference_semantic, more=sets[1:])
    n = len(subject.items)
    good = seed_params(record)["identity"]
    lo, top = search_bounds(record)
    bad = dict(good, first_accelerated=lo, cond_only_from=lo, **{f"keep_{k}": 0.1 for k in range(lo, top)})
    for _ in range(5):                                     # five completed trials: the pruner's start-up
        study.enqueue_trial(good)
    study.enqueue_trial(bad)
    study.enqueue_trial(good)
    study.optimize(obj, n_trials=7)
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * 5 + [optuna.trial.TrialState.PRUNED,
                                                                 optuna.trial.TrialState.COMPLETE]
    done, pruned = study.trials[0], study.trials[5]
    assert done.user_attrs["images"] == 3 * n and sorted(done.intermediate_values) == [n, 2 * n]
    assert done.value == 1.0
    assert pruned.user_attrs["images"] == n and list(pruned.intermediate_values) == [n]
    assert pruned.intermediate_values[n] < 1.0
    assert 5 not in [t.number for t in measured_trials(study)]
    assert isinstance(sets[1], ImageSet)


# ------------------------------------------------------------------ one study for several budgets
def _front_trial(study, quality_by_images: dict, predicted: float, **attrs):
    study.add_trial(optuna.trial.create_trial(
        values=[quality_by_images[max(quality_by_images)], predicted],
        user_attrs={"predicted_latency_s": predicted, "quality_steps": {str(k): v for k, v in quality_by_images.items()},
                    **attrs}))


def test_on_a_front_a_trial_goes_on_only_while_it_keeps_up_with_its_latency_neighbours():
    """The pruner's rule (top quarter at the same number of images) among the trials predicted
    within 10% of the trial's latency: trials elsewhere on the front, or measured on other image
    counts, are not compared; with fewer than four neighbours a trial goes on."""
    from types import SimpleNamespace

    from calibrate.search import FRONT_STARTUP
    study = optuna.create_study(directions=["maximize", "minimize"])
    me = SimpleNamespace(study=study, number=10_000)
    for q in (0.6, 0.7, 0.8):
        _front_trial(study, {8: q}, 1.0)
    assert FRONT_STARTUP == 4 and Objective.keeps_up(me, 0.1, 8, 1.0)          # three neighbours: start-up
    _front_trial(study, {8: 0.9}, 1.05)
    _front_trial(study, {8: 0.2}, 2.0)                     # far on the front: not a neighbour
    _front_trial(study, {16: 0.1}, 1.0)                    # measured on other images only: not compared
    assert not Objective.keeps_up(me, 0.8, 8, 1.0)         # 0.8 < the 75th percentile of 0.6..0.9 (0.825)
    assert Objective.keeps_up(me, 0.85, 8, 1.0)
    assert Objective.keeps_up(me, 0.1, 8, 2.0)             # its neighbourhood holds one trial
    assert not Objective.keeps_up(me, 0.8, 8, 1.0 * 1.09) and Objective.keeps_up(me, 0.8, 8, 1.0 * 1.2)


def test_front_objective_returns_quality_and_latency_and_measures_only_the_budgets_range(model, record, subject,
                                                                                        reference, monkeypatch):
    """Several budgets, one study: each trial's values are (quality, predicted latency); a trial
    predicted outside [0.8 x the fastest budget, 1.1 x the slowest] is estimated, not generated,
    and infeasible; inside, it is measured on the image sets while it keeps up, and one stopped
    early is never a verification candidate."""
    from calibrate.candidates import measured_trials
    from calibrate.search import objective_sets
    lm = LatencyModel(record.latency, record_variants(), model.num_layers)
    full = lm.baseline(model.tokens_per_scale())
    scorer = scorer_for(model.name)
    sets = objective_sets(subject, scorer, 2 * len(subject.items))
    study = open_study("front", None, direction_multi=True, seed=0)
    calls = []
    run = common.Subject.run
    monkeypatch.setattr(common.Subject, "run", lambda self, point: calls.append(point) or run(self, point))
    far = Objective(record, subject, lm, None, scorer, sets[0].reference, sets[0].reference_semantic, more=sets[1:],
                    band=(2 * full, 3 * full))                 # the identity (full latency) is faster than the range
    study.enqueue_trial(seed_params(record)["identity"])
    study.optimize(far, n_trials=1)
    t = study.trials[0]
    assert calls == [] and t.user_attrs["quality_estimated"] is True
    assert t.values == [1.0, t.user_attrs["predicted_latency_s"]] and all(c > 0 for c in t.constraints.values())
    near = Objective(record, subject, lm, None, scorer, sets[0].reference, sets[0].reference_semantic, more=sets[1:],
                     band=(full / 2, full))
    for _ in range(2):
        study.enqueue_trial(seed_params(record)["identity"])
    study.optimize(near, n_trials=2)
    n = len(subject.items)
    for t in study.trials[1:]:
        assert t.values[0] == 1.0 and t.values[1] == pytest.approx(full)
        assert t.user_attrs["quality_steps"] == {str(n): 1.0, str(2 * n): 1.0} and t.user_attrs["images"] == 2 * n
        assert all(c <= 0 for c in t.constraints.values())
    assert len(calls) == 4                                    # two trials x two image sets
    assert [x.number for x in measured_trials(study)] == [1, 2]
    _front_trial(study, {n: 0.5}, full, stopped_early=True, quality_estimated=False)
    assert [x.number for x in measured_trials(study)] == [1, 2]


# ------------------------------------------------------------------ guidance before the token range
def _record_with_cond_rows(first_cond: int = 2):
    """A hand record (search range 3..6) whose sensitivity pass measured the guidance drop from
    ``first_cond`` on, and spectra whose effective rank shrinks with the scale."""
    rec = hand_record(n=7, depth=2, refinement_start=4)
    rec.sensitivity = [{"scale": k, "variant": "cond", "guidance": "cond_only", "keep": 1.0,
                        "selection": "random_projection", "damage": 0.01} for k in range(first_cond, 7)]
    rec.spectra = [{"scale": k, "layer": layer, "eff_rank_frac_95": frac * (0.8 if layer == 1 else 1.0)}
                   for k, frac in zip(range(3, 7), (0.8, 0.5, 0.3, 0.2)) for layer in (1, 2)]
    return rec


def test_guidance_may_be_dropped_before_the_token_range_down_to_the_measured_floor():
    from calibrate.search import guidance_floor, search_bounds
    from calibrate.seeds import params_for_point
    assert guidance_floor(hand_record(n=7, depth=2, refinement_start=4)) == 3      # nothing measured: the range
    rec = _record_with_cond_rows(2)
    assert search_bounds(rec) == (3, 7) and guidance_floor(rec) == 2
    params = dict(seed_params(rec)["identity"], cond_only_from=2, first_accelerated=4, keep_4=0.5, keep_6=0.2)
    point = point_from_params(rec, params)
    assert [p.guidance for p in point.plans] == ["cfg"] * 2 + ["cond_only"] * 5
    assert [p.keep for p in point.plans] == [1.0] * 4 + [0.5, 1.0, 0.2]
    assert point.stages["refinement"] == (2, 6) and point.stages["semantic"] == (0, 1)
    later = point_from_params(rec, dict(params, cond_only_from=5))       # guidance dropped inside the range
    assert [p.guidance for p in later.plans] == ["cfg"] * 5 + ["cond_only"] * 2
    assert later.stages["refinement"] == (4, 6)
    assert point_from_params(rec, params_for_point(rec, point)).plans == point.plans      # round trip
    below = OperatingPoint(point.stages, (ScalePlan(0), ScalePlan(1, guidance="cond_only")) + point.plans[2:])
    subset_early = OperatingPoint(point.stages, point.plans[:2] + (ScalePlan(2, guidance="cond_only", keep=0.5),)
                                  + point.plans[3:])
    assert params_for_point(rec, below) is None and params_for_point(rec, subset_early) is None
    moves = [nb["cond_only_from"] for nb in neighbours(rec, dict(params, cond_only_from=3))
             if nb["cond_only_from"] != 3]
    assert sorted(moves) == [2, 4]
    assert not any(nb["cond_only_from"] < 2 for nb in neighbours(rec, params))
    study = open_study("floor", optuna.storages.InMemoryStorage(), direction_multi=False, seed=0)
    asked = [study.ask() for _ in range(40)]
    for t in asked:
        suggest_policy(t, rec)
    assert {t.params["cond_only_from"] for t in asked} <= set(range(2, 8)) and \
        min(t.params["cond_only_from"] for t in asked) == 2


def test_budget_seeds_also_drop_guidance_from_the_floor_and_follow_the_spectra():
    from calibrate.search import KEEPS
    from calibrate.seeds import SPECTRAL_FACTORS, budget_seed_params, spectral_fractions
    rec = _record_with_cond_rows(2)
    tokens = [1, 4, 16, 36, 64, 100, 169]
    lm = _linear_latency(7, tokens)
    budget = lm.baseline(tokens) / 3
    seeds = budget_seed_params(rec, lm, tokens, budget)
    floor_seeds = {name: p for name, p in seeds.items() if name.startswith("fitted:g2:")}
    assert floor_seeds and any(name.startswith("fitted:3@") for name in seeds)
    for name, params in floor_seeds.items():
        point = point_from_params(rec, params)
        assert params["cond_only_from"] == 2 and lm.predict(point, tokens) <= budget
        assert all(p.is_identity for p in point.plans[:2]) and all(p.guidance == "cond_only" for p in point.plans[2:])
    # the floor's time buys tokens: its uniform plan from scale 3 keeps more than the one without
    assert floor_seeds["fitted:g2:3@" + name_keep(seeds, "fitted:g2:3@")]["keep_3"] >= \
        seeds["fitted:3@" + name_keep(seeds, "fitted:3@")]["keep_3"]
    # the spectral seed: keeps follow the largest fraction per scale (0.8, 0.5, 0.3, 0.2) scaled
    # by the largest factor that fits; the next larger factor does not fit
    assert spectral_fractions(rec) == {3: 0.8, 4: 0.5, 5: 0.3, 6: 0.2}
    name = next(n for n in seeds if n.startswith("fitted:spectral@"))
    params, factor = seeds[name], float(name.split("@")[1])
    keeps = [params[f"keep_{k}"] for k in range(3, 7)]
    assert keeps == sorted(keeps, reverse=True) and keeps[0] > keeps[-1]
    assert keeps == [min(KEEPS, key=lambda r: (abs(r - min(1.0, f * factor)), r)) for f in (0.8, 0.5, 0.3, 0.2)]
    assert lm.predict(point_from_params(rec, params), tokens) <= budget and params["cond_only_from"] == 2
    i = SPECTRAL_FACTORS.index(factor)
    if i > 0:
        bigger = SPECTRAL_FACTORS[i - 1]
        looser = dict(params, **{f"keep_{k}": min(KEEPS, key=lambda r: (abs(r - min(1.0, f * bigger)), r))
                                 for k, f in zip(range(3, 7), (0.8, 0.5, 0.3, 0.2))})
        assert lm.predict(point_from_params(rec, looser), tokens) > budget
    assert spectral_fractions(hand_record(n=7, depth=2, refinement_start=4)) == {}   # no spectra: no spectral seed
    assert not any(n.startswith("fitted:spectral@") for n in budget_seed_params(hand_record(), lm, tokens, budget))


def name_keep(seeds: dict, prefix: str) -> str:
    """The keep of the uniform seed named ``prefix<keep>``."""
    return next(n[len(prefix):] for n in seeds if n.startswith(prefix) and "," not in n)


def test_a_study_of_another_search_space_version_is_refused():
    from calibrate.pipeline import default_study_name
    from calibrate.search import SEARCH_SPACE
    from calibrate.study import check_study_record, study_info
    from stagevar.errors import StageVarError
    from types import SimpleNamespace
    rec = hand_record()
    info = study_info(rec, SimpleNamespace(name="3x"), 1.0, "m", 10, 32)
    assert info["search_space"] == SEARCH_SPACE
    check_study_record("s", info, rec, "hint", 32)                     # the same version: accepted
    for old in (dict(info, search_space=SEARCH_SPACE - 1), {k: v for k, v in info.items() if k != "search_space"}):
        with pytest.raises(StageVarError, match=f"version {SEARCH_SPACE - 1} of the search space"):
            check_study_record("s", old, rec, "hint", 32)
    model = SimpleNamespace(name="m", resolution="128")
    assert default_study_name(model, SimpleNamespace(name="3x"), rec, None, False, 4) == f"m.128.3x.hand.s{SEARCH_SPACE}.x4"


def test_report_states_where_the_search_may_drop_guidance():
    from calibrate.report import search_space_lines
    rec = _record_with_cond_rows(2)
    assert search_space_lines(rec)[0] == (
        "The search may compute scales 3-6 on fewer tokens. It may drop guidance from scale 2 on: dropping it from "
        "scale 2 could not be told from harmless (damage less two standard errors at most 0.02).")
    rec.sensitivity[0]["damage"] = 0.5                              # scale 2 harmful: the floor is the range
    assert "from scale 3 on, the start of that range: dropping it from scale 2 was not measured, or measured harmful" \
        in search_space_lines(rec)[0]
    rec = _record_with_cond_rows(1)
    assert "dropping it from each of scales 1-2 could not be told" in search_space_lines(rec)[0]
