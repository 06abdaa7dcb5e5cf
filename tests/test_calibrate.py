"""``calibrate``: the calibration record, the measurements, the policy search and the
``stagevar-calibrate`` command, on ``infinity-tiny`` with minimal settings.

One module-scoped fixture measures a record once (2 prompts, 1 seed, batch 2, one keep ratio,
sensitivity at the last two scales, one latency round); the other tests reuse it. Everything that
does not need generation (spectra, stages, latency model, budgets, search space) is tested on
hand-built inputs with hand-computed answers.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch

import calibrate.calibration as calibration
import calibrate.measure.common as common
from calibrate.calibration import MeasureSettings, measure, record_dir, record_inputs
from calibrate.measure.common import RunOutput, Subject, Variant, point_from_plans, variant_grid
from calibrate.measure.latency import LatencyModel
from calibrate.measure.sensitivity import compare
from calibrate.measure.spectra import effective_rank, spectra_rows
from calibrate.measure.stages import detect_stages
from calibrate.metrics import CodeAgreementScorer, scorer_for
from calibrate.record import RECORD_VERSION, CalibrationRecord, RecordError, UnitStore, content_key
from calibrate.search import (BudgetError, Objective, enqueue_seeds, feasible_ranked, neighbours, open_study, parse_budget,
                              parse_budgets, point_from_params, search_bounds, seed_params, suggest_policy)
from stagevar.models.registry import load_model
from stagevar.policy import OperatingPoint, ScalePlan, load_policy

optuna.logging.set_verbosity(optuna.logging.WARNING)

PROMPTS = ["a red circle", "two blue squares"]
SEEDS = [0]
BATCH = 2
SETTINGS = MeasureSettings(keeps=(0.5,), selections=("random_projection",), sensitivity_from=5,
                           latency_repeats=1, latency_check_policies=1)
SENS_FIELDS = ("ssim", "semantic", "hf_ratio", "quality", "quality_worst", "damage")


def _norm(d) -> str:
    """Canonical JSON text (tuples == lists, NaN == NaN) for comparing records."""
    return json.dumps(d, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def _record_variants(settings: MeasureSettings = SETTINGS) -> list[Variant]:
    return variant_grid(settings.keeps, settings.selections)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared, busy CPU, torch's thread pool spin-waits and a generation
    gets 4-10x slower. (The record key does not depend on the thread count.)"""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model():
    return load_model("infinity-tiny")


@pytest.fixture(scope="module")
def measured(model, tmp_path_factory):
    """(out directory, record) of one from-scratch calibration pass."""
    out = tmp_path_factory.mktemp("calibration")
    rec = measure(model, PROMPTS, SEEDS, out=out, batch_size=BATCH, settings=SETTINGS, progress=False)
    return out, rec


@pytest.fixture(scope="module")
def record(measured):
    return measured[1]


@pytest.fixture(scope="module")
def subject(model):
    return Subject(model, PROMPTS, SEEDS, BATCH)


@pytest.fixture(scope="module")
def reference(subject):
    return subject.run(None)


def _hand_record(n: int = 7, depth: int = 2, refinement_start: int = 4, semantic_end: int = 1) -> CalibrationRecord:
    sched = [[1, 2 ** k, 2 ** k] for k in range(n)]
    stages = {"semantic": [0, semantic_end], "structure": [semantic_end + 1, refinement_start - 1],
              "refinement": [refinement_start, n - 1], "rule": "hand-made", "evidence": {}}
    return CalibrationRecord(key="hand", inputs={"model": {"scale_schedule": sched}, "num_layers": depth},
                             convergence={}, sensitivity=[], spectra=[], latency={}, latency_check=[], stages=stages)


# ------------------------------------------------------------------------ 1. record round trip
def test_measured_record_is_complete(measured, model):
    out, rec = measured
    d = record_dir(out, rec.key)
    assert (d / "record.json").is_file() and (d / "spectra.npz").is_file()
    assert rec.num_scales == len(model.scale_schedule) == 7
    assert rec.version == RECORD_VERSION
    # sensitivity: scales 5, 6 x (cond, cfg+rp@0.5)
    assert sorted((r["scale"], r["variant"]) for r in rec.sensitivity) == [
        (5, "cfg+rp@0.5"), (5, "cond"), (6, "cfg+rp@0.5"), (6, "cond")]
    for r in rec.sensitivity:
        assert 0.0 <= r["quality"] <= 1.0 and r["damage"] == pytest.approx(1 - r["quality"])
    assert len(rec.latency_check) == 1
    assert set(rec.latency["variants"]) == {v.name for v in _record_variants()}
    assert {k for k in ("semantic", "structure", "refinement")} <= set(rec.stages)
    assert rec.spectra and rec.spectra_arrays


def test_record_round_trip(measured, tmp_path):
    out, rec = measured
    loaded = CalibrationRecord.load(record_dir(out, rec.key))
    assert loaded.key == rec.key
    assert _norm(loaded.to_json()) == _norm(rec.to_json())
    assert loaded.sha256() == rec.sha256()
    assert set(loaded.spectra_arrays) == set(rec.spectra_arrays)
    for k, v in rec.spectra_arrays.items():
        np.testing.assert_array_equal(loaded.spectra_arrays[k], v)
    # a loaded record re-saved and re-loaded is identical, field for field
    loaded.save(tmp_path / "copy")
    again = CalibrationRecord.load(tmp_path / "copy" / "record.json")
    assert again.to_json() == loaded.to_json()
    for k, v in loaded.spectra_arrays.items():
        np.testing.assert_array_equal(again.spectra_arrays[k], v)


def _copy_record(measured, tmp_path) -> Path:
    out, rec = measured
    dst = tmp_path / "rec"
    shutil.copytree(record_dir(out, rec.key), dst)
    return dst


def test_record_newer_version_refused(measured, tmp_path):
    d = _copy_record(measured, tmp_path)
    data = json.loads((d / "record.json").read_text())
    data["version"] = RECORD_VERSION + 1
    (d / "record.json").write_text(json.dumps(data))
    with pytest.raises(RecordError, match="upgrade") as exc:
        CalibrationRecord.load(d)
    assert str(RECORD_VERSION + 1) in str(exc.value)


def test_record_unknown_field_refused(measured, tmp_path):
    d = _copy_record(measured, tmp_path)
    data = json.loads((d / "record.json").read_text())
    data["surprise"] = 1
    (d / "record.json").write_text(json.dumps(data))
    with pytest.raises(RecordError, match="unknown fields.*surprise"):
        CalibrationRecord.load(d)


def test_record_corrupted_json_refused(measured, tmp_path):
    d = _copy_record(measured, tmp_path)
    text = (d / "record.json").read_text()
    (d / "record.json").write_text(text[: len(text) // 2])
    with pytest.raises(RecordError, match="not a valid calibration record") as exc:
        CalibrationRecord.load(d)
    assert "record.json" in str(exc.value) and "measure again" in str(exc.value)
    (d / "record.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RecordError, match="not a valid calibration record"):
        CalibrationRecord.load(d)


def test_record_missing_refused(tmp_path):
    with pytest.raises(RecordError, match="no calibration record"):
        CalibrationRecord.load(tmp_path)


@pytest.mark.parametrize("mutate", ["old_version", "missing_field"])
def test_record_old_or_incomplete_refused_cleanly(measured, tmp_path, mutate):
    d = _copy_record(measured, tmp_path)
    data = json.loads((d / "record.json").read_text())
    if mutate == "old_version":
        data["version"] = 0
    else:
        del data["stages"]
    (d / "record.json").write_text(json.dumps(data))
    with pytest.raises(RecordError):
        CalibrationRecord.load(d)


# ---------------------------------------------------------------------------- 2. cache and key
def test_cache_hit_runs_no_generation(measured, model, monkeypatch):
    out, rec = measured

    def boom(*a, **k):
        raise AssertionError("generation ran on a cache hit")

    monkeypatch.setattr(common.Subject, "run", boom)
    monkeypatch.setattr(calibration, "Subject", boom)          # not even built
    monkeypatch.setattr(calibration, "measure_variant", boom)
    again = measure(model, PROMPTS, SEEDS, out=out, batch_size=BATCH, settings=SETTINGS, progress=False)
    assert again.key == rec.key
    assert _norm(again.to_json()) == _norm(rec.to_json())


def test_key_depends_on_every_input(model, record):
    def key(prompts=PROMPTS, seeds=SEEDS, batch=BATCH, guidance=model.default_guidance, settings=SETTINGS):
        return content_key(record_inputs(model, prompts, seeds, batch, guidance, settings))

    base = key()
    assert base == record.key == key()                      # deterministic, and what measure() used
    changed = {
        "seed": key(seeds=[1]),
        "more seeds": key(seeds=[0, 1]),
        "prompt": key(prompts=["a red circle", "two green squares"]),
        "prompt order": key(prompts=PROMPTS[::-1]),
        "batch": key(batch=1),
        "guidance": key(guidance=model.default_guidance + 1.0),
        "keeps": key(settings=dataclasses.replace(SETTINGS, keeps=(0.25,))),
        "selections": key(settings=dataclasses.replace(SETTINGS, selections=("deviation",))),
        "sensitivity_from": key(settings=dataclasses.replace(SETTINGS, sensitivity_from=4)),
        "latency_repeats": key(settings=dataclasses.replace(SETTINGS, latency_repeats=2)),
    }
    param = next(model.parameters())
    saved = param.detach().clone()
    with torch.no_grad():
        param.add_(0.5)                                      # other weights, same architecture
        changed["weights"] = key()
        param.copy_(saved)
    assert key() == base
    for what, k in changed.items():
        assert k != base, what
    assert len(set(changed.values())) == len(changed)


# ------------------------------------------------------------------------------------ 3. resume
def test_resume_after_interruption(model, measured, tmp_path, monkeypatch):
    out, record = measured
    calls = []
    real = calibration.measure_variant

    def counting(subject, ref, scale, variant, *a, **k):
        calls.append((scale, variant.name))
        return real(subject, ref, scale, variant, *a, **k)

    monkeypatch.setattr(calibration, "measure_variant", counting)
    with pytest.raises(KeyboardInterrupt):
        measure(model, PROMPTS, SEEDS, out=tmp_path, batch_size=BATCH, settings=SETTINGS, progress=False,
                interrupt_after=2)
    d = record_dir(tmp_path, record.key)
    assert not (d / "record.json").exists()
    units = sorted(p.name for p in (d / "units").glob("*.json"))
    assert units == ["convergence.json", "sensitivity__k05__cond.json"]
    assert calls == [(5, "cond")]

    # finished latency units (same key, so interchangeable) are also reused, not re-measured: this
    # also keeps the test short (the latency pass is 10 generations)
    for u in ("latency__round0.json", "latency_check.json"):
        shutil.copy(record_dir(out, record.key) / "units" / u, d / "units" / u)

    def no_latency(*a, **k):
        raise AssertionError("the latency check was re-measured")

    monkeypatch.setattr(calibration, "_latency_check", no_latency)
    calls.clear()
    puts = []
    real_put = UnitStore.put
    monkeypatch.setattr(UnitStore, "put", lambda self, name, value: (puts.append(name), real_put(self, name, value))[1])
    resumed = measure(model, PROMPTS, SEEDS, out=tmp_path, batch_size=BATCH, settings=SETTINGS, progress=False)
    assert (d / "record.json").is_file()
    # the finished units are not recomputed
    assert (5, "cond") not in calls and "convergence" not in puts and "sensitivity/k05/cond" not in puts
    assert sorted(calls) == [(5, "cfg+rp@0.5"), (6, "cfg+rp@0.5"), (6, "cond")]
    assert sorted(puts) == ["sensitivity/k05/cfg+rp@0.5", "sensitivity/k06/cfg+rp@0.5", "sensitivity/k06/cond"]
    # ... and the result equals the from-scratch record (deterministic on CPU)
    assert resumed.key == record.key
    assert resumed.convergence == record.convergence
    a = {(r["scale"], r["variant"]): r for r in resumed.sensitivity}
    b = {(r["scale"], r["variant"]): r for r in record.sensitivity}
    assert a.keys() == b.keys()
    for k in a:
        for f in SENS_FIELDS:
            assert a[k][f] == pytest.approx(b[k][f], abs=1e-9, rel=0), (k, f)
    assert resumed.stages["semantic"] == record.stages["semantic"]
    assert resumed.stages["refinement"] == record.stages["refinement"]
    for k, v in record.spectra_arrays.items():
        np.testing.assert_array_equal(resumed.spectra_arrays[k], v)
    assert resumed.latency["rows"] == record.latency["rows"] and resumed.latency_check == record.latency_check


# ------------------------------------------------------------------------- 4. identity = zero
def test_compare_same_output_is_exactly_zero_damage():
    rng = np.random.default_rng(0)
    out = RunOutput(rng.random((2, 3, 32, 32)).astype(np.float32), rng.integers(0, 2, (2, 40)).astype(np.float32),
                    0.1, [0.05, 0.05])
    m = compare(out, out, PROMPTS, CodeAgreementScorer())
    assert m["damage"] == 0.0 and m["quality"] == 1.0 and m["quality_worst"] == 1.0
    assert m["ssim"] == 1.0 and m["semantic"] == 1.0 and m["hf_ratio"] == 1.0


def test_every_mean_carries_its_standard_error_and_the_evaluator_drop_is_paired():
    from calibrate.measure.sensitivity import resolved, summarize
    ssim_v = np.array([1.0, 0.8, 0.6, 0.9])
    agree = np.array([1.0, 0.0, 1.0, 1.0])
    row = summarize({"ssim": ssim_v, "agree": agree, "hf": np.ones(4)})
    q = 0.5 * ssim_v + 0.5 * agree
    assert row["quality"] == pytest.approx(q.mean()) and row["images"] == 4
    assert row["quality_se"] == pytest.approx(q.std(ddof=1) / 2) and row["damage_se"] == row["quality_se"]
    assert row["ssim_se"] == pytest.approx(ssim_v.std(ddof=1) / 2) and row["semantic_se"] == pytest.approx(0.25)
    assert row["score"] is None and "score_drop_se" not in row
    # the evaluator: the drop's error comes from the per-image differences (same seed), not from
    # the two scores' errors: a policy failing exactly the images the full model passed...
    full = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    acc = np.array([0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    row = summarize({"ssim": np.ones(8), "agree": (acc == full).astype(float), "hf": np.ones(8), "sem_acc": acc, "ref_sem": full})
    assert row["score_full"] - row["score"] == pytest.approx(0.125)
    assert row["score_drop_se"] == pytest.approx((full - acc).std(ddof=1) / np.sqrt(8))
    assert row["score_drop_se"] < np.hypot(full.std(ddof=1), acc.std(ddof=1)) / np.sqrt(8)
    assert summarize({"ssim": [1.0], "agree": [1.0], "hf": [1.0]})["quality_se"] is None   # one image: unknown
    assert not resolved(0.1, None) and not resolved(0.1, 0.05) and resolved(0.11, 0.05)


def test_report_brackets_damages_the_images_cannot_tell_from_zero(record):
    from calibrate.report import sensitivity_table
    rec = copy.deepcopy(record)
    rec.sensitivity = [dict(rec.sensitivity[0], damage=0.2, damage_se=0.05, images=8),
                       dict(rec.sensitivity[1], damage=0.05, damage_se=0.05, images=8)]
    text = "\n".join(sensitivity_table(rec))
    assert "0.200 ± 0.050" in text and "(0.050 ± 0.050)" in text and "(0.200" not in text
    assert "8 calibration images" in text


def test_identity_run_has_zero_damage(model, subject, reference):
    n = subject.num_scales
    out = subject.run(point_from_plans(n, {}))
    m = compare(out, reference, subject.item_prompts, scorer_for(model.name))
    assert m["damage"] == 0.0
    assert m["quality"] == 1.0
    m2 = compare(reference, reference, subject.item_prompts, scorer_for(model.name))
    assert m2["damage"] == 0.0 and m2["quality"] == 1.0


# -------------------------------------------------------------------------------- 5. spectra
def test_effective_rank_known_values():
    assert effective_rank(np.array([3.0, 4.0, 0.0]), 0.99) == 2
    assert effective_rank(np.array([4.0, 3.0]), 0.60) == 1          # 16/25 = 0.64
    assert effective_rank(np.array([3.0, 4.0]), 0.64) == 1          # exactly at the threshold, unsorted input
    assert effective_rank(np.array([1.0, 0.0, 0.0]), 0.99) == 1
    assert effective_rank(np.ones(10), 0.95) == 10
    assert effective_rank(np.zeros(5), 0.9) == 0


def test_spectra_rows_known_rank():
    rng = np.random.default_rng(0)
    P, M, C, r = 2, 50, 16, 3
    mats = []
    for _ in range(P):
        a = rng.standard_normal((M, r))
        a -= a.mean(0, keepdims=True)                  # centred columns: the per-token centring keeps the rank
        u, _ = np.linalg.qr(a)
        v, _ = np.linalg.qr(rng.standard_normal((C, r)))
        mats.append(u @ np.diag([3.0, 2.0, 1.0]) @ v.T + 1e-9 * rng.standard_normal((M, C)))
    x = np.stack(mats)
    rows, arrays = spectra_rows({(5, 1): x})
    assert len(rows) == 1
    row = rows[0]
    assert (row["scale"], row["layer"], row["tokens"], row["full_rank"]) == (5, 1, M, C)
    assert row["eff_rank_99"] == 3
    assert row["eff_rank_95"] == 3                      # top-2 energy (9 + 4) / 14 = 0.93
    assert row["eff_rank_90"] == 2
    assert row["eff_rank_frac_99"] == pytest.approx(3 / 16)
    spec = arrays["scale05_layer01"]
    assert spec.shape == (min(M, C),)
    np.testing.assert_allclose(spec[:3], np.array([9, 4, 1]) / 14, rtol=1e-5)
    assert spec.sum() == pytest.approx(1.0, abs=1e-5)
    # max_len truncates the stored spectrum
    _, short = spectra_rows({(5, 1): x}, max_len=4)
    assert short["scale05_layer01"].shape == (4,)


def test_spectra_effective_rank_of_real_record(record):
    assert len(record.spectra) == len(record.spectra_arrays) == 7 * 2          # 7 scales x layers (1, 2)
    for row in record.spectra:
        if row["tokens"] == 1:                          # one token, centred: nothing left
            assert row["eff_rank_99"] == 0
        else:
            assert 1 <= row["eff_rank_90"] <= row["eff_rank_95"] <= row["eff_rank_99"] <= row["full_rank"]


# --------------------------------------------------------------------------------- 6. stages
def _curves(sem, ss):
    return {"semantic": list(sem), "ssim": list(ss)}


def test_stages_documented_rule():
    # curves normalised from scale 0 to the final image: sem_n = [0, .375, .9375, ...] -> semantic ends at 2;
    # ssim_n = [0, .11, .22, .44, .67, ...] -> structure ends at 4
    st = detect_stages(_curves([0.2, 0.5, 0.95, 0.97, 0.99, 1, 1], [0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1]), 7)
    assert st["semantic"] == [0, 2]
    assert st["structure"] == [3, 4]
    assert st["refinement"] == [5, 6]
    assert "0.9" in st["rule"] and "0.6" in st["rule"]
    # the semantic level is relative: sem_n = [0, .5, .95, 1, ...]
    st = detect_stages(_curves([0.1, 0.3, 0.48, 0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.65, 1]), 7)
    assert st["semantic"] == [0, 2] and st["structure"] == [3, 5] and st["refinement"] == [6, 6]
    # a flat semantic curve (verdicts agree from the start): the layout decides; ssim_n = [0, 0, .2, .3, .5, .75, 1]
    st = detect_stages(_curves([1.0] * 7, [0.8, 0.8, 0.84, 0.86, 0.9, 0.95, 1.0]), 7)
    assert st["semantic"] == [0, 3] and st["structure"] == [4, 5] and st["refinement"] == [6, 6]
    assert "flat" in st["rule"]


def test_stages_clamped():
    # never converges: semantic capped at n-3, refinement keeps the last scale
    st = detect_stages(_curves([0.0] * 6 + [1.0], [0.0] * 6 + [1.0]), 7)
    assert st["semantic"] == [0, 4] and st["structure"] == [5, 5] and st["refinement"] == [6, 6]
    # no scale distinguishable from the final image: conservative, only the last scale is refinement
    st = detect_stages(_curves([1.0] * 7, [1.0] * 7), 7)
    assert st["semantic"] == [0, 4] and st["structure"] == [5, 5] and st["refinement"] == [6, 6]


@pytest.mark.parametrize("n", [3, 4, 7, 10, 13])
def test_stages_partition_random_curves(n):
    rng = np.random.default_rng(n)
    for _ in range(200):
        sem = rng.random(n) if rng.random() < 0.5 else np.sort(rng.random(n))
        ss = rng.random(n) if rng.random() < 0.5 else np.sort(rng.random(n))
        st = detect_stages(_curves(sem, ss), n)
        (a, s), (b, t), (c, e) = st["semantic"], st["structure"], st["refinement"]
        assert a == 0 and b == s + 1 and c == t + 1 and e == n - 1          # contiguous partition of 0..n-1
        assert s <= n - 3                                                   # semantic never past n-3
        assert t >= b                                                       # structure not empty
        assert e >= c >= 1                                                  # refinement never empty, never scale 0


# --------------------------------------------------------------------------- 7. latency model
def _hand_latency():
    """3 scales; variants cfg / cond at keep 1, 0.5, 0.25 (random projection)."""
    secs = {
        "cfg": [0.1, 0.2, 0.4], "cfg+rp@0.5": [0.1, 0.15, 0.25], "cfg+rp@0.25": [0.1, 0.12, 0.15],
        "cond": [0.06, 0.1, 0.2], "cond+rp@0.5": [0.06, 0.08, 0.12], "cond+rp@0.25": [0.06, 0.07, 0.08],
    }
    rows = [{"scale": k, "variant": v, "seconds": s[k], "p90": s[k]} for v, s in secs.items() for k in range(3)]
    variants = variant_grid((0.5, 0.25), ("random_projection",))
    assert {v.name for v in variants} == set(secs)
    return LatencyModel({"rows": rows, "overhead_s": 0.05}, variants, depth=4), [1, 4, 16]


def test_latency_identity_and_baseline():
    lm, tokens = _hand_latency()
    assert lm.predict(point_from_plans(3, {}), tokens) == pytest.approx(0.05 + 0.1 + 0.2 + 0.4)
    assert lm.baseline(tokens) == pytest.approx(0.75)


def test_latency_grid_points_and_interpolation():
    lm, tokens = _hand_latency()

    def at2(**kw):
        return lm.predict(point_from_plans(3, {2: ScalePlan(2, **kw)}), tokens) - 0.05 - 0.1 - 0.2

    assert at2(keep=0.5) == pytest.approx(0.25)
    assert at2(keep=0.25) == pytest.approx(0.15)
    assert at2(keep=0.75) == pytest.approx(0.5 * 0.25 + 0.5 * 0.4)          # halfway 0.5 .. 1.0
    assert at2(keep=0.375) == pytest.approx(0.5 * 0.15 + 0.5 * 0.25)        # halfway 0.25 .. 0.5
    assert at2(keep=0.4375) == pytest.approx(0.25 * 0.15 + 0.75 * 0.25)     # 7/16 tokens
    assert at2(keep_tokens=12) == pytest.approx(at2(keep=0.75))             # absolute token count
    # a selection without its own column uses the random-projection column
    assert at2(keep=0.5, selection="uniform") == pytest.approx(0.25)
    assert at2(keep=0.5, selection="deviation") == pytest.approx(0.25)
    # cond_only
    assert at2(guidance="cond_only") == pytest.approx(0.2)
    assert at2(guidance="cond_only", keep=0.75) == pytest.approx(0.5 * 0.12 + 0.5 * 0.2)
    # guidance dropped at scale 1 stays dropped at scale 2
    p = point_from_plans(3, {1: ScalePlan(1, guidance="cond_only")})
    assert lm.predict(p, tokens) == pytest.approx(0.05 + 0.1 + 0.1 + 0.2)
    # skipping computes nothing
    assert at2(skip=True) == pytest.approx(0.0)


def test_latency_layer_subrange_mixes():
    lm, tokens = _hand_latency()
    pt = point_from_plans(3, {2: ScalePlan(2, keep=0.5, layers=(1, 4))})   # 3 of 4 layers on the subset
    expected = 0.05 + 0.1 + 0.2 + (0.25 * 0.4 + 0.75 * 0.25)
    assert lm.predict(pt, tokens) == pytest.approx(expected)
    pt = point_from_plans(3, {2: ScalePlan(2, keep=0.5, layers=(0, 4))})   # all layers = no mixing
    assert lm.predict(pt, tokens) == pytest.approx(0.05 + 0.1 + 0.2 + 0.25)


def test_latency_model_on_measured_record(model, record):
    lm = LatencyModel(record.latency, _record_variants(), model.num_layers)
    tokens = model.tokens_per_scale()
    assert lm.predict(point_from_plans(record.num_scales, {}), tokens) == pytest.approx(lm.baseline(tokens))
    assert all(r["measured_s"] > 0 and math.isfinite(r["error"]) for r in record.latency_check)


# ------------------------------------------------------------------------------------ 8. search
def test_seed_policies_expected_plans():
    rec = _hand_record(n=7, depth=2, refinement_start=4)        # search may start at scale 3
    seeds = seed_params(rec)
    assert list(seeds) == ["identity", "paper-like", "fastvar-like"]
    ident = suggest_policy(optuna.trial.FixedTrial(seeds["identity"]), rec)
    assert len(ident.plans) == 7 and all(p.is_identity for p in ident.plans)
    assert [p.scale for p in ident.plans] == list(range(7))

    paper = suggest_policy(optuna.trial.FixedTrial(seeds["paper-like"]), rec)
    for p in paper.plans:
        if p.scale < 4:
            assert p.is_identity, p
        else:                                       # the last three: guidance dropped, keep 0.5
            assert (p.guidance, p.keep, p.selection, p.layers) == ("cond_only", 0.5, "random_projection", None), p
    assert paper.stages["refinement"] == (4, 6)

    fv = suggest_policy(optuna.trial.FixedTrial(seeds["fastvar-like"]), rec)
    assert all(p.is_identity for p in fv.plans[:3])
    assert [p.keep for p in fv.plans[3:5]] == [0.6, 0.5] and all(p.skip for p in fv.plans[5:])
    assert all(p.selection == "deviation" and p.guidance == "cfg" for p in fv.plans[3:5])
    assert fv.stages["refinement"] == (3, 6)


def test_warm_start_points_round_trip_through_the_search_space():
    """An earlier policy's operating points become search parameters that replay to the same
    plans; points outside the space are refused (None), and enqueue_seeds reports them."""
    from calibrate.search import params_for_point
    rec = _hand_record(n=7, depth=8, refinement_start=4)            # search range 3..6, layer_start <= 2
    seeds = seed_params(rec)
    rng = np.random.default_rng(0)
    cases = list(seeds.values()) + [dict(seeds["paper-like"], first_accelerated=3, cond_only_from=5, skip_from=6,
                                         keep_3=0.2, selection_3="deviation", keep_4=1.0, restore="cached_output",
                                         layer_start=2)]
    for _ in range(20):                                              # random points of the space
        c = dict(seeds["identity"], first_accelerated=int(rng.integers(3, 8)), cond_only_from=int(rng.integers(3, 8)),
                 skip_from=int(rng.integers(3, 8)), layer_start=int(rng.integers(0, 3)))
        for k in range(3, 7):
            c[f"keep_{k}"] = float(rng.choice([1.0, 0.5, 0.2, 0.1]))
            c[f"selection_{k}"] = str(rng.choice(["random_projection", "deviation", "uniform"]))
        cases.append(c)
    for c in cases:
        point = point_from_params(rec, c)
        back = params_for_point(rec, point)
        assert back is not None and point_from_params(rec, back).plans == point.plans, c
    ident = point_from_params(rec, seeds["identity"])
    early = OperatingPoint(ident.stages, (ScalePlan(0), ScalePlan(1, keep=0.5)) + ident.plans[2:])   # before the range
    odd_keep = OperatingPoint(ident.stages, ident.plans[:5] + (ScalePlan(5, keep=0.33), ScalePlan(6)))
    short = OperatingPoint(ident.stages, ident.plans[:6])
    assert params_for_point(rec, early) is None and params_for_point(rec, odd_keep) is None
    assert params_for_point(rec, short) is None

    study = open_study("warm", optuna.storages.InMemoryStorage(), direction_multi=False, seed=0)
    left_out = enqueue_seeds(study, rec, {"3x": point_from_params(rec, cases[-1]), "odd": odd_keep})
    assert left_out == ["odd"]
    queued = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert [t.user_attrs["seed_policy"] for t in queued] == ["identity", "paper-like", "fastvar-like", "warm-start:3x"]
    asked = [suggest_policy(study.ask(), rec) for _ in queued]          # the sampler hands out the queue in order
    assert asked[-1].plans == point_from_params(rec, cases[-1]).plans
    assert enqueue_seeds(study, rec, {"3x": point_from_params(rec, cases[-1])}) == []        # seeded once


def _linear_latency(n: int, tokens: list[int]) -> LatencyModel:
    """Per-scale time proportional to the tokens computed: cfg 2 rows per token, cond 1, a subset
    at keep r computes r of them (random projection and deviation alike)."""
    variants = variant_grid((0.5, 0.25), ("random_projection", "deviation"))
    rows = [{"scale": k, "variant": v.name, "seconds": 1e-3 * tokens[k] * (1 if v.guidance == "cond_only" else 2) * v.keep,
             "p90": 0.0} for v in variants for k in range(n)]
    return LatencyModel({"rows": rows, "overhead_s": 0.01}, variants, depth=2)


def test_budget_seeds_fit_the_budget_with_the_largest_uniform_keep_then_spend_what_is_left():
    from calibrate.search import KEEPS, budget_seed_params, least_damaging_selection
    rec = _hand_record(n=7, depth=2, refinement_start=4)                 # search range 3..6
    rec.sensitivity = [{"scale": 5, "keep": 0.5, "selection": "deviation", "damage": 0.01},
                       {"scale": 5, "keep": 0.5, "selection": "random_projection", "damage": 0.20},
                       {"scale": 5, "keep": 0.25, "selection": "deviation", "damage": 0.30},
                       {"scale": 5, "keep": 0.25, "selection": "random_projection", "damage": 0.10},
                       {"scale": 6, "keep": 1.0, "selection": "random_projection", "damage": 0.00}]   # guidance row
    assert least_damaging_selection(rec, 5, 0.6) == "deviation"           # nearest measured keep: 0.5
    assert least_damaging_selection(rec, 5, 0.2) == "random_projection"   # nearest: 0.25
    assert least_damaging_selection(rec, 6, 0.5) == "random_projection"   # nothing measured: the default
    tokens = [1, 4, 16, 36, 64, 100, 169]
    lm = _linear_latency(7, tokens)
    full = lm.baseline(tokens)
    paper = lm.predict(point_from_params(rec, seed_params(rec)["paper-like"]), tokens)   # 2.7x
    assert budget_seed_params(rec, lm, tokens, paper) == {}               # the paper-like seed meets it: none added
    for budget in (paper * 0.99, full / 3, full / 4, full / 5):
        assert budget < paper
        seeds = budget_seed_params(rec, lm, tokens, budget)
        assert seeds
        starts = []
        uniform = {name: params for name, params in seeds.items() if "," not in name}
        for name, params in seeds.items():
            if "," in name:                       # the parent's left-over budget spent on one scale
                parent = uniform[name.split(",")[0]]
                changed = [k for k in params if params[k] != parent[k]]
                f = int(changed[0].split("_")[1])
                assert set(changed) <= {f"keep_{f}", f"selection_{f}"} and params[f"keep_{f}"] > parent[f"keep_{f}"]
                assert name == f"{name.split(',')[0]},{f}@{params[f'keep_{f}']:g}"
                assert lm.predict(point_from_params(rec, params), tokens) <= budget
                i = KEEPS.index(params[f"keep_{f}"])
                if i > 0:                          # one notch more on that scale misses the budget
                    assert lm.predict(point_from_params(rec, dict(params, **{f"keep_{f}": KEEPS[i - 1]})), tokens) > budget
        for name, params in uniform.items():
            point = point_from_params(rec, params)
            s, keep = params["first_accelerated"], params[f"keep_{params['first_accelerated']}"]
            starts.append(s)
            assert name == f"fitted:{s}@{keep:g}"
            assert lm.predict(point, tokens) <= budget
            assert all(p.is_identity for p in point.plans[:s])
            assert all(p.guidance == "cond_only" and not p.skip and p.keep == keep for p in point.plans[s:])
            if keep < 1.0:
                assert [p.selection for p in point.plans[s:]] == [least_damaging_selection(rec, k, keep) for k in range(s, 7)]
            if keep != KEEPS[0]:                                          # one notch more tokens misses the budget
                looser = dict(params, **{f"keep_{k}": KEEPS[KEEPS.index(keep) - 1] for k in range(s, 7)})
                assert lm.predict(point_from_params(rec, looser), tokens) > budget
        assert starts == sorted(starts) and set(starts) <= set(range(3, 7))
        for s in set(range(3, 7)) - set(starts):                          # a missing start cannot meet the budget
            tight = dict(seed_params(rec)["identity"], first_accelerated=s, cond_only_from=s,
                         **{f"keep_{k}": KEEPS[-1] for k in range(s, 7)})
            assert lm.predict(point_from_params(rec, tight), tokens) > budget
    assert [k for k in budget_seed_params(rec, lm, tokens, paper * 0.99) if "," not in k] == \
        ["fitted:3@0.6", "fitted:4@0.4", "fitted:5@0.1"]
    assert any("," in k for k in budget_seed_params(rec, lm, tokens, full / 4))
    assert budget_seed_params(rec, lm, tokens, full / 100) == {}          # an impossible budget: none
    # an enqueued plan (a warm start's point) that computes every scale within the budget: none;
    # one that gets there by skipping scales does not count
    budget = full / 4
    fitted = budget_seed_params(rec, lm, tokens, budget)
    every_scale = next(iter(fitted.values()))
    assert every_scale["first_accelerated"] == 3
    skipping = dict(seed_params(rec)["identity"], first_accelerated=3, cond_only_from=3, skip_from=4)
    assert lm.predict(point_from_params(rec, skipping), tokens) <= budget
    assert budget_seed_params(rec, lm, tokens, budget, [every_scale]) == {}
    assert budget_seed_params(rec, lm, tokens, budget, [skipping]) == fitted

    study = open_study("fitted", optuna.storages.InMemoryStorage(), direction_multi=False, seed=0)
    fitted = budget_seed_params(rec, lm, tokens, full / 3)
    enqueue_seeds(study, rec, fitted=fitted)
    queued = [t.user_attrs["seed_policy"] for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert queued == ["identity", "paper-like", "fastvar-like", *fitted]


def test_scales_are_skipped_only_when_no_plan_computing_every_scale_meets_the_budget():
    from types import SimpleNamespace

    from calibrate.search import skipping_allowed, verification_candidates
    rec = _hand_record(n=7, depth=2, refinement_start=4)                 # search range 3..6
    tokens = [1, 4, 16, 36, 64, 100, 169]
    lm = _linear_latency(7, tokens)
    full = lm.baseline(tokens)
    cheapest = dict(seed_params(rec)["identity"], first_accelerated=3, cond_only_from=3,
                    **{f"keep_{k}": 0.1 for k in range(3, 7)})
    floor = lm.predict(point_from_params(rec, cheapest), tokens)        # the cheapest plan computing every scale
    assert full / 3 > floor
    assert not skipping_allowed(rec, lm, tokens, full / 3) and not skipping_allowed(rec, lm, tokens, floor)
    assert skipping_allowed(rec, lm, tokens, floor * 0.99) and skipping_allowed(rec, lm, tokens, None)
    # the study's space, its seeds, the local search's moves and the candidates follow the rule
    study = open_study("noskip", optuna.storages.InMemoryStorage(), direction_multi=False, seed=0)
    enqueue_seeds(study, rec, allow_skip=False)
    queued = [t.user_attrs["seed_policy"] for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert queued == ["identity", "paper-like"]                           # the FastVAR-like seed skips two scales
    for _ in range(30):
        t = study.ask()
        point = suggest_policy(t, rec, allow_skip=False)
        assert not any(p.skip for p in point.plans)
        study.tell(t, 0.5)
    skipping = dict(cheapest, skip_from=5)
    assert any(nb["skip_from"] < 7 for nb in neighbours(rec, cheapest))
    assert all(nb["skip_from"] == 7 for nb in neighbours(rec, cheapest, allow_skip=False))
    trials = [SimpleNamespace(number=i, params=params, value=value, user_attrs={"predicted_latency_s": 0.5})
              for i, (params, value) in enumerate(((skipping, 0.9), (cheapest, 0.8)))]
    assert [t.value for t, _ in verification_candidates(rec, trials, 1.0, k=3, k_near=0)] == [0.9, 0.8]
    assert [t.value for t, _ in verification_candidates(rec, trials, 1.0, k=3, k_near=0, allow_skip=False)] == [0.8]


def test_search_reaches_the_span_of_the_published_policies():
    """Stages measured late (refinement = the last scale only) still leave the last four scales to
    the search, so the FastVAR-like seed is the published FastVAR plan, not a truncated one."""
    from stagevar.baselines import fastvar_policy
    rec = _hand_record(n=10, depth=8, refinement_start=9)
    assert search_bounds(rec) == (6, 10)
    assert search_bounds(_hand_record(n=10, depth=8, refinement_start=5)) == (4, 10)   # early stages: earlier
    fv = suggest_policy(optuna.trial.FixedTrial(seed_params(rec)["fastvar-like"]), rec)
    ref = fastvar_policy(load_model("infinity-mini"))
    for got, want in zip(fv.plans, ref.plans):
        assert (got.skip, got.keep, got.selection, got.guidance) == (want.skip, want.keep, want.selection, want.guidance)


def test_verification_candidates_are_distinct_policies():
    from types import SimpleNamespace

    from calibrate.search import distinct_candidates
    rec = _hand_record(n=7, depth=2, refinement_start=4)
    seeds = seed_params(rec)
    # identity with other keep ratios / selections: nothing is accelerated, so the same policy
    ident2 = dict(seeds["identity"], keep_4=0.1, selection_5="deviation")
    # a skipped scale's keep ratio does not matter either
    skip_a = dict(seeds["paper-like"], skip_from=6, keep_6=0.5)
    skip_b = dict(seeds["paper-like"], skip_from=6, keep_6=0.1)
    ranked = [SimpleNamespace(number=i, params=p) for i, p in
              enumerate([seeds["identity"], ident2, skip_a, skip_b, seeds["paper-like"], seeds["fastvar-like"]])]
    got = distinct_candidates(rec, ranked, 3)
    assert [t.number for t, _ in got] == [0, 2, 4]                 # best first, duplicates skipped
    assert got[1][1].plans[6].skip and not got[2][1].plans[6].skip
    assert [t.number for t, _ in distinct_candidates(rec, ranked, 10)] == [0, 2, 4, 5]


def test_verification_also_measures_trials_just_over_the_budget():
    """Trials predicted up to 10% over the budget are verified too (the latency model's error band),
    best quality first and never the same policy twice; trials further out are not."""
    from calibrate.search import measured_trials, verification_candidates
    rec = _hand_record(n=7, depth=2, refinement_start=4)
    seeds = seed_params(rec)
    rows = [(seeds["paper-like"], 0.80, 0.90),                      # 0 feasible
            (seeds["fastvar-like"], 0.95, 1.05),                    # 1 near
            (seeds["identity"], 1.00, 1.30),                        # 2 too slow even for the margin
            (dict(seeds["paper-like"], keep_6=0.1), 0.99, 1.08),    # 3 near
            (dict(seeds["paper-like"], keep_3=0.1), 0.97, 1.02)]    # 4 near, but trial 0's policy (scale 3 not accelerated)
    study = optuna.create_study(direction="maximize")
    for params, _, _ in rows:
        study.enqueue_trial(params)

    def objective(trial):
        suggest_policy(trial, rec)
        _, quality, predicted = rows[trial.number]
        trial.set_user_attr("predicted_latency_s", predicted)
        trial.set_constraint("latency", predicted - 1.0)
        return quality

    study.optimize(objective, n_trials=len(rows))
    trials = measured_trials(study)
    got = verification_candidates(rec, trials, 1.0, k=3, k_near=2)
    assert [t.number for t, _ in got] == [0, 3, 1]
    assert [t.number for t, _ in verification_candidates(rec, trials, 1.0, k=3, k_near=0)] == [0]
    # the predicted latency is absolute: for a budget of 1.1 s, trials 3 and 4 are within it, and
    # trial 4 (trial 0's policy) counts once; a trial from another budget's study ranks the same way
    got = verification_candidates(rec, trials, 1.1, k=3, k_near=0)
    assert [t.number for t, _ in got] == [3, 4, 1]


def test_neighbours_are_single_moves_inside_the_space():
    from calibrate.search import KEEPS
    rec = _hand_record(n=7, depth=8, refinement_start=4)
    params = dict(seed_params(rec)["paper-like"], keep_5=0.5, layer_start=2)
    got = neighbours(rec, params)
    for nb in got:
        assert set(nb) == set(params)
        assert sum(nb[k] != params[k] for k in params) == 1
        suggest_policy(optuna.trial.FixedTrial(nb), rec)            # a valid point of the space
    moved = [next(k for k in params if nb[k] != params[k]) for nb in got]
    # 4 searched scales: keep 0.5 -> 0.6 / 0.4, keep 1.0 -> 0.75 only; two other selections each
    assert sorted(nb["keep_5"] for nb in got if moved[got.index(nb)] == "keep_5") == [0.4, 0.6]
    assert [nb["keep_3"] for nb, m in zip(got, moved) if m == "keep_3"] == [KEEPS[1]]
    assert moved.count("selection_6") == 2 and moved.count("restore") == 1
    assert sorted(nb["layer_start"] for nb, m in zip(got, moved) if m == "layer_start") == [1]   # 2 is the top (8 // 4)
    assert sorted(nb["first_accelerated"] for nb, m in zip(got, moved) if m == "first_accelerated") == [3, 5]
    assert len({json.dumps(nb, sort_keys=True) for nb in got}) == len(got)


def test_scales_computed_in_full_carry_no_token_settings():
    """Selection, restoration and layer range mean nothing for a scale computed in full: they are
    not written, so two parameter sets differing only there are the same policy."""
    rec = _hand_record(n=7, depth=8, refinement_start=4)
    params = dict(seed_params(rec)["paper-like"], keep_6=1.0, selection_6="uniform", restore="cached_output", layer_start=2)
    point = point_from_params(rec, params)
    assert point.plans[6] == ScalePlan(6, guidance="cond_only")
    assert point.plans[5].keep == 0.5 and point.plans[5].layers == (2, 8) and point.plans[5].restore == "cached_output"
    other = point_from_params(rec, dict(params, selection_6="deviation"))
    assert other == point


class _ToyObjective:
    """Stands in for :class:`Objective`: latency and quality are known functions of the point."""

    tokens = None

    def __init__(self, rec):
        self.rec, self.calls = rec, []
        self.latency = type("L", (), {"predict": staticmethod(lambda point, tokens: self.cost(point))})()

    @staticmethod
    def cost(point):
        return sum(0.0 if p.skip else 2.0 ** p.scale * p.keep * (0.5 if p.guidance == "cond_only" else 1.0)
                   for p in point.plans)

    @staticmethod
    def quality(point):
        damage = 0.0
        for p in point.plans:
            if p.skip:
                damage += 0.4
            elif not p.is_identity:
                damage += (1 - p.keep) * (0.05 if p.selection == "deviation" else 0.2) + (0.02 if p.guidance == "cond_only" else 0)
        return 1.0 - damage

    def __call__(self, trial):
        point = suggest_policy(trial, self.rec)
        self.calls.append(json.dumps([p.to_dict() for p in point.plans], sort_keys=True))
        trial.set_user_attr("predicted_latency_s", self.cost(point))
        return self.quality(point)


def test_local_search_climbs_to_a_better_policy_within_the_target():
    from calibrate.search import local_search, measured_trials, ranked_within
    rec = _hand_record(n=7, depth=2, refinement_start=4)
    obj = _ToyObjective(rec)
    full = obj.cost(point_from_params(rec, seed_params(rec)["identity"]))
    target = 0.6 * full
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    # the sampler's result: random-projection subsets, the best of them just over the target
    start = dict(seed_params(rec)["identity"], first_accelerated=5, keep_5=0.5, keep_6=0.5)
    inside = dict(start, keep_6=0.3)
    for params in (start, inside):
        study.enqueue_trial(params)
    study.optimize(obj, n_trials=2)
    sampled = measured_trials(study)
    assert sampled[0].user_attrs["predicted_latency_s"] > target >= sampled[1].user_attrs["predicted_latency_s"]
    before = ranked_within(sampled, target)[0].value
    obj.calls.clear()
    added = local_search(study, obj, rec, sampled, target, max_trials=200)
    assert added and all("local_from" in t.user_attrs for t in added)
    assert all(t.user_attrs["predicted_latency_s"] <= target for t in added)     # nothing over the target is measured
    assert len(set(obj.calls)) == len(obj.calls)                              # no policy measured twice
    best = ranked_within(measured_trials(study), target)[0]
    assert best.value > before
    best_point = point_from_params(rec, best.params)
    assert best_point.plans[6].selection == "deviation"                       # the cheap, better selection was found
    # a local optimum: no unmeasured neighbour within the target is better
    for nb in neighbours(rec, best.params):
        pt = point_from_params(rec, nb)
        if obj.cost(pt) <= target:
            assert obj.quality(pt) <= best.value + 1e-12
    # resumed: the study already holds the climb, so nothing is measured again
    obj.calls.clear()
    assert local_search(study, obj, rec, measured_trials(study), target, max_trials=200) == []
    assert obj.calls == []


def test_local_search_runs_neighbours_an_interrupted_run_left_queued_once():
    from calibrate.search import _plan_key, local_search, measured_trials
    rec = _hand_record(n=7, depth=2, refinement_start=4)
    obj = _ToyObjective(rec)
    study = optuna.create_study(direction="maximize")
    start = dict(seed_params(rec)["identity"], first_accelerated=5, keep_5=0.5, keep_6=0.5)
    study.enqueue_trial(start)
    study.optimize(obj, n_trials=1)
    target = obj.cost(point_from_params(rec, seed_params(rec)["identity"]))
    left_over = [nb for nb in neighbours(rec, start) if obj.cost(point_from_params(rec, nb)) <= target][:2]
    for nb in left_over:                                          # queued, then the run was killed
        study.enqueue_trial(nb, user_attrs={"local_from": 0})
    local_search(study, obj, rec, measured_trials(study), target, max_trials=40)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.WAITING not in states
    local = [t for t in measured_trials(study) if "local_from" in t.user_attrs]
    keys = [_plan_key(point_from_params(rec, t.params)) for t in local]
    assert len(set(keys)) == len(keys)                            # each policy measured once
    assert {_plan_key(point_from_params(rec, nb)) for nb in left_over} <= set(keys)


def test_trials_bound_the_enqueued_seeds_and_the_local_search_runs_only_its_own(caplog):
    """``--trials`` counts every sampler trial, enqueued seeds included: with more seeds than trials
    only the first ones are queued (the rest named in a warning), so the sampler's ``optimize``
    consumes the whole queue; a queue left by a run with a higher ``--trials`` is dropped before
    the local search, which would otherwise run those seeds as its own trials."""
    from calibrate.search import budget_seed_params, drop_queued_seeds, is_local, local_search, measured_trials
    rec = _hand_record(n=7, depth=2, refinement_start=4)
    tokens = [1, 4, 16, 36, 64, 100, 169]
    lm = _linear_latency(7, tokens)
    fitted = budget_seed_params(rec, lm, tokens, lm.baseline(tokens) / 4)
    assert len(fitted) >= 3
    obj = _ToyObjective(rec)
    for trials in (2, 4, 3 + len(fitted)):
        study = open_study(f"cap{trials}", optuna.storages.InMemoryStorage(), direction_multi=False, seed=0)
        with caplog.at_level("WARNING", logger="calibrate.search"):
            enqueue_seeds(study, rec, fitted=fitted, limit=trials)
        names = ["identity", "paper-like", "fastvar-like", *fitted]
        assert [t.user_attrs["seed_policy"] for t in study.trials] == names[:trials]
        if trials < len(names):
            assert f"--trials {trials} is fewer than the {len(names)} seed policies" in caplog.text
            named = caplog.text.split("seed policies: ", 1)[1].split(" not tried", 1)[0].split(", ")
            assert named == names[trials:]
        else:
            assert "not tried" not in caplog.text
        caplog.clear()
        study.optimize(obj, n_trials=trials)
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * trials
    # a study seeded for 3 + len(fitted) trials, resumed with --trials 4: the queue beyond is dropped
    study = open_study("lowered", optuna.storages.InMemoryStorage(), direction_multi=False, seed=0)
    enqueue_seeds(study, rec, fitted=fitted, limit=3 + len(fitted))
    study.optimize(obj, n_trials=4)
    assert drop_queued_seeds(study) == len(fitted) - 1
    target = obj.cost(point_from_params(rec, seed_params(rec)["identity"]))
    local_search(study, obj, rec, measured_trials(study), target, max_trials=5)
    sampled = [t for t in study.trials if not is_local(t) and t.state == optuna.trial.TrialState.COMPLETE]
    assert len(sampled) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials if is_local(t))
    assert not [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]


def test_local_search_respects_its_trial_budget_across_calls():
    from calibrate.search import local_search, measured_trials
    rec = _hand_record(n=7, depth=2, refinement_start=4)
    obj = _ToyObjective(rec)
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(dict(seed_params(rec)["identity"], first_accelerated=5, keep_5=0.5, keep_6=0.5))
    study.optimize(obj, n_trials=1)
    target = obj.cost(point_from_params(rec, seed_params(rec)["identity"]))
    assert len(local_search(study, obj, rec, measured_trials(study), target, max_trials=3)) == 3
    assert local_search(study, obj, rec, measured_trials(study), target, max_trials=3) == []
    assert len(local_search(study, obj, rec, measured_trials(study), target, max_trials=5)) <= 2


def test_fastvar_seed_uses_middle_layers_on_deep_models():
    rec = _hand_record(n=7, depth=32, refinement_start=4)
    fv = suggest_policy(optuna.trial.FixedTrial(seed_params(rec)["fastvar-like"]), rec)
    assert all(p.layers == (3, 32) for p in fv.plans[3:5])


def test_search_space_is_fixed_size(record):
    rec = _hand_record(n=7, depth=2, refinement_start=4)
    expected = {"first_accelerated", "cond_only_from", "skip_from", "restore", "layer_start"} | \
        {f"{w}_{k}" for k in range(3, 7) for w in ("keep", "selection")}
    for params in seed_params(rec).values():
        assert set(params) == expected
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        t = study.ask()
        point = suggest_policy(t, rec)
        assert set(t.params) == expected
        assert len(point.plans) == 7
        # any sampled policy replays exactly through FixedTrial
        assert suggest_policy(optuna.trial.FixedTrial(t.params), rec) == point
        study.tell(t, 0.0)
    # the measured record: the seeds cover the same space as suggest_policy
    names = None
    for params in seed_params(record).values():
        suggest_policy(optuna.trial.FixedTrial(params), record)
        names = names or set(params)
        assert set(params) == names


@pytest.mark.parametrize("text,speedup,seconds", [
    ("3x", 3.0, None), ("2.5x", 2.5, None), ("700ms", None, 0.7), ("1.5s", None, 1.5), (" 3X ", 3.0, None)])
def test_parse_budget_accepts(text, speedup, seconds):
    b = parse_budget(text)
    assert b.speedup == speedup
    assert b.seconds == pytest.approx(seconds) if seconds is not None else b.seconds is None
    assert b.target_seconds(2.0) == pytest.approx(2.0 / speedup if speedup else seconds)


def test_parse_budgets_list():
    bs = parse_budgets("2x,3x")
    assert [b.speedup for b in bs] == [2.0, 3.0] and [b.name for b in bs] == ["2x", "3x"]
    assert [b.seconds for b in parse_budgets("700ms, 1.5s")] == pytest.approx([0.7, 1.5])


@pytest.mark.parametrize("text", ["0x", "-3x", "1x", "3", "fastest", "0ms", "3x,fastest"])
def test_parse_budget_rejects(text):
    with pytest.raises(BudgetError) as exc:
        parse_budgets(text)
    bad = text.split(",")[-1]
    assert repr(bad) in str(exc.value)
    assert exc.value.exit_code == 2


def test_parse_budgets_rejects_empty_and_repeats():
    with pytest.raises(BudgetError, match="no budget"):
        parse_budgets("")
    with pytest.raises(BudgetError, match="no budget"):
        parse_budgets(" , ")
    with pytest.raises(BudgetError, match="'3x,3x'.*repeats"):
        parse_budgets("3x,3x")


# -------------------------------------------------------------------------- 9. constraints
def test_objective_impossible_budget_all_infeasible_and_estimated(model, record, subject, reference, monkeypatch):
    lm = LatencyModel(record.latency, _record_variants(), model.num_layers)
    study = open_study("impossible", None, direction_multi=False, seed=0)
    enqueue_seeds(study, record)
    enqueue_seeds(study, record)                                   # a second call does not duplicate
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["seed_policy"] for t in waiting] == ["identity", "paper-like", "fastvar-like"]

    def boom(*a, **k):
        raise AssertionError("a clearly infeasible trial was generated")

    monkeypatch.setattr(common.Subject, "run", boom)
    obj = Objective(record, subject, lm, 1e-6, scorer_for(model.name), reference)
    study.optimize(obj, n_trials=4)
    trials = study.trials
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert [t.user_attrs.get("seed_policy") for t in trials[:3]] == ["identity", "paper-like", "fastvar-like"]
    for t in trials:
        assert t.constraints and all(c > 0 for c in t.constraints.values())
        assert t.user_attrs["quality_estimated"] is True
        assert 0.0 <= t.value <= 1.0
    assert trials[0].value == 1.0                                  # identity: no damage
    assert feasible_ranked(study) == []


def test_objective_feasible_trial_is_measured(model, record, subject, reference):
    lm = LatencyModel(record.latency, _record_variants(), model.num_layers)
    study = open_study("generous", None, direction_multi=False, seed=0)
    enqueue_seeds(study, record)
    obj = Objective(record, subject, lm, 1e6, scorer_for(model.name), reference)
    study.optimize(obj, n_trials=1)                                # the identity seed, generated for real
    t = study.trials[0]
    assert t.user_attrs["seed_policy"] == "identity"
    assert t.user_attrs["quality_estimated"] is False
    assert t.value == 1.0 and t.user_attrs["ssim"] == 1.0
    assert all(c <= 0 for c in t.constraints.values())
    assert [x.number for x in feasible_ranked(study)] == [0]


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
    argv = ["--model", "infinity-tiny", "--budget", "50x", "--prompts", str(prompts), "--num-prompts", "2",
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
    assert policy.provenance["guidance"] == rec.inputs["guidance"] == load_model("infinity-tiny").default_guidance
    assert policy.provenance["engine"] == rec.inputs["engine"] == "eager"          # the engine the latencies are of
    policy.save(tmp_path / "copy.yaml")
    assert load_policy(tmp_path / "copy.yaml") == policy

    # the study: journal-backed, 4 trials, seeds enqueued once
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    name = f"infinity-tiny.256.50x.{rec.key}"
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
    variants = {v.name: v for v in _record_variants()}
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
    argv = ["--model", "infinity-tiny", "--budget", "1.05x", "--prompts", str(prompts), "--num-prompts", "2",
            "--batch-size", "2", "--num-heldout", "2", "--num-report", "2", "--trials", "4", "--local-trials", "3", "--verify-candidates", "1",
            "--verify-near", "0", "--verify-repeats", "1", "--out", str(work), "--policy-out", str(work / "p.yaml"), "--quiet"]
    calibrate_main(argv)
    capsys.readouterr()
    name = f"infinity-tiny.256.1.05x.{rec.key}"

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
