"""Evaluator score and SSIM of several plans on one held-out draw, paired with the full model.

python plans_on_draw.py MODEL N DRAW OUT.json POLICY[@POINT] ...   (MODEL: infinity-mini or
infinity-mini-256; N prompts of draw DRAW of the held-out split, seed = the batch's first index,
as the bench's quality pass; the full model's images are generated once per batch). Prints each
plan's evaluator drop and its paired difference from the first plan, with standard errors.
``run_plans`` and ``print_drops`` are also imported by ``../selection/candidates_on_draw.py``."""
import json
import math
import sys

import numpy as np
import torch

from calibrate.bench.methods import bench_prompts
from calibrate.metrics import ssim
from stagevar.policy import load_policy
from stagevar.runtime import Runtime
from stagevar.toy.evaluate import score as eval_score
from stagevar.toy.model import VARIANTS, load_mini
from stagevar.toy.prompts import parse_prompt


def run_plans(model, runtimes: dict, n: int, draw: int) -> dict:
    """Every runtime (the first one the full model) on ``n`` prompts of held-out draw ``draw``,
    8 a batch: per-image evaluator verdicts and SSIM against the full model's image."""
    items = bench_prompts(model, n, draw)
    res = {name: {"eval": [], "ssim": []} for name in runtimes}
    for start in range(0, len(items), 8):
        prompts = [it["prompt"] for it in items[start:start + 8]]
        cond = model.encode_prompts(prompts)
        ref = None
        for name, rt in runtimes.items():
            img = rt.generate(condition=cond, seed=start).images.float().numpy()
            ref = img if ref is None else ref
            u8 = (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
            res[name]["eval"] += [int(bool(eval_score(im, parse_prompt(p)))) for im, p in zip(u8, prompts)]
            res[name]["ssim"] += [float(v) for v in ssim(img, ref)]
        print(f"{start + len(prompts)}/{len(items)}", file=sys.stderr, flush=True)
    return res


def mean_se(x):
    x = np.asarray(x, dtype=float)
    return x.mean(), x.std(ddof=1) / math.sqrt(len(x))


def print_drops(res: dict, names: list[str]) -> None:
    """Each plan's evaluator drop against the full model and its paired difference from the first."""
    full = np.array(res["full"]["eval"])
    first = np.array(res[names[0]]["eval"]) if names else full
    print(f"full model: evaluator {full.mean():.3f} on {len(full)} images")
    for name in names:
        e = np.array(res[name]["eval"])
        d, d_se = mean_se(full - e)
        v, v_se = mean_se(e - first)
        print(f"{name}: drop {d:.3f} +- {d_se:.3f}, SSIM {np.mean(res[name]['ssim']):.3f}, vs first {v:+.3f} +- {v_se:.3f}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    model_name, n, draw, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    plans = sys.argv[5:]
    model = load_mini(variant=VARIANTS[256 if model_name.endswith("256") else 128])
    runtimes = {"full": Runtime(model, None)}
    for p in plans:
        path, _, point = p.partition("@")
        runtimes[p] = Runtime(model, load_policy(path), point or None)
    res = run_plans(model, runtimes, n, draw)
    print_drops(res, plans)
    with open(out, "w") as f:
        json.dump(res, f)
