"""Classifier-free guidance settings: one scale for every scale, or one per scale (upstream
Infinity's ``cfg_list``). Imported by the CLIs before torch, so it depends on nothing heavy."""
from __future__ import annotations

from typing import Any

from stagevar.errors import StageVarError


class GuidanceError(StageVarError, ValueError):
    """A guidance value the model cannot use (message names the value)."""


def parse_guidance(value: Any) -> float | tuple[float, ...]:
    """A classifier-free guidance setting from a number, a sequence of numbers, or text (``"3"``,
    ``"1,1,1,5,5"``); 1 means the conditional prediction alone. One value gives a float; several
    give a per-scale tuple (its length is checked against the model by :func:`guidance_per_scale`)."""
    items = value.replace(",", " ").split() if isinstance(value, str) else value
    if isinstance(items, (int, float)) and not isinstance(items, bool):
        items = [items]
    try:
        vals = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise GuidanceError(f"guidance {value!r} is not a number or a comma-separated list of numbers "
                            "(one per scale), e.g. 3 or 1,1,1,5,5,5,5,5,5,5") from None
    if not vals or not all(v == v and abs(v) != float("inf") for v in vals):
        raise GuidanceError(f"guidance {value!r} must hold one finite number, or one per scale")
    return vals[0] if len(vals) == 1 else vals


def guidance_json(value: Any) -> float | list[float]:
    """``value`` (see :func:`parse_guidance`) as JSON / YAML holds it: a number, or a list."""
    g = parse_guidance(value)
    return g if isinstance(g, float) else list(g)


def guidance_per_scale(value: Any, n_scales: int) -> tuple[float, ...]:
    """``value`` (see :func:`parse_guidance`) as one float per scale of an ``n_scales`` schedule."""
    g = parse_guidance(value)
    if isinstance(g, float):
        return (g,) * n_scales
    if len(g) != n_scales:
        raise GuidanceError(f"guidance lists {len(g)} values ({', '.join(f'{v:g}' for v in g)}) but the model "
                            f"has {n_scales} scales: give one number, or exactly one per scale")
    return g


def is_guided(value: Any, n_scales: int) -> bool:
    """Whether any scale is guided (needs the unconditional branch)."""
    return any(c != 1.0 for c in guidance_per_scale(value, n_scales))


def guidance_argument(text: str) -> float | tuple[float, ...]:
    """``argparse`` type of the CLIs' ``--guidance``."""
    import argparse
    try:
        return parse_guidance(text)
    except GuidanceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


GUIDANCE_HELP = ("classifier-free guidance: one scale, or one per scale comma-separated, e.g. 1,1,1,5,5,5,5,5,5,5 "
                 "(default: the model's)")


def format_guidance(value: Any) -> str:
    """Guidance for messages and tables: ``5`` or ``1,1,1,5,...``."""
    g = parse_guidance(value)
    return f"{g:g}" if isinstance(g, float) else ",".join(f"{v:g}" for v in g)


def same_guidance(a: Any, b: Any, n_scales: int, tol: float = 1e-6) -> bool:
    """Whether two guidance settings give every one of ``n_scales`` scales the same value
    (``5`` and ``5,5,...,5`` are the same setting)."""
    return all(abs(x - y) <= tol for x, y in zip(guidance_per_scale(a, n_scales), guidance_per_scale(b, n_scales)))


def guidance_ramp(peak: float, n_scales: int) -> tuple[float, ...]:
    """Upstream VAR's guidance schedule in Infinity's convention: a linear ramp from 1 (no
    guidance) on the first scale to ``peak`` on the last (VAR's ``t = cfg * k / (N - 1)`` with
    ``logits = (1 + t) * cond - t * uncond``, i.e. ``peak = 1 + cfg``)."""
    if n_scales < 2:
        return (float(peak),) * n_scales
    return tuple(round(1.0 + (peak - 1.0) * k / (n_scales - 1), 3) for k in range(n_scales))
