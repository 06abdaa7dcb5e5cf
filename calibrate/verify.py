"""Verification: re-measure the best search candidates end to end on held-out prompts.

Latency: the full model and every candidate are timed on the same batch in the same process,
interleaved (full, c1, c2, ..., full, c1, c2, ...) after a warm-up round, median of ``repeats``;
the speedup is the ratio of medians. Quality: every held-out prompt and seed is generated with the
candidate and compared with the full model's image of the same seed (SSIM, semantic agreement,
and for the embedded model the evaluator's score of both). Only these numbers go into a policy's
``measured`` block.
"""
from __future__ import annotations

import statistics


from calibrate.measure.common import Subject
from calibrate.measure.sensitivity import compare


def _batch_subject(subject: Subject) -> Subject:
    prompts, seed = next(iter(subject.batches()))
    return Subject(subject.adapter, prompts, [seed], len(prompts), subject.guidance, engine=subject.engine)


def verify_candidates(model, subject: Subject, candidates, budget, scorer, cache: dict, repeats: int = 3, progress: bool = True):
    """candidates: [(trial, point)] -> the chosen (trial, point, measured dict)."""
    if "ref" not in cache:
        cache["ref"] = subject.run(None)
        ref = cache["ref"]
        cache["ref_sem"] = scorer.score(ref.images, subject.item_prompts, ref.images) if scorer.name == "evaluator" else None
    ref, ref_sem = cache["ref"], cache["ref_sem"]
    one = _batch_subject(subject)
    for _, point in candidates[:1]:
        one.run(None, timed=True)
        one.run(point, timed=True)                       # warm-up
    base_t, cand_t = [], [[] for _ in candidates]
    for _ in range(repeats):
        base_t.append(one.run(None, timed=True).seconds)
        for i, (_, point) in enumerate(candidates):
            cand_t[i].append(one.run(point, timed=True).seconds)
    base = statistics.median(base_t)
    results = []
    for (trial, point), times in zip(candidates, cand_t):
        lat = statistics.median(times)
        out = subject.run(point)
        m = compare(out, ref, subject.item_prompts, scorer, ref_sem)
        speedup = base / lat
        feasible = speedup >= budget.speedup if budget.speedup is not None else lat <= budget.seconds
        measured = {"verified": True, "feasible": bool(feasible), "baseline_latency_s": round(base, 4), "latency_s": round(lat, 4),
                    "speedup": round(speedup, 3), "quality": round(m["quality"], 4), "quality_worst": round(m["quality_worst"], 4),
                    "ssim": round(m["ssim"], 4), "semantic_agreement": round(m["semantic"], 4), "hf_ratio": round(m["hf_ratio"], 4),
                    "verification_images": len(subject.items), "latency_batch": one.batch_size, "latency_repeats": repeats}
        if scorer.name == "evaluator":
            measured.update({"score_full": round(m["score_full"], 4), "score": round(m["score"], 4),
                             "score_drop": round(m["score_full"] - m["score"], 4)})
        results.append((trial, point, measured))
    ok = [r for r in results if r[2]["feasible"]]
    if ok:
        return max(ok, key=lambda r: (r[2]["quality"], r[2]["speedup"]))
    return max(results, key=lambda r: r[2]["speedup"])
