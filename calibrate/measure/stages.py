"""Stage boundaries from the convergence curves and the sensitivities.

Rule (documented in the record as ``stages.rule``):

The curves are those of :func:`calibrate.measure.convergence.summarize_curves`: ``semantic``
(the learned semantic metrics when measured, CLIP / DINOv2; else the coarse colour-layout
agreement) and the structure curve (SSIM, averaged with LPIPS when measured); "SSIM" below means
that structure curve.

Both curves are first normalised from their value at scale 0 (0) to the final image (1).

* **semantic** stage: scales 0..s, where s is the first scale whose normalised semantic
  agreement reaches ``semantic_level`` (0.9) (the content is decided); when the semantic curve
  is flat (a weak model whose verdicts agree from the start) the first scale whose normalised
  SSIM reaches 0.25 is used instead;
* **structure** stage: s+1..t, where t is the first scale after s whose normalised SSIM reaches
  ``structure_level`` (0.6) (the layout is decided);
* **refinement**: t+1..N-1 - the scales that only refine fidelity. At least one scale is always
  left in refinement, and never scale 0.

The sensitivities are kept next to the boundaries as evidence: the damage of each variant at each
scale, so a reader (and the search, which may move the boundary) can see why.
"""
from __future__ import annotations

SEMANTIC_LEVEL = 0.9
STRUCTURE_LEVEL = 0.6
SEMANTIC_FALLBACK = 0.25


def detect_stages(curves: dict, n: int, semantic_level: float = SEMANTIC_LEVEL, structure_level: float = STRUCTURE_LEVEL) -> dict:
    if n < 2:
        raise ValueError(f"stage detection needs at least 2 scales, got {n}")
    if n == 2:
        return {"semantic": [0, 0], "structure": [1, 0], "refinement": [1, 1],
                "rule": "two scales: the second is refinement", "evidence": {"semantic_curve": curves["semantic"],
                                                                              "ssim_curve": curves["ssim"]}}
    sem = list(curves["semantic"])
    ss = list(curves.get("structure", curves["ssim"]))       # SSIM, or SSIM with LPIPS when measured
    # the measures are named when they are not the default ones (coarse agreement, SSIM), so that
    # the rule text, and with it the hash of a record measured before measures could be chosen,
    # stays what it was
    semantic_measure = curves.get("semantic_measure", "coarse_agreement")
    structure_measure = curves.get("structure_measure", "ssim")
    structure_name = "SSIM" if structure_measure == "ssim" else structure_measure

    def named(measure: str) -> str:
        return "" if measure == "coarse_agreement" else f" ({measure})"
    # Normalise each curve from its value at scale 0 (0) to the final image (1): images that are
    # mostly background start with a high SSIM, and a weak model's semantic verdicts can agree
    # from the start, so absolute levels say little.
    ss_n = [(v - ss[0]) / max(1e-9, ss[-1] - ss[0]) for v in ss]
    sem_range = max(sem) - min(sem)
    if sem[-1] - sem[0] > 0.1 and sem_range > 0.1:
        sem_n = [(v - sem[0]) / (sem[-1] - sem[0]) for v in sem]
        s = next((k for k in range(n) if sem_n[k] >= semantic_level), n - 1)
        semantic_rule = f"normalised semantic agreement{named(semantic_measure)} >= {semantic_level}"
    else:   # uninformative semantic curve: content counts as decided once the layout starts to settle
        s = next((k for k in range(n) if ss_n[k] >= SEMANTIC_FALLBACK), n - 1)
        semantic_rule = f"(semantic curve{named(semantic_measure)} flat) normalised {structure_name} >= {SEMANTIC_FALLBACK}"
    s = min(s, n - 3) if n >= 3 else 0
    t = next((k for k in range(s + 1, n) if ss_n[k] >= structure_level), n - 1)
    t = max(s + 1, min(t, n - 2))
    return {
        "semantic": [0, s], "structure": [s + 1, t], "refinement": [t + 1, n - 1],
        "rule": f"curves normalised from scale 0 (0) to the final image (1); semantic ends at the first scale with "
                f"{semantic_rule}; structure ends at the first later scale with normalised {structure_name} >= "
                f"{structure_level}; "
                "the rest is refinement",
        "evidence": {"semantic_curve": sem, "ssim_curve": ss, "ssim_normalised": ss_n},
    }
