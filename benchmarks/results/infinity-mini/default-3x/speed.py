"""Speedup of the shipped 3x point (and of the 3x points of other policy files given as arguments)
over the full model on one batch of 8 verification images, interleaved, 5 rounds, medians, as
calibration's verification times them. --steady: the allocator setting calibration and bench use.
Run from the repository root: python benchmarks/results/infinity-mini/default-3x/speed.py [--steady] [POLICY ...]
"""
import statistics
import sys

import torch

from calibrate.measure.common import Subject
from calibrate.prompts import bundled
from stagevar.models.registry import load_model
from stagevar.perf import steady_allocator
from stagevar.policy import load_policy

args = sys.argv[1:]
if "--steady" in args:
    args.remove("--steady")
    print(steady_allocator())
torch.set_num_threads(2)
model = load_model("infinity-mini")
subject = Subject(model, bundled(model.name, "verification", 8), [0], 8)
points = {"shipped 3x": load_policy("policies/infinity-mini.128.2x-3x-4x.yaml").operating_points["3x"]}
points.update({f: load_policy(f).operating_points["3x"] for f in args})
for p in points.values():                                      # warm-up
    subject.run(p, timed=True)
subject.run(None, timed=True)
base, times = [], {k: [] for k in points}
for _ in range(5):
    base.append(subject.run(None, timed=True).seconds)
    for k, p in points.items():
        times[k].append(subject.run(p, timed=True).seconds)
b = statistics.median(base)
print(f"full model {b:.3f} s per batch")
for k in points:
    print(f"{k}: {b / statistics.median(times[k]):.2f}x ({statistics.median(times[k]):.3f} s)")
