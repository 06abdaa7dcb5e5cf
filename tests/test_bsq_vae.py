"""Infinity BSQ VAE against upstream: state-dict manifests and the golden tensors of the reference data.

The reference directory is ``$STAGEVAR_SHARED/reference`` or ``<repo>/../shared/reference``; every
file name, the scale schedule and the guidance values come from ``golden_meta.json``.
"""
from __future__ import annotations

import doctest
import json
import re

import pytest
import torch
import torch.nn.functional as F

from refdata import REFERENCE, need
from stagevar.models import bsq_vae
from stagevar.models.bsq_vae import (
    BSQVAE,
    BSQVAEConfig,
    BSQVAEConfigError,
    WeightsShapeError,
    accumulate_codes,
    accumulate_step,
    bits_to_codes,
)


INFINITY_REF = REFERENCE / "infinity"
MANIFESTS = INFINITY_REF / "manifests"
GOLDEN = INFINITY_REF / "golden"
_need = need


@pytest.fixture(autouse=True)
def _two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


# ------------------------------------------------------------------------------------ manifests
@pytest.mark.parametrize(
    "manifest, config",
    [
        ("infinity_vae_d32_reg.json", BSQVAEConfig.d32_reg()),
        ("infinity_vae_d56_f8_14_patchify.json", BSQVAEConfig.d56_f8_14_patchify()),
    ],
)
def test_state_dict_matches_manifest(manifest, config):
    ref = json.loads(_need(MANIFESTS / manifest).read_text())
    args = ref["config"]["args"]
    fixed = ref["config"]["fixed_inside_vae_model"]
    assert (config.codebook_dim, config.patch_size, config.base_ch, config.num_res_blocks) == (
        args["codebook_dim"], args["patch_size"], fixed["base_ch"], fixed["num_res_blocks"])
    assert list(config.encoder_ch_mult) == args["encoder_ch_mult"]
    assert list(config.decoder_ch_mult) == args["decoder_ch_mult"]
    assert config.codebook_size == args["codebook_size"]

    with torch.device("meta"):
        vae = BSQVAE(config)
    params = {name for name, _ in vae.named_parameters()}
    got = [
        {"key": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "is_parameter": k in params}
        for k, v in vae.state_dict().items()
    ]
    want = ref["state_dict"]
    assert [e["key"] for e in got] == [e["key"] for e in want]  # order included
    assert got == want
    assert len(got) == ref["num_entries"]
    assert sum(p.numel() for p in vae.parameters()) == ref["num_parameters"]
    assert sum(v.numel() for v in vae.state_dict().values()) == ref["num_state_dict_elements"]
    assert vae.quantize is vae.quantizer


# ------------------------------------------------------------------------------------- goldens
def _meta() -> dict:
    return json.loads(_need(GOLDEN / "golden_meta.json").read_text())


def _load(role: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(_need(GOLDEN / _meta()["config"]["files"][role])))


def _schedule() -> list[tuple[int, int, int]]:
    return [tuple(s) for s in _meta()["scale_schedule"]]


def _golden_config() -> BSQVAEConfig:
    vae_meta = _meta()["config"]["vae"]
    args = vae_meta["args"]
    match = re.search(r"base_ch\s*=\s*(\d+)", vae_meta.get("override", ""))
    return BSQVAEConfig(
        codebook_dim=args["codebook_dim"], patch_size=args["patch_size"],
        base_ch=int(match.group(1)) if match else 128,
        encoder_ch_mult=tuple(args["encoder_ch_mult"]), decoder_ch_mult=tuple(args["decoder_ch_mult"]),
    )


def _infer_roles() -> list[str]:
    return [role for role in _meta()["config"]["files"] if role.startswith("infer_cfg")]


def _bits(tensors: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    n = len(_schedule())
    return [tensors[f"{prefix}{si:02d}"] for si in range(n)]


@pytest.fixture(scope="module")
def golden_vae() -> BSQVAE:
    _need(GOLDEN / "golden_meta.json")
    assert _golden_config() == BSQVAEConfig.golden_tiny()
    vae = BSQVAE(_golden_config()).eval()
    weights = _load("vae")
    encoder_keys = {k for k in vae.state_dict() if k.startswith("encoder.")}
    # The file holds everything but the encoder, parameters as bf16 (float32 values exactly).
    assert set(weights) == set(vae.state_dict()) - encoder_keys
    assert all(v.dtype == torch.bfloat16 for k, v in weights.items() if not k.endswith(".lfq.mask"))
    vae.load_weights(weights, missing_ok_prefixes=("encoder.",))
    for k, v in weights.items():
        assert torch.equal(vae.state_dict()[k], v.float() if v.is_floating_point() else v), k
    return vae


def test_golden_decode(golden_vae):
    """decode(summed_codes) reproduces the images of every guidance run (full or avg-pooled)."""
    compared = 0
    for role in _infer_roles():
        ref = _load(role)
        with torch.no_grad():
            img = golden_vae.decode(ref["summed_codes"])
        assert img.shape[1:] == (3, 16 * ref["summed_codes"].shape[2], 16 * ref["summed_codes"].shape[3])
        assert float(img.abs().max()) <= 1.0
        if "image_m11" in ref:
            err = (img - ref["image_m11"]).abs().max().item()
            assert err <= 1e-5, f"{role}: image max|diff| {err:.3g}"
            compared += 1
            # Upstream decodes channels-last latents; the NCHW kernels round differently (~1e-4).
            with torch.no_grad():
                img_nchw = golden_vae.decode(ref["summed_codes"], channels_last=False)
            assert (img_nchw - ref["image_m11"]).abs().max().item() <= 5e-4
        if "image_m11_avgpool8" in ref:
            err = (F.avg_pool2d(img, 8) - ref["image_m11_avgpool8"]).abs().max().item()
            assert err <= 1e-5, f"{role}: avg-pooled image max|diff| {err:.3g}"
            compared += 1
    assert compared >= 2


def test_golden_bits_to_summed_codes(golden_vae):
    """bits_to_codes + trilinear accumulation (README E step 4) reproduces ``summed_codes``."""
    schedule = _schedule()
    for role in _infer_roles():
        ref = _load(role)
        bits = _bits(ref, "bits_scale")
        for b, (_, h, w) in zip(bits, schedule):
            assert tuple(b.shape) == (ref["summed_codes"].shape[0], 1, h, w, golden_vae.codebook_dim)
        codes = [bits_to_codes(b) for b in bits]
        assert all(torch.equal(c, golden_vae.bits_to_codes(b)) for c, b in zip(codes, bits))
        summed, next_inputs = accumulate_codes(codes, schedule)
        err = (summed - ref["summed_codes"]).abs().max().item()
        assert err <= 1e-6, f"{role}: summed_codes max|diff| {err:.3g}"
        assert [x.shape[1] for x in next_inputs] == [h * w for (_, h, w) in schedule[1:]]
        # decode_bits = the full upstream decode_from_indices path
        if "image_m11_avgpool8" in ref:
            with torch.no_grad():
                img = golden_vae.decode_bits(bits, schedule)
            assert (F.avg_pool2d(img, 8) - ref["image_m11_avgpool8"]).abs().max().item() <= 1e-5


def test_bits_to_codes_formula():
    """Upstream: ``(2*bit-1)/sqrt(d)`` then L2-normalised over d, channel-first; |code| = 1/sqrt(d)."""
    bits = torch.randint(0, 2, (2, 1, 3, 5, 32), generator=torch.Generator().manual_seed(0))
    codes = bits_to_codes(bits)
    assert codes.shape == (2, 32, 1, 3, 5) and codes.dtype == torch.float32
    expected = (bits.float() * 2 - 1).permute(0, 4, 1, 2, 3) / 32 ** 0.5
    assert torch.allclose(codes, expected, atol=1e-7, rtol=0)
    assert torch.equal(bits_to_codes(bits.to(torch.uint8)), codes)


def test_golden_teacher_forcing_input():
    """The next inputs of scales 1..N-1 from the teacher-forcing bits equal ``tf_x_BLC_wo_prefix``."""
    inputs = _load("inputs")
    schedule = _schedule()
    codes = [bits_to_codes(b) for b in _bits(inputs, "tf_bits_scale")]
    summed, next_inputs = accumulate_codes(codes, schedule)
    tf_x = torch.cat(next_inputs, dim=1)
    want = inputs["tf_x_BLC_wo_prefix"]
    assert tf_x.shape == want.shape == (want.shape[0], sum(h * w for (_, h, w) in schedule[1:]), 32)
    err = (tf_x - want).abs().max().item()
    assert err <= 1e-6, f"tf_x_BLC_wo_prefix max|diff| {err:.3g}"
    # Those bits are the bits of one guidance run: its summed codes come out too.
    source = _meta()["config"].get("teacher_forcing_bits_from_cfg")
    role = next((r for r in _infer_roles() if source is not None and float(r[len("infer_cfg"):]) == source), None)
    if role is not None:
        assert (summed - _load(role)["summed_codes"]).abs().max().item() <= 1e-6
    # The step-by-step form (what an inference loop calls) gives the same tensors.
    running = None
    for si, c in enumerate(codes):
        running, nxt = accumulate_step(running, c, si, schedule)
        assert (nxt is None) == (si == len(schedule) - 1)
        if nxt is not None:
            assert torch.equal(nxt, next_inputs[si])
    assert torch.equal(running.squeeze(2), summed)


# ----------------------------------------------------------------------------- encode round trip
def test_encode_quantize_decode_shapes():
    torch.manual_seed(0)
    cfg = BSQVAEConfig.golden_tiny()
    vae = BSQVAE(cfg).eval()
    schedule = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8), (1, 12, 12), (1, 16, 16)]
    img = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        feats = vae.encode(img)
        assert feats.shape == (1, cfg.codebook_dim, 16, 16) and feats.dtype == torch.float32
        out = vae.quantize_multiscale(feats, schedule)
        bits = vae.features_to_bits(feats, schedule)
        bits_cum = vae.features_to_bits(feats, schedule, residual_mode="cumulative")
        recon = vae.decode(out.summed_codes_BdHW)
    assert [tuple(b.shape) for b in bits] == [(1, 1, h, w, cfg.codebook_dim) for (_, h, w) in schedule]
    assert all(b.dtype == torch.int64 and set(b.unique().tolist()) <= {0, 1} for b in bits)
    assert all(torch.equal(a, b) for a, b in zip(bits, out.bits))
    assert sum(int((a != b).sum()) for a, b in zip(bits, bits_cum)) == 0
    assert recon.shape == (1, 3, 256, 256) and float(recon.abs().max()) <= 1.0
    # The quantizer's own sum and teacher-forcing inputs equal the bits -> codes -> accumulation
    # path (up to rounding: the quantizer's straight-through codes are not re-normalised).
    summed, next_inputs = accumulate_codes([bits_to_codes(b) for b in bits], schedule)
    assert (summed - out.summed_codes_BdHW).abs().max().item() <= 1e-6
    assert [tuple(x.shape) for x in out.next_inputs] == [(1, h * w, cfg.codebook_dim) for (_, h, w) in schedule[1:]]
    assert (torch.cat(next_inputs, 1) - torch.cat(out.next_inputs, 1)).abs().max().item() <= 1e-6
    # Quantising at the first scale is the sign of the area mean of the features.
    mean_sign = (feats.mean(dim=(2, 3)) > 0).long()
    assert torch.equal(bits[0].view(1, -1), mean_sign)
    # Residual quantisation makes the approximation better than the first scale alone.
    first_only = F.interpolate(out.codes[0], size=(1, 16, 16), mode="trilinear").squeeze(2)
    f_unit = feats / feats.norm(dim=1, keepdim=True)
    assert (f_unit - out.summed_codes_BdHW).norm() < (f_unit - first_only).norm()


# ----------------------------------------------------------------------------- config and loading
def test_config_validation_and_round_trip():
    cfg = BSQVAEConfig.d56_f8_14_patchify()
    assert BSQVAEConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.codebook_size == 2 ** 14 and cfg.z_channels == 14
    with pytest.raises(BSQVAEConfigError, match="unknown BSQVAEConfig key"):
        BSQVAEConfig.from_dict({"codebook_dims": 32})
    with pytest.raises(BSQVAEConfigError, match="patch_size"):
        BSQVAEConfig(patch_size=12)
    with pytest.raises(BSQVAEConfigError, match="levels"):
        BSQVAEConfig(patch_size=16, encoder_ch_mult=(1, 2, 4, 4), decoder_ch_mult=(1, 2, 4, 4))
    with pytest.raises(BSQVAEConfigError, match="divisible by 32 or 24"):
        BSQVAEConfig(base_ch=20)


def test_load_weights_accepts_upstream_names_and_rejects_mismatches():
    cfg = BSQVAEConfig(codebook_dim=8, patch_size=2, base_ch=32, encoder_ch_mult=(1, 1), decoder_ch_mult=(1, 1))
    src = BSQVAE(cfg)
    sd = src.state_dict()
    # plain nn.Conv2d / nn.GroupNorm names, wrapped in upstream's checkpoint dict, no mask buffers
    plain = {k.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
             .replace(".norm.weight", ".weight").replace(".norm.bias", ".bias"): v.to(torch.bfloat16)
             for k, v in sd.items() if not k.endswith(".lfq.mask")}
    dst = BSQVAE(cfg)
    dst.load_weights({"vae": plain})
    for k, v in sd.items():
        assert torch.equal(dst.state_dict()[k], v.to(torch.bfloat16).float() if v.is_floating_point() else v), k
    with pytest.raises(WeightsShapeError, match="unexpected"):
        dst.load_weights({**sd, "post_quant_conv.weight": torch.zeros(1)})
    with pytest.raises(WeightsShapeError, match="missing"):
        dst.load_weights({k: v for k, v in sd.items() if not k.startswith("decoder.conv_out")})
    with pytest.raises(WeightsShapeError, match="shape"):
        dst.load_weights({**sd, "decoder.conv_out.conv.bias": torch.zeros(4)})


def test_docstring_examples():
    torch.manual_seed(0)
    result = doctest.testmod(bsq_vae, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
