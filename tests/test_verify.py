"""Verification's choice among candidates (:func:`calibrate.verify.verify_candidates`) on a
scripted subject: qualities and timings are given, so the test asserts the decision rule itself,
independent of the machine's speed."""
from __future__ import annotations

import types

import calibrate.verify as verify
from calibrate.budget import parse_budget


class ScriptedSubject:
    """``run(point)``: the images of a point (its name) and, when timed, the next of its scripted
    seconds (the full model, point None, always takes 1 s)."""

    items, item_prompts, batch_size = ["p"], ["p"], 1

    def __init__(self, seconds: dict[str, list[float]]):
        self.seconds = {k: list(v) for k, v in seconds.items()}
        self.timed = {k: 0 for k in seconds}

    def first_batch(self):
        return self

    def run(self, point, timed: bool = False, **_):
        if timed and point is not None:
            self.timed[point] += 1
            s = self.seconds[point][min(self.timed[point], len(self.seconds[point])) - 1]
        else:
            s = 1.0
        return types.SimpleNamespace(seconds=s, images=point, final_codes=None)


QUALITY = {"near": 0.9, "fast": 0.5, None: 1.0}
#: per-image spread of the scripted qualities (the same on every candidate: paired differences are exact)
SPREAD = (-0.02, 0.0, 0.02)


def _quality(out, ref, prompts, scorer, ref_sem):
    q = QUALITY[out.images]
    return {"quality": q, "quality_se": 0.01, "quality_worst": q, "ssim": q, "semantic": q, "hf_ratio": 1.0, "score": None,
            "per_image_quality": [q + d for d in SPREAD]}


def test_a_close_call_is_timed_longer_before_it_decides_the_choice(monkeypatch):
    monkeypatch.setattr(verify, "compare", _quality)
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
    monkeypatch.setattr(verify, "compare", _quality)
    scorer = types.SimpleNamespace(reference_verdicts=lambda images, prompts: None)
    subject = ScriptedSubject({"near": [0.5] * 10, "fast": [0.25] * 10})       # 2x: far from 3x
    trial, _, measured = verify.verify_candidates(None, subject, [("a", "near"), ("b", "fast")], parse_budget("3x"),
                                                  scorer, {}, repeats=3, progress=False)
    assert trial == "b" and measured["latency_repeats"] == 3 and subject.timed == {"near": 1 + 3, "fast": 3}


def test_of_candidates_the_selection_set_cannot_tell_apart_the_least_accelerated_is_chosen(monkeypatch):
    per_image = {"slow": [0.90, 0.80, 0.85, 0.70], "fast": [0.92, 0.78, 0.87, 0.69], "worse": [0.60, 0.50, 0.55, 0.40],
                 None: [1.0] * 4}

    def quality(out, ref, prompts, scorer, ref_sem):
        q = per_image[out.images]
        m = sum(q) / len(q)
        return {"quality": m, "quality_se": 0.05, "quality_worst": min(q), "ssim": m, "semantic": m, "hf_ratio": 1.0,
                "score": None, "per_image_quality": q}

    monkeypatch.setattr(verify, "compare", quality)
    scorer = types.SimpleNamespace(reference_verdicts=lambda images, prompts: None)
    # at 2x all three are feasible; "fast" is best by 0.0025 +- 0.0075, "worse" is clearly worse and slowest
    subject = ScriptedSubject({"slow": [0.45] * 10, "fast": [0.3] * 10, "worse": [0.48] * 10})
    trial, point, measured = verify.verify_candidates(None, subject, [("a", "fast"), ("b", "slow"), ("c", "worse")],
                                                      parse_budget("2x"), scorer, {}, repeats=3, progress=False)
    assert (trial, point) == ("b", "slow") and measured["tied_with_best"] == 1
    # at a budget only "fast" meets, it is chosen whatever the others score
    subject = ScriptedSubject({"slow": [0.45] * 10, "fast": [0.3] * 10, "worse": [0.48] * 10})
    trial, _, measured = verify.verify_candidates(None, subject, [("a", "fast"), ("b", "slow"), ("c", "worse")],
                                                  parse_budget("3x"), scorer, {}, repeats=3, progress=False)
    assert trial == "a" and "tied_with_best" not in measured
