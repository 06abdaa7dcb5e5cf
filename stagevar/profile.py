"""``stagevar profile``: where one generation's time goes, per scale and outside the scales.

For a model (and optionally a policy's operating point) on one engine: wall time and, on CUDA,
device time (CUDA events) per scale; the aten ops dispatched per scale (and how many of them launch
a kernel: views and allocations do not); the host synchronisations (ops that wait for the device:
``.item()`` / ``_local_scalar_dense``, ``nonzero``, ``multinomial``'s checks, a copy to the host; on
CUDA also every synchronisation the driver reports through ``torch.cuda.set_sync_debug_mode``).
The first generation (warm-up; with the ``graphs`` engine also the capture) is reported on its
own: a user waits for it.

Ops are counted with a :class:`~torch.utils._python_dispatch.TorchDispatchMode` around one
generation, so a small machine can count the host-side cost of a large model: ``--narrow WIDTH``
builds the model's exact structure (depth, heads, schedule) at a small width. On the ``graphs``
engine a replayed scale dispatches no op at all.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from stagevar.errors import StageVarError
from stagevar.guidance import GUIDANCE_HELP, guidance_argument

#: ops that make the host wait for the device (on a GPU) whenever they run
SYNC_OPS = frozenset({"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select",
                      "aten::multinomial", "aten::unique", "aten::_unique", "aten::_unique2", "aten::unique_dim",
                      "aten::unique_consecutive", "aten::equal", "aten::is_nonzero", "aten::allclose",
                      "aten::repeat_interleave", "aten::bincount", "aten::histc", "aten::masked_scatter",
                      "aten::nonzero_static"})
#: ops that launch no kernel (allocation, metadata)
NO_KERNEL_OPS = frozenset({"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::detach", "aten::lift_fresh",
                           "aten::set_", "aten::resize_", "aten::alias", "aten::_unsafe_view", "aten::view",
                           "aten::sym_size", "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset"})

EPILOG = textwrap.dedent("""\
    examples:
      stagevar profile                                              # infinity-mini, the default engine
      stagevar profile --engine eager --json
      stagevar profile --policy policies/infinity-mini.128.2x-3x-4x.yaml --operating-point 3x
      stagevar profile --model infinity-2b --random-weights --narrow 64 --engine static --json
      stagevar profile --model infinity-2b --random-weights --device cuda --dtype bfloat16 --engine graphs
    --json prints {"engine", "ops_per_image", "host_syncs_per_image", "seconds_per_image", "per_scale": [...]}.""")


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops into the current bucket (``counter.bucket = name``)."""

    def __init__(self):
        super().__init__()
        self.bucket = "outside"
        self.counts: dict[str, dict[str, int]] = {}

    def _add(self, key: str, n: int = 1) -> None:
        b = self.counts.setdefault(self.bucket, {"ops": 0, "launching_ops": 0, "host_syncs": 0})
        b[key] += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self._add("ops")
        if not (name in NO_KERNEL_OPS or getattr(func, "is_view", False)):
            self._add("launching_ops")
        if name in SYNC_OPS or (name in ("aten::_to_copy", "aten::copy_") and _to_host(func, args, kwargs or {})):
            self._add("host_syncs")
        return func(*args, **(kwargs or {}))


def _to_host(func, args, kwargs) -> bool:
    """A copy from a device tensor to host memory (``.cpu()``, ``.to("cpu")``)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if func._schema.name == "aten::_to_copy":
        dev = kwargs.get("device")
        return bool(tensors) and tensors[0].device.type != "cpu" and dev is not None and torch.device(dev).type == "cpu"
    return len(tensors) >= 2 and tensors[0].device.type == "cpu" and tensors[1].device.type != "cpu"


def count_ops(runtime, condition, guidance, seed: int) -> tuple[dict[str, dict[str, int]], int, Any]:
    """Ops per scale (and ``outside``) of one generation, the synchronisations the CUDA driver
    reported (0 off CUDA), and the generation's result."""
    counter = OpCounter()
    step = runtime._step

    def counted_step(state, k, *args, **kwargs):
        counter.bucket = k
        try:
            return step(state, k, *args, **kwargs)
        finally:
            counter.bucket = "outside"

    runtime._step = counted_step
    cuda = runtime.adapter.device.type == "cuda"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                with counter:
                    result = runtime.generate(condition=condition, guidance=guidance, seed=seed)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
    finally:
        del runtime._step
    driver_syncs = sum(1 for w in caught if "synchroniz" in str(w.message).lower())
    return counter.counts, driver_syncs, result


def profile(runtime, condition, guidance, seed: int = 0, repeats: int = 3) -> dict[str, Any]:
    """Warm-up (first image), one counted generation, ``repeats`` timed ones (medians). With
    ``repeats=0`` only the counted generation runs (no times: a large model on a small machine)."""
    import time
    ad = runtime.adapter
    first_s = None
    if repeats:
        t0 = time.perf_counter()
        runtime.generate(condition=condition, guidance=guidance, seed=seed)
        if ad.device.type == "cuda":
            torch.cuda.synchronize(ad.device)
        first_s = time.perf_counter() - t0
    counts, driver_syncs, counted = count_ops(runtime, condition, guidance, seed)
    timed = [runtime.generate(condition=condition, guidance=guidance, seed=seed) for _ in range(repeats)]
    batch = counted.images.shape[0]
    device_times = runtime.synchronize and ad.device.type == "cuda"
    per_scale = []
    for i, rec in enumerate(counted.records):
        c = counts.get(rec.scale, {"ops": 0, "launching_ops": 0, "host_syncs": 0})
        per_scale.append({"scale": rec.scale, "rows": rec.rows, "tokens": rec.tokens, "computed_tokens": rec.computed_tokens,
                          "wall_s": statistics.median(r.records[i].wall_seconds for r in timed) if timed else None,
                          "device_s": statistics.median(r.records[i].seconds for r in timed) if timed and device_times else None,
                          **c})
    total = {k: sum(c[k] for c in counts.values()) for k in ("ops", "launching_ops", "host_syncs")}
    outside = counts.get("outside", {"ops": 0, "launching_ops": 0, "host_syncs": 0})
    seconds = statistics.median(r.seconds for r in timed) if timed else None
    return {"engine": runtime.engine, "batch_size": batch,
            "ops_per_image": total["ops"] / batch, "launching_ops_per_image": total["launching_ops"] / batch,
            "host_syncs_per_image": (total["host_syncs"] + driver_syncs) / batch,
            "driver_reported_syncs": driver_syncs,
            "seconds_per_image": None if seconds is None else seconds / batch, "seconds_per_generation": seconds,
            "first_generation_s": first_s, "repeats": repeats,
            "outside_scales": {**outside, "wall_s": None if seconds is None else seconds - sum(r["wall_s"] for r in per_scale)},
            "per_scale": per_scale}


# ----------------------------------------------------------------------------------------- command
def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``profile`` on the ``stagevar`` command's sub-parsers."""
    p = subparsers.add_parser("profile", help="ops, host syncs and time of one generation, per scale",
                              description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=EPILOG)
    _add_arguments(p)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from stagevar.models.catalog import DEFAULT_MODEL
    from stagevar.engine import ENGINES
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model (default {DEFAULT_MODEL})")
    p.add_argument("--weights", type=Path, help="weights directory (default $STAGEVAR_WEIGHTS; embedded models need none)")
    p.add_argument("--random-weights", action="store_true", help="seeded random weights (speed only)")
    p.add_argument("--narrow", type=int, metavar="WIDTH",
                   help="the model's exact structure at this width (with --random-weights): count a large model's "
                        "host-side costs on a small machine")
    p.add_argument("--policy", type=Path, help="policy to apply (default: none, the full model)")
    p.add_argument("--operating-point", help="operating point of the policy (default: the policy's default)")
    p.add_argument("--engine", choices=[*ENGINES, "auto"], default="auto",
                   help="eager, static, graphs (CUDA) or auto: the fastest the device runs (default auto)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype (default float32)")
    p.add_argument("--batch-size", type=int, default=1, help="images per generation (default 1)")
    p.add_argument("--prompt", default="a red circle", help="prompt (class id for var-*; default 'a red circle')")
    p.add_argument("--guidance", type=guidance_argument, help=GUIDANCE_HELP)
    p.add_argument("--repeats", type=int, default=3,
                   help="timed generations after the warm-up and the counted one (default 3; 0: count only, no times)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _ms(v) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"


def _table(res: dict[str, Any]) -> str:
    timed = "" if res["seconds_per_image"] is None else (
        f"{res['seconds_per_image']:.4f} s/image (first generation {res['first_generation_s']:.3f} s), ")
    lines = [f"engine {res['engine']}, batch {res['batch_size']}: {timed}{res['ops_per_image']:.0f} ops/image "
             f"({res['launching_ops_per_image']:.0f} launching), {res['host_syncs_per_image']:.0f} host syncs/image",
             "", "| scale | rows | tokens | computed | wall ms | device ms | ops | launching | host syncs |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["per_scale"]:
        lines.append(f"| {r['scale']} | {r['rows']} | {r['tokens']} | {r['computed_tokens']} | {_ms(r['wall_s'])} | "
                     f"{_ms(r['device_s'])} | {r['ops']} | {r['launching_ops']} | {r['host_syncs']} |")
    o = res["outside_scales"]
    lines.append(f"| outside | | | | {_ms(o['wall_s'])} | | {o['ops']} | {o['launching_ops']} | {o['host_syncs']} |")
    return "\n".join(lines)


def cmd_profile(args) -> int:
    from stagevar.models.registry import load_model
    from stagevar.policy import load_policy
    from stagevar.runtime import Runtime
    if args.batch_size < 1 or args.repeats < 0:
        raise StageVarError(f"--batch-size must be >= 1 and --repeats >= 0, got {args.batch_size} and {args.repeats}.")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = load_model(args.model, args.weights, device=args.device, dtype=dtype, random_weights=args.random_weights,
                       narrow=args.narrow)
    policy = load_policy(args.policy) if args.policy else None
    runtime = Runtime(model, policy, args.operating_point, engine=args.engine, synchronize=True)
    condition = model.encode_prompts([args.prompt] * args.batch_size)
    guidance = args.guidance if args.guidance is not None else None
    if guidance is None:
        guidance = model.default_guidance if runtime.calibrated_guidance is None else runtime.calibrated_guidance
    res = profile(runtime, condition, guidance, seed=0, repeats=args.repeats)
    res.update(model=args.model, narrow=args.narrow, device=str(model.device), dtype=args.dtype,
               policy=str(args.policy) if args.policy else None, operating_point=args.operating_point)
    if args.json:
        print(json.dumps(res))
    else:
        print(_table(res))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python3 -m stagevar.profile``: the same command without the ``stagevar`` entry point."""
    from stagevar.errors import run_command
    parser = argparse.ArgumentParser(prog="python3 -m stagevar.profile", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    _add_arguments(parser)
    return run_command(cmd_profile, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
