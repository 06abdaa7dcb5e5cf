"""Speedups of some trials of a calibration run over the full model, timed together: one batch of
8 calibration images, interleaved, 12 rounds after a warm-up, medians (the full model's median /
each plan's). Run from the repository root:
python benchmarks/results/infinity-mini/search-images/same_plans.py OUT STUDY TRIAL [TRIAL ...]
(OUT: the run's --out, holding study.journal and calibration-<key>/)."""
import statistics
import sys
from pathlib import Path

import optuna
import torch
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from calibrate.measure.common import Subject
from calibrate.prompts import bundled
from calibrate.record import CalibrationRecord
from calibrate.search import point_from_params
from stagevar.models.registry import load_model

out, study_name, numbers = Path(sys.argv[1]), sys.argv[2], [int(n) for n in sys.argv[3:]]
torch.set_num_threads(2)
rec = CalibrationRecord.load(next(out.glob("calibration-*")))
study = optuna.load_study(study_name=study_name, storage=JournalStorage(JournalFileBackend(str(out / "study.journal"))))
model = load_model("infinity-mini")
one = Subject(model, bundled("infinity-mini", "calibration", 8), [0], 8).first_batch()
points = {"full": None, **{f"trial {n}": point_from_params(rec, study.trials[n].params) for n in numbers}}
for p in points.values():
    one.run(p, timed=True)
times = {k: [] for k in points}
for _ in range(12):
    for k, p in points.items():
        times[k].append(one.run(p, timed=True).seconds)
base = statistics.median(times["full"])
for k, v in times.items():
    print(f"{k}: median {statistics.median(v):.4f} s, speedup {base / statistics.median(v):.3f}x "
          f"(range {min(v):.3f}-{max(v):.3f} s)")
