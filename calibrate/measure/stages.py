"""Stage boundaries from the convergence curves and the sensitivities.

Rule (documented in the record as ``stages.rule``):

* **semantic** stage: scales 0..s, where s is the first scale whose partial image already
  agrees semantically with the final image at least ``semantic_level`` (0.9) of the final
  agreement (the content is decided);
* **structure** stage: s+1..t, where t is the first scale after s whose partial image reaches
  SSIM >= ``structure_level`` (0.6) with the final image (the layout is decided);
* **refinement**: t+1..N-1 - the scales that only refine fidelity. At least one scale is always
  left in refinement, and never scale 0.

The sensitivities are kept next to the boundaries as evidence: the damage of each variant at each
scale, so a reader (and the search, which may move the boundary) can see why.
"""
from __future__ import annotations

SEMANTIC_LEVEL = 0.9
STRUCTURE_LEVEL = 0.6


def detect_stages(curves: dict, n: int, semantic_level: float = SEMANTIC_LEVEL, structure_level: float = STRUCTURE_LEVEL) -> dict:
    if n < 2:
        raise ValueError(f"stage detection needs at least 2 scales, got {n}")
    if n == 2:
        return {"semantic": [0, 0], "structure": [1, 0], "refinement": [1, 1],
                "rule": "two scales: the second is refinement", "evidence": {"semantic_curve": curves["semantic"],
                                                                              "ssim_curve": curves["ssim"]}}
    sem = curves["semantic"]
    ss = curves["ssim"]
    target = semantic_level * max(sem[-1], 1e-9)
    s = next((k for k in range(n) if sem[k] >= target), n - 1)
    s = min(s, n - 3) if n >= 3 else 0
    t = next((k for k in range(s + 1, n) if ss[k] >= structure_level), n - 1)
    t = max(s + 1, min(t, n - 2))
    return {
        "semantic": [0, s], "structure": [s + 1, t], "refinement": [t + 1, n - 1],
        "rule": f"semantic ends at the first scale with semantic agreement >= {semantic_level} x final; structure ends "
                f"at the first later scale with SSIM(partial, final) >= {structure_level}; the rest is refinement",
        "evidence": {"semantic_curve": sem, "ssim_curve": ss},
    }
