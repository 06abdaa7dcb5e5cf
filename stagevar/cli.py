"""The ``stagevar`` command: generate images, validate / inspect policies, check reference tensors.

Exit codes: 0 ok, 1 error (one paragraph on stderr; ``--debug`` shows the traceback), 2 usage.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import textwrap
from pathlib import Path

from stagevar.engine import ENGINE_HELP, ENGINES
from stagevar.errors import StageVarError, run_command
from stagevar.guidance import GUIDANCE_HELP, guidance_argument
from stagevar.profile import add_profile_parser, cmd_profile

log = logging.getLogger("stagevar")

EPILOG_MAIN = """\
examples:
  stagevar generate --prompt "two green squares" --seed 0 --out a.png
  stagevar generate --prompt "a red circle left of a blue square" --policy policies/infinity-mini.128.2x-3x-4x.yaml --operating-point 3x --out out/
  stagevar inspect policies/infinity-mini.128.2x-3x-4x.yaml
  stagevar validate my_policy.yaml --model infinity-mini
  stagevar check-reference ../shared/reference
  stagevar profile --engine static --json
  stagevar list-models
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: exit 2 with a one-line hint
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def _fmt(text: str) -> str:
    return textwrap.dedent(text)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="stagevar", description="Stage-aware acceleration of next-scale (VAR / Infinity) image generators.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_MAIN)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_generate(sub)
    _add_policy_commands(sub)
    _add_reference_and_evaluate(sub)
    sub.add_parser("bench", help="moved: stagevar-calibrate bench", add_help=False)
    add_profile_parser(sub)
    return p


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="generate images from prompts (optionally accelerated by a policy)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_fmt("""\
        examples:
          stagevar generate --prompt "two green squares" --seed 0 --out a.png
          stagevar generate --prompt "a red circle" --prompt "three blue triangles" --out out/
          stagevar generate --prompts prompts.txt --policy policies/infinity-mini.128.2x-3x-4x.yaml --operating-point 2x --out out/
          stagevar generate --model infinity-2b --weights ~/weights --prompt "a cat" --out cat.png --device cuda --dtype bfloat16
        With one prompt and an --out ending in .png, that file is written; otherwise --out is a
        directory and files are named NNN_<prompt>.png. Prompts for class-conditional models
        (var-*) are ImageNet class ids or names."""))
    _model_args(g)
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    g.add_argument("--prompts", type=Path, help="text file with one prompt per line")
    g.add_argument("--policy", type=Path, help="policy YAML to apply (default: none, the unaccelerated model)")
    g.add_argument("--operating-point", help="operating point of the policy (default: the policy's default)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--batch-size", type=int, default=8, help="images generated per batch (default 8)")
    g.add_argument("--guidance", type=guidance_argument,
                   help=GUIDANCE_HELP[:-1] + "; with --policy, the guidance the policy was calibrated with)")
    g.add_argument("--out", type=Path, default=Path("out"), help="output .png file (one prompt) or directory (default out/)")
    _engine_arg(g)


def _add_policy_commands(sub) -> None:
    v = sub.add_parser("validate", help="check a policy file (schema, values; with --model, that it fits the model)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_fmt("""\
        examples:
          stagevar validate policies/infinity-mini.128.2x-3x-4x.yaml
          stagevar validate my_policy.yaml --model infinity-mini
        Exit 0 when valid; 1 with a one-paragraph message naming the file, field and value."""))
    v.add_argument("policy", type=Path, help="policy YAML file")
    v.add_argument("--model", help="also check the policy against this registered model")
    v.add_argument("--weights", type=Path, help="weights directory for --model")

    i = sub.add_parser("inspect", help="human summary of a policy: stages, per-scale plans, work skipped, provenance",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_fmt("""\
        examples:
          stagevar inspect policies/infinity-mini.128.2x-3x-4x.yaml
          stagevar inspect policies/infinity-2b.1024.paper.yaml --operating-point paper"""))
    i.add_argument("policy", type=Path, help="policy YAML file")
    i.add_argument("--operating-point", help="only this operating point")

    lm = sub.add_parser("list-models", help="list registered models",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="example:\n  stagevar list-models\n")
    lm.add_argument("--json", action="store_true", help="machine-readable output")


def _add_reference_and_evaluate(sub) -> None:
    c = sub.add_parser("check-reference", help="compare the models with tensors dumped from upstream code",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_fmt("""\
        examples:
          stagevar check-reference ../shared/reference
          stagevar check-reference my_dump/ --family infinity
        DIR holds infinity/golden/ and/or var/golden/ (each with golden_meta.json). Prints max abs /
        rel error per tensor in order: teacher-forced logits, forced-token inference, greedy
        tokens, latent, image. Exit 1 if any tensor is above tolerance."""))
    c.add_argument("directory", type=Path, help="reference directory")
    c.add_argument("--family", choices=["infinity", "var"], help="check only this family")
    c.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2, as the reference run)")
    _engine_arg(c, "the runtime rows")

    e = sub.add_parser("evaluate", help="score images with the embedded evaluator (GenEval-like, per category)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_fmt("""\
        examples:
          stagevar evaluate                                  # held-out split, 4 seeds per prompt
          stagevar evaluate --policy policies/infinity-mini.128.2x-3x-4x.yaml --operating-point 3x --limit 60 --seeds 2
          stagevar evaluate --images out/ --prompts prompts.jsonl
        Without --images, generates the held-out split with the embedded model and scores it."""))
    _model_args(e)
    e.add_argument("--images", type=Path, help="directory of PNG images to score instead of generating")
    e.add_argument("--prompts", type=Path, help="with --images: prompts file (one per line in file order, or JSONL {file, prompt})")
    e.add_argument("--policy", type=Path, help="policy to apply while generating")
    e.add_argument("--operating-point", help="operating point of the policy")
    e.add_argument("--split", default="heldout", choices=["heldout", "calibration", "train"], help="prompt split (default heldout)")
    e.add_argument("--limit", type=int, help="use only the first N prompts of the split")
    e.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default 4)")
    e.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    e.add_argument("--json", action="store_true", help="print the scores as JSON")
    _engine_arg(e)


def _engine_arg(p: argparse.ArgumentParser, what: str = "generation") -> None:
    p.add_argument("--engine", choices=[*ENGINES, "auto"], default="auto", help=f"how {what} runs: " + ENGINE_HELP)


def _model_args(p: argparse.ArgumentParser) -> None:
    from stagevar.models.registry import add_model_arguments
    add_model_arguments(p, "seeded random weights at full size (speed tests only)")


def _load_model(args):
    from stagevar.models.registry import load_model_from_args
    log.info("loading model %s", args.model)
    return load_model_from_args(args)


# ----------------------------------------------------------------------------------------- commands
def _read_prompts(args) -> list[str]:
    from stagevar.io import read_prompt_file
    prompts = list(args.prompt)
    if args.prompts is not None:
        prompts += read_prompt_file(args.prompts)
    if not prompts:
        raise StageVarError("no prompt given: use --prompt TEXT (repeatable) or --prompts FILE.")
    return prompts


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:48] or "image"


def cmd_generate(args) -> int:
    import torch
    from stagevar.guidance import guidance_per_scale
    from stagevar.io import save_png
    from stagevar.policy import load_policy
    from stagevar.runtime import Runtime

    prompts = _read_prompts(args)
    if args.batch_size < 1:
        raise StageVarError(f"--batch-size must be >= 1, got {args.batch_size}.")
    policy = load_policy(args.policy) if args.policy else None
    if args.operating_point and policy is None:
        raise StageVarError("--operating-point needs --policy.")
    model = _load_model(args)
    if policy is not None:
        policy.check_compatible(model)
        policy.operating_point(args.operating_point)
    single = len(prompts) == 1 and args.out.suffix.lower() == ".png"
    if not single and args.out.suffix.lower() == ".png":
        raise StageVarError(f"--out {args.out} names one .png file but {len(prompts)} prompts were given: give a "
                            "directory for several images.")
    if not single and args.out.exists() and not args.out.is_dir():
        raise StageVarError(f"--out {args.out} exists and is not a directory: give a directory for the images.")
    model.encode_prompts(prompts)      # every prompt checked before an image is written (the error names the bad one)
    if args.guidance is not None:
        guidance_per_scale(args.guidance, len(model.scale_schedule))          # a list of the wrong length: named here
    runtime = Runtime(model, policy, args.operating_point, engine=args.engine)
    if not single:
        args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        res = runtime.generate(chunk, seed=args.seed + start, guidance=args.guidance)
        imgs = (res.images.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for j, (prompt, img) in enumerate(zip(chunk, imgs)):
            path = args.out if single else args.out / f"{start + j:03d}_{_slug(prompt)}.png"
            save_png(path, img)
            written.append(path)
        log.info("batch of %d in %.2fs", len(chunk), res.seconds)
    for w in written:
        print(w)
    return 0


def cmd_validate(args) -> int:
    from stagevar.policy import load_policy
    policy = load_policy(args.policy)
    if args.model:
        from stagevar.models.registry import load_model
        model = load_model(args.model, args.weights)
        policy.check_compatible(model)
    pts = ", ".join(f"{k}{' (default)' if k == policy.default else ''}" for k in policy.operating_points)
    print(f"{args.policy}: valid (schema {policy.schema_version}, model {policy.model.name}, operating points: {pts})")
    return 0


def cmd_inspect(args) -> int:
    from stagevar.policy import load_policy, predicted_work_skipped, stage_ranges
    policy = load_policy(args.policy)
    m = policy.model
    print(f"policy   {args.policy}")
    print(f"model    {m.name} (arch {m.arch_hash}, resolution {m.resolution or '?'}, {m.num_layers} layers, {len(m.scale_schedule)} scales)")
    names = [args.operating_point] if args.operating_point else list(policy.operating_points)
    for name in names:
        pt = policy.operating_point(name)
        print()
        print(f"operating point {name}{'  (default)' if name == policy.default else ''}")
        st = pt.stages
        print("  stages: " + ", ".join(f"{k} {a}-{b}" if b >= a else f"{k} (none)" for k, (a, b) in st.items()))
        found = (policy.provenance or {}).get("measured_stages")
        if isinstance(found, dict) and found != stage_ranges(st):
            print("  (the plan's stages; the calibration measured " + ", ".join(
                f"{k} {v[0]}-{v[1]}" if v else f"{k} (none)" for k, v in found.items()) + ")")
        skipped = predicted_work_skipped(pt, m.scale_schedule, m.num_layers)
        print(f"  predicted share of transformer token-layer work skipped: {skipped:.1%}")
        print(f"  {'scale':>5} {'h x w':>9} {'tokens':>7} {'stage':<11} {'guidance':<9} {'computed':>9} {'selection':<18} {'restore':<14} layers")
        for p, (t, h, w) in zip(pt.plans, m.scale_schedule):
            tok = t * h * w
            stage = next((k for k, (a, b) in st.items() if a <= p.scale <= b), "?")
            if p.skip:
                print(f"  {p.scale:>5} {f'{h}x{w}':>9} {tok:>7} {stage:<11} {'-':<9} {'skipped':>9}")
                continue
            comp = f"{p.num_kept(tok)}" if p.is_subset else "all"
            sel = p.selection if p.is_subset else "-"
            res = p.restore if p.is_subset else "-"
            lay = (f"{p.layer_range(m.num_layers).start}-{p.layer_range(m.num_layers).stop - 1}" if p.is_subset else "-")
            print(f"  {p.scale:>5} {f'{h}x{w}':>9} {tok:>7} {stage:<11} {p.guidance:<9} {comp:>9} {sel:<18} {res:<14} {lay}")
        if pt.measured:
            print("  measured: " + ", ".join(f"{k}={v}" for k, v in pt.measured.items()))
    if policy.provenance:
        print()
        print("provenance")
        for k, v in policy.provenance.items():
            print(f"  {k}: {v}")
    return 0


def cmd_list_models(args) -> int:
    from stagevar.models.registry import list_models, model_entry
    rows = [model_entry(n) for n in list_models()]
    if args.json:
        import json
        print(json.dumps([{"name": r.name, "family": r.family, "needs_weights": r.needs_weights, "description": r.description} for r in rows], indent=1))
        return 0
    w = max(len(r.name) for r in rows)
    for r in rows:
        print(f"{r.name:<{w}}  {r.family:<9} {'weights needed' if r.needs_weights else 'no weights   '}  {r.description}")
    return 0


def cmd_check_reference(args) -> int:
    import torch
    from stagevar.reference import check_directory
    torch.set_num_threads(args.threads)
    rows = check_directory(args.directory, family=args.family, engine=args.engine)
    print(f"{'family':<9} {'stage':<22} {'tensor':<26} {'max abs':>11} {'max rel':>11} {'tol':>9}  result")
    for r in rows:
        print(f"{r.family:<9} {r.stage:<22} {r.tensor:<26} {r.max_abs:>11.3g} {r.max_rel:>11.3g} {r.tolerance:>9.2g}  "
              f"{'ok' if r.passed else 'FAIL'}{('  ' + r.note) if r.note and not r.passed else ''}")
    failed = [r for r in rows if not r.passed]
    print(f"{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_bench_moved(args) -> int:
    """``stagevar bench`` is ``stagevar-calibrate bench``: it scores quality with the calibration
    metrics, which the runtime does not depend on."""
    err = StageVarError("'stagevar bench' is now 'stagevar-calibrate bench' (same arguments): benchmarking scores "
                        "quality with the calibration metrics, which the runtime package does not depend on. Run "
                        "stagevar-calibrate bench " + " ".join(args.rest) + " (installed with pip install -e "
                        "'.[calibrate]').")
    err.exit_code = 2
    raise err


def cmd_evaluate(args) -> int:
    from stagevar.toy.evaluate_cli import run_evaluate
    return run_evaluate(args)


COMMANDS = {"generate": cmd_generate, "validate": cmd_validate, "inspect": cmd_inspect, "list-models": cmd_list_models,
            "check-reference": cmd_check_reference, "evaluate": cmd_evaluate, "bench": cmd_bench_moved, "profile": cmd_profile}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    return run_command(COMMANDS[args.command], args)

if __name__ == "__main__":
    sys.exit(main())
