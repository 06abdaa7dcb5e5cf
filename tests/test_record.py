"""The calibration record and the measurements: its round trip and refusals, the cache key,
resume, the comparisons (identity = zero damage, standard errors), spectra, stages and the
latency model. Measured on ``infinity-tiny`` once per session (``measured`` in conftest.py);
everything that needs no generation is tested on hand-built inputs with hand-computed answers."""
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
from calibrate.calibration import convergence_seeds, measure, record_dir, record_inputs
from calibrate.measure.common import RunOutput, point_from_plans, variant_grid
from calibrate.measure.latency import LatencyModel
from calibrate.measure.sensitivity import compare
from calibrate.measure.spectra import effective_rank, spectra_rows
from calibrate.measure.stages import boundary_support, detect_stages, stages_of
from calibrate.metrics import CodeAgreementScorer, scorer_for
from calibrate.record import RECORD_VERSION, CalibrationRecord, RecordError, UnitStore, content_key
from stagevar.policy import ScalePlan

from calib import BATCH, PROMPTS, SEEDS, SENS_FIELDS, SETTINGS, norm, record_variants

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------ 1. record round trip
def test_measured_record_is_complete(measured, model):
    out, rec = measured
    d = record_dir(out, rec.key)
    assert (d / "record.json").is_file() and (d / "spectra.npz").is_file()
    assert rec.num_scales == len(model.scale_schedule) == 7
    assert rec.version == RECORD_VERSION
    # sensitivity: guidance dropped from scale 4; scales 5, 6 x (cond, cfg+rp@0.5)
    assert sorted((r["scale"], r["variant"]) for r in rec.sensitivity) == [
        (4, "cond"), (5, "cfg+rp@0.5"), (5, "cond"), (6, "cfg+rp@0.5"), (6, "cond")]
    for r in rec.sensitivity:
        assert 0.0 <= r["quality"] <= 1.0 and r["damage"] == pytest.approx(1 - r["quality"])
    assert len(rec.latency_check) == 1
    assert set(rec.latency["variants"]) == {v.name for v in record_variants()}
    assert {k for k in ("semantic", "structure", "refinement")} <= set(rec.stages)
    assert rec.spectra and rec.spectra_arrays
    # the convergence curves hold the prompts with seeds 0-2 (stage_images 6), the sensitivity pass the record's seed
    images = rec.convergence["images"]
    assert convergence_seeds(SEEDS, len(PROMPTS), SETTINGS.stage_images) == [0, 1, 2]
    assert len(images["semantic"]) == len(images["structure"]) == 7
    assert {len(v) for v in images["semantic"] + images["structure"]} == {len(PROMPTS) * 3}
    assert {r["images"] for r in rec.sensitivity} == {len(PROMPTS) * len(SEEDS)}
    assert rec.convergence["ssim"][3] == pytest.approx(np.mean(images["structure"][3]), abs=1e-5)
    assert images["prompts"] == len(PROMPTS)               # image i shows prompt i mod 2: the bootstrap keeps its seeds
    assert "of the images" in rec.stages["rule"]
    assert (rec.stages["evidence"]["bootstrap"]["images"], rec.stages["evidence"]["bootstrap"]["prompts"]) == (6, 2)


def test_record_round_trip(measured, tmp_path):
    out, rec = measured
    loaded = CalibrationRecord.load(record_dir(out, rec.key))
    assert loaded.key == rec.key
    assert norm(loaded.to_json()) == norm(rec.to_json())
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
    assert norm(again.to_json()) == norm(rec.to_json())


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
        "guidance_from": key(settings=dataclasses.replace(SETTINGS, guidance_from=3)),
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
    assert units == ["convergence.json", "sensitivity__k04__cond.json"]
    assert calls == [(4, "cond")]

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
    assert (4, "cond") not in calls and "convergence" not in puts and "sensitivity/k04/cond" not in puts
    assert sorted(calls) == [(5, "cfg+rp@0.5"), (5, "cond"), (6, "cfg+rp@0.5"), (6, "cond")]
    assert sorted(puts) == ["sensitivity/k05/cfg+rp@0.5", "sensitivity/k05/cond", "sensitivity/k06/cfg+rp@0.5",
                            "sensitivity/k06/cond"]
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


def test_sensitivity_runs_the_unchanged_scales_once_and_measures_what_whole_runs_measure(model, subject, reference,
                                                                                         monkeypatch):
    """A sensitivity unit changes one scale; the scales before it are generated once per batch
    for every unit of that scale (the runtime's prefix) and each unit continues from there. The
    images, and so every number of the record, are those of generating each unit whole."""
    from calibrate.measure.common import Variant
    from calibrate.measure.sensitivity import measure_variant, variant_point
    from stagevar.runtime import Runtime
    made = []
    real = Runtime.prefix
    monkeypatch.setattr(Runtime, "prefix", lambda self, cond, scale, **k: made.append(scale) or real(self, cond, scale, **k))
    n = subject.num_scales
    scorer = scorer_for(model.name)
    batches = len(list(subject.batches()))
    for k in (n - 2, n - 1):
        for v in (Variant("cond_only"), Variant("cfg", 0.5, "random_projection"), Variant("cfg", 0.25, "deviation")):
            whole = subject.run(variant_point(subject, k, v))
            cont = subject.run(variant_point(subject, k, v), reuse_prefix=True)
            assert np.array_equal(whole.images, cont.images) and np.array_equal(whole.final_codes, cont.final_codes)
            row = measure_variant(subject, reference, k, v, scorer)
            monkeypatch.setattr(subject, "_first_changed", lambda point: None)        # whole runs
            assert measure_variant(subject, reference, k, v, scorer) == row
            monkeypatch.undo()
            monkeypatch.setattr(Runtime, "prefix", lambda self, cond, scale, **kw: made.append(scale) or real(self, cond, scale, **kw))
    assert made == [n - 2] * batches + [n - 1] * batches             # one prefix per batch and scale
    assert len(subject._prefixes) == batches                           # only the last scale's are kept
    assert subject._first_changed(point_from_plans(n, {})) is None    # the identity: nothing to continue


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


def test_the_default_rule_text_is_unchanged_so_earlier_records_keep_their_hash():
    """The rule text is part of a record's content hash, which a resumed study checks: with the
    default measures it must read as it did before measures could be chosen; other measures are
    named."""
    st = detect_stages(_curves([0.2, 0.5, 0.95, 0.97, 0.99, 1, 1], [0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1]), 7)
    assert st["rule"] == ("curves normalised from scale 0 (0) to the final image (1); semantic ends at the first scale with "
                          "normalised semantic agreement >= 0.9; structure ends at the first later scale with normalised "
                          "SSIM >= 0.6; the rest is refinement")
    flat = detect_stages(_curves([1.0] * 7, [0.8, 0.8, 0.84, 0.86, 0.9, 0.95, 1.0]), 7)["rule"]
    assert "semantic ends at the first scale with (semantic curve flat) normalised SSIM >= 0.25;" in flat
    named = dict(_curves([0.2, 0.5, 0.95, 0.97, 0.99, 1, 1], [0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1]),
                 semantic_measure="clip+dino", structure_measure="ssim+lpips")
    named["structure"] = named["ssim"]
    rule = detect_stages(named, 7)["rule"]
    assert "semantic agreement (clip+dino) >= 0.9" in rule and "normalised ssim+lpips >= 0.6" in rule


def _images_curves(sem_imgs, ss_imgs):
    """Curves (means and per-image values) from per-image values, scales x images."""
    sem, ss = np.asarray(sem_imgs, dtype=float), np.asarray(ss_imgs, dtype=float)
    return {"semantic": sem.mean(1).tolist(), "ssim": ss.mean(1).tolist(),
            "images": {"semantic": sem.tolist(), "structure": ss.tolist()}}


def test_stages_count_images_so_one_late_image_does_not_move_the_boundary():
    """Seven images decide their content at scale 2, one only at scale 5: the mean curve reaches
    0.9 at scale 5 (the late image holds it down), counting images gives scale 2 - where a draw
    without such an image would put it."""
    early = [0.0, 0.5, 0.95, 0.97, 0.98, 0.99, 1.0]
    late = [0.0, 0.0, 0.0, 0.0, 0.2, 0.95, 1.0]
    ss = [0.0, 0.2, 0.4, 0.7, 0.8, 0.9, 1.0]
    sem_imgs = np.array([early] * 7 + [late]).T
    ss_imgs = np.array([ss] * 8).T
    curves = _images_curves(sem_imgs, ss_imgs)
    by_image = detect_stages(curves, 7)
    assert by_image["semantic"] == [0, 2] and by_image["structure"] == [3, 3] and by_image["refinement"] == [4, 6]
    assert by_image["evidence"]["semantic_image_ends"] == [2] * 7 + [5]
    assert "50% of the images" in by_image["rule"]
    means = detect_stages({k: v for k, v in curves.items() if k != "images"}, 7)   # a record without per-image values
    assert means["semantic"] == [0, 4] and "of the images" not in means["rule"]
    without_late = detect_stages(_images_curves(sem_imgs[:, :7], ss_imgs[:, :7]), 7)
    assert without_late["semantic"] == by_image["semantic"] and without_late["structure"] == by_image["structure"]


def test_boundary_support_resamples_the_images_and_the_report_marks_an_unresolved_boundary():
    from calibrate.report import stage_support_lines
    ss = [0.0, 0.2, 0.4, 0.7, 0.8, 0.9, 1.0]
    firm = _images_curves(np.array([[0.0, 0.5, 0.95, 0.97, 0.98, 0.99, 1.0]] * 8).T, np.array([ss] * 8).T)
    b = boundary_support(firm, 7)
    assert b["support"] == 1.0 and b["semantic_end"] == {"2": 1.0} and b["images"] == 8
    st = stages_of(firm, [], 7)
    assert st["evidence"]["bootstrap"] == b
    lines = "\n".join(stage_support_lines(st))
    assert "semantic ends at 2 in 100% of the resamples: resolved" in lines and "unresolved" not in lines
    # half the images decide at scale 2, half at scale 3: the boundary is a coin toss
    split = _images_curves(np.array([[0.0, 0.5, 0.95, 0.97, 0.98, 0.99, 1.0]] * 4
                                    + [[0.0, 0.5, 0.6, 0.95, 0.98, 0.99, 1.0]] * 4).T, np.array([ss] * 8).T)
    b = boundary_support(split, 7)
    assert set(b["semantic_end"]) == {"2", "3"} and 0.3 < b["semantic_end"]["2"] < 0.9
    assert b == boundary_support(split, 7)                      # seeded: the same record, the same answer
    st = stages_of(split, [], 7)
    lines = "\n".join(stage_support_lines(st))
    assert f"semantic ends at {st['semantic'][1]} in" in lines and "**unresolved**" in lines
    # five prompts with four seeds each (image i shows prompt i mod 5), three decided at scale 2, two at 3: drawn
    # as prompts, the boundary holds when three of five draws are early (p 0.68); drawn image by image, when ten
    # of twenty are (p 0.87) - seeds of one prompt are not independent images, and the support says so
    early, late = [0.0, 0.5, 0.95, 0.97, 0.98, 0.99, 1.0], [0.0, 0.5, 0.6, 0.95, 0.98, 0.99, 1.0]
    five = _images_curves(np.array([early, early, early, late, late] * 4).T, np.array([ss] * 20).T)
    by_image = boundary_support(five, 7)
    five["images"]["prompts"] = 5
    by_prompt = boundary_support(five, 7)
    assert detect_stages(five, 7)["semantic"] == [0, 2]
    assert by_prompt["prompts"] == 5 and by_image["prompts"] == 20
    assert 0.6 < by_prompt["support"] < 0.76 and 0.8 < by_image["support"] < 0.95
    # no per-image values (an earlier record): no bootstrap, no evidence entry, the record's hash unchanged
    assert boundary_support({"semantic": firm["semantic"], "ssim": firm["ssim"]}, 7) is None
    assert "bootstrap" not in stages_of({"semantic": firm["semantic"], "ssim": firm["ssim"]}, [], 7)["evidence"]


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
        curves = _curves(sem, ss)
        if rng.random() < 0.5:                            # per-image values (the mean curves ignored then)
            m = int(rng.integers(2, 9))
            curves["images"] = {"semantic": rng.random((n, m)).tolist(), "structure": np.sort(rng.random((n, m)), 0).tolist()}
        st = detect_stages(curves, n)
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
    lm = LatencyModel(record.latency, record_variants(), model.num_layers)
    tokens = model.tokens_per_scale()
    assert lm.predict(point_from_plans(record.num_scales, {}), tokens) == pytest.approx(lm.baseline(tokens))
    assert all(r["measured_s"] > 0 and math.isfinite(r["error"]) for r in record.latency_check)
