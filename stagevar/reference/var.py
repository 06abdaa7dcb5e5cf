"""Checking :mod:`stagevar.models.var` against a VAR golden directory (``var/golden``).

Everything is read from the directory's ``golden_meta.json`` (file names in ``config.files``,
guidance values in ``config.cfg_values``, the model in ``config.build_vae_var_kwargs``, sampling
arguments in ``config.infer_kwargs``); the format is described in ``shared/reference/README.md``
(sections B and F). Rows, in order:

1. ``teacher-forced``: the teacher-forcing input rebuilt from the tokens, then ``VAR.forward`` on
   the recorded input: logits pieces, argmax, last hidden state, class embedding, block-0 input.
2. for every guidance value: ``forced-inference cfg=X`` (the KV-cached loop with the recorded
   tokens forced at each scale; guided logits with a tolerance scaled by the CFG amplification
   ``|1 + cfg| + |cfg|``), ``greedy cfg=X`` (free-running tokens, exact), ``latent cfg=X``
   (``f_hat``) and ``image cfg=X``.

>>> from pathlib import Path
>>> rows = check_var_golden(Path("shared/reference/var/golden"))  # doctest: +SKIP
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stagevar.reference import CheckRow, compare, compare_exact, runtime_rows

log = logging.getLogger(__name__)

FAMILY = "var"
TOL_LOGITS = 1e-4     # float32 logits of |value| up to ~25: thread count / kernel order differences
TOL_INPUT = 1e-5      # teacher-forcing input (embedding + bicubic + conv + area): tiny values
TOL_LATENT = 1e-4
TOL_IMAGE = 1e-4      # the VQVAE decoder differs by ~3e-6 between 1 and 2 threads


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(path))


def _upcast(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Parameters are stored as bf16 (exactly representable float32 values): upcast them."""
    return {k: (v.float() if v.dtype in (torch.bfloat16, torch.float16) else v) for k, v in sd.items()}


def _scale_keys(tensors: dict[str, torch.Tensor], prefix: str) -> list[torch.Tensor]:
    pat = re.compile(re.escape(prefix) + r"(\d+)$")
    found = sorted((int(m.group(1)), k) for k in tensors if (m := pat.match(k)))
    return [tensors[k] for _, k in found]


def _cfg_file(files: dict[str, str], cfg: float) -> str:
    for key, name in files.items():
        if key.startswith("infer_cfg"):
            try:
                if float(key[len("infer_cfg"):]) == float(cfg):
                    return name
            except ValueError:
                continue
    raise KeyError(f"golden_meta.json config.files has no infer_cfg entry for cfg={cfg}")


def build_from_meta(config: dict[str, Any]):
    """The adapter described by ``config.build_vae_var_kwargs`` (float32, CPU, uninitialised)."""
    from stagevar.models.var import VARConfig, materialize
    cfg = VARConfig.from_build_kwargs(config["build_vae_var_kwargs"])
    return materialize("var-golden", cfg, torch.device("cpu"), torch.float32)


@torch.no_grad()
def check_var_golden(golden_dir: Path, engine: str | None = None) -> list[CheckRow]:
    """Compare the VAR implementation with one golden directory; one :class:`CheckRow` per tensor."""
    from stagevar.models.var import _VAE_DERIVED, _VAR_DERIVED, load_checked_state_dict

    golden_dir = Path(golden_dir)
    meta = json.loads((golden_dir / "golden_meta.json").read_text())
    config = meta["config"]
    files = config["files"]
    adapter = build_from_meta(config)
    tr, vae = adapter.transformer, adapter.vae

    # weights: the VAR file omits the derived mask; the VQVAE file omits what decoding never uses
    var_sd = _upcast(_load(golden_dir / files["weights"]))
    load_checked_state_dict(tr, var_sd, source=files["weights"], derived=_VAR_DERIVED)
    load_checked_state_dict(vae, _upcast(_load(golden_dir / files["vqvae"])), source=files["vqvae"],
                            derived=_VAE_DERIVED,
                            allow_missing=lambda k: k.startswith(("encoder.", "quant_conv.")))

    inputs = _load(golden_dir / files["inputs"])
    labels = inputs["labels"].long()
    probe = inputs["vocab_probe_idx"].long()
    tf_idx = _scale_keys(inputs, "tf_idx_scale")

    rows = _teacher_forced_rows(tr, vae, var_sd, labels, probe, tf_idx, inputs, _load(golden_dir / files["teacher_forced"]))
    infer = config.get("infer_kwargs", {})
    if infer.get("more_smooth"):
        raise NotImplementedError("golden runs with more_smooth=True (gumbel smoothing) are not supported")
    for cfg in config["cfg_values"]:
        rows += _guided_rows(adapter, labels, probe, float(cfg), infer, _load(golden_dir / _cfg_file(files, float(cfg))),
                             engine)
    bad = [r for r in rows if not r.passed]
    log.info("VAR golden %s: %d/%d rows passed", golden_dir, len(rows) - len(bad), len(rows))
    return rows


def _teacher_forced_rows(tr, vae, var_sd, labels, probe, tf_idx, inputs, ref) -> list[CheckRow]:
    """Teacher forcing: the derived level buffer, the transformer's input and its logits and
    hidden states against the reference's."""
    rows: list[CheckRow] = []
    stage = "teacher-forced"
    if "lvl_1L" in var_sd:
        rows.append(compare_exact(FAMILY, stage, "lvl_1L", tr.lvl_1L, var_sd["lvl_1L"], "derived buffer vs file"))
    tf_x = inputs["tf_x_BLCv_wo_first_l"].float()
    rows.append(compare(FAMILY, stage, "tf_x_BLCv_wo_first_l", vae.quantize.idxBl_to_var_input(tf_idx), tf_x,
                        TOL_INPUT, "VQVAE idxBl_to_var_input of tf_idx_scaleNN"))
    logits, hidden = tr(labels, tf_x, return_hidden=True)
    rows += _logit_rows(stage, "logits", logits, ref, probe, TOL_LOGITS)
    if "h_last_block_output" in ref:
        rows.append(compare(FAMILY, stage, "h_last_block_output", hidden["h_last_block_output"],
                            ref["h_last_block_output"], TOL_LOGITS))
    if "cond_BD" in ref:
        rows.append(compare(FAMILY, stage, "cond_BD", hidden["cond_BD"], ref["cond_BD"], TOL_LOGITS))
    for key in ref:
        if key.startswith("x_BLC_block0_input"):
            n = ref[key].shape[1]
            rows.append(compare(FAMILY, stage, key, hidden["x_block0_input"][:, :n], ref[key], TOL_LOGITS))
    return rows


def _guided_rows(adapter, labels, probe, cfg: float, infer: dict, ref, engine) -> list[CheckRow]:
    """One guidance value: logits with the reference's tokens forced, greedy tokens, the latent,
    the image, and the runtime's rows (every engine gives the reference's tokens)."""
    vae = adapter.vae
    rows: list[CheckRow] = []
    seed = int(infer.get("g_seed", 0))
    top_k, top_p = int(infer.get("top_k", 1)), float(infer.get("top_p", 0.0))
    ref_idx = _scale_keys(ref, "idx_scale")
    amp = abs(1 + cfg) + abs(cfg)

    stage = f"forced-inference cfg={cfg:g}"
    trace: dict[str, Any] = {}
    adapter.reference_latent(labels, guidance=cfg, seed=seed, top_k=top_k, top_p=top_p,
                             trace=trace, force_tokens=ref_idx)
    guided = torch.cat(trace["guided_logits"], dim=1)
    raw = torch.cat(trace["raw_logits"], dim=1)
    B = labels.shape[0]
    rows += _logit_rows(stage, "guided", guided, ref, probe, TOL_LOGITS * amp,
                        note=f"tolerance x{amp:g} (CFG amplification)")
    if "raw_cond_logsumexp" in ref:
        rows.append(compare(FAMILY, stage, "raw_cond_logsumexp", raw[:B].logsumexp(-1),
                            ref["raw_cond_logsumexp"], TOL_LOGITS))
    if "raw_uncond_logsumexp" in ref:
        rows.append(compare(FAMILY, stage, "raw_uncond_logsumexp", raw[B:].logsumexp(-1),
                            ref["raw_uncond_logsumexp"], TOL_LOGITS))

    stage = f"greedy cfg={cfg:g}"
    trace = {}
    f_hat = adapter.reference_latent(labels, guidance=cfg, seed=seed, top_k=top_k, top_p=top_p, trace=trace)
    for si, (ours, want) in enumerate(zip(trace["tokens"], ref_idx)):
        rows.append(compare_exact(FAMILY, stage, f"idx_scale{si:02d}", ours, want))
    if "f_hat" in ref:
        rows.append(compare(FAMILY, f"latent cfg={cfg:g}", "f_hat", f_hat, ref["f_hat"], TOL_LATENT))
    image = vae.fhat_to_img01(f_hat)
    stage = f"image cfg={cfg:g}"
    if "image_01" in ref:
        rows.append(compare(FAMILY, stage, "image_01", image, ref["image_01"], TOL_IMAGE))
    if "image_01_avgpool8" in ref:
        rows.append(compare(FAMILY, stage, "image_01_avgpool8", F.avg_pool2d(image, 8),
                            ref["image_01_avgpool8"], TOL_IMAGE))
    rows += runtime_rows(FAMILY, f"greedy cfg={cfg:g}", adapter, labels, cfg, seed, engine, ref_idx,
                         ref.get("image_01"), TOL_IMAGE, top_k=top_k, top_p=top_p)
    return rows


def _logit_rows(stage: str, prefix: str, logits_BLV: torch.Tensor, ref: dict[str, torch.Tensor],
                probe: torch.Tensor, tol: float, note: str = "") -> list[CheckRow]:
    """Rows for the stored pieces of a (B, L, V) logits tensor: full-vocabulary prefix
    (``<prefix>_scales0toN`` / ``<prefix>_logits_scales0toN``), probe columns, logsumexp, top-2
    values and argmax."""
    rows = []
    for key in sorted(ref):
        if key.startswith(prefix) and "_scales0to" in key:
            n = ref[key].shape[1]
            rows.append(compare(FAMILY, stage, key, logits_BLV[:, :n], ref[key], tol, note))
    pieces = {
        f"{prefix}_probe": lambda: logits_BLV[..., probe],
        f"{prefix}_logsumexp": lambda: logits_BLV.logsumexp(-1),
        f"{prefix}_top2": lambda: logits_BLV.topk(2, dim=-1).values,
    }
    for key, fn in pieces.items():
        if key in ref:
            rows.append(compare(FAMILY, stage, key, fn(), ref[key], tol, note))
    if f"{prefix}_argmax" in ref:
        rows.append(compare_exact(FAMILY, stage, f"{prefix}_argmax", logits_BLV.argmax(-1), ref[f"{prefix}_argmax"]))
    return rows
