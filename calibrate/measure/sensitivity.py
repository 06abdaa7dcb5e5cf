"""Per-scale sensitivity: accelerate one scale at a time and measure the damage.

Variants (see :class:`calibrate.measure.common.Variant`): ``cond`` drops guidance from scale k on
(a policy can only drop guidance for a suffix of scales, so this is what the search can choose);
``cfg+rp@0.5`` etc. compute a token subset at scale k alone. Every other scale is untouched. Each
is compared with the full model's output for the same prompt and seed.

quality = 0.5 * structure + 0.5 * semantic agreement (per image; 1 = identical), damage = 1 -
quality. Structure is SSIM, averaged with the structural learned metrics (LPIPS) when they are
measured; semantic agreement is the scorer's (the evaluator's verdicts, or the code agreement),
replaced by the mean of the learned semantic metrics (CLIP, DINOv2) when they are measured (with
the evaluator, its agreement joins them).

Every comparison is made per image (:func:`per_image`) and reduced by one function
(:func:`summarize`), whichever process measured the images: the single-process pass and the
merge of a sharded one give the same numbers. Each mean carries its standard error over the
images (``*_se``); since every image is compared with the full model's image of the same prompt
and seed, a damage is already a paired difference, and ``score_drop_se`` is the standard error of
the paired evaluator differences.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from calibrate.measure.common import RunOutput, Variant, point_from_plans
from calibrate.metrics import SemanticScorer, hf_ratio, ssim

#: per-image value names (:func:`per_image`); ``sem_acc`` / ``ref_sem`` only with the evaluator;
#: the learned metrics add ``semantic:<name>``, ``structure:<name>`` and ``prompt:<name>``
PER_IMAGE = ("ssim", "agree", "hf", "sem_acc", "ref_sem")
METRIC_KINDS = ("semantic", "structure", "prompt")


def value_names(vals: Mapping[str, Any]) -> list[str]:
    """The per-image value names present in ``vals`` (a :func:`per_image` result or a stored item)."""
    return [k for k in PER_IMAGE if vals.get(k) is not None] + sorted(
        k for k in vals if k.partition(":")[0] in METRIC_KINDS and ":" in k)


def standard_error(values: Sequence[float] | np.ndarray) -> float | None:
    """Standard error of the mean (sample standard deviation / sqrt(n)); None below 2 values.

    >>> round(standard_error([0.0, 1.0, 0.0, 1.0]), 4)
    0.2887
    >>> standard_error([1.0]) is None
    True
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return None
    return float(v.std(ddof=1) / math.sqrt(v.size))


def per_image(out: RunOutput, ref: RunOutput, prompts: list[str], scorer: SemanticScorer,
              ref_semantic=None) -> dict[str, np.ndarray]:
    """Per-image comparison of ``out`` with ``ref`` (same prompts and seeds): ``ssim``, ``agree``
    (semantic agreement: with the evaluator, 1 where its verdict on both images is the same),
    ``hf`` (high-frequency energy ratio) and, with the evaluator, ``sem_acc`` / ``ref_sem`` (its
    verdict on each image)."""
    vals = {"ssim": np.asarray(ssim(out.images, ref.images), dtype=np.float64),
            "hf": np.asarray(hf_ratio(out.images, ref.images), dtype=np.float64)}
    if scorer.judges_prompt:
        ref_sem = ref_semantic if ref_semantic is not None else scorer.score(ref.images, prompts, ref.images)
        sem_acc = scorer.score(out.images, prompts, ref.images)
        vals["sem_acc"] = np.asarray(sem_acc, dtype=np.float64)
        vals["ref_sem"] = np.asarray(ref_sem, dtype=np.float64)
        vals["agree"] = (vals["sem_acc"] == vals["ref_sem"]).astype(np.float64)
    else:
        vals["agree"] = np.asarray(scorer.score(out.images, prompts, ref.images, out.final_codes, ref.final_codes),
                                   dtype=np.float64)
    vals.update(scorer.metric_values(out.images, ref.images, prompts))
    return vals


def quality_parts(vals: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image (structure, semantic) agreement: structure is SSIM averaged with the structural
    metrics, semantic the scorer's agreement or, when learned semantic metrics were measured,
    their mean (the evaluator's agreement joins them; the code agreement gives way)."""
    col = lambda k: np.asarray(vals[k], dtype=np.float64)  # noqa: E731
    structure = [col("ssim")] + [col(k) for k in sorted(vals) if k.startswith("structure:") and vals[k] is not None]
    semantic = [col(k) for k in sorted(vals) if k.startswith("semantic:") and vals[k] is not None]
    if not semantic or vals.get("sem_acc") is not None:
        semantic.insert(0, col("agree"))
    return np.mean(structure, axis=0), np.mean(semantic, axis=0)


def concat_values(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per-image values of several image sets (:func:`per_image` results) as one set.

    >>> concat_values([{"ssim": [1.0], "sem_acc": None}, {"ssim": [0.5], "sem_acc": None}])
    {'ssim': array([1. , 0.5]), 'sem_acc': None}
    """
    return {k: None if parts[0][k] is None else np.concatenate([np.asarray(p[k], dtype=np.float64) for p in parts])
            for k in parts[0]}


def summarize(vals: Mapping[str, Any]) -> dict[str, Any]:
    """The one reduction of per-image values (:func:`per_image`, or their concatenation over
    shards) to a sensitivity / quality row: means, standard errors, the worst image."""
    s = np.asarray(vals["ssim"], dtype=np.float64)
    structure, agree = quality_parts(vals)
    q = 0.5 * structure + 0.5 * agree
    row = {
        "ssim": float(s.mean()), "ssim_se": standard_error(s),
        "semantic": float(agree.mean()), "semantic_se": standard_error(agree),
        "hf_ratio": float(np.asarray(vals["hf"], dtype=np.float64).mean()),
        "quality": float(q.mean()), "quality_se": standard_error(q), "quality_worst": float(q.min()),
        "damage": float(1 - q.mean()), "damage_se": standard_error(q),
        "score": None, "score_full": None, "images": int(q.size),
    }
    learned = [k for k in value_names(vals) if ":" in k]
    if learned:
        row.update({"structure": float(structure.mean()), "structure_se": standard_error(structure)})
    for k in learned:                        # each learned metric's mean: clip, dino, lpips, clip_text
        v = np.asarray(vals[k], dtype=np.float64)
        name = k.split(":", 1)[1] + ("_text" if k.startswith("prompt:") else "")
        row.update({name: float(v.mean()), f"{name}_se": standard_error(v)})
    if vals.get("sem_acc") is not None:
        acc = np.asarray(vals["sem_acc"], dtype=np.float64)
        full = np.asarray(vals["ref_sem"], dtype=np.float64)
        row.update({"score": float(acc.mean()), "score_full": float(full.mean()),
                    "score_drop_se": standard_error(full - acc)})
    return row


def quality_row(vals: Mapping[str, Any]) -> dict:
    """:func:`summarize` of per-image values, with the per-image qualities (``per_image_quality``)."""
    row = summarize(vals)
    structure, agree = quality_parts(vals)
    row["per_image_quality"] = [float(v) for v in 0.5 * structure + 0.5 * agree]
    return row


def compare(out: RunOutput, ref: RunOutput, prompts: list[str], scorer: SemanticScorer, ref_semantic=None) -> dict:
    """:func:`quality_row` of :func:`per_image`."""
    return quality_row(per_image(out, ref, prompts, scorer, ref_semantic))


def resolved(value: float, se: float | None, z: float = 2.0) -> bool:
    """Whether a mean difference from zero (a damage, a drop) is more than ``z`` standard errors
    (False when the error is unknown, i.e. fewer than two images).

    >>> resolved(0.07, 0.05), resolved(0.2, 0.05)
    (False, True)
    """
    return se is not None and abs(value) > z * se


def variant_point(subject, scale: int, variant: Variant):
    return point_from_plans(subject.num_scales, {scale: variant.plan(scale)})


def variant_header(scale: int, variant: Variant) -> dict[str, Any]:
    return {"scale": scale, "variant": variant.name, "guidance": variant.guidance, "keep": variant.keep,
            "selection": variant.selection}


def measure_variant(subject, ref: RunOutput, scale: int, variant: Variant, scorer, ref_semantic=None) -> dict:
    out = subject.run(variant_point(subject, scale, variant), reuse_prefix=True)      # scales < scale: run once
    row = variant_header(scale, variant)
    row.update(summarize(per_image(out, ref, subject.item_prompts, scorer, ref_semantic)))
    return row
