"""Ops and host syncs per image of a large model's exact structure at a small width, on every CPU
engine, for the full model and the paper / FastVAR plans (one counted generation each, bfloat16
autocast, batch 1, guidance on). Prints one JSON object per line as it goes, then the whole:

    PYTHONPATH=. python3 benchmarks/results/engines-cpu/count_ops.py infinity-2b 64 > ops.json
"""
import json
import sys
import time

import torch

from stagevar.baselines import build_baseline
from stagevar.models.registry import load_model
from stagevar.profile import profile
from stagevar.runtime import Runtime

torch.set_num_threads(2)
name, width = sys.argv[1], int(sys.argv[2])
m = load_model(name, random_weights=True, narrow=width, dtype=torch.bfloat16)
cond = m.encode_prompts(["a cat on a sofa"] if "var" not in name else ["207"])
out = {}
for plan in ["full", "paper", "fastvar"]:
    point = None if plan == "full" else build_baseline(plan, m)
    for engine in ["eager", "static"]:
        t = time.time()
        r = profile(Runtime(m, point, engine=engine, synchronize=True), cond, m.default_guidance, repeats=0)
        row = {k: r[k] for k in ("ops_per_image", "launching_ops_per_image", "host_syncs_per_image")}
        row["per_scale_launching"] = [s["launching_ops"] for s in r["per_scale"]]
        row["outside_launching"] = r["outside_scales"]["launching_ops"]
        out[f"{plan}@{engine}"] = row
        print(json.dumps({f"{plan}@{engine}": row, "seconds": round(time.time() - t)}), file=sys.stderr, flush=True)
print(json.dumps(out, indent=1))
