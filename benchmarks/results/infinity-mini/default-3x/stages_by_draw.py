"""Stage boundaries of infinity-mini from the convergence pass alone, for several draws of the
calibration split: python stages_by_draw.py NUM_PROMPTS SEEDS DRAWS [MODEL] (e.g. 8 0 3: 8 prompts,
seed 0, draws 0, 1, 2; MODEL default infinity-mini). Prints the boundaries and the curves of the
last six scales."""
import sys, torch, numpy as np
from stagevar.models.registry import load_model
from calibrate.measure.common import Subject
from calibrate.measure.convergence import measure_convergence
from calibrate.measure.stages import detect_stages
from calibrate.metrics import scorer_for
from stagevar.toy.prompts import make_split
torch.set_num_threads(2)
m = load_model(sys.argv[4] if len(sys.argv) > 4 else "infinity-mini", None, device="cpu", dtype=torch.float32)
n_prompts = int(sys.argv[1]); seeds = [int(s) for s in sys.argv[2].split(",")]
for draw in range(int(sys.argv[3])):
    prompts = [it["prompt"] for it in make_split("calibration", n_prompts, seed=draw)]
    sub = Subject(m, prompts, seeds, 8)
    curves, _, _ = measure_convergence(sub, scorer_for(m.name), (), keep_spectra=False)
    st = detect_stages(curves, sub.num_scales)
    print(draw, st["semantic"], st["structure"], st["refinement"], " sem", np.round(curves["semantic"], 3).tolist()[-6:], " ssim", np.round(curves["ssim"], 3).tolist()[-6:], flush=True)
