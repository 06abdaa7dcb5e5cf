"""The accelerated sampler: one explicit per-scale loop that applies a policy through an adapter.

For every scale ``k`` the runtime asks the operating point for its :class:`~stagevar.policy.ScalePlan`:

1. ``guidance: cond_only`` -> ``adapter.drop_unconditional``: from here on the batch has ``B``
   rows instead of ``2B`` (the KV caches are sliced too), and the adapter's ``guide`` passes the
   conditional logits through.
2. ``keep < 1`` -> the layers before the plan's layer range run on all tokens; at its first layer
   a subset is chosen (:func:`stagevar.ops.tokens.select_tokens`), run through the range with
   its true positions (only those tokens enter the KV cache), and the full grid is restored
   at the end of the range from the previous scale's cached hidden states
   (:func:`stagevar.ops.tokens.restore_tokens`); the remaining layers run on all tokens.
3. ``skip`` -> stop; the image is decoded from the latent accumulated so far.

The runtime keeps, for each scale, the full-grid hidden states at the layer boundaries that any
plan restores from ("the previous scale's cached output"). With the identity policy the loop
calls exactly what the adapter's reference sampler calls, in the same order, so the result is
identical (tested for every adapter).

How the loop runs on the device is the engine's choice (:mod:`stagevar.engine`: ``eager``,
``static``, ``graphs``); one scale's work is :meth:`Runtime._step` in every engine, so they all
give the same codes.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Any, Callable, Sequence

import torch

from stagevar.engine import (CapturedGeneration, CompiledPlan, ScaleInputs, ScaleTimer, check_capacity, compile_plan,
                             projection_seed, resolve_engine)
from stagevar.guidance import format_guidance, same_guidance
from stagevar.ops.tokens import restore_tokens, select_tokens, upsample_hidden
from stagevar.policy import OperatingPoint, Policy, ScalePlan

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ScaleRecord:
    """What happened at one scale (for calibration and inspection)."""

    scale: int
    rows: int
    tokens: int
    computed_tokens: int
    seconds: float = 0.0                    # device time when the runtime synchronises on CUDA, else wall time
    wall_seconds: float = 0.0


@dataclasses.dataclass
class GenerationResult:
    images: torch.Tensor                    # (B, 3, H, W) in [0, 1]
    records: list[ScaleRecord]
    seconds: float
    codes: torch.Tensor | None = None       # the last computed scale's codes (model layout)
    engine: str = "eager"


@dataclasses.dataclass
class _Carry:
    """What one scale hands to the next: its full-grid hidden states at the restore boundaries
    (``hidden``, on grid ``hw``), and what it produced."""

    hidden: dict[int, torch.Tensor]
    hw: tuple[int, int] | None = None
    codes: torch.Tensor | None = None
    guided_logits: torch.Tensor | None = None
    computed: int = 0


Observer = Callable[["ScaleObservation"], None]


@dataclasses.dataclass
class ScaleObservation:
    """Handed to an observer after each scale (calibration uses it; generation ignores it).

    ``hidden`` maps each observed layer boundary (``observe_layers``, plus the boundaries the
    policy restores from) to the full-grid hidden states (rows, h*w, C) after that many layers;
    ``guided_logits`` is the sampler's input; ``state`` lets the observer call
    ``adapter.decode(state)`` to see the latent accumulated so far.
    """

    scale: int
    plan: ScalePlan
    hidden: dict[int, torch.Tensor]
    guided_logits: torch.Tensor
    codes: torch.Tensor
    state: Any


def identity_plans(n: int) -> list[ScalePlan]:
    return [ScalePlan(k) for k in range(n)]


@dataclasses.dataclass
class Prefix:
    """An eager generation stopped before scale ``scale``, to be continued by
    :meth:`Runtime.generate` (``resume=``) with any plans that agree with ``plans`` on the scales
    before it; each continuation works on its own copy, so one prefix serves many. It holds the
    full-grid hidden states of the last scale at every layer boundary, so a continuation can
    restore tokens from any of them."""

    scale: int
    plans: tuple[ScalePlan, ...]            # the plans of scales 0 .. scale - 1
    condition: Any
    guidance: Any
    seed: int
    sampling: dict
    state: Any
    carry: _Carry


class Runtime:
    """Applies one operating point of a policy to an adapter.

    ``engine``: ``eager``, ``static``, ``graphs`` (CUDA) or None / ``auto`` (the fastest the
    device runs, :func:`stagevar.engine.default_engine`). ``synchronize``: per-scale times are
    device times (CUDA events, read once after the generation) and the generation's time ends
    when the device is done.

    >>> from stagevar import load_model                                   # doctest: +SKIP
    >>> model = load_model("infinity-tiny")                               # doctest: +SKIP
    >>> rt = Runtime(model)                    # identity: the unaccelerated sampler   # doctest: +SKIP
    >>> images = rt.generate(["a red circle"], seed=0).images             # doctest: +SKIP
    """

    #: captured generations kept per runtime (each holds its KV caches and graph memory)
    MAX_CAPTURED = 4

    def __init__(self, adapter, policy: Policy | OperatingPoint | None = None, operating_point: str | None = None,
                 *, synchronize: bool = False, observe_layers: Sequence[int] = (), engine: str | None = None):
        self.adapter = adapter
        n = len(adapter.scale_schedule)
        # the guidance an accelerating calibrated policy was measured with (its provenance), if it
        # says: generation uses it unless the caller passes guidance
        self.calibrated_guidance = None
        self._guidance_warned: set[str] = set()
        if policy is None:
            self.plans = identity_plans(n)
        elif isinstance(policy, Policy):
            policy.check_compatible(adapter)
            self.plans = list(policy.operating_point(operating_point).plans)
            if any(not p.is_identity for p in self.plans):
                self.calibrated_guidance = policy.provenance.get("guidance")
        else:
            if len(policy.plans) != n:
                raise ValueError(f"operating point has {len(policy.plans)} plans, model has {n} scales")
            self.plans = list(policy.plans)
        self.synchronize = synchronize
        self.engine = resolve_engine(engine, adapter.device)
        depth = adapter.num_layers
        for p in self.plans:
            if p.layers is not None and p.layers[1] > depth:
                raise ValueError(f"plan for scale {p.scale} uses layers {p.layers}, model has {depth}")
        # layer boundaries whose full-grid hidden states later scales restore from
        restore_points = {b for p in self.plans if p.is_subset for b in (p.layer_range(depth).start, p.layer_range(depth).stop)}
        for b in observe_layers:
            if not 0 <= b <= depth:
                raise ValueError(f"observe_layers: {b} is not a layer boundary of a {depth}-layer model")
        self.observed = sorted(set(observe_layers))
        self.boundaries = sorted(restore_points | set(self.observed))
        self._compiled: dict[tuple, CompiledPlan] = {}
        self._captured: collections.OrderedDict[tuple, CapturedGeneration] = collections.OrderedDict()

    def compile(self, batch_size: int, guided: bool) -> CompiledPlan:
        """This runtime's plans compiled for a batch (cached)."""
        key = (batch_size, guided)
        if key not in self._compiled:
            ad = self.adapter
            self._compiled[key] = compile_plan(ad.scale_schedule, self.plans, ad.num_layers, batch_size, guided)
        return self._compiled[key]

    @torch.no_grad()
    def generate(self, prompts: Sequence[str] | None = None, *, condition: Any = None,
                 guidance: float | Sequence[float] | None = None,
                 seed: int = 0, observer: Observer | None = None, resume: Prefix | None = None,
                 **sampling) -> GenerationResult:
        """Generate one image per prompt (or per item of a pre-encoded ``condition``).

        ``resume``: continue a :meth:`prefix` of this generation (the same condition object, seed
        and guidance; plans equal on its scales) from its scale instead of starting at scale 0,
        on the eager engine; the images are the same, and the records and seconds cover the
        scales run here.

        ``guidance`` None: the guidance an accelerating calibrated policy was measured with
        (``provenance.guidance``), else the model's default. Other guidance than the policy's
        logs a warning once per setting. An ``observer`` sees every scale, so with the ``graphs``
        engine such a generation runs on ``static``."""
        ad = self.adapter
        if condition is None:
            condition = ad.encode_prompts(list(prompts))
        if guidance is None:
            guidance = ad.default_guidance if self.calibrated_guidance is None else self.calibrated_guidance
        else:
            self._check_guidance(guidance)
        engine = "static" if self.engine == "graphs" and observer is not None else self.engine
        if resume is not None and engine != "eager":
            raise ValueError(f"resuming a prefix runs on the eager engine, not {engine!r}")
        timer = ScaleTimer(ad.device, self.synchronize)
        t0 = time.perf_counter()
        if engine == "eager":
            state, start = (self._resume(resume, condition, guidance, seed, sampling) if resume is not None
                            else (ad.prepare(condition, guidance=guidance, seed=seed, **sampling), None))
            try:
                carry, scales = self._loop(state, seed, None, observer, timer, start)
                images = ad.decode(state)
            finally:
                ad.finish(state)
            codes = carry.codes
        else:
            compiled = self.compile(ad.condition_signature(condition)[0], ad.runs_unconditional(guidance))
            if engine == "static":
                images, codes, scales = self._generate_static(compiled, condition, guidance, seed, sampling, observer, timer)
            else:
                captured = self._capture(compiled, condition, guidance, seed, sampling)
                state, codes = captured.replay(self, condition, guidance, seed, sampling, timer)
                images = ad.decode(state)
                scales = [(s.scale, s.rows, s.tokens, s.computed) for s in compiled.scales]
        if self.synchronize and ad.device.type == "cuda":
            torch.cuda.synchronize(ad.device)
        seconds = time.perf_counter() - t0
        records = [ScaleRecord(k, rows, m, computed, dt, wall) for (k, rows, m, computed), dt, wall
                   in zip(scales, timer.intervals(), timer.wall_intervals())]
        return GenerationResult(images, records, seconds, codes, engine)

    @torch.no_grad()
    def prefix(self, condition: Any, scale: int, *, guidance: float | Sequence[float] | None = None, seed: int = 0,
               **sampling) -> Prefix:
        """Run this runtime's plans on scales ``0 .. scale - 1`` (eager) and keep the state, to
        continue it with :meth:`generate` ``(resume=...)``."""
        ad = self.adapter
        if not 0 < scale < len(ad.scale_schedule):
            raise ValueError(f"a prefix stops before a scale in 1..{len(ad.scale_schedule) - 1}, got {scale}")
        if any(p.skip for p in self.plans[:scale]):
            raise ValueError(f"the plans skip a scale before {scale}: there is nothing to continue")
        guidance = ad.default_guidance if guidance is None else guidance
        state = ad.prepare(condition, guidance=guidance, seed=seed, **sampling)
        every = range(ad.num_layers + 1)
        keep = self.boundaries
        self.boundaries = sorted(every)                     # record the hidden states at every boundary
        try:
            carry = self._start_carry()
            for k in range(scale):
                carry = self._step(state, k, carry, seed, None)
        finally:
            self.boundaries = keep
        return Prefix(scale, tuple(self.plans[:scale]), condition, guidance, seed, dict(sampling), state, carry)

    def _resume(self, prefix: Prefix, condition, guidance, seed: int, sampling: dict):
        """A copy of ``prefix``'s state and carry for this runtime, after checking that it is the
        beginning of this generation."""
        if tuple(self.plans[:prefix.scale]) != prefix.plans:
            raise ValueError(f"the prefix ran other plans on scales 0..{prefix.scale - 1} than this runtime's")
        if condition is not prefix.condition or seed != prefix.seed or sampling != prefix.sampling or not same_guidance(
                guidance, prefix.guidance, len(self.adapter.scale_schedule)):
            raise ValueError("resume a prefix with the condition, seed, guidance and sampling it was run with")
        hidden = prefix.carry.hidden
        carry = dataclasses.replace(prefix.carry, hidden={b: hidden[b] for b in self.boundaries})
        return self.adapter.copy_state(prefix.state), (carry, prefix.scale)

    def _generate_static(self, compiled: CompiledPlan, condition, guidance, seed: int, sampling: dict,
                         observer: Observer | None, timer: ScaleTimer):
        """One generation on the static engine: (images, last codes, per-scale (k, rows, tokens, computed))."""
        ad = self.adapter
        state = ad.prepare(condition, guidance=guidance, seed=seed, kv_capacity=compiled.kv_capacity, **sampling)
        try:
            check_capacity(compiled, state.caches)
            inputs = ScaleInputs.draw(ad, compiled, state.generator, seed)
            carry, scales = self._loop(state, seed, inputs, observer, timer)
            images = ad.decode(state)
        finally:
            ad.finish(state)
        return images, carry.codes, scales

    def _capture(self, compiled: CompiledPlan, condition, guidance, seed: int, sampling: dict) -> CapturedGeneration:
        ad = self.adapter
        key = (ad.condition_signature(condition), format_guidance(guidance), tuple(sorted(sampling.items())))
        if key in self._captured:
            self._captured.move_to_end(key)
            return self._captured[key]
        log.info("capturing the scales of a new shape as CUDA graphs (batch and prompt length %s)", key[0])
        captured = CapturedGeneration.capture(self, compiled, condition, guidance, seed, sampling)
        self._captured[key] = captured
        while len(self._captured) > self.MAX_CAPTURED:
            self._captured.popitem(last=False)
        return captured

    def _check_guidance(self, guidance: Any) -> None:
        """Log a warning (once per setting) when the caller's guidance is not the one the policy
        was calibrated with: its measured speedup and quality hold for that guidance."""
        cal = self.calibrated_guidance
        n = len(self.adapter.scale_schedule)
        if cal is None:
            return
        try:
            if same_guidance(cal, guidance, n):
                return
        except ValueError:              # a bad guidance: the adapter names it
            return
        key = format_guidance(guidance)
        if key not in self._guidance_warned:
            self._guidance_warned.add(key)
            log.warning("the policy was calibrated with guidance %s, but this run uses %s: its measured speedup and "
                        "quality hold for guidance %s (calibrate again with --guidance %s for this setting)",
                        format_guidance(cal), key, format_guidance(cal), key)

    def _segments(self, layers: range) -> list[range]:
        """Split a layer range at the recorded boundaries."""
        cuts = [layers.start] + [b for b in self.boundaries if layers.start < b < layers.stop] + [layers.stop]
        return [range(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]

    @staticmethod
    def _start_carry() -> _Carry:
        return _Carry({})

    def _loop(self, state, seed: int, inputs: ScaleInputs | None, observer: Observer | None,
              timer: ScaleTimer, start: tuple[_Carry, int] | None = None) -> tuple[_Carry, list[tuple[int, int, int, int]]]:
        """The scales from the first (or from ``start``'s scale, with its carry: a resumed
        prefix) to the last or the first skipped."""
        carry, first = start if start is not None else (self._start_carry(), 0)
        scales = []
        for k, (t, h, w) in enumerate(self.adapter.scale_schedule[first:], start=first):
            plan = self.plans[k]
            if plan.skip:
                break
            timer.mark()
            carry = self._step(state, k, carry, seed, inputs)
            if observer is not None:
                observer(ScaleObservation(k, plan, carry.hidden, carry.guided_logits, carry.codes, state))
            timer.mark()
            scales.append((k, state.rows, t * h * w, carry.computed))
        return carry, scales

    def _step(self, state, k: int, carry: _Carry, seed: int, inputs: ScaleInputs | None) -> _Carry:
        """Scale ``k``: input -> blocks (with the plan's subset and restoration) -> head ->
        guidance -> sampling -> latent update. With ``inputs`` (static engines) the noise and the
        grid subsets are the ones drawn up front, and nothing reads a value on the host."""
        ad = self.adapter
        depth = ad.num_layers
        t, h, w = ad.scale_schedule[k]
        plan = self.plans[k]
        prev = carry.hidden
        if plan.guidance == "cond_only" and state.guided:
            ad.drop_unconditional(state)
            prev = {b: v[: state.rows] for b, v in prev.items()}
        x = ad.scale_input(state, k)
        cur: dict[int, torch.Tensor] = {}
        m = t * h * w
        computed = m
        if not plan.is_subset:
            x = self._run(state, k, x, range(0, depth), cur)
        else:
            lay = plan.layer_range(depth)
            x = self._run(state, k, x, range(0, lay.start), cur)
            x_start = x
            sel = inputs.selections.get(k) if inputs is not None else None
            if sel is None:
                gen = None
                if plan.selection == "random_projection":
                    gen = torch.Generator(device=x.device).manual_seed(projection_seed(seed, k))
                sel = select_tokens(plan.selection, x, (h, w), plan.num_kept(m), state.batch_size, gen)
            computed = sel.count
            x_sub = sel.apply(x)
            up = {b: upsample_hidden(v, carry.hw, (h, w)) for b, v in prev.items()}
            a_up = up[lay.start]
            for seg in self._segments(lay):
                x_sub = ad.forward_layers(state, k, x_sub, seg, positions=sel.positions)
                if seg.stop in self.boundaries:
                    cur[seg.stop] = restore_tokens(plan.restore, sel, x_sub, x_start, a_up, up[seg.stop])
            x = cur[lay.stop]
            x = self._run(state, k, x, range(lay.stop, depth), cur)
        logits = ad.head(state, k, x)
        guided = ad.guide(state, k, logits)
        codes = ad.sample(state, k, guided, noise=inputs.noise[k] if inputs is not None else None)
        ad.update(state, k, codes)
        return _Carry(cur, (h, w), codes, guided, computed)

    def _run(self, state, k: int, x: torch.Tensor, layers: range, cur: dict[int, torch.Tensor]) -> torch.Tensor:
        if layers.start in self.boundaries:
            cur[layers.start] = x
        for seg in self._segments(layers):
            x = self.adapter.forward_layers(state, k, x, seg)
            if seg.stop in self.boundaries:
                cur[seg.stop] = x
        return x


def generate(adapter, prompts: Sequence[str], policy: Policy | None = None, operating_point: str | None = None,
             *, seed: int = 0, guidance: float | Sequence[float] | None = None, engine: str | None = None,
             **sampling) -> torch.Tensor:
    """One-call generation: images (B, 3, H, W) in [0, 1]."""
    return Runtime(adapter, policy, operating_point, engine=engine).generate(prompts, seed=seed, guidance=guidance,
                                                                            **sampling).images
