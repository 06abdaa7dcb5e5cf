"""Convergence curves of the default calibration pass (8 prompts, seed 0) for several draws of
the calibration split, with their per-image values, saved so that stage rules can be compared on the same curves:
python curves_by_draw.py MODEL DRAWS OUT.json [NUM_PROMPTS [SEEDS]]."""
import json, sys, time
import torch
from stagevar.models.registry import load_model
from calibrate.measure.common import Subject
from calibrate.measure.convergence import collect_partials, convergence_values, summarize_curves
from calibrate.metrics import scorer_for
from calibrate.prompts import bundled

torch.set_num_threads(2)
model_name, draws, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
n_prompts = int(sys.argv[4]) if len(sys.argv) > 4 else 8
seeds = [int(s) for s in (sys.argv[5] if len(sys.argv) > 5 else "0").split(",")]
m = load_model(model_name, None, device="cpu", dtype=torch.float32)
rows = []
for draw in range(draws):
    t0 = time.time()
    prompts = bundled(model_name, "calibration", n_prompts, draw=draw)
    sub = Subject(m, prompts, seeds, 8)
    partial, _, res = collect_partials(sub, (), keep_spectra=False)
    values = convergence_values(partial, res.images, sub.item_prompts, scorer_for(m.name))
    curves = summarize_curves(values)
    per_image = {k: [[float(x) for x in v] for v in values[k]] for k in ("semantic", "ssim")}
    rows.append({"draw": draw, "prompts": n_prompts, "seeds": seeds, "curves": curves, "per_image": per_image})
    print(f"draw {draw}: {time.time() - t0:.0f} s", flush=True)
json.dump({"model": model_name, "draws": rows}, open(out, "w"), separators=(",", ":"))
