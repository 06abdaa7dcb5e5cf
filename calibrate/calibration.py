"""The calibration pass: measure a model on a small prompt set, resumably, into a record.

Every measurement runs through the runtime (:class:`calibrate.measure.common.Subject`), so what
is measured is what ships. See :mod:`calibrate.record` for caching and resume.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibrate.measure.common import Subject, Variant, point_from_plans, variant_grid
from calibrate.measure.convergence import measure_convergence
from calibrate.measure.latency import LatencyModel, device_info, summarize, variant_point
from calibrate.measure.sensitivity import measure_variant
from calibrate.measure.spectra import spectra_rows
from calibrate.measure.stages import stages_of
from calibrate.metrics import SemanticScorer, scorer_for
from calibrate.record import CalibrationRecord, UnitStore, content_key
from stagevar.engine import resolve_engine
from stagevar.guidance import guidance_json
from stagevar.policy import ScalePlan

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MeasureSettings:
    keeps: tuple[float, ...] = (0.75, 0.5, 0.25, 0.1)
    selections: tuple[str, ...] = ("random_projection", "deviation")
    sensitivity_from: int | None = None        # first scale measured (default: half the scales)
    guidance_from: int | None = None           # first scale whose guidance drop is measured (default: a quarter)
    latency_repeats: int = 3
    latency_check_policies: int = 3
    spectra_layers: tuple[int, ...] | None = None
    # images the convergence curves (the stage boundaries) are measured on at least: the prompts
    # with further seeds (:func:`convergence_seeds`); an identity pass each, no sensitivity runs
    stage_images: int = 32

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def for_model(cls, name: str) -> "MeasureSettings":
        """The settings model ``name``'s registry entry asks for (``calibration["measure"]``: a model
        that is slow to generate measures fewer keeps or latency rounds), else the defaults."""
        from stagevar.models.registry import calibration_defaults
        return cls(**calibration_defaults(name).get("measure", {}))


def convergence_seeds(seeds: list[int], num_prompts: int, images: int) -> list[int]:
    """The seeds of the convergence pass: the record's, then the next integers not among them,
    until the prompts x seeds hold at least ``images`` images (``MeasureSettings.stage_images``).
    Its extra images cost an identity pass each and no sensitivity run; the stage boundaries are
    counted over images, and eight images do not place them firmly (``benchmarks/results/stage-rule``).

    >>> convergence_seeds([0], 8, 32), convergence_seeds([5, 0], 10, 32), convergence_seeds([0, 1], 40, 32)
    ([0, 1, 2, 3], [5, 0, 6, 7], [0, 1])
    """
    out = list(seeds)
    k = max(seeds) + 1
    while len(out) * num_prompts < images:
        out.append(k)
        k += 1
    return out


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, disable=not enabled, unit="run", leave=False)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n=1): ...
            def close(self): ...
            def set_postfix_str(self, s): ...
        return _Null()


def weights_hash(adapter) -> str:
    """What identifies the weights: the loader's file hash when it set one (``weights_sha256``),
    else a hash of the state dict (models up to 200 M parameters; larger ones are not hashed)."""
    h = getattr(adapter, "weights_sha256", None)
    if h:
        return h
    if sum(p.numel() for p in adapter.parameters()) > 200_000_000:
        return "unknown (large model; not hashed)"
    d = hashlib.sha256()
    for k, v in sorted(adapter.state_dict().items()):
        d.update(k.encode())
        d.update(v.detach().float().cpu().numpy().tobytes())
    return "state_dict:" + d.hexdigest()[:16]


def record_inputs(adapter, prompts, seeds, batch_size, guidance, settings: MeasureSettings,
                  engine: str | None = None, scorer: SemanticScorer | None = None) -> dict[str, Any]:
    """Everything a calibration record depends on; its key is their hash, so other weights (the
    same architecture retrained) get a new record instead of reusing one measured on the old, and
    another engine (its latency table differs) another record. Learned metrics (``scorer``)
    are part of it (``metrics``); a record without them has no such field."""
    info = device_info(adapter)
    guidance = guidance_json(guidance)
    metrics = {"metrics": metrics_input(scorer)} if scorer is not None and scorer.metrics else {}
    return {**metrics, "model": adapter.fingerprint().to_dict(), "weights": weights_hash(adapter),
            "num_layers": adapter.num_layers, "prompts": list(prompts),
            "seeds": list(seeds), "batch_size": batch_size, "guidance": guidance,
            "device": info["device_name"], "device_type": adapter.device.type, "dtype": info["dtype"],
            "engine": resolve_engine(engine, adapter.device), "settings": settings.to_dict()}


def metrics_input(scorer: SemanticScorer) -> dict[str, Any]:
    """The learned metrics a record was measured with (names and where their weights came from)."""
    d = scorer.describe()
    return {"semantic": d["semantic"], "structure": d["structure"], "sources": d["sources"]}


def record_dir(out: str | Path, key: str) -> Path:
    return Path(out) / f"calibration-{key}"


def measure(adapter, prompts: list[str], seeds: list[int], *, out: str | Path, batch_size: int = 8,
            guidance: float | list[float] | None = None, settings: MeasureSettings | None = None,
            progress: bool = True, interrupt_after: int | None = None, engine: str | None = None,
            scorer: SemanticScorer | None = None) -> CalibrationRecord:
    """Run (or resume, or reuse) the calibration pass; latencies are those of ``engine`` (None: the
    device's default); images are compared with ``scorer`` (None: the model's own, without
    learned metrics). ``settings`` None: the model's own (:meth:`MeasureSettings.for_model`).
    ``interrupt_after`` stops after that many new units (tests use it to simulate an interruption)."""
    settings = settings or MeasureSettings.for_model(adapter.name)
    scorer = scorer if scorer is not None else scorer_for(adapter.name)
    inputs = record_inputs(adapter, prompts, seeds, batch_size,
                           adapter.default_guidance if guidance is None else guidance, settings, engine, scorer)
    guidance = inputs["guidance"]
    key = content_key(inputs)
    directory = record_dir(out, key)
    if (directory / "record.json").is_file():
        log.info("calibration record %s found: reusing it", directory)
        rec = CalibrationRecord.load(directory)
        rec.stages = stages_of(rec.convergence, rec.sensitivity, len(rec.inputs["model"]["scale_schedule"]))
        return rec
    directory.mkdir(parents=True, exist_ok=True)
    store = UnitStore(directory)
    torch.manual_seed(0)
    random.seed(0)
    subject = Subject(adapter, prompts, seeds, batch_size, guidance, engine=inputs["engine"])
    n = subject.num_scales
    spectra_layers = settings.spectra_layers if settings.spectra_layers is not None else default_spectra_layers(adapter)
    units_total = 1 + len(sensitivity_units(settings, n)) + settings.latency_repeats + 1 + 1
    bar = _progress(units_total, f"calibrating {adapter.name}", progress)
    new_units = 0

    def unit_done(name, new):
        nonlocal new_units
        bar.update(1)
        if not new:
            return
        bar.set_postfix_str(" ".join(filter(None, (name, scorer.cost_text()))))
        new_units += 1
        if interrupt_after is not None and new_units >= interrupt_after:
            raise KeyboardInterrupt(f"interrupted after {new_units} units (test hook)")

    try:
        # 1. reference + convergence + spectra (one identity pass; re-run on resume: it is the reference)
        curves_unit = store.get("convergence")
        extra = convergence_seeds(seeds, len(prompts), settings.stage_images)[len(seeds):]
        more = Subject(adapter, prompts, extra, batch_size, guidance, engine=inputs["engine"]) if extra and curves_unit is None else None
        curves, feats, ref = measure_convergence(subject, scorer, spectra_layers, keep_spectra=curves_unit is None, more=more)
        ref_sem = scorer.reference_verdicts(ref.images, subject.item_prompts)
        conv_new = curves_unit is None
        if conv_new:
            rows, arrays = spectra_rows(feats)
            curves_unit = store.put("convergence", {"curves": curves, "spectra": rows,
                                                    "spectra_arrays": {k: v.tolist() for k, v in arrays.items()},
                                                    "reference_seconds": ref.seconds})
        unit_done("convergence", conv_new)
        # 2. sensitivity
        sens = measure_sensitivity(store, subject, settings, unit_done,
                                   lambda k, v: measure_variant(subject, ref, k, v, scorer, ref_sem))
        # 3. latency, 4. the latency model checked on held-out policies
        latency, check = measure_latency(store, subject, settings, unit_done)
        stages = stages_of(curves_unit["curves"], sens, n)
        record = CalibrationRecord(
            key=key, inputs=inputs, convergence=curves_unit["curves"], sensitivity=sens, spectra=curves_unit["spectra"],
            latency=latency, latency_check=check, stages=stages,
            spectra_arrays={k: np.asarray(v, dtype=np.float32) for k, v in curves_unit["spectra_arrays"].items()})
        record.save(directory)
        bar.update(1)
    finally:
        bar.close()
    return record


def default_spectra_layers(adapter) -> tuple[int, ...]:
    depth = adapter.num_layers
    return tuple(sorted({depth // 2, depth}))


def sensitivity_units(settings: MeasureSettings, n: int) -> list[tuple[int, Variant]]:
    """(scale, variant) of every sensitivity unit: guidance dropped from each scale from
    ``guidance_from`` (default: a quarter of the scales) up to ``sensitivity_from`` (default: half
    the scales), then the scales from ``sensitivity_from`` to the last, each with guidance dropped
    and every keep x selection. The early guidance rows tell the search how far down dropping
    guidance is harmless (:func:`calibrate.search.guidance_floor`); they cost one run a scale.

    >>> [(k, v.name) for k, v in sensitivity_units(MeasureSettings(keeps=(0.5,), selections=("deviation",)), 8)]
    [(2, 'cond'), (3, 'cond'), (4, 'cond'), (4, 'cfg+dev@0.5'), (5, 'cond'), (5, 'cfg+dev@0.5'), (6, 'cond'), (6, 'cfg+dev@0.5'), (7, 'cond'), (7, 'cfg+dev@0.5')]
    """
    first = settings.sensitivity_from if settings.sensitivity_from is not None else max(1, n // 2)
    early = settings.guidance_from if settings.guidance_from is not None else max(1, n // 4)
    variants = [Variant("cond_only")] + [Variant("cfg", r, s) for r in settings.keeps for s in settings.selections]
    return [(k, Variant("cond_only")) for k in range(max(1, early), first)] + \
        [(k, v) for k in range(first, n) for v in variants]


def measure_sensitivity(store: UnitStore, subject: Subject, settings: MeasureSettings, unit_done, measure_unit) -> list[dict]:
    """Every sensitivity unit, from the store or measured by ``measure_unit(scale, variant)``;
    ``unit_done(name, new)`` after each."""
    rows = []
    for k, v in sensitivity_units(settings, subject.num_scales):
        name = f"sensitivity/k{k:02d}/{v.name}"
        row = store.get(name)
        new = row is None
        if new:
            row = store.put(name, measure_unit(k, v))
        rows.append(row)
        unit_done(name, new)
    return rows


def measure_latency(store: UnitStore, subject: Subject, settings: MeasureSettings, unit_done) -> tuple[dict, list[dict]]:
    """Per-scale latency table (rounds interleave the variants, after a warm-up round that is not
    stored; seconds per batch, timed on the first batch) and the latency model's check on
    held-out policies."""
    subject = subject.first_batch()
    n = subject.num_scales
    lat_variants = variant_grid(settings.keeps, settings.selections)
    rounds = [store.get(f"latency/round{r}") for r in range(settings.latency_repeats)]
    if any(r is None for r in rounds):
        for v in lat_variants[:3]:
            subject.run(variant_point(n, v), timed=True)          # warm-up
    for r in range(settings.latency_repeats):
        new = rounds[r] is None
        if new:
            res = {}
            for v in lat_variants:
                o = subject.run(variant_point(n, v), timed=True)
                res[v.name] = {"scales": o.scale_seconds, "total": o.seconds}
            rounds[r] = store.put(f"latency/round{r}", res)
        unit_done(f"latency round {r}", new)
    samples = {v.name: [rd[v.name]["scales"] for rd in rounds] for v in lat_variants}
    totals = {v.name: [rd[v.name]["total"] for rd in rounds] for v in lat_variants}
    latency = summarize(samples, totals, n, subject.num_batches)
    latency.update(device_info(subject.adapter))
    latency["batch_size"] = subject.batch_size
    latency["variants"] = [v.name for v in lat_variants]
    check = store.get("latency_check")
    new = check is None
    if new:
        check = store.put("latency_check", _latency_check(subject, latency, lat_variants, settings))
    unit_done("latency check", new)
    return latency, check


def _latency_check(subject, latency, variants, settings: MeasureSettings) -> list[dict]:
    """End-to-end latency of a few mixed policies (not on the grid) vs the prediction."""
    n = subject.num_scales
    depth = subject.adapter.num_layers
    model = LatencyModel(latency, variants, depth)
    tokens = subject.adapter.tokens_per_scale()
    rng = random.Random(1234)
    rows = []
    for i in range(settings.latency_check_policies):
        first = rng.randint(max(1, n // 2), n - 1)
        plans = {}
        for k in range(first, n):
            keep = rng.choice([1.0, 0.6, 0.4, 0.3, 0.15])
            sel = rng.choice(["random_projection", "deviation", "uniform"])
            lay = None if rng.random() < 0.5 else (rng.randint(0, max(0, depth // 4)), depth)
            plans[k] = ScalePlan(k, guidance="cond_only" if (k >= first and i % 2 == 0) else "cfg",
                                 keep=keep, selection=sel, layers=lay)
        point = point_from_plans(n, plans)
        predicted = model.predict(point, tokens)
        measured = sorted(subject.run(point, timed=True).seconds for _ in range(3))[1] / subject.num_batches
        rows.append({"policy": f"check-{i}", "predicted_s": predicted, "measured_s": measured,
                     "error": (predicted - measured) / measured, "plans": [p.to_dict() for p in point.plans]})
    return rows
