"""VAR + multi-scale VQVAE: state-dict layout, golden tensors, the adapter protocol, weight errors."""
from __future__ import annotations

import json

import pytest
import torch

from stagevar.models.base import ConditionError
from stagevar.models.registry import WeightsError
from stagevar.models.var import (
    _CONFIGS, TINY_CONFIG, VAR, VARAdapter, build_var, build_var_tiny, load_checked_state_dict,
)
from refdata import REFERENCE, need
from stagevar.models.vqvae import VQVAE, phi_index

torch.set_num_threads(min(2, torch.get_num_threads()))


REF = REFERENCE / "var"
GOLDEN = REF / "golden"


@pytest.fixture
def reference():
    return need(GOLDEN / "golden_meta.json")


needs_reference = pytest.mark.usefixtures("reference")


def _layout(module: torch.nn.Module) -> list[tuple]:
    params = {id(p) for p in module.parameters()}
    return [(k, list(t.shape), str(t.dtype).removeprefix("torch."), id(t) in params)
            for k, t in module.state_dict(keep_vars=True).items()]


def _manifest(name: str) -> tuple[list[tuple], dict]:
    m = json.loads((REF / "manifests" / f"{name}.json").read_text())
    return [(e["key"], e["shape"], e["dtype"], e["is_parameter"]) for e in m["state_dict"]], m


# ----------------------------------------------------------------------------------------- layout
@needs_reference
@pytest.mark.parametrize("name", sorted(_CONFIGS))
def test_transformer_state_dict_matches_manifest(name):
    with torch.device("meta"):
        model = VAR(_CONFIGS[name])
    want, m = _manifest(name.replace("-", "_"))
    assert _layout(model) == want
    assert sum(p.numel() for p in model.parameters()) == m["num_parameters"]
    assert len(model.state_dict()) == m["num_entries"]


@needs_reference
def test_vqvae_state_dict_matches_manifest():
    with torch.device("meta"):
        vae = VQVAE(ch=160)
    want, m = _manifest("vae_ch160v4096z32")
    assert _layout(vae) == want
    assert sum(p.numel() for p in vae.parameters()) == m["num_parameters"]


def test_phi_index_tie_break():
    # README D: float64 numpy resolves the exact tie at si=2 to index 1
    assert [phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_d36_description():
    with torch.device("meta"):
        a = VARAdapter("var-d36", _CONFIGS["var-d36"])
    assert a.image_size == (512, 512) and a.scale_schedule[-1] == (1, 32, 32) and a.num_layers == 36
    json.dumps(a.architecture())


# ----------------------------------------------------------------------------------------- golden
@needs_reference
def test_check_var_golden_all_rows_pass():
    from stagevar.reference.var import check_var_golden
    rows = check_var_golden(GOLDEN)
    failed = [r for r in rows if not r.passed]
    assert rows and not failed, "\n".join(f"{r.stage} {r.tensor}: {r.max_abs:.3g} > {r.tolerance:.3g} {r.note}" for r in failed)


# ----------------------------------------------------------------------------------------- adapter
@pytest.fixture(scope="module")
def tiny() -> VARAdapter:
    return build_var_tiny()


LABELS = torch.tensor([207, 971])


def _run_steps(a: VARAdapter, labels, guidance: float, seed: int, split: int = 1, **sampling):
    """The identity policy written with the adapter steps (what the runtime does)."""
    st = a.prepare(labels, guidance=guidance, seed=seed, **sampling)
    for k in range(len(a.scale_schedule)):
        x = a.scale_input(st, k)
        x = a.forward_layers(st, k, x, range(0, split))
        x = a.forward_layers(st, k, x, range(split, a.num_layers))
        codes = a.sample(st, k, a.guide(st, k, a.head(st, k, x)))
        a.update(st, k, codes)
    tokens, f_hat = list(st.tokens), st.f_hat
    a.finish(st)
    return tokens, f_hat


@needs_reference
def test_tiny_weights_are_the_golden_weights(tiny):
    from safetensors.torch import load_file
    meta = json.loads((GOLDEN / "golden_meta.json").read_text())["config"]["files"]
    for module, fname in ((tiny.transformer, meta["weights"]), (tiny.vae, meta["vqvae"])):
        own = module.state_dict()
        for k, v in load_file(str(GOLDEN / fname)).items():
            assert torch.equal(own[k].float(), v.float()), k


@needs_reference
def test_reference_generate_matches_golden_and_steps_match_reference(tiny):
    from safetensors.torch import load_file
    ref = load_file(str(GOLDEN / "var_infer_cfg1.5.safetensors"))
    trace: dict = {}
    img = tiny.reference_generate(LABELS, guidance=1.5, seed=0, top_k=1, top_p=0.0, trace=trace)
    for si, idx in enumerate(trace["tokens"]):
        assert torch.equal(idx, ref[f"idx_scale{si:02d}"]), si
    assert (img - ref["image_01"]).abs().max() < 1e-4
    # the adapter steps (identity policy) reproduce the plain loop exactly
    tokens, f_hat = _run_steps(tiny, LABELS, 1.5, 0, top_k=1, top_p=0.0)
    assert all(torch.equal(a, b) for a, b in zip(tokens, trace["tokens"]))
    assert torch.equal(f_hat, trace["f_hat"])


def test_steps_match_reference_with_sampling(tiny):
    trace: dict = {}
    labels = torch.tensor([88])
    tiny.reference_latent(labels, guidance=4.0, seed=3, top_k=50, top_p=0.9, trace=trace)
    tokens, f_hat = _run_steps(tiny, labels, 4.0, 3, top_k=50, top_p=0.9)
    assert all(torch.equal(a, b) for a, b in zip(tokens, trace["tokens"]))
    assert torch.equal(f_hat, trace["f_hat"])


def test_guide_ramp_and_drop_unconditional(tiny):
    a = tiny
    B, H, c = 2, TINY_CONFIG.num_heads, TINY_CONFIG.head_dim
    st = a.prepare(LABELS, guidance=1.5, seed=0, top_k=1, top_p=0.0)
    assert st.guided and st.rows == 2 * B
    seen = 0
    for k in range(2):
        x = a.forward_layers(st, k, a.scale_input(st, k), range(a.num_layers))
        logits = a.head(st, k, x)
        assert logits.shape == (2 * B, a.tokens_per_scale()[k], TINY_CONFIG.vocab_size)
        t = 1.5 * k / 9
        assert torch.equal(a.guide(st, k, logits), (1 + t) * logits[:B] - t * logits[B:])
        a.update(st, k, a.sample(st, k, a.guide(st, k, logits)))
        seen += a.tokens_per_scale()[k]
    a.drop_unconditional(st)
    assert not st.guided and st.rows == B
    assert st.cond_BD.shape == (B, TINY_CONFIG.embed_dim)
    assert all(m.shape[0] == B for m in st.block_mods) and st.head_mod.shape[0] == B
    for cache in st.caches:
        assert cache.k.shape == (B, H, seen, c) and cache.v.shape == (B, H, seen, c)
    x = a.scale_input(st, 2)
    assert x.shape == (B, 9, TINY_CONFIG.embed_dim)
    logits = a.head(st, 2, a.forward_layers(st, 2, x, range(a.num_layers)))
    assert logits.shape[0] == B and torch.equal(a.guide(st, 2, logits), logits)
    a.finish(st)


def test_positions_subset_appends_exactly_n_keys(tiny):
    a = tiny
    st = a.prepare(LABELS, guidance=1.5, seed=0, top_k=1, top_p=0.0)
    for k in range(3):
        x = a.forward_layers(st, k, a.scale_input(st, k), range(a.num_layers))
        a.update(st, k, a.sample(st, k, a.guide(st, k, a.head(st, k, x))))
    before = [c.length for c in st.caches]
    k, n = 3, 5
    positions = torch.stack([torch.tensor([0, 3, 7, 8, 15])] * st.rows)          # (rows, n) of 16
    x_full = a.scale_input(st, k)
    x_sub = torch.gather(x_full, 1, positions[..., None].expand(-1, -1, x_full.shape[-1]))
    h = a.forward_layers(st, k, x_sub, range(a.num_layers), positions=positions)
    assert h.shape == (st.rows, n, TINY_CONFIG.embed_dim)
    assert [c.length for c in st.caches] == [b + n for b in before]
    with pytest.raises(ValueError):
        a.forward_layers(st, k, x_sub, range(1), positions=positions[:, :2])
    a.finish(st)


def test_encode_prompts(tiny):
    assert tiny.encode_prompts(["207", "class 971", " Class 3 ", "unconditional"]).tolist() == [207, 971, 3, 1000]
    # ImageNet names and synonyms, any case; underscores as spaces; a capital settles a shared name
    assert tiny.encode_prompts(["goldfish", "Golden_Retriever", "Tinca tinca", "Cardigan", "cardigan"]).tolist() == \
        [1, 207, 0, 264, 474]
    # shared by two classes as a name ("crane": bird 134, machine 517): refused, listing both
    with pytest.raises(ConditionError, match=r"ambiguous.*134.*517"):
        tiny.encode_prompts(["crane"])
    with pytest.raises(ConditionError, match=r"'golden retreiver'.*closest.*'golden retriever' \(207\)"):
        tiny.encode_prompts(["207", "golden retreiver"])
    with pytest.raises(ConditionError, match="1000"):
        tiny.encode_prompts(["1000"])
    with pytest.raises(ConditionError):
        tiny.encode_prompts([])


def test_imagenet_table_and_bundled_class_prompts():
    from calibrate.prompts import bundled
    from stagevar.models import imagenet
    assert imagenet.class_name(207) == "golden retriever" and imagenet.class_name(999) == "toilet tissue"
    # every class name resolves to its own class unless it is shared as a name (crane, maillot)
    names = [imagenet.class_name(i) for i in range(imagenet.NUM_CLASSES)]
    shared = {n.lower() for n in names if sum(m.lower() == n.lower() for m in names) > 1}
    assert shared == {"crane", "maillot", "cardigan"}
    for i, n in enumerate(names):
        if n.lower() not in shared or n != n.lower():
            assert imagenet.class_id(n) == i, n
    for split in ("calibration", "heldout"):
        prompts = bundled("var-d16", split, 8)
        ids = [imagenet.class_id(p) for p in prompts]
        assert len(set(ids)) == 8 and all(not p.isdigit() for p in prompts)


# ----------------------------------------------------------------------------------------- weights
def test_wrong_key_raises_weights_error(tiny):
    sd = dict(tiny.transformer.state_dict())
    sd["head.weigth"] = sd.pop("head.weight")
    with pytest.raises(WeightsError, match=r"missing keys: head\.weight.*unexpected keys: head\.weigth"):
        load_checked_state_dict(tiny.transformer, sd, source="bad.pth")
    sd = dict(tiny.transformer.state_dict())
    sd["head.bias"] = torch.zeros(3)
    with pytest.raises(WeightsError, match="head.bias"):
        load_checked_state_dict(tiny.transformer, sd, source="bad.pth")


def test_wrong_checkpoint_file_raises_before_allocating(tmp_path):
    torch.save({"bogus.weight": torch.zeros(2)}, tmp_path / "var_d16.pth")
    torch.save({}, tmp_path / "vae_ch160v4096z32.pth")
    with pytest.raises(WeightsError, match=r"var_d16\.pth.*missing keys: pos_start.*unexpected keys: bogus\.weight"):
        build_var("var-d16", _CONFIGS["var-d16"], weights=tmp_path)


def test_load_from_checkpoint_directory(tiny, tmp_path):
    # upstream-style files: a .pth without the derived mask (bf16 values), a .safetensors VQVAE
    from safetensors.torch import save_file
    var_sd = {k: v.bfloat16() if v.is_floating_point() else v
              for k, v in tiny.transformer.state_dict().items() if k != "attn_bias_for_masking"}
    torch.save(var_sd, tmp_path / "var_d2.pth")
    save_file({k: v.contiguous() for k, v in tiny.vae.state_dict().items()}, str(tmp_path / "vae_ch160v4096z32.safetensors"))
    a = build_var("var-tiny-file", TINY_CONFIG, weights=tmp_path / "var_d2.pth")
    for mine, theirs in ((a.transformer, tiny.transformer), (a.vae, tiny.vae)):
        own = theirs.state_dict()
        assert all(torch.equal(v, own[k]) for k, v in mine.state_dict().items())


def test_missing_weights_lists_expected_files(tmp_path):
    for weights in (tmp_path / "nowhere", tmp_path):
        with pytest.raises(WeightsError) as err:
            build_var("var-d20", _CONFIGS["var-d20"], weights=weights)
        msg = str(err.value)
        assert "var_d20.pth" in msg and "vae_ch160v4096z32.pth" in msg and "Hugging Face" in msg
    with pytest.raises(WeightsError, match="needs weights"):
        build_var("var-d20", _CONFIGS["var-d20"], weights=None)


def test_registry_entries():
    from stagevar.models.registry import list_models, model_entry
    names = list_models()
    for n in ("var-d16", "var-d20", "var-d24", "var-d30", "var-d36", "var-tiny"):
        assert n in names and model_entry(n).family == "var"
    assert model_entry("var-tiny").needs_weights is False and model_entry("var-d16").needs_weights is True


@pytest.mark.slow
def test_random_weights_full_size_d16_one_scale():
    a = build_var("var-d16", _CONFIGS["var-d16"], random_weights=True)
    st = a.prepare(torch.tensor([1]), guidance=4.0, seed=0)
    h = a.forward_layers(st, 0, a.scale_input(st, 0), range(a.num_layers))
    assert torch.isfinite(a.head(st, 0, h)).all()
