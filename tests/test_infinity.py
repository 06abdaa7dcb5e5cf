"""Infinity fidelity: state-dict manifests of the official models, reference tensors, checkpoint loading."""
import json
import os
from pathlib import Path

import pytest
import torch

from refdata import REFERENCE, need
from stagevar.models.infinity import InfinityAdapter, upstream_schedule
from stagevar.models.registry import WeightsError, load_model

MANIFESTS = REFERENCE / "infinity" / "manifests"
GOLDEN = REFERENCE / "infinity" / "golden"


@pytest.fixture
def reference():
    need(MANIFESTS)
    return need(GOLDEN / "golden_meta.json")


needs_shared = pytest.mark.usefixtures("reference")


def _manifest(name):
    return json.loads((MANIFESTS / f"{name}.json").read_text())


@needs_shared
@pytest.mark.parametrize("model,manifest", [("infinity-2b", "infinity_2b"), ("infinity-8b", "infinity_8b")])
def test_transformer_state_dict_matches_manifest(model, manifest):
    m = load_model(model, device="meta", random_weights=True)
    sd = m.transformer.state_dict()
    ref = _manifest(manifest)
    assert [e["key"] for e in ref["state_dict"]] == list(sd)
    for e in ref["state_dict"]:
        assert list(sd[e["key"]].shape) == e["shape"], e["key"]
        assert str(sd[e["key"]].dtype).replace("torch.", "") == e["dtype"].replace("torch.", ""), e["key"]
    params = dict(m.transformer.named_parameters())
    assert {e["key"] for e in ref["state_dict"] if e["is_parameter"]} == set(params)
    assert sum(p.numel() for p in params.values()) == ref["num_parameters"]


@needs_shared
def test_schedules_match_upstream_table():
    """Every pixel budget of upstream's table (h/w = 1): the schedule run_infinity uses, scale by
    scale, and its sequence length."""
    ref = json.loads((MANIFESTS / "scale_schedules_h_div_w_1.0.json").read_text())
    budgets = [k for k in ref if not k.startswith("_")]
    assert sorted(budgets) == ["0.06M", "0.25M", "0.60M", "1M"]
    for pn in budgets:
        sched, grid = upstream_schedule(1.0, pn)
        assert [list(s) for s in sched] == ref[pn]["scales_used_by_run_infinity"], pn
        assert [list(s[1:]) for s in sched] == [s[1:] for s in ref[pn]["scales_t_h_w"]], pn
        assert grid == tuple(ref["1M"]["scales_used_by_run_infinity"][-1][1:]), pn       # RoPE grid: the 1M last scale
    assert sum(h * w for _, h, w in upstream_schedule(1.0, "1M")[0]) == ref["1M"]["seq_len"] == 10521


@needs_shared
def test_reference_tensors_pass():
    from stagevar.reference.infinity import check_infinity_golden
    torch.set_num_threads(2)
    rows = check_infinity_golden(GOLDEN)
    assert len(rows) >= 10
    bad = [r for r in rows if not r.passed]
    assert not bad, bad
    assert all(r.max_abs == 0 for r in rows if r.tensor.startswith("bits"))


def _meta_state_dict(module):
    return {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in module.state_dict().items()}


@needs_shared
def test_load_model_accepts_exactly_the_manifest_keys(tmp_path, monkeypatch):
    """infinity-2b on the meta device: a checkpoint with the manifest's keys loads; a wrong one is refused."""
    from stagevar.models import checkpoints, text
    ref_keys = {e["key"]: e["shape"] for e in _manifest("infinity_2b")["state_dict"]}
    vae_ref = {e["key"]: e["shape"] for e in _manifest("infinity_vae_d32_reg")["state_dict"]}
    for f in ("infinity_2b_reg.pth", "infinity_vae_d32_reg.pth"):
        (tmp_path / f).write_bytes(b"placeholder")
    (tmp_path / "flan-t5-xl").mkdir()

    def fake_load(path):
        src = ref_keys if "2b" in Path(path).name else vae_ref
        return {k: torch.empty(s, device="meta") for k, s in src.items()}

    monkeypatch.setattr(checkpoints, "load_state_dict_file", fake_load)
    monkeypatch.setattr(text, "T5TextEncoder", lambda path, device="cpu": torch.nn.Identity())
    m = load_model("infinity-2b", weights=tmp_path, device="meta")
    assert isinstance(m, InfinityAdapter)
    assert list(m.transformer.state_dict()) == list(ref_keys)

    def wrong_load(path):
        sd = fake_load(path)
        if "2b" in Path(path).name:
            sd["block_chunks.0.module.0.sa.mat_qkv.weigth"] = sd.pop("block_chunks.0.module.0.sa.mat_qkv.weight")
        return sd

    monkeypatch.setattr(checkpoints, "load_state_dict_file", wrong_load)
    with pytest.raises(WeightsError) as e:
        load_model("infinity-2b", weights=tmp_path, device="meta")
    msg = str(e.value)
    assert "mat_qkv.weight" in msg and "mat_qkv.weigth" in msg and "infinity_2b_reg.pth" in msg


def test_missing_weights_are_a_clear_error(tmp_path):
    with pytest.raises(WeightsError) as e:
        load_model("infinity-2b", weights=tmp_path / "nowhere")
    assert "does not exist" in str(e.value)
    (tmp_path / "w").mkdir()
    with pytest.raises(WeightsError) as e:
        load_model("infinity-2b", weights=tmp_path / "w")
    assert "infinity_2b_reg.pth" in str(e.value)


def test_pickle_that_runs_code_is_refused(tmp_path):
    import pickle
    from stagevar.models.checkpoints import load_state_dict_file

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    p = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(1), "x": Evil()}, p, pickle_protocol=2) if False else p.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(WeightsError):
        load_state_dict_file(p)
    assert not (tmp_path / "pwned").exists()


def test_non_square_schedule_rope_rounds_half_to_even():
    """Token (i, j) of scale (h, w) takes the rotation of grid row round(i*H/h) and column
    round(j*W/w), ties to even (upstream's torch.round): read back from the RoPE table itself, on
    a schedule where ties occur and rounding them down or up would give other rows."""
    from stagevar.models.infinity import rope2d_table
    head_dim = 64
    sched, grid = upstream_schedule(0.5, "1M")     # h < w
    tables = rope2d_table(head_dim, sched, grid)
    assert len(tables) == len(sched) and tables[-1].shape == (2, sched[-1][1] * sched[-1][2], head_dim // 2)
    half = head_dim // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    ties_decided = 0
    for (_, h, w), table in zip(sched, tables):
        for axis, (n, size) in enumerate(((h, grid[0]), (w, grid[1]))):
            for i in range(n):
                exact = i * size / n
                idx = round(exact)                                        # Python rounds ties to even
                ties_decided += exact % 1 == 0.5 and idx != int(exact + 0.5)
                tok = i * w if axis == 0 else i                           # token (i, 0) or (0, i)
                cols = slice(0, half // 2) if axis == 0 else slice(half // 2, half)
                angle = float(idx) * inv_freq
                assert torch.equal(table[0, tok, cols], angle.cos()), (h, w, axis, i)
                assert torch.equal(table[1, tok, cols], angle.sin()), (h, w, axis, i)
    assert ties_decided > 0                       # a tie that rounding half up would send elsewhere
