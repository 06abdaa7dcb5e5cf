"""The subject of a calibration: a model, a prompt set with seeds, and how to run it."""
from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import numpy as np

from stagevar.engine import resolve_engine
from stagevar.policy import OperatingPoint, ScalePlan, default_stages
from stagevar.runtime import Runtime, ScaleObservation


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run a single scale (a point of the sensitivity / latency grid)."""

    guidance: str = "cfg"
    keep: float = 1.0
    selection: str = "random_projection"

    @property
    def name(self) -> str:
        g = "cond" if self.guidance == "cond_only" else "cfg"
        if self.keep >= 1.0:
            return g
        sel = {"random_projection": "rp", "deviation": "dev", "uniform": "uni"}[self.selection]
        return f"{g}+{sel}@{self.keep:g}"

    def plan(self, k: int) -> ScalePlan:
        return ScalePlan(k, guidance=self.guidance, keep=self.keep, selection=self.selection)


DEFAULT_KEEPS = (0.75, 0.5, 0.25, 0.1)
DEFAULT_SELECTIONS = ("random_projection", "deviation")


def variant_grid(keeps=DEFAULT_KEEPS, selections=DEFAULT_SELECTIONS, guidance=("cfg", "cond_only")) -> list[Variant]:
    out = []
    for g in guidance:
        out.append(Variant(g))
        out += [Variant(g, r, s) for r in keeps for s in selections]
    return out


def point_from_plans(n: int, plans: dict[int, ScalePlan]) -> OperatingPoint:
    """An operating point with the given plans and identity elsewhere. A cond_only plan makes
    every later scale cond_only too (the runtime's rule: guidance, once dropped, stays dropped)."""
    full = []
    dropped = False
    for k in range(n):
        p = plans.get(k, ScalePlan(k))
        if dropped and p.guidance == "cfg":
            p = dataclasses.replace(p, guidance="cond_only")
        dropped |= p.guidance == "cond_only"
        full.append(p)
    first = next((p.scale for p in full if not p.is_identity), n)
    return OperatingPoint(default_stages(n, first), tuple(full))


@dataclasses.dataclass
class RunOutput:
    images: np.ndarray                  # (P, 3, H, W) float32 in [0, 1]
    final_codes: np.ndarray             # (P, ...) codes of the last computed scale
    seconds: float
    scale_seconds: list[float]


class Subject:
    """A model + prompts + seeds. Runs operating points batch by batch through the runtime, on the
    engine the policy will run with (``engine``; None: the device's default). Every engine gives
    the same images, so only timed runs (``timed=True``) use CUDA graphs; the others run static
    (a capture costs about two generations). A timed run of a new operating point on ``graphs``
    first generates each batch once, untimed, to capture it; the captured runtimes of the last
    few operating points are kept."""

    #: captured runtimes kept (each holds its KV caches and graph memory)
    MAX_CAPTURED = 4

    def __init__(self, adapter, prompts: list[str], seeds: list[int], batch_size: int, guidance: float | None = None,
                 engine: str | None = None):
        self.adapter = adapter
        self.prompts = list(prompts)
        self.seeds = list(seeds)
        self.batch_size = batch_size
        self.guidance = adapter.default_guidance if guidance is None else guidance
        self.engine = resolve_engine(engine, adapter.device)
        self.items = [(p, s) for s in self.seeds for p in self.prompts]
        self._cond_cache: dict[tuple, Any] = {}
        self._captured: collections.OrderedDict[tuple, Runtime] = collections.OrderedDict()
        self._prefixes: dict[tuple, Any] = {}         # (scale, prompts, seed) -> runtime Prefix, one scale at a time

    @property
    def num_scales(self) -> int:
        return len(self.adapter.scale_schedule)

    @property
    def num_batches(self) -> int:
        return len(self.seeds) * -(-len(self.prompts) // self.batch_size)

    def batches(self):
        """(prompts, seed) groups: one seed per batch so a batch is one generator stream."""
        for s in self.seeds:
            for i in range(0, len(self.prompts), self.batch_size):
                yield self.prompts[i:i + self.batch_size], s

    def first_batch(self) -> "Subject":
        """The first batch alone (its prompts, the first seed): what latencies are timed on, since
        they are per batch and do not depend on which prompts are drawn."""
        prompts, seed = next(iter(self.batches()))
        one = Subject(self.adapter, prompts, [seed], len(prompts), self.guidance, engine=self.engine)
        one._cond_cache = {k: v for k, v in self._cond_cache.items() if k == tuple(prompts)}
        return one

    def reseeded(self, offset: int) -> "Subject":
        """The same prompts with every seed moved by ``offset``: another set of images of them
        (the prompt encodings are shared)."""
        other = Subject(self.adapter, self.prompts, [s + offset for s in self.seeds], self.batch_size, self.guidance,
                        engine=self.engine)
        other._cond_cache = self._cond_cache
        return other

    def condition(self, prompts):
        key = tuple(prompts)
        if key not in self._cond_cache:
            self._cond_cache[key] = self.adapter.encode_prompts(list(prompts))
        return self._cond_cache[key]

    def _runtime(self, point: OperatingPoint | None, observe_layers, synchronize: bool, timed: bool) -> Runtime:
        if not (timed and self.engine == "graphs"):
            engine = "static" if self.engine == "graphs" else self.engine
            return Runtime(self.adapter, point, observe_layers=observe_layers, synchronize=synchronize, engine=engine)
        key = (None if point is None else point.plans, tuple(observe_layers), synchronize)
        if key in self._captured:
            self._captured.move_to_end(key)
            return self._captured[key]
        rt = Runtime(self.adapter, point, observe_layers=observe_layers, synchronize=synchronize, engine="graphs")
        for prompts, seed in self.batches():               # capture every batch shape before timing
            rt.generate(condition=self.condition(prompts), guidance=self.guidance, seed=seed)
        self._captured[key] = rt
        while len(self._captured) > self.MAX_CAPTURED:
            self._captured.popitem(last=False)
        return rt

    def run(self, point: OperatingPoint | None, observer: Callable[[ScaleObservation, int], None] | None = None,
            observe_layers=(), synchronize: bool = True, timed: bool = False, reuse_prefix: bool = False) -> RunOutput:
        """Every batch through the runtime; ``timed``: a latency measurement (see the class).
        ``reuse_prefix`` (untimed, eager): the scales before the point's first changed one are
        run once per batch and kept, and every point that first changes the same scale continues
        from them (the same images; the seconds are the continuation's)."""
        rt = self._runtime(point, observe_layers, synchronize, timed)
        first = self._first_changed(point) if reuse_prefix and not timed and observer is None else None
        imgs, codes, secs, per_scale = [], [], 0.0, np.zeros(self.num_scales)
        offset = 0
        for prompts, seed in self.batches():
            obs = None if observer is None else (lambda o, _offset=offset: observer(o, _offset))
            resume = None if first is None else self._prefix(first, prompts, seed)
            res = rt.generate(condition=self.condition(prompts), guidance=self.guidance, seed=seed, observer=obs,
                              resume=resume)
            imgs.append(res.images.float().cpu().numpy())
            codes.append(res.codes.reshape(len(prompts), -1).float().cpu().numpy())
            secs += res.seconds
            for r in res.records:
                per_scale[r.scale] += r.seconds
            offset += len(prompts)
        width = max(c.shape[1] for c in codes)
        codes = [np.pad(c, ((0, 0), (0, width - c.shape[1])), constant_values=-1) for c in codes]
        return RunOutput(np.concatenate(imgs), np.concatenate(codes), secs, per_scale.tolist())

    def _first_changed(self, point: OperatingPoint | None) -> int | None:
        """The scale a prefix of ``point`` would stop before (its first plan that is not the
        identity), or None where no prefix helps (engines other than eager, which write their
        caches in place; the identity; a change at scale 0)."""
        if point is None or self.engine != "eager":
            return None
        first = next((p.scale for p in point.plans if not p.is_identity), None)
        return first if first is not None and first >= 1 else None

    def _prefix(self, scale: int, prompts, seed: int):
        """The unaccelerated generation of one batch stopped before ``scale`` (kept until a
        prefix of another scale is asked for: one scale's prefixes at a time)."""
        key = (scale, tuple(prompts), seed)
        if key not in self._prefixes:
            if any(k[0] != scale for k in self._prefixes):
                self._prefixes.clear()
            rt = Runtime(self.adapter, None, engine="eager")
            self._prefixes[key] = rt.prefix(self.condition(prompts), scale, guidance=self.guidance, seed=seed)
        return self._prefixes[key]

    @property
    def item_prompts(self) -> list[str]:
        return [p for p, _ in self.items]
