"""The search's measure (quality, SSIM, evaluator) of the recalibrated (calibration-split) and the
previously shipped points, paired, on the calibration-split prompts the search measured its trials
on, or on a draw of the held-out split.

python search_images.py DRAW NPROMPTS SEEDS   (DRAW -1: the calibration split's draw 0, the bundled
calibration prompts until 2026-12-04; SEEDS comma-separated, one image set of NPROMPTS prompts per
seed, as the search's sets: 0,100,200,300). ``icc.py`` imports the setup from here."""
import sys
from pathlib import Path

import numpy as np
import torch

from calibrate.measure.common import Subject
from calibrate.measure.sensitivity import concat_values, per_image, quality_row
from calibrate.metrics import build_scorer
from stagevar.models.registry import load_model
from stagevar.policy import load_policy
from stagevar.toy.prompts import make_split

ROOT = Path(__file__).resolve().parents[4]
SHIPPED = Path(__file__).resolve().parent / "shipped-until-2026-12-04.yaml"
RECAL = ROOT / "benchmarks/results/infinity-mini/selection/recalibrated/front-2x-3x-4x.yaml"


def setup(threads: int = 2):
    """The model and its scorer (the evaluator)."""
    torch.set_num_threads(threads)
    model = load_model("infinity-mini")
    return model, build_scorer(model.name, device=model.device)


def prompts(draw: int, n: int) -> list[str]:
    """``n`` prompts of held-out draw ``draw``, or (``draw`` -1) of the calibration split's draw 0."""
    return [it["prompt"] for it in make_split("heldout" if draw >= 0 else "calibration", n, seed=max(draw, 0))]


def points(files: dict) -> dict:
    """{name: (policy file, point name)} -> {name: operating point}."""
    return {k: load_policy(f).operating_points[p] for k, (f, p) in files.items()}


def mean_se(x):
    x = np.asarray(x)
    return x.mean(), x.std(ddof=1) / np.sqrt(len(x))


if __name__ == "__main__":
    model, scorer = setup()
    pts = points({f"{n}{b}": (f, b + "x") for n, f in (("s", SHIPPED), ("r", RECAL)) for b in "234"})
    draw, nprompts, seeds = int(sys.argv[1]), int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")]
    items = prompts(draw, nprompts)
    vals = {k: [] for k in pts}
    for seed in seeds:
        s = Subject(model, items, [seed], 8)
        ref = s.run(None)
        rs = scorer.reference_verdicts(ref.images, s.item_prompts)
        for k, p in pts.items():
            vals[k].append(per_image(s.run(p), ref, s.item_prompts, scorer, rs))
    rows = {k: quality_row(concat_values(v)) for k, v in vals.items()}
    print(f"draw {draw}, {nprompts} prompts x seeds {seeds}")
    for b in "234":
        s, r = rows["s" + b], rows["r" + b]
        dq = mean_se(np.array(r["per_image_quality"]) - np.array(s["per_image_quality"]))
        ss = mean_se(np.concatenate([v["ssim"] for v in vals["r" + b]]) - np.concatenate([v["ssim"] for v in vals["s" + b]]))
        print(f"{b}x: quality shipped {s['quality']:.4f} recal {r['quality']:.4f}  recal-shipped {dq[0]:+.4f} ± {dq[1]:.4f}; "
              f"ssim {ss[0]:+.4f} ± {ss[1]:.4f}; evaluator drop shipped {s['score_full'] - s['score']:.3f} "
              f"recal {r['score_full'] - r['score']:.3f}")
