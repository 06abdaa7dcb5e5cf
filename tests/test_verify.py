"""Verification's choice among candidates (:func:`calibrate.verify.verify_candidates`) on a
scripted subject: qualities and timings are given, so the test asserts the decision rule itself,
independent of the machine's speed."""
from __future__ import annotations

import types

import numpy as np

import calibrate.verify as verify
from calibrate.budget import parse_budget


class ScriptedSubject:
    """``run(point)``: the images of a point (its name) on this image set and, when timed, the next
    of its scripted seconds (the full model, point None, always takes 1 s). ``reseeded`` gives the
    next image set (``images``: (point, set)); ``quality_runs`` counts the untimed runs per set."""

    batch_size = 1

    def __init__(self, seconds: dict[str, list[float]], size: int = 3, image_set: int = 0, runs=None):
        self.seconds = {k: list(v) for k, v in seconds.items()}
        self.timed = {k: 0 for k in seconds}
        self.items = [("p", image_set)] * size
        self.item_prompts = ["p"] * size
        self.image_set = image_set
        self.quality_runs = runs if runs is not None else {}

    def first_batch(self):
        return self

    def reseeded(self, offset: int):
        other = ScriptedSubject({}, len(self.items), offset // verify.SELECTION_SEED_OFFSET, self.quality_runs)
        other.seconds, other.timed = self.seconds, self.timed
        return other

    def run(self, point, timed: bool = False, **_):
        if timed and point is not None:
            self.timed[point] += 1
            s = self.seconds[point][min(self.timed[point], len(self.seconds[point])) - 1]
        else:
            s = 1.0
            self.quality_runs[(point, self.image_set)] = self.quality_runs.get((point, self.image_set), 0) + 1
        return types.SimpleNamespace(seconds=s, images=(point, self.image_set), final_codes=None)


def scripted_values(per_image: dict):
    """A stand-in for :func:`calibrate.measure.sensitivity.per_image`: the per-image qualities
    ``per_image[point]`` (a list, the same on every image set) or ``per_image[point, set]``,
    as SSIM and agreement (quality = their mean = the scripted value)."""
    def values(out, ref, prompts, scorer, ref_sem):
        q = np.asarray(per_image[out.images] if out.images in per_image else per_image[out.images[0]], dtype=np.float64)
        return {"ssim": q, "agree": q, "hf": np.ones_like(q), "sem_acc": None, "ref_sem": None}
    return values


#: per-image spread of the scripted qualities (the same on every candidate: paired differences are exact)
SPREAD = (-0.02, 0.0, 0.02)
QUALITY = {k: [q + d for d in SPREAD] for k, q in {"near": 0.9, "fast": 0.5, None: 1.0}.items()}


def test_a_close_call_is_timed_longer_before_it_decides_the_choice(monkeypatch):
    monkeypatch.setattr(verify, "per_image", scripted_values(QUALITY))
    scorer = types.SimpleNamespace(reference_verdicts=lambda images, prompts: None)
    # "near": 2.94x in the first 3 rounds (warm-up excluded), 3.13x over the longer timing; "fast": a clear 4x
    subject = ScriptedSubject({"near": [0.3, 0.34, 0.34, 0.33] + [0.32] * 6, "fast": [0.25] * 10})
    candidates = [("trial-near", "near"), ("trial-fast", "fast")]
    trial, point, measured = verify.verify_candidates(None, subject, candidates, parse_budget("3x"), scorer, {},
                                                      repeats=3, progress=False)
    assert (trial, point) == ("trial-near", "near")            # the better plan, once its speedup is resolved
    assert measured["feasible"] and measured["speedup"] == 3.125 and measured["latency_repeats"] == 9
    assert subject.timed == {"near": 1 + 3 + 6, "fast": 3}     # warm-up + rounds; the clear candidate not re-timed


def test_without_a_close_call_the_first_rounds_decide(monkeypatch):
    monkeypatch.setattr(verify, "per_image", scripted_values(QUALITY))
    scorer = types.SimpleNamespace(reference_verdicts=lambda images, prompts: None)
    subject = ScriptedSubject({"near": [0.5] * 10, "fast": [0.25] * 10})       # 2x: far from 3x
    trial, _, measured = verify.verify_candidates(None, subject, [("a", "near"), ("b", "fast")], parse_budget("3x"),
                                                  scorer, {}, repeats=3, progress=False)
    assert trial == "b" and measured["latency_repeats"] == 3 and subject.timed == {"near": 1 + 3, "fast": 3}


def test_of_candidates_the_selection_set_cannot_tell_apart_the_least_accelerated_is_chosen(monkeypatch):
    per_image = {"slow": [0.90, 0.80, 0.85, 0.70], "fast": [0.92, 0.78, 0.87, 0.69], "worse": [0.60, 0.50, 0.55, 0.40],
                 None: [1.0] * 4}
    monkeypatch.setattr(verify, "per_image", scripted_values(per_image))
    scorer = types.SimpleNamespace(reference_verdicts=lambda images, prompts: None)
    # at 2x all three are feasible; "fast" is best by 0.0025 +- 0.0075, "worse" is clearly worse and slowest
    # (one set of images: no race)
    subject = ScriptedSubject({"slow": [0.45] * 10, "fast": [0.3] * 10, "worse": [0.48] * 10}, size=4)
    trial, point, measured = verify.verify_candidates(None, subject, [("a", "fast"), ("b", "slow"), ("c", "worse")],
                                                      parse_budget("2x"), scorer, {}, repeats=3, progress=False,
                                                      selection_images=4)
    assert (trial, point) == ("b", "slow") and measured["tied_with_best"] == 1
    # at a budget only "fast" meets, it is chosen whatever the others score
    subject = ScriptedSubject({"slow": [0.45] * 10, "fast": [0.3] * 10, "worse": [0.48] * 10})
    trial, _, measured = verify.verify_candidates(None, subject, [("a", "fast"), ("b", "slow"), ("c", "worse")],
                                                  parse_budget("3x"), scorer, {}, repeats=3, progress=False)
    assert trial == "a" and "tied_with_best" not in measured


def test_the_race_measures_the_contenders_on_more_images_and_chooses_on_all_of_them(monkeypatch):
    # on the selection set "lucky" leads "steady" by 0.0375 +- 0.027 (1.4 standard errors: chosen
    # outright by the tie rule, yet within the race's 2); on the two further sets it falls behind;
    # "bad" is clearly worse from the start
    steady = [0.85, 0.82, 0.84, 0.74]
    per_image = {("lucky", 0): [0.95, 0.80, 0.90, 0.75], "lucky": [0.80, 0.70, 0.78, 0.66], "steady": steady,
                 "bad": [0.60, 0.50, 0.55, 0.40], None: [1.0] * 4}
    monkeypatch.setattr(verify, "per_image", scripted_values(per_image))
    scorer = types.SimpleNamespace(reference_verdicts=lambda images, prompts: None)
    seconds = {"lucky": [1 / 2.2] * 10, "steady": [0.4] * 10, "bad": [1 / 2.3] * 10}        # all meet 2x
    candidates = [("l", "lucky"), ("s", "steady"), ("b", "bad")]

    subject = ScriptedSubject(seconds, size=4)
    trial, _, measured = verify.verify_candidates(None, subject, candidates, parse_budget("2x"), scorer, {}, repeats=3,
                                                  progress=False, selection_images=4)
    assert trial == "l" and measured["verification_images"] == 4 and "tied_with_best" not in measured

    subject = ScriptedSubject(seconds, size=4)
    trial, _, measured = verify.verify_candidates(None, subject, candidates, parse_budget("2x"), scorer, {}, repeats=3,
                                                  progress=False, selection_images=12)
    assert trial == "s" and measured["verification_images"] == 12
    assert measured["quality"] == round(sum(steady) / 4, 4)
    assert {k: v for k, v in subject.quality_runs.items() if k[0] is not None} == {
        ("lucky", 0): 1, ("steady", 0): 1, ("bad", 0): 1, ("lucky", 1): 1, ("steady", 1): 1, ("lucky", 2): 1, ("steady", 2): 1}
    assert {k[1] for k in subject.quality_runs if k[0] is None} == {0, 1, 2}      # the full model on each set


def test_the_race_s_further_sets_are_the_selection_prompts_with_seeds_no_other_set_uses():
    from calibrate.measure.common import Subject
    subject = Subject(types.SimpleNamespace(default_guidance=3.0, device="cpu"), ["a", "b"], [0, 1], 2, engine="eager")
    further = [subject.reseeded(j * verify.SELECTION_SEED_OFFSET) for j in (1, 2)]
    assert all(f.prompts == subject.prompts for f in further)
    seeds = [set(subject.seeds)] + [set(f.seeds) for f in further] + [{s + verify.REPORT_SEED_OFFSET for s in subject.seeds}]
    assert sum(len(x) for x in seeds) == len(set().union(*seeds))


def test_the_report_says_on_how_many_images_the_choice_was_made_and_whether_it_was_a_tie():
    from calibrate.report import _selection_line
    m = {"quality_from": "report set", "verification_images": 64, "selection_images": 192, "candidates": 7,
         "selection_quality": 0.798, "selection_quality_se": 0.015, "selection_score_full": 0.75, "selection_score": 0.55}
    line = _selection_line(m)[0]
    assert "report set (64 images" in line and "(192 images, 7 candidates)" in line and "0.750 -> 0.550" in line
    assert "could not be told" not in line
    assert "3 other candidate(s) could not be told from the best" in _selection_line(dict(m, tied_with_best=3))[0]
