"""Runtime contract tests, run on every adapter that needs no downloaded weights."""
import pytest
import torch

from stagevar.models.registry import list_models, load_model, model_entry
from stagevar.policy import OperatingPoint, ScalePlan, default_stages
from stagevar.guidance import same_guidance
from stagevar.runtime import Runtime

TINY = [n for n in list_models() if not model_entry(n).needs_weights and n.endswith("-tiny")]
PROMPTS = {"infinity": ["a red circle", "two blue squares"], "var": ["207", "971"]}


@pytest.fixture(scope="module", params=TINY)
def model(request):
    torch.manual_seed(0)
    return load_model(request.param)


def _cond(model):
    return model.encode_prompts(PROMPTS[model.family])


def _point(model, plans_tail):
    n = len(model.scale_schedule)
    plans = [ScalePlan(k) for k in range(n - len(plans_tail))] + plans_tail
    return OperatingPoint(default_stages(n, n - len(plans_tail)), tuple(plans))


def test_tiny_models_registered():
    assert "infinity-tiny" in TINY


def test_identity_policy_reproduces_reference_sampler_exactly(model):
    cond = _cond(model)
    for guidance in (model.default_guidance, 1.0):
        ref = model.reference_generate(cond, guidance=guidance, seed=3)
        out = Runtime(model).generate(condition=cond, guidance=guidance, seed=3)
        assert torch.equal(ref, out.images)


def test_a_prefix_continued_gives_the_images_of_the_whole_generation(model):
    """Calibration runs the scales before a variant's first change once and continues from them
    for every variant of that scale: each continuation (guidance dropped there, a token subset
    restored from any layer boundary, a later scale skipped) gives exactly the images and codes
    of generating from scale 0, and continuing twice from one prefix gives the same twice (the
    latent, caches and generator are copied, not shared). A prefix of other plans, another seed
    or another engine is refused."""
    cond = _cond(model)
    n, depth = len(model.scale_schedule), model.num_layers
    k = n - 3
    sub = dict(keep=0.5, selection="random_projection")
    tails = [
        [ScalePlan(k, guidance="cond_only"), ScalePlan(k + 1, guidance="cond_only"), ScalePlan(k + 2, guidance="cond_only")],
        [ScalePlan(k, layers=(1, depth), **sub), ScalePlan(k + 1), ScalePlan(k + 2)],
        [ScalePlan(k, selection="deviation", keep=0.25, restore="cached_output", layers=(0, depth - 1)),
         ScalePlan(k + 1, guidance="cond_only", **sub), ScalePlan(k + 2, skip=True)],
    ]
    pre = Runtime(model, engine="eager").prefix(cond, k, guidance=model.default_guidance, seed=3)
    for tail in tails:
        rt = Runtime(model, _point(model, tail), engine="eager")
        whole = rt.generate(condition=cond, seed=3)
        for _ in range(2):
            cont = rt.generate(condition=cond, seed=3, resume=pre)
            assert torch.equal(cont.images, whole.images) and torch.equal(cont.codes, whole.codes)
            assert [r.scale for r in cont.records] == [r.scale for r in whole.records if r.scale >= k]
    later = Runtime(model, _point(model, [ScalePlan(n - 2, guidance="cond_only"), ScalePlan(n - 1, guidance="cond_only")]),
                    engine="eager")
    with pytest.raises(ValueError, match="other plans"):       # its plans change scale k - 1 < the prefix's
        Runtime(model, _point(model, [ScalePlan(k - 1, guidance="cond_only")] + [
            ScalePlan(j, guidance="cond_only") for j in range(k, n)]), engine="eager").generate(condition=cond, seed=3, resume=pre)
    assert torch.equal(later.generate(condition=cond, seed=3, resume=pre).images, later.generate(condition=cond, seed=3).images)
    with pytest.raises(ValueError, match="seed"):
        later.generate(condition=cond, seed=4, resume=pre)
    with pytest.raises(ValueError, match="eager"):
        Runtime(model, engine="static").generate(condition=cond, seed=3, resume=pre)
    with pytest.raises(NotImplementedError, match="static"):
        model.copy_state(model.prepare(cond, guidance=model.default_guidance, seed=3, kv_capacity=[64] * depth))


def test_cond_only_halves_the_batch_the_adapter_receives(model, monkeypatch):
    cond = _cond(model)
    B = 2
    n = len(model.scale_schedule)
    seen = []
    orig = type(model).forward_layers

    def spy(self, state, k, x, layers, positions=None):
        seen.append((k, x.shape[0]))
        return orig(self, state, k, x, layers, positions)

    monkeypatch.setattr(type(model), "forward_layers", spy)
    pt = _point(model, [ScalePlan(n - 2, guidance="cond_only"), ScalePlan(n - 1, guidance="cond_only")])
    Runtime(model, pt).generate(condition=cond, guidance=3.0, seed=0)
    rows = dict(seen)
    assert rows[0] == 2 * B and rows[n - 3] == 2 * B
    assert rows[n - 2] == B and rows[n - 1] == B


def test_subset_keeps_true_positions_and_defines_kv_cache(model, monkeypatch):
    cond = _cond(model)
    n = len(model.scale_schedule)
    _, h, w = model.scale_schedule[-1]
    calls = []
    orig = type(model).forward_layers

    def spy(self, state, k, x, layers, positions=None):
        calls.append((k, list(layers), None if positions is None else positions.clone(), x.shape[1]))
        return orig(self, state, k, x, layers, positions)

    monkeypatch.setattr(type(model), "forward_layers", spy)
    depth = model.num_layers
    plan = ScalePlan(n - 1, guidance="cond_only", keep=0.25, selection="deviation", layers=(0, depth))
    res = Runtime(model, _point(model, [plan])).generate(condition=cond, guidance=3.0, seed=0)
    last = [c for c in calls if c[0] == n - 1]
    assert len(last) == 1
    _, layers, pos, ntok = last[0]
    assert layers == list(range(depth))
    kept = plan.num_kept(h * w)
    assert pos.shape == (2, kept) and ntok == kept
    assert int(pos.max()) < h * w and torch.all(pos[:, 1:] > pos[:, :-1])   # distinct, sorted, in range
    assert res.records[-1].computed_tokens == kept


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_kv_cache_receives_only_computed_tokens(engine):
    model = load_model("infinity-tiny")
    cond = _cond(model)
    n = len(model.scale_schedule)
    total = sum(model.tokens_per_scale())
    plan = ScalePlan(n - 1, guidance="cond_only", keep=0.5, selection="uniform", layers=(1, 2))
    rt = Runtime(model, _point(model, [plan]), engine=engine)
    caches = {}
    orig_finish = type(model).finish

    def keep_caches(self, state):
        caches["sizes"] = [c.length for c in state.caches]
        orig_finish(self, state)

    type(model).finish = keep_caches
    try:
        res = rt.generate(condition=cond, guidance=3.0, seed=0)
    finally:
        type(model).finish = orig_finish
    kept = res.records[-1].computed_tokens
    last = model.tokens_per_scale()[-1]
    assert caches["sizes"][0] == total                 # layer 0 ran on every token
    assert caches["sizes"][1] == total - last + kept   # layer 1 ran on the subset only


@pytest.mark.parametrize("selection", ["random_projection", "deviation", "uniform"])
@pytest.mark.parametrize("restore", ["cached_update", "cached_output"])
def test_accelerated_policies_restore_from_the_cache_and_leave_early_scales_alone(selection, restore):
    """The values, not only the shapes: scales before the first accelerated one equal the full
    model's bit for bit; at a subset scale every token that was not computed holds exactly the
    restoration from the previous scale's cached hidden states (upsampled), and the computed ones
    do not."""
    from stagevar.ops.tokens import deviation_selection, grid_selection, upsample_hidden
    model = load_model("infinity-tiny")
    cond = _cond(model)
    n = len(model.scale_schedule)
    plans = [ScalePlan(n - 2, guidance="cond_only", keep=0.5, selection=selection, restore=restore),
             ScalePlan(n - 1, guidance="cond_only", keep=0.3, selection=selection, restore=restore, layers=(1, 2))]

    def run(point):
        seen = []
        res = Runtime(model, point).generate(condition=cond, guidance=3.0, seed=0, observer=lambda o: seen.append(
            ({b: v.clone() for b, v in o.hidden.items()}, o.guided_logits.clone(), o.codes.clone())))
        return res, seen

    out, acc = run(_point(model, plans))
    ref, full = run(None)
    for k in range(n - 2):                                   # untouched scales: bit for bit
        assert torch.equal(acc[k][1], full[k][1]) and torch.equal(acc[k][2], full[k][2]), k
    assert not torch.equal(out.images, ref.images)
    assert all(r.computed_tokens < t for r, t in zip(out.records[-2:], model.tokens_per_scale()[-2:]))
    # the last scale: layer 0 on every token, layer 1 on the subset, restored at boundary 2
    prev, cur = acc[n - 2][0], acc[n - 1][0]
    (_, ph, pw), (_, h, w) = model.scale_schedule[n - 2], model.scale_schedule[n - 1]
    m, kept = h * w, plans[1].num_kept(h * w)
    if selection == "deviation":
        sel = deviation_selection(cur[1], kept, 2)
    else:
        sel = grid_selection(selection, (h, w), kept, 2, cur[1].shape[0])
    up = {b: upsample_hidden(prev[b], (ph, pw), (h, w)) for b in (1, 2)}
    restored = up[2] if restore == "cached_output" else cur[1] + (up[2] - up[1])
    computed = torch.zeros(cur[2].shape[:2], dtype=torch.bool)
    computed.scatter_(1, sel.positions, True)
    assert int(computed.sum()) == cur[2].shape[0] * sel.count and sel.count == out.records[-1].computed_tokens
    assert torch.equal(cur[2][~computed], restored[~computed])
    assert not torch.equal(cur[2][computed], restored[computed])
    assert (restored[~computed].abs() > 0).any()


def test_skip_stops_before_the_last_scale():
    model = load_model("infinity-tiny")
    n = len(model.scale_schedule)
    out = Runtime(model, _point(model, [ScalePlan(n - 1, skip=True)])).generate(["a red circle"], seed=0)
    assert len(out.records) == n - 1 and out.images.shape[0] == 1


def test_generation_is_deterministic_for_a_seed():
    model = load_model("infinity-tiny")
    n = len(model.scale_schedule)
    pt = _point(model, [ScalePlan(n - 1, guidance="cond_only", keep=0.5)])
    a = Runtime(model, pt).generate(["a red circle"], seed=5).images
    b = Runtime(model, pt).generate(["a red circle"], seed=5).images
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", TINY)
def test_reduced_precision_weights_generate(name):
    """bfloat16 weights (the GPU benchmark's setting): the first scale's logits stay close to the
    float32 model's, and an accelerated policy generates finite images of the same shape."""
    m32, m16 = load_model(name), load_model(name, dtype=torch.bfloat16)
    logits = []
    for m in (m32, m16):
        st = m.prepare(m.encode_prompts(PROMPTS[m.family]), guidance=m.default_guidance, seed=0)
        x = m.forward_layers(st, 0, m.scale_input(st, 0), range(m.num_layers))
        logits.append(m.head(st, 0, x).float())
        m.finish(st)
    assert (logits[0] - logits[1]).norm() / logits[0].norm() < 0.05
    n = len(m16.scale_schedule)
    point = _point(m16, [ScalePlan(n - 1, guidance="cond_only", keep=0.5)])
    ref = Runtime(m32).generate(PROMPTS[m32.family], seed=0).images
    out = Runtime(m16, point).generate(PROMPTS[m16.family], seed=0).images
    assert out.shape == ref.shape and out.dtype == ref.dtype and torch.isfinite(out).all()


def test_per_scale_guidance_runs_in_runtime_and_reference_alike():
    """A per-scale guidance list (upstream Infinity's cfg_list): the runtime reproduces the
    reference loop; a constant list equals the number; unguided early scales change the image."""
    model = load_model("infinity-tiny")
    cond = _cond(model)
    n = len(model.scale_schedule)
    per_scale = [1.0, 1.0] + [4.0] * (n - 2)
    ref = model.reference_generate(cond, guidance=per_scale, seed=5)
    assert torch.equal(Runtime(model).generate(condition=cond, guidance=per_scale, seed=5).images, ref)
    const = model.reference_generate(cond, guidance=4.0, seed=5)
    assert torch.equal(model.reference_generate(cond, guidance=[4.0] * n, seed=5), const)
    assert not torch.equal(ref, const)


def test_guidance_list_of_the_wrong_length_is_refused_by_name():
    from stagevar.guidance import GuidanceError
    model = load_model("infinity-tiny")
    n = len(model.scale_schedule)
    with pytest.raises(GuidanceError, match=f"lists 2 values .* has {n} scales"):
        Runtime(model).generate(condition=_cond(model), guidance=[1.0, 2.0], seed=0)
    var = load_model("var-tiny")
    with pytest.raises(GuidanceError, match="VAR takes one number"):
        Runtime(var).generate(condition=_cond(var), guidance=[1.0] * len(var.scale_schedule), seed=0)


def test_policy_calibrated_with_other_guidance_warns_once_per_setting(caplog):
    """A policy's measured speedup and quality hold for the guidance in its provenance: running
    it with another setting logs one warning naming both; the same setting (as a number or a
    constant list) stays silent."""
    from stagevar.policy import Policy, binding_for, base_provenance
    model = load_model("infinity-tiny")
    n = len(model.scale_schedule)
    point = _point(model, [ScalePlan(n - 1, guidance="cond_only", keep=0.5)])
    policy = Policy(model=binding_for(model), operating_points={"2x": point}, default="2x",
                    provenance=base_provenance(guidance=3.0))
    rt = Runtime(model, policy)
    cond = _cond(model)
    with caplog.at_level("WARNING", logger="stagevar.runtime"):
        rt.generate(condition=cond, guidance=3.0, seed=0)
        rt.generate(condition=cond, guidance=[3.0] * n, seed=0)
        assert not caplog.records
        other = [1.0] * 2 + [3.0] * (n - 2)
        rt.generate(condition=cond, guidance=other, seed=0)
        rt.generate(condition=cond, guidance=other, seed=1)
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert "calibrated with guidance 3" in msg and "1,1," + ",".join(["3"] * (n - 2)) in msg
    # a policy without recorded guidance (made before it was recorded) and the identity stay silent
    caplog.clear()
    with caplog.at_level("WARNING", logger="stagevar.runtime"):
        Runtime(model, Policy(model=binding_for(model), operating_points={"2x": point}, default="2x")).generate(
            condition=cond, guidance=other, seed=0)
        Runtime(model).generate(condition=cond, guidance=other, seed=0)
    assert not caplog.records


def test_policy_brings_its_calibrated_guidance_when_none_is_given(caplog):
    """Without a guidance argument, an accelerating policy runs with the guidance it was
    calibrated with (its measured numbers hold for it), not the model's default; an explicit
    guidance still wins."""
    from stagevar.policy import Policy, binding_for, base_provenance
    model = load_model("infinity-tiny")
    n = len(model.scale_schedule)
    cal = [1.0, 1.0] + [2.0] * (n - 2)
    assert not same_guidance(cal, model.default_guidance, n)
    point = _point(model, [ScalePlan(n - 1, guidance="cond_only", keep=0.5)])
    policy = Policy(model=binding_for(model), operating_points={"2x": point}, default="2x",
                    provenance=base_provenance(guidance=cal))
    cond = _cond(model)
    with caplog.at_level("WARNING", logger="stagevar.runtime"):
        got = Runtime(model, policy).generate(condition=cond, seed=0).images
    assert not caplog.records
    assert torch.equal(got, Runtime(model, point).generate(condition=cond, guidance=cal, seed=0).images)
    default = Runtime(model, policy).generate(condition=cond, guidance=model.default_guidance, seed=0).images
    assert not torch.equal(got, default)
    # a policy that records no guidance, and the identity, use the model's default
    bare = Policy(model=binding_for(model), operating_points={"2x": point}, default="2x")
    assert torch.equal(Runtime(model, bare).generate(condition=cond, seed=0).images, default)
    assert torch.equal(Runtime(model).generate(condition=cond, seed=0).images,
                       Runtime(model).generate(condition=cond, guidance=model.default_guidance, seed=0).images)
