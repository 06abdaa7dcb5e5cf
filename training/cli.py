"""The ``stagevar-train`` command: train, or (instead) export, average, fine-tune the decoder of,
evaluate or sweep weights.

Exit codes: 0 ok, 1 error (one paragraph on stderr; ``--debug`` shows the traceback), 2 usage.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from stagevar.errors import StageVarError, run_command
from stagevar.guidance import GUIDANCE_HELP, guidance_argument

EPILOG = """\
examples:
  stagevar-train --config training/configs/mini.yaml --out runs/mini
  nohup stagevar-train --config training/configs/mini.yaml --out runs/mini > runs/mini.log 2>&1 &
  stagevar-train --config training/configs/mini.yaml --out runs/smoke --max-minutes 2
  stagevar-train --config training/configs/mini.yaml --init stagevar/toy/weights --out runs/gpu --device cuda \\
      --max-minutes 5 --workers 12 --set train.batch=64
  stagevar-train --sweep runs/mini/final --split calibration --n 48 --seeds 0
  stagevar-train --export runs/mini/ckpt.pt --out runs/mini/interim
  stagevar-train --finetune-decoder runs/mini/final 10 --out runs/mini/final_dec
  stagevar-train --average stagevar/toy/weights runs/ft/final 0.5 --out runs/avg
  stagevar-train --evaluate stagevar/toy/weights --split heldout --n 60 --seeds 0 1 2 3
  stagevar-train --evaluate stagevar/toy/weights-256 --n 60 --seeds 0 1 --from-scale 8
Re-running with the same --out resumes from OUT/ckpt.pt; the final weights are in OUT/final/."""


def build_parser(prog: str = "stagevar-train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train infinity-mini (BSQ VAE, then the Infinity transformer) on the toy scenes; "
                               "or evaluate / sweep the sampling settings of trained weights.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    p.add_argument("--config", help="YAML config (e.g. training/configs/mini.yaml)")
    p.add_argument("--out", help="run directory (checkpoint, log.jsonl, final/)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of the whole run (overrides the YAML)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="end the transformer phase after this many steps instead of the minutes (train.max_steps; "
                        "train.vae_steps does the same for the VAE phase)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--init", type=Path, metavar="WEIGHTS_DIR",
                   help="start from trained weights (same architecture) instead of from scratch; skips the VAE phase")
    p.add_argument("--workers", type=int, default=0,
                   help="processes rendering the training scenes (default 0: in the training process)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.batch=64 (repeatable; VALUE is YAML)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--export", metavar="CKPT",
                   help="write the weights of a run's checkpoint (e.g. one still training) to --out and exit")
    p.add_argument("--raw", action="store_true", help="with --export: the raw transformer weights instead of the EMA")
    p.add_argument("--finetune-decoder", nargs=2, metavar=("WEIGHTS_DIR", "MINUTES"),
                   help="train only the VAE decoder of trained weights (labels unchanged); writes --out")
    p.add_argument("--average", nargs=3, metavar=("FIRST", "SECOND", "ALPHA"),
                   help="average two weights directories of one architecture and VAE, (1 - ALPHA) * FIRST + "
                        "ALPHA * SECOND (transformer and text encoder); writes --out")
    g = p.add_argument_group("evaluation (instead of training)")
    g.add_argument("--evaluate", metavar="WEIGHTS_DIR", help="score weights with their default sampling settings")
    g.add_argument("--sweep", metavar="WEIGHTS_DIR", help="score weights over a grid of cfg / tau / top_k / top_p")
    g.add_argument("--split", default="heldout", help="prompt split (train, calibration, heldout)")
    g.add_argument("--n", type=int, default=60, help="prompts (categories round-robin)")
    g.add_argument("--split-seed", type=int, default=0,
                   help="which draw of the split (default 0; another seed gives other prompts of the same split)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="sampling seeds per prompt")
    g.add_argument("--from-scale", type=int, default=None, metavar="K",
                   help="with --evaluate: also judge the partial image after each scale from K on ('by_scale' in "
                        "the output; where it stops changing, the content the evaluator reads is settled)")
    g.add_argument("--cfg", type=guidance_argument, default=None, help=GUIDANCE_HELP)
    g.add_argument("--tau", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--json", help="append results (one JSON line each, with per-image outcomes in 'passed') to this file")
    return p


def apply_override(arch: dict[str, Any], item: str) -> None:
    """``--set train.batch=64``: replace one existing value of the config (VALUE parsed as YAML)."""
    import yaml
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise StageVarError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.batch=64")
    node, parts = arch, key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise StageVarError(f"--set {item!r}: the config has no section {part!r}")
        node = node[part]
    if parts[-1] not in node:
        raise StageVarError(f"--set {item!r}: the config has no key {key!r} (known in that section: "
                            f"{', '.join(sorted(node))})")
    node[parts[-1]] = yaml.safe_load(raw)


def _print(obj) -> int:
    print(json.dumps(obj), flush=True)
    return 0


def cmd_evaluate(a) -> int:
    """``--evaluate`` / ``--sweep``: the evaluator's scores, one JSON line per sampling setting."""
    from stagevar.toy.model import load_mini
    from training.evaluation import default_grid, evaluate_weights
    adapter = load_mini(a.evaluate or a.sweep, device=a.device)
    if a.evaluate:
        grid = [{k: v for k, v in (("cfg", a.cfg), ("tau", a.tau), ("top_k", a.top_k), ("top_p", a.top_p))
                 if v is not None}]
    else:
        grid = default_grid(len(adapter.scale_schedule))
    for sampling in grid:
        res = evaluate_weights(adapter, a.split, a.n, tuple(a.seeds), a.split_seed,
                               from_scale=a.from_scale, **sampling)
        res["weights"] = str(a.evaluate or a.sweep)
        print(json.dumps({k: v for k, v in res.items() if k != "passed"}), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(res) + "\n")
    return 0


def cmd_train(a) -> int:
    import yaml
    from training.loop import train
    path = Path(a.config)
    if not path.is_file():
        raise StageVarError(f"--config {path}: no such file (the shipped one is training/configs/mini.yaml)")
    arch = yaml.safe_load(path.read_text())
    for item in a.set:
        apply_override(arch, item)
    train(arch, Path(a.out), device=a.device, max_minutes=a.max_minutes, threads=a.threads, quiet=a.quiet,
          init=a.init, workers=a.workers, max_steps=a.max_steps)
    return 0


def main(argv: list[str] | None = None, prog: str = "stagevar-train") -> int:
    p = build_parser(prog)
    a = p.parse_args(argv)
    if a.device == "cpu":
        import torch
        torch.set_num_threads(a.threads)
    for flag, value in (("--export", a.export), ("--average", a.average), ("--finetune-decoder", a.finetune_decoder)):
        if value and not a.out:
            p.error(f"{flag} needs --out (a new weights directory)")
    if a.export:
        from training.weights import export_checkpoint
        return run_command(lambda a: _print(export_checkpoint(Path(a.export), Path(a.out), raw=a.raw)), a)
    if a.average:
        from training.weights import average_weights
        try:
            alpha = float(a.average[2])
        except ValueError:
            p.error(f"--average: ALPHA={a.average[2]!r} is not a number")
        return run_command(lambda a: _print(average_weights(Path(a.average[0]), Path(a.average[1]), alpha,
                                                            Path(a.out))), a)
    if a.finetune_decoder:
        from training.decoder import finetune_decoder
        return run_command(lambda a: _print(finetune_decoder(Path(a.finetune_decoder[0]), Path(a.out),
                                                             float(a.finetune_decoder[1]), device=a.device,
                                                             quiet=a.quiet)), a)
    if a.from_scale is not None and not a.evaluate:
        p.error("--from-scale goes with --evaluate (it judges the partial images of one sampling setting)")
    if a.evaluate or a.sweep:
        return run_command(cmd_evaluate, a)
    if not a.config or not a.out:
        p.error("--config and --out are required for training (or use --evaluate / --sweep)")
    return run_command(cmd_train, a, interrupted_hint="re-run the same command to resume from OUT/ckpt.pt")


if __name__ == "__main__":
    sys.exit(main())
