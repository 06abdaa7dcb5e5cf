"""How independent are a prompt's seeds? Per-image quality (vs the full model) and paired differences
between plans, on the search's images (the 8 calibration-split prompts x seeds 0, 100, 200, 300):
intra-class correlation by prompt, and how many independent images the 32 are worth.

python icc.py > icc.txt"""
import sys
from pathlib import Path

import numpy as np

from calibrate.measure.common import Subject
from calibrate.measure.sensitivity import per_image, quality_row

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_images import RECAL, ROOT, SHIPPED, points, prompts, setup  # noqa: E402

SEL = ROOT / "benchmarks/results/infinity-mini/selection"
FILES = {"s2": (SHIPPED, "2x"), "r2": (RECAL, "2x"), "s3": (SHIPPED, "3x"), "r3": (RECAL, "3x"),
         "d5": (SEL / "default-run5.yaml", "3x"), "d": (ROOT / "benchmarks/results/stage-rule/default-3x/default-3x.yaml", "3x"),
         "s4": (SHIPPED, "4x"), "r4": (RECAL, "4x")}


def icc(x):
    """One-way random-effects ICC(1) of ``x`` (rows: prompts, columns: seeds)."""
    n, k = x.shape
    msb = k * ((x.mean(1) - x.mean()) ** 2).sum() / (n - 1)
    msw = ((x - x.mean(1, keepdims=True)) ** 2).sum() / (n * (k - 1))
    return (msb - msw) / (msb + (k - 1) * msw)


if __name__ == "__main__":
    model, scorer = setup(threads=1)
    pts = points(FILES)
    cal = prompts(-1, 8)
    Q = {k: np.zeros((8, 4)) for k in pts}
    for j, seed in enumerate((0, 100, 200, 300)):
        s = Subject(model, cal, [seed], 8)
        ref = s.run(None)
        rs = scorer.reference_verdicts(ref.images, s.item_prompts)
        for k, p in pts.items():
            Q[k][:, j] = quality_row(per_image(s.run(p), ref, s.item_prompts, scorer, rs))["per_image_quality"]
        print("seed", seed, file=sys.stderr, flush=True)
    pairs = (("r2", "s2"), ("r3", "s3"), ("d5", "s3"), ("d", "s3"), ("r4", "s4"))
    for name, x in [(k, Q[k]) for k in Q] + [(f"{a}-{b}", Q[a] - Q[b]) for a, b in pairs]:
        r = icc(x)
        print(f"{name}: mean {x.mean():+.4f} ICC {r:+.2f} effective images {32 / (1 + 3 * r) if r > 0 else 32:.1f} of 32")
