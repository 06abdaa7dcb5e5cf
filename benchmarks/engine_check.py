"""Every engine gives the same codes and images: eager vs static (vs graphs on CUDA), bit for bit,
for the identity, paper and FastVAR-style plans, on the tiny test models and optionally on a large
model (random weights); the graphs engine is checked on its capture and on a replay with another
seed and prompt order. Prints one table, writes ``OUT/engine_check.json``, exits 1 on a mismatch.

    PYTHONPATH=. python3 benchmarks/engine_check.py --device cuda --dtype bfloat16 --large infinity-2b --out out/gpu

Needs only torch, numpy and pyyaml (the GPU machine has no pytest).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from stagevar.baselines import build_baseline
from stagevar.engine import engines_for
from stagevar.models.registry import load_model
from stagevar.runtime import Runtime


def _prompts(model) -> list[str]:
    return ["207", "1"] if model.family == "var" else ["a red circle", "two blue squares"]


def check(model, plans: list[str], batch: int) -> list[dict]:
    rows = []
    engines = engines_for(model.device)
    prompts = (_prompts(model) * batch)[:batch]
    for plan in plans:
        point = None if plan == "full" else build_baseline(plan, model)
        runtimes = {e: Runtime(model, point, engine=e) for e in engines}
        for seed, order in ((3, prompts), (5, prompts[::-1])):          # the second: a replay for graphs
            t0 = time.perf_counter()
            want = runtimes["eager"].generate(order, seed=seed)
            for e in engines[1:]:
                got = runtimes[e].generate(order, seed=seed)
                rows.append({"model": model.name, "plan": plan, "engine": e, "seed": seed,
                             "codes_equal": bool(torch.equal(want.codes, got.codes)),
                             "images_equal": bool(torch.equal(want.images, got.images)),
                             "max_image_diff": float((want.images.float() - got.images.float()).abs().max()),
                             "seconds": round(time.perf_counter() - t0, 3)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--models", default="infinity-tiny,var-tiny", help="small models checked on every plan (batch 2)")
    p.add_argument("--large", help="also check this model with random weights (batch 1), e.g. infinity-2b")
    p.add_argument("--large-plans", default="full,paper,fastvar")
    p.add_argument("--out", type=Path, default=Path("out/engine-check"))
    a = p.parse_args(argv)
    dtype = getattr(torch, a.dtype)
    rows = []
    for name in [m for m in a.models.split(",") if m]:
        rows += check(load_model(name, device=a.device, dtype=dtype), ["full", "paper", "fastvar"], 2)
    if a.large:
        model = load_model(a.large, device=a.device, dtype=dtype, random_weights=True)
        rows += check(model, a.large_plans.split(","), 1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "engine_check.json").write_text(json.dumps({"device": str(a.device), "dtype": a.dtype, "torch": torch.__version__,
                                                          "rows": rows}, indent=1) + "\n")
    print("| model | plan | engine | seed | codes equal | images equal | max image diff |")
    print("|---|---|---|---:|---|---|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['plan']} | {r['engine']} | {r['seed']} | {r['codes_equal']} | {r['images_equal']} | "
              f"{r['max_image_diff']:.3g} |")
    bad = [r for r in rows if not (r["codes_equal"] and r["images_equal"])]
    print(f"{len(rows) - len(bad)} of {len(rows)} comparisons identical to eager")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
