"""Check the project's Infinity (transformer + BSQ VAE) against an ``infinity/golden`` directory.

Order (shared/reference/README.md, section D): teacher-forced logits -> inference with the
recorded bits forced at every scale (guided logits) -> free-running greedy bits -> latent -> image.
Everything the check needs is read from ``golden_meta.json``; file names are never guessed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from stagevar.reference import CheckRow, compare, compare_exact, runtime_rows

FAMILY = "infinity"
TF_TOL = 1e-4
IMG_TOL = 1e-5


def _build(meta: dict, golden: Path):
    from stagevar.models.bsq_vae import BSQVAE, BSQVAEConfig
    from stagevar.models.checkpoints import assign
    from stagevar.models.infinity import InfinityAdapter, InfinityConfig, upstream_schedule

    c = meta["config"]
    ctor = c["infinity_ctor"]
    sched = [tuple(s) for s in meta["scale_schedule"]]
    _, grid = upstream_schedule(c.get("h_div_w", 1.0), "1M")
    patchify = bool(ctor.get("apply_spatial_patchify", 0))
    vae_args = c["vae"]["args"]
    base_ch = 128
    override = c["vae"].get("override", "")
    if "base_ch=" in override:
        base_ch = int(override.split("base_ch=")[1].split()[0].rstrip(",)"))
    vae_cfg = BSQVAEConfig(codebook_dim=vae_args["codebook_dim"], patch_size=vae_args.get("patch_size", 16), base_ch=base_ch,
                           encoder_ch_mult=tuple(vae_args["encoder_ch_mult"]), decoder_ch_mult=tuple(vae_args["decoder_ch_mult"]))
    cfg = InfinityConfig(depth=ctor["depth"], embed_dim=ctor["embed_dim"], num_heads=ctor["num_heads"],
                         text_channels=ctor["text_channels"], text_maxlen=ctor.get("text_maxlen", 512),
                         codebook_dim=vae_args["codebook_dim"], scale_schedule=tuple(sched), rope_grid=grid,
                         mlp_ratio=ctor.get("mlp_ratio", 4), block_chunks=ctor.get("block_chunks", 1),
                         apply_spatial_patchify=patchify, vae_stride=vae_args.get("patch_size", 16))
    model = InfinityAdapter("reference", cfg, BSQVAE(vae_cfg)).eval()
    files = c["files"]
    tr_sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(golden / files["weights"])).items()}
    vae_sd = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(golden / files["vae"])).items()}
    assign(model.transformer, tr_sd, f"{golden / files['weights']}", resize={"cfg_uncond"})
    assign(model.vae, vae_sd, f"{golden / files['vae']}", optional_prefixes=("encoder.", "quant_conv."))
    return model


def check_infinity_golden(golden: str | Path, engine: str | None = None) -> list[CheckRow]:
    from stagevar.models.infinity import TextCondition

    golden = Path(golden)
    meta = json.loads((golden / "golden_meta.json").read_text())
    c = meta["config"]
    files = c["files"]
    model = _build(meta, golden)
    inputs = load_file(str(golden / files["inputs"]))
    tf = load_file(str(golden / files["teacher_forced"]))
    lens = [int(n) for n in inputs["text_lens"].tolist()]
    cond = TextCondition(inputs["text_kv_compact"].float(), lens)
    n_scales = len(meta["scale_schedule"])
    rows: list[CheckRow] = []
    kw = c.get("infer_kwargs", {})
    tau = 0.5
    if "tau_list" in kw and isinstance(kw["tau_list"], str) and kw["tau_list"].startswith("[") and "]*" in kw["tau_list"]:
        tau = float(kw["tau_list"][1:kw["tau_list"].index("]")])
    top_k, top_p = int(kw.get("top_k", 1)), float(kw.get("top_p", 0.0))

    with torch.no_grad():
        logits, hidden = model.transformer(cond.kv_compact, lens, inputs["tf_x_BLC_wo_prefix"].float(), return_hidden=True)
    rows.append(compare(FAMILY, "teacher-forced", "logits", logits, tf["logits"], TF_TOL))
    if "h_last_block_output" in tf:
        rows.append(compare(FAMILY, "teacher-forced", "h_last_block_output", hidden, tf["h_last_block_output"], TF_TOL))

    for cfg_value in c["cfg_values"]:
        key = f"infer_cfg{float(cfg_value)}"
        if key not in files:
            continue
        ref = load_file(str(golden / files[key]))
        ref_bits = [ref[f"bits_scale{si:02d}"] for si in range(n_scales)]
        amp = (abs(cfg_value) + abs(cfg_value - 1)) / tau if cfg_value != 1 else 1 / tau
        stage = f"cfg={cfg_value:g}"
        # (2) forced bits
        trace: dict = {}
        model.reference_generate(cond, guidance=cfg_value, seed=int(kw.get("g_seed", 0)), trace=trace,
                                 force_bits=[b.long() for b in ref_bits], tau=tau, top_k=top_k, top_p=top_p)
        rows.append(compare(FAMILY, f"forced-bits {stage}", "guided_logits", trace["guided_logits"], ref["guided_logits"],
                            TF_TOL * amp, f"tolerance 1e-4 x guidance amplification {amp:g}"))
        if "sos_cond_BD" in ref:
            rows.append(compare(FAMILY, f"forced-bits {stage}", "sos_cond_BD", trace["cond_BD"], ref["sos_cond_BD"], TF_TOL))
        # (3) free-running greedy
        trace = {}
        img = model.reference_generate(cond, guidance=cfg_value, seed=int(kw.get("g_seed", 0)), trace=trace,
                                       tau=tau, top_k=top_k, top_p=top_p)
        bits = torch.cat([b.reshape(b.shape[0], -1) for b in trace["bits"]], 1)
        want = torch.cat([b.reshape(b.shape[0], -1) for b in ref_bits], 1)
        rows.append(compare_exact(FAMILY, f"greedy {stage}", "bits (all scales)", bits, want))
        rows.append(compare(FAMILY, f"greedy {stage}", "summed_codes", trace["summed_codes"].squeeze(-3), ref["summed_codes"], 1e-5))
        img_m11 = img * 2 - 1
        if "image_m11" in ref:
            rows.append(compare(FAMILY, f"image {stage}", "image_m11", img_m11, ref["image_m11"], IMG_TOL))
        if "image_m11_avgpool8" in ref:
            rows.append(compare(FAMILY, f"image {stage}", "image_m11_avgpool8", F.avg_pool2d(img_m11, 8), ref["image_m11_avgpool8"], IMG_TOL))
        # (4) the same greedy generation through the runtime
        rows += runtime_rows(FAMILY, f"greedy {stage}", model, cond, cfg_value, int(kw.get("g_seed", 0)), engine,
                             [b.long() for b in ref_bits], ref.get("image_m11"), IMG_TOL, lambda im: im * 2 - 1,
                             tau=tau, top_k=top_k, top_p=top_p)
    return rows
