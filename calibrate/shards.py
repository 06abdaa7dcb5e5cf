"""Calibration records measured in shards and merged.

The calibration prompts are split into ``num_shards`` contiguous groups of whole batches (a
batch is one generator stream, so an image only reproduces inside the same batch). Each shard
measures the convergence pass, the spectra and every sensitivity variant on its prompts and keeps
**per-image** values (resumable units, then one self-contained ``shard.json``); the merge
reassembles them in the single-process order (seed-major, then prompt) and computes every mean,
minimum and spectrum exactly as :func:`calibrate.calibration.measure` does. The merged record has
the same key and the same tables as a single-process run of the same inputs on shard 0's machine
(equal up to float rounding; in practice bit-identical). **Latency is hardware-specific**: shard 0
alone times the latency grid and the latency-model check, on the first batch as ``measure``
does, and the merged record takes them (and its device fields) from shard 0. Run
shard 0 on the hardware the policy targets; the other shards may run anywhere with the same model,
dtype and code.
"""
from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from stagevar.errors import StageVarError

log = logging.getLogger("stagevar.calibrate.shards")

SHARD_FORMAT = "stagevar-calibration-shard"
SHARD_VERSION = 1
_DEVICE_FIELDS = ("device", "device_type")


def shard_range(num_prompts: int, batch_size: int, shard_index: int, num_shards: int) -> tuple[int, int]:
    """Prompt indices [start, stop) of a shard: contiguous whole batches.

    >>> [shard_range(5, 2, i, 2) for i in range(2)]
    [(0, 2), (2, 5)]
    """
    chunks = math.ceil(num_prompts / batch_size)
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise StageVarError(f"shard {shard_index} of {num_shards}: the index must be in 0..{num_shards - 1}.")
    if num_shards > chunks:
        raise StageVarError(f"{num_shards} shards for {num_prompts} prompts in batches of {batch_size} ({chunks} batch(es)): "
                            "a shard is at least one whole batch; use fewer shards.")
    a, b = shard_index * chunks // num_shards, (shard_index + 1) * chunks // num_shards
    return a * batch_size, min(b * batch_size, num_prompts)


def shard_dir(out: str | Path, key: str, shard_index: int, num_shards: int) -> Path:
    return Path(out) / f"calibration-{key}.shard{shard_index}of{num_shards}"


def _convergence_items(subject, scorer, spectra_layers, keep_spectra: bool, more=None):
    """:func:`calibrate.measure.convergence.measure_convergence` keeping per-image values (the
    shard's prompts with the record's seeds, then with ``more``'s)."""
    from calibrate.measure.convergence import collect_partials, convergence_pass
    from calibrate.measure.spectra import ENERGIES, effective_rank

    if not keep_spectra:
        return None, collect_partials(subject, spectra_layers, keep_spectra)[2]
    vals, feats, out = convergence_pass(subject, scorer, spectra_layers, keep_spectra, more)
    items: dict[str, Any] = {"semantic_measure": "coarse_agreement", "spectra": [], "reference_seconds": out.seconds}
    for name, v in vals.items():
        items[name] = v.tolist() if isinstance(v, np.ndarray) else [a.tolist() for a in v]
    for (k, layer), parts in sorted(feats.items()):
        x = np.concatenate(parts)
        P, M, C = x.shape
        spectra, ranks = [], {str(e): [] for e in ENERGIES}
        for mat in x:                                         # as calibrate.measure.spectra.spectra_rows
            s = np.linalg.svd(mat.astype(np.float64) - mat.mean(0, keepdims=True), compute_uv=False)
            spectra.append((s ** 2 / max((s ** 2).sum(), 1e-30))[:64].tolist())
            for e in ENERGIES:
                ranks[str(e)].append(effective_rank(s, e))
        items["spectra"].append({"scale": k, "layer": layer, "tokens": M, "full_rank": min(M, C), "spectrum": spectra,
                                 "ranks": ranks})
    return items, out


def _variant_items(subject, ref, scale, variant, scorer, ref_sem) -> dict[str, Any]:
    """:func:`calibrate.measure.sensitivity.measure_variant` keeping the per-image values."""
    from calibrate.measure.sensitivity import per_image, variant_header, variant_point

    out = subject.run(variant_point(subject, scale, variant))
    item: dict[str, Any] = variant_header(scale, variant)
    item.update({k: v.tolist() for k, v in per_image(out, ref, subject.item_prompts, scorer, ref_sem).items()})
    return item


def measure_shard(adapter, prompts: list[str], seeds: list[int], shard_index: int, num_shards: int, *, out: str | Path,
                  batch_size: int = 8, guidance: float | Sequence[float] | None = None, settings=None, progress: bool = True,
                  engine: str | None = None, scorer=None) -> Path:
    """Measure one shard of the calibration pass (resumable); returns its directory, holding a
    self-contained ``shard.json`` to give to :func:`merge_records`.

    ``prompts`` is the *whole* calibration prompt list (every shard gets the same); the shard
    measures prompts ``shard_range(len(prompts), batch_size, shard_index, num_shards)`` with all
    seeds. Shard 0 also times the latency grid and the latency-model check on the whole set.
    """
    import torch
    from calibrate.calibration import (MeasureSettings, _progress, convergence_seeds, default_spectra_layers,
                                       measure_latency, measure_sensitivity, record_inputs, sensitivity_units)
    from calibrate.measure.common import Subject
    from calibrate.measure.latency import device_info
    from calibrate.metrics import scorer_for
    from calibrate.record import UnitStore, content_key
    from stagevar.io import atomic_write

    settings = settings or MeasureSettings.for_model(adapter.name)
    scorer = scorer if scorer is not None else scorer_for(adapter.name)
    inputs = record_inputs(adapter, prompts, seeds, batch_size,
                           adapter.default_guidance if guidance is None else guidance, settings, engine, scorer)
    guidance = inputs["guidance"]
    key = content_key(inputs)
    start, stop = shard_range(len(prompts), batch_size, shard_index, num_shards)
    directory = shard_dir(out, key, shard_index, num_shards)
    if (directory / "shard.json").is_file():
        log.info("calibration shard %s found: reusing it", directory)
        return directory
    store = UnitStore(directory)
    torch.manual_seed(0)
    random.seed(0)
    subject = Subject(adapter, prompts[start:stop], seeds, batch_size, guidance, engine=inputs["engine"])
    n = subject.num_scales
    spectra_layers = settings.spectra_layers if settings.spectra_layers is not None else default_spectra_layers(adapter)
    lat_total = settings.latency_repeats + 1 if shard_index == 0 else 0
    bar = _progress(1 + len(sensitivity_units(settings, n)) + lat_total, f"calibrating {adapter.name} shard {shard_index}",
                    progress)

    def unit_done(name, new):
        bar.update(1)

    try:
        conv = store.get("convergence")
        extra = convergence_seeds(seeds, len(prompts), settings.stage_images)[len(seeds):]
        more = (Subject(adapter, prompts[start:stop], extra, batch_size, guidance, engine=inputs["engine"])
                if extra and conv is None else None)
        items, ref = _convergence_items(subject, scorer, spectra_layers, keep_spectra=conv is None, more=more)
        if conv is None:
            conv = store.put("convergence", items)
        bar.update(1)
        ref_sem = scorer.reference_verdicts(ref.images, subject.item_prompts)
        sens = measure_sensitivity(store, subject, settings, unit_done,
                                   lambda k, v: _variant_items(subject, ref, k, v, scorer, ref_sem))
        shard: dict[str, Any] = {"format": SHARD_FORMAT, "version": SHARD_VERSION, "key": key, "inputs": inputs,
                                 "shard_index": shard_index, "num_shards": num_shards, "prompt_range": [start, stop],
                                 "device_info": device_info(adapter), "convergence": conv, "sensitivity": sens}
        if shard_index == 0:                  # latency: the whole calibration set, on this machine, as measure() does
            full = Subject(adapter, prompts, seeds, batch_size, guidance, engine=inputs["engine"])
            shard["latency"], shard["latency_check"] = measure_latency(store, full, settings, unit_done)
        atomic_write(directory / "shard.json", json.dumps(shard, default=_np_default))
    finally:
        bar.close()
    return directory


def _np_default(o):
    from calibrate.record import _np_default as d
    return d(o)


def load_shard(path: str | Path) -> dict[str, Any]:
    from calibrate.record import read_json
    f, d = read_json(path, "shard.json", StageVarError,
                     "no finished calibration shard here (measure_shard writes shard.json when the shard is done).",
                     "not a valid calibration shard ({exc}).")
    if d.get("format") != SHARD_FORMAT or d.get("version") != SHARD_VERSION:
        raise StageVarError(f"{f}: not a calibration shard of version {SHARD_VERSION} (format {d.get('format')!r}, "
                            f"version {d.get('version')!r}).")
    d["_path"] = str(f)
    return d




def _complete_set(shards) -> list[dict]:
    """The shards, in index order, after checking that they form one complete set measured with
    the same inputs (device fields aside)."""
    parts = sorted((load_shard(s) for s in shards), key=lambda d: d["shard_index"])
    if not parts:
        raise StageVarError("no shards to merge.")
    n_sh = parts[0]["num_shards"]
    idx = [d["shard_index"] for d in parts]
    if any(d["num_shards"] != n_sh for d in parts) or idx != list(range(n_sh)):
        raise StageVarError(f"shards {', '.join(d['_path'] for d in parts)} do not form one complete set: indices {idx} "
                            f"of {[d['num_shards'] for d in parts]} (need every index 0..N-1 exactly once).")
    base = parts[0]
    strip = lambda inp: {k: v for k, v in inp.items() if k not in _DEVICE_FIELDS}  # noqa: E731
    for d in parts[1:]:
        if strip(d["inputs"]) != strip(base["inputs"]):
            diff = sorted(k for k in set(d["inputs"]) | set(base["inputs"])
                          if k not in _DEVICE_FIELDS and d["inputs"].get(k) != base["inputs"].get(k))
            raise StageVarError(f"shard {d['_path']} was measured with other inputs than shard 0 ({', '.join(diff)} differ): "
                                "every shard needs the same model, prompts, seeds, batch size, guidance, dtype and settings.")
        if d["inputs"]["device_type"] != base["inputs"]["device_type"]:
            log.warning("shard %s ran on %s, shard 0 on %s: quality numbers may differ slightly by hardware",
                        d["shard_index"], d["inputs"]["device_type"], base["inputs"]["device_type"])
    return parts


def merge_records(shards, out: str | Path | None = None):
    """Merge finished shards (directories or ``shard.json`` files, any order) into the calibration
    record a single process would have measured; saved in ``record_dir(out, key)`` when ``out`` is
    given. Latency, the latency check and the device fields come from shard 0."""
    from calibrate.calibration import convergence_seeds, record_dir
    from calibrate.measure.convergence import curve_names, summarize_curves
    from calibrate.measure.sensitivity import summarize as summarize_sensitivity, value_names
    from calibrate.measure.stages import stages_of
    from calibrate.measure.spectra import ENERGIES
    from calibrate.record import CalibrationRecord, content_key

    parts = _complete_set(shards)
    base = parts[0]
    inputs = base["inputs"]
    key = content_key(inputs)
    if "latency" not in base:
        raise StageVarError(f"shard 0 ({base['_path']}) holds no latency table.")
    n_seeds = len(inputs["seeds"])
    # the convergence pass's seeds: the record's, then those it adds (MeasureSettings.stage_images)
    conv_seeds = len(convergence_seeds(inputs["seeds"], len(inputs["prompts"]), inputs["settings"].get("stage_images", 0)))

    def merged(get, seeds: int = n_seeds) -> np.ndarray | list:
        """Concatenate per-image lists of every shard in the single-process order (seed-major)."""
        out_vals = []
        for si in range(seeds):
            for d in parts:
                a, b = d["prompt_range"]
                vals = get(d)
                out_vals += vals[si * (b - a):(si + 1) * (b - a)]
        return out_vals

    # convergence: the single-process reduction over the concatenated per-image values
    c0 = base["convergence"]
    n = len(c0["ssim"])
    values = {name: [merged(lambda d, k=k, name=name: d["convergence"][name][k], conv_seeds) for k in range(n)]
              for name in curve_names(c0)}
    if "final_semantic" in c0:
        values["final_semantic"] = merged(lambda d: d["convergence"]["final_semantic"], conv_seeds)
    curves = summarize_curves(values, len(inputs["prompts"]))
    # spectra
    spectra_rows, arrays = [], {}
    for j, srow in enumerate(c0["spectra"]):
        k, layer = srow["scale"], srow["layer"]
        spec = np.mean(np.asarray(merged(lambda d: d["convergence"]["spectra"][j]["spectrum"]), dtype=np.float64), axis=0)
        arrays[f"scale{k:02d}_layer{layer:02d}"] = spec[:64].astype(np.float32)
        full = srow["full_rank"]
        row = {"scale": k, "layer": layer, "tokens": srow["tokens"], "full_rank": full}
        for e in ENERGIES:
            r = float(np.mean(merged(lambda d: d["convergence"]["spectra"][j]["ranks"][str(e)])))
            row[f"eff_rank_{int(e * 100)}"] = r
            row[f"eff_rank_frac_{int(e * 100)}"] = r / full if full else 0.0
        spectra_rows.append(row)
    # sensitivity: the single-process reduction over the concatenated per-image values
    sens = []
    for j, r0 in enumerate(base["sensitivity"]):
        row = {k: r0[k] for k in ("scale", "variant", "guidance", "keep", "selection")}
        row.update(summarize_sensitivity({name: merged(lambda d, name=name: d["sensitivity"][j][name])
                                          for name in value_names(r0)}))
        sens.append(row)
    stages = stages_of(curves, sens, n)
    record = CalibrationRecord(key=key, inputs=inputs, convergence=curves, sensitivity=sens, spectra=spectra_rows,
                               latency=base["latency"], latency_check=base["latency_check"], stages=stages,
                               spectra_arrays=arrays)
    if out is not None:
        record.save(record_dir(out, key))
    return record
