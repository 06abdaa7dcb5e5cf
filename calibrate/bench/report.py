"""The bench's outputs: the markdown table, JSON without NaN, and the quality-vs-speedup plot."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from calibrate.bench.measure import METRIC_COLUMNS
from stagevar.guidance import format_guidance


def show(v, fmt: str, na: str = "n/a") -> str:
    """``v`` formatted, or ``na`` for a missing or non-finite number."""
    return na if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def render_markdown(res: dict[str, Any]) -> str:
    cfg = res["config"]
    rows = res["methods"]
    quality = not cfg["no_quality"]
    evaluator = quality and any("evaluator" in (r.get("quality") or {}) for r in rows)
    L = [f"# stagevar-calibrate bench: {cfg['model']}", "",
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
        cells = [f"`{r['name']}`", r["kind"], show(lat["median_s"], ".4f"), show(lat["p90_s"], ".4f"),
                 show(lat.get("first_s"), ".3f"), show(lat.get("outside_scales_median_s"), ".4f"), show(r["speedup"], ".2f") + "x"]
        if several:
            cells.append(show(r.get("speedup_same_engine"), ".2f") + "x")
        cells.append(show(r.get("peak_mem_mib"), ".1f"))
        if quality:
            q = r["quality"]
            cells += [show(q["ssim_mean"], ".3f"), show(q["ssim_min"], ".3f"), show(q["hf_ratio_mean"], ".3f")]
            cells += [show(q.get(f"{k}_mean"), ".3f") for k in learned]
            if evaluator:
                ev = q["evaluator"]["overall"]
                cells += [show(ev, ".3f"), "-" if r["kind"] == "full" else show(ev - full_eval, "+.3f")]
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
        L += _category_table(rows)
    L += _methods_table(rows)
    return "\n".join(L) + "\n"


def _category_table(rows) -> list[str]:
    """The embedded evaluator's score per prompt category and method."""
    from stagevar.toy.prompts import CATEGORIES
    cats = [c for c in CATEGORIES if c in rows[0]["quality"]["evaluator"]]
    L = ["", "## Evaluator score per category", "",
         "| method | " + " | ".join(cats) + " | overall |", "|---|" + "---:|" * (len(cats) + 1)]
    for r in rows:
        ev = r["quality"]["evaluator"]
        L.append(f"| `{r['name']}` | " + " | ".join(show(ev[c], ".3f") for c in cats) + f" | {ev['overall']:.3f} |")
    return L


def _methods_table(rows) -> list[str]:
    """Where each method comes from and the plan it runs."""
    L = ["", "## Methods", "", "| method | source | plan (scale:guidance+selection@keep[layers], skip) | predicted work skipped |",
         "|---|---|---|---:|"]
    for r in rows:
        L.append(f"| `{r['name']}` | {r['source']} | {r['plan']} | {r['predicted_work_skipped']:.1%} |")
    return L


def json_safe(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    return o


#: the plot's colour of each kind of method (``Method.kind``)
KIND_COLOURS = {"full": "black", "policy": "tab:blue", "baseline": "tab:orange", "fitted": "tab:green"}


def plot(res: dict[str, Any], out_dir: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["methods"]
    cfg = res["config"]
    colours = KIND_COLOURS
    if cfg["no_quality"]:
        fig, ax = plt.subplots(figsize=(7, 0.5 * len(rows) + 1.5))
        ys = list(range(len(rows)))[::-1]
        ax.barh(ys, [r["speedup"] or 0 for r in rows], color=[colours[r["kind"]] for r in rows])
        ax.set_yticks(ys, [r["name"] for r in rows])
        for y, r in zip(ys, rows):
            ax.text((r["speedup"] or 0), y, f" {show(r['speedup'], '.2f')}x", va="center")
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
                     "black: full, blue: policy files, orange: baselines, green: fitted by measurement", fontsize=10)
        path = out_dir / "quality_vs_speedup.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
