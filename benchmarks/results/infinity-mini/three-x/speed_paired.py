"""Speedup of several plans against the full model, timed in interleaved rounds on one batch of 8:
python speed_paired.py 128|256 ROUNDS POLICY[@POINT] ... (median and range of the per-round ratios)."""
import sys, time, statistics, torch
from stagevar.policy import load_policy
from stagevar.runtime import Runtime
from stagevar.toy.model import load_mini, VARIANTS
from calibrate.bench.methods import bench_prompts
torch.set_num_threads(2)
model = load_mini(variant=VARIANTS[256] if sys.argv[1] == "256" else VARIANTS[128])
plans = sys.argv[3:]
rts = {"full": Runtime(model, None)}
for p in plans:
    path, _, point = p.partition("@")
    rts[p] = Runtime(model, load_policy(path), point or None)
items = bench_prompts(model, 8, 5)
cond = model.encode_prompts([it["prompt"] for it in items])
for r in rts.values():
    r.generate(condition=cond, seed=0)
ratios = {p: [] for p in plans}
for rep in range(int(sys.argv[2])):
    t = {}
    for name, r in rts.items():
        t0 = time.perf_counter(); r.generate(condition=cond, seed=rep); t[name] = time.perf_counter() - t0
    for p in plans:
        ratios[p].append(t["full"] / t[p])
for p in plans:
    print(f"{p:60s} {statistics.median(ratios[p]):.2f}x  ({min(ratios[p]):.2f}-{max(ratios[p]):.2f})")
