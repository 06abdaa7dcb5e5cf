"""Latency profile: per scale, the wall time of each plan variant (per batch of the calibration
batch size), and a model that predicts the latency of one batch under any policy from it.

Each variant is applied to every scale >= 1 in one generation (scale 0 stays as is; ``cond``
means guidance dropped from scale 1 on), timed per scale by the runtime with device
synchronisation, after one warm-up round, repeated ``repeats`` times with the variants
interleaved (A B C A B C ...), median taken. ``overhead`` = end-to-end minus the sum of the
scales (conditioning, VAE decoding).

Prediction for a policy: overhead + sum over scales of the table entry for that scale's plan,
interpolated linearly in ``keep`` between grid points; a plan restricted to a layer range mixes
the full-token time and the subset time by the fraction of layers it covers.
"""
from __future__ import annotations

import platform
import statistics

import numpy as np
import torch

from calibrate.measure.common import Variant, point_from_plans
from stagevar.perf import allocator_setting
from stagevar.policy import OperatingPoint


def device_info(adapter) -> dict:
    dev = adapter.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return {"device": str(dev), "device_name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "dtype": str(adapter.dtype).replace("torch.", ""), "allocator": allocator_setting()}


def variant_point(n: int, v: Variant) -> OperatingPoint:
    return point_from_plans(n, {k: v.plan(k) for k in range(1, n)})


def summarize(samples: dict[str, list[list[float]]], totals: dict[str, list[float]], n: int, batches: int = 1) -> dict:
    """Medians per scale and variant, in seconds **per batch** (runs cover ``batches`` batches)."""
    rows = []
    overheads = []
    samples = {k: [[v / batches for v in r] for r in runs] for k, runs in samples.items()}
    totals = {k: [t / batches for t in ts] for k, ts in totals.items()}
    for name, runs in samples.items():
        arr = np.array(runs)                   # (repeats, n)
        for k in range(n):
            rows.append({"scale": k, "variant": name, "seconds": float(np.median(arr[:, k])),
                         "p90": float(np.quantile(arr[:, k], 0.9))})
        overheads += [t - sum(r) for t, r in zip(totals[name], runs)]
    return {"rows": rows, "overhead_s": float(statistics.median(overheads)) if overheads else 0.0}


class LatencyModel:
    """Predicts a policy's end-to-end latency from the per-scale table."""

    @classmethod
    def of_record(cls, record, depth: int) -> "LatencyModel":
        """The record's latency table over the variants it measured (its settings' keep ratios
        and selections; the default grid for a record that does not name them)."""
        from calibrate.measure import common
        s = record.inputs.get("settings") or {}
        grid = (common.variant_grid(tuple(s["keeps"]), tuple(s["selections"])) if s.get("keeps") and s.get("selections")
                else common.variant_grid())
        return cls(record.latency, grid, depth)

    def __init__(self, latency: dict, variants: list[Variant], depth: int):
        self.overhead = latency["overhead_s"]
        self.depth = depth
        self.table: dict[tuple[int, str], float] = {(r["scale"], r["variant"]): r["seconds"] for r in latency["rows"]}
        self.variants = variants

    def _t(self, k: int, guidance: str, keep: float, selection: str) -> float:
        base = Variant(guidance)
        if keep >= 1.0:
            return self.table[(k, base.name)]
        pts = sorted({v.keep for v in self.variants if v.guidance == guidance and v.keep < 1.0} | {1.0})
        sel = selection if any(v.selection == selection for v in self.variants) else "random_projection"

        def at(r):
            return self.table[(k, base.name)] if r >= 1.0 else self.table[(k, Variant(guidance, r, sel).name)]

        if keep <= pts[0]:
            lo, hi = pts[0], pts[1]
        else:
            lo = max(p for p in pts if p <= keep)
            hi = min(p for p in pts if p >= keep)
        if hi == lo:
            return at(lo)
        w = (keep - lo) / (hi - lo)
        return max(0.0, at(lo) * (1 - w) + at(hi) * w)      # below the grid: linear, never negative

    def scale_seconds(self, k: int, plan, tokens: int) -> float:
        if plan.skip:
            return 0.0
        if not plan.is_subset:
            return self._t(k, plan.guidance, 1.0, plan.selection)
        keep = plan.num_kept(tokens) / tokens
        f = len(plan.layer_range(self.depth)) / self.depth
        full = self._t(k, plan.guidance, 1.0, plan.selection)
        return full * (1 - f) + self._t(k, plan.guidance, keep, plan.selection) * f

    def predict(self, point: OperatingPoint, tokens_per_scale: list[int]) -> float:
        return self.overhead + sum(self.scale_seconds(k, p, t) for k, (p, t) in enumerate(zip(point.plans, tokens_per_scale)))

    def baseline(self, tokens_per_scale: list[int]) -> float:
        return self.overhead + sum(self.table[(k, "cfg")] for k in range(len(tokens_per_scale)))
