"""Policy files: schema, strict validation, round trip, fingerprint checks, atomic save, work model.

Every bad-policy case is written to a real file and read with :func:`load_policy`, so the test sees
exactly what a user sees: a :class:`PolicyError` naming the file and the offending field path.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path

import pytest
import yaml

from stagevar import policy as policy_mod
from stagevar.models.registry import load_model
from stagevar.policy import (
    SCHEMA_VERSION,
    OperatingPoint,
    Policy,
    PolicyError,
    ScalePlan,
    binding_for,
    default_stages,
    load_policy,
    predicted_work_skipped,
)

TINY_SCHEDULE = [[1, 1, 1], [1, 2, 2], [1, 4, 4], [1, 6, 6], [1, 8, 8], [1, 12, 12], [1, 16, 16]]
N_SCALES = len(TINY_SCHEDULE)
TINY_DEPTH = 2


@pytest.fixture(scope="module")
def tiny():
    return load_model("infinity-tiny")


# ------------------------------------------------------------------------------------- builders
def accelerated_policy(adapter) -> Policy:
    """Two operating points using every plan field on the last scales, stages given, measured + provenance."""
    n = len(adapter.scale_schedule)
    assert n == N_SCALES and adapter.num_layers == TINY_DEPTH
    ident = [ScalePlan(k) for k in range(n)]
    p2 = OperatingPoint(
        stages={"semantic": (0, 2), "structure": (3, 4), "refinement": (5, 6)},
        plans=tuple(ident[:5]) + (
            ScalePlan(5, guidance="cond_only"),
            ScalePlan(6, guidance="cond_only", keep=0.5, selection="uniform", layers=(1, 2)),
        ),
        measured={"speedup": 2.04, "seconds_per_image": 0.125, "quality_delta": -0.004},
    )
    p3 = OperatingPoint(
        stages={"semantic": (0, 1), "structure": (2, 3), "refinement": (4, 6)},
        plans=tuple(ident[:4]) + (
            ScalePlan(4, guidance="cond_only", keep_tokens=20, selection="deviation", restore="cached_output"),
            ScalePlan(5, guidance="cond_only", keep=0.25, selection="random_projection", restore="cached_update",
                      layers=(0, 1)),
            ScalePlan(6, guidance="cond_only", skip=True),
        ),
        measured={"speedup": 3.1, "per_category": {"counting": 0.5, "colors": 0.75}, "seeds": [0, 1, 2]},
    )
    return Policy(
        model=binding_for(adapter),
        operating_points={"2x": p2, "3x": p3},
        default="3x",
        provenance={"tool": "stagevar", "tool_version": "0.1.0", "created": "2025-01-02T03:04:05+00:00",
                    "calibration": {"prompts": 64, "trials": 40, "objective": "latency"}, "notes": "unit test"},
    )


def base_dict() -> dict:
    """A valid policy for infinity-tiny as plain data (no model needed); bad cases mutate a copy."""
    ident = [{"scale": k} for k in range(N_SCALES)]
    return {
        "schema_version": 1,
        "model": {"name": "infinity-tiny", "arch_hash": "a20efe3cc312bb2c", "resolution": "256",
                  "num_layers": TINY_DEPTH, "scale_schedule": copy.deepcopy(TINY_SCHEDULE)},
        "default": "3x",
        "operating_points": {
            "2x": {
                "stages": {"semantic": [0, 2], "structure": [3, 4], "refinement": [5, 6]},
                "plans": copy.deepcopy(ident[:5]) + [
                    {"scale": 5, "guidance": "cond_only"},
                    {"scale": 6, "guidance": "cond_only", "keep": 0.5},
                ],
            },
            "3x": {
                "stages": {"semantic": [0, 2], "structure": [3, 4], "refinement": [5, 6]},
                "plans": copy.deepcopy(ident[:5]) + [
                    {"scale": 5, "guidance": "cond_only", "keep": 0.5, "selection": "deviation"},
                    {"scale": 6, "guidance": "cond_only", "keep": 0.25, "restore": "cached_output", "layers": [0, 2]},
                ],
                "measured": {"speedup": 3.0},
            },
        },
        "provenance": {"tool": "stagevar"},
    }


def _write(tmp_path: Path, data, name: str = "policy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------- round trip
def test_base_dict_is_valid(tmp_path):
    pol = load_policy(_write(tmp_path, base_dict()))
    assert pol.default == "3x" and set(pol.operating_points) == {"2x", "3x"}
    assert pol.operating_point().plans[6].layers == (0, 2)
    assert pol.source == str(tmp_path / "policy.yaml")


def test_an_empty_stage_is_null_and_version_1_files_are_migrated(tmp_path):
    """Version 2 writes an empty stage as null (version 1 wrote [a, a-1], read as such); an
    inverted range is refused."""
    d = base_dict()
    d["operating_points"]["3x"]["stages"] = {"semantic": [0, 4], "structure": [5, 4], "refinement": [5, 6]}
    old = load_policy(_write(tmp_path, d, "v1.yaml"))
    assert old.operating_point("3x").stages == {"semantic": (0, 4), "structure": (5, 4), "refinement": (5, 6)}
    saved = yaml.safe_load(old.save(tmp_path / "v2.yaml").read_text())
    assert saved["schema_version"] == SCHEMA_VERSION == 2
    assert saved["operating_points"]["3x"]["stages"] == {"semantic": [0, 4], "structure": None, "refinement": [5, 6]}
    assert load_policy(tmp_path / "v2.yaml") == old
    d["schema_version"] = 2
    with pytest.raises(PolicyError, match=r"structure.*\[5, 4\].*an empty stage is null"):
        load_policy(_write(tmp_path, d, "bad.yaml"))


@pytest.mark.parametrize("which", ["identity", "accelerated"])
def test_round_trip(tiny, tmp_path, which):
    pol = Policy.identity(tiny) if which == "identity" else accelerated_policy(tiny)
    first = pol.save(tmp_path / "a" / "p.yaml")          # parent directory is created
    loaded = load_policy(first)
    assert loaded == pol                                  # dataclass equality (source is not compared)
    assert loaded.schema_version == SCHEMA_VERSION
    assert loaded.source == str(first)
    # plans keep their types through YAML (tuples, not lists; ints, not floats)
    for name, pt in loaded.operating_points.items():
        assert pt == pol.operating_points[name]
        assert all(isinstance(v, tuple) for v in pt.stages.values())
        assert all(p.layers is None or isinstance(p.layers, tuple) for p in pt.plans)
    assert loaded.model.scale_schedule == tuple(tuple(s) for s in TINY_SCHEDULE)
    # stable text: saving what was loaded writes the same bytes
    second = loaded.save(tmp_path / "b.yaml")
    assert second.read_text(encoding="utf-8") == first.read_text(encoding="utf-8")
    assert load_policy(second) == pol
    loaded.check_compatible(tiny)


def test_identity_policy_changes_nothing(tiny):
    pol = Policy.identity(tiny)
    pt = pol.operating_point()
    assert len(pt.plans) == len(tiny.scale_schedule)
    assert all(p.is_identity for p in pt.plans)
    assert pt.first_accelerated_scale is None
    assert predicted_work_skipped(pt, tiny.scale_schedule, tiny.num_layers) == 0.0


def test_default_stages_when_file_gives_none(tmp_path):
    d = base_dict()
    del d["operating_points"]["3x"]["stages"]
    pt = load_policy(_write(tmp_path, d)).operating_points["3x"]
    assert pt.stages == default_stages(N_SCALES, 5) == {"semantic": (0, 1), "structure": (2, 4), "refinement": (5, 6)}


def test_single_point_needs_no_default(tmp_path):
    d = base_dict()
    del d["operating_points"]["2x"]
    del d["default"]
    assert load_policy(_write(tmp_path, d)).default == "3x"


def test_unknown_operating_point_names_it(tmp_path):
    pol = load_policy(_write(tmp_path, base_dict()))
    with pytest.raises(PolicyError, match="'5x' does not exist") as ei:
        pol.operating_point("5x")
    assert "2x" in str(ei.value) and "3x" in str(ei.value)


# ------------------------------------------------------------------------------------- bad policies
def _plans(d, point="3x"):
    return d["operating_points"][point]["plans"]


def _set(path_fn, key, value):
    def mut(d):
        path_fn(d)[key] = value
    return mut


def _del(path_fn, key):
    def mut(d):
        del path_fn(d)[key]
    return mut


def _rename_keep(d):
    p = _plans(d)[5]
    p["kep"] = p.pop("keep")


def _swap_5_6(d):
    pl = _plans(d)
    pl[5], pl[6] = pl[6], pl[5]


def _rename_point(d):
    ops = d["operating_points"]
    ops["3 x!"] = ops.pop("3x")
    d["default"] = "2x"


def _outside_refinement(d):
    d["operating_points"]["3x"]["stages"] = {"semantic": [0, 2], "structure": [3, 5], "refinement": [6, 6]}


def _stages(name, value):
    def mut(d):
        d["operating_points"]["3x"]["stages"][name] = value
    return mut


ROOT = lambda d: d  # noqa: E731
MODEL = lambda d: d["model"]  # noqa: E731
P0 = lambda d: _plans(d)[0]  # noqa: E731
P5 = lambda d: _plans(d)[5]  # noqa: E731
P6 = lambda d: _plans(d)[6]  # noqa: E731
PT = lambda d: d["operating_points"]["3x"]  # noqa: E731
PROV = lambda d: d.setdefault("provenance", {})  # noqa: E731
PLANS3 = "operating_points.3x.plans"

# (id, mutation of base_dict(), field path that must appear in the message, extra words that must appear)
BAD = [
    ("unknown_top_level_key", _set(ROOT, "extras", 1), "extras", ["not a known key"]),
    ("unknown_model_key", _set(MODEL, "arch", "x"), "model.arch", ["not a known key"]),
    ("unknown_point_key", _set(PT, "stage", {}), "operating_points.3x.stage", ["not a known key"]),
    ("unknown_plan_key_typo_kep", _rename_keep, f"{PLANS3}[5].kep", ["keep"]),
    ("missing_schema_version", _del(ROOT, "schema_version"), "schema_version", ["missing"]),
    ("schema_version_newer", _set(ROOT, "schema_version", SCHEMA_VERSION + 1), "schema_version", ["upgrade"]),
    ("schema_version_zero", _set(ROOT, "schema_version", 0), "schema_version", []),
    ("schema_version_string", _set(ROOT, "schema_version", "1"), "schema_version", ["integer"]),
    ("missing_model", _del(ROOT, "model"), "model", ["missing"]),
    ("missing_operating_points", _del(ROOT, "operating_points"), "operating_points", ["missing"]),
    ("empty_operating_points", _set(ROOT, "operating_points", {}), "operating_points", []),
    ("guidance_wrong", _set(P5, "guidance", "none"), f"{PLANS3}[5].guidance", ["cond_only"]),
    ("keep_zero", _set(P5, "keep", 0), f"{PLANS3}[5].keep", []),
    ("keep_above_one", _set(P5, "keep", 1.5), f"{PLANS3}[5].keep", ["1.5"]),
    ("keep_string", _set(P5, "keep", "half"), f"{PLANS3}[5].keep", ["half"]),
    ("keep_nan", _set(P5, "keep", float("nan")), f"{PLANS3}[5].keep", ["finite"]),
    ("keep_bool", _set(P5, "keep", True), f"{PLANS3}[5].keep", []),
    ("keep_tokens_negative", _set(P5, "keep_tokens", -3), f"{PLANS3}[5].keep_tokens", ["-3"]),
    ("keep_tokens_float", _set(P5, "keep_tokens", 2.5), f"{PLANS3}[5].keep_tokens", ["integer"]),
    ("selection_unknown", _set(P5, "selection", "topk"), f"{PLANS3}[5].selection", ["topk"]),
    ("restore_unknown", _set(P6, "restore", "zeros"), f"{PLANS3}[6].restore", ["zeros"]),
    ("layers_reversed", _set(P6, "layers", [2, 1]), f"{PLANS3}[6].layers", []),
    ("layers_empty_range", _set(P6, "layers", [1, 1]), f"{PLANS3}[6].layers", []),
    ("layers_wrong_length", _set(P6, "layers", [0, 1, 2]), f"{PLANS3}[6].layers", []),
    ("layers_not_a_list", _set(P6, "layers", "0-2"), f"{PLANS3}[6].layers", []),
    ("layers_negative", _set(P6, "layers", [-1, 2]), f"{PLANS3}[6].layers[0]", []),
    ("layers_beyond_num_layers", _set(P6, "layers", [0, 3]), f"{PLANS3}[6].layers", ["2 layers"]),
    ("plans_too_few", lambda d: _plans(d).pop(), PLANS3, ["6 entries", "7 scales"]),
    ("plans_too_many", lambda d: _plans(d).append({"scale": 7}), PLANS3, ["8 entries"]),
    ("plans_not_a_list", _set(PT, "plans", {"0": {"scale": 0}}), PLANS3, []),
    ("plans_out_of_order", _swap_5_6, f"{PLANS3}[5].scale", ["order"]),
    ("plan_missing_scale", lambda d: P5(d).pop("scale"), f"{PLANS3}[5].scale", ["missing"]),
    ("plan_not_a_mapping", lambda d: _plans(d).__setitem__(3, 3), f"{PLANS3}[3]", ["mapping"]),
    ("scale0_subset_keep", _set(P0, "keep", 0.5), f"{PLANS3}[0].keep", ["scale 0"]),
    ("scale0_subset_keep_tokens", _set(P0, "keep_tokens", 1), f"{PLANS3}[0].keep", ["scale 0"]),
    ("cfg_after_cond_only", _set(P6, "guidance", "cfg"), f"{PLANS3}[6].guidance", ["cond_only"]),
    ("skip_not_a_suffix", _set(P5, "skip", True), f"{PLANS3}[6].skip", ["last"]),
    ("skip_not_a_bool", _set(P6, "skip", "true"), f"{PLANS3}[6].skip", ["true or false"]),
    ("stages_not_contiguous", _stages("structure", [4, 4]), "operating_points.3x.stages.structure", ["contiguous"]),
    ("stages_overlapping", _stages("structure", [2, 4]), "operating_points.3x.stages.structure", ["contiguous"]),
    ("stages_not_covering", _stages("refinement", [5, 5]), "operating_points.3x.stages.refinement", ["last scale"]),
    ("stages_missing_one", lambda d: PT(d)["stages"].pop("structure"), "operating_points.3x.stages.structure",
     ["missing"]),
    ("stages_unknown_name", _stages("detail", [7, 6]), "operating_points.3x.stages.detail", ["not a known key"]),
    ("acceleration_outside_refinement", _outside_refinement, f"{PLANS3}[5]", ["structure stage", "refinement"]),
    ("default_names_missing_point", _set(ROOT, "default", "4x"), "default", ["4x"]),
    ("several_points_no_default", _del(ROOT, "default"), "default", ["2x", "3x"]),
    ("bad_point_name", _rename_point, "operating_points.3 x!", ["invalid name"]),
    ("scale_schedule_entry_short", lambda d: MODEL(d)["scale_schedule"].__setitem__(0, [1, 1]),
     "model.scale_schedule[0]", ["[t, h, w]"]),
    ("scale_schedule_not_a_list", _set(MODEL, "scale_schedule", "1x1,2x2"), "model.scale_schedule", []),
    ("scale_schedule_empty", _set(MODEL, "scale_schedule", []), "model.scale_schedule", []),
    ("scale_schedule_zero_dim", lambda d: MODEL(d)["scale_schedule"].__setitem__(2, [1, 0, 4]),
     "model.scale_schedule[2][1]", []),
    ("num_layers_zero", _set(MODEL, "num_layers", 0), "model.num_layers", []),
    ("model_name_empty", _set(MODEL, "name", ""), "model.name", []),
    ("model_not_a_mapping", _set(ROOT, "model", "infinity-tiny"), "model", ["mapping"]),
    ("provenance_not_a_mapping", _set(ROOT, "provenance", ["a", "b"]), "provenance", ["mapping"]),
    ("provenance_guidance_not_a_number", _set(PROV, "guidance", "strong"), "provenance.guidance", ["strong"]),
    ("provenance_guidance_wrong_length", _set(PROV, "guidance", [1.0, 3.0]), "provenance.guidance",
     ["2 values", "7 scales"]),
    ("measured_not_a_mapping", _set(PT, "measured", "fast"), "operating_points.3x.measured", ["mapping"]),
    ("root_not_a_mapping", lambda d: None, "<root>", ["mapping"]),   # handled specially below
]


@pytest.mark.parametrize("mutate, field, words", [pytest.param(m, f, w, id=i) for i, m, f, w in BAD])
def test_bad_policy(tmp_path, mutate, field, words, request):
    d = base_dict()
    mutate(d)
    if request.node.callspec.id == "root_not_a_mapping":
        d = [d]
    path = _write(tmp_path, d, name="bad_policy.yaml")
    with pytest.raises(PolicyError) as ei:
        load_policy(path)
    msg = str(ei.value)
    assert str(path) in msg, msg                      # names the file
    assert f"field '{field}'" in msg, msg             # names the exact field path
    for w in words:
        assert w.lower() in msg.lower(), (w, msg)
    assert "\n" not in msg.strip(), msg               # one paragraph


def test_distinct_bad_cases_are_many():
    assert len({i for i, *_ in BAD}) == len(BAD) >= 25


@pytest.mark.parametrize("content, words", [
    pytest.param(b"", ["empty"], id="empty_file"),
    pytest.param(b"# only a comment\n\n", ["empty"], id="comment_only_file"),
    pytest.param(b"schema_version: 1\nmodel:\n  name: x\n   bad: 1\n", ["invalid yaml", "line 4"], id="invalid_yaml"),
    pytest.param(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", ["not a text file"], id="binary_file"),
    pytest.param(b"schema_version: 1\x00\n", ["invalid yaml"], id="nul_byte"),
    pytest.param(b"- 1\n- 2\n", ["mapping"], id="yaml_list"),
])
def test_bad_file(tmp_path, content, words):
    path = tmp_path / "weird.yaml"
    path.write_bytes(content)
    with pytest.raises(PolicyError) as ei:
        load_policy(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg.lower(), (w, msg)


def test_missing_file(tmp_path):
    path = tmp_path / "nope" / "missing.yaml"
    with pytest.raises(PolicyError, match="not found") as ei:
        load_policy(path)
    assert str(path) in str(ei.value)


def test_directory_is_not_a_policy(tmp_path):
    with pytest.raises(PolicyError) as ei:
        load_policy(tmp_path)
    assert str(tmp_path) in str(ei.value)


# Bugs found while writing these tests (see the report); strict so that the fix is noticed.
def test_point_name_with_trailing_newline_is_refused(tmp_path):
    d = base_dict()
    d["operating_points"]["3x\n"] = d["operating_points"].pop("3x")
    d["default"] = "2x"
    with pytest.raises(PolicyError):
        load_policy(_write(tmp_path, d))


def test_unhashable_default_is_a_policy_error(tmp_path):
    d = base_dict()
    d["default"] = ["3x"]
    with pytest.raises(PolicyError, match="default"):
        load_policy(_write(tmp_path, d))


# ------------------------------------------------------------------------------------- check_compatible
@pytest.mark.parametrize("change, field", [
    ({"name": "infinity-mini"}, "model.name"),
    ({"arch_hash": "0000000000000000"}, "model.arch_hash"),
    ({"scale_schedule": tuple(tuple(s) for s in TINY_SCHEDULE[:-1]) + ((1, 32, 32),)}, "model.scale_schedule"),
    ({"num_layers": 3}, "model.num_layers"),
])
def test_check_compatible_refuses_other_models(tiny, tmp_path, change, field):
    pol = Policy.identity(tiny)
    pol = dataclasses.replace(pol, model=dataclasses.replace(pol.model, **change))
    loaded = load_policy(pol.save(tmp_path / "other.yaml"))     # the file itself is valid
    with pytest.raises(PolicyError) as ei:
        loaded.check_compatible(tiny)
    msg = str(ei.value)
    assert f"field '{field}'" in msg, msg
    assert str(tmp_path / "other.yaml") in msg, msg


def test_check_compatible_accepts_own_model(tiny):
    Policy.identity(tiny).check_compatible(tiny)
    accelerated_policy(tiny).check_compatible(tiny)


# ------------------------------------------------------------------------------------- atomic save
def _leftovers(d: Path, keep: str) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name != keep)


def test_atomic_save_replace_fails(tiny, tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    identity = Policy.identity(tiny)             # one object: its provenance holds the second it was made
    original = identity.save(path).read_bytes()

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(policy_mod.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        accelerated_policy(tiny).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert _leftovers(tmp_path, "p.yaml") == []
    assert load_policy(path) == identity


def test_atomic_save_write_fails_midway(tiny, tmp_path, monkeypatch):
    path = tmp_path / "p.yaml"
    identity = Policy.identity(tiny)             # one object: its provenance holds the second it was made
    original = identity.save(path).read_bytes()
    real_fdopen = os.fdopen
    seen = []

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError("no space left on device (simulated)")

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_fdopen(fd, *a, **k):
        seen.append(fd)
        return HalfWriter(real_fdopen(fd, *a, **k))

    monkeypatch.setattr(policy_mod.os, "fdopen", fake_fdopen)
    with pytest.raises(OSError, match="simulated"):
        accelerated_policy(tiny).save(path)
    monkeypatch.undo()
    assert seen, "save did not go through os.fdopen; update this test"
    assert path.read_bytes() == original
    assert _leftovers(tmp_path, "p.yaml") == []


def test_atomic_save_fsync_fails_on_new_file(tiny, tmp_path, monkeypatch):
    path = tmp_path / "sub" / "new.yaml"

    def boom(fd):
        raise OSError("I/O error (simulated)")

    monkeypatch.setattr(policy_mod.os, "fsync", boom)
    with pytest.raises(OSError, match="simulated"):
        Policy.identity(tiny).save(path)
    monkeypatch.undo()
    assert not path.exists()
    assert list(path.parent.iterdir()) == []


def test_saved_policy_is_readable_by_group_and_others(tiny, tmp_path):
    old = os.umask(0o022)
    try:
        path = Policy.identity(tiny).save(tmp_path / "p.yaml")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------------------------- work model
def _point(*plans: ScalePlan) -> OperatingPoint:
    n = len(plans)
    return OperatingPoint(stages=default_stages(n, 1), plans=plans)


SCHED2 = [(1, 1, 1), (1, 2, 2)]          # 1 and 4 tokens


@pytest.mark.parametrize("plan1, guided, expected", [
    # total work = tokens x layers x rows = (1 + 4) * 2 layers * 2 rows = 20
    # scale 0: 1*2*2 = 4; scale 1, cond_only (1 row), keep 0.5 -> 2 of 4 tokens over both layers: 2*2 = 4
    # -> done 8 of 20 -> 12/20 skipped
    (ScalePlan(1, guidance="cond_only", keep=0.5), True, 12 / 20),
    # only layer 1 on the subset: layer 0 on all 4 tokens + layer 1 on 2 tokens = 6 -> done 10 of 20
    (ScalePlan(1, guidance="cond_only", keep=0.5, layers=(1, 2)), True, 10 / 20),
    # keep_tokens=1 overrides keep: 1 token * 2 layers = 2 -> done 6 of 20
    (ScalePlan(1, guidance="cond_only", keep=0.5, keep_tokens=1), True, 14 / 20),
    # guidance kept: 2 rows * 2 tokens * 2 layers = 8 -> done 12 of 20
    (ScalePlan(1, keep=0.5), True, 8 / 20),
    # cond_only alone halves the last scale: 4*2*1 = 8 -> done 12 of 20
    (ScalePlan(1, guidance="cond_only"), True, 8 / 20),
    # skipped scale: only scale 0 is done -> 4 of 20
    (ScalePlan(1, skip=True), True, 16 / 20),
    # unguided model: total (1+4)*2 = 10, scale 0: 2, scale 1: 2 tokens * 2 layers = 4 -> 6 of 10
    (ScalePlan(1, guidance="cond_only", keep=0.5), False, 4 / 10),
    (ScalePlan(1), True, 0.0),
])
def test_predicted_work_skipped_by_hand(plan1, guided, expected):
    got = predicted_work_skipped(_point(ScalePlan(0), plan1), SCHED2, 2, guided=guided)
    assert math.isclose(got, expected, rel_tol=0, abs_tol=1e-12), (got, expected)


def test_predicted_work_skipped_tiny_policy(tiny):
    pol = accelerated_policy(tiny)
    s2 = predicted_work_skipped(pol.operating_points["2x"], tiny.scale_schedule, tiny.num_layers)
    s3 = predicted_work_skipped(pol.operating_points["3x"], tiny.scale_schedule, tiny.num_layers)
    assert 0.0 < s2 < s3 < 1.0


def test_duplicate_keys_are_refused(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("schema_version: 1\nschema_version: 1\n")
    with pytest.raises(PolicyError) as e:
        load_policy(p)
    assert "duplicate key 'schema_version'" in str(e.value) and str(p) in str(e.value)
