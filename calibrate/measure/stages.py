"""Stage boundaries from the convergence curves and the sensitivities.

Rule (documented in the record as ``stages.rule``):

The curves are those of :func:`calibrate.measure.convergence.summarize_curves`: ``semantic``
(the learned semantic metrics when measured, CLIP / DINOv2; else the coarse colour-layout
agreement) and the structure curve (SSIM, averaged with LPIPS when measured); "SSIM" below means
that structure curve. Each image's curves are normalised from their value at scale 0 (0) to the
final image (1), and each image has its own ends: the first scale at which its normalised
semantic agreement reaches ``semantic_level`` (0.9; the content is decided) and the first scale
after the semantic end at which its normalised SSIM reaches ``structure_level`` (0.6; the layout
is decided). A stage ends at the first scale by which at least :data:`IMAGE_SHARE` (half) of the
images have reached their end:

* **semantic** stage: scales 0..s, s the scale by which half the images' content is decided; when
  the semantic curve is flat (a weak model whose verdicts agree from the start) the images' ends
  are where their normalised SSIM reaches 0.25 instead;
* **structure** stage: s+1..t, t the first scale after s by which half the images' layout is
  decided;
* **refinement**: t+1..N-1 - the scales that only refine fidelity. At least one scale is always
  left in refinement, and never scale 0.

Counting images rather than averaging them keeps a boundary in place when a draw of prompts holds
one image whose content settles late: such an image pulls the mean curve below the level at a
scale where most images are decided, and the mean curve's boundary moves from one draw of
calibration prompts to the next (``benchmarks/results/stage-rule``). A record measured before
per-image values were kept has only the mean curves; its boundaries come from the same levels on
the mean curves (the rule text says which).

The sensitivities are kept next to the boundaries as evidence: the damage of each variant at each
scale, so a reader (and the search, which may move the boundary) can see why.

The boundaries are estimates from a few images. :func:`boundary_support` resamples the prompts
(bootstrap, each prompt with its seeds' images) and counts how often the rule gives each boundary; the report marks a boundary that
fewer than :data:`RESOLVED_SUPPORT` of the resamples agree on as unresolved.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

SEMANTIC_LEVEL = 0.9
STRUCTURE_LEVEL = 0.6
SEMANTIC_FALLBACK = 0.25
#: a stage ends at the first scale by which this share of the images have reached their end
IMAGE_SHARE = 0.5
#: bootstrap resamples of the images behind :func:`boundary_support`
RESAMPLES = 1000
#: a boundary at least this share of the resamples agree on counts as resolved
RESOLVED_SUPPORT = 0.9


def detect_stages(curves: dict, n: int, semantic_level: float = SEMANTIC_LEVEL, structure_level: float = STRUCTURE_LEVEL) -> dict:
    """The stages of the module's rule: from the per-image values (``curves["images"]``) when the
    curves hold them for two images or more, else from the mean curves."""
    if n < 2:
        raise ValueError(f"stage detection needs at least 2 scales, got {n}")
    if n == 2:
        return {"semantic": [0, 0], "structure": [1, 0], "refinement": [1, 1],
                "rule": "two scales: the second is refinement", "evidence": {"semantic_curve": curves["semantic"],
                                                                              "ssim_curve": curves["ssim"]}}
    images = curves.get("images")
    if images and len(images["semantic"][0]) >= 2:
        return _stages_by_image(curves, n, semantic_level, structure_level)
    return _stages_of_means(curves, n, semantic_level, structure_level)


def _measure_names(curves: dict) -> tuple[str, str]:
    """(text naming the semantic measure, name of the structure measure) for the rule text: the
    default measures (coarse agreement, SSIM) are not named, so that the rule text, and with it the
    hash of a record measured before measures could be chosen, stays what it was."""
    semantic_measure = curves.get("semantic_measure", "coarse_agreement")
    structure_measure = curves.get("structure_measure", "ssim")
    return ("" if semantic_measure == "coarse_agreement" else f" ({semantic_measure})",
            "SSIM" if structure_measure == "ssim" else structure_measure)


def _semantic_informative(sem) -> bool:
    """Whether the (mean) semantic curve says anything: a weak model's semantic verdicts can agree
    from the start, and then the layout decides when the content is."""
    return sem[-1] - sem[0] > 0.1 and max(sem) - min(sem) > 0.1


def _clamp(s: int, t: int, n: int) -> tuple[int, int]:
    s = min(s, n - 3) if n >= 3 else 0
    return s, max(s + 1, min(t, n - 2))


def image_ends(values: np.ndarray, level: float, after: int = -1) -> np.ndarray:
    """Per image (column of ``values``, scales x images), the first scale after ``after`` at which
    the image's curve, normalised from its value at scale 0 (0) to its final value (1), reaches
    ``level``; an image whose curve does not move counts as decided at scale 0.

    >>> image_ends(np.array([[0.0, 0.5], [0.5, 0.5], [0.95, 0.7], [1.0, 1.0]]), 0.9)
    array([2, 3])
    >>> image_ends(np.array([[0.0, 0.5], [0.5, 0.5], [0.95, 0.7], [1.0, 1.0]]), 0.9, after=2)
    array([3, 3])
    """
    span = values[-1] - values[0]
    z = np.where(span > 1e-9, (values - values[0]) / np.where(span > 1e-9, span, 1.0), 1.0)
    reached = z >= level
    reached[: after + 1] = False
    reached[-1] = True
    return reached.argmax(axis=0)


def share_end(ends: np.ndarray, share: float = IMAGE_SHARE) -> int:
    """The first scale by which at least ``share`` of the images have reached their end.

    >>> share_end(np.array([6, 6, 7, 9])), share_end(np.array([6, 7, 7, 9]), 0.75)
    (6, 7)
    """
    need = share * len(ends)
    return int(next(k for k in sorted(set(ends.tolist())) if (ends <= k).sum() >= need - 1e-9))


def _stages_by_image(curves: dict, n: int, semantic_level: float, structure_level: float) -> dict:
    sem_img = np.asarray(curves["images"]["semantic"], dtype=np.float64)
    str_img = np.asarray(curves["images"]["structure"], dtype=np.float64)
    sem_name, structure_name = _measure_names(curves)
    if _semantic_informative(sem_img.mean(axis=1)):
        sem_ends = image_ends(sem_img, semantic_level)
        semantic_rule = f"normalised semantic agreement{sem_name} >= {semantic_level}"
    else:
        sem_ends = image_ends(str_img, SEMANTIC_FALLBACK)
        semantic_rule = f"(semantic curve{sem_name} flat) normalised {structure_name} >= {SEMANTIC_FALLBACK}"
    s = min(share_end(sem_ends), n - 3)
    struct_ends = image_ends(str_img, structure_level, after=s)
    s, t = _clamp(s, share_end(struct_ends), n)
    share = f"{IMAGE_SHARE:.0%} of the images"
    return {
        "semantic": [0, s], "structure": [s + 1, t], "refinement": [t + 1, n - 1],
        "rule": f"each image's curves normalised from scale 0 (0) to its final image (1); semantic ends at the first "
                f"scale by which {share} reach {semantic_rule}; structure ends at the first later scale by which "
                f"{share} reach normalised {structure_name} >= {structure_level}; the rest is refinement",
        "evidence": {"semantic_curve": curves["semantic"], "ssim_curve": curves.get("structure", curves["ssim"]),
                     "semantic_image_ends": sorted(sem_ends.tolist()), "structure_image_ends": sorted(struct_ends.tolist())},
    }


def _stages_of_means(curves: dict, n: int, semantic_level: float, structure_level: float) -> dict:
    """The levels applied to the mean curves (records without per-image values)."""
    sem = list(curves["semantic"])
    ss = list(curves.get("structure", curves["ssim"]))       # SSIM, or SSIM with LPIPS when measured
    sem_name, structure_name = _measure_names(curves)
    # Normalise each curve from its value at scale 0 (0) to the final image (1): images that are
    # mostly background start with a high SSIM, and a weak model's semantic verdicts can agree
    # from the start, so absolute levels say little.
    ss_n = [(v - ss[0]) / max(1e-9, ss[-1] - ss[0]) for v in ss]
    if _semantic_informative(sem):
        sem_n = [(v - sem[0]) / (sem[-1] - sem[0]) for v in sem]
        s = next((k for k in range(n) if sem_n[k] >= semantic_level), n - 1)
        semantic_rule = f"normalised semantic agreement{sem_name} >= {semantic_level}"
    else:
        s = next((k for k in range(n) if ss_n[k] >= SEMANTIC_FALLBACK), n - 1)
        semantic_rule = f"(semantic curve{sem_name} flat) normalised {structure_name} >= {SEMANTIC_FALLBACK}"
    s = min(s, n - 3) if n >= 3 else 0
    t = next((k for k in range(s + 1, n) if ss_n[k] >= structure_level), n - 1)
    s, t = _clamp(s, t, n)
    return {
        "semantic": [0, s], "structure": [s + 1, t], "refinement": [t + 1, n - 1],
        "rule": f"curves normalised from scale 0 (0) to the final image (1); semantic ends at the first scale with "
                f"{semantic_rule}; structure ends at the first later scale with normalised {structure_name} >= "
                f"{structure_level}; "
                "the rest is refinement",
        "evidence": {"semantic_curve": sem, "ssim_curve": ss, "ssim_normalised": ss_n},
    }


def boundary_support(curves: dict, n: int, resamples: int = RESAMPLES, seed: int = 0) -> dict | None:
    """How firmly the images decide the boundaries: the rule of :func:`detect_stages` applied to
    ``resamples`` bootstrap resamples of the prompts (drawn with replacement, each with all its
    seeds' images; seeded, so the same record gives the same answer). Returns the share of
    resamples giving each semantic end and each structure end, and ``support``, the share giving
    the boundaries of the full set; None when ``curves`` holds no per-image values (records
    measured before they were kept) or one prompt.

    >>> imgs = {"semantic": [[0.0] * 8, [0.5] * 8, [1.0] * 8, [1.0] * 8], "structure": [[0.0] * 8, [0.2] * 8, [0.7] * 8, [1.0] * 8]}
    >>> curves = {"semantic": [0.0, 0.5, 1.0, 1.0], "ssim": [0.0, 0.2, 0.7, 1.0], "images": imgs}
    >>> boundary_support(curves, 4)
    {'resamples': 1000, 'images': 8, 'prompts': 8, 'semantic_end': {'1': 1.0}, 'structure_end': {'2': 1.0}, 'support': 1.0}
    """
    images = curves.get("images")
    if not images or n < 3:
        return None
    sem, struct = np.asarray(images["semantic"], dtype=np.float64), np.asarray(images["structure"], dtype=np.float64)
    m = sem.shape[1]
    # images of one prompt (its seeds) resemble each other more than images of two prompts: the
    # resampling draws prompts, each with all its seeds (image i shows prompt i mod P)
    prompts = int(images.get("prompts") or m)
    if m < 2 or prompts < 2 or m % prompts:
        return None
    seeds = m // prompts
    full = detect_stages(curves, n)
    rng = np.random.default_rng(seed)
    ends: Counter = Counter()
    sem_ends: Counter = Counter()
    struct_ends: Counter = Counter()
    for _ in range(resamples):
        drawn = rng.integers(0, prompts, prompts)
        idx = (np.arange(seeds)[:, None] * prompts + drawn[None, :]).ravel()
        st = detect_stages({"semantic": sem[:, idx].mean(1).tolist(), "ssim": struct[:, idx].mean(1).tolist(),
                            "images": {"semantic": sem[:, idx], "structure": struct[:, idx]}}, n)
        sem_ends[st["semantic"][1]] += 1
        struct_ends[st["structure"][1]] += 1
        ends[(st["semantic"][1], st["structure"][1])] += 1

    def shares(c: Counter) -> dict[str, float]:
        return {str(k): round(v / resamples, 3) for k, v in sorted(c.items())}
    return {"resamples": resamples, "images": m, "prompts": prompts, "semantic_end": shares(sem_ends),
            "structure_end": shares(struct_ends), "support": round(ends[(full["semantic"][1], full["structure"][1])] / resamples, 3)}


def stages_of(curves: dict, sensitivity: list[dict], n: int) -> dict:
    """The record's stages: :func:`detect_stages` on the stored curves, with the sensitivities and,
    where the record holds per-image values, the boundaries' :func:`boundary_support` as evidence.
    Derived data: recomputed whenever a record is used, so a cached record follows the current rule."""
    stages = detect_stages(curves, n)
    stages["evidence"]["sensitivity_damage"] = {f"{row['scale']}/{row['variant']}": row["damage"] for row in sensitivity}
    support = boundary_support(curves, n)
    if support is not None:
        stages["evidence"]["bootstrap"] = support
    return stages
