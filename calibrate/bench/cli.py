"""The ``stagevar-calibrate bench`` command: arguments, checks, the run, its outputs."""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any

from calibrate.bench.measure import compare_vae, fit_budget, measure_memory, measure_quality, time_methods, \
    percentile, scale_breakdown
from calibrate.bench.methods import (Method, Guided, baseline_names, bench_engines, bench_guidance, bench_prompts,
                                     build_methods, on_engines, pairs_against, progress)
from calibrate.bench.report import json_safe, plot, render_markdown, show
from stagevar.engine import ENGINE_HELP
from stagevar.errors import StageVarError, run_command
from stagevar.guidance import guidance_argument, guidance_json, is_guided

EPILOG = textwrap.dedent("""\
    examples:
      stagevar-calibrate bench                           # infinity-mini: full, shipped policies, all baselines
      stagevar-calibrate bench --model infinity-tiny --prompts 6 --repeats 3 --out out/bench-tiny
      stagevar-calibrate bench --policy policies/infinity-mini.128.2x-3x-4x.yaml --seeds 2 --out out/bench
      stagevar-calibrate bench --policy new.yaml --against policies/infinity-mini.128.2x-3x-4x.yaml \\
          --baselines none --prompts 512 --prompt-draw 7 --no-memory --out out/new-vs-shipped
      stagevar-calibrate bench --model infinity-2b --random-weights --device cuda --dtype bfloat16 \\
          --batch-size 1 --repeats 3 --no-quality --no-plot --baselines paper,fastvar
      PYTHONPATH=. python3 -m calibrate.bench --model infinity-tiny --no-quality --no-plot
    Latency excludes prompt encoding (done once) and includes VAE decoding. Baselines: paper
    (StageVAR hand-set), fastvar (FastVAR's Infinity code), skipvar-skip / skipvar-uncond (SkipVAR's
    two strategies, static); see stagevar/baselines.py and benchmarks/README.md.""")


# ----------------------------------------------------------------------------------------- parser
def add_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--against", type=Path, metavar="FILE",
                   help="compare every other policy's operating points with this policy file's points of the same "
                        "name, image by image (evaluator and SSIM differences with standard errors, and whether they "
                        "are told apart): e.g. a recalibrated file against the one it would replace. Its points are "
                        "benched too")
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




def build_parser(prog: str = "stagevar-calibrate bench") -> argparse.ArgumentParser:
    from calibrate.options import Parser
    p = Parser(prog=prog, description="Latency, peak memory and quality (vs the full model) of the full model, the "
                                      "searched policies and the paper / FastVAR / SkipVAR baselines.",
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    add_arguments(p)
    return p


# ----------------------------------------------------------------------------------------- checks
def _check_args(args) -> None:
    for name, lo in (("batch_size", 1), ("quality_batch_size", 1), ("prompts", 1), ("seeds", 1), ("repeats", 1)):
        v = getattr(args, name)
        if v < lo:
            raise StageVarError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}.")
    if args.prompt_draw < 0:
        raise StageVarError(f"--prompt-draw must be >= 0, got {args.prompt_draw}.")
    if not 0.0 < args.paper_keep <= 1.0:
        raise StageVarError(f"--paper-keep must be in (0, 1], got {args.paper_keep}.")
    if args.against is not None and args.no_quality:
        raise StageVarError(f"--against {args.against} compares quality image by image; it cannot be given with "
                            "--no-quality.")
    if args.threads is not None and args.threads < 1:
        raise StageVarError(f"--threads must be >= 1, got {args.threads}.")
    from stagevar.baselines import BASELINES
    for b in baseline_names(args):
        if b not in BASELINES:
            raise StageVarError(f"--baselines: unknown baseline {b!r}; expected a comma-separated list of "
                                f"{', '.join(BASELINES)} (or 'none').")
    if not args.no_quality:
        try:
            import calibrate.metrics  # noqa: F401  (needs scipy)
        except ImportError as exc:
            raise StageVarError(f"quality metrics need calibrate.metrics and scipy ({exc}); install them with "
                                "pip install -e '.[calibrate]', or pass --no-quality.") from None
    if not args.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise StageVarError("the plot needs matplotlib (pip install matplotlib); or pass --no-plot.") from None


def _speedup(text: str) -> float:
    import re
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)x\s*", str(text))
    if not m or float(m.group(1)) <= 1:
        raise StageVarError(f"--fit-budget {text!r}: give a speedup above 1, such as 3x.")
    return float(m.group(1))


# ----------------------------------------------------------------------------------------- command
def cmd_bench(args) -> int:
    import torch
    from stagevar.models.registry import load_model, model_entry
    from stagevar.perf import steady_allocator
    from stagevar.runtime import Runtime

    _check_args(args)
    steady_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    progress(f"loading {args.model} ({'random weights, ' if args.random_weights else ''}{args.device}, {args.dtype})")
    adapter = load_model(args.model, args.weights, device=args.device, dtype=dtype, random_weights=args.random_weights)
    guidance = bench_guidance(adapter, args)
    engines = bench_engines(args.engine, adapter.device)
    base_methods = build_methods(adapter, args, guidance)
    fitted = _fitted_method(adapter, args, guidance, engines[-1], base_methods) if args.fit_budget else None
    methods = on_engines(base_methods, engines)
    pairs = pairs_against(methods, args.against)
    progress("methods: " + ", ".join(m.name for m in methods))
    runtimes = {m.name: Guided(Runtime(adapter, m.point, synchronize=True, engine=m.engine), guidance) for m in methods}

    items = bench_prompts(adapter, args.prompts, args.prompt_draw)
    lat_prompts = [items[i % len(items)]["prompt"] for i in range(args.batch_size)]
    condition = adapter.encode_prompts(lat_prompts)
    timing = time_methods(runtimes, condition, 0, args.repeats, sequential=args.sequential)
    vae = compare_vae(adapter, condition, guidance, args.repeats) if args.compare_vae else None
    mem = {} if args.no_memory else _memory(methods, runtimes, condition, adapter.device)
    use_eval = model_entry(adapter.fingerprint().model).scorer == "evaluator"      # the entry names the model's scorer
    quality = None if args.no_quality else _quality(adapter, args, methods, runtimes, items, engines[0], use_eval)

    res = {"config": _config(adapter, args, engines, guidance, lat_prompts, mem, use_eval),
           "methods": _rows(adapter, methods, engines, guidance, timing, mem, quality)}
    if pairs:                                  # --against: quality was measured (checked)
        res["against"] = _against(args.against, pairs, res["methods"])
    if fitted is not None:
        res["fit_budget"] = {k: v for k, v in fitted.items() if k != "point"}
    if vae is not None:
        res["vae_decode"] = vae
    _write(res, adapter, args, guidance, fitted)
    return 0


def _fitted_method(adapter, args, guidance, engine: str, methods: list[Method]) -> dict[str, Any]:
    """``--fit-budget``: the paper-like plan refitted by measurement; appended to ``methods`` when it
    meets the budget."""
    from stagevar.baselines import describe
    lat_prompts = [p["prompt"] for p in bench_prompts(adapter, args.batch_size, args.prompt_draw)]
    fitted = fit_budget(adapter, adapter.encode_prompts(lat_prompts), guidance, _speedup(args.fit_budget), engine,
                        args.repeats)
    if fitted["point"] is not None:
        methods.append(Method(f"fitted-{args.fit_budget}", "fitted", fitted["point"],
                              f"paper-like plan fitted to {args.fit_budget} by measurement on {engine}",
                              describe(fitted["point"], adapter.num_layers)))
    return fitted


def _against(path: Path, pairs: list[tuple[Method, Method]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """``--against``: each pair's paired differences (the method less the file's point of the same
    name): evaluator verdicts (the embedded model) and SSIM against the full model, and the ratio
    of their speedups."""
    from calibrate.bench.measure import paired
    row = {r["name"]: r for r in rows}
    out = []
    for m, ref in pairs:
        a, b = row[m.name], row[ref.name]
        pa, pb = a["quality"]["per_image"], b["quality"]["per_image"]
        entry = {"point": m.point_name, "method": m.name, "against": ref.name,
                 "speedup_ratio": a["speedup"] / b["speedup"] if a["speedup"] and b["speedup"] else None,
                 "ssim": paired(pa["ssim"], pb["ssim"])}
        if "eval" in pa:
            entry["evaluator"] = paired(pa["eval"], pb["eval"])
        out.append(entry)
    return {"file": str(path), "pairs": out}


def _memory(methods: list[Method], runtimes: dict[str, Any], condition, device) -> dict[str, dict[str, Any]]:
    mem = {}
    for m in methods:
        for r in runtimes.values():        # captured graphs hold memory: measure each method on its own,
            r.release()                     # its capture included
        mem[m.name] = measure_memory(runtimes[m.name], condition, 0, device)
        progress(f"peak memory {m.name}: {show(mem[m.name]['peak_mem_mib'], '.1f')} MiB")
    return mem


def _quality(adapter, args, methods: list[Method], runtimes, items, engine: str, use_eval: bool) -> dict[str, Any]:
    """Quality per method, measured on ``engine`` only: every engine gives the same images."""
    first_engine = [m for m in methods if m.engine == engine]
    metrics = []
    if args.metric_weights:
        from calibrate.perceptual import LEARNED
        metrics = [LEARNED[name](d, device=adapter.device) for name, d in args.metric_weights.items()]
    by_base = measure_quality(adapter, first_engine, runtimes, items, args.seeds, args.quality_batch_size, use_eval,
                              metrics)
    return {m.name: by_base[next(f.name for f in first_engine if f.base == m.base)] for m in methods}


def _rows(adapter, methods: list[Method], engines: list[str], guidance, timing, mem, quality) -> list[dict[str, Any]]:
    """One row per method: latency, speedups (against the first engine's full model and its own
    engine's), predicted work skipped, memory and quality."""
    from stagevar.policy import predicted_work_skipped
    samples, per_scale, first = timing
    schedule = adapter.scale_schedule
    guided = is_guided(guidance, len(schedule))
    full_of = {e: next(m.name for m in methods if m.kind == "full" and m.engine == e) for e in engines}
    full_med = statistics.median(samples[full_of[engines[0]]])
    rows = []
    for m in methods:
        s = samples[m.name]
        med = statistics.median(s)
        same = statistics.median(samples[full_of[m.engine]])
        point = m.point
        skipped = predicted_work_skipped(point, schedule, adapter.num_layers, guided) if point is not None else 0.0
        row = {"name": m.name, "method": m.base, "engine": m.engine, "kind": m.kind, "source": m.source, "plan": m.plan,
               "latency": {"median_s": med, "p90_s": percentile(s, 0.9), "samples_s": s, "first_s": first[m.name],
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
    return rows


def _device_name(device) -> str:
    import torch
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _config(adapter, args, engines, guidance, lat_prompts, mem, use_eval) -> dict[str, Any]:
    import torch
    from stagevar.version import __version__
    from stagevar.perf import allocator_setting
    fp, schedule, device = adapter.fingerprint(), adapter.scale_schedule, adapter.device
    mem_method = next(iter(mem.values()))["peak_mem_method"] if mem else "not measured (--no-memory)"
    return {"model": fp.model, "arch_hash": fp.arch_hash, "resolution": adapter.resolution, "num_scales": len(schedule),
            "num_layers": adapter.num_layers, "scale_schedule": [list(x) for x in schedule],
            "random_weights": bool(args.random_weights), "device": str(device), "device_name": _device_name(device),
            "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "allocator": allocator_setting(), "batch_size": args.batch_size, "repeats": args.repeats, "warmup_rounds": 1,
            "latency_prompts": lat_prompts, "prompts": args.prompts, "prompt_draw": args.prompt_draw, "seeds": args.seeds,
            "quality_batch_size": args.quality_batch_size, "no_quality": bool(args.no_quality),
            "quality_images": args.prompts * args.seeds, "evaluator": bool(use_eval and not args.no_quality),
            "peak_mem_method": mem_method, "engines": engines, "sequential": bool(args.sequential),
            "guidance": guidance_json(guidance),
            "date": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
            "stagevar": __version__}


def _write(res: dict[str, Any], adapter, args, guidance, fitted) -> None:
    """``bench.md`` (also on stdout), ``bench.json``, the fitted plan as a policy file, the plot."""
    from stagevar.io import atomic_write
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(res)
    atomic_write(out / "bench.md", md.encode("utf-8"))
    atomic_write(out / "bench.json", (json.dumps(json_safe(res), indent=1) + "\n").encode("utf-8"))
    sys.stdout.write(md)
    sys.stdout.flush()
    written = [out / "bench.md", out / "bench.json"]
    if fitted is not None and fitted["point"] is not None:      # reusable: --policy OUT/fitted-3x.yaml
        from stagevar.policy import Policy, base_provenance, binding_for
        pol = Policy(model=binding_for(adapter), operating_points={args.fit_budget: fitted["point"]},
                     default=args.fit_budget, provenance=base_provenance(
                         source="stagevar-calibrate bench --fit-budget", calibrated=False, engine=fitted["engine"],
                         batch_size=args.batch_size, fit=fitted["chosen"], guidance=guidance_json(guidance)))
        written.append(pol.save(out / f"fitted-{args.fit_budget}.yaml"))
    if not args.no_plot:
        written.append(plot(res, out))
    progress("wrote " + ", ".join(str(w) for w in written))


def main(argv: list[str] | None = None, prog: str = "stagevar-calibrate bench") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_command(cmd_bench, args)
