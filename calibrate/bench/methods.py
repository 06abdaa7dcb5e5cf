"""What the bench compares: the full model, every operating point of the searched policies, the
published baselines, each on every engine asked for; and the prompts it scores them on."""
from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from stagevar.errors import StageVarError
from stagevar.guidance import format_guidance, guidance_per_scale, same_guidance

log = logging.getLogger("stagevar.bench")


def progress(msg: str) -> None:
    """One line of progress on stderr (the table goes to stdout)."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Method:
    name: str
    kind: str                      # "full" | "policy" (a policy file's operating point) | "baseline"
    point: Any                     # OperatingPoint or None (full)
    source: str
    plan: str
    engine: str = ""
    base: str = ""                 # the method's name without the engine suffix
    file: str = ""                 # a policy's file
    point_name: str = ""           # ... and the operating point's name in it


def bench_engines(text: str, device) -> list[str]:
    """``--engine``: one or several engines, each checked against the device."""
    from stagevar.engine import resolve_engine
    names = [resolve_engine(e.strip(), device) for e in str(text).split(",") if e.strip()]
    if not names or len(set(names)) != len(names):
        raise StageVarError(f"--engine {text!r}: give one engine or several distinct ones (e.g. eager,static,graphs).")
    return names


def on_engines(methods: list[Method], engines: list[str]) -> list[Method]:
    """Every method on every engine (names suffixed ``@engine`` when there are several)."""
    return [dataclasses.replace(m, name=m.name if len(engines) == 1 else f"{m.name}@{e}", engine=e, base=m.name)
            for e in engines for m in methods]


def _default_policies_dirs(arg: Path | None) -> list[Path]:
    if arg is not None:
        return [arg]
    repo = Path(__file__).resolve().parents[2] / "policies"
    dirs = [Path("policies"), repo]
    out: list[Path] = []
    for d in dirs:
        if d.is_dir() and not any(d.resolve() == o.resolve() for o in out):
            out.append(d)
    return out


def discover_policies(model_name: str, dirs: Sequence[Path]) -> list[Path]:
    """Policy files in ``dirs`` whose ``model.name`` is ``model_name`` (unreadable files skipped)."""
    import yaml
    found = []
    for d in dirs:
        for f in sorted(Path(d).glob("*.yaml")) + sorted(Path(d).glob("*.yml")):
            try:
                data = yaml.safe_load(f.read_text(encoding="utf-8"))
                name = data["model"]["name"]
            except Exception:                       # noqa: BLE001 - a broken file is reported when loaded explicitly
                log.warning("skipping %s: not a readable policy", f)
                continue
            if name == model_name:
                found.append(f)
    return found


def baseline_names(args) -> list[str]:
    if args.baselines.strip().lower() in ("", "none"):
        return []
    return [b.strip() for b in args.baselines.split(",") if b.strip()]


def bench_guidance(adapter, args):
    """The guidance every method runs at: ``--guidance`` (checked against the model), else the model's."""
    if args.guidance is None:
        return adapter.default_guidance
    guidance_per_scale(args.guidance, len(adapter.scale_schedule))      # a wrong length: one clear error
    return args.guidance


class Guided:
    """A runtime that always generates at the bench's guidance."""

    def __init__(self, runtime, guidance):
        self.runtime, self.guidance = runtime, guidance

    def generate(self, **kwargs):
        return self.runtime.generate(guidance=self.guidance, **kwargs)

    def release(self) -> None:
        """Drop what the runtime holds between generations (captured CUDA graphs, their caches)."""
        import gc

        import torch
        if not self.runtime._captured:
            return
        self.runtime._captured.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def build_methods(adapter, args, guidance) -> list[Method]:
    """``guidance``: what every method runs at (:func:`bench_guidance`); policies calibrated at
    other guidance are noted."""
    from stagevar.baselines import BASELINE_SOURCES, build_baseline, describe
    from stagevar.policy import PolicyError, load_policy

    depth = adapter.num_layers
    model_name = adapter.fingerprint().model
    methods = [Method("full", "full", None, "the unaccelerated model", "identity")]
    explicit = bool(args.policy)
    files = list(args.policy) if explicit else discover_policies(model_name, _default_policies_dirs(args.policies_dir))
    against = getattr(args, "against", None)
    if against is not None and not any(_same_file(f, against) for f in files):
        files.append(against)
    for f in files:
        pol = load_policy(f)
        try:
            pol.check_compatible(adapter)
        except PolicyError as exc:
            if explicit or _same_file(f, against):
                raise
            progress(f"skipping {f}: {exc}")
            continue
        stem = Path(f).name.rsplit(".", 1)[0]
        src = str(f) + (" (not calibrated)" if pol.provenance.get("calibrated") is False else "")
        cal = pol.provenance.get("guidance")
        if cal is not None and not same_guidance(cal, guidance, len(adapter.scale_schedule)):
            progress(f"note: {f} was calibrated with guidance {format_guidance(cal)}, but the bench runs every method "
                      f"at guidance {format_guidance(guidance)}; its measured speedup and quality hold for the "
                      f"calibrated guidance (--guidance {format_guidance(cal)} benches it so)")
            src += f" (calibrated at guidance {format_guidance(cal)})"
        for pname, point in pol.operating_points.items():
            methods.append(Method(f"{stem}:{pname}", "policy", point, src, describe(point, depth), file=str(f),
                                  point_name=pname))
    for b in baseline_names(args):
        try:
            point = build_baseline(b, adapter, paper_keep=args.paper_keep)
        except ValueError as exc:
            raise StageVarError(f"baseline {b!r} does not apply to {model_name}: {exc}") from None
        methods.append(Method(b, "baseline", point, BASELINE_SOURCES[b], describe(point, depth)))
    for m in methods:                   # say when a policy file holds exactly a baseline's plans
        if m.kind == "policy":
            same = [b.name for b in methods if b.kind == "baseline" and b.point.plans == m.point.plans]
            if same:
                m.plan += f" (= {', '.join(same)})"
    seen = set()
    for m in methods:
        if m.name in seen:
            raise StageVarError(f"two methods are named {m.name!r}; give policy files distinct names.")
        seen.add(m.name)
    return methods


def _same_file(a, b) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def pairs_against(methods: list[Method], against) -> list[tuple[Method, Method]]:
    """``--against FILE``: (method, FILE's method) for every operating point of the other policy
    files that FILE has a point of the same name for (methods of the first engine); a clear error
    when there is none."""
    if against is None:
        return []
    first = methods[0].engine
    theirs = {m.point_name: m for m in methods if m.kind == "policy" and m.engine == first and _same_file(m.file, against)}
    pairs = [(m, theirs[m.point_name]) for m in methods if m.kind == "policy" and m.engine == first
             and not _same_file(m.file, against) and m.point_name in theirs]
    if not pairs:
        raise StageVarError(f"--against {against}: no other policy benched has an operating point named like one of "
                            f"its points ({', '.join(sorted(theirs))}); give the policy to compare with --policy FILE.")
    return pairs


def bench_prompts(adapter, n: int, draw: int = 0) -> list[dict[str, Any]]:
    """``n`` prompts: draw ``draw`` of the held-out split for text models, spread ImageNet class ids
    for class-conditional ones. Items ``{"prompt", "category"}``."""
    if getattr(adapter, "family", "") == "var":
        return [{"prompt": str((i * 97 + 1 + draw) % 1000), "category": "class"} for i in range(n)]
    from stagevar.toy.prompts import make_split
    return [{"prompt": it["prompt"], "category": it["spec"]["category"]} for it in make_split("heldout", n, seed=draw)]
