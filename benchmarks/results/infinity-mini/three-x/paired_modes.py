"""python paired_modes.py RESULT.json BASE_MODE: paired evaluator and SSIM differences of every mode from BASE_MODE."""
import json, sys, numpy as np, math
r = json.load(open(sys.argv[1])); a = sys.argv[2]
for m in r:
    if m in ("full", a): continue
    d = np.array(r[m]["eval"]) - np.array(r[a]["eval"])
    s = np.array(r[m]["ssim"]) - np.array(r[a]["ssim"])
    print(f"{m} - {a}: eval {d.mean():+.3f} +- {d.std(ddof=1)/math.sqrt(len(d)):.3f}; ssim {s.mean():+.4f} +- {s.std(ddof=1)/math.sqrt(len(s)):.4f}  (n={len(d)})")
