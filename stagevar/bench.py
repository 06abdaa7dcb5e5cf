"""``stagevar bench``: the full model, the searched policies and the published baselines, side by side.

For one model, in one process:

* **latency** - every method generates the same batch (prompt encoding done once beforehand and
  excluded; VAE decoding included) with ``Runtime(..., synchronize=True)``: one warm-up round,
  then ``--repeats`` rounds interleaved (full, m1, m2, ..., full, m1, m2, ...); median and p90 per
  method; speedup = the full model's median / the method's median, same run;
* **peak memory** of one generation per method: on CUDA ``torch.cuda.max_memory_allocated``
  (weights included); on CPU the peak of the tensor memory allocated through PyTorch's CPU
  allocator during the generation (weights excluded), from ``torch.profiler`` memory events;
  ``n/a`` where neither is available;
* **quality vs the full model** (unless ``--no-quality``): ``--prompts`` held-out prompts x
  ``--seeds`` seeds, every image compared with the full model's image of the same prompt and seed:
  SSIM and high-frequency energy ratio (:mod:`calibrate.metrics`), the worst prompt (lowest SSIM);
  for the embedded model ``infinity-mini`` also the analytic evaluator's score per category.

Methods: ``full`` (no policy), every operating point of every searched policy (``--policy``, or by
default the files in ``policies/`` whose ``model.name`` is the model), and the baselines of
:mod:`stagevar.baselines` (``--baselines``). With several ``--engine`` values every method runs on
every engine (``name@engine``), interleaved in the same rounds; the speedup is then taken against
the full model on the first engine listed, and ``speedup_same_engine`` against the full model on
the method's own engine. The warm-up round's time per method is reported as the first
generation's latency (it includes the capture on ``graphs``).

Writes ``OUT/bench.md`` (the table printed on stdout), ``OUT/bench.json`` and, unless
``--no-plot``, ``OUT/quality_vs_speedup.png`` (``OUT/speedup.png`` with ``--no-quality``). Progress
goes to stderr.

This module is only imported by the command line. It runs as ``python3 -m stagevar.bench`` too,
without the package installed (``PYTHONPATH=.``) and, with ``--no-quality --no-plot``, without
scipy or matplotlib.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import platform
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from stagevar.engine import ENGINE_HELP
from stagevar.errors import StageVarError, run_command
from stagevar.guidance import (format_guidance, guidance_argument, guidance_json, guidance_per_scale, is_guided,
                               same_guidance)

log = logging.getLogger("stagevar.bench")

EPILOG = textwrap.dedent("""\
    examples:
      stagevar bench                                     # infinity-mini: full, shipped policies, all baselines
      stagevar bench --model infinity-tiny --prompts 6 --repeats 3 --out out/bench-tiny
      stagevar bench --policy policies/infinity-mini.128.2x-3x-4x.yaml --seeds 2 --out out/bench
      stagevar bench --model infinity-2b --random-weights --device cuda --dtype bfloat16 \\
          --batch-size 1 --repeats 3 --no-quality --no-plot --baselines paper,fastvar
      PYTHONPATH=. python3 -m stagevar.bench --model infinity-tiny --no-quality --no-plot
    Latency excludes prompt encoding (done once) and includes VAE decoding. Baselines: paper
    (StageVAR hand-set), fastvar (FastVAR's Infinity code), skipvar-skip / skipvar-uncond (SkipVAR's
    two strategies, static); see stagevar/baselines.py and benchmarks/README.md.""")


# ----------------------------------------------------------------------------------------- parser
def _add_arguments(p: argparse.ArgumentParser) -> None:
    from stagevar.baselines import BASELINES
    from stagevar.models.registry import add_model_arguments

    add_model_arguments(p)
    p.add_argument("--batch-size", type=int, default=1, help="images per generation in the latency runs (default 1)")
    p.add_argument("--quality-batch-size", type=int, default=8, help="images per generation in the quality runs (default 8)")
    p.add_argument("--prompts", type=int, default=24, metavar="N", help="held-out prompts for the quality runs (default 24)")
    p.add_argument("--seeds", type=int, default=1, metavar="N", help="seeds per prompt for the quality runs (default 1)")
    p.add_argument("--guidance", type=guidance_argument, metavar="G",
                   help="classifier-free guidance every method runs at: one scale, or one per scale comma-separated "
                        "(default: the model's; give a policy's calibrated guidance to bench it as calibrated)")
    p.add_argument("--prompt-draw", type=int, default=0, metavar="N",
                   help="which draw of the held-out split the quality runs score (default 0, the draw of "
                        "'stagevar evaluate'; calibration verifies its candidates on draw 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds after the warm-up round (default 5)")
    p.add_argument("--policy", type=Path, action="append", default=[], metavar="FILE",
                   help="searched policy to include, every operating point (repeatable; default: the policies "
                        "in --policies-dir made for --model)")
    p.add_argument("--policies-dir", type=Path, help="where shipped policies are looked up (default policies/)")
    p.add_argument("--baselines", default=",".join(BASELINES),
                   help=f"comma-separated baselines, or 'none' (default {','.join(BASELINES)})")
    p.add_argument("--paper-keep", type=float, default=0.5, help="token keep ratio of the paper baseline (default 0.5)")
    p.add_argument("--out", type=Path, default=Path("out/bench"), help="output directory (default out/bench)")
    p.add_argument("--no-quality", action="store_true", help="speed and memory only (no scipy needed)")
    p.add_argument("--metric-weights", type=_metric_weights, default={}, metavar="NAME=DIR,...",
                   help="also report learned metrics against the full model's images: clip (CLIP-I, and the image-prompt "
                        "score CLIP-T), dino, lpips, dists; DIR a local copy as for stagevar-calibrate --metric-weights")
    p.add_argument("--no-plot", action="store_true", help="write no plot (no matplotlib needed)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--engine", default="auto", metavar="E[,E...]",
                   help="engine(s) every method runs on, comma-separated to compare them in one run: " + ENGINE_HELP)
    p.add_argument("--fit-budget", metavar="SPEEDUP",
                   help="also run the paper-like plan refitted to this speedup (e.g. 3x) by measurement on the last "
                        "--engine: the refinement length and the largest uniform keep that meet it (most work kept)")
    p.add_argument("--sequential", action="store_true",
                   help="time one method after the other (warm-up, repeats, then its memory released) instead of "
                        "interleaved rounds: at large batches the captured graphs and caches of every method at once "
                        "may not fit on the device")
    p.add_argument("--compare-vae", action="store_true",
                   help="also time the VAE decoding of one latent in float32 and in the compute dtype (Infinity)")


def _metric_weights(text: str) -> dict[str, str]:
    from calibrate.metrics import parse_metric_weights   # imported when the option is given
    return parse_metric_weights(text)


#: learned metric -> its columns in the table (agreement with the full model's image; CLIP's prompt score)
METRIC_COLUMNS = {"clip": "CLIP-I", "clip_text": "CLIP-T", "dino": "DINO", "lpips": "1-LPIPS", "dists": "1-DISTS"}


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``stagevar`` command's sub-parsers."""
    p = subparsers.add_parser("bench", help="benchmark full model vs searched policies vs published baselines",
                              description="Latency, peak memory and quality (vs the full model) of the full model, the "
                                          "searched policies and the paper / FastVAR / SkipVAR baselines.",
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    _add_arguments(p)
    return p


# ----------------------------------------------------------------------------------------- methods
@dataclasses.dataclass
class Method:
    name: str
    kind: str                      # "full" | "policy" (a policy file's operating point) | "baseline"
    point: Any                     # OperatingPoint or None (full)
    source: str
    plan: str
    engine: str = ""
    base: str = ""                 # the method's name without the engine suffix


def bench_engines(text: str, device) -> list[str]:
    """``--engine``: one or several engines, each checked against the device."""
    from stagevar.engine import resolve_engine
    names = [resolve_engine(e.strip(), device) for e in str(text).split(",") if e.strip()]
    if not names or len(set(names)) != len(names):
        raise StageVarError(f"--engine {text!r}: give one engine or several distinct ones (e.g. eager,static,graphs).")
    return names


def on_engines(methods: list[Method], engines: list[str]) -> list[Method]:
    """Every method on every engine (names suffixed ``@engine`` when there are several)."""
    return [dataclasses.replace(m, name=m.name if len(engines) == 1 else f"{m.name}@{e}", engine=e, base=m.name)
            for e in engines for m in methods]


def _progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _default_policies_dirs(arg: Path | None) -> list[Path]:
    if arg is not None:
        return [arg]
    repo = Path(__file__).resolve().parents[1] / "policies"
    dirs = [Path("policies"), repo]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and not any(d.resolve() == o.resolve() for o in out):
            out.append(d)
    return out


def discover_policies(model_name: str, dirs: Sequence[Path]) -> list[Path]:
    """Policy files in ``dirs`` whose ``model.name`` is ``model_name`` (unreadable files skipped)."""
    import yaml
    found = []
    for d in dirs:
        for f in sorted(Path(d).glob("*.yaml")) + sorted(Path(d).glob("*.yml")):
            try:
                data = yaml.safe_load(f.read_text(encoding="utf-8"))
                name = data["model"]["name"]
            except Exception:                       # noqa: BLE001 - a broken file is reported when loaded explicitly
                log.warning("skipping %s: not a readable policy", f)
                continue
            if name == model_name:
                found.append(f)
    return found


def _baseline_names(args) -> list[str]:
    if args.baselines.strip().lower() in ("", "none"):
        return []
    return [b.strip() for b in args.baselines.split(",") if b.strip()]


def bench_guidance(adapter, args):
    """The guidance every method runs at: ``--guidance`` (checked against the model), else the model's."""
    if args.guidance is None:
        return adapter.default_guidance
    guidance_per_scale(args.guidance, len(adapter.scale_schedule))      # a wrong length: one clear error
    return args.guidance


class _Guided:
    """A runtime that always generates at the bench's guidance."""

    def __init__(self, runtime, guidance):
        self.runtime, self.guidance = runtime, guidance

    def generate(self, **kwargs):
        return self.runtime.generate(guidance=self.guidance, **kwargs)

    def release(self) -> None:
        """Drop what the runtime holds between generations (captured CUDA graphs, their caches)."""
        import gc

        import torch
        if not self.runtime._captured:
            return
        self.runtime._captured.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_methods(adapter, args, guidance) -> list[Method]:
    """``guidance``: what every method runs at (:func:`bench_guidance`); policies calibrated at
    other guidance are noted."""
    from stagevar.baselines import BASELINE_SOURCES, build_baseline, describe
    from stagevar.policy import PolicyError, load_policy

    depth = adapter.num_layers
    model_name = adapter.fingerprint().model
    methods = [Method("full", "full", None, "the unaccelerated model", "identity")]
    explicit = bool(args.policy)
    files = list(args.policy) if explicit else discover_policies(model_name, _default_policies_dirs(args.policies_dir))
    for f in files:
        pol = load_policy(f)
        try:
            pol.check_compatible(adapter)
        except PolicyError as exc:
            if explicit:
                raise
            _progress(f"skipping {f}: {exc}")
            continue
        stem = Path(f).name.rsplit(".", 1)[0]
        src = str(f) + (" (not calibrated)" if pol.provenance.get("calibrated") is False else "")
        cal = pol.provenance.get("guidance")
        if cal is not None and not same_guidance(cal, guidance, len(adapter.scale_schedule)):
            _progress(f"note: {f} was calibrated with guidance {format_guidance(cal)}, but the bench runs every method "
                      f"at guidance {format_guidance(guidance)}; its measured speedup and quality hold for the "
                      f"calibrated guidance (--guidance {format_guidance(cal)} benches it so)")
            src += f" (calibrated at guidance {format_guidance(cal)})"
        for pname, point in pol.operating_points.items():
            methods.append(Method(f"{stem}:{pname}", "policy", point, src, describe(point, depth)))
    for b in _baseline_names(args):
        try:
            point = build_baseline(b, adapter, paper_keep=args.paper_keep)
        except ValueError as exc:
            raise StageVarError(f"baseline {b!r} does not apply to {model_name}: {exc}") from None
        methods.append(Method(b, "baseline", point, BASELINE_SOURCES[b], describe(point, depth)))
    for m in methods:                   # say when a policy file holds exactly a baseline's plans
        if m.kind == "policy":
            same = [b.name for b in methods if b.kind == "baseline" and b.point.plans == m.point.plans]
            if same:
                m.plan += f" (= {', '.join(same)})"
    seen = set()
    for m in methods:
        if m.name in seen:
            raise StageVarError(f"two methods are named {m.name!r}; give policy files distinct names.")
        seen.add(m.name)
    return methods


# ----------------------------------------------------------------------------------------- prompts
def bench_prompts(adapter, n: int, draw: int = 0) -> list[dict[str, Any]]:
    """``n`` prompts: draw ``draw`` of the held-out split for text models, spread ImageNet class ids
    for class-conditional ones. Items ``{"prompt", "category"}``."""
    if getattr(adapter, "family", "") == "var":
        return [{"prompt": str((i * 97 + 1 + draw) % 1000), "category": "class"} for i in range(n)]
    from stagevar.toy.prompts import make_split
    return [{"prompt": it["prompt"], "category": it["spec"]["category"]} for it in make_split("heldout", n, seed=draw)]


# ----------------------------------------------------------------------------------------- measuring
def _percentile(xs: Sequence[float], q: float) -> float:
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
            _progress(f"{nm}: first {first[nm]:.3f}s, median {statistics.median(samples[nm]):.3f}s")
        return samples, per_scale, first
    _progress(f"warm-up round ({len(names)} methods)")
    first = {nm: runtimes[nm].generate(condition=condition, seed=seed).seconds for nm in names}
    samples: dict[str, list[float]] = {nm: [] for nm in names}
    per_scale: dict[str, list[list[float]]] = {nm: [] for nm in names}
    for r in range(repeats):
        for nm in names:
            res = runtimes[nm].generate(condition=condition, seed=seed)
            samples[nm].append(res.seconds)
            per_scale[nm].append([rec.seconds for rec in res.records])
        _progress(f"round {r + 1}/{repeats}: " + ", ".join(f"{nm} {samples[nm][-1]:.3f}s" for nm in names))
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
    """Per method: SSIM / HF ratio vs the full model's image of the same prompt and seed, worst
    prompt, (embedded model) evaluator score per category, and the mean of each learned metric
    (``metrics``: :mod:`calibrate.perceptual` metrics) as ``<name>_mean``."""
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
            _progress(f"quality batch {done}/{total} ({len(chunk)} prompts x {len(methods)} methods)")
    out: dict[str, dict[str, Any]] = {}
    for m in methods:
        d = per[m.name]
        i_worst = int(np.argmin(d["ssim"]))
        q: dict[str, Any] = {
            "images": len(d["ssim"]),
            "ssim_mean": float(np.mean(d["ssim"])), "ssim_min": float(np.min(d["ssim"])),
            "hf_ratio_mean": float(np.mean(d["hf"])),
            "worst": {"prompt": d["where"][i_worst][0], "category": d["where"][i_worst][1],
                      "seed_index": d["where"][i_worst][2], "ssim": float(d["ssim"][i_worst])},
        }
        for name in METRIC_COLUMNS:
            if d.get(name):
                q[f"{name}_mean"] = float(np.mean(d[name]))
        if use_evaluator:
            cats: dict[str, list[bool]] = {}
            for ok, (_, cat, _) in zip(d["eval"], d["where"]):
                cats.setdefault(cat, []).append(ok)
            from stagevar.toy.prompts import CATEGORIES
            per_cat = {c: float(np.mean(cats[c])) for c in CATEGORIES if c in cats}
            q["evaluator"] = {**per_cat, "overall": float(np.mean(list(per_cat.values()))),
                              "counts": {c: len(cats[c]) for c in per_cat}}
        out[m.name] = q
    return out


def _speedup(text: str) -> float:
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)x\s*", str(text))
    if not m or float(m.group(1)) <= 1:
        raise StageVarError(f"--fit-budget {text!r}: give a speedup above 1, such as 3x.")
    return float(m.group(1))


def _describe(point, depth: int) -> str:
    from stagevar.baselines import describe
    return describe(point, depth)


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
            _progress(f"fit {speedup:g}x on {engine}: last {R} scales at keep {FIT_KEEPS[mid]:g}: {s:.2f}x")
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


# ----------------------------------------------------------------------------------------- output
def _f(v, fmt: str, na: str = "n/a") -> str:
    return na if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def render_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    rows = res["methods"]
    quality = not cfg["no_quality"]
    evaluator = quality and any("evaluator" in (r.get("quality") or {}) for r in rows)
    L = [f"# stagevar bench: {cfg['model']}", "",
         f"{cfg['resolution']}px, {cfg['num_scales']} scales, {cfg['num_layers']} layers"
         f"{' (random weights)' if cfg['random_weights'] else ''}; {cfg['device_name']} ({cfg['device']}), {cfg['dtype']}; "
         f"torch {cfg['torch']}, {cfg['threads']} CPU threads, {cfg.get('allocator', 'system default')}; {cfg['date']}", "",
         f"Latency: batch {cfg['batch_size']}, median / p90 of {cfg['repeats']} "
         f"{'runs per method, one method after the other,' if cfg.get('sequential') else 'interleaved rounds'} after a warm-up round, "
         "device-synchronised, prompt encoding excluded, VAE decoding included. Speedup = full median / method median"
         + (f" (the full model on {cfg['engines'][0]}; 'same engine': on the method's engine)"
            if len(cfg.get("engines", [])) > 1 else "") + ". "
         f"Engine: {', '.join(cfg.get('engines', ['eager']))}. First = the warm-up generation (the first image; with "
         "graphs it includes the capture). "
         f"Every method runs at guidance {format_guidance(cfg['guidance']) if 'guidance' in cfg else 'the model default'}.",
         ""]
    several = len(cfg.get("engines", [])) > 1
    head = ["method", "kind", "median s", "p90 s", "first s", "outside scales s", "speedup"]
    if several:
        head += ["same engine"]
    head += ["peak MiB"]
    if quality:
        head += ["SSIM mean", "SSIM min", "HF ratio"]
        learned = [k for k in METRIC_COLUMNS if any(f"{k}_mean" in (r.get("quality") or {}) for r in rows)]
        head += [METRIC_COLUMNS[k] for k in learned]
        if evaluator:
            head += ["eval", "Δ eval"]
        head += ["worst prompt (SSIM)"]
    L.append("| " + " | ".join(head) + " |")
    L.append("|" + "|".join("---" if i in (0, 1) or h.startswith("worst") else "---:" for i, h in enumerate(head)) + "|")
    full_eval = None
    if evaluator:
        full_eval = next(r for r in rows if r["kind"] == "full")["quality"]["evaluator"]["overall"]
    for r in rows:
        lat = r["latency"]
        cells = [f"`{r['name']}`", r["kind"], _f(lat["median_s"], ".4f"), _f(lat["p90_s"], ".4f"),
                 _f(lat.get("first_s"), ".3f"), _f(lat.get("outside_scales_median_s"), ".4f"), _f(r["speedup"], ".2f") + "x"]
        if several:
            cells.append(_f(r.get("speedup_same_engine"), ".2f") + "x")
        cells.append(_f(r.get("peak_mem_mib"), ".1f"))
        if quality:
            q = r["quality"]
            cells += [_f(q["ssim_mean"], ".3f"), _f(q["ssim_min"], ".3f"), _f(q["hf_ratio_mean"], ".3f")]
            cells += [_f(q.get(f"{k}_mean"), ".3f") for k in learned]
            if evaluator:
                ev = q["evaluator"]["overall"]
                cells += [_f(ev, ".3f"), "-" if r["kind"] == "full" else _f(ev - full_eval, "+.3f")]
            w = q["worst"]
            cells += ["-" if r["kind"] == "full" else f"\"{w['prompt']}\" (seed #{w['seed_index']}, {w['ssim']:.3f})"]
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    L.append("Outside scales: the median time spent outside every scale's loop (conditioning setup and VAE "
             "decoding), which no policy shortens; per-scale medians are in bench.json.")
    L.append(f"Peak memory: {cfg['peak_mem_method']}.")
    if "vae_decode" in res:
        v = res["vae_decode"]
        L.append(f"VAE decoding of one latent (median of {v['repeats']}): " + ", ".join(
            f"{k} {v[k]:.4f} s" for k in v if k.endswith("_s")) + ".")
    if quality:
        L.append(f"Quality: {cfg['quality_images']} images per method ({cfg['prompts']} held-out prompts of draw {cfg.get('prompt_draw', 0)} x {cfg['seeds']} "
                 f"seed(s), batch {cfg['quality_batch_size']}), each compared with the full model's image of the same "
                 "prompt and seed: SSIM on luma; HF ratio = high-frequency energy / the full model's (1 = same, < 1 "
                 "lost detail)." + (" eval = the embedded evaluator's accuracy (mean over categories, GenEval-style)."
                                    if evaluator else ""))
        if evaluator and cfg["random_weights"]:
            L.append("Random weights: the evaluator's scores say nothing about the model here; compare SSIM only.")
    if evaluator:
        from stagevar.toy.prompts import CATEGORIES
        cats = [c for c in CATEGORIES if c in rows[0]["quality"]["evaluator"]]
        L += ["", "## Evaluator score per category", "",
              "| method | " + " | ".join(cats) + " | overall |", "|---|" + "---:|" * (len(cats) + 1)]
        for r in rows:
            ev = r["quality"]["evaluator"]
            L.append(f"| `{r['name']}` | " + " | ".join(_f(ev[c], ".3f") for c in cats) + f" | {ev['overall']:.3f} |")
    L += ["", "## Methods", "", "| method | source | plan (scale:guidance+selection@keep[layers], skip) | predicted work skipped |",
          "|---|---|---|---:|"]
    for r in rows:
        L.append(f"| `{r['name']}` | {r['source']} | {r['plan']} | {r['predicted_work_skipped']:.1%} |")
    return "\n".join(L) + "\n"


def _json_safe(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_json_safe(v) for v in o]
    return o


def plot(res: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["methods"]
    cfg = res["config"]
    colours = {"full": "black", "policy": "tab:blue", "baseline": "tab:orange"}
    if cfg["no_quality"]:
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
        ys = list(range(len(rows)))[::-1]
        ax.barh(ys, [r["speedup"] or 0 for r in rows], color=[colours[r["kind"]] for r in rows])
        ax.set_yticks(ys, [r["name"] for r in rows])
        for y, r in zip(ys, rows):
            ax.text((r["speedup"] or 0), y, f" {_f(r['speedup'], '.2f')}x", va="center")
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xlim(0, 1.2 * max([r["speedup"] or 0 for r in rows] + [1.0]))
        ax.set_xlabel("speedup vs full (median latency)")
        ax.set_title(f"{cfg['model']} on {cfg['device']} {cfg['dtype']}, batch {cfg['batch_size']} (quality not measured)")
        path = out_dir / "speedup.png"
    else:
        evaluator = "evaluator" in rows[0]["quality"]
        panels = [("ssim_mean", "SSIM vs full (mean)")] + ([("evaluator", "evaluator score (overall)")] if evaluator else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
        for ax, (key, label) in zip(axes[0], panels):
            for r in rows:
                x = r["speedup"]
                y = r["quality"]["evaluator"]["overall"] if key == "evaluator" else r["quality"][key]
                if x is None or y is None:
                    continue
                ax.scatter([x], [y], color=colours[r["kind"]], s=40, zorder=3)
                ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
            ax.set_xlabel("speedup vs full (median latency, same run)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{cfg['model']}: quality vs speedup ({cfg['device']} {cfg['dtype']}, batch {cfg['batch_size']})\n"
                     "black: full, blue: policy files, orange: baselines", fontsize=10)
        path = out_dir / "quality_vs_speedup.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- command
def _check_args(args) -> None:
    for name, lo in (("batch_size", 1), ("quality_batch_size", 1), ("prompts", 1), ("seeds", 1), ("repeats", 1)):
        v = getattr(args, name)
        if v < lo:
            raise StageVarError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}.")
    if args.prompt_draw < 0:
        raise StageVarError(f"--prompt-draw must be >= 0, got {args.prompt_draw}.")
    if not 0.0 < args.paper_keep <= 1.0:
        raise StageVarError(f"--paper-keep must be in (0, 1], got {args.paper_keep}.")
    if args.threads is not None and args.threads < 1:
        raise StageVarError(f"--threads must be >= 1, got {args.threads}.")
    from stagevar.baselines import BASELINES
    for b in _baseline_names(args):
        if b not in BASELINES:
            raise StageVarError(f"--baselines: unknown baseline {b!r}; expected a comma-separated list of "
                                f"{', '.join(BASELINES)} (or 'none').")
    if not args.no_quality:
        try:
            import calibrate.metrics  # noqa: F401  (needs scipy)
        except ImportError as exc:
            raise StageVarError(f"quality metrics need calibrate.metrics and scipy ({exc}); install them with "
                                "pip install -e '.[calibrate]' or run from the repository root, or pass --no-quality.") from None
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise StageVarError("the plot needs matplotlib (pip install matplotlib); or pass --no-plot.") from None


def _device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def cmd_bench(args) -> int:
    import torch
    from stagevar.models.registry import load_model
    from stagevar.perf import allocator_setting, steady_allocator
    from stagevar.policy import predicted_work_skipped
    from stagevar.runtime import Runtime

    _check_args(args)
    steady_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    _progress(f"loading {args.model} ({'random weights, ' if args.random_weights else ''}{args.device}, {args.dtype})")
    adapter = load_model(args.model, args.weights, device=args.device, dtype=dtype, random_weights=args.random_weights)
    device = adapter.device
    guidance = bench_guidance(adapter, args)
    engines = bench_engines(args.engine, device)
    base_methods = build_methods(adapter, args, guidance)
    fitted = None
    if args.fit_budget:
        lat_prompts = [p["prompt"] for p in bench_prompts(adapter, args.batch_size, args.prompt_draw)]
        fitted = fit_budget(adapter, adapter.encode_prompts(lat_prompts), guidance, _speedup(args.fit_budget),
                            engines[-1], args.repeats)
        if fitted["point"] is not None:
            base_methods.append(Method(f"fitted-{args.fit_budget}", "fitted", fitted["point"],
                                       f"paper-like plan fitted to {args.fit_budget} by measurement on {engines[-1]}",
                                       _describe(fitted["point"], adapter.num_layers)))
    methods = on_engines(base_methods, engines)
    _progress("methods: " + ", ".join(m.name for m in methods))
    runtimes = {m.name: _Guided(Runtime(adapter, m.point, synchronize=True, engine=m.engine), guidance) for m in methods}
    fp = adapter.fingerprint()
    schedule = adapter.scale_schedule
    guided = is_guided(guidance, len(schedule))

    items = bench_prompts(adapter, args.prompts, args.prompt_draw)
    lat_prompts = [items[i % len(items)]["prompt"] for i in range(args.batch_size)]
    condition = adapter.encode_prompts(lat_prompts)
    samples, per_scale, first = time_methods(runtimes, condition, 0, args.repeats, sequential=args.sequential)
    vae = compare_vae(adapter, condition, guidance, args.repeats) if args.compare_vae else None

    mem: dict[str, dict[str, Any]] = {}
    if not args.no_memory:
        for m in methods:
            for r in runtimes.values():    # captured graphs hold memory: measure each method on its own,
                r.release()                 # its capture included
            mem[m.name] = measure_memory(runtimes[m.name], condition, 0, device)
            _progress(f"peak memory {m.name}: {_f(mem[m.name]['peak_mem_mib'], '.1f')} MiB")
    mem_method = next(iter(mem.values()))["peak_mem_method"] if mem else "not measured (--no-memory)"

    quality = None
    from stagevar.models.registry import model_entry
    use_eval = model_entry(fp.model).scorer == "evaluator"      # the entry names the model's scorer
    if not args.no_quality:                 # every engine gives the same images: measured on the first
        first_engine = [m for m in methods if m.engine == engines[0]]
        metrics = []
        if args.metric_weights:
            from calibrate.perceptual import LEARNED
            metrics = [LEARNED[name](d, device=device) for name, d in args.metric_weights.items()]
        by_base = measure_quality(adapter, first_engine, runtimes, items, args.seeds, args.quality_batch_size, use_eval,
                                  metrics)
        quality = {m.name: by_base[next(f.name for f in first_engine if f.base == m.base)] for m in methods}

    full_of = {e: next(m.name for m in methods if m.kind == "full" and m.engine == e) for e in engines}
    full_med = statistics.median(samples[full_of[engines[0]]])
    rows = []
    for m in methods:
        s = samples[m.name]
        med = statistics.median(s)
        same = statistics.median(samples[full_of[m.engine]])
        point = m.point if m.point is not None else None
        skipped = predicted_work_skipped(point, schedule, adapter.num_layers, guided) if point is not None else 0.0
        row = {"name": m.name, "method": m.base, "engine": m.engine, "kind": m.kind, "source": m.source, "plan": m.plan,
               "latency": {"median_s": med, "p90_s": _percentile(s, 0.9), "samples_s": s, "first_s": first[m.name],
                           **scale_breakdown(s, per_scale[m.name])},
               "speedup": full_med / med if med > 0 else None,
               "speedup_same_engine": same / med if med > 0 else None,
               "predicted_work_skipped": skipped,
               "operating_point": point.to_dict() if point is not None else None}
        row.update(mem.get(m.name, {"peak_mem_mib": None, "generation_mem_mib": None}))
        row.pop("peak_mem_method", None)
        if quality is not None:
            row["quality"] = quality[m.name]
        rows.append(row)

    cfg = {"model": fp.model, "arch_hash": fp.arch_hash, "resolution": adapter.resolution, "num_scales": len(schedule),
           "num_layers": adapter.num_layers, "scale_schedule": [list(x) for x in schedule],
           "random_weights": bool(args.random_weights), "device": str(device), "device_name": _device_name(device),
           "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
           "allocator": allocator_setting(), "batch_size": args.batch_size, "repeats": args.repeats, "warmup_rounds": 1,
           "latency_prompts": lat_prompts, "prompts": args.prompts, "prompt_draw": args.prompt_draw, "seeds": args.seeds,
           "quality_batch_size": args.quality_batch_size, "no_quality": bool(args.no_quality),
           "quality_images": args.prompts * args.seeds, "evaluator": bool(use_eval and not args.no_quality),
           "peak_mem_method": mem_method, "engines": engines, "sequential": bool(args.sequential),
           "guidance": guidance_json(guidance),
           "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()}
    from stagevar import __version__
    cfg["stagevar"] = __version__
    res = {"config": cfg, "methods": rows}
    if fitted is not None:
        res["fit_budget"] = {k: v for k, v in fitted.items() if k != "point"}
    if vae is not None:
        res["vae_decode"] = vae

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(res)
    (out / "bench.md").write_text(md, encoding="utf-8")
    (out / "bench.json").write_text(json.dumps(_json_safe(res), indent=1) + "\n", encoding="utf-8")
    sys.stdout.write(md)
    sys.stdout.flush()
    written = [out / "bench.md", out / "bench.json"]
    if fitted is not None and fitted["point"] is not None:      # reusable: --policy OUT/fitted-3x.yaml
        from stagevar.policy import Policy, base_provenance, binding_for
        pol = Policy(model=binding_for(adapter), operating_points={args.fit_budget: fitted["point"]},
                     default=args.fit_budget, provenance=base_provenance(
                         source="stagevar bench --fit-budget", calibrated=False, engine=fitted["engine"],
                         batch_size=args.batch_size, fit=fitted["chosen"], guidance=guidance_json(guidance)))
        written.append(pol.save(out / f"fitted-{args.fit_budget}.yaml"))
    if not args.no_plot:
        written.append(plot(res, out))
    _progress("wrote " + ", ".join(str(w) for w in written))
    return 0


# ----------------------------------------------------------------------------------------- standalone
def main(argv: list[str] | None = None) -> int:
    """``python3 -m stagevar.bench``: the same command without the ``stagevar`` entry point."""
    p = argparse.ArgumentParser(prog="python3 -m stagevar.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    _add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(cmd_bench, args)

if __name__ == "__main__":
    sys.exit(main())
