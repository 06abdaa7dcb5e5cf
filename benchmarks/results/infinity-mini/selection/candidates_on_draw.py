"""Every verification candidate of a finished calibration, and shipped plans, on one held-out
draw nothing saw: the evaluator drop of each (paired with the full model) and its paired
difference from the first plan given, with standard errors.

python candidates_on_draw.py OUT_DIR N DRAW OUT.json [POLICY@POINT ...]
(OUT_DIR: a calibration's --out; its record and study journal give the candidates, as verification
chose them; N prompts of draw DRAW of the held-out split, seed = the batch's first index, as the
bench's quality pass.)"""
import json
import sys
from pathlib import Path

import optuna
import torch

from calibrate.candidates import measured_trials, verification_candidates
from calibrate.pipeline import journal_storage
from calibrate.record import CalibrationRecord
from calibrate.budget import parse_budget
from calibrate.measure.latency import LatencyModel
from calibrate.search import INFEASIBLE_MARGIN, LATENCY_MARGIN, quality_of, skipping_allowed
from stagevar.models.registry import load_model
from stagevar.policy import load_policy
from stagevar.runtime import Runtime
from stagevar.toy.model import VARIANTS, load_mini

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "three-x"))
from plans_on_draw import print_drops, run_plans  # noqa: E402

torch.set_num_threads(2)
out_dir, n, draw, out = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
record = CalibrationRecord.load(next(out_dir.glob("calibration-*")))
storage = journal_storage(out_dir / "study.journal")
study_name = optuna.get_all_study_names(storage)[0]
study = optuna.load_study(study_name=study_name, storage=storage)
trials = measured_trials(study)
adapter = load_model(record.inputs["model"]["model"])
lat = LatencyModel.of_record(record, adapter.num_layers)
tokens = adapter.tokens_per_scale()
budget_s = parse_budget("3x").target_seconds(lat.baseline(tokens))
target = budget_s * (1 - LATENCY_MARGIN)
cands = verification_candidates(record, trials, target, 5, 2, allow_skip=skipping_allowed(record, lat, tokens, target),
                                near_s=budget_s * INFEASIBLE_MARGIN, cushion_s=target * (1 - LATENCY_MARGIN))
model = load_mini(variant=VARIANTS[256 if "256" in adapter.name else 128])
runtimes = {"full": Runtime(model, None)}
for p in sys.argv[5:]:
    path, _, point = p.partition("@")
    runtimes[p] = Runtime(model, load_policy(path), point or None)
for t, point in cands:
    name = f"trial {t.number} (pred {t.user_attrs.get('predicted_speedup', float('nan')):.2f}x, search q {quality_of(t):.3f})"
    runtimes[name] = Runtime(model, point)
res = run_plans(model, runtimes, n, draw)
print_drops(res, [k for k in runtimes if k != "full"])
with open(out, "w") as f:
    json.dump(res, f)
