"""What the bench measures per method: latency (interleaved or sequential rounds, per scale),
peak memory, quality against the full model's images, a paper-like plan refitted to a speedup, and
the VAE's decoding time per dtype."""
from __future__ import annotations

import math
import os
import statistics
import sys
from typing import Any, Sequence

from calibrate.bench.methods import Method, progress

#: learned metric -> its columns in the table (agreement with the full model's image; CLIP's prompt score)
METRIC_COLUMNS = {"clip": "CLIP-I", "clip_text": "CLIP-T", "dino": "DINO", "lpips": "1-LPIPS", "dists": "1-DISTS"}


def percentile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_methods(runtimes: dict[str, Any], condition, seed: int, repeats: int, sequential: bool = False
                 ) -> tuple[dict[str, list[float]], dict[str, list[list[float]]], dict[str, float]]:
    """Warm-up round, then ``repeats`` interleaved rounds. Per method: seconds per run, per run the
    seconds of each scale (device times when the runtimes synchronise), and the warm-up
    generation's seconds (the first image: it includes a CUDA-graph capture). ``sequential``: one
    method after the other (warm-up and repeats), each runtime released before the next, so that
    only one method's captured graphs and caches are held at a time (large batches)."""
    names = list(runtimes)
    if sequential:
        samples: dict[str, list[float]] = {}
        per_scale: dict[str, list[list[float]]] = {}
        first = {}
        for nm in names:
            first[nm] = runtimes[nm].generate(condition=condition, seed=seed).seconds
            runs = [runtimes[nm].generate(condition=condition, seed=seed) for _ in range(repeats)]
            samples[nm], per_scale[nm] = [r.seconds for r in runs], [[rec.seconds for rec in r.records] for r in runs]
            runtimes[nm].release()
            progress(f"{nm}: first {first[nm]:.3f}s, median {statistics.median(samples[nm]):.3f}s")
        return samples, per_scale, first
    progress(f"warm-up round ({len(names)} methods)")
    first = {nm: runtimes[nm].generate(condition=condition, seed=seed).seconds for nm in names}
    samples: dict[str, list[float]] = {nm: [] for nm in names}
    per_scale: dict[str, list[list[float]]] = {nm: [] for nm in names}
    for r in range(repeats):
        for nm in names:
            res = runtimes[nm].generate(condition=condition, seed=seed)
            samples[nm].append(res.seconds)
            per_scale[nm].append([rec.seconds for rec in res.records])
        progress(f"round {r + 1}/{repeats}: " + ", ".join(f"{nm} {samples[nm][-1]:.3f}s" for nm in names))
    return samples, per_scale, first


def scale_breakdown(totals: list[float], per_scale: list[list[float]]) -> dict[str, Any]:
    """Median seconds of each scale over the rounds, and of the time outside every scale
    (conditioning setup and VAE decoding: what no policy shortens)."""
    scales = [statistics.median(r[k] for r in per_scale) for k in range(min(len(r) for r in per_scale))]
    outside = statistics.median(t - sum(r) for t, r in zip(totals, per_scale))
    return {"scales_median_s": scales, "outside_scales_median_s": outside}


class _QuietStderr:
    """Silence C++ writes to fd 2 (the profiler's start/stop lines) inside a ``with`` block."""

    def __enter__(self):
        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
            self._null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(self._null, 2)
        except OSError:
            self._saved = None
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            os.close(self._null)
        return False


def cpu_peak_bytes(fn) -> int | None:
    """Peak of tensor memory allocated through PyTorch's CPU allocator while ``fn()`` runs, above
    the level at its start (None when the profiler gives no memory events)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _QuietStderr():
        prof.__enter__()
    try:
        fn()
    finally:
        with _QuietStderr():
            prof.__exit__(None, None, None)
    try:
        events = prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    except Exception:                               # noqa: BLE001 - private API: no number rather than a wrong one
        return None
    if not mem:
        return None
    cur = peak = 0
    for _, nb in mem:
        cur += nb
        peak = max(peak, cur)
    return peak


def measure_memory(runtime, condition, seed: int, device) -> dict[str, Any]:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        runtime.generate(condition=condition, seed=seed)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mem_mib": peak / 2**20, "generation_mem_mib": (peak - before) / 2**20,
                "peak_mem_method": "torch.cuda.max_memory_allocated (weights included)"}
    if device.type == "cpu":
        peak = cpu_peak_bytes(lambda: runtime.generate(condition=condition, seed=seed))
        if peak is not None:
            return {"peak_mem_mib": peak / 2**20, "generation_mem_mib": peak / 2**20,
                    "peak_mem_method": "torch.profiler CPU allocator events, peak above the start (weights excluded)"}
    return {"peak_mem_mib": None, "generation_mem_mib": None, "peak_mem_method": "n/a"}


def _to_numpy(images):
    return images.float().clamp(0, 1).cpu().numpy()


def measure_quality(adapter, methods: list[Method], runtimes: dict[str, Any], items: list[dict[str, Any]],
                    seeds: int, batch_size: int, use_evaluator: bool, metrics: Sequence[Any] = ()) -> dict[str, dict[str, Any]]:
    """Per method (:func:`quality_summary`): SSIM / HF ratio vs the full model's image of the same
    prompt and seed, worst prompt, (embedded model) the evaluator's score per category and its drop
    from the full model's, and the mean of each learned metric (``metrics``:
    :mod:`calibrate.perceptual` metrics) as ``<name>_mean``; each mean with its standard error, and
    the per-image values."""
    import numpy as np
    from calibrate.metrics import hf_ratio, ssim
    if use_evaluator:
        from stagevar.toy.evaluate import score as eval_score
        from stagevar.toy.prompts import parse_prompt

    per: dict[str, dict[str, list]] = {m.name: {"ssim": [], "hf": [], "eval": [], "where": []} for m in methods}
    total = seeds * math.ceil(len(items) / batch_size)
    done = 0
    for s in range(seeds):
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            prompts = [it["prompt"] for it in chunk]
            cond = adapter.encode_prompts(prompts)
            batch_seed = s * 100_003 + start
            ref = None
            for m in methods:
                img = _to_numpy(runtimes[m.name].generate(condition=cond, seed=batch_seed).images)
                if ref is None:                     # methods[0] is the full model
                    ref = img
                d = per[m.name]
                d["ssim"] += [float(v) for v in ssim(img, ref)]
                d["hf"] += [float(v) for v in hf_ratio(img, ref)]
                d["where"] += [(it["prompt"], it["category"], s) for it in chunk]
                for metric in metrics:
                    agreement, text = metric.measure(img, ref, prompts)
                    d.setdefault(metric.name, []).extend(agreement.tolist())
                    if text is not None:
                        d.setdefault(f"{metric.name}_text", []).extend(text.tolist())
                if use_evaluator:
                    u8 = (np.clip(img, 0, 1) * 255).round().astype(np.uint8).transpose(0, 2, 3, 1)
                    d["eval"] += [bool(eval_score(im, parse_prompt(p))) for im, p in zip(u8, prompts)]
            done += 1
            progress(f"quality batch {done}/{total} ({len(chunk)} prompts x {len(methods)} methods)")
    full = per[methods[0].name]
    return {m.name: quality_summary(per[m.name], full, use_evaluator) for m in methods}


def quality_summary(d: dict[str, list], full: dict[str, list], use_evaluator: bool) -> dict[str, Any]:
    """One method's quality from its per-image values ``d`` (``ssim``, ``hf``, ``eval``, ``where``,
    learned metrics) and the full model's ``full`` on the same images: means with their standard
    errors, the worst image, the evaluator's score per category and its paired drop from the full
    model's. The per-image values are kept (``per_image``), so that any two methods can be compared
    image by image (:func:`paired`)."""
    import numpy as np
    from calibrate.measure.sensitivity import standard_error
    i_worst = int(np.argmin(d["ssim"]))
    q: dict[str, Any] = {
        "images": len(d["ssim"]),
        "ssim_mean": float(np.mean(d["ssim"])), "ssim_se": standard_error(d["ssim"]), "ssim_min": float(np.min(d["ssim"])),
        "hf_ratio_mean": float(np.mean(d["hf"])),
        "worst": {"prompt": d["where"][i_worst][0], "category": d["where"][i_worst][1],
                  "seed_index": d["where"][i_worst][2], "ssim": float(d["ssim"][i_worst])},
        "per_image": {"ssim": [float(v) for v in d["ssim"]]},
    }
    for name in METRIC_COLUMNS:
        if d.get(name):
            q[f"{name}_mean"] = float(np.mean(d[name]))
            q[f"{name}_se"] = standard_error(d[name])
            q["per_image"][name] = [float(v) for v in d[name]]
    if use_evaluator:
        cats: dict[str, list[bool]] = {}
        for ok, (_, cat, _) in zip(d["eval"], d["where"]):
            cats.setdefault(cat, []).append(ok)
        from stagevar.toy.prompts import CATEGORIES
        per_cat = {c: float(np.mean(cats[c])) for c in CATEGORIES if c in cats}
        verdicts = [float(v) for v in d["eval"]]
        drop = paired([float(v) for v in full["eval"]], verdicts)
        q["evaluator"] = {**per_cat, "overall": float(np.mean(list(per_cat.values()))),
                          "counts": {c: len(cats[c]) for c in per_cat},
                          "mean": float(np.mean(verdicts)), "se": standard_error(verdicts),
                          "drop": drop["diff"], "drop_se": drop["se"]}
        q["per_image"]["eval"] = verdicts
    return q


#: a paired difference is resolved (``better`` / ``worse``) beyond this many standard errors
PAIRED_Z = 2.0


def paired(a: Sequence[float], b: Sequence[float], z: float = PAIRED_Z) -> dict[str, Any]:
    """The mean of the image-by-image differences ``a - b`` (same prompts and seeds), its standard
    error, and whether it is told from zero (more than ``z`` standard errors).

    >>> paired([1, 1, 0, 1], [0, 1, 0, 1])
    {'diff': 0.25, 'se': 0.25, 'resolved': False, 'images': 4}
    >>> paired([0.9, 0.8, 0.7], [0.5, 0.45, 0.35])["resolved"]
    True
    """
    import numpy as np
    from calibrate.measure.sensitivity import resolved, standard_error
    if len(a) != len(b):
        raise ValueError(f"paired values need the same images: {len(a)} against {len(b)}")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = standard_error(diff)
    mean = float(diff.mean()) if diff.size else float("nan")
    return {"diff": mean, "se": se, "resolved": resolved(mean, se, z), "images": int(diff.size)}


#: keep ratios :func:`fit_budget` tries, most tokens first
FIT_KEEPS = (0.75, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)


def fit_budget(adapter, condition, guidance, speedup: float, engine: str, repeats: int = 3,
               lengths: Sequence[int] = (2, 3, 4, 5), margin: float = 0.03) -> dict[str, Any]:
    """The paper-like plan (:func:`stagevar.baselines.paper_policy`: guidance dropped and a uniform
    random-projection keep on the last ``R`` scales) refitted to ``speedup`` by measurement: for
    each refinement length ``R`` the largest keep of :data:`FIT_KEEPS` whose measured speedup over
    the full model (same engine, medians) reaches ``speedup * (1 + margin)`` (latency falls with
    the keep, so a bisection), then the candidate that computes the most token-layers. Random
    weights say nothing of quality; computing more is the stand-in. ``point`` is None when no
    candidate meets the budget."""
    from stagevar.baselines import paper_policy
    from stagevar.policy import predicted_work_skipped
    from stagevar.runtime import Runtime

    def median_s(point) -> float:
        rt = Runtime(adapter, point, synchronize=True, engine=engine)
        rt.generate(condition=condition, guidance=guidance, seed=0)                    # warm-up / capture
        return statistics.median(rt.generate(condition=condition, guidance=guidance, seed=0).seconds
                                 for _ in range(repeats))

    n = len(adapter.scale_schedule)
    full = median_s(None)
    tried, passing = [], []
    for R in [r for r in lengths if r < n]:
        lo, hi, best = 0, len(FIT_KEEPS) - 1, None
        while lo <= hi:                                    # the smallest index (largest keep) that meets it
            mid = (lo + hi) // 2
            point = paper_policy(adapter, keep=FIT_KEEPS[mid], refinement_scales=R)
            s = full / median_s(point)
            tried.append({"refinement_scales": R, "keep": FIT_KEEPS[mid], "speedup": round(s, 3)})
            progress(f"fit {speedup:g}x on {engine}: last {R} scales at keep {FIT_KEEPS[mid]:g}: {s:.2f}x")
            if s >= speedup * (1 + margin):
                best, hi = (FIT_KEEPS[mid], point), mid - 1
            else:
                lo = mid + 1
        if best is not None:
            passing.append((1 - predicted_work_skipped(best[1], adapter.scale_schedule, adapter.num_layers), R, best))
    if not passing:
        return {"point": None, "speedup": speedup, "engine": engine, "full_s": full, "tried": tried}
    kept, R, (keep, point) = max(passing, key=lambda c: c[0])
    return {"point": point, "speedup": speedup, "engine": engine, "full_s": full, "tried": tried,
            "chosen": {"refinement_scales": R, "keep": keep, "work_kept": round(kept, 4)}}


def compare_vae(adapter, condition, guidance, repeats: int) -> dict[str, Any] | None:
    """Seconds to decode one generated latent with the VAE in float32 and in the compute dtype
    (interleaved, median), for adapters that can (``decode_dtype``); None otherwise."""
    import torch
    from stagevar.runtime import Runtime
    if not hasattr(adapter, "decode_dtype"):
        return None
    state = adapter.prepare(condition, guidance=guidance, seed=0)
    Runtime(adapter)._loop(state, 0, None, None, _NoTimer())
    dtypes = list(dict.fromkeys([torch.float32, adapter.compute_dtype]))
    saved, times = adapter.decode_dtype, {d: [] for d in dtypes}
    try:
        for r in range(repeats + 1):
            for d in dtypes:
                adapter.decode_dtype = d
                _sync(adapter.device)
                t0 = _now()
                adapter.decode(state)
                _sync(adapter.device)
                if r:
                    times[d].append(_now() - t0)
    finally:
        adapter.decode_dtype = saved
        adapter.finish(state)
    return {**{f"{str(d).replace('torch.', '')}_s": statistics.median(t) for d, t in times.items()}, "repeats": repeats}


class _NoTimer:
    def mark(self) -> None:
        pass


def _now() -> float:
    import time
    return time.perf_counter()


def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)
