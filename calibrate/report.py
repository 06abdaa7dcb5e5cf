"""A report a person can read in a minute: ``report.md`` plus PNG plots of a calibration record
(convergence curves, sensitivity heat map, spectra, latency by scale) and, after a search, the
quality/latency front and the chosen plan with the evidence for each accelerated scale."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from calibrate.measure.sensitivity import resolved
from calibrate.record import CalibrationRecord
from stagevar.guidance import format_guidance
from stagevar.io import atomic_write

log = logging.getLogger(__name__)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> str:
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    _plt().close(fig)
    return path.name


def plot_convergence(record: CalibrationRecord, out: Path) -> str:
    """The convergence figure: each curve (semantic, structure, the learned metrics, the evaluator)
    of the partial image after each scale against the final one, with two-standard-error bands and
    the stages shaded; below it, the spectral energy each scale adds per frequency band."""
    plt = _plt()
    n = record.num_scales
    labels = [f"{s[1]}x{s[2]}" for s in record.inputs["model"]["scale_schedule"]]
    st = record.stages
    c = record.convergence
    bands = [k for k in ("band_low", "band_mid", "band_high") if k in c]
    if bands:      # top: agreement with the final image; bottom: the spectral energy each scale adds
        fig, (ax, axb) = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    else:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
    curves = [("semantic", "o-", None, f"semantic ({c.get('semantic_measure', 'semantic')})"),
              ("ssim", "s-", None, "structure (SSIM)")]
    if "structure" in c:
        curves.append(("structure", "D-", None, f"structure ({c.get('structure_measure')})"))
    for name in sorted(k for k in c if k.partition(":")[0] in ("semantic", "structure") and ":" in k
                       and not k.endswith("_se")):
        kind, metric = name.split(":", 1)
        curves.append((name, ".:", None, f"{metric} ({kind}{', 1 - distance' if kind == 'structure' else ''})"))
    if "evaluator" in c:
        curves.append(("evaluator", "^--", "0.4", f"evaluator pass rate (final {c['final_semantic']:.2f})"))
    for name, style, color, label in curves:
        line, = ax.plot(range(n), c[name], style, color=color, label=label)
        se = c.get(f"{name}_se")
        if se and all(v is not None for v in se):           # a band of two standard errors
            lo = [m - 2 * e for m, e in zip(c[name], se)]
            hi = [m + 2 * e for m, e in zip(c[name], se)]
            ax.fill_between(range(n), lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    for name, color in (("semantic", "#dde"), ("structure", "#ede"), ("refinement", "#eed")):
        a, b = st[name]
        if b >= a:
            ax.axvspan(a - 0.5, b + 0.5, color=color, zorder=0)
            ax.text((a + b) / 2, 0.02, name, ha="center", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("partial image vs final")
    ax.set_title("convergence by scale")
    ax.legend(fontsize=7, loc="center right")
    if bands:
        bottom = np.zeros(n)
        for name, color in zip(bands, ("#4a7", "#e93", "#c36")):
            v = np.asarray(c[name])
            axb.bar(range(n), v, bottom=bottom, color=color, label=name.split("_")[1])
            bottom += v
        axb.set_ylabel("energy added\n(/ final image)", fontsize=8)
        axb.legend(fontsize=7, title="frequency band", title_fontsize=7, loc="upper left")
        ax = axb
    ax.set_xticks(range(n), labels, rotation=45, fontsize=7)
    return _save(fig, out / "convergence.png")


def plot_record(record: CalibrationRecord, out: Path) -> dict[str, str]:
    plt = _plt()
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    n = record.num_scales
    sched = record.inputs["model"]["scale_schedule"]
    labels = [f"{s[1]}x{s[2]}" for s in sched]
    files["convergence"] = plot_convergence(record, out)

    variants = sorted({r["variant"] for r in record.sensitivity}, key=lambda v: (v != "cond", v))
    scales = sorted({r["scale"] for r in record.sensitivity})
    if variants and scales:
        grid = np.full((len(scales), len(variants)), np.nan)
        unresolved = np.zeros(grid.shape, dtype=bool)
        for r in record.sensitivity:
            i, j = scales.index(r["scale"]), variants.index(r["variant"])
            grid[i, j] = r["damage"]
            unresolved[i, j] = "damage_se" in r and not resolved(r["damage"], r["damage_se"])
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(variants), 1 + 0.45 * len(scales)))
        im = ax.imshow(grid, cmap="magma_r", aspect="auto", vmin=0)
        ax.set_xticks(range(len(variants)), variants, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(scales)), [labels[s] for s in scales], fontsize=7)
        for i in range(len(scales)):
            for j in range(len(variants)):
                if np.isfinite(grid[i, j]):
                    ax.text(j, i, f"({grid[i, j]:.2f})" if unresolved[i, j] else f"{grid[i, j]:.2f}", ha="center",
                            va="center", fontsize=6, color="white" if grid[i, j] > np.nanmax(grid) / 2 else "black")
        fig.colorbar(im, ax=ax, label="damage = 1 - quality")
        ax.set_title("sensitivity: one scale accelerated at a time\n(in brackets: within two standard errors of 0)", fontsize=9)
        files["sensitivity"] = _save(fig, out / "sensitivity.png")

    if record.spectra:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        layers = sorted({r["layer"] for r in record.spectra})
        for layer in layers:
            rows = [r for r in record.spectra if r["layer"] == layer and r["tokens"] > 1]
            ax.plot([r["scale"] for r in rows], [r["eff_rank_frac_95"] for r in rows], "o-", label=f"after layer {layer}: 95% energy")
            ax.plot([r["scale"] for r in rows], [r["eff_rank_frac_99"] for r in rows], ".--", label=f"after layer {layer}: 99% energy")
        ax.set_xticks(range(n), labels, rotation=45, fontsize=7)
        ax.set_ylabel("effective rank / min(M, C)")
        ax.set_title("spectra of per-scale token features")
        ax.legend(fontsize=7)
        files["spectra"] = _save(fig, out / "spectra.png")

    lat = record.latency
    if lat.get("rows"):
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        names = [v for v in lat["variants"] if v in ("cfg", "cond") or v.endswith("@0.5") or v.endswith("@0.25")]
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            secs = [next(r["seconds"] for r in lat["rows"] if r["scale"] == k and r["variant"] == name) for k in range(n)]
            ax.bar(np.arange(n) + j * width, [s * 1000 for s in secs], width, label=name)
        ax.set_xticks(np.arange(n) + 0.4, labels, rotation=45, fontsize=7)
        ax.set_ylabel("ms per batch")
        ax.set_title(f"latency by scale ({lat.get('device_name', '')}, batch {lat.get('batch_size', '?')})")
        ax.legend(fontsize=7)
        files["latency"] = _save(fig, out / "latency.png")
    return files


def plot_front(trials: list[dict[str, Any]], chosen: dict[str, Any], out: Path) -> str | None:
    pts = [t for t in trials if "predicted_speedup" in t and t.get("quality") is not None and not t.get("quality_estimated")]
    if not pts:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    ax.scatter([t["predicted_speedup"] for t in pts], [t["quality"] for t in pts], s=12, alpha=0.5, label="trials")
    from calibrate.candidates import pareto_front
    front = pareto_front([(t["quality"], 1 / t["predicted_speedup"], t) for t in pts])
    ax.plot([1 / f[1] for f in front], [f[0] for f in front], "r-", lw=1, label="Pareto front")
    for name, which in chosen.items():
        # trial numbers are per study; a budget may choose a trial of another study of the run
        num, study_budget = (which["number"], which["study_budget"]) if isinstance(which, dict) else (which, name)
        t = next((t for t in pts if t["number"] == num and t.get("budget", study_budget) == study_budget), None)
        if t:
            ax.scatter([t["predicted_speedup"]], [t["quality"]], s=60, marker="*", label=f"chosen {name}")
    ax.set_xlabel("predicted speedup")
    ax.set_ylabel("quality vs full model")
    ax.legend(fontsize=7)
    return _save(fig, out / "front.png")


def plus_minus(se) -> str:
    """`` ± se`` (a standard error), or nothing when it is unknown."""
    return "" if se is None else f" ± {se:.3f}"



def _selection_line(m: dict[str, Any]) -> list[str]:
    """Where the numbers above come from, and the selection set's numbers when they differ."""
    if "selection_quality" not in m:
        return [f"Numbers from: {m['quality_from']}.", ""] if m.get("quality_from") else []
    sel = (f"On the selection set ({m.get('selection_images', '?')} images, {m.get('candidates', '?')} candidate{'' if m.get('candidates') == 1 else 's'}) it scored "
           f"quality {m['selection_quality']:.3f}{plus_minus(m.get('selection_quality_se'))}")
    if m.get("selection_score") is not None:
        sel += f", evaluator {m['selection_score_full']:.3f} -> {m['selection_score']:.3f}"
    if m.get("tied_with_best"):
        sel += (f"; {m['tied_with_best']} other candidate(s) could not be told from the best on these images, and the "
                "least accelerated was chosen")
    return [f"The numbers above are measured on the report set ({m.get('verification_images', '?')} images the choice "
            f"did not see). {sel}.", ""]


def sensitivity_table(record: CalibrationRecord) -> list[str]:
    """Markdown: damage ± standard error per scale and variant; a damage within two standard errors
    of zero (one the images cannot tell from none) in brackets."""
    rows = record.sensitivity
    if not rows:
        return []
    variants = sorted({r["variant"] for r in rows}, key=lambda v: (v != "cond", v))
    scales = sorted({r["scale"] for r in rows})
    cell = {(r["scale"], r["variant"]): r for r in rows}
    images = max((r.get("images", 0) for r in rows), default=0)
    out = [f"Damage ± standard error over the {images} calibration images (paired: each image against the full "
           "model's image of the same seed); in brackets where it is within two standard errors of zero.", "",
           "| scale | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
    for k in scales:
        cells = []
        for v in variants:
            r = cell.get((k, v))
            if r is None:
                cells.append("")
                continue
            text = f"{r['damage']:.3f}{plus_minus(r.get('damage_se'))}"
            cells.append(text if "damage_se" not in r or resolved(r["damage"], r["damage_se"]) else f"({text})")
        out.append(f"| {k} | " + " | ".join(cells) + " |")
    return out + [""]


def search_space_lines(record: CalibrationRecord) -> list[str]:
    """What the record lets the search change: the scales it may compute on fewer tokens (or
    skip), and the lowest scale it may drop guidance from, with the reason."""
    from calibrate.search import GUIDANCE_FREE_DAMAGE, guidance_floor, search_bounds
    lo, n = search_bounds(record)
    floor = guidance_floor(record)
    line = f"The search may compute scales {lo}-{n - 1} on fewer tokens. "
    if floor < lo:
        span = f"scale {floor}" if floor == lo - 1 else f"each of scales {floor}-{lo - 1}"
        line += (f"It may drop guidance from scale {floor} on: dropping it from {span} could not be told from "
                 f"harmless (damage less two standard errors at most {GUIDANCE_FREE_DAMAGE}).")
    else:
        line += (f"It may drop guidance from scale {lo} on, the start of that range: dropping it from scale {lo - 1} "
                 "was not measured, or measured harmful.")
    return [line, ""]


def measures_section(record: CalibrationRecord, metric_cost: dict[str, dict[str, float]] | None = None) -> list[str]:
    """Which scorers the quality reads, where their weights came from, whether any of them is a
    semantic measure, and what the learned metrics cost in this run (``metric_cost``:
    :meth:`calibrate.metrics.SemanticScorer.metric_cost`)."""
    m = record.inputs.get("metrics")
    c = record.convergence
    out = ["## Measures", ""]
    if m:
        out.append(f"Quality = 0.5 x structure ({' + '.join(m['structure'])}, averaged) + 0.5 x semantic "
                   f"({' + '.join(m['semantic'])}, averaged), each an agreement with the full model's image of the same "
                   "seed (LPIPS as 1 - distance). Weights:")
        cost = metric_cost or {}
        out += [""] + [f"- `{k}`: {v}" + (f" ({cost[k]['seconds']:.1f} s for {cost[k]['images']} images in this run)"
                                           if cost.get(k, {}).get("images") else "")
                       for k, v in m["sources"].items()] + [""]
    else:
        scorer = "the evaluator's verdict" if "evaluator" in c else "the agreement of the model's final codes"
        out.append(f"Quality = 0.5 x SSIM + 0.5 x {scorer}, each against the full model's image of the same seed.")
        out.append("")
    if not m and "evaluator" not in c:
        out += ["**No semantic measure**: plans were chosen on codes and SSIM only. Give CLIP / DINOv2 weights "
                "(`--metric clip,dino,lpips --metric-weights ...`) to choose them on what the images show.", ""]
    out += [f"Stage curves: semantic = {c.get('semantic_measure', 'coarse_agreement')}, structure = "
            f"{c.get('structure_measure', 'ssim')}. The lower panel of the figure is the spectral energy of what each "
            "scale changed (luma; low < 1/8, mid < 1/4, high >= 1/4 cycles per pixel), relative to the final image's."
            if "band_low" in c else "", ""]
    return out


def stage_support_lines(stages: dict) -> list[str]:
    """How firmly the images decide the boundaries (:func:`calibrate.measure.stages.boundary_support`):
    the share of bootstrap resamples giving each end of the semantic and structure stages, a
    boundary fewer than :data:`~calibrate.measure.stages.RESOLVED_SUPPORT` of them agree on marked
    unresolved. No lines for a record without per-image curve values."""
    from calibrate.measure.stages import RESOLVED_SUPPORT
    b = stages.get("evidence", {}).get("bootstrap")
    if not b:
        return []

    def line(name: str, end: int, shares: dict[str, float]) -> str:
        share = shares.get(str(end), 0.0)
        others = ", ".join(f"{k} in {v:.0%}" for k, v in shares.items() if k != str(end))
        verdict = "resolved" if share >= RESOLVED_SUPPORT else "**unresolved**: more images would settle it"
        return f"- {name} ends at {end} in {share:.0%} of the resamples" + (f" ({others})" if others else "") + f": {verdict}."
    drawn = (f"{b['prompts']} prompts (each with its {b['images'] // b['prompts']} seeds' images)"
             if b.get("prompts", b["images"]) != b["images"] else f"{b['images']} images")
    return [f"Curves on {b['images']} images. Bootstrap over the {drawn}, {b['resamples']} resamples: the rule gives "
            f"these boundaries in {b['support']:.0%} of them.", "",
            line("semantic", stages["semantic"][1], b["semantic_end"]),
            line("structure", stages["structure"][1], b["structure_end"]), ""]


def write_report(record: CalibrationRecord, out: Path, search: dict[str, Any] | None = None,
                 metric_cost: dict[str, dict[str, float]] | None = None) -> Path:
    out = Path(out)
    files = plot_record(record, out)
    inp = record.inputs
    st = record.stages
    lines = [f"# Calibration report: {inp['model']['model']}", "",
             f"Device {inp['device']} ({inp['device_type']}, {inp['dtype']}), batch {inp['batch_size']}, "
             f"{len(inp['prompts'])} prompts x {len(inp['seeds'])} seed(s), guidance {format_guidance(inp['guidance'])}. Record `{record.key}`.", "",
             "## Stages", "",
             f"semantic {st['semantic'][0]}-{st['semantic'][1]}, structure {st['structure'][0]}-{st['structure'][1]}, "
             f"refinement {st['refinement'][0]}-{st['refinement'][1]}.", "", f"Rule: {st['rule']}.", "",
             *stage_support_lines(st), f"![convergence]({files['convergence']})", ""]
    lines += measures_section(record, metric_cost)
    if "sensitivity" in files:
        lines += ["## Sensitivity", "", "Damage (1 - quality vs the full model) when only that scale is accelerated "
                  "(`cond`: guidance dropped from that scale on).", "", f"![sensitivity]({files['sensitivity']})", ""]
        lines += sensitivity_table(record)
        lines += search_space_lines(record)
    if "spectra" in files:
        lines += ["## Spectra", "", "| scale | tokens | layer | eff. rank 90% | 95% | 99% |", "|---|---|---|---|---|---|"]
        for r in record.spectra:
            if r["tokens"] > 1:
                lines.append(f"| {r['scale']} | {r['tokens']} | {r['layer']} | {r['eff_rank_90']:.1f} | {r['eff_rank_95']:.1f} | {r['eff_rank_99']:.1f} |")
        lines += ["", f"![spectra]({files['spectra']})", ""]
    lat = record.latency
    lines += ["## Latency", "", f"Overhead outside the scales: {lat['overhead_s'] * 1000:.0f} ms; torch {lat.get('torch')}, "
              f"{lat.get('threads')} threads.", ""]
    if "latency" in files:
        lines += [f"![latency]({files['latency']})", ""]
    if record.latency_check:
        lines += ["Latency model check (held-out policies, end to end):", "", "| policy | predicted | measured | error |", "|---|---|---|---|"]
        for r in record.latency_check:
            lines.append(f"| {r['policy']} | {r['predicted_s'] * 1000:.0f} ms | {r['measured_s'] * 1000:.0f} ms | {r['error'] * 100:+.1f}% |")
        lines.append("")
    if search:
        lines += ["## Search", ""]
        front = plot_front(search.get("trials", []), search.get("chosen_trials", {}), out)
        if front:
            lines += [f"![front]({front})", ""]
        for name, pt in search.get("points", {}).items():
            m = pt["measured"]
            lines += [f"### {name}: {'feasible' if m.get('feasible') else 'NOT met'}", "",
                      f"Verified on held-out prompts: speedup {m.get('speedup', 0):.2f}x "
                      f"({m.get('baseline_latency_s', 0) * 1000:.0f} ms -> {m.get('latency_s', 0) * 1000:.0f} ms), "
                      f"quality {m.get('quality', 0):.3f}{plus_minus(m.get('quality_se'))} (worst prompt {m.get('quality_worst', 0):.3f})"
                      + (f", evaluator score {m['score_full']:.3f} -> {m['score']:.3f} (paired drop {m['score_drop']:.3f}"
                         f"{plus_minus(m.get('score_drop_se'))})" if m.get("score") is not None else "") + ".", "",
                      *_selection_line(m),
                      "| scale | plan | why (damage of this scale's variants at calibration) |", "|---|---|---|"]
            for p in pt["plans"]:
                if len(p) == 1:
                    continue
                ev = {r["variant"]: r for r in record.sensitivity if r["scale"] == p["scale"]}
                why = ", ".join(f"{v} {r['damage']:.3f}{plus_minus(r.get('damage_se'))}"
                                for v, r in sorted(ev.items(), key=lambda kv: kv[1]["damage"])[:4]) or "not measured"
                plan = ", ".join(f"{k}={v}" for k, v in p.items() if k != "scale")
                lines.append(f"| {p['scale']} | {plan} | {why} |")
            lines.append("")
    path = out / "report.md"
    atomic_write(path, "\n".join(lines) + "\n")
    return path
