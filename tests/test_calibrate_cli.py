"""``stagevar-calibrate``: the command end to end on ``infinity-tiny`` with minimal settings
(reusing the session's record), resume, warm start, help and usage errors."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest

import calibrate.calibration as calibration
from calibrate.calibration import record_dir
from calibrate.metrics import scorer_for
from calibrate.search import SEARCH_SPACE, Objective, point_from_params
from stagevar.models.registry import load_model
from stagevar.policy import load_policy

from calib import PROMPTS, SETTINGS, record_variants

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -------------------------------------------------------------------------------- 10. the CLI
@pytest.fixture
def small_cli(small_measure):
    """The command measures with the small settings (and so reuses the module's record)."""
    assert small_measure == SETTINGS


def test_cli_calibrate_end_to_end_and_resume(measured, tmp_path, small_cli, monkeypatch, capsys):
    from calibrate.cli import main as calibrate_main
    from stagevar.cli import main as stagevar_main

    out_dir, rec = measured
    work = tmp_path / "cal"
    work.mkdir()
    shutil.copytree(record_dir(out_dir, rec.key), record_dir(work, rec.key))   # cache hit: no re-measure
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    policy_path = work / "p.yaml"
    argv = ["--model", "infinity-tiny", "--budget", "50x", "--prompts", str(prompts), "--num-prompts", "2", "--search-images", "4",
            "--batch-size", "2", "--num-heldout", "2", "--num-report", "2", "--trials", "4", "--verify-candidates", "1",
            "--out", str(work), "--policy-out", str(policy_path), "--quiet", "--json", "--frontier"]

    def no_measure(*a, **k):
        raise AssertionError("the record should have been reused")

    monkeypatch.setattr(calibration, "measure_variant", no_measure)
    rc = calibrate_main(argv)
    cap = capsys.readouterr()
    assert rc == 3, cap.err
    assert "best verified speedup" in cap.err and "50x" in cap.err
    summary = json.loads(cap.out.strip().splitlines()[-1])
    assert summary["operating_points"]["50x"]["feasible"] is False
    assert Path(summary["report"]).is_file()
    # the frontier holds measured trials only (at 50x every trial's quality is estimated, so it may
    # be empty); each point names its study (trial numbers are per study); it is non-dominated
    front = summary["frontier"]
    assert all(f["study"] == "50x" for f in front)
    assert [f["predicted_latency_s"] for f in front] == sorted(f["predicted_latency_s"] for f in front)
    assert [f["quality"] for f in front] == sorted(f["quality"] for f in front)

    policy = load_policy(policy_path)
    point = policy.operating_point()
    assert policy.default == "50x"
    assert point.measured["feasible"] is False and point.measured["verified"] is True
    assert point.measured["budget"] == "50x"
    # chosen on the selection set, its numbers measured on the report set (other images)
    assert point.measured["quality_from"].startswith("report set") and point.measured["verification_images"] == 2
    assert {"selection_quality", "selection_quality_se", "quality_se"} <= set(point.measured)
    assert point.measured["selection_images"] == 2 and policy.provenance["report_prompts"] == 2
    assert policy.provenance["calibration_record"] == rec.key
    found = policy.provenance["measured_stages"]                         # the record's stages, beside the plan's
    assert set(found) == {"semantic", "structure", "refinement"} and found["semantic"] == list(rec.stages["semantic"])
    assert policy.provenance["guidance"] == rec.inputs["guidance"] == load_model("infinity-tiny").default_guidance
    assert policy.provenance["engine"] == rec.inputs["engine"] == "eager"          # the engine the latencies are of
    policy.save(tmp_path / "copy.yaml")
    assert load_policy(tmp_path / "copy.yaml") == policy

    # the study: journal-backed, 4 trials, seeds enqueued once
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    name = f"infinity-tiny.256.50x.{rec.key}.s{SEARCH_SPACE}.x2"               # two image sets of the record's two images
    study = optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(work / "study.journal"))))
    assert len(study.trials) == 4
    assert [t.user_attrs.get("seed_policy") for t in study.trials[:3]] == ["identity", "paper-like", "fastvar-like"]

    # generate with the written policy
    import stagevar.runtime as runtime_mod
    used = []
    real_rt = runtime_mod.Runtime

    class Spy(real_rt):
        def __init__(self, adapter, policy=None, *a, **k):
            used.append(policy)
            super().__init__(adapter, policy, *a, **k)

    monkeypatch.setattr(runtime_mod, "Runtime", Spy)
    png = tmp_path / "img.png"
    assert stagevar_main(["generate", "--model", "infinity-tiny", "--policy", str(policy_path),
                          "--prompt", "a red circle", "--out", str(png)]) == 0
    assert png.is_file() and png.stat().st_size > 0
    assert len(used) == 1 and used[0] == policy
    monkeypatch.setattr(runtime_mod, "Runtime", real_rt)
    capsys.readouterr()
    assert stagevar_main(["inspect", str(policy_path)]) == 0
    shown = capsys.readouterr().out
    st = point.stages
    differs = found != {k: [a, b] if b >= a else None for k, (a, b) in st.items()}
    assert ("the calibration measured semantic " in shown) == differs and "measured_stages" in shown

    # re-running resumes: the trials are kept and no new one runs
    def no_trial(self, trial):
        raise AssertionError("a new trial ran although --trials was reached")

    monkeypatch.setattr(Objective, "__call__", no_trial)
    rc = calibrate_main(argv)
    cap = capsys.readouterr()
    assert rc == 3, cap.err
    study = optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(work / "study.journal"))))
    assert len(study.trials) == 4
    assert load_policy(policy_path).operating_point().measured["trial"] == point.measured["trial"]


def _steady_latency(directory: Path, model) -> None:
    """Replace a copied record's measured latency table by one proportional to the tokens each
    scale computes (guided rows count twice), so a test of which policies meet a budget does not
    depend on how busy the machine was when the module's record was measured."""
    path = directory / "record.json"
    d = json.loads(path.read_text())
    tokens = model.tokens_per_scale()
    variants = {v.name: v for v in record_variants()}
    for r in d["latency"]["rows"]:
        v = variants[r["variant"]]
        r["seconds"] = r["p90"] = 1e-3 + 1e-4 * tokens[r["scale"]] * v.keep * (1 if v.guidance == "cond_only" else 2)
    d["latency"]["overhead_s"] = 0.01
    path.write_text(json.dumps(d))


def test_cli_local_search_after_the_sampler_and_resume(measured, model, tmp_path, small_cli, monkeypatch, capsys):
    """With a budget the sampler can meet, the local search adds trials marked ``local_from`` to the
    budget's study, within the target; they do not count against --trials, and a re-run measures
    nothing new."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from calibrate.cli import main as calibrate_main
    out_dir, rec = measured
    work = tmp_path / "cal"
    work.mkdir()
    shutil.copytree(record_dir(out_dir, rec.key), record_dir(work, rec.key))
    _steady_latency(record_dir(work, rec.key), model)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    argv = ["--model", "infinity-tiny", "--budget", "1.05x", "--prompts", str(prompts), "--num-prompts", "2", "--search-images", "4",
            "--batch-size", "2", "--num-heldout", "2", "--num-report", "2", "--trials", "4", "--local-trials", "3", "--verify-candidates", "1",
            "--verify-near", "0", "--verify-repeats", "1", "--out", str(work), "--policy-out", str(work / "p.yaml"), "--quiet"]
    calibrate_main(argv)
    capsys.readouterr()
    name = f"infinity-tiny.256.1.05x.{rec.key}.s{SEARCH_SPACE}.x2"

    def load():
        return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(work / "study.journal"))))

    study = load()
    local = [t for t in study.trials if "local_from" in t.user_attrs]
    sampled = [t for t in study.trials if "local_from" not in t.user_attrs]
    assert len(sampled) == 4 and 1 <= len(local) <= 3
    target = study.user_attrs["stagevar"]["budget_s"] * (1 - 0.05)
    assert all(t.user_attrs["predicted_latency_s"] <= target for t in local)
    assert all(not t.user_attrs["quality_estimated"] for t in local)

    def no_trial(self, trial):
        raise AssertionError("a trial ran on re-run")

    measure_trial = Objective.__call__
    monkeypatch.setattr(Objective, "__call__", no_trial)      # the climb ended: its neighbours are all measured
    first_policy = (work / "p.yaml").read_bytes()
    assert not list(work.glob("replaced-*"))
    calibrate_main(argv)
    # the policy file the re-run replaced is kept in the working directory, byte for byte
    kept = list(work.glob("replaced-p-*.yaml"))
    assert len(kept) == 1 and kept[0].read_bytes() == first_policy
    assert "kept as" in capsys.readouterr().out
    again = load()
    assert len([t for t in again.trials if "local_from" not in t.user_attrs]) == 4
    assert len([t for t in again.trials if "local_from" in t.user_attrs]) <= 3
    monkeypatch.setattr(Objective, "__call__", measure_trial)

    # --warm-start: a fresh study (another --out) also tries the written policy's operating point
    work2 = tmp_path / "cal2"
    work2.mkdir()
    shutil.copytree(record_dir(out_dir, rec.key), record_dir(work2, rec.key))
    _steady_latency(record_dir(work2, rec.key), model)
    warm_argv = [a if a != str(work) else str(work2) for a in argv]
    warm_argv[warm_argv.index("--policy-out") + 1] = str(work2 / "p.yaml")
    warm_argv[warm_argv.index("--local-trials") + 1] = "0"
    rc = calibrate_main(warm_argv + ["--warm-start", str(work / "p.yaml")])
    captured = capsys.readouterr()
    assert rc in (0, 3), captured.err
    warm = optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(work2 / "study.journal"))))
    seeded = [t for t in warm.trials if t.user_attrs.get("seed_policy") == "warm-start:1.05x"]
    assert len(seeded) == 1 and seeded[0].state == optuna.trial.TrialState.COMPLETE
    written = load_policy(work / "p.yaml").operating_point("1.05x")
    assert point_from_params(rec, seeded[0].params).plans == written.plans


def test_cli_warm_start_file_errors_are_one_paragraph(tmp_path, capsys, monkeypatch):
    from calibrate.cli import main as calibrate_main
    monkeypatch.setattr("stagevar.models.registry.load_model",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded before the file check")))
    rc = calibrate_main(["--budget", "3x", "--model", "infinity-tiny", "--out", str(tmp_path / "out"), "--quiet",
                         "--warm-start", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert rc == 1 and "missing.yaml" in err
    assert "\n\n" not in err.strip() and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- 11. CLI help/usage
@pytest.mark.parametrize("argv", [["--help"], ["measure", "--help"]])
def test_cli_help(argv, capsys):
    from calibrate.cli import main as calibrate_main
    with pytest.raises(SystemExit) as exc:
        calibrate_main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "stagevar-calibrate" in out


@pytest.mark.parametrize("budget", ["fastest", "0x", "-3x", "1x", "3", "3x,3x", ""])
def test_cli_bad_budget(budget, tmp_path, capsys, monkeypatch):
    from calibrate.cli import main as calibrate_main
    monkeypatch.setattr("stagevar.models.registry.load_model",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded before the budget check")))
    rc = calibrate_main([f"--budget={budget}", "--model", "infinity-tiny", "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and "budget" in err
    assert "\n\n" not in err.strip() and "Traceback" not in err        # one paragraph
    assert not any(tmp_path.iterdir())                                 # nothing written


def test_cli_missing_budget_is_usage_error(capsys):
    from calibrate.cli import main as calibrate_main
    with pytest.raises(SystemExit) as exc:
        calibrate_main(["--model", "infinity-tiny"])
    assert exc.value.code == 2
    assert "--budget" in capsys.readouterr().err


def test_latency_margin_default_is_the_one_workers_use():
    """Workers fit their seeds to the budget less the default margin; the command's default is it."""
    from calibrate.cli import build_parser
    from calibrate.search import LATENCY_MARGIN
    assert build_parser().parse_args(["--budget", "3x"]).latency_margin == LATENCY_MARGIN


def test_bundled_draws_calibration_selection_and_report_sets_apart():
    from calibrate.prompts import bundled
    cal0, cal1 = bundled("infinity-mini", "calibration", 16), bundled("infinity-mini", "calibration", 16, draw=1)
    assert cal0 == bundled("infinity-mini", "calibration", 16, draw=0) and cal0 != cal1
    assert cal0[:8] == bundled("infinity-mini", "calibration", 8)
    assert bundled("infinity-mini", "report", 64) != bundled("infinity-mini", "verification", 64)
    assert bundled("infinity-mini", "report", 64, draw=5) == bundled("infinity-mini", "report", 64)   # draw: calibration only
    text = bundled("infinity-2b", "calibration", 4, draw=1)
    assert text != bundled("infinity-2b", "calibration", 4) and len(text) == 4
    with pytest.raises(ValueError, match="unknown split"):
        bundled("infinity-mini", "nope", 4)


def test_infinity_mini_calibrates_on_the_compositions_it_is_judged_on():
    """infinity-mini's calibration prompts are held-out compositions (the kind the evaluator, the
    verification and the bench score), from draws no verification, report or bench draw uses: no
    batch of 8 of them is one of those sets' batches. infinity-tiny and infinity-mini-256 keep the
    calibration split."""
    from calibrate.prompts import CALIBRATION_DRAW_BASE, bundled
    from stagevar.toy.prompts import is_heldout, make_split
    for draw in (0, 1, 2):
        items = make_split("heldout", 64, seed=CALIBRATION_DRAW_BASE + draw)
        assert bundled("infinity-mini", "calibration", 64, draw=draw) == [it["prompt"] for it in items]
        assert bundled("infinity-mini", "calibration", 8, draw=draw) == [it["prompt"] for it in items[:8]]
        assert all(is_heldout(it["spec"]) for it in items if it["spec"]["category"] in ("position", "color_attr", "counting"))
    cal = bundled("infinity-mini", "calibration", 64)
    batches = {tuple(cal[i:i + 8]) for i in range(0, 64, 8)}
    others = [bundled("infinity-mini", s, 64) for s in ("verification", "report")]
    others += [[it["prompt"] for it in make_split("heldout", 64, seed=d)] for d in range(20)]     # bench draws
    assert not any(batches & {tuple(o[i:i + 8]) for i in range(0, 64, 8)} for o in others)
    split = [it["prompt"] for it in make_split("calibration", 8, seed=0)]
    assert bundled("infinity-tiny", "calibration", 8) == split == bundled("infinity-mini-256", "calibration", 8)


def test_the_scorer_is_the_one_the_model_entry_names(monkeypatch):
    """Calibration asks the registry which scorer a model's images are compared with; no caller
    branches on a scorer's name, only on what it does (``judges_prompt``)."""
    import calibrate.metrics as metrics
    from stagevar.models import catalog
    from stagevar.models.registry import model_entry
    mini, tiny = scorer_for("infinity-mini"), scorer_for("infinity-tiny")
    assert model_entry("infinity-mini").scorer == "evaluator" and mini.judges_prompt
    assert model_entry("infinity-tiny").scorer == "codes" and not tiny.judges_prompt
    imgs = np.zeros((2, 3, 16, 16), dtype=np.float32)
    assert tiny.reference_verdicts(imgs, ["a red circle"] * 2) is None
    assert mini.reference_verdicts(imgs, ["a red circle"] * 2).tolist() == [0.0, 0.0]     # a blank image fails
    monkeypatch.setitem(catalog._REGISTRY, "infinity-tiny", dataclasses.replace(model_entry("infinity-tiny"), scorer="clip"))
    with pytest.raises(ValueError, match="scorer 'clip'.*codes, evaluator"):
        metrics.scorer_for("infinity-tiny")


def test_a_model_sets_its_own_calibration_defaults(monkeypatch, capsys):
    """infinity-mini-256 costs about 4x infinity-mini an image, so its registry entry asks for a
    smaller search (fewer trials and verification images) and a smaller calibration pass; the
    calibrate command and its workers (whose trials must be measured alike) both take them,
    ``--help`` shows them, and an option on the command line still wins."""
    import calibrate.cli as cli
    import calibrate.worker as worker
    from calibrate.calibration import MeasureSettings, sensitivity_units
    from stagevar.models.registry import model_entry
    seen = {}
    monkeypatch.setattr(cli, "cmd_calibrate", lambda args: seen.setdefault("calibrate", []).append(args) or 0)
    monkeypatch.setattr(worker, "cmd_worker", lambda args: seen.setdefault("worker", []).append(args) or 0)
    asked = model_entry("infinity-mini-256").calibration
    assert cli.main(["--budget", "3x", "--model", "infinity-mini-256"]) == 0
    big = seen["calibrate"][-1]
    assert (big.trials, big.local_trials, big.search_images, big.num_heldout) == \
        (asked["trials"], asked["local_trials"], asked["search_images"], asked["num_heldout"])
    assert big.trials < 60 and big.num_heldout < 64
    assert cli.main(["--budget", "3x", "--model=infinity-mini-256", "--trials", "40"]) == 0
    assert seen["calibrate"][-1].trials == 40 and seen["calibrate"][-1].num_heldout == asked["num_heldout"]
    assert cli.main(["--budget", "3x"]) == 0                       # the default model: the command's defaults
    assert (seen["calibrate"][-1].trials, seen["calibrate"][-1].num_heldout) == (60, 64)
    assert cli.main(["worker", "--storage", "sqlite:///x.db", "--budget", "3x", "--model", "infinity-mini-256"]) == 0
    w = seen["worker"][-1]
    assert (w.trials, w.search_images) == (big.trials, big.search_images)
    with pytest.raises(SystemExit):
        cli.main(["--model", "infinity-mini-256", "--help"])
    assert f"(default {asked['trials']};" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        cli.main(["--budget", "3x", "--model"])                     # a missing name: argparse's usage error
    assert "--model" in capsys.readouterr().err
    # its calibration pass: fewer keeps and latency rounds; infinity-mini's (and its records' keys) unchanged
    small, default = MeasureSettings.for_model("infinity-mini-256"), MeasureSettings.for_model("infinity-mini")
    assert default == MeasureSettings() and MeasureSettings.for_model("no-such-model") == MeasureSettings()
    assert small.latency_repeats < default.latency_repeats
    assert len(sensitivity_units(small, 13)) < len(sensitivity_units(default, 13))


def test_the_python_api_takes_the_model_defaults_too():
    """``calibrate(...)`` without settings searches as the command does for that model."""
    from calibrate.pipeline import SearchSettings
    from stagevar.models.registry import model_entry
    asked = model_entry("infinity-mini-256").calibration
    s = SearchSettings.for_model("infinity-mini-256")
    assert (s.trials, s.local_trials, s.verify_repeats) == (asked["trials"], asked["local_trials"], asked["verify_repeats"])
    assert SearchSettings.for_model("infinity-mini-256", trials=5).trials == 5
    assert SearchSettings.for_model("infinity-mini") == SearchSettings() == SearchSettings.for_model("no-such-model")
