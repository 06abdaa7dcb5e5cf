"""Engines: the static (graph-ready) path gives the eager codes and images bit for bit, knows its
shapes before the first scale, reads nothing back to the host inside a scale, and each scale's
step traces as one graph. The CUDA-graph engine itself is checked on a GPU (marker ``gpu``)."""
from __future__ import annotations

import pytest
import torch

from stagevar.baselines import build_baseline
from stagevar.engine import EngineError, check_capacity, resolve_engine
from stagevar.models.kv_cache import CacheOverflowError, KVCache, StaticKVCache
from stagevar.models.registry import load_model, model_entry
from stagevar.runtime import Runtime

PLANS = ["full", "paper", "fastvar"]


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(name: str, dtype=torch.float32):
        key = (name, dtype)
        if key not in cache:
            if name == "infinity-2b-narrow":
                # Infinity-2B's structure (depth 32, 16 heads, its RoPE grid), at width 64 and the
                # 7-scale 256px schedule: every op of the real model, small enough for a CPU test
                cache[key] = model_entry("infinity-2b").builder(random_weights=True, narrow=64, pn="0.06M", dtype=dtype)
            else:
                cache[key] = load_model(name, dtype=dtype)
        return cache[key]

    return get


def _prompts(model, n: int = 2) -> list[str]:
    return ["207", "1"][:n] if model.family == "var" else ["a red circle", "two blue squares"][:n]


def _point(model, plan: str):
    return None if plan == "full" else build_baseline(plan, model)


def _generate(model, plan: str, engine: str, seed: int = 3, **kw):
    codes = []
    res = Runtime(model, _point(model, plan), engine=engine).generate(
        _prompts(model), seed=seed, observer=lambda o: codes.append(o.codes.clone()), **kw)
    return res, codes


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("name,dtype", [("infinity-tiny", torch.float32), ("infinity-tiny", torch.bfloat16),
                                        ("var-tiny", torch.float32), ("infinity-mini", torch.float32),
                                        ("infinity-2b-narrow", torch.float32)])
def test_static_engine_gives_the_eager_codes_and_images(models, name, dtype, plan):
    model = models(name, dtype)
    eager, eager_codes = _generate(model, plan, "eager")
    static, static_codes = _generate(model, plan, "static")
    assert static.engine == "static" and eager.engine == "eager"
    assert len(static_codes) == len(eager_codes) == len(static.records)
    for k, (a, b) in enumerate(zip(eager_codes, static_codes)):
        assert torch.equal(a, b), f"scale {k}"
    assert torch.equal(eager.codes, static.codes)
    assert torch.equal(eager.images, static.images)
    assert [r.computed_tokens for r in eager.records] == [r.computed_tokens for r in static.records]


def test_a_depth_32_narrow_model_has_the_real_structure(models):
    m = models("infinity-2b-narrow")
    assert m.num_layers == 32 and m.cfg.num_heads == 16 and m.cfg.embed_dim == 64
    assert m.cfg.rope_grid == (64, 64) and len(m.scale_schedule) == 7


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("name", ["infinity-tiny", "var-tiny"])
def test_compiled_kv_lengths_are_what_the_eager_caches_reach(models, name, plan, monkeypatch):
    model = models(name)
    seen = {}
    finish = type(model).finish

    def keep(self, state):
        seen["lengths"] = [c.length for c in state.caches]
        finish(self, state)

    monkeypatch.setattr(type(model), "finish", keep)
    rt = Runtime(model, _point(model, plan), engine="eager")
    res = rt.generate(_prompts(model), seed=0)
    compiled = rt.compile(2, model.runs_unconditional(model.default_guidance))
    assert list(compiled.kv_capacity) == seen["lengths"]
    assert [(s.scale, s.rows, s.computed) for s in compiled.scales] == \
        [(r.scale, r.rows, r.computed_tokens) for r in res.records]


def test_static_caches_write_in_place_and_refuse_to_overflow():
    c = StaticKVCache(2, 1, 5, 4, torch.float32, torch.float32, "cpu")
    ptr = c.k_buf.data_ptr()
    k1, v1 = c.append(torch.ones(2, 1, 3, 4), torch.full((2, 1, 3, 4), 2.0))
    c.select_rows(1)
    k2, v2 = c.append(torch.full((1, 1, 2, 4), 3.0), torch.full((1, 1, 2, 4), 4.0))
    assert c.k_buf.data_ptr() == ptr and k2.data_ptr() == ptr
    assert k2.shape == (1, 1, 5, 4) and k2[0, 0, :, 0].tolist() == [1, 1, 1, 3, 3]
    assert v2[0, 0, :, 0].tolist() == [2, 2, 2, 4, 4]
    with pytest.raises(CacheOverflowError, match="holds 5 tokens"):
        c.append(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 1, 4))
    g = KVCache()
    g.append(torch.ones(2, 1, 3, 4), torch.ones(2, 1, 3, 4))
    g.select_rows(1)
    assert g.append(torch.ones(1, 1, 2, 4), torch.ones(1, 1, 2, 4))[0].shape == (1, 1, 5, 4)


def test_a_plan_larger_than_the_caches_is_refused_before_the_first_scale(models, monkeypatch):
    model = models("infinity-tiny")
    prepare = type(model).prepare
    steps = []

    def small(self, *a, kv_capacity=None, **kw):
        return prepare(self, *a, kv_capacity=None if kv_capacity is None else [n - 1 for n in kv_capacity], **kw)

    monkeypatch.setattr(type(model), "prepare", small)
    rt = Runtime(model, engine="static")
    step = rt._step
    rt._step = lambda *a, **k: steps.append(a[1]) or step(*a, **k)
    with pytest.raises(CacheOverflowError, match="layer 0's KV cache"):
        rt.generate(["a red circle"], seed=0)
    assert steps == []
    compiled = rt.compile(1, True)
    check_capacity(compiled, [StaticKVCache(2, 2, n, 64, torch.float32, torch.float32, "cpu") for n in compiled.kv_capacity])


def test_engine_names_are_checked_against_the_device():
    assert resolve_engine(None, "cpu") == "eager" and resolve_engine("auto", "cpu") == "eager"
    assert resolve_engine("static", "cpu") == "static"
    with pytest.raises(EngineError, match="needs a CUDA device.*eager, static"):
        resolve_engine("graphs", "cpu")
    with pytest.raises(EngineError, match="unknown engine 'fast'"):
        resolve_engine("fast", "cpu")


def test_cli_engine_the_device_cannot_run_is_one_clear_error(capsys):
    from stagevar.cli import main
    rc = main(["generate", "--model", "infinity-tiny", "--prompt", "a red circle", "--engine", "graphs", "--out", "x.png"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error:") and "graphs" in err and "eager, static" in err and "Traceback" not in err


def test_calibrate_engine_the_device_cannot_run_is_one_clear_error(capsys, tmp_path):
    from calibrate.cli import main
    rc = main(["--model", "infinity-tiny", "--budget", "2x", "--engine", "graphs", "--out", str(tmp_path / "cal")])
    err = capsys.readouterr().err
    assert rc == 2 and "needs a CUDA device" in err and "eager, static" in err and "Traceback" not in err
    assert not (tmp_path / "cal").exists()


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("engine", ["eager", "static"])
def test_profile_counts_no_host_sync_inside_or_outside_the_scales(models, plan, engine):
    from stagevar.profile import profile
    model = models("infinity-tiny")
    rt = Runtime(model, _point(model, plan), engine=engine, synchronize=True)
    res = profile(rt, model.encode_prompts(["a red circle"]), model.default_guidance, repeats=1)
    assert res["host_syncs_per_image"] == 0
    assert res["ops_per_image"] > res["launching_ops_per_image"] > 0
    assert [r["scale"] for r in res["per_scale"]] == [r.scale for r in rt.generate(["a red circle"]).records]
    assert all(r["ops"] > 0 and r["wall_s"] > 0 for r in res["per_scale"])


def test_profile_sees_a_host_sync(models, monkeypatch):
    """The counter is not blind: the multinomial sampler (argument checks read values back) and
    an ``.item()`` inside a scale are counted."""
    import stagevar.ops.sampling as sampling
    from stagevar.profile import profile
    model = models("infinity-tiny")

    def multinomial(logits, top_k=0, top_p=0.0, generator=None, noise=None):
        B, l, V = logits.shape
        probs = logits.softmax(-1).view(-1, V)
        return torch.multinomial(probs, 1, generator=generator).view(B, l)

    monkeypatch.setattr("stagevar.models.infinity.sample_top_k_top_p", multinomial)
    rt = Runtime(model, engine="eager", synchronize=True)
    res = profile(rt, model.encode_prompts(["a red circle"]), model.default_guidance, repeats=1)
    assert res["host_syncs_per_image"] == len(model.scale_schedule)
    assert all(r["host_syncs"] == 1 for r in res["per_scale"])
    assert sampling.sample_top_k_top_p is not multinomial


@pytest.mark.parametrize("plan", ["full", "paper"])
@pytest.mark.parametrize("name", ["infinity-tiny", "var-tiny"])
def test_one_scale_step_traces_as_one_graph(models, name, plan):
    """``torch.compile(fullgraph=True)`` raises on any graph break: the static step has no
    host read, no value-dependent branch, no untraceable call (the backend only traces)."""
    import torch._dynamo
    from stagevar.engine import ScaleInputs
    model = models(name)
    rt = Runtime(model, _point(model, plan), engine="static")
    guidance = model.default_guidance
    compiled = rt.compile(1, model.runs_unconditional(guidance))
    cond = model.encode_prompts(_prompts(model, 1))
    state = model.prepare(cond, guidance=guidance, seed=0, kv_capacity=compiled.kv_capacity)
    inputs = ScaleInputs.draw(model, compiled, state.generator, 0)
    carry = rt._start_carry()
    for s in compiled.scales[:-1]:
        carry = rt._step(state, s.scale, carry, 0, inputs)
    last = compiled.scales[-1]
    assert (last.computed < last.tokens) == (plan != "full")
    torch._dynamo.reset()
    try:
        out = torch.compile(rt._step, fullgraph=True, backend="eager")(state, last.scale, carry, 0, inputs)
    finally:
        torch._dynamo.reset()
    assert out.computed == last.computed


@pytest.mark.gpu
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("name", ["infinity-tiny", "var-tiny"])
def test_cuda_graphs_give_the_eager_codes_and_images(name, plan):
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device")
    model = load_model(name, device="cuda", dtype=torch.bfloat16)
    point = _point(model, plan)
    graphs = Runtime(model, point, engine="graphs")
    for seed, prompts in ((3, _prompts(model)), (5, _prompts(model)[::-1])):   # capture, then a replay
        want = Runtime(model, point, engine="eager").generate(prompts, seed=seed)
        got = graphs.generate(prompts, seed=seed)
        assert got.engine == "graphs"
        assert torch.equal(want.codes, got.codes)
        assert torch.equal(want.images, got.images)
    assert len(graphs._captured) == 1
