"""``stagevar-calibrate bench`` and the baseline policies.

Benchmarks are not unit tests: here only (1) the baseline builders produce valid policies (YAML round
trip through the strict loader) with the plans they document, and (2) the command runs on
``infinity-tiny`` with tiny settings and writes the table, the JSON and the plot with every method.
The GPU script is exercised on the CPU (``-m slow``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stagevar.baselines import (
    BASELINES,
    baseline_policy,
    describe,
    fastvar_layers,
    fastvar_policy,
    paper_policy,
    skipvar_policy,
)
from calibrate.bench.cli import build_parser as build_bench_parser, main as bench_main
from stagevar.models.registry import load_model
from stagevar.policy import OperatingPoint, Policy, ScalePlan, binding_for, default_stages, load_policy

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--model", "infinity-tiny", "--prompts", "1", "--repeats", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def tiny():
    return load_model("infinity-tiny")


@pytest.fixture(scope="module")
def big():
    """Infinity-2B's real shapes on the meta device (13 scales to 64x64, 32 layers; no weights)."""
    return load_model("infinity-2b", random_weights=True, device="meta")


# ------------------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("which", ["tiny", "big"])
def test_baselines_are_valid_policies_and_round_trip(which, tiny, big, tmp_path):
    adapter = tiny if which == "tiny" else big
    pol = baseline_policy(adapter)
    assert list(pol.operating_points) == list(BASELINES)
    assert pol.model == binding_for(adapter)
    pol.check_compatible(adapter)
    path = pol.save(tmp_path / "baselines.yaml")
    back = load_policy(path)
    assert back.operating_points == pol.operating_points
    assert Policy.from_dict(yaml.safe_load(pol.to_yaml())).to_dict() == pol.to_dict()
    for name in BASELINES:             # each point alone is also a valid single-point policy
        single = Policy(binding_for(adapter), {name: pol.operating_points[name]}, name)
        assert load_policy(single.save(tmp_path / f"{name}.yaml")).operating_point(name) == pol.operating_points[name]


def test_fastvar_reproduces_the_infinity_code(big):
    """Infinity-2B 1024²: prune 32x32 (40% pruned) and 40x40 (50%) by deviation in layers 3..27,
    restore from cache, guidance kept; 48x48 and 64x64 not computed."""
    pt = fastvar_policy(big)
    sides = [h for _, h, _ in big.scale_schedule]
    assert sides == [1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64]
    by_side = dict(zip(sides, pt.plans))
    for side, keep in ((32, 0.6), (40, 0.5)):
        p = by_side[side]
        assert (p.selection, p.keep, p.layers, p.restore, p.guidance, p.skip) == \
            ("deviation", keep, (3, 28), "cached_update", "cfg", False)
    assert by_side[48].skip and by_side[64].skip
    assert all(p.is_identity for p in pt.plans[:9])
    assert pt.stages["refinement"] == (9, 12)
    assert describe(pt, 32) == "9:cfg+dev@0.6[L3-27] 10:cfg+dev@0.5[L3-27] 11:skip 12:skip"
    no_skip = fastvar_policy(big, skip_last=False)
    assert not any(p.skip for p in no_skip.plans) and no_skip.plans[9:11] == pt.plans[9:11]


@pytest.mark.parametrize("depth,expected", [(32, (3, 28)), (40, (4, 35)), (30, (3, 26)), (8, (1, 7)), (2, (0, 2)), (1, (0, 1))])
def test_fastvar_layers_scale_with_depth(depth, expected):
    assert fastvar_layers(depth) == expected


def test_fastvar_on_tiny_uses_relative_scales(tiny):
    pt = fastvar_policy(tiny)                      # 7 scales: prune 3 and 4, skip 5 and 6
    assert [p.keep for p in pt.plans[3:5]] == [0.6, 0.5]
    assert all(p.selection == "deviation" and p.layers == (0, 2) for p in pt.plans[3:5])
    assert [p.skip for p in pt.plans] == [False] * 5 + [True] * 2


def test_paper_policy(big, tiny):
    pt = paper_policy(big)
    assert pt.stages["refinement"] == (10, 12)
    assert all(p.is_identity for p in pt.plans[:10])
    for p in pt.plans[10:]:
        assert (p.guidance, p.keep, p.selection, p.restore, p.layers, p.skip) == \
            ("cond_only", 0.5, "random_projection", "cached_update", None, False)
    assert [p.keep for p in paper_policy(tiny, keep=0.25).plans[4:]] == [0.25] * 3
    with pytest.raises(ValueError):
        paper_policy(tiny, keep=0.0)


def test_skipvar_policies(big):
    skip = skipvar_policy(big, "skip")
    assert [p.skip for p in skip.plans] == [False] * 12 + [True]
    skip2 = skipvar_policy(big, "skip", steps=2)
    assert [p.skip for p in skip2.plans] == [False] * 11 + [True] * 2
    unc = skipvar_policy(big, "uncond")
    assert [p.guidance for p in unc.plans] == ["cfg"] * 11 + ["cond_only"] * 2
    assert not any(p.skip or p.is_subset for p in unc.plans)
    with pytest.raises(ValueError, match="unknown SkipVAR variant"):
        skipvar_policy(big, "adaptive")


# ------------------------------------------------------------------------------------- command
def _searched_policy(adapter, path: Path) -> Path:
    """A stand-in for a searched policy: two operating points."""
    n = len(adapter.scale_schedule)
    a = OperatingPoint(default_stages(n, n - 2), tuple(
        ScalePlan(k, guidance="cond_only", keep=0.5) if k >= n - 2 else ScalePlan(k) for k in range(n)))
    b = OperatingPoint(default_stages(n, n - 1), tuple(
        ScalePlan(k, guidance="cond_only", keep=0.25, selection="uniform") if k >= n - 1 else ScalePlan(k) for k in range(n)))
    return Policy(binding_for(adapter), {"2x": a, "3x": b}, "2x").save(path)


def _methods_in(out: Path) -> list[str]:
    return [m["name"] for m in json.loads((out / "bench.json").read_text())["methods"]]


def test_bench_speed_only(tiny, tmp_path, capsys):
    pol = _searched_policy(tiny, tmp_path / "tiny.test.yaml")
    out = tmp_path / "out"
    rc = bench_main(TINY_ARGS + ["--no-quality", "--policy", str(pol), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    expected = ["full", "tiny.test:2x", "tiny.test:3x", *BASELINES]
    assert _methods_in(out) == expected
    md = (out / "bench.md").read_text()
    assert md in captured.out                                     # the table is printed too
    for name in expected:
        assert f"| `{name}` |" in md
    assert "SSIM" not in md.split("## Methods")[0]
    assert (out / "speedup.png").stat().st_size > 1000
    res = json.loads((out / "bench.json").read_text())
    full = res["methods"][0]
    assert full["speedup"] == pytest.approx(1.0)
    n_scales = res["config"]["num_scales"]
    for m in res["methods"]:
        lat = m["latency"]
        assert lat["median_s"] > 0 and len(lat["samples_s"]) == 1
        # per-scale breakdown: skipped scales are absent, and scales + outside add up to the total
        skips = sum(p.get("skip", False) for p in (m["operating_point"] or {}).get("plans", []))
        assert len(lat["scales_median_s"]) == n_scales - skips
        assert 0 < lat["outside_scales_median_s"] < lat["median_s"]
        assert sum(lat["scales_median_s"]) + lat["outside_scales_median_s"] == pytest.approx(lat["median_s"])
        assert m["peak_mem_mib"] is None or m["peak_mem_mib"] > 0
        assert "quality" not in m
    assert res["config"]["repeats"] == 1 and res["config"]["no_quality"]
    assert "[bench] warm-up round" in captured.err


def test_bench_on_several_engines_one_method_at_a_time(tiny, tmp_path, capsys):
    """--engine eager,static: every method on every engine (rows name@engine, speedups against the
    first engine's full model and the same engine's); --sequential times one method after the
    other; --fit-budget adds the paper-like plan fitted by measurement and saves it as a policy."""
    out = tmp_path / "out"
    rc = bench_main(TINY_ARGS + ["--no-quality", "--no-plot", "--no-memory", "--baselines", "paper", "--engine",
                                 "eager,static", "--sequential", "--fit-budget", "1.01x", "--policies-dir",
                                 str(tmp_path / "none"), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads((out / "bench.json").read_text())
    names = [m["name"] for m in res["methods"]]
    fitted = [n for n in names if n.startswith("fitted-1.01x")]
    assert names[:2] == ["full@eager", "paper@eager"] and len(names) == 2 * (2 + len(fitted) // 2)
    assert res["config"]["engines"] == ["eager", "static"] and res["config"]["sequential"] is True
    rows = {m["name"]: m for m in res["methods"]}
    assert rows["full@eager"]["speedup"] == pytest.approx(1.0) == rows["full@static"]["speedup_same_engine"]
    assert all(m["engine"] == m["name"].split("@")[1] and m["latency"]["first_s"] > 0 for m in res["methods"])
    assert res["fit_budget"]["engine"] == "static" and res["fit_budget"]["tried"]
    if fitted:                                         # the fit met the budget: the plan is benched and saved
        from stagevar.policy import load_policy
        assert load_policy(out / "fitted-1.01x.yaml").provenance["fit"] == res["fit_budget"]["chosen"]
    assert "one method after the other" in (out / "bench.md").read_text()
    rc = bench_main(TINY_ARGS + ["--no-quality", "--no-plot", "--engine", "eager,graphs", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a CUDA device" in err


def test_bench_with_quality(tmp_path, capsys):
    out = tmp_path / "q"
    rc = bench_main(TINY_ARGS + ["--no-memory", "--policies-dir", str(tmp_path / "none"), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert _methods_in(out) == ["full", *BASELINES]
    assert (out / "quality_vs_speedup.png").stat().st_size > 1000
    res = json.loads((out / "bench.json").read_text())
    prompt = res["config"]["latency_prompts"][0]
    for m in res["methods"]:
        q = m["quality"]
        assert q["images"] == 1 and 0.0 < q["hf_ratio_mean"]
        assert -1.0 <= q["ssim_min"] <= q["ssim_mean"] <= 1.0 + 1e-9
        assert q["worst"]["prompt"] == prompt
        assert "evaluator" not in q                               # only for the embedded infinity-mini
    assert res["methods"][0]["quality"]["ssim_mean"] == pytest.approx(1.0)
    md = (out / "bench.md").read_text()
    assert "SSIM mean" in md and f'"{prompt}"' in md



def test_bench_pairs_a_policy_with_the_file_it_would_replace(tiny, tmp_path, capsys):
    """--against FILE: every other policy's operating point is compared, image by image, with FILE's
    point of the same name; FILE's points are benched even when no --policy names it, and the
    differences are those of the per-image values in bench.json."""
    n = len(tiny.scale_schedule)
    ours = _searched_policy(tiny, tmp_path / "ours.yaml")                       # 2x and 3x
    same = OperatingPoint(default_stages(n, n - 2), tuple(
        ScalePlan(k, guidance="cond_only", keep=0.5) if k >= n - 2 else ScalePlan(k) for k in range(n)))
    other = OperatingPoint(default_stages(n, n - 2), tuple(ScalePlan(k, skip=True) if k == n - 1 else ScalePlan(k)
                                                           for k in range(n)))
    theirs = Policy(binding_for(tiny), {"2x": same, "4x": other}, "2x").save(tmp_path / "theirs.yaml")
    out = tmp_path / "out"
    rc = bench_main(["--model", "infinity-tiny", "--prompts", "3", "--repeats", "1", "--threads", "1", "--no-memory",
                     "--no-plot", "--baselines", "none", "--policy", str(ours), "--against", str(theirs), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads((out / "bench.json").read_text())
    assert _methods_in(out) == ["full", "ours:2x", "ours:3x", "theirs:2x", "theirs:4x"]
    q = {m["name"]: m["quality"] for m in res["methods"]}
    assert all(len(v["per_image"]["ssim"]) == v["images"] == 3 for v in q.values())
    assert q["full"]["ssim_se"] == pytest.approx(0.0)
    (pair,) = res["against"]["pairs"]                                          # only 2x is in both files
    assert (pair["point"], pair["method"], pair["against"]) == ("2x", "ours:2x", "theirs:2x")
    # the same plan on the same images: no difference, and the verdict says it cannot be told
    assert pair["ssim"] == {"diff": 0.0, "se": 0.0, "resolved": False, "images": 3}
    md = (out / "bench.md").read_text()
    section = md.split(f"## Paired with `{theirs}`")[1].split("## Methods")[0]
    assert "| 2x | `ours:2x` |" in section and "cannot tell" in section and "3x" not in section
    assert "± " in md.split("## Methods")[0]                                   # means carry their errors
    # a file with no point of a benched policy's names, --no-quality, a file that is no policy: one paragraph each
    lone = Policy(binding_for(tiny), {"4x": other}, "4x").save(tmp_path / "lone.yaml")
    for extra, msg in ((["--against", str(lone)], "no other policy benched has an operating point named like one of "
                                                   "its points (4x)"),
                       (["--against", str(theirs), "--no-quality"], "cannot be given with --no-quality"),
                       (["--against", str(tmp_path / "missing.yaml")], "missing.yaml")):
        rc = bench_main(TINY_ARGS + ["--no-plot", "--baselines", "none", "--policy", str(ours), *extra,
                                     "--out", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert rc == 1 and msg in err and "Traceback" not in err, err


def test_quality_summary_pairs_the_evaluator_with_the_full_model():
    """The evaluator's drop is the mean of the per-image differences from the full model's
    verdicts, with their standard error (not the difference of two means with independent
    errors); SSIM and learned metrics carry their standard errors."""
    import math
    from calibrate.bench.measure import paired, quality_summary
    where = [("a red circle", "single_object", 0)] * 4
    full = {"ssim": [1.0] * 4, "hf": [1.0] * 4, "eval": [True, True, False, True], "where": where}
    mine = {"ssim": [0.9, 0.8, 0.9, 0.8], "hf": [1.0] * 4, "eval": [True, False, True, False], "where": where,
            "lpips": [0.5, 0.7, 0.5, 0.7]}
    q = quality_summary(mine, full, use_evaluator=True)
    ev = q["evaluator"]
    assert ev["mean"] == 0.5 and ev["overall"] == 0.5 and ev["drop"] == pytest.approx(0.25)
    diffs = [0, 1, -1, 1]                                                       # full - mine, image by image
    sd = math.sqrt(sum((d - 0.25) ** 2 for d in diffs) / 3)
    assert ev["drop_se"] == pytest.approx(sd / 2)
    assert q["ssim_se"] == pytest.approx(math.sqrt(4 * 0.05 ** 2 / 3) / 2)
    assert q["lpips_mean"] == pytest.approx(0.6) and q["lpips_se"] == pytest.approx(q["ssim_se"] * 2)
    assert q["per_image"] == {"ssim": mine["ssim"], "lpips": mine["lpips"], "eval": [1.0, 0.0, 1.0, 0.0]}
    with pytest.raises(ValueError, match="same images"):
        paired([1.0], [1.0, 0.0])


def test_the_paired_section_gives_a_verdict_on_the_evaluator_when_there_is_one():
    """With the evaluator, the verdict follows the evaluator's paired difference, not SSIM's: a
    point that keeps SSIM but loses verdicts is worse; one within two standard errors cannot be told."""
    from calibrate.bench.measure import paired
    from calibrate.bench.report import _against_table
    full, ours, theirs = [1.0] * 100, [1.0] * 80 + [0.0] * 20, [1.0] * 100
    ssim = [0.9] * 100
    rows = [{"point": "2x", "method": "new:2x", "speedup_ratio": 1.05, "ssim": paired(ssim, ssim),
             "evaluator": paired(ours, theirs)},
            {"point": "3x", "method": "new:3x", "speedup_ratio": 0.98, "ssim": paired([0.8] * 99 + [0.9], ssim),
             "evaluator": paired(full[:99] + [0.0], theirs)}]
    text = "\n".join(_against_table({"file": "old.yaml", "pairs": rows}, 100))
    assert "| 2x | `new:2x` | 1.050 | -0.200 ± 0.040 | +0.0000 ± 0.0000 | worse |" in text
    assert "| 3x | `new:3x` | 0.980 | -0.010 ± 0.010 | -0.0990 ± 0.0010 | cannot tell |" in text
    assert "(on Δ eval)" in text and "same 100 images" in text

@pytest.mark.parametrize("no_quality", [False, True])
def test_the_plot_draws_every_kind_of_method(no_quality, tmp_path):
    """``--fit-budget`` adds a method of kind ``fitted``: the plot has a colour for every kind the
    bench lists (it stopped with a KeyError on that one, after the table was written)."""
    from calibrate.bench.report import plot
    kinds = ["full", "policy", "baseline", "fitted"]
    rows = [{"name": k, "kind": k, "speedup": 1.0 + i, "quality": {"ssim_mean": 1.0 - 0.1 * i, "evaluator": {"overall": 0.5}}}
            for i, k in enumerate(kinds)]
    cfg = {"no_quality": no_quality, "model": "m", "device": "cpu", "dtype": "float32", "batch_size": 1}
    assert plot({"methods": rows, "config": cfg}, tmp_path).stat().st_size > 1000


def test_verification_and_bench_score_different_draws_of_the_heldout_split(tmp_path, capsys):
    """Calibration picks its operating points on held-out images; the bench and 'stagevar
    evaluate' must not score the same images, or the searched policies gain a selection bias
    that the baselines do not have."""
    from calibrate.prompts import VERIFICATION_DRAW, bundled
    from calibrate.bench.methods import bench_prompts
    from stagevar.toy.prompts import is_heldout, make_split
    mini = load_model("infinity-mini", random_weights=True)
    bench = [it["prompt"] for it in bench_prompts(mini, 120)]
    verify = bundled("infinity-mini", "verification", 64)
    assert bench == bundled("infinity-mini", "heldout", 120) and VERIFICATION_DRAW != 0
    assert verify == [it["prompt"] for it in make_split("heldout", 64, seed=VERIFICATION_DRAW)]
    # generation noise depends on the prompt's batch and place in it: no batch of 8 is shared
    batches = {tuple(bench[i:i + 8]) for i in range(0, 120, 8)}
    assert not batches & {tuple(verify[i:i + 8]) for i in range(0, 64, 8)}
    assert sum(a == b for a, b in zip(bench, verify)) < 16                  # few coincide even by place
    assert all(is_heldout(it["spec"]) for it in make_split("heldout", 64, seed=VERIFICATION_DRAW)
               if it["spec"]["category"] in ("position", "color_attr", "counting"))
    assert [it["prompt"] for it in bench_prompts(mini, 24, draw=VERIFICATION_DRAW)] == verify[:24]
    rc = bench_main(TINY_ARGS + ["--prompt-draw", "-1", "--out", str(tmp_path)])
    assert rc == 1 and "--prompt-draw must be >= 0" in capsys.readouterr().err


def test_bench_notes_a_policy_calibrated_at_other_guidance(tiny, tmp_path, capsys):
    """The bench runs every method at the model's default guidance; a policy calibrated at another
    guidance is named, since its measured numbers hold for that guidance."""
    from stagevar.policy import base_provenance
    n = len(tiny.scale_schedule)
    point = OperatingPoint(default_stages(n, n - 1), tuple(ScalePlan(k, guidance="cond_only", keep=0.5) if k == n - 1
                                                          else ScalePlan(k) for k in range(n)))
    for name, guidance in (("other.yaml", [1.0] * n), ("same.yaml", tiny.default_guidance)):
        Policy(model=binding_for(tiny), operating_points={"2x": point}, default="2x",
               provenance=base_provenance(guidance=guidance)).save(tmp_path / name)
    rc = bench_main(TINY_ARGS + ["--no-quality", "--no-plot", "--no-memory", "--baselines", "none",
                                 "--policy", str(tmp_path / "other.yaml"), "--policy", str(tmp_path / "same.yaml"),
                                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "was calibrated with guidance" in line]
    assert len(notes) == 1 and "other.yaml" in notes[0] and "guidance 1" in notes[0]
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "other.yaml (calibrated at guidance 1,1," in md and "same.yaml (calibrated" not in md
    # --guidance: every method runs at it, and then the other policy is the one benched as calibrated
    rc = bench_main(TINY_ARGS + ["--no-quality", "--no-plot", "--no-memory", "--baselines", "none", "--guidance", "1",
                                 "--policy", str(tmp_path / "other.yaml"), "--policy", str(tmp_path / "same.yaml"),
                                 "--out", str(tmp_path / "out1")])
    err = capsys.readouterr().err
    assert rc == 0, err
    notes = [line for line in err.splitlines() if "was calibrated with guidance" in line]
    assert len(notes) == 1 and "same.yaml" in notes[0]
    res = json.loads((tmp_path / "out1" / "bench.json").read_text())
    assert res["config"]["guidance"] == 1.0 and "runs at guidance 1." in (tmp_path / "out1" / "bench.md").read_text()
    rc = bench_main(TINY_ARGS + ["--no-quality", "--guidance", "1,2", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 1 and "2 values" in err and "Traceback" not in err


def test_bench_is_a_calibrate_command_and_stagevar_bench_says_where_it_went(capsys):
    """The bench needs the calibration metrics, so it lives in ``calibrate``; ``stagevar bench``
    names the new command with the user's own arguments and exits 2."""
    from calibrate.cli import main as calibrate_main
    from stagevar.cli import main as stagevar_main
    b = build_bench_parser()
    assert b.formatter_class is argparse.RawDescriptionHelpFormatter
    assert "examples:" in b.epilog and "stagevar-calibrate bench" in b.epilog
    args = b.parse_args(["--model", "infinity-tiny", "--policy", "a.yaml", "--policy", "b.yaml", "--no-quality"])
    assert args.policy == [Path("a.yaml"), Path("b.yaml")] and args.no_quality
    assert args.repeats == 5 and args.batch_size == 1 and args.baselines == ",".join(BASELINES)
    with pytest.raises(SystemExit) as exc:
        calibrate_main(["bench", "--help"])
    assert exc.value.code == 0 and "stagevar-calibrate bench" in capsys.readouterr().out
    assert stagevar_main(["bench", "--model", "infinity-tiny", "--no-quality"]) == 2
    err = capsys.readouterr().err
    assert "stagevar-calibrate bench --model infinity-tiny --no-quality" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:                  # other commands still reject unknown arguments
        stagevar_main(["list-models", "--no-quality"])
    assert exc.value.code == 2 and "unrecognized arguments: --no-quality" in capsys.readouterr().err


def test_bench_errors_are_one_paragraph(tiny, tmp_path, capsys):
    rc = bench_main(TINY_ARGS + ["--no-quality", "--no-plot", "--baselines", "paper,tomesd", "--out", str(tmp_path)])
    assert rc == 1 and "unknown baseline 'tomesd'" in capsys.readouterr().err
    mini_policy = Policy.identity(load_model("infinity-mini", random_weights=True)).save(tmp_path / "mini.yaml")
    rc = bench_main(TINY_ARGS + ["--no-quality", "--no-plot", "--policy", str(mini_policy), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1 and "model.name" in err and "Traceback" not in err
    rc = bench_main(TINY_ARGS + ["--repeats", "0", "--out", str(tmp_path)])
    assert rc == 1 and "--repeats must be >= 1" in capsys.readouterr().err


def test_gpu_script_dry_run_on_cpu(tmp_path):
    """benchmarks/gpu.sh end to end on the CPU, with the engines a CPU runs, a budget the tiny model
    can meet (so the fitted plan is passed on to the batch step) and small batches, in float32 (the
    bfloat16 paths are checked in test_engine; on a CPU they are slow); the time limits are scaled
    up (a busy machine)."""
    env = dict(os.environ, STAGEVAR_BENCH_MODEL="infinity-tiny", STAGEVAR_BENCH_DEVICE="cpu",
               STAGEVAR_BENCH_DTYPE="float32", STAGEVAR_BENCH_REPEATS="1", STAGEVAR_BENCH_EXTRA="--threads 1",
               STAGEVAR_BENCH_BUDGET="1.01x", STAGEVAR_BENCH_BATCH="2", STAGEVAR_BENCH_LARGE_CHECK="0",
               STAGEVAR_BENCH_CHECK_MODELS="infinity-tiny",
               STAGEVAR_BENCH_SCALE="20", OUT=str(tmp_path), PYTHON=sys.executable)
    res = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu.sh")], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for engine in ("eager", "static"):
        assert f"| `fastvar@{engine}` |" in res.stdout and f"| `paper@{engine}` |" in res.stdout
    assert "comparisons identical to eager" in res.stdout
    fitted = tmp_path / "b1" / "fitted-1.01x.yaml"
    assert fitted.is_file() and "| `fitted-1.01x:1.01x@static` |" in res.stdout      # the b1 fit, benched at batch 2
    for f in ("env.txt", "steps.log", "b1/bench.md", "b1/bench.json", "b8/bench.json", "engine-check/engine_check.json"):
        assert (tmp_path / f).is_file(), f
    assert "vae_decode" in json.loads((tmp_path / "b1" / "bench.json").read_text())
    profile = json.loads((tmp_path / "profile-eager.out").read_text().strip().splitlines()[-1])
    assert profile["host_syncs_per_image"] == 0 and profile["engine"] == "eager"


def test_steady_allocator_is_applied_and_reported(monkeypatch):
    from stagevar import perf
    monkeypatch.setattr(perf, "_setting", "system default")
    monkeypatch.setenv("STAGEVAR_MALLOC", "system")
    assert perf.steady_allocator() == "system default (STAGEVAR_MALLOC=system)" == perf.allocator_setting()
    monkeypatch.delenv("STAGEVAR_MALLOC")
    import platform
    got = perf.steady_allocator()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert got == "glibc malloc: no mmap, no trim"
    else:
        assert got == "system default"
