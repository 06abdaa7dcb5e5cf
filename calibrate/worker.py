"""Scale-out: many worker processes, on many machines, search one Optuna study.

Workers (``stagevar-calibrate worker``)
---------------------------------------
Every worker process opens the same study in a shared Optuna RDB storage (PostgreSQL for several
machines; MySQL or SQLite on one machine also work) and runs trials until the study holds
``--trials`` finished trials (COMPLETE or PRUNED) in total, whoever ran them. Workers may start in
any order, join late, be killed and be restarted::

    # 1. once, on the machine whose latency the policy should target: the calibration record
    stagevar-calibrate measure --model infinity-2b --weights W --out runs/cal
    #    (copy runs/cal/calibration-<key>/ to every worker machine)
    # 2. on every machine, any number of times:
    stagevar-calibrate worker --storage postgresql://user:pw@db:5432/optuna --study cal-3x \\
        --model infinity-2b --weights W --budget 3x --trials 200 --record runs/cal/calibration-<key> --n-workers 4
    # 3. once the workers are done, on the machine of step 1, with the options of step 1:
    stagevar-calibrate --model infinity-2b --weights W --out runs/cal --budget 3x \\
        --storage postgresql://user:pw@db:5432/optuna --study cal-3x --trials 200

Step 3 is the normal calibrate command: it finds the record in ``--out`` (same inputs, same key),
finds the study already at ``--trials`` finished trials (so it runs none), verifies the best
candidates end to end on held-out prompts and writes the policy. Run it with the same ``--trials``,
``--budget``, ``--study`` and storage as the workers.

* **The record is the same for all workers.** With ``--record DIR`` a worker loads that record
  (its prompts, seeds, batch size and guidance are used; the model must match it). Without it, the
  worker measures the record itself into ``--out`` (or reuses the one there), exactly as
  ``stagevar-calibrate measure`` would with the same options. The first worker stores the record's
  key and SHA-256 in the study; a worker whose record differs refuses to join, so two machines
  that measured their own records (different latencies) cannot mix them: measure once and pass
  ``--record``. With ``--n-workers N`` the record is loaded or measured once, before the N
  processes start.
* **Creation is race-safe.** Exactly one process creates the study (the database's unique study
  name decides); it stores the record and budget in the study and enqueues the seed policies
  (:func:`calibrate.seeds.enqueue_seeds`); the others load the study and wait for the seeds.
* **Fault tolerance.** The storage is an :class:`optuna.storages.RDBStorage` with a heartbeat
  (``--heartbeat`` seconds) and a grace period (``--grace-period``): a worker killed mid-trial
  (SIGKILL, power loss, preemption) stops beating; after the grace period another worker marks
  that trial FAIL and re-queues its parameters (``RetryHeartbeatStaleTrialCallback``, up to
  ``--max-retry`` times). Only that trial's work is lost. A worker interrupted with Ctrl-C or
  SIGTERM re-queues its own trial at once (exit 130). A live worker whose heartbeat was starved
  past the grace period finds its trial failed and re-queued by another: it logs a warning,
  discards its result and goes on. Every worker keeps polling until no trial is running and no
  retry is waiting, so a trial lost near the end is still retried.
* **Several budgets** (``--budget 2x,3x,4x``) share one study of two objectives (quality and
  latency), as in the calibrate command (:func:`calibrate.pipeline.search`); ``--trials`` counts
  per budget, so the study runs ``--trials`` x budgets trials, and step 3 with the same
  ``--budget`` chooses every operating point from it.
* **Trial cap.** A worker starts a trial only while finished + running trials are below
  ``--trials`` (x budgets; or to run a retry), and stops when the finished trials reach it. Two workers
  checking at the same instant may overshoot the cap by a trial or two; never undershoot.
* **Sampler.** TPE with the constant liar (running trials are taken into account); each process
  seeds its sampler from ``--seed``, the host name and its PID, so workers explore different
  points. A distributed search is not reproducible trial for trial.
* Storage problems (unreachable server, wrong password, malformed URL, missing driver) are one
  paragraph naming the URL with the password redacted, exit 1. Exit codes otherwise as the
  calibrate command; with ``--n-workers`` the worst child's (a child killed by signal S counts as
  128 + S).

Storage (URLs, drivers, the password kept out of every message, journal repair) is
:mod:`calibrate.storage`; joining the study and its trial loop, :mod:`calibrate.study`; records measured in shards are :mod:`calibrate.shards`.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from calibrate.storage import open_storage, redact, storage_guard
from calibrate.study import (TaggedObjective, join_study, requeue_interrupted, restore_sigterm, run_trials, sampler_seed,
                             sigterm_as_interrupt, study_counts)
from stagevar.errors import StageVarError

log = logging.getLogger("stagevar.calibrate.worker")

_CHILD_ENV = "STAGEVAR_WORKER_CHILD"       # set for the processes started by --n-workers

EPILOG = """\
examples:
  stagevar-calibrate worker --storage postgresql://me:pw@db:5432/optuna --study tiny-2x \\
      --model infinity-tiny --budget 2x --trials 40
  stagevar-calibrate worker --storage postgresql://me:pw@db:5432/optuna --study cal-3x --model infinity-2b \\
      --weights ~/weights --budget 3x --trials 200 --record runs/cal/calibration-<key> --n-workers 4 --device cuda
  stagevar-calibrate worker --storage sqlite:///runs/study.db --study mini-3x --budget 3x --trials 60 --n-workers 2

Start any number of workers on any number of machines with the same --storage, --study, --budget,
--trials and record; kill and restart them at will (a killed worker loses only its running trial,
which another worker retries after --grace-period). Pass --record (a directory written by
`stagevar-calibrate measure`) so every worker uses the same calibration record; without it the
worker measures one into --out. When the workers are done, run the normal command once on the
machine that measured the record, with the same --storage/--study/--trials/--budget and --out:
  stagevar-calibrate --model infinity-2b --weights ~/weights --out runs/cal --budget 3x \\
      --storage postgresql://me:pw@db:5432/optuna --study cal-3x --trials 200
It runs no new trial, verifies the best candidates on held-out prompts and writes the policy.
Exit codes: 0 ok; 1 error (storage problems included); 2 usage; with --n-workers the worst child's.
"""


# ============================================================================== CLI
def build_worker_parser() -> argparse.ArgumentParser:
    from calibrate.options import Parser, add_common_arguments, add_search_images_argument
    p = Parser(prog="stagevar-calibrate worker",
                description="Join a shared Optuna study and run policy-search trials until the study holds --trials "
                            "finished trials. Any number of workers on any number of machines.",
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    add_common_arguments(p)
    p.add_argument("--storage", required=True,
                   help="Optuna RDB storage URL shared by all workers, e.g. postgresql://USER:PASSWORD@HOST:5432/DB "
                        "(mysql://... and, on one machine, sqlite:///FILE also work)")
    p.add_argument("--study", help="study name shared by all workers (default: derived from model, resolution, budget and "
                                   "record key, as the calibrate command does)")
    p.add_argument("--budget", required=True,
                   help="a speedup (3x) or a latency per batch (700ms); comma-separated for several, which share one "
                        "study (quality and latency), as in the calibrate command")
    p.add_argument("--trials", type=int, default=60,
                   help="finished trials (COMPLETE or PRUNED) wanted in the study per budget, in total across all workers "
                        "(default %(default)s; several budgets: --trials x budgets)")
    add_search_images_argument(p)
    p.add_argument("--n-workers", type=int, default=1, help="worker processes started on this machine (default 1)")
    p.add_argument("--record", type=Path,
                   help="calibration record directory (from `stagevar-calibrate measure`) used by every worker; its "
                        "prompts, seeds, batch size and guidance are used (default: measure one into --out with the "
                        "options above, or reuse the one there)")
    p.add_argument("--seed", type=int, default=0, help="base sampler seed; each process mixes in its host and PID (default 0)")
    p.add_argument("--heartbeat", type=int, default=10, help="seconds between a running trial's heartbeats (default 10)")
    p.add_argument("--grace-period", type=int, default=60,
                   help="seconds without heartbeat after which a running trial counts as lost and is retried (default 60)")
    p.add_argument("--max-retry", type=int, default=2, help="times a lost trial is retried (default 2)")
    p.add_argument("--connect-timeout", type=int, default=10, help="seconds to wait for the database server (default 10)")
    p.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    return p


def cmd_worker(args) -> int:
    import optuna
    from calibrate.budget import parse_budgets

    # ERROR: a failed or interrupted trial is reported by this command in one paragraph, not by
    # Optuna's warning with a traceback (--debug keeps Optuna's warnings)
    optuna.logging.set_verbosity(optuna.logging.WARNING if args.debug else optuna.logging.ERROR)
    budgets = parse_budgets(args.budget)
    for name, value, low in (("--trials", args.trials, 1), ("--n-workers", args.n_workers, 1), ("--heartbeat", args.heartbeat, 1),
                             ("--max-retry", args.max_retry, 0), ("--connect-timeout", args.connect_timeout, 1),
                             ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise StageVarError(f"{name} must be >= {low}, got {value}.")
    if args.grace_period <= args.heartbeat:
        raise StageVarError(f"--grace-period ({args.grace_period}s) must be longer than --heartbeat ({args.heartbeat}s), "
                            "or live trials would be taken for lost ones.")
    if args.record is not None and not (Path(args.record) / "record.json").is_file() and not Path(args.record).is_file():
        raise StageVarError(f"--record {args.record}: no calibration record here (expected {Path(args.record) / 'record.json'}). "
                            "Write one with `stagevar-calibrate measure --out DIR` and pass DIR/calibration-<key>.")
    # storage first: a wrong URL or password must not cost a model load or a measurement
    storage = open_storage(args.storage, heartbeat_interval=args.heartbeat, grace_period=args.grace_period,
                           max_retry=args.max_retry, connect_timeout=args.connect_timeout)
    if args.n_workers > 1:
        return _run_local_workers(args, budgets)
    return _run_worker(args, budgets, storage)


# ============================================================================== record and study
def _load_record_for(args):
    """(model, calibration record) of a worker: ``--record``, else measured into (or reused from)
    ``--out`` exactly as ``stagevar-calibrate measure`` would with the same options."""
    import torch
    from calibrate.record import CalibrationRecord
    from stagevar.models.registry import load_model

    if args.record is None:
        from calibrate.calibration import measure
        from calibrate.options import scorer_from_args, setup
        model, prompts, seeds = setup(args)
        scorer = scorer_from_args(args, model)
        rec = measure(model, prompts, seeds, out=args.out, batch_size=args.batch_size, guidance=args.guidance,
                      progress=not args.quiet, engine=args.engine, scorer=scorer)
        return model, rec, scorer
    from stagevar.perf import steady_allocator
    steady_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    rec = CalibrationRecord.load(args.record)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = load_model(args.model, args.weights, device=args.device, dtype=dtype, random_weights=args.random_weights)
    fp = model.fingerprint().to_dict()
    if rec.inputs["model"] != fp:
        raise StageVarError(f"--record {args.record} was measured for model {rec.inputs['model'].get('model')!r} "
                            f"(arch {rec.inputs['model'].get('arch_hash')}), not for --model {args.model} "
                            f"(arch {fp.get('arch_hash')}). Pass the record of this model.")
    if rec.inputs["dtype"] != args.dtype:
        raise StageVarError(f"--record {args.record} was measured in {rec.inputs['dtype']}; pass --dtype {rec.inputs['dtype']} "
                            "so that trial quality is measured like the record's.")
    model.encode_prompts(list(rec.inputs["prompts"]))
    return model, rec, _record_scorer(args, model, rec)


def _record_scorer(args, model, rec):
    """The scorer of ``--metric`` / ``--metric-weights``, which must measure what the record was
    measured with (trials are compared with the record's sensitivities)."""
    from calibrate.calibration import metrics_input
    from calibrate.options import scorer_from_args
    scorer = scorer_from_args(args, model)
    theirs = rec.inputs.get("metrics")
    ours = metrics_input(scorer) if scorer.metrics else None
    strip = lambda m: m and {k: v for k, v in m.items() if k != "sources"}  # noqa: E731
    if strip(theirs) != strip(ours):
        raise StageVarError(f"--record {args.record} was measured with metrics {_metric_names(theirs)}, this worker's "
                            f"--metric gives {_metric_names(ours)}: pass the --metric / --metric-weights the record was "
                            "measured with.")
    return scorer


def _metric_names(m) -> str:
    return "+".join(m["semantic"] + m["structure"]) if m else "the model's own scorer and ssim"


def _study_name(args, model, rec, budgets, sets: int) -> str:
    from calibrate.budget import BudgetSet
    from calibrate.pipeline import default_study_name
    return default_study_name(model, BudgetSet.of(budgets), rec, args.study, False, sets)


def _run_worker(args, budgets, storage) -> int:
    from calibrate.budget import BudgetSet
    from calibrate.measure.common import Subject
    from calibrate.measure.latency import LatencyModel
    from calibrate.search import LATENCY_MARGIN, Objective, objective_sets
    from calibrate.seeds import fitted_seeds

    model, rec, scorer = _load_record_for(args)
    prompts, seeds = list(rec.inputs["prompts"]), list(rec.inputs["seeds"])
    batch_size, guidance = rec.inputs["batch_size"], rec.inputs["guidance"]
    lat_model = LatencyModel.of_record(rec, model.num_layers)
    tokens = model.tokens_per_scale()
    budgets_s = [b.target_seconds(lat_model.baseline(tokens)) for b in budgets]
    total = args.trials * len(budgets)                 # as the calibrate command: --trials per budget
    subject = Subject(model, prompts, seeds, batch_size, guidance, engine=rec.inputs.get("engine"))
    sets = objective_sets(subject, scorer, args.search_images)
    name = _study_name(args, model, rec, budgets, len(sets))
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    inner = Objective.for_budgets(rec, subject, lat_model, budgets_s, scorer, sets)
    label = BudgetSet.of(budgets)
    with storage_guard(args.storage):
        study = join_study(name, storage, rec, label, max(budgets_s), args.trials, sampler_seed(args.seed, args.worker_index),
                           fitted=fitted_seeds(rec, lat_model, tokens, budgets, budgets_s, LATENCY_MARGIN),
                           allow_skip=inner.allow_skip, images=args.search_images, objectives=2 if len(budgets) > 1 else 1)
    objective = TaggedObjective(inner, worker_id)
    log.info("worker %s joined study %s (record %s, budget %s = %s predicted)", worker_id, name, rec.key, label.name,
             ", ".join(f"{s:.3f}s" for s in budgets_s))

    def on_trial(st):
        t = next((t for t in st.get_trials(deepcopy=False) if t.number == objective.last_trial), None)
        if t is not None and t.values is not None:
            log.info("worker %s: trial %d quality %.4f, predicted speedup %.2fx%s", worker_id, t.number, t.values[0],
                     t.user_attrs.get("predicted_speedup", float("nan")),
                     " (estimated)" if t.user_attrs.get("quality_estimated") else "")

    t0 = time.time()
    previous = sigterm_as_interrupt()
    try:
        with storage_guard(args.storage):
            ran = run_trials(study, objective, total, poll_s=max(0.5, min(float(args.heartbeat), 5.0)), on_trial=on_trial)
            c = study_counts(study)
    except KeyboardInterrupt:
        requeue_interrupted(study, objective.last_trial)
        print("interrupted: this worker's running trial was re-queued for the other workers; start the worker again "
              "to rejoin", file=sys.stderr)
        return 130
    except StageVarError:
        raise
    except Exception as exc:  # noqa: BLE001 - an objective failure: one paragraph unless --debug
        if args.debug:
            raise
        raise StageVarError(f"a trial failed in study {name!r}: {type(exc).__name__}: {' '.join(str(exc).split())} "
                            "(run with --debug for the traceback).") from exc
    finally:
        restore_sigterm(previous)
    print(f"worker {worker_id}: ran {ran} trial(s) in {time.time() - t0:.0f}s; study {name}: {c['finished']}/{total} "
          f"finished, {c['fail']} failed")
    if not os.environ.get(_CHILD_ENV):
        _print_next(args, name)
    return 0


def _print_next(args, name: str) -> None:
    print(f"when every worker is done, verify and write the policy with: stagevar-calibrate --model {args.model} "
          f"--budget {args.budget} --storage {redact(args.storage)} --study {name} --trials {args.trials} --out {args.out} "
          "(plus the --prompts/--num-prompts/--seeds/--batch-size/--weights options the record was measured with)")




# ============================================================================== --n-workers
def child_argv(args, parser: argparse.ArgumentParser, **override) -> list[str]:
    """Command-line options reproducing ``args`` (with ``override``) for a child process."""
    out: list[str] = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = override.get(action.dest, getattr(args, action.dest, None))
        opt = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                out.append(opt)
        elif isinstance(value, dict):             # NAME=VALUE,... (--metric-weights)
            if value:
                out += [opt, ",".join(f"{k}={v}" for k, v in value.items())]
        elif isinstance(value, (list, tuple)):    # comma-separated (--metric)
            out += [opt, ",".join(map(str, value))]
        elif value is not None:
            out += [opt, str(value)]
    return out


def _exit_status(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def _run_local_workers(args, budgets) -> int:
    """Load or measure the record once, then start ``--n-workers`` worker processes and wait."""
    from calibrate.calibration import record_dir
    if args.record is None:
        model, rec, _ = _load_record_for(args)
        record = record_dir(args.out, rec.key)
        from calibrate.search import set_count
        name = _study_name(args, model, rec, budgets, set_count(len(rec.inputs["prompts"]) * len(rec.inputs["seeds"]),
                                                               args.search_images))
        del model
    else:
        from calibrate.record import CalibrationRecord
        CalibrationRecord.load(args.record)          # a broken record: one message here, not one per worker
        record = Path(args.record)
        name = args.study
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.n_workers)
    parser = build_worker_parser()
    procs = []
    for i in range(args.n_workers):
        argv = child_argv(args, parser, n_workers=1, record=str(record), threads=threads, worker_index=i)
        procs.append(subprocess.Popen([sys.executable, "-m", "calibrate.cli", "worker", *argv],
                                      env=dict(os.environ, **{_CHILD_ENV: "1"})))
    log.info("started %d workers: %s", len(procs), ", ".join(str(p.pid) for p in procs))
    previous = sigterm_as_interrupt()
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:                       # Ctrl-C reached the children too; give them time to re-queue
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        print("interrupted: the workers re-queued their running trials; re-run the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        restore_sigterm(previous)
    worst = max(_exit_status(c) for c in codes)
    for p, c in zip(procs, codes):
        if c != 0:
            how = f"killed by signal {-c}" if c < 0 else f"exit code {c}"
            print(f"worker process {p.pid}: {how}", file=sys.stderr)
    if name is not None:
        _print_next(args, name)
    return worst


if __name__ == "__main__":  # pragma: no cover
    from stagevar.errors import run_command
    from calibrate.options import apply_model_defaults
    _args = apply_model_defaults(build_worker_parser(), sys.argv[1:]).parse_args(sys.argv[1:])
    logging.basicConfig(level=logging.WARNING if _args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run_command(cmd_worker, _args, interrupted_hint="re-run the same command to resume"))
