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


def pm(v, se, fmt: str = ".3f") -> str:
    """``v ± se`` (``v`` alone when the error is unknown, e.g. one image).

    >>> pm(0.8701, 0.0043), pm(-0.2, 0.024, "+.3f"), pm(1.0, None)
    ('0.870 ± 0.004', '-0.200 ± 0.024', '1.000')
    """
    text = show(v if v is None else v + 0.0, fmt)          # + 0.0: no "-0.000"
    return text if se is None or text == "n/a" else f"{text} ± {show(se, fmt.lstrip('+'))}"


def verdict(d: dict[str, Any]) -> str:
    """A paired difference (:func:`calibrate.bench.measure.paired`) in words."""
    if not d["resolved"]:
        return "cannot tell"
    return "better" if d["diff"] > 0 else "worse"


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
    for r in rows:
        lat = r["latency"]
        cells = [f"`{r['name']}`", r["kind"], show(lat["median_s"], ".4f"), show(lat["p90_s"], ".4f"),
                 show(lat.get("first_s"), ".3f"), show(lat.get("outside_scales_median_s"), ".4f"), show(r["speedup"], ".2f") + "x"]
        if several:
            cells.append(show(r.get("speedup_same_engine"), ".2f") + "x")
        cells.append(show(r.get("peak_mem_mib"), ".1f"))
        if quality:
            q = r["quality"]
            cells += [pm(q["ssim_mean"], q.get("ssim_se")), show(q["ssim_min"], ".3f"), show(q["hf_ratio_mean"], ".3f")]
            cells += [pm(q.get(f"{k}_mean"), q.get(f"{k}_se")) for k in learned]
            if evaluator:
                ev = q["evaluator"]
                cells += [pm(ev["mean"], ev["se"]), "-" if r["kind"] == "full" else pm(-ev["drop"], ev["drop_se"], "+.3f")]
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
                 "lost detail). Means are given ± their standard error over the images." +
                 (" eval = the embedded evaluator's accuracy over the images (per category, and the GenEval-style "
                  "mean of the categories, below); Δ eval = the mean over images of the method's verdict less the "
                  "full model's on the same image (paired), ± its standard error." if evaluator else ""))
        if evaluator and cfg["random_weights"]:
            L.append("Random weights: the evaluator's scores say nothing about the model here; compare SSIM only.")
    if evaluator:
        L += _category_table(rows)
    if res.get("against"):
        L += _against_table(res["against"], cfg.get("quality_images"))
    L += _methods_table(rows)
    return "\n".join(L) + "\n"


def _category_table(rows) -> list[str]:
    """The embedded evaluator's score per prompt category and method."""
    from stagevar.toy.prompts import CATEGORIES
    cats = [c for c in CATEGORIES if c in rows[0]["quality"]["evaluator"]]
    L = ["", "## Evaluator score per category", "",
         "| method | " + " | ".join(cats) + " | overall (mean of categories) |", "|---|" + "---:|" * (len(cats) + 1)]
    for r in rows:
        ev = r["quality"]["evaluator"]
        L.append(f"| `{r['name']}` | " + " | ".join(show(ev[c], ".3f") for c in cats) + f" | {ev['overall']:.3f} |")
    return L


def _against_table(against: dict[str, Any], images) -> list[str]:
    """``--against FILE``: each operating point less FILE's point of the same name, image by image."""
    evaluator = any("evaluator" in p for p in against["pairs"])
    L = ["", f"## Paired with `{against['file']}`", "",
         f"Each operating point less `{against['file']}`'s point of the same name, on the same {images} images "
         "(same prompts and seeds), ± the standard error of the paired differences. "
         + ("Δ eval: evaluator verdicts (1 per image the evaluator accepts); " if evaluator else "")
         + "Δ SSIM: SSIM against the full model's image. The verdict "
         + ("(on Δ eval) " if evaluator else "(on Δ SSIM) ")
         + "is 'better' or 'worse' beyond two standard errors, else 'cannot tell'.", "",
         "| point | method | speedup / theirs | " + ("Δ eval | " if evaluator else "") + "Δ SSIM | verdict |",
         "|---|---|---:|" + ("---:|" if evaluator else "") + "---:|---|"]
    for p in against["pairs"]:
        cells = [p["point"], f"`{p['method']}`", show(p["speedup_ratio"], ".3f")]
        if evaluator:
            cells.append(pm(p["evaluator"]["diff"], p["evaluator"]["se"], "+.3f"))
        cells.append(pm(p["ssim"]["diff"], p["ssim"]["se"], "+.4f"))
        cells.append(verdict(p["evaluator"] if evaluator else p["ssim"]))
        L.append("| " + " | ".join(cells) + " |")
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
                q = r["quality"]
                y = q["evaluator"]["overall"] if key == "evaluator" else q[key]
                if x is None or y is None:
                    continue
                se = q["evaluator"].get("se") if key == "evaluator" else q.get("ssim_se")
                ax.scatter([x], [y], color=colours[r["kind"]], s=40, zorder=3)
                if se:                                              # ± one standard error
                    ax.errorbar([x], [y], yerr=[se], color=colours[r["kind"]], capsize=3, lw=1, zorder=2)
                ax.annotate(r["name"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
            ax.set_xlabel("speedup vs full (median latency, same run)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        fig.suptitle(f"{cfg['model']}: quality vs speedup ({cfg['device']} {cfg['dtype']}, batch {cfg['batch_size']})\n"
                     "black: full, blue: policy files, orange: baselines, green: fitted by measurement; "
                     "bars: ± one standard error", fontsize=10)
        path = out_dir / "quality_vs_speedup.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
