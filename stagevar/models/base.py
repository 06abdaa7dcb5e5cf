"""The adapter protocol: the only model-specific code in stagevar.

A next-scale ("VAR") generator produces an image in ``N`` scales. At scale ``k`` it runs a
transformer over the ``h_k * w_k`` tokens of that scale (attending to the KV cache of all earlier
scales), turns the logits into codes, accumulates the codes into a latent (``f_hat``), derives the
input of scale ``k+1`` from that latent, and finally decodes the latent into pixels.

The runtime (:mod:`stagevar.runtime`) owns that per-scale loop. An :class:`Adapter` exposes each
step separately so that the runtime can change *how* a scale is computed (guidance dropped, only a
subset of the tokens computed) without touching the model code:

================================  ==========================================================
``prepare``                       conditions -> :class:`GenerationState` (empty KV caches)
``scale_input(state, k)``         the full input of scale ``k``, ``x_BLC`` (rows, h*w, C)
``forward_layers(..., positions)``  run a range of transformer layers over a token subset
``head`` / ``guide`` / ``sample``   hidden -> logits -> guided logits -> codes
``update(state, k, codes)``       accumulate the latent, build the next scale's input
``drop_unconditional(state)``     keep only the conditional rows from now on (halves the batch)
``decode(state)``                 latent -> images in [0, 1]
================================  ==========================================================

Rows: when guidance is on, every tensor that flows through the transformer has ``2B`` rows, the
``B`` conditional rows first and the ``B`` unconditional rows after them (the layout of upstream
Infinity and VAR). ``state.rows`` is the current row count.

Positions: ``positions`` is a ``(rows, n)`` long tensor of token indices *within the current
scale* (row-major, ``index = i * w + j``). A layer run over a subset applies the position
encoding of those exact positions (RoPE for Infinity; VAR adds its absolute position embedding
in ``scale_input``, so its subsets carry their positions already) and appends the keys/values of
exactly those tokens to its KV cache. Later scales therefore attend to the computed tokens only.

Engines (:mod:`stagevar.engine`): the ``static`` and ``graphs`` engines pass ``kv_capacity`` (the
tokens each layer appends over the generation, derived from the plan) to ``prepare``, which then
allocates every KV cache once (:class:`~stagevar.models.kv_cache.StaticKVCache`) and keeps the
latent in a buffer updated in place; they draw each scale's sampling noise up front
(``sampling_noise_shape``) and pass it to ``sample``; :meth:`Adapter.state_inputs` names the
tensors ``prepare`` makes, so that captured scales can be replayed for another condition. No step
may read a tensor's value on the host (no ``.item()``, ``.tolist()``, data-dependent branches).

Every adapter also provides :meth:`Adapter.reference_generate`, the plain sampler written as
upstream writes it (no policy, one loop). The identity policy run through the runtime must
reproduce it exactly; that is the equivalence test every adapter passes.

Tensor suffixes: ``B`` batch rows, ``L`` tokens, ``C`` width, ``V`` logits per token,
``H`` heads, ``c`` head width, ``hw`` spatial grid.
"""
from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
from typing import Any, Sequence

import torch
from torch import nn

from stagevar.errors import StageVarError

Schedule = list[tuple[int, int, int]]


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What a policy binds to: the registry name, an architecture hash and the scale schedule.

    >>> fp = Fingerprint("infinity-tiny", "0123abcd", ((1, 1, 1), (1, 2, 2)))
    >>> fp.num_scales
    2
    """

    model: str
    arch_hash: str
    scale_schedule: tuple[tuple[int, int, int], ...]

    @property
    def num_scales(self) -> int:
        return len(self.scale_schedule)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "arch_hash": self.arch_hash,
            "scale_schedule": [list(s) for s in self.scale_schedule],
        }


def architecture_hash(config: dict[str, Any]) -> str:
    """A short stable hash of an architecture description (a JSON-able dict)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclasses.dataclass
class GenerationState:
    """Mutable state of one batched generation. Adapters subclass it to add their own fields.

    Attributes used by the runtime:
        batch_size: number of images ``B``.
        guided: whether the unconditional rows are still present (rows = 2B).
        generator: the sampling RNG (seeded in ``prepare``).
    """

    batch_size: int
    guided: bool
    generator: torch.Generator

    @property
    def rows(self) -> int:
        return 2 * self.batch_size if self.guided else self.batch_size


class ConditionError(StageVarError, ValueError):
    """A prompt / class label that the model cannot condition on (message names the value)."""


class Adapter(nn.Module, abc.ABC):
    """Base class of every model adapter (see the module docstring for the protocol).

    Subclasses set ``name`` and implement the abstract methods. They are ``nn.Module`` so that
    ``state_dict()`` is the checkpoint's state dict (key for key) and ``.to(device, dtype)`` works.
    """

    name: str = "adapter"
    family: str = "generic"

    # ----------------------------------------------------------------------------- description
    @property
    @abc.abstractmethod
    def scale_schedule(self) -> Schedule:
        """``[(t, h, w), ...]`` per scale, as the transformer sees it."""

    @property
    @abc.abstractmethod
    def num_layers(self) -> int:
        """Number of transformer blocks (the range of ``layers`` in a plan)."""

    @property
    @abc.abstractmethod
    def image_size(self) -> tuple[int, int]:
        """Output image ``(height, width)`` in pixels."""

    @abc.abstractmethod
    def architecture(self) -> dict[str, Any]:
        """A JSON-able description of the architecture (hashed into the fingerprint)."""

    def fingerprint(self) -> Fingerprint:
        return Fingerprint(
            model=self.name,
            arch_hash=architecture_hash(self.architecture()),
            scale_schedule=tuple(tuple(int(v) for v in s) for s in self.scale_schedule),
        )

    @property
    def resolution(self) -> str:
        h, w = self.image_size
        return f"{h}x{w}" if h != w else f"{h}"

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def tokens_per_scale(self) -> list[int]:
        return [t * h * w for (t, h, w) in self.scale_schedule]

    # ----------------------------------------------------------------------------- conditions
    @abc.abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Turn user prompts (text, or class names / ids for class-conditional models) into the
        condition object ``prepare`` takes. Raises :class:`ConditionError` naming a bad prompt."""

    @property
    def default_guidance(self) -> float | tuple[float, ...]:
        """The model's guidance: one number, or one per scale (see :func:`parse_guidance`)."""
        return 1.0

    # ----------------------------------------------------------------------------- the steps
    @abc.abstractmethod
    def prepare(self, condition: Any, *, guidance: float, seed: int, kv_capacity: Sequence[int] | None = None) -> GenerationState:
        """Start a generation: encode conditioning (both branches when ``guidance != 1`` or the
        model always guides), seed the RNG, empty the KV caches (growing ones; with ``kv_capacity``,
        one static cache per layer of that many tokens, and the latent in a fixed buffer)."""

    @abc.abstractmethod
    def scale_input(self, state: GenerationState, k: int) -> torch.Tensor:
        """The full input ``x_BLC`` of scale ``k`` (rows, h*w, C), ready for layer 0."""

    @abc.abstractmethod
    def forward_layers(
        self,
        state: GenerationState,
        k: int,
        x_BLC: torch.Tensor,
        layers: range,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run blocks ``layers`` over ``x_BLC``. ``positions`` (rows, n) gives each token's index
        within scale ``k``; ``None`` means all tokens in order. Appends to the KV caches."""

    @abc.abstractmethod
    def head(self, state: GenerationState, k: int, h_BLC: torch.Tensor) -> torch.Tensor:
        """Final norm + output head: (rows, l, C) -> raw logits (rows, l, V)."""

    @abc.abstractmethod
    def guide(self, state: GenerationState, k: int, logits_BLV: torch.Tensor) -> torch.Tensor:
        """Combine conditional and unconditional rows (if present) and apply temperature:
        (rows, l, V) -> (B, l, V). This is the tensor handed to the sampler."""

    @abc.abstractmethod
    def sample(self, state: GenerationState, k: int, logits_BLV: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Guided logits -> codes of scale ``k`` (model-specific layout). ``noise``: the draw of
        :func:`stagevar.ops.sampling.sampling_noise` for this scale (default: drawn here from
        ``state.generator``, the same numbers)."""

    def condition_signature(self, condition: Any) -> tuple[int, ...]:
        """``(batch size, ...)``: the shapes a condition gives a generation (a captured generation
        is replayed only for conditions of the same signature)."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its conditions: it runs on the eager engine only")

    def runs_unconditional(self, guidance: Any) -> bool:
        """Whether ``prepare`` with this guidance runs the unconditional rows too (2B rows)."""
        raise NotImplementedError(f"{type(self).__name__} does not say when it guides: it runs on the eager engine only")

    def sampling_noise_shape(self, batch_size: int, k: int) -> tuple[int, ...]:
        """The shape of the sampling noise of scale ``k`` (the probabilities the sampler races)."""
        raise NotImplementedError(f"{type(self).__name__} does not say its sampling noise shape: it runs on the eager engine only")

    def state_inputs(self, state: GenerationState) -> dict[str, torch.Tensor]:
        """The tensors ``prepare`` computed from the condition that the scales read (and the
        latent, which starts at zero), by name: what a replay of captured scales refills."""
        raise NotImplementedError(f"{type(self).__name__} does not name its state inputs: it cannot replay captured scales")

    @abc.abstractmethod
    def update(self, state: GenerationState, k: int, codes: torch.Tensor) -> None:
        """Accumulate the codes of scale ``k`` into the latent and prepare the next input."""

    @abc.abstractmethod
    def drop_unconditional(self, state: GenerationState) -> None:
        """Remove the unconditional rows from everything the state holds (KV caches, conditions,
        pending inputs). Afterwards ``state.guided`` is False and ``state.rows == B``."""

    @abc.abstractmethod
    def decode(self, state: GenerationState) -> torch.Tensor:
        """The accumulated latent -> images (B, 3, H, W), float in [0, 1]."""

    @abc.abstractmethod
    def finish(self, state: GenerationState) -> None:
        """Release the KV caches (called by the runtime even when generation fails)."""

    def copy_state(self, state: GenerationState) -> GenerationState:
        """An independent copy of an eager generation's state, to continue it more than once from
        the same scale (calibration reruns only the scales a variant changes). Growing KV caches
        are copied by reference (their appends replace tensors, never write into them); every
        other tensor is cloned (a latent may be accumulated in place), lists are copied and the
        generator resumes from the same position. A state with static caches (the ``static`` and
        ``graphs`` engines write them in place) cannot be copied: NotImplementedError."""
        from stagevar.models.kv_cache import KVCache, StaticKVCache
        fields = {}
        for f in dataclasses.fields(state):
            v = getattr(state, f.name)
            if isinstance(v, torch.Generator):
                g = torch.Generator(device=v.device)
                g.set_state(v.get_state())
                v = g
            elif isinstance(v, torch.Tensor):
                v = v.clone()
            elif isinstance(v, list):
                if any(isinstance(c, StaticKVCache) for c in v):
                    raise NotImplementedError("a state with static KV caches cannot be copied")
                v = [c.copy() if isinstance(c, KVCache) else c for c in v]
            fields[f.name] = v
        return type(state)(**fields)

    # ----------------------------------------------------------------------------- reference
    @abc.abstractmethod
    def reference_generate(self, condition: Any, *, guidance: float, seed: int) -> torch.Tensor:
        """The plain, unaccelerated sampler, written as one loop in upstream's order.
        Returns images (B, 3, H, W) in [0, 1]. The identity policy must reproduce it exactly."""
