"""Verification: re-measure the best search candidates end to end on held-out prompts, choose one,
and measure the chosen one again on prompts that took no part in the choice.

Latency: the full model and every candidate are timed on the same batch in the same process,
interleaved (full, c1, c2, ..., full, c1, c2, ...) after a warm-up round, ``repeats`` rounds; a
candidate's speedup is the median over the rounds of the full model's time / its own in the same
round, so that the machine's drift between rounds cancels (in one verification, plans that differ
only in a token selection and time alike measured 2.84x and 3.38x as ratios of medians). Close calls (a candidate within 5% of the budget's latency
whose quality beats every candidate clearly within it) are timed twice as many rounds more, with
the full model, before the choice: on a noisy machine the same plan measured 3.06x in one run and
under 3x in another, and which side of the budget it fell on decided the policy. Quality: every held-out prompt and seed is generated with the
candidate and compared with the full model's image of the same seed (SSIM, semantic agreement,
and for the embedded model the evaluator's score of both), each mean with its standard error
(:func:`calibrate.measure.sensitivity.summarize`).

Selection and reporting use different images: a candidate that meets the budget is chosen on the
*selection* set (``--num-heldout``) by the one-standard-error rule (:func:`choose`: of the plans
whose quality cannot be told from the best one's, the one that accelerates least), and the quality numbers of a
policy's ``measured`` block come from the *report* set (``--num-report``; another draw of the
held-out split, generated with other seeds), so that they are not the maximum of several noisy
estimates. The selection set's numbers are kept beside them (``selection_*``).

Of several plans 64 images rank the best one by chance as often as not: the candidates' qualities
near a budget differ by about their standard errors, and the one that scored best on the selection
set is, on other images, worse than it looked (on infinity-mini, a default run chose, clearly ahead
on its 64 images, a plan that lost 0.031 +- 0.017 more evaluator score than the shipped one on 512
unseen images). So the choice is a race
(:func:`race`): every candidate is measured on the selection set, and those whose paired difference
from the best feasible one is within :data:`RACE_SE` standard errors are measured again on further
sets of the same prompts with other seeds (``--selection-images``), until one is clearly ahead or
the images run out; the choice is made on all the images a contender was measured on.
"""
from __future__ import annotations

import logging
import statistics
from typing import Any

from calibrate.measure.common import Subject
from calibrate.measure.sensitivity import concat_values, per_image, quality_row, standard_error

#: the report set's seeds are the calibration seeds plus this, so its images are never ones the
#: selection saw, even where a prompt of the (finite) held-out split repeats
REPORT_SEED_OFFSET = 1000
#: the selection's further image sets: the same prompts with the seeds plus ``j *`` this (set j >= 1),
#: never a report seed
SELECTION_SEED_OFFSET = 2000
#: images a contender is compared on at most, by default (the selection set included)
SELECTION_IMAGES = 128


log = logging.getLogger("stagevar.calibrate")


def _reference(subject: Subject, scorer, cache: dict, key: str):
    """The full model's output on ``subject`` and the evaluator's verdicts on it (cached)."""
    if key not in cache:
        ref = subject.run(None)
        cache[key] = (ref, scorer.reference_verdicts(ref.images, subject.item_prompts))
    return cache[key]


def quality_fields(m: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The quality numbers of a :func:`~calibrate.measure.sensitivity.quality_row`, rounded, as a ``measured`` block holds them."""
    r = lambda v: None if v is None else round(v, 4)  # noqa: E731
    out = {"quality": r(m["quality"]), "quality_se": r(m["quality_se"]), "quality_worst": r(m["quality_worst"]),
           "ssim": r(m["ssim"]), "semantic_agreement": r(m["semantic"]), "hf_ratio": r(m["hf_ratio"])}
    if m.get("score") is not None:
        out.update({"score_full": r(m["score_full"]), "score": r(m["score"]), "score_drop": r(m["score_full"] - m["score"]),
                    "score_drop_se": r(m.get("score_drop_se"))})
    return {prefix + k: v for k, v in out.items()}


#: a measured latency within this fraction of the budget's is a close call ...
CLOSE_CALL_BAND = 0.05
#: ... and such candidates (with the full model) are timed this many times ``repeats`` rounds more
CLOSE_CALL_ROUNDS = 2


def close_calls(budget, base_s: float, latencies: list[float], qualities: list[float],
                band: float = CLOSE_CALL_BAND) -> list[int]:
    """Candidates whose side of the budget the timing noise could flip and whose side matters:
    latency within ``band`` of the budget's, and better quality than every candidate clearly
    within it (only those could change the choice).

    >>> from calibrate.budget import parse_budget
    >>> close_calls(parse_budget("3x"), 3.0, [0.9, 1.02, 1.2], [0.5, 0.9, 0.95])   # 3.3x, 2.94x, 2.5x
    [1]
    """
    target = base_s / budget.speedup if budget.speedup is not None else budget.seconds
    near = [i for i, lat in enumerate(latencies) if abs(lat / target - 1) < band]
    clear = [q for i, (lat, q) in enumerate(zip(latencies, qualities)) if lat <= target and i not in near]
    best_clear = max(clear, default=float("-inf"))
    return [i for i in near if qualities[i] > best_clear]


#: a feasible candidate whose mean paired quality difference from the best feasible one is at most
#: this many standard errors is tied with it
TIE_SE = 1.0


def choose(speedups: list[float], feasible: list[bool], per_image: list[list[float]], tie_se: float = TIE_SE):
    """The index of the chosen candidate and the indices tied with the best (the best included).

    The one-standard-error rule: the best is the feasible candidate of highest mean quality; a
    feasible candidate is tied with it when their mean paired (same image) difference is at most
    ``tie_se`` standard errors of that mean; of the tied, the one with the lowest speedup is chosen.
    At a quality the selection set cannot tell apart, the plan that skips less work is the safer
    bet on prompts the choice did not see, and an operating point stays near its budget (a 2x
    point that runs at 3x duplicates the 3x point). With no feasible candidate: the fastest.

    >>> choose([3.1, 3.5], [True, True], [[0.90, 0.80, 0.85], [0.91, 0.81, 0.86]])   # +0.01 on every image
    (1, [1])
    >>> choose([3.1, 3.5], [True, True], [[0.90, 0.80, 0.85], [0.95, 0.75, 0.86]])   # +0.003 +- 0.029
    (0, [1, 0])
    """
    ok = [i for i, f in enumerate(feasible) if f]
    if not ok:
        return max(range(len(speedups)), key=lambda i: speedups[i]), []
    mean = [statistics.fmean(q) for q in per_image]
    best = max(ok, key=lambda i: (mean[i], speedups[i]))
    tied = [best]
    for i in ok:
        if i == best:
            continue
        d = [b - c for b, c in zip(per_image[best], per_image[i], strict=True)]
        se = standard_error(d)
        if se is None or statistics.fmean(d) <= tie_se * se:
            tied.append(i)
    return min(tied, key=lambda i: (speedups[i], -mean[i])), tied


#: a feasible candidate stays in the race while its mean paired quality difference from the best
#: one's is at most this many standard errors (wider than :data:`TIE_SE`: the best of several noisy
#: means is the one most likely to be overrated)
RACE_SE = 2.0


def race(subject: Subject, candidates, speedups: list[float], feasible: list[bool], values: list[list[dict]], scorer,
         cache: dict, max_images: int, step=lambda name: None) -> list[int]:
    """Measure the contenders on further image sets; returns the indices still in the race.

    ``values[i]``: candidate i's per-image values (:func:`calibrate.measure.sensitivity.per_image`),
    one entry per image set it was measured on (the selection set first); the contenders' lists
    grow. The contenders are the feasible candidates whose mean paired quality difference from the
    best one's, on the images they were all measured on, is at most :data:`RACE_SE` standard
    errors; while there are two or more and a further set fits in ``max_images`` images, they are
    all measured on the next set (``subject`` reseeded by :data:`SELECTION_SEED_OFFSET`; its full
    model images cached, as every budget's race uses them)."""
    contenders = [i for i, f in enumerate(feasible) if f]
    size = len(subject.items)
    while len(contenders) > 1:
        per = [quality_row(concat_values(values[i]))["per_image_quality"] for i in contenders]
        _, kept = choose([speedups[i] for i in contenders], [True] * len(contenders), per, tie_se=RACE_SE)
        contenders = sorted(contenders[j] for j in kept)
        done = len(values[contenders[0]])
        if len(contenders) < 2 or (done + 1) * size > max_images:
            return contenders
        extra = subject.reseeded(done * SELECTION_SEED_OFFSET)
        ref, ref_sem = _reference(extra, scorer, cache, f"ref+{done}")
        for i in contenders:
            values[i].append(per_image(extra.run(candidates[i][1]), ref, extra.item_prompts, scorer, ref_sem))
        step(f"race: {len(contenders)} on {(done + 1) * size} images")
    return contenders


def verify_candidates(model, subject: Subject, candidates, budget, scorer, cache: dict, repeats: int = 3, progress: bool = True,
                      report_subject: Subject | None = None, selection_images: int = SELECTION_IMAGES):
    """candidates: [(trial, point)] -> the chosen (trial, point, measured dict).

    ``subject``: the selection set. ``report_subject``: the report set (None: the numbers written
    are the selection set's, and ``measured`` says so). ``selection_images``: the most images the
    race (:func:`race`) compares a contender on."""
    from calibrate.calibration import _progress
    sets = max(1, selection_images // max(1, len(subject.items)))
    bar = _progress(len(candidates) + 3 + (sets - 1) + (report_subject is not None), f"verifying {budget.name}", progress)

    def step(name: str) -> None:
        bar.update(1)
        bar.set_postfix_str(" ".join(filter(None, (name, getattr(scorer, "cost_text", lambda: "")()))))

    try:
        return _verify(subject, candidates, budget, scorer, cache, repeats, report_subject, step, selection_images)
    finally:
        bar.close()


def _verify(subject: Subject, candidates, budget, scorer, cache: dict, repeats: int, report_subject, step,
            selection_images: int):
    ref, ref_sem = _reference(subject, scorer, cache, "ref")
    step("full model")
    values, quality = [], []
    for i, (_, point) in enumerate(candidates):
        values.append([per_image(subject.run(point), ref, subject.item_prompts, scorer, ref_sem)])
        quality.append(quality_row(values[-1][0]))
        step(f"quality {i + 1}/{len(candidates)}")
    one = subject.first_batch()
    for _, point in candidates[:1]:
        one.run(None, timed=True)
        one.run(point, timed=True)                       # warm-up
    base_t, pairs = [], [[] for _ in candidates]

    def rounds(which: list[int], n: int) -> None:        # the full model and ``which`` candidates, interleaved
        for _ in range(n):
            base = one.run(None, timed=True).seconds
            base_t.append(base)
            for i in which:
                pairs[i].append((base, one.run(candidates[i][1], timed=True).seconds))

    def speedups() -> list[float]:
        """Each candidate's median over its rounds of the full model's time / its own in the same
        round: the machine's drift between rounds cancels out."""
        return [statistics.median(b / c for b, c in p) for p in pairs]

    rounds(list(range(len(candidates))), repeats)
    step("timing")
    base = statistics.median(base_t)
    close = close_calls(budget, base, [base / s for s in speedups()], [m["quality"] for m in quality])
    if close:                                            # a choice the timing noise could flip: time them longer
        rounds(close, CLOSE_CALL_ROUNDS * repeats)
    step(f"{len(close)} close call(s) timed longer" if close else "no close call")
    base = statistics.median(base_t)
    results = []
    for (trial, point), p, speedup, m in zip(candidates, pairs, speedups(), quality):
        lat = base / speedup                             # the full model's median time at the paired speedup
        feasible = speedup >= budget.speedup if budget.speedup is not None else lat <= budget.seconds
        measured = {"verified": True, "feasible": bool(feasible), "baseline_latency_s": round(base, 4), "latency_s": round(lat, 4),
                    "speedup": round(speedup, 3), **quality_fields(m), "verification_images": len(subject.items),
                    "latency_batch": one.batch_size, "latency_repeats": len(p)}
        results.append((trial, point, measured))
    for trial, _, m in results:
        log.info("%s: trial %s (predicted %.2fx) measured %.2fx%s, quality %.3f, evaluator %s", budget.name,
                 getattr(trial, "number", trial), getattr(trial, "user_attrs", {}).get("predicted_speedup", float("nan")),
                 m["speedup"], "" if m["feasible"] else " (misses the budget)", m["quality"],
                 "n/a" if m.get("score") is None else f"{m['score_full']:.3f} -> {m['score']:.3f}")
    speeds, feasible = [m["speedup"] for _, _, m in results], [m["feasible"] for _, _, m in results]
    contenders = race(subject, candidates, speeds, feasible, values, scorer, cache, selection_images, step)
    if contenders:                                       # chosen on every image the contenders were measured on
        pooled = {i: quality_row(concat_values(values[i])) for i in contenders}
        if len(values[contenders[0]]) > 1:
            log.info("%s: %d candidate(s) compared on %d images: %s", budget.name, len(contenders),
                     len(pooled[contenders[0]]["per_image_quality"]),
                     ", ".join(f"trial {getattr(results[i][0], 'number', results[i][0])} quality {pooled[i]['quality']:.3f}"
                               for i in contenders))
        j, tied_j = choose([speeds[i] for i in contenders], [True] * len(contenders),
                           [pooled[i]["per_image_quality"] for i in contenders])
        pick, tied = contenders[j], [contenders[t] for t in tied_j]
        results[pick][2].update(quality_fields(pooled[pick]), verification_images=len(pooled[pick]["per_image_quality"]))
    else:
        pick, tied = choose(speeds, feasible, [m["per_image_quality"] for m in quality])
    chosen = results[pick]
    trial, point, measured = chosen
    if len(tied) > 1:
        measured["tied_with_best"] = len(tied) - 1
        log.info("%s: %d candidate(s) within %.0f standard error of the best quality; the least accelerated of them "
                 "is chosen (%.2fx)", budget.name, len(tied) - 1, TIE_SE, measured["speedup"])
    if report_subject is None:
        measured["quality_from"] = "selection set (the numbers the candidate was chosen on)"
        return chosen
    rref, rref_sem = _reference(report_subject, scorer, cache, "report_ref")
    m = quality_row(per_image(report_subject.run(point), rref, report_subject.item_prompts, scorer, rref_sem))
    step("report set")
    report = quality_fields(m)
    selection = {k: measured.pop(k) for k in list(measured) if k in report}
    measured.update(report)
    measured.update({"selection_" + k: v for k, v in selection.items()})
    measured["selection_images"] = measured.pop("verification_images")
    measured["verification_images"] = len(report_subject.items)
    measured["quality_from"] = "report set (images the choice did not see)"
    measured["candidates"] = len(candidates)
    return trial, point, measured
