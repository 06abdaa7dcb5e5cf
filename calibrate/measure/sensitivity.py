"""Per-scale sensitivity: accelerate one scale at a time and measure the damage.

Variants (see :class:`calibrate.measure.common.Variant`): ``cond`` drops guidance from scale k on
(a policy can only drop guidance for a suffix of scales, so this is what the search can choose);
``cfg+rp@0.5`` etc. compute a token subset at scale k alone. Every other scale is untouched. Each
is compared with the full model's output for the same prompt and seed.

quality = 0.5 * SSIM + 0.5 * semantic agreement (per image; 1 = identical), damage = 1 - quality.
"""
from __future__ import annotations

import numpy as np

from calibrate.measure.common import RunOutput, Variant, point_from_plans
from calibrate.metrics import SemanticScorer, hf_ratio, ssim


def compare(out: RunOutput, ref: RunOutput, prompts: list[str], scorer: SemanticScorer, ref_semantic=None) -> dict:
    s = ssim(out.images, ref.images)
    if scorer.name == "evaluator":
        ref_sem = ref_semantic if ref_semantic is not None else scorer.score(ref.images, prompts, ref.images)
        sem_acc = scorer.score(out.images, prompts, ref.images)
        agree = (sem_acc == ref_sem).astype(np.float64)
        score_acc, score_ref = float(sem_acc.mean()), float(ref_sem.mean())
    else:
        agree = scorer.score(out.images, prompts, ref.images, out.final_codes, ref.final_codes)
        score_acc = score_ref = None
    q = 0.5 * s + 0.5 * agree
    return {
        "ssim": float(s.mean()), "semantic": float(agree.mean()), "hf_ratio": float(hf_ratio(out.images, ref.images).mean()),
        "quality": float(q.mean()), "quality_worst": float(q.min()), "damage": float(1 - q.mean()),
        "score": score_acc, "score_full": score_ref, "per_image_quality": [float(v) for v in q],
    }


def measure_variant(subject, ref: RunOutput, scale: int, variant: Variant, scorer, ref_semantic=None) -> dict:
    point = point_from_plans(subject.num_scales, {scale: variant.plan(scale)})
    out = subject.run(point)
    row = {"scale": scale, "variant": variant.name, "guidance": variant.guidance, "keep": variant.keep,
           "selection": variant.selection}
    row.update(compare(out, ref, subject.item_prompts, scorer, ref_semantic))
    row.pop("per_image_quality")
    return row
