"""Teacher forcing as upstream Infinity trains it: bit labels per scale from the residual
quantisation (with bitwise self-correction and, optionally, the model's own sampled prefix), the
transformer's logits over all scales at once, and the bitwise cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from stagevar.models.bsq_vae import accumulate_step, bits_to_codes


def to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Host tensor -> ``dev``; to a GPU through pinned memory without waiting for the queued work."""
    if dev.type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def teacher_forcing_targets(vae, feats_BdHW: torch.Tensor, vae_sched, n_scales: int, flip_p: float,
                            gen: torch.Generator | None, own_bits=None, own_rows: torch.Tensor | None = None,
                            own_scales: int = 0):
    """Bit labels per scale and the teacher-forcing input (B, L-1, d), with bitwise self-correction.

    Upstream ``BitwiseSelfCorrection.flip_requant``: residual = features - sum of the (possibly
    corrupted) codes so far, area-downsampled to the scale, quantised -> labels; a fraction
    ``flip_p`` of the labels is flipped before the codes are accumulated (not on the last scale).

    Self-sampled prefix (``own_bits``): on the first ``own_scales`` scales, the rows in
    ``own_rows`` accumulate the model's own sampled bits instead of (flipped) labels, so the
    later labels teach it to repair the coarse layouts it actually draws. ``own_bits(si, x)``
    gets the teacher-forcing input so far (B, l, d) and returns bits shaped like the labels'."""
    feats = feats_BdHW.float().unsqueeze(2)
    full = tuple(vae_sched[-1])
    summed = None
    labels, inputs = [], []
    for si in range(n_scales):
        size = tuple(vae_sched[si])
        resid = feats if summed is None else feats - summed
        r = F.interpolate(resid, size=size, mode="area") if size != full else resid
        _, bits = vae.quantizer.lfq(r)
        labels.append(bits.reshape(bits.shape[0], -1, bits.shape[-1]))             # (B, hw, d)
        if si == n_scales - 1:
            break
        if flip_p > 0:
            m = to_device(torch.rand(bits.shape, generator=gen, device="cpu"), bits.device) < flip_p
            bits = torch.where(m, 1 - bits, bits)
        if own_bits is not None and si < own_scales:
            prefix = torch.cat(inputs, 1) if inputs else feats.new_zeros(feats.shape[0], 0, feats.shape[1])
            mine = own_bits(si, prefix).to(bits.dtype).reshape(bits.shape)
            rows = own_rows.view(-1, *([1] * (bits.ndim - 1)))
            bits = torch.where(rows, mine, bits)
        summed, nxt = accumulate_step(summed, bits_to_codes(bits), si, vae_sched)
        inputs.append(nxt)
    return torch.cat(labels, 1), torch.cat(inputs, 1)


def teacher_forced_logits(tr, kv_compact, lens, x_BLC_wo_prefix, n_scales: int):
    """The transformer's teacher-forced logits on the first ``n_scales`` scales, and each token's
    scale index (L,)."""
    logits = tr(kv_compact, lens, x_BLC_wo_prefix, num_scales=n_scales)
    sizes = [t * h * w for (t, h, w) in list(tr.cfg.scale_schedule)[:n_scales]]
    level = torch.cat([torch.full((n,), i, dtype=torch.long, device=logits.device) for i, n in enumerate(sizes)])
    return logits, level


def own_bit_sampler(tr, kv_compact, lens, gen: torch.Generator | None, amp: dict):
    """``own_bits`` for :func:`teacher_forcing_targets`: bits of scale ``si`` sampled (tau 1, no
    guidance) from ``tr``'s teacher-forced prediction given the input so far."""
    def sample(si: int, prefix: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(**amp):
            logits, level = teacher_forced_logits(tr, kv_compact, lens, prefix, si + 1)
        pairs = logits[:, level == si].float().reshape(logits.shape[0], -1, 2)
        p1 = torch.softmax(pairs, -1)[..., 1]
        u = to_device(torch.rand(p1.shape, generator=gen, device="cpu"), p1.device)
        return (u < p1).long()
    return sample


def sample_own_prefix(own_bits, vae_sched, n_own: int, B: int, d: int, device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The model's own bits on the first ``n_own`` scales, each sampled given its own earlier ones
    (``own_bits`` from :func:`own_bit_sampler`), and their accumulated codes (B, d, 1, H, W)."""
    summed, inputs, out = None, [], []
    for si in range(n_own):
        _, h, w = vae_sched[si]
        prefix = torch.cat(inputs, 1) if inputs else torch.zeros(B, 0, d, device=device)
        bits = own_bits(si, prefix).reshape(B, 1, h, w, d)
        out.append(bits)
        summed, nxt = accumulate_step(summed, bits_to_codes(bits), si, vae_sched)
        inputs.append(nxt)
    return out, summed


def nearest_scene(summed_Bd1HW: torch.Tensor, cand_BKdHW: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Index (B,) of the candidate whose features, area-pooled to ``size``, are closest (squared
    error) to the own prefix's accumulated codes pooled the same way: the ground-truth scene that
    the coarse layout the model drew is closest to."""
    B, K = cand_BKdHW.shape[:2]
    mine = F.adaptive_avg_pool2d(summed_Bd1HW.squeeze(2).float(), size)                  # (B, d, h, w)
    cand = F.adaptive_avg_pool2d(cand_BKdHW.flatten(0, 1).float(), size).view(B, K, *mine.shape[1:])
    return (cand - mine.unsqueeze(1)).square().flatten(2).sum(-1).argmin(1)


def bit_ce(logits_BLV: torch.Tensor, labels_BLd: torch.Tensor) -> torch.Tensor:
    """Per-token mean cross-entropy over the bits (logit pair (2j, 2j+1) for bit j): (B, L)."""
    B, L, V = logits_BLV.shape
    lp = F.log_softmax(logits_BLV.float().view(B, L, V // 2, 2), dim=-1)
    return -lp.gather(-1, labels_BLd.unsqueeze(-1)).squeeze(-1).mean(-1)
