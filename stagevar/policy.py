"""Policies: what the runtime does at every scale of one model, as a versioned YAML file.

A policy binds to a model fingerprint (registry name, architecture hash, scale schedule) and holds
one or more *operating points* (e.g. ``2x``, ``3x``), one of them the default. An operating point
lists the stage boundaries and one :class:`ScalePlan` per scale. Example (abridged)::

    schema_version: 1
    model: {name: infinity-tiny, arch_hash: 5f0c..., resolution: "256", scale_schedule: [[1,1,1], ...]}
    default: 3x
    operating_points:
      3x:
        stages: {semantic: [0, 2], structure: [3, 4], refinement: [5, 6]}
        plans:
          - {scale: 0}
          ...
          - {scale: 5, guidance: cond_only, keep: 0.5, selection: random_projection}
          - {scale: 6, guidance: cond_only, keep: 0.25, selection: deviation, layers: [2, 30]}
        measured: {speedup: 3.1, ...}
    provenance: {tool_version: 0.1.0, created: ..., ...}

Loading is strict: unknown keys, wrong types, out-of-range values, a newer ``schema_version`` and
a fingerprint that does not match the loaded model are errors that name the file, the field path
and the value, and say how to fix it.
"""
from __future__ import annotations

import dataclasses
import datetime
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from stagevar.errors import StageVarError
from stagevar.io import atomic_write
from stagevar.guidance import GuidanceError, guidance_per_scale

SCHEMA_VERSION = 2
GUIDANCE = ("cfg", "cond_only")
SELECTIONS = ("random_projection", "deviation", "uniform")
RESTORES = ("cached_update", "cached_output")
STAGES = ("semantic", "structure", "refinement")
_POINT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class PolicyError(StageVarError):
    """A policy file or object is invalid; the message names the file, field and value."""


def _fail(src: str, path: str, msg: str) -> PolicyError:
    where = f"{src}: " if src else ""
    return PolicyError(f"{where}field '{path}' {msg}")


# ------------------------------------------------------------------------------------- checkers
def _check_keys(d: Any, allowed: Iterable[str], required: Iterable[str], src: str, path: str) -> dict:
    if not isinstance(d, Mapping):
        raise _fail(src, path or "<root>", f"must be a mapping, got {type(d).__name__} {d!r:.80}")
    allowed = list(allowed)
    for k in d:
        if k not in allowed:
            raise _fail(src, f"{path}.{k}" if path else str(k),
                        f"is not a known key (value {d[k]!r:.60}). Allowed keys here: {', '.join(allowed)}. "
                        "Check the spelling; unknown keys are refused so that a typo cannot silently change behaviour.")
    for k in required:
        if k not in d:
            raise _fail(src, f"{path}.{k}" if path else k, "is missing; it is required.")
    return dict(d)


def _int(v: Any, src: str, path: str, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _fail(src, path, f"must be an integer, got {type(v).__name__} {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise _fail(src, path, f"is {v}, outside the allowed range {rng}")
    return v


def _float(v: Any, src: str, path: str, lo: float | None = None, hi: float | None = None, lo_open=False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise _fail(src, path, f"must be a finite number, got {type(v).__name__} {v!r}")
    v = float(v)
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise _fail(src, path, f"is {v}, must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and v > hi:
        raise _fail(src, path, f"is {v}, must be <= {hi}")
    return v


def _choice(v: Any, choices: tuple[str, ...], src: str, path: str) -> str:
    if v not in choices:
        raise _fail(src, path, f"is {v!r}; expected one of {', '.join(choices)}")
    return v


def _str(v: Any, src: str, path: str) -> str:
    if not isinstance(v, str) or not v:
        raise _fail(src, path, f"must be a non-empty string, got {type(v).__name__} {v!r}")
    return v


# ------------------------------------------------------------------------------------- dataclasses
@dataclasses.dataclass(frozen=True)
class ScalePlan:
    """What the runtime does at one scale.

    guidance: ``cfg`` (both branches, as the model normally runs) or ``cond_only`` (the
        unconditional rows are dropped from this scale on: the batch really halves).
    keep: fraction of the scale's tokens that are computed (1.0 = all).
    keep_tokens: alternatively an absolute token count (overrides ``keep``).
    selection: how the computed tokens are chosen (``random_projection``, ``deviation``,
        ``uniform``; see :mod:`stagevar.ops.tokens`).
    restore: how the other tokens are filled from the previous scale's cached hidden states
        (``cached_update``: own state + previous scale's change over the skipped layers;
        ``cached_output``: previous scale's state), both upsampled to this scale.
    layers: ``[start, stop)`` the transformer layers run on the subset; ``None`` = all layers.
    skip: do not compute this scale at all (and none after it): the image is decoded from the
        latent accumulated so far.
    """

    scale: int
    guidance: str = "cfg"
    keep: float = 1.0
    keep_tokens: int | None = None
    selection: str = "random_projection"
    restore: str = "cached_update"
    layers: tuple[int, int] | None = None
    skip: bool = False

    @property
    def is_subset(self) -> bool:
        return not self.skip and (self.keep_tokens is not None or self.keep < 1.0)

    @property
    def is_identity(self) -> bool:
        return self.guidance == "cfg" and not self.is_subset and not self.skip

    def layer_range(self, depth: int) -> range:
        a, b = self.layers if self.layers is not None else (0, depth)
        return range(a, b)

    def num_kept(self, tokens: int) -> int:
        if self.keep_tokens is not None:
            return max(1, min(tokens, self.keep_tokens))
        return max(1, min(tokens, round(self.keep * tokens)))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"scale": self.scale}
        for f in dataclasses.fields(self):
            if f.name == "scale":
                continue
            v = getattr(self, f.name)
            if v != f.default:
                d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: Any, src: str = "", path: str = "plan") -> "ScalePlan":
        names = [f.name for f in dataclasses.fields(cls)]
        d = _check_keys(d, names, ["scale"], src, path)
        kw: dict[str, Any] = {"scale": _int(d["scale"], src, f"{path}.scale", lo=0)}
        if "guidance" in d:
            kw["guidance"] = _choice(d["guidance"], GUIDANCE, src, f"{path}.guidance")
        if "keep" in d:
            kw["keep"] = _float(d["keep"], src, f"{path}.keep", lo=0.0, hi=1.0, lo_open=True)
        if "keep_tokens" in d and d["keep_tokens"] is not None:
            kw["keep_tokens"] = _int(d["keep_tokens"], src, f"{path}.keep_tokens", lo=1)
        if "selection" in d:
            kw["selection"] = _choice(d["selection"], SELECTIONS, src, f"{path}.selection")
        if "restore" in d:
            kw["restore"] = _choice(d["restore"], RESTORES, src, f"{path}.restore")
        if "layers" in d and d["layers"] is not None:
            lay = d["layers"]
            if not isinstance(lay, (list, tuple)) or len(lay) != 2:
                raise _fail(src, f"{path}.layers", f"must be a list [start, stop) of two layer indices, got {lay!r}")
            a = _int(lay[0], src, f"{path}.layers[0]", lo=0)
            b = _int(lay[1], src, f"{path}.layers[1]", lo=1)
            if b <= a:
                raise _fail(src, f"{path}.layers", f"is {list(lay)}: stop must be greater than start")
            kw["layers"] = (a, b)
        if "skip" in d:
            if not isinstance(d["skip"], bool):
                raise _fail(src, f"{path}.skip", f"must be true or false, got {d['skip']!r}")
            kw["skip"] = d["skip"]
        return cls(**kw)


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """Stage boundaries and one plan per scale, plus what was measured for this point."""

    stages: dict[str, tuple[int, int]]
    plans: tuple[ScalePlan, ...]
    measured: dict[str, Any] = dataclasses.field(default_factory=dict)

    def plan_for(self, k: int) -> ScalePlan:
        return self.plans[k]

    @property
    def first_accelerated_scale(self) -> int | None:
        for p in self.plans:
            if not p.is_identity:
                return p.scale
        return None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "stages": stage_ranges(self.stages),
            "plans": [p.to_dict() for p in self.plans],
        }
        if self.measured:
            d["measured"] = dict(self.measured)
        return d


@dataclasses.dataclass(frozen=True)
class ModelBinding:
    name: str
    arch_hash: str
    resolution: str
    scale_schedule: tuple[tuple[int, int, int], ...]
    num_layers: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arch_hash": self.arch_hash, "resolution": self.resolution,
                "num_layers": self.num_layers, "scale_schedule": [list(s) for s in self.scale_schedule]}


@dataclasses.dataclass(frozen=True)
class Policy:
    model: ModelBinding
    operating_points: dict[str, OperatingPoint]
    default: str
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    source: str = dataclasses.field(default="", compare=False)

    # -------------------------------------------------------------------------------- access
    def operating_point(self, name: str | None = None) -> OperatingPoint:
        name = self.default if name is None else name
        if name not in self.operating_points:
            raise PolicyError(
                f"{self.source or 'policy'}: operating point {name!r} does not exist; this policy has "
                f"{', '.join(sorted(self.operating_points))} (default {self.default!r})."
            )
        return self.operating_points[name]

    def check_compatible(self, adapter) -> None:
        """Refuse a policy written for another model, architecture or schedule."""
        fp = adapter.fingerprint()
        src = self.source or "policy"
        if self.model.name != fp.model:
            raise PolicyError(f"{src}: field 'model.name' is {self.model.name!r} but the loaded model is {fp.model!r}. "
                              f"Use a policy made for {fp.model!r} (see policies/) or load model {self.model.name!r}.")
        if self.model.arch_hash != fp.arch_hash:
            raise PolicyError(f"{src}: field 'model.arch_hash' is {self.model.arch_hash!r} but model {fp.model!r} has "
                              f"architecture hash {fp.arch_hash!r}: the policy was made for a different configuration. "
                              "Re-run stagevar-calibrate for this model.")
        if tuple(self.model.scale_schedule) != tuple(fp.scale_schedule):
            raise PolicyError(f"{src}: field 'model.scale_schedule' {[list(s) for s in self.model.scale_schedule]} does not "
                              f"match the model's schedule {[list(s) for s in fp.scale_schedule]} (another resolution or "
                              "aspect ratio). Use a policy calibrated for this resolution.")
        if self.model.num_layers != adapter.num_layers:
            raise PolicyError(f"{src}: field 'model.num_layers' is {self.model.num_layers} but the model has "
                              f"{adapter.num_layers} layers.")

    # -------------------------------------------------------------------------------- build
    @classmethod
    def identity(cls, adapter, name: str = "identity") -> "Policy":
        """The policy that changes nothing (reproduces the unaccelerated sampler exactly)."""
        n = len(adapter.scale_schedule)
        point = OperatingPoint(stages=default_stages(n, n), plans=tuple(ScalePlan(k) for k in range(n)))
        return cls(model=binding_for(adapter), operating_points={name: point}, default=name,
                   provenance=base_provenance())

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "model": self.model.to_dict(),
            "default": self.default,
            "operating_points": {k: v.to_dict() for k, v in self.operating_points.items()},
            "provenance": dict(self.provenance),
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=110)

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temp file in the same directory, fsync, rename)."""
        return atomic_write(path, self.to_yaml())

    @classmethod
    def from_dict(cls, d: Any, src: str = "") -> "Policy":
        d = _check_keys(d, ["schema_version", "model", "default", "operating_points", "provenance"],
                        ["schema_version", "model", "operating_points"], src, "")
        version = d["schema_version"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise _fail(src, "schema_version", f"must be an integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise _fail(src, "schema_version", f"is {version}, newer than this stagevar understands ({SCHEMA_VERSION}). "
                        "Upgrade stagevar (pip install -U stagevar) to read this file.")
        if version < 1:
            raise _fail(src, "schema_version", f"is {version}; the first schema version is 1.")
        d = migrate(d, version)
        m = _check_keys(d["model"], ["name", "arch_hash", "resolution", "scale_schedule", "num_layers"],
                        ["name", "arch_hash", "scale_schedule", "num_layers"], src, "model")
        sched_raw = m["scale_schedule"]
        if not isinstance(sched_raw, list) or not sched_raw:
            raise _fail(src, "model.scale_schedule", f"must be a non-empty list of [t, h, w], got {sched_raw!r:.80}")
        sched = []
        for i, s in enumerate(sched_raw):
            if not isinstance(s, list) or len(s) != 3:
                raise _fail(src, f"model.scale_schedule[{i}]", f"must be [t, h, w], got {s!r}")
            sched.append(tuple(_int(v, src, f"model.scale_schedule[{i}][{j}]", lo=1) for j, v in enumerate(s)))
        n = len(sched)
        depth = _int(m["num_layers"], src, "model.num_layers", lo=1)
        binding = ModelBinding(_str(m["name"], src, "model.name"), _str(m["arch_hash"], src, "model.arch_hash"),
                               str(m.get("resolution", "")), tuple(sched), depth)
        points_raw = d["operating_points"]
        if not isinstance(points_raw, Mapping) or not points_raw:
            raise _fail(src, "operating_points", f"must be a non-empty mapping of name -> operating point, got {points_raw!r:.80}")
        points = {}
        for name, pd in points_raw.items():
            if not isinstance(name, str) or not _POINT_NAME.fullmatch(name):
                raise _fail(src, f"operating_points.{name}", "has an invalid name: use letters, digits, '.', '_' or '-' (e.g. 3x, 700ms)")
            points[name] = _point_from_dict(pd, n, depth, src, f"operating_points.{name}")
        default = d.get("default")
        if default is None:
            if len(points) != 1:
                raise _fail(src, "default", f"is missing; with several operating points ({', '.join(points)}) name the default one")
            default = next(iter(points))
        if not isinstance(default, str):
            raise _fail(src, "default", f"must be the name of an operating point ({', '.join(points)}), got {default!r:.60}")
        if default not in points:
            raise _fail(src, "default", f"is {default!r}, which is not one of the operating points ({', '.join(points)})")
        prov = d.get("provenance", {}) or {}
        if not isinstance(prov, Mapping):
            raise _fail(src, "provenance", f"must be a mapping, got {prov!r:.80}")
        if prov.get("guidance") is not None:             # the runtime applies it by default
            try:
                guidance_per_scale(prov["guidance"], n)
            except GuidanceError as exc:
                raise _fail(src, "provenance.guidance", f"is not a guidance setting of this {n}-scale model: {exc}") from None
        return cls(binding, points, default, dict(prov), SCHEMA_VERSION, src)


def _point_from_dict(d: Any, n: int, depth: int, src: str, path: str) -> OperatingPoint:
    d = _check_keys(d, ["stages", "plans", "measured"], ["plans"], src, path)
    plans_raw = d["plans"]
    if not isinstance(plans_raw, list):
        raise _fail(src, f"{path}.plans", f"must be a list with one plan per scale ({n}), got {type(plans_raw).__name__}")
    if len(plans_raw) != n:
        raise _fail(src, f"{path}.plans", f"has {len(plans_raw)} entries but the model has {n} scales; give one plan per scale")
    plans = []
    for i, pr in enumerate(plans_raw):
        p = ScalePlan.from_dict(pr, src, f"{path}.plans[{i}]")
        if p.scale != i:
            raise _fail(src, f"{path}.plans[{i}].scale", f"is {p.scale} but plans must be listed in scale order (expected {i})")
        if p.layers is not None and p.layers[1] > depth:
            raise _fail(src, f"{path}.plans[{i}].layers", f"is {list(p.layers)} but the model has {depth} layers (stop <= {depth})")
        if p.is_subset and i == 0:
            raise _fail(src, f"{path}.plans[0].keep", "must be 1.0: scale 0 has no previous scale to restore tokens from")
        plans.append(p)
    dropped = False
    skipped = False
    for p in plans:
        if dropped and p.guidance == "cfg" and not p.skip:
            raise _fail(src, f"{path}.plans[{p.scale}].guidance",
                        "is 'cfg' after an earlier scale dropped guidance (cond_only); once dropped, the unconditional "
                        "branch has no KV cache for later scales. Make every scale after the first cond_only scale cond_only.")
        if skipped and not p.skip:
            raise _fail(src, f"{path}.plans[{p.scale}].skip",
                        "is false after an earlier scale was skipped; skipped scales must be the last ones")
        dropped |= p.guidance == "cond_only"
        skipped |= p.skip
    stages = _stages_from_dict(d.get("stages"), n, src, f"{path}.stages") if d.get("stages") is not None else \
        default_stages(n, next((p.scale for p in plans if not p.is_identity), n))
    ref_a = stages["refinement"][0]
    for p in plans:
        if not p.is_identity and p.scale < ref_a:
            raise _fail(src, f"{path}.plans[{p.scale}]",
                        f"accelerates scale {p.scale}, which is in the {_stage_of(stages, p.scale)} stage; only refinement "
                        f"scales ({ref_a}..{n - 1}) may be accelerated. Move the stage boundary or reset this plan.")
    measured = d.get("measured", {}) or {}
    if not isinstance(measured, Mapping):
        raise _fail(src, f"{path}.measured", f"must be a mapping, got {measured!r:.80}")
    return OperatingPoint(stages, tuple(plans), dict(measured))


def stage_ranges(stages: Mapping[str, Any]) -> dict[str, list[int] | None]:
    """Stage ranges as a file writes them: ``[first, last]``, and null for an empty stage (or one
    given as None); other keys (a calibration record's ``rule``, ``evidence``) are left out.

    >>> stage_ranges({"semantic": (0, 5), "structure": (6, 5), "refinement": [6, 9], "rule": "..."})
    {'semantic': [0, 5], 'structure': None, 'refinement': [6, 9]}
    """
    return {k: (list(v) if v is not None and v[1] >= v[0] else None)
            for k, v in stages.items() if k in ("semantic", "structure", "refinement")}


def _stage_of(stages: dict[str, tuple[int, int]], k: int) -> str:
    for name, (a, b) in stages.items():
        if a <= k <= b:
            return name
    return "unknown"


def _stages_from_dict(d: Any, n: int, src: str, path: str) -> dict[str, tuple[int, int]]:
    d = _check_keys(d, STAGES, STAGES, src, path)
    out = {}
    expected_start = 0
    for name in STAGES:
        v = d[name]
        if v is None:                                      # an empty stage
            out[name] = (expected_start, expected_start - 1)
            continue
        if not isinstance(v, list) or len(v) != 2:
            raise _fail(src, f"{path}.{name}", f"must be [first_scale, last_scale] (inclusive) or null (empty), got {v!r}")
        a = _int(v[0], src, f"{path}.{name}[0]", lo=0, hi=n)
        b = _int(v[1], src, f"{path}.{name}[1]", lo=-1, hi=n - 1)
        if a != expected_start:
            raise _fail(src, f"{path}.{name}", f"starts at scale {a}, expected {expected_start}: stages must be contiguous "
                        "and cover every scale in the order semantic, structure, refinement")
        if b < a:
            raise _fail(src, f"{path}.{name}", f"is {v}: last scale before first (an empty stage is null)")
        out[name] = (a, b)
        expected_start = b + 1
    if expected_start != n:
        raise _fail(src, f"{path}.refinement", f"ends at scale {expected_start - 1}, but the model's last scale is {n - 1}")
    return out


def default_stages(n: int, first_refinement: int) -> dict[str, tuple[int, int]]:
    """Stage boundaries when a file gives none: everything before the first accelerated scale is
    split evenly into semantic and structure; refinement starts at the first accelerated scale."""
    first_refinement = max(0, min(n, first_refinement))
    mid = first_refinement // 2
    return {"semantic": (0, mid - 1), "structure": (mid, first_refinement - 1), "refinement": (first_refinement, n - 1)}


# ------------------------------------------------------------------------------------- migration
# version -> function upgrading a dict of that version to version+1. Version 1 is the first.
def _v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
    """Version 1 wrote an empty stage as ``[a, a-1]``; version 2 writes null."""
    for point in (d.get("operating_points") or {}).values():
        stages = point.get("stages") if isinstance(point, Mapping) else None
        if isinstance(stages, Mapping):
            for name, v in stages.items():
                if isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v) and v[1] == v[0] - 1:
                    stages[name] = None
    return d


MIGRATIONS: dict[int, Any] = {1: _v1_to_v2}


def migrate(d: dict[str, Any], version: int) -> dict[str, Any]:
    while version < SCHEMA_VERSION:
        d = MIGRATIONS[version](d)
        version += 1
    d["schema_version"] = SCHEMA_VERSION
    return d


# ------------------------------------------------------------------------------------- io
def load_policy(path: str | os.PathLike) -> Policy:
    """Read and validate a policy file.

    >>> from stagevar import load_model                      # doctest: +SKIP
    >>> policy = load_policy("policies/infinity-mini.128.2x-3x-4x.yaml")  # doctest: +SKIP
    """
    p = Path(path)
    src = str(p)
    if not p.is_file():
        raise PolicyError(f"{src}: policy file not found. Give the path of a .yaml policy (shipped ones are in policies/).")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PolicyError(f"{src}: not a text file (not UTF-8). A policy is a YAML file written by stagevar-calibrate.") from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise PolicyError(f"{src}: invalid YAML at line {line}: {exc.reason} (character {exc.character!r}). "
                          "A policy is a plain-text YAML file.") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise PolicyError(f"{src}: invalid YAML{where}: {getattr(exc, 'problem', exc)}. Fix the syntax and retry.") from None
    if data is None:
        raise PolicyError(f"{src}: the file is empty. A policy needs schema_version, model and operating_points.")
    return Policy.from_dict(data, src)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def binding_for(adapter) -> ModelBinding:
    fp = adapter.fingerprint()
    return ModelBinding(fp.model, fp.arch_hash, adapter.resolution, tuple(fp.scale_schedule), adapter.num_layers)


def base_provenance(**extra: Any) -> dict[str, Any]:
    from stagevar.version import __version__
    d = {"tool": "stagevar", "tool_version": __version__,
         "created": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()}
    d.update(extra)
    return d


def predicted_work_skipped(policy_point: OperatingPoint, schedule, depth: int, guided: bool = True) -> float:
    """Share of the transformer's token-layer work a point skips, counting tokens x layers x rows
    (a first-order proxy of compute; attention's quadratic part is ignored)."""
    total = done = 0.0
    for p, (t, h, w) in zip(policy_point.plans, schedule):
        m = t * h * w
        rows_full = 2 if guided else 1
        total += m * depth * rows_full
        if p.skip:
            continue
        rows = 1 if p.guidance == "cond_only" else rows_full
        if p.is_subset:
            r = p.layer_range(depth)
            n = p.num_kept(m)
            done += rows * (m * (depth - len(r)) + n * len(r))
        else:
            done += rows * m * depth
    return 1.0 - done / total if total else 0.0
