"""``stagevar-calibrate``: measure a model, search a policy under a latency budget, verify it on
held-out prompts and write the policy YAML.

    stagevar-calibrate --budget 3x                      # the embedded model, measure + search + verify
    stagevar-calibrate --model infinity-2b --weights W --budget 2x,3x,4x --device cuda --dtype bfloat16
    stagevar-calibrate measure --model infinity-mini    # only the calibration pass + report
    stagevar-calibrate bench                            # full model vs searched policies vs baselines

Exit codes: 0 ok; 1 error; 2 usage (including a malformed budget); 3 a budget could not be met
(a best-effort policy marked infeasible is still written, and the best speedup reached is named).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from calibrate.options import Parser, add_common_arguments, apply_model_defaults, add_search_images_argument, scorer_from_args, setup
from stagevar.errors import StageVarError, run_command

log = logging.getLogger("stagevar.calibrate")

EPILOG = """\
examples:
  stagevar-calibrate --budget 3x
  stagevar-calibrate --model infinity-mini --budget 2x,3x,4x --out runs/cal
  stagevar-calibrate --budget 700ms --trials 80
  stagevar-calibrate --model infinity-2b --weights ~/weights --budget 3x --device cuda --dtype bfloat16
  stagevar-calibrate --budget 3x --storage sqlite:///study.db           # any Optuna storage URL
  stagevar-calibrate --budget 2x,3x,4x --warm-start policies/infinity-mini.128.2x-3x-4x.yaml   # recalibrate
  stagevar-calibrate measure --model infinity-mini --out runs/cal       # calibration pass only
  stagevar-calibrate bench --out out/bench                              # latency, memory, quality side by side
A budget is a speedup over the full model (3x) or a latency per batch of --batch-size images
(700ms, 1.5s); several budgets (2x,3x,4x) give one policy file with one operating point each,
the first being the default. Killing the command and re-running it resumes: the calibration
record and the Optuna study live in --out. A model that is slow to generate sets smaller
defaults for the search (--trials, --num-heldout, ...): `--model NAME --help` shows its own.
"""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="stagevar-calibrate", description="Measure a VAR model and search a stage-aware acceleration policy under a latency budget.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    add_common_arguments(p)
    p.add_argument("--budget", required=True, help="speedup (3x) or latency per batch (700ms); comma-separated for several")
    p.add_argument("--trials", type=int, default=60,
                   help="sampler trials per budget, the enqueued seed policies included, in total across resumes and "
                        "workers (default %(default)s; several budgets share one study of --trials x budgets trials); the local "
                        "search's trials (--local-trials) come on top")
    p.add_argument("--storage", help="Optuna storage URL (default: a journal file in --out)")
    p.add_argument("--study", help="study name (default: derived from model, budget and calibration record)")
    p.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    p.add_argument("--heldout-prompts", type=Path, help="verification prompts (default: a bundled held-out set)")
    p.add_argument("--num-heldout", type=int, default=64,
                   help="bundled held-out prompts for verification, from a draw of the held-out split that "
                        "'stagevar-calibrate bench' and 'stagevar evaluate' do not score (default %(default)s; with 64, one image is "
                        "0.016 of a score)")
    p.add_argument("--report-prompts", type=Path, help="prompts the chosen point's numbers are measured on (default: a bundled "
                   "draw of the held-out split that neither the search nor the choice sees)")
    p.add_argument("--num-report", type=int, default=64,
                   help="bundled report prompts (default %(default)s; generated with the seeds + 1000; 0: write the numbers of the "
                        "selection set, which overstate the chosen point a little)")
    p.add_argument("--verify-candidates", type=int, default=5, help="best feasible trials re-measured end to end (default %(default)s)")
    p.add_argument("--verify-near", type=int, default=2,
                   help="also re-measure this many best trials predicted over the target but up to 10%% over the budget (the latency "
                        "model's error band); they are chosen only if their measured speedup meets the budget (default %(default)s)")
    p.add_argument("--verify-repeats", type=int, default=5,
                   help="timed rounds of the verification latency (full model and candidates interleaved; median; default %(default)s)")
    p.add_argument("--selection-images", type=int, default=128, metavar="N",     # = calibrate.verify.SELECTION_IMAGES
                   help="the candidates that the selection set cannot tell from the best one (within 2 standard errors) "
                        "are measured again on the same prompts with other seeds, a set at a time, until one is clearly "
                        "ahead or each was compared on N images; the choice is made on all of them (default %(default)s; "
                        "--num-heldout or less: choose on the selection set alone)")
    p.add_argument("--local-trials", type=int, default=30,
                   help="trials per budget of the local search after the sampler: neighbours (one keep notch, one "
                        "selection, one boundary moved) of the best trial, while they improve (default %(default)s; 0: none)")
    add_search_images_argument(p)
    p.add_argument("--latency-margin", type=float, default=0.05,            # = calibrate.search.LATENCY_MARGIN
                   help="the local search and the choice of candidates aim this fraction under the budget's latency, "
                        "so that a policy predicted just inside it still meets it when measured (default 0.05)")
    p.add_argument("--frontier", action="store_true", help="also report the quality / latency Pareto front of all trials")
    p.add_argument("--policy-out", type=Path, help="policy file (default policies/<model>.<resolution>.<budgets>.yaml)")
    p.add_argument("--warm-start", type=Path, metavar="POLICY",
                   help="also try the operating points of this earlier policy first (e.g. the shipped one, when "
                        "recalibrating after new weights or another guidance); points outside the search space are left out")
    p.add_argument("--json", action="store_true", help="print one machine-readable summary on stdout")
    return p


def build_measure_parser() -> argparse.ArgumentParser:
    p = Parser(prog="stagevar-calibrate measure", description="Run only the calibration pass and write its record and report.",
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="examples:\n  stagevar-calibrate measure\n  stagevar-calibrate measure --model infinity-mini --prompts my_prompts.txt --out runs/cal\n")
    add_common_arguments(p)
    return p


# ----------------------------------------------------------------------------------------- helpers
def cmd_measure(args) -> int:
    from calibrate.calibration import measure, record_dir
    from calibrate.report import write_report
    model, prompts, seeds = setup(args)
    scorer = scorer_from_args(args, model)
    t0 = time.time()
    rec = measure(model, prompts, seeds, out=args.out, batch_size=args.batch_size, guidance=args.guidance,
                  progress=not args.quiet, engine=args.engine, scorer=scorer)
    d = record_dir(args.out, rec.key)
    report = write_report(rec, d, metric_cost=scorer.metric_cost())
    st = rec.stages
    print(f"calibration record: {d / 'record.json'}")
    print(f"report:             {report}")
    b = st.get("evidence", {}).get("bootstrap")
    support = (f", the same in {b['support']:.0%} of {b['resamples']} resamples of its {b.get('prompts', b['images'])} "
               f"prompts ({b['images']} images)") if b else ""
    print(f"stages: semantic {st['semantic']}, structure {st['structure']}, refinement {st['refinement']}{support}  "
          f"({time.time() - t0:.0f}s)")
    return 0


def cmd_calibrate(args) -> int:
    from calibrate.pipeline import SearchSettings, calibrate
    from calibrate.prompts import bundled, read_prompt_file
    from calibrate.report import plus_minus
    from calibrate.budget import parse_budgets
    from calibrate.candidates import pareto_front
    from calibrate.storage import open_storage, redact
    from stagevar.policy import load_policy

    budgets = parse_budgets(args.budget)
    settings = SearchSettings(trials=args.trials, local_trials=args.local_trials, seed=args.seed,
                              search_images=args.search_images,
                              latency_margin=args.latency_margin, verify_candidates=args.verify_candidates,
                              verify_near=args.verify_near, verify_repeats=args.verify_repeats,
                              selection_images=args.selection_images, study=args.study)
    settings.check()
    if args.num_report < 0:
        raise StageVarError(f"--num-report must be >= 0, got {args.num_report}.")
    storage = open_storage(args.storage) if args.storage else None      # a bad URL fails before any work
    warm = load_policy(args.warm_start) if args.warm_start else None      # a bad file too
    model, prompts, seeds = setup(args)
    heldout = read_prompt_file(args.heldout_prompts) if args.heldout_prompts else bundled(args.model, "verification", args.num_heldout)
    model.encode_prompts(heldout)
    report_prompts = (read_prompt_file(args.report_prompts) if args.report_prompts
                      else bundled(args.model, "report", args.num_report) if args.num_report else [])
    if report_prompts:
        model.encode_prompts(report_prompts)
    scorer = scorer_from_args(args, model)
    result = calibrate(model, budgets, prompts, seeds, heldout=heldout, report_prompts=report_prompts, out=args.out,
                       batch_size=args.batch_size, guidance=args.guidance, scorer=scorer, engine=args.engine,
                       storage=storage, storage_label=redact(args.storage), warm_start=warm, settings=settings,
                       progress=not args.quiet)
    points, rdir, report, infeasible = result.policy.operating_points, result.record_dir, result.report, result.infeasible
    all_trials = result.trials
    out_path = args.policy_out or Path("policies") / f"{model.name}.{model.resolution}.{'-'.join(b.name for b in budgets)}.yaml"
    replaced = keep_replaced_policy(out_path, Path(args.out))
    result.policy.save(out_path)
    summary = {"policy": str(out_path), "report": str(report), "record": str(rdir / "record.json"),
               "seconds": round(result.seconds, 1), "metrics": scorer.describe(), **({"replaced_policy": str(replaced)} if replaced else {}),
               "operating_points": {k: {kk: v.measured.get(kk) for kk in ("feasible", "speedup", "latency_s", "baseline_latency_s",
                                                                          "quality", "quality_se", "score_full", "score", "score_drop",
                                                                          "score_drop_se", "trial")}
                                    for k, v in points.items()}}
    if args.frontier:
        front = pareto_front([(t["quality"], t["predicted_latency_s"], (t["budget"], t["number"])) for t in all_trials
                              if "predicted_latency_s" in t and not t.get("quality_estimated")])
        summary["frontier"] = [{"quality": q, "predicted_latency_s": lat, "study": b, "trial": n} for q, lat, (b, n) in front]
    if args.json:
        print(json.dumps(summary, default=float))
    else:
        print(f"policy: {out_path}" + (f" (the file it replaced is kept as {replaced})" if replaced else ""))
        print(f"report: {report}")
        for k, v in summary["operating_points"].items():
            print(f"  {k}: {'met' if v['feasible'] else 'NOT met'}; verified speedup {v['speedup']:.2f}x, quality {v['quality']:.3f}"
                  + plus_minus(v.get("quality_se"))
                  + (f", evaluator {v['score_full']:.3f} -> {v['score']:.3f} (drop {v['score_drop']:.3f}{plus_minus(v.get('score_drop_se'))})"
                     if v.get("score") is not None else ""))
        if not scorer.has_semantic_measure:
            print("  chosen WITHOUT a semantic measure (codes + SSIM only): see --metric in --help")
        if args.frontier:
            print("frontier (quality, predicted latency):")
            for f in summary["frontier"]:
                print(f"  {f['quality']:.3f}  {f['predicted_latency_s'] * 1000:.0f} ms  ({f['study']} study, trial {f['trial']})")
    if infeasible:
        msg = "; ".join(f"{b}: best verified speedup {s:.2f}x" for b, s in infeasible)
        print(f"budget not met ({msg}). The best-effort operating point is written and marked feasible: false.", file=sys.stderr)
        return 3
    return 0


def keep_replaced_policy(path: Path, out_dir: Path) -> Path | None:
    """Copy a policy file that is about to be replaced into the working directory ``out_dir``
    (``replaced-<name>-<time>.yaml``), so recalibrating over a shipped or hand-edited policy loses
    nothing. Returns the copy, or None when ``path`` does not exist yet."""
    path = Path(path)
    if not path.is_file():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    dest, n = out_dir / f"replaced-{path.stem}-{stamp}{path.suffix}", 1
    while dest.exists():
        dest, n = out_dir / f"replaced-{path.stem}-{stamp}-{n}{path.suffix}", n + 1
    from stagevar.io import atomic_write
    return atomic_write(dest, path.read_bytes().decode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = argv[0] if argv and not argv[0].startswith("-") else None
    if sub == "measure":
        parser, fn, rest = build_measure_parser(), cmd_measure, argv[1:]
    elif sub == "bench":
        from calibrate.bench.cli import build_parser as build_bench_parser, cmd_bench
        parser, fn, rest = build_bench_parser(), cmd_bench, argv[1:]
    elif sub == "worker":
        from calibrate.worker import build_worker_parser, cmd_worker
        parser, fn, rest = build_worker_parser(), cmd_worker, argv[1:]
    elif sub is not None:
        build_parser().error(f"unknown command {sub!r} (commands: measure, worker, bench; or no command for the full calibration)")
    else:
        parser, fn, rest = build_parser(), cmd_calibrate, argv
    args = apply_model_defaults(parser, rest).parse_args(rest)
    verbose = getattr(args, "verbose", not getattr(args, "quiet", False))      # bench: -v; the others: --quiet
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return run_command(fn, args, interrupted_hint="re-run the same command to resume")

if __name__ == "__main__":
    sys.exit(main())
