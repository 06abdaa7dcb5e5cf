"""Engines: how the runtime's per-scale loop is executed on a device.

The loop of :mod:`stagevar.runtime` is the specification; an engine decides how it runs. All
engines give the same codes and images (tested); only the time differs.

* ``eager``: every step is called as written; KV caches grow by concatenation, the sampling noise
  and the random projection are drawn when a scale needs them.
* ``static``: the plan is compiled first (:func:`compile_plan`: rows, token counts and the KV
  length of every layer, from the schedule, the operating point and the batch); every KV cache is
  allocated once in the compute dtype and written in place; each scale's sampling noise and
  projection are drawn before the first scale (:class:`ScaleInputs`, the same numbers); nothing
  inside a scale reads a value back to the host. Each scale's step is then a pure function of
  fixed buffers: it traces with ``torch.compile(fullgraph=True)`` and can be captured.
* ``graphs`` (CUDA only): the static steps of one generation are captured once as CUDA graphs
  (:class:`CapturedGeneration`, one per scale, one shared memory pool) per (batch, prompt length,
  guidance, sampling settings) and replayed; a new condition is copied into the captured input
  buffers. The first image of a new shape pays a warm-up and the capture.

On a GPU at batch 1 the difference is the product: the eager loop launches tens of thousands of
small kernels per image, so a plan that skips most of the arithmetic saves little time.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import torch

from stagevar.errors import StageVarError
from stagevar.models.kv_cache import CacheOverflowError
from stagevar.ops.sampling import sampling_noise
from stagevar.ops.tokens import Selection, grid_dims, grid_selection
from stagevar.policy import ScalePlan

ENGINES = ("eager", "static", "graphs")
#: the ``--engine`` help text of every command
ENGINE_HELP = ("eager, static, graphs (CUDA graphs, CUDA only) or auto: the fastest the device runs "
               "(graphs on CUDA, eager on CPU); every engine gives the same images (default auto)")


class EngineError(StageVarError):
    """An engine name this device cannot run (the message names the ones it can)."""

    exit_code = 2


def engines_for(device: torch.device | str) -> tuple[str, ...]:
    """The engines a device can run.

    >>> engines_for("cpu")
    ('eager', 'static')
    """
    return ENGINES if torch.device(device).type == "cuda" else ("eager", "static")


def default_engine(device: torch.device | str) -> str:
    """The fastest engine the device runs: ``graphs`` on CUDA. On a CPU the static engine is no
    faster (its time is arithmetic, not launches; ``benchmarks/RESULTS.md``) and holds the whole
    KV cache from the first scale, so ``eager``."""
    return "graphs" if torch.device(device).type == "cuda" else "eager"


def resolve_engine(name: str | None, device: torch.device | str) -> str:
    """``name`` checked against the device (None or ``auto``: :func:`default_engine`).

    >>> resolve_engine(None, "cpu")
    'eager'
    """
    if name is None or name == "auto":
        return default_engine(device)
    can = engines_for(device)
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)} (or auto); "
                          f"on {torch.device(device).type} the choice is {', '.join(can)}.")
    if name not in can:
        raise EngineError(f"engine {name!r} needs a CUDA device, but this generation runs on "
                          f"{torch.device(device).type}: use one of {', '.join(can)} (or auto).")
    return name


# ----------------------------------------------------------------------------------------- plan
def projection_seed(seed: int, k: int) -> int:
    """The seed of scale ``k``'s random projection for a generation seeded ``seed``."""
    return int(seed) * 1_000_003 + k


@dataclasses.dataclass(frozen=True)
class ScaleShape:
    """What scale ``k`` computes under a plan: ``rows`` (2B guided, else B), its ``tokens`` and the
    ``computed`` ones (a subset's count, or all)."""

    scale: int
    hw: tuple[int, int]
    rows: int
    tokens: int
    computed: int


@dataclasses.dataclass(frozen=True)
class CompiledPlan:
    """Everything a generation's scales need, derived once from (schedule, plans, batch, guided).

    ``scales``: the scales that run (those before the first skipped one); ``kv_capacity``: the
    tokens each layer appends to its KV cache over the generation (what a static cache holds).
    """

    plans: tuple[ScalePlan, ...]
    batch_size: int
    guided: bool
    scales: tuple[ScaleShape, ...]
    kv_capacity: tuple[int, ...]

    @property
    def total_tokens(self) -> int:
        return max(self.kv_capacity, default=0)


def compile_plan(schedule: Sequence[tuple[int, int, int]], plans: Sequence[ScalePlan], depth: int, batch_size: int,
                 guided: bool) -> CompiledPlan:
    """Row counts, token counts and KV lengths of a generation, before it starts.

    >>> from stagevar.policy import ScalePlan
    >>> cp = compile_plan([(1, 1, 1), (1, 2, 2)], [ScalePlan(0), ScalePlan(1, keep=0.5, selection="deviation")], 2, 1, True)
    >>> [s.computed for s in cp.scales], cp.kv_capacity
    ([1, 2], (3, 3))
    """
    shapes, capacity = [], [0] * depth
    rows = 2 * batch_size if guided else batch_size
    for k, ((t, h, w), plan) in enumerate(zip(schedule, plans)):
        if plan.skip:
            break
        if plan.guidance == "cond_only":
            rows = batch_size
        m = t * h * w
        computed = m
        if plan.is_subset:
            n = plan.num_kept(m)
            if plan.selection == "deviation":
                computed = n
            else:
                gh, gw = grid_dims(h, w, n)
                computed = gh * gw
        lay = plan.layer_range(depth) if plan.is_subset else range(0)
        for i in range(depth):
            capacity[i] += computed if i in lay else m
        shapes.append(ScaleShape(k, (h, w), rows, m, computed))
    return CompiledPlan(tuple(plans), batch_size, guided, tuple(shapes), tuple(capacity))


def check_capacity(compiled: CompiledPlan, caches: Sequence[Any]) -> None:
    """Refuse, before the first scale, a plan that appends more tokens than a cache holds."""
    for i, (need, cache) in enumerate(zip(compiled.kv_capacity, caches)):
        have = getattr(cache, "capacity", None)
        if have is not None and need > have:
            raise CacheOverflowError(f"the plan appends {need} tokens to layer {i}'s KV cache, which holds {have}: "
                                     "allocate the caches for this plan (prepare(kv_capacity=...)) or run a smaller one")


@dataclasses.dataclass
class ScaleInputs:
    """What the static steps read besides the state, drawn before the first scale: each scale's
    sampling noise and, for grid selections, its token subset (the random projection's weights)."""

    noise: dict[int, torch.Tensor]
    selections: dict[int, Selection]

    @classmethod
    def draw(cls, adapter, compiled: CompiledPlan, generator: torch.Generator, seed: int) -> "ScaleInputs":
        """Draw in the order the eager loop draws (one generator stream for the sampler, a seeded
        one per scale for the projection), so the numbers are the eager ones."""
        dev = adapter.device
        noise, selections = {}, {}
        for s in compiled.scales:
            plan = compiled.plans[s.scale]
            if plan.is_subset and plan.selection != "deviation":
                gen = torch.Generator(device=dev).manual_seed(projection_seed(seed, s.scale))
                selections[s.scale] = grid_selection(plan.selection, s.hw, plan.num_kept(s.tokens), compiled.batch_size,
                                                     s.rows, dev, gen)
            noise[s.scale] = sampling_noise(adapter.sampling_noise_shape(compiled.batch_size, s.scale), generator, dev)
        return cls(noise, selections)

    def refill(self, adapter, compiled: CompiledPlan, generator: torch.Generator, seed: int) -> None:
        """Draw a new generation's inputs into these very buffers (captured graphs read them)."""
        new = ScaleInputs.draw(adapter, compiled, generator, seed)
        for k, t in new.noise.items():
            self.noise[k].copy_(t)
        for k, sel in new.selections.items():
            if sel.weights is not None:
                self.selections[k].weights.copy_(sel.weights)


# ----------------------------------------------------------------------------------------- timing
class ScaleTimer:
    """Per-scale times of one generation: host (wall) time always; with ``device_events`` on CUDA
    also device time, from CUDA events recorded on the stream and read once at the end (nothing
    waits inside the loop). Marks come in pairs: start and end of each scale."""

    def __init__(self, device: torch.device, device_events: bool):
        self.cuda = device_events and device.type == "cuda"
        self.host: list[float] = []
        self.events: list[Any] = []

    def mark(self) -> None:
        self.host.append(time.perf_counter())
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append(ev)

    def wall_intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.host[0::2], self.host[1::2])]

    def intervals(self) -> list[float]:
        """Seconds of each scale: device time with events, else wall time."""
        if self.cuda and self.events:
            self.events[-1].synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.events[0::2], self.events[1::2])]
        return self.wall_intervals()


# ----------------------------------------------------------------------------------------- graphs
class CapturedGeneration:
    """The scales of one generation captured as CUDA graphs and replayed for new conditions.

    Built by :meth:`capture`: a warm-up generation of the static steps on a side stream (kernel
    selection, library handles), then the generation again with every scale's step captured into
    its own graph (one memory pool, replayed in capture order). :meth:`replay` copies a new
    condition's prepared tensors (:meth:`Adapter.state_inputs`) and freshly drawn
    :class:`ScaleInputs` into the captured buffers and replays the graphs.
    """

    def __init__(self, state, inputs: ScaleInputs, input_buffers: dict[str, torch.Tensor], graphs: list,
                 outputs: list, compiled: CompiledPlan):
        self.state, self.inputs, self.input_buffers = state, inputs, input_buffers
        self.graphs, self.outputs, self.compiled = graphs, outputs, compiled

    @classmethod
    def capture(cls, runtime, compiled: CompiledPlan, condition, guidance, seed: int, sampling: dict) -> "CapturedGeneration":
        ad = runtime.adapter
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            runtime._generate_static(compiled, condition, guidance, seed, sampling, None, ScaleTimer(ad.device, False))
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        state = ad.prepare(condition, guidance=guidance, seed=seed, kv_capacity=compiled.kv_capacity, **sampling)
        buffers = dict(ad.state_inputs(state))
        inputs = ScaleInputs.draw(ad, compiled, state.generator, seed)
        pool = torch.cuda.graph_pool_handle()
        graphs, outputs = [], []
        carry = runtime._start_carry()
        for s in compiled.scales:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                carry = runtime._step(state, s.scale, carry, seed, inputs)
            graphs.append(g)
            outputs.append(carry)             # keeps every captured output alive at its address
        return cls(state, inputs, buffers, graphs, outputs, compiled)

    def replay(self, runtime, condition, guidance, seed: int, sampling: dict, timer: ScaleTimer):
        """Run the captured scales for a new condition and seed; returns the final state and the
        last scale's codes (a copy)."""
        ad = runtime.adapter
        fresh = ad.prepare(condition, guidance=guidance, seed=seed, **sampling)
        new = ad.state_inputs(fresh)
        for name, buf in self.input_buffers.items():
            if name in new:
                buf.copy_(new[name])
            else:
                buf.zero_()
        self.inputs.refill(ad, self.compiled, fresh.generator, seed)
        ad.finish(fresh)
        for g in self.graphs:
            timer.mark()
            g.replay()
            timer.mark()
        return self.state, self.outputs[-1].codes.clone()
