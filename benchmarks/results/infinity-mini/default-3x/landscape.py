"""Quality of a few 3x plans of infinity-mini on three image sets, each mean with its standard
error: the 8 calibration images of the default run, 32 calibration images (16 prompts x 2 seeds),
and the 64 verification images (held-out draw 1). Shows how far apart plans are against the
noise of each set. Run from the repository root: python benchmarks/results/infinity-mini/default-3x/landscape.py
"""
import torch

from calibrate.measure.common import Subject, point_from_plans
from calibrate.measure.sensitivity import compare
from calibrate.metrics import scorer_for
from calibrate.prompts import bundled
from stagevar.models.registry import load_model
from stagevar.policy import ScalePlan, load_policy

torch.set_num_threads(2)
model = load_model("infinity-mini")
scorer = scorer_for(model.name)
sets = {"calibration 8": Subject(model, bundled(model.name, "calibration", 8), [0], 8),
        "calibration 32": Subject(model, bundled(model.name, "calibration", 16), [0, 1], 8),
        "verification 64": Subject(model, bundled(model.name, "verification", 64), [0], 8)}
refs = {k: s.run(None) for k, s in sets.items()}
C = "cond_only"


def point(spec):
    return point_from_plans(10, {k: ScalePlan(k, **v) for k, v in spec.items()})


plans = {
    "shipped 3x (0.2/0.5/0.2/0.2)": load_policy("policies/infinity-mini.128.2x-3x-4x.yaml").operating_points["3x"],
    "default run, old code (skips 9)": point({6: dict(guidance=C, keep=0.4, selection="deviation"),
                                              7: dict(guidance=C, keep=0.3, selection="deviation"),
                                              8: dict(guidance=C, keep=0.2), 9: dict(skip=True)}),
    "default run, skip rule": point({6: dict(keep=0.1, selection="deviation"), 7: dict(guidance=C, keep=0.5, selection="deviation"),
                                     8: dict(guidance=C, keep=0.1), 9: dict(guidance=C, keep=0.1)}),
    "uniform 0.2 from 6": point({k: dict(guidance=C, keep=0.2) for k in range(6, 10)}),
    "uniform 0.3 from 6": point({k: dict(guidance=C, keep=0.3) for k in range(6, 10)}),
    "guidance dropped from 6 only": point({6: dict(guidance=C)}),
    "6 full, 7-9 at 0.2/0.1/0.1": point({6: dict(guidance=C), 7: dict(guidance=C, keep=0.2), 8: dict(guidance=C, keep=0.1),
                                         9: dict(guidance=C, keep=0.1)}),
}
print("| plan | " + " | ".join(f"{k}: quality | drop" for k in sets) + " |")
print("|---|" + "---:|---:|" * len(sets))
for name, pt in plans.items():
    cells = []
    for k, s in sets.items():
        r = compare(s.run(pt), refs[k], s.item_prompts, scorer)
        cells += [f"{r['quality']:.3f} ± {r['quality_se']:.3f}", f"{r['score_full'] - r['score']:+.3f} ± {r['score_drop_se']:.3f}"]
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
