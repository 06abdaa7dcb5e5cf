"""Tried and not kept (RESULTS.md, 3x on infinity-mini): one policy point with its uncomputed
tokens restored several ways, by replacing the runtime's restore step in this process.

python restore_variants.py MODEL POLICY POINT N DRAW MODES (MODES comma-separated):
cached_update / cached_output (the runtime's), mean_corrected (plus the computed tokens' mean
residual), feat_corrected@TAU[+SIGMA] (residuals weighted by feature similarity, optionally also
by distance), spatial_corrected@SIGMA (by distance, SIGMA in cell spacings), grid_update
(computed updates interpolated over the grid), greedy:MODE (restored tokens' bits taken greedily).
Writes res-MODEL-POINT-DRAW-N.json (paired_modes.py compares two modes)."""
import sys, time, json, math
import numpy as np, torch, torch.nn.functional as F
import stagevar.runtime as rt
from stagevar.ops import tokens as T
from stagevar.policy import load_policy
from stagevar.runtime import Runtime
from stagevar.toy.model import load_mini
from calibrate.bench.methods import bench_prompts
from calibrate.metrics import ssim
from stagevar.toy.evaluate import score as eval_score
from stagevar.toy.prompts import parse_prompt

torch.set_num_threads(2)
MODEL = sys.argv[1]; POLICY = sys.argv[2]; POINT = sys.argv[3]; N = int(sys.argv[4]); DRAW = int(sys.argv[5])
MODES = sys.argv[6].split(",")
orig = T.restore_tokens
MODE = {"m": "cached_update"}

def interp(delta_sub, gh, gw, h, w):
    rows, n, C = delta_sub.shape
    g = delta_sub.transpose(1, 2).reshape(rows, C, gh, gw)
    g = F.interpolate(g.float(), size=(h, w), mode="bilinear", align_corners=False)
    return g.reshape(rows, C, -1).transpose(1, 2).to(delta_sub.dtype)

CTX = {}
def patched(mode, sel, x_sub, x_start_full, prev_start_up, prev_end_up):
    m = MODE["m"]
    if m in ("cached_update", "cached_output"):
        return orig(m, sel, x_sub, x_start_full, prev_start_up, prev_end_up)
    h, w = CTX["hw"]
    n = sel.count
    gh, gw = T.grid_dims(h, w, n)
    if m == "mean_corrected":
        x_sub0 = CTX["x_sub0"]
        idx = sel.positions.unsqueeze(-1).expand(-1, -1, x_start_full.shape[-1])
        d_cached = (prev_end_up - prev_start_up)
        corr = ((x_sub - x_sub0) - d_cached.gather(1, idx)).mean(1, keepdim=True)
        full = x_start_full + d_cached + corr
        return full.scatter(1, idx, x_sub.to(full.dtype))
    if m.startswith("feat_corrected") or m.startswith("spatial_corrected"):
        x_sub0 = CTX["x_sub0"]
        idx = sel.positions.unsqueeze(-1).expand(-1, -1, x_start_full.shape[-1])
        d_cached = (prev_end_up - prev_start_up)
        r = (x_sub - x_sub0) - d_cached.gather(1, idx)          # (rows, n, C)
        tau = float(m.split("@")[1].split("+")[0]) if "@" in m else 0.1
        if m.startswith("feat"):
            a = F.normalize(x_start_full.float(), dim=-1); b = F.normalize(x_sub0.float(), dim=-1)
            logits = a @ b.transpose(1, 2) / tau                   # (rows, M, n)
        else:
            h, w = CTX["hw"]
            yy = torch.arange(h * w) // w; xx = torch.arange(h * w) % w
            pos = sel.positions  # (rows, n)
            dy = yy[None, :, None] - yy[pos][:, None, :]; dx = xx[None, :, None] - xx[pos][:, None, :]
            sig = tau * math.sqrt(h * w / sel.count)
            logits = -(dy.float() ** 2 + dx.float() ** 2) / (2 * sig * sig)
        if "+" in m:   # both: spatial prior and feature similarity
            h, w = CTX["hw"]
            yy = torch.arange(h * w) // w; xx = torch.arange(h * w) % w
            pos = sel.positions
            dy = yy[None, :, None] - yy[pos][:, None, :]; dx = xx[None, :, None] - xx[pos][:, None, :]
            sig = float(m.split("+")[1]) * math.sqrt(h * w / sel.count)
            logits = logits - (dy.float() ** 2 + dx.float() ** 2) / (2 * sig * sig)
        wts = logits.softmax(-1)
        full = x_start_full + d_cached + (wts @ r.float()).to(x_start_full.dtype)
        return full.scatter(1, idx, x_sub.to(full.dtype))
    if m == "sub_mean":
        x_sub0 = CTX["x_sub0"]
        idx = sel.positions.unsqueeze(-1).expand(-1, -1, x_start_full.shape[-1])
        full = x_start_full + (x_sub - x_sub0).mean(1, keepdim=True)
        return full.scatter(1, idx, x_sub.to(full.dtype))
    if CTX["method"] == "deviation":
        return orig("cached_update", sel, x_sub, x_start_full, prev_start_up, prev_end_up)
    x_sub0 = CTX["x_sub0"]
    d_sub = x_sub - x_sub0
    cached = x_start_full + (prev_end_up - prev_start_up)
    if m == "grid_update":
        full = x_start_full + interp(d_sub, gh, gw, h, w)
    elif m == "corrected_update":
        idx = sel.positions.unsqueeze(-1).expand(-1, -1, cached.shape[-1])
        d_cached = (prev_end_up - prev_start_up).gather(1, idx)
        full = cached + interp(d_sub - d_cached, gh, gw, h, w)
    idx = sel.positions.unsqueeze(-1).expand(-1, -1, full.shape[-1])
    return full.scatter(1, idx, x_sub.to(full.dtype))

rt.restore_tokens = patched
# capture x_sub0 (subset input) and hw: wrap Selection.apply
orig_apply = T.Selection.apply
def apply(self, x):
    out = orig_apply(self, x)
    CTX["x_sub0"] = out
    return out
T.Selection.apply = apply
orig_sel = rt.select_tokens
def sel_tokens(method, x, hw, n, bs, gen=None):
    CTX["hw"] = hw; CTX["method"] = method
    out = orig_sel(method, x, hw, n, bs, gen)
    CTX["pos"] = out.positions
    return out
rt.select_tokens = sel_tokens

from stagevar.toy.model import VARIANTS; model = load_mini(variant=VARIANTS[256] if "256" in MODEL else VARIANTS[128])
pol = load_policy(POLICY)
items = bench_prompts(model, N, DRAW)
orig_sample = model.sample
GREEDY = {"on": False}
def sample(state, k, logits, noise=None):
    out = orig_sample(state, k, logits, noise)
    _, h, w = model.cfg.scale_schedule[k]
    if not GREEDY["on"] or CTX.get("hw") != (h, w) or CTX.get("k_used") == id(out):
        return out
    B = logits.shape[0]
    pairs = logits.reshape(B, -1, 2)
    g = pairs.argmax(-1).reshape(B, h, w, -1).unsqueeze(1).to(out.dtype)
    mask = torch.zeros(B, h * w, dtype=torch.bool)
    mask.scatter_(1, CTX["pos"][:B], True)
    mask = mask.reshape(B, 1, h, w, 1)
    return torch.where(mask, out, g)
model.sample = sample
full_rt = Runtime(model, None)
acc_rt = Runtime(model, pol, POINT)
B = 8
res = {m: {"eval": [], "ssim": []} for m in ["full"] + MODES}
t0 = time.time()
for start in range(0, len(items), B):
    chunk = items[start:start + B]
    prompts = [it["prompt"] for it in chunk]
    cond = model.encode_prompts(prompts)
    seed = start
    CTX.clear(); GREEDY['on'] = False
    ref = full_rt.generate(condition=cond, seed=seed).images.float().numpy()
    for m in ["full"] + MODES:
        CTX.clear()
        if m == "full":
            img = ref
        else:
            GREEDY["on"] = m.startswith("greedy")
            MODE["m"] = m.split(":")[-1]
            img = acc_rt.generate(condition=cond, seed=seed).images.float().numpy()
        res[m]["ssim"] += [float(v) for v in ssim(img, ref)]
        u8 = (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
        res[m]["eval"] += [int(bool(eval_score(im, parse_prompt(p)))) for im, p in zip(u8, prompts)]
    print(f"{start + len(chunk)}/{len(items)} {time.time() - t0:.0f}s", file=sys.stderr)
full = np.array(res["full"]["eval"])
for m in ["full"] + MODES:
    e = np.array(res[m]["eval"]); d = full - e
    print(f"{m:18s} eval {e.mean():.3f} drop {d.mean():+.3f} +- {d.std(ddof=1)/math.sqrt(len(d)):.3f}  ssim {np.mean(res[m]['ssim']):.3f}")
json.dump(res, open(f"res-{MODEL}-{POINT}-{DRAW}-{N}.json", "w"))
