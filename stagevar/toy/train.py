"""Train ``infinity-mini`` on the procedural toy scenes: phase 1 the BSQ VAE, phase 2 the transformer.

Examples::

    # the shipped model: 92 minutes on 2 CPU cores, then resumed to 175 with --max-minutes 175
    # (re-running resumes from runs/mini/ckpt.pt; see stagevar/toy/weights/MODEL_CARD.md)
    python -m stagevar.toy.train --config stagevar/toy/configs/mini.yaml --out runs/mini

    # a 3-minute smoke run on a GPU
    python -m stagevar.toy.train --config stagevar/toy/configs/mini.yaml --out runs/smoke --max-minutes 3 --device cuda

    # continue trained weights on a GPU with larger batches (how the shipped weights were finished)
    python -m stagevar.toy.train --config stagevar/toy/configs/mini.yaml --init stagevar/toy/weights \
        --out runs/gpu --device cuda --max-minutes 5 --workers 12 --set train.batch=64 --set train.short_batch=128

    # average two weights directories of one VAE (how the shipped weights were made last:
    # 0.4 x the GPU-finished weights + 0.6 x a matched-prefix continuation)
    python -m stagevar.toy.train --average runs/step4 runs/matchc/final 0.6 --out runs/avg06

Data are drawn on the fly (never stored): prompts of the ``train`` split grammar
(:func:`stagevar.toy.prompts.make_split`, so no held-out combination is ever seen) and their
ground-truth scenes rendered at ``image_size``.

Phase 1 (``vae_minutes``): encoder -> multi-scale residual BSQ over the schedule (straight-through)
-> decoder, loss MSE + L1 in [-1, 1].

Phase 2 (the rest of ``max_minutes``): teacher forcing as upstream Infinity (README section E):
the frozen VAE gives the features, the bit labels of every scale come from the residual
quantisation, the inputs are the accumulated codes resized to the next scale, and the transformer
predicts all scales at once under the block-causal mask; loss = cross-entropy per bit (logit pairs).
With bitwise self-correction (upstream ``BitwiseSelfCorrection``): a random fraction of each
scale's bits is flipped before accumulating, and later scales' labels are re-quantised from the
corrupted sum, so the model learns to correct its own sampling errors. With a self-sampled prefix
(``self_prefix_scales`` > 0, off by default), a fraction ``self_prefix_prob`` of the rows takes the
EMA model's own sampled bits on the first scales instead (sampled scale by scale from its
teacher-forced prediction), so later scales learn to repair the coarse layouts the model really
draws, whose tokens are sampled independently of each other. With ``self_prefix_match`` = K,
those rows' scene is the nearest of K scenes of their prompt to the own prefix, and they learn
only the scales after it (``self_prefix_categories`` limits the rows to some prompt categories;
see the model card, step 5). Prompts are replaced by the
learned null text with probability ``cond_drop`` (classifier-free guidance). Half of the steps
(``short_prob``) train only the first ``short_scales`` scales (cheap, and those scales decide
layout, colour and count). An EMA of the transformer is kept and exported. With ``eval_minutes``
> 0, the EMA weights are judged every that many minutes of transformer training on
``eval_prompts`` calibration prompts (seed 0), and each result is a ``"phase": "eval"`` row of
``log.jsonl`` (its time is not counted against the budget); ``eval_steps`` > 0 does the same every
that many transformer steps.

Budgets are wall-clock minutes by default; ``vae_steps`` / ``max_steps`` > 0 bound the phases by
step counts instead (``--max-steps``), so that a run does the same work on any machine.

Outputs in ``--out``: ``ckpt.pt`` (atomic, every ``ckpt_minutes``; resumed automatically),
``log.jsonl`` (metrics), ``final/`` (``config.json`` + ``*.safetensors``, the EMA transformer) and
``final_raw/`` (the same with the raw transformer weights).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stagevar.guidance import GUIDANCE_HELP, guidance_argument, guidance_ramp
from stagevar.io import atomic_write
from stagevar.policy import atomic_write_text
from stagevar.models.bsq_vae import accumulate_step, bits_to_codes
from stagevar.toy.model import MiniTextEncoder, build_parts, init_transformer_


# ------------------------------------------------------------------------------------------ data
class SceneStream:
    """Endless deterministic stream of (prompt, image) pairs from the ``train`` split grammar."""

    CHUNK = 4096

    def __init__(self, seed: int, image_size: int, workers: int = 0, category_weights: dict[str, float] | None = None):
        from stagevar.toy.prompts import CATEGORIES
        self.seed, self.size = int(seed), int(image_size)
        self.chunk, self.pos, self.items = 0, 0, None
        self.last_items: list[dict[str, Any]] = []
        self.workers = int(workers)
        self._pool = None
        self.weights = {str(k): float(v) for k, v in (category_weights or {}).items()}
        bad = sorted(k for k, v in self.weights.items() if k not in CATEGORIES or not v > 0)
        if bad:
            raise SystemExit(f"error: train.category_weights: {', '.join(bad)}: each key must be one of "
                             f"{', '.join(CATEGORIES)} with a positive weight (categories not named weigh 1)")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def state(self) -> dict[str, int]:
        return {"chunk": self.chunk, "pos": self.pos}

    def load_state(self, st: dict[str, int]) -> None:
        self.chunk, self.pos, self.items = int(st["chunk"]), int(st["pos"]), None

    def _chunk_items(self) -> list[dict[str, Any]]:
        """One chunk of the stream. With ``category_weights`` the chunk is drawn from a split
        ``max(weight)`` times larger, keeping each item with probability ``weight / max(weight)``
        of its category (distinct items, not repeats); without, the split itself."""
        from stagevar.toy.prompts import make_split
        top = max([1.0, *self.weights.values()])
        items = make_split("train", math.ceil(self.CHUNK * top), self.seed * 100_003 + self.chunk)
        if not self.weights:
            return items
        rng = np.random.default_rng([self.seed, self.chunk, 1])
        keep = rng.random(len(items))
        return [it for it, u in zip(items, keep) if u < self.weights.get(it["spec"]["category"], 1.0) / top]

    def _next_item(self) -> dict[str, Any]:
        if self.items is None:
            self.items = self._chunk_items()
        it = self.items[self.pos]
        self.pos += 1
        if self.pos == len(self.items):
            self.chunk, self.pos, self.items = self.chunk + 1, 0, None
        return it

    def batch(self, n: int) -> tuple[list[str], torch.Tensor]:
        """The next ``n`` pairs; with ``workers`` > 0 a process pool renders them (the same images)."""
        items = [self._next_item() for _ in range(n)]
        self.last_items = items
        jobs = [(it, self.size) for it in items]
        if self.workers > 0:
            if self._pool is None:
                import multiprocessing
                self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
            imgs = self._pool.map(_render_item, jobs, chunksize=max(1, n // (4 * self.workers)))
        else:
            imgs = [_render_item(j) for j in jobs]
        return [it["prompt"] for it in items], _image_batch(imgs)


def alternative_scenes(items: list[dict[str, Any]], k: int, size: int) -> torch.Tensor:
    """``k`` more ground-truth scenes of each item's prompt (other layouts, sizes, backgrounds and
    unnamed colours; deterministic in the item's seed): (len(items) * k, 3, size, size) in [-1, 1],
    item-major."""
    from stagevar.toy.prompts import scene_for_spec
    from stagevar.toy.scenes import render
    imgs = [render(scene_for_spec(it["spec"], np.random.default_rng([int(it["seed"]), 7919, j])), size)
            for it in items for j in range(k)]
    return _image_batch(imgs)


def _image_batch(imgs: list[np.ndarray]) -> torch.Tensor:
    """Rendered uint8 HWC images -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _render_item(job: tuple[dict[str, Any], int]) -> np.ndarray:
    from stagevar.toy.prompts import scene_for_item
    from stagevar.toy.scenes import render
    item, size = job
    return render(scene_for_item(item), size)


# ------------------------------------------------------------------------------------------ teacher forcing
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
            m = _to_device(torch.rand(bits.shape, generator=gen, device="cpu"), bits.device) < flip_p
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
    """``InfinityTransformer.forward`` restricted to the first ``n_scales`` scales (same maths)."""
    cfg = tr.cfg
    sched = list(cfg.scale_schedule)[:n_scales]
    B = x_BLC_wo_prefix.shape[0]
    cond_BD, gss, text = tr.encode_text(kv_compact, lens)
    text_kv = [blk.ca.text_kv(text) for blk in tr.layers]
    sos = cond_BD.unsqueeze(1) + tr.pos_start.expand(B, 1, -1)
    x = torch.cat((sos, tr.word_embed(x_BLC_wo_prefix.float())), dim=1)
    sizes = [t * h * w for (t, h, w) in sched]
    level = torch.cat([torch.full((n,), i, dtype=torch.long, device=x.device) for i, n in enumerate(sizes)])
    x = x + tr.lvl_embed(level).unsqueeze(0)
    mask = torch.where(level[:, None] >= level[None, :], 0.0, float("-inf")).to(x.dtype)
    rope = torch.cat(tr.rope_tables(x.device)[:n_scales], dim=1)[:, None, None]
    for blk, kv in zip(tr.layers, text_kv):
        x = blk(x, gss, text, kv, rope, None, mask)
    return tr.logits(x, cond_BD), level


def own_bit_sampler(tr, kv_compact, lens, gen: torch.Generator | None, amp: dict):
    """``own_bits`` for :func:`teacher_forcing_targets`: bits of scale ``si`` sampled (tau 1, no
    guidance) from ``tr``'s teacher-forced prediction given the input so far."""
    def sample(si: int, prefix: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), torch.autocast(**amp):
            logits, level = teacher_forced_logits(tr, kv_compact, lens, prefix, si + 1)
        pairs = logits[:, level == si].float().reshape(logits.shape[0], -1, 2)
        p1 = torch.softmax(pairs, -1)[..., 1]
        u = _to_device(torch.rand(p1.shape, generator=gen, device="cpu"), p1.device)
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


# ------------------------------------------------------------------------------------------ helpers
def _to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Host tensor -> ``dev``; to a GPU through pinned memory without waiting for the queued work."""
    if dev.type != "cuda":
        return t.to(dev)
    return t.pin_memory().to(dev, non_blocking=True)


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


#: ``config.json`` sections that fix the architecture: weights can only be continued or averaged
#: between directories that agree on all of them.
ARCH_KEYS = ("image_size", "schedule", "vae", "text", "transformer")


def _save_weights(sd: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file of a weights directory, written atomically."""
    from safetensors.torch import save
    atomic_write(path, save(sd, metadata={"model": "infinity-mini"}))


def export(out_dir: Path, arch: dict[str, Any], adapter, transformer_sd: dict[str, torch.Tensor], meta: dict) -> None:
    """Write ``config.json`` and the three safetensors files (atomic per file)."""
    out_dir.mkdir(parents=True, exist_ok=True)

    def clean(sd):
        # float16 on disk (half the size); loaded back into float32 modules
        return {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().to("cpu")).contiguous().clone()
                for k, v in sd.items() if not k.endswith(".lfq.mask")}

    for fname, sd in (("transformer.safetensors", transformer_sd), ("vae.safetensors", adapter.vae.state_dict()),
                      ("text.safetensors", adapter.text_encoder.state_dict())):
        _save_weights(clean(sd), out_dir / fname)
    cfg = {k: arch[k] for k in (*ARCH_KEYS, "sampling")}
    cfg["training"] = meta
    atomic_write_text(out_dir / "config.json", json.dumps(cfg, indent=2) + "\n")


def _param_groups(model, wd: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in n and "cfg_uncond" not in n and "pos" not in n else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


# ------------------------------------------------------------------------------------------ main
def train(arch: dict[str, Any], out: Path, device: str = "cpu", max_minutes: float | None = None,
          threads: int = 2, quiet: bool = False, init: Path | None = None, workers: int = 0,
          max_steps: int | None = None) -> Path:
    """Train (or resume ``out/ckpt.pt``); ``init``: start from a weights directory instead of from
    scratch (its VAE and text encoder, its transformer as both raw and EMA weights; no VAE phase).
    ``max_steps`` (or ``train.max_steps``) > 0 ends the transformer phase after that many steps and
    ``train.vae_steps`` > 0 the VAE phase, instead of the minutes."""
    from tqdm import tqdm

    tc = dict(arch["train"])
    if max_minutes is not None:
        tc["max_minutes"] = float(max_minutes)
    if max_steps is not None:
        tc["max_steps"] = int(max_steps)
    budget_s = float(tc["max_minutes"]) * 60
    vae_steps, tr_steps, eval_steps = (int(tc.get(k, 0) or 0) for k in ("vae_steps", "max_steps", "eval_steps"))
    if min(vae_steps, tr_steps, eval_steps) < 0:
        raise SystemExit(f"error: train.vae_steps={vae_steps}, train.max_steps={tr_steps} and train.eval_steps="
                         f"{eval_steps} must be >= 0 (0: bounded by minutes / off)")
    own_scales, own_prob = int(tc.get("self_prefix_scales", 0)), float(tc.get("self_prefix_prob", 0.0))
    if own_scales < 0 or not 0.0 <= own_prob <= 1.0:
        raise SystemExit(f"error: train.self_prefix_scales={own_scales} must be >= 0 and train.self_prefix_prob="
                         f"{own_prob} in [0, 1]")
    own_scales = own_scales if own_prob > 0 else 0
    match_k = int(tc.get("self_prefix_match", 0))
    own_cats = list(tc.get("self_prefix_categories") or [])
    from stagevar.toy.prompts import CATEGORIES
    if any(c not in CATEGORIES for c in own_cats):
        raise SystemExit(f"error: train.self_prefix_categories={own_cats}: each must be one of {', '.join(CATEGORIES)}")
    if match_k < 0 or (match_k and not own_scales):
        raise SystemExit(f"error: train.self_prefix_match={match_k} must be >= 0, and > 0 only together with "
                         f"train.self_prefix_scales > 0 and train.self_prefix_prob > 0")
    eval_every_s, eval_n = float(tc.get("eval_minutes", 0) or 0) * 60, int(tc.get("eval_prompts", 48))
    if eval_every_s < 0 or (eval_every_s and eval_n < 1):
        raise SystemExit(f"error: train.eval_minutes={tc.get('eval_minutes')} must be >= 0 (0: off) and "
                         f"train.eval_prompts={eval_n} >= 1")
    vae_budget_s = min(float(tc["vae_minutes"]) * 60, 0.25 * budget_s) if max_minutes is not None and \
        max_minutes < float(arch["train"]["max_minutes"]) else float(tc["vae_minutes"]) * 60
    init_meta = _check_init(arch, init) if init is not None else None
    if init_meta is not None:
        vae_budget_s = 0.0
    if device == "cpu":
        torch.set_num_threads(threads)
    dev = torch.device(device)
    out.mkdir(parents=True, exist_ok=True)
    seed = int(arch.get("seed", 0))
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)

    cfg, adapter = build_parts(arch)
    init_transformer_(adapter.transformer, seed)
    if init_meta is not None:
        from stagevar.toy.model import load_mini
        start = load_mini(init)
        for part in ("vae", "text_encoder", "transformer"):
            getattr(adapter, part).load_state_dict(getattr(start, part).state_dict())
        del start
    adapter.to(dev)
    vae, tr, text = adapter.vae, adapter.transformer, adapter.text_encoder
    vae_sched = [tuple(s) for s in cfg.scale_schedule]
    n_all = len(vae_sched)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=bool(tc.get("bf16", True)))

    vae_opt = torch.optim.AdamW(vae.parameters(), lr=float(tc["vae_lr"]), betas=(0.9, 0.99), weight_decay=0.0)
    tr_params = list(tr.parameters()) + list(text.parameters())
    tr_opt = torch.optim.AdamW(_param_groups(tr, float(tc["weight_decay"])) + _param_groups(text, float(tc["weight_decay"])),
                               lr=float(tc["lr"]), betas=(0.9, 0.97))
    ema_tr = copy.deepcopy(tr).requires_grad_(False)
    stream = SceneStream(seed, int(arch["image_size"]), workers=workers, category_weights=tc.get("category_weights"))
    gen = torch.Generator().manual_seed(seed + 1)
    state = {"phase": "vae" if init_meta is None else "transformer", "vae_step": 0, "tr_step": 0, "elapsed": 0.0,
             "vae_elapsed": 0.0}

    ckpt_path = out / "ckpt.pt"
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        vae.load_state_dict(ck["vae"]); tr.load_state_dict(ck["tr"]); text.load_state_dict(ck["text"])
        ema_tr.load_state_dict(ck["ema_tr"])
        vae_opt.load_state_dict(ck["vae_opt"]); tr_opt.load_state_dict(ck["tr_opt"])
        stream.load_state(ck["stream"]); gen.set_state(ck["gen"]); torch.set_rng_state(ck["torch_rng"])
        random.setstate(ck["py_rng"])
        state = ck["state"]
        print(f"resumed from {ckpt_path}: phase {state['phase']}, vae step {state['vae_step']}, "
              f"transformer step {state['tr_step']}, {state['elapsed'] / 60:.1f} min done", flush=True)
    (out / "config.resolved.json").write_text(json.dumps({**arch, "train": tc}, indent=2))
    log_f = open(out / "log.jsonl", "a")

    def save_ckpt():
        atomic_save({"vae": vae.state_dict(), "tr": tr.state_dict(), "text": text.state_dict(),
                     "ema_tr": ema_tr.state_dict(), "vae_opt": vae_opt.state_dict(), "tr_opt": tr_opt.state_dict(),
                     "stream": stream.state(), "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
                     "py_rng": random.getstate(), "state": state, "arch": arch}, ckpt_path)

    def log(rec):
        rec = {"time_min": round(state["elapsed"] / 60, 3), **rec}
        log_f.write(json.dumps(rec) + "\n")
        log_f.flush()

    bar = tqdm(total=int(budget_s), initial=int(state["elapsed"]), unit="s", desc=state["phase"],
               disable=quiet, mininterval=5, dynamic_ncols=True)
    last_ckpt = time.time()
    t_prev = time.time()

    def tick():
        nonlocal t_prev, last_ckpt
        now = time.time()
        dt = now - t_prev
        t_prev = now
        state["elapsed"] += dt
        if state["phase"] == "vae":
            state["vae_elapsed"] += dt
        bar.update(int(state["elapsed"]) - bar.n)
        if now - last_ckpt > float(tc["ckpt_minutes"]) * 60:
            save_ckpt()
            last_ckpt = time.time()

    def score_ema():
        """Judge the EMA weights on ``eval_n`` prompts of the calibration split (seed 0, the config's
        sampling settings) and log the result; the time it takes is not training time."""
        nonlocal t_prev
        was = ema_tr.training
        adapter.transformer = ema_tr
        ema_tr.eval(); text.eval()
        try:
            res = evaluate_weights(adapter, "calibration", eval_n, (0,), 0)
        finally:
            adapter.transformer = tr
            ema_tr.train(was); text.train()
        state["evals"] = state.get("evals", 0) + 1
        t_prev = time.time()
        log({"phase": "eval", "step": state["tr_step"], "split": "calibration", "images": res["num_images"],
             "overall": res["overall"], **{c: res[c] for c in CATEGORIES if c in res}, "seconds": res["seconds"]})
        if not quiet:
            bar.write(f"eval at step {state['tr_step']}: overall {res['overall']:.3f} on {res['num_images']} "
                      f"calibration images ({res['seconds']:.0f} s)")

    # ---------------- phase 1: VAE
    vae.train()
    ema_loss = None
    while state["phase"] == "vae":
        if (state["vae_step"] >= vae_steps) if vae_steps else (state["vae_elapsed"] >= vae_budget_s):
            state["phase"] = "transformer"
            save_ckpt()
            break
        step = state["vae_step"]
        lr = float(tc["vae_lr"]) * min(1.0, (step + 1) / 50)
        for g in vae_opt.param_groups:
            g["lr"] = lr
        _, img = stream.batch(int(tc["vae_batch"]))
        img = img.to(dev)
        with torch.autocast(**amp):
            feats = vae.encode(img)
        q = vae.quantize_multiscale(feats.float(), vae_sched)
        with torch.autocast(**amp):
            rec = vae.decoder(q.summed_codes_BdHW.contiguous()).float()
        mse = F.mse_loss(rec, img)
        l1 = F.l1_loss(rec, img)
        # object pixels (saturated; backgrounds are near-grey) weigh more: they are what the judge reads
        sat = (img.amax(1, keepdim=True) - img.amin(1, keepdim=True)) > 0.3
        w = 1.0 + float(tc.get("vae_object_weight", 0.0)) * sat.float()
        err = (rec - img).square() + float(tc["vae_l1"]) * (rec - img).abs()
        loss = (err * w).mean() / w.mean()
        vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        vae_opt.step()
        state["vae_step"] += 1
        ema_loss = mse.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * mse.item()
        with torch.no_grad():
            psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
        bar.set_postfix_str(f"vae step {step} mse {ema_loss:.4f} psnr {psnr:.1f}")
        if step % int(tc["log_every"]) == 0:
            log({"phase": "vae", "step": step, "mse": mse.item(), "l1": l1.item(), "psnr": psnr, "lr": lr})
        tick()

    # ---------------- phase 2: transformer
    vae.eval().requires_grad_(False)
    tr.train(); text.train()
    bar.set_description("transformer")
    sizes = [h * w for (_, h, w) in vae_sched]
    tok_w_full = torch.cat([torch.full((n,), float(n) ** -float(tc["scale_weight_power"])) for n in sizes]).to(dev)
    tr_budget = max(budget_s - state["vae_elapsed"], 1.0)
    base_lr, min_frac = float(tc["lr"]), float(tc["min_lr_frac"])
    hist = {"loss": None, "acc": None}
    ema_params, tr_raw_params = list(ema_tr.parameters()), list(tr.parameters())
    while (state["tr_step"] < tr_steps) if tr_steps else (state["elapsed"] < budget_s):
        step = state["tr_step"]
        frac = min(1.0, step / tr_steps if tr_steps else (state["elapsed"] - state["vae_elapsed"]) / tr_budget)
        lr = base_lr * min(1.0, (step + 1) / int(tc["warmup_steps"])) * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in tr_opt.param_groups:
            g["lr"] = lr
        short = random.random() < float(tc["short_prob"])
        n_sc = min(int(tc["short_scales"]), n_all) if short else n_all
        B = int(tc["short_batch"]) if short else int(tc["batch"])
        prompts, img = stream.batch(B)
        img = _to_device(img, dev)
        with torch.no_grad():
            with torch.autocast(**amp):
                feats = vae.encode(img)
            flip_p = float(torch.rand((), generator=gen)) * float(tc["flip_max"])
        ids, nw = MiniTextEncoder.tokenize(prompts)
        cond = text.encode_ids(ids, nw)
        kv, lens = cond.kv_compact, cond.lens
        drop = (torch.rand(B, generator=gen) < float(tc["cond_drop"])).tolist()
        if any(drop):
            parts, start = [], 0
            for r, n in enumerate(lens):
                parts.append(tr.cfg_uncond[:n] if drop[r] else kv[start:start + n])
                start += n
            kv = torch.cat(parts, 0)
        matched = None                                                     # rows of a matched own prefix
        with torch.no_grad():
            own = {}
            own_rows = torch.rand(B, generator=gen) < own_prob if own_scales > 0 else torch.zeros(B, dtype=torch.bool)
            if own_cats:
                own_rows &= torch.tensor([it["spec"]["category"] in own_cats for it in stream.last_items])
            if bool(own_rows.any()):
                own_rows = _to_device(own_rows, dev)
                sampler = own_bit_sampler(ema_tr, kv.detach(), lens, gen, amp)
                if match_k:
                    # the model's own coarse layout first, then the scene of the prompt closest to it
                    mine, summed = sample_own_prefix(sampler, vae_sched, min(own_scales, n_sc), B, feats.shape[1], dev)
                    rows = own_rows.nonzero().flatten()
                    alt = alternative_scenes([stream.last_items[int(r)] for r in rows.tolist()], match_k - 1,
                                             int(arch["image_size"]))
                    with torch.autocast(**amp):
                        alt_f = vae.encode(_to_device(alt, dev)).float()
                    cand = torch.cat((feats[rows].float().unsqueeze(1), alt_f.view(len(rows), match_k - 1, *alt_f.shape[1:])), 1)
                    pick = nearest_scene(summed[rows], cand, tuple(vae_sched[min(own_scales, n_sc - 1)][1:]))
                    feats = feats.float().clone()
                    feats[rows] = cand[torch.arange(len(rows), device=dev), pick]
                    sampler = lambda si, prefix, _m=mine: _m[si]                   # noqa: E731
                    matched = own_rows
                own = dict(own_bits=sampler, own_scales=own_scales, own_rows=own_rows)
            labels, x_in = teacher_forcing_targets(vae, feats.float(), vae_sched, n_sc, flip_p, gen, **own)
        with torch.autocast(**amp):
            logits, level = teacher_forced_logits(tr, kv, lens, x_in, n_sc)
        ce = bit_ce(logits, labels)                                        # (B, L)
        w = tok_w_full[: ce.shape[1]]
        if matched is not None:
            # matched rows learn only the scales after their own prefix (the prefix is not a target)
            w_rows = w.expand(B, -1).clone()
            w_rows[matched] = w_rows[matched] * (level >= own_scales).to(w_rows.dtype)
            loss = ((ce * w_rows).sum(1) / w_rows.sum(1)).mean()
        else:
            loss = (ce * w).sum(1).mean() / w.sum()
        tr_opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(tr_params, float(tc["grad_clip"]))
        tr_opt.step()
        with torch.no_grad():
            d = min(float(tc["ema"]), (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, tr_raw_params, 1 - d)
        state["tr_step"] += 1
        if step % int(tc["log_every"]) == 0 or step < 5:
            # metrics only on logged steps: reading them waits for the device (keeps a GPU busy otherwise)
            with torch.no_grad():
                acc = (logits.detach().float().view(*labels.shape, 2).argmax(-1) == labels).float().mean().item()
                per_scale = [ce[:, level == s].mean().item() for s in range(n_sc)]
            for k, v in (("loss", loss.item()), ("acc", acc)):
                hist[k] = v if hist[k] is None else 0.8 * hist[k] + 0.2 * v
            bar.set_postfix_str(f"step {step} {'S' if short else 'F'} loss {hist['loss']:.4f} acc {hist['acc']:.3f} "
                                f"lr {lr:.2e}")
            log({"phase": "transformer", "step": step, "short": short, "loss": loss.item(), "acc": acc,
                 "ce_per_scale": [round(v, 4) for v in per_scale], "lr": lr, "flip_p": flip_p,
                 "grad_norm": float(gn),
                 **({"own_prefix_rows": int(own_rows.sum())} if own_scales else {}),
                 **({"matched_rows": int(matched.sum())} if matched is not None else {})})
        tick()
        if (eval_steps and state["tr_step"] % eval_steps == 0) or \
                (eval_every_s and state["elapsed"] - state["vae_elapsed"] >= (state.get("evals", 0) + 1) * eval_every_s):
            score_ema()

    bar.close()
    stream.close()
    state["phase"] = "done"
    save_ckpt()
    meta = {"vae_steps": state["vae_step"], "transformer_steps": state["tr_step"],
            "minutes": round(state["elapsed"] / 60, 1), "device": _device_label(dev), "threads": threads,
            "seed": seed, "batch": int(tc["batch"]), "short_batch": int(tc["short_batch"]), "lr": float(tc["lr"])}
    if stream.weights:
        meta["category_weights"] = stream.weights
    if own_scales:
        meta["self_prefix"] = {"scales": own_scales, "prob": own_prob, **({"match": match_k} if match_k else {}),
                              **({"categories": own_cats} if own_cats else {})}
    if tr_steps or vae_steps:
        meta["step_budget"] = {"vae_steps": vae_steps, "max_steps": tr_steps}
    if eval_every_s or eval_steps:
        meta["eval"] = {**({"minutes": eval_every_s / 60} if eval_every_s else {}),
                        **({"steps": eval_steps} if eval_steps else {}),
                        "prompts": eval_n, "split": "calibration", "log": "log.jsonl"}
    if init_meta is not None:
        meta["init"] = init_meta
    export(out / "final", arch, adapter, ema_tr.state_dict(), {**meta, "transformer_weights": "ema"})
    export(out / "final_raw", arch, adapter, tr.state_dict(), {**meta, "transformer_weights": "raw"})
    print(f"done: {meta}; weights in {out / 'final'}", flush=True)
    return out / "final"


def _device_label(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def _check_init(arch: dict[str, Any], init: Path) -> dict[str, Any]:
    """The training record of the weights directory ``init``, after checking that its architecture
    is the config's (a warm start cannot change shapes)."""
    cfg_path = Path(init) / "config.json"
    if not cfg_path.is_file():
        raise SystemExit(f"error: --init {init}: no config.json there (pass a weights directory such as "
                         "stagevar/toy/weights or a run's final/)")
    have = json.loads(cfg_path.read_text())
    for key in ARCH_KEYS:
        if have.get(key) != arch.get(key):
            raise SystemExit(f"error: --init {init}: its {key!r} ({have.get(key)}) differs from the config's "
                             f"({arch.get(key)}); a warm start needs the same architecture")
    return {"from": str(init), "training": have.get("training", {})}


def export_checkpoint(ckpt: Path, out_dir: Path, raw: bool = False) -> dict[str, Any]:
    """Weights directory (as ``final/``) from a training checkpoint, at whatever step it holds."""
    if not Path(ckpt).is_file():
        raise SystemExit(f"error: --export {ckpt}: no such checkpoint (a run writes OUT/ckpt.pt)")
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    arch, st = ck["arch"], ck["state"]
    _, adapter = build_parts(arch)
    adapter.vae.load_state_dict(ck["vae"])
    adapter.text_encoder.load_state_dict(ck["text"])
    meta = {"vae_steps": st["vae_step"], "transformer_steps": st["tr_step"], "minutes": round(st["elapsed"] / 60, 1),
            "seed": int(arch.get("seed", 0)), "transformer_weights": "raw" if raw else "ema", "exported_from": str(ckpt)}
    export(Path(out_dir), arch, adapter, ck["tr" if raw else "ema_tr"], meta)
    return meta


# ------------------------------------------------------------------------------------------ decoder fine-tuning
AVERAGED_FILES = ("transformer.safetensors", "text.safetensors")


def average_weights(first: Path, second: Path, alpha: float, out_dir: Path) -> dict[str, Any]:
    """Write ``(1 - alpha) * first + alpha * second`` (transformer and text encoder) to ``out_dir``.

    Both directories must hold the same architecture and the *same* VAE: the transformer's bit
    labels are the VAE's, so only weights trained on one VAE can be averaged. The VAE, the
    sampling settings and the rest of ``config.json`` come from ``first``; ``training.average``
    records both inputs with their own training summaries."""
    from safetensors.torch import load_file

    first, second, out_dir = Path(first), Path(second), Path(out_dir)
    if not 0.0 <= alpha <= 1.0:
        raise SystemExit(f"error: --average: ALPHA={alpha} must be in [0, 1] (the weight of the second directory)")
    cfgs = []
    for d in (first, second):
        missing = [f for f in ("config.json", "vae.safetensors", *AVERAGED_FILES) if not (d / f).is_file()]
        if missing:
            raise SystemExit(f"error: --average: {d} is not a weights directory (missing {', '.join(missing)})")
        cfgs.append(json.loads((d / "config.json").read_text()))
    diff = [k for k in ARCH_KEYS if cfgs[0].get(k) != cfgs[1].get(k)]
    if diff:
        raise SystemExit(f"error: --average: {first} and {second} differ in config.json {', '.join(diff)}; only one "
                         f"architecture can be averaged")
    vae_bytes = (first / "vae.safetensors").read_bytes()
    if vae_bytes != (second / "vae.safetensors").read_bytes():
        raise SystemExit(f"error: --average: {first}/vae.safetensors and {second}/vae.safetensors differ; the "
                         f"transformers were trained on different bit labels and cannot be averaged")
    out_dir.mkdir(parents=True, exist_ok=True)
    for fname in AVERAGED_FILES:
        a, b = load_file(str(first / fname)), load_file(str(second / fname))
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise SystemExit(f"error: --average: {first}/{fname} and {second}/{fname} hold different tensors")
        mixed = {k: ((1 - alpha) * a[k].float() + alpha * b[k].float()).to(a[k].dtype).contiguous()
                 if a[k].is_floating_point() else a[k] for k in a}
        _save_weights(mixed, out_dir / fname)
    atomic_write(out_dir / "vae.safetensors", vae_bytes)
    cfg = dict(cfgs[0])
    cfg["training"] = {"average": {"alpha": alpha,
                                   "first": {"from": str(first), "training": cfgs[0].get("training")},
                                   "second": {"from": str(second), "training": cfgs[1].get("training")}}}
    atomic_write_text(out_dir / "config.json", json.dumps(cfg, indent=2) + "\n")
    return {"alpha": alpha, "first": str(first), "second": str(second), "out": str(out_dir)}


def finetune_decoder(weights_dir: Path, out_dir: Path, minutes: float, device: str = "cpu", seed: int = 1,
                     batch: int = 16, lr: float = 3e-4, quiet: bool = False) -> dict[str, Any]:
    """Train only the VAE decoder (encoder and quantiser frozen, so the bit labels the transformer
    learned stay exactly the same) for ``minutes``; writes a complete weights directory ``out_dir``."""
    import shutil
    from tqdm import tqdm
    from stagevar.toy.model import load_mini

    adapter = load_mini(weights_dir, device=device)
    arch = json.loads((Path(weights_dir) / "config.json").read_text())
    vae = adapter.vae
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True).train()
    sched = [tuple(s) for s in adapter.cfg.scale_schedule]
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    stream = SceneStream(seed + 7919, int(arch["image_size"]))
    amp = dict(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=True)
    t0, step, hist = time.time(), 0, None
    bar = tqdm(total=int(minutes * 60), unit="s", desc="decoder", disable=quiet, mininterval=5)
    while time.time() - t0 < minutes * 60:
        _, img = stream.batch(batch)
        img = img.to(device)
        with torch.no_grad():
            with torch.autocast(**amp):
                feats = vae.encode(img)
            z = vae.quantize_multiscale(feats.float(), sched).summed_codes_BdHW.contiguous()
        cur_lr = lr * min(1.0, (step + 1) / 20) * (0.5 * (1 + math.cos(math.pi * min(1.0, (time.time() - t0) / (minutes * 60)))))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        with torch.autocast(**amp):
            rec = vae.decoder(z).float()
        mse = F.mse_loss(rec, img)
        loss = mse + F.l1_loss(rec, img)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.decoder.parameters(), 1.0)
        opt.step()
        step += 1
        hist = mse.item() if hist is None else 0.95 * hist + 0.05 * mse.item()
        bar.update(int(time.time() - t0) - bar.n)
        bar.set_postfix_str(f"step {step} mse {hist:.4f} psnr {10 * math.log10(4 / hist):.1f}")
    bar.close()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in ("transformer.safetensors", "text.safetensors"):
        if Path(weights_dir).resolve() != out_dir.resolve():
            shutil.copyfile(Path(weights_dir) / f, out_dir / f)
    sd = {k: v.detach().cpu().to(torch.float16).contiguous() if v.is_floating_point() else v.detach().cpu()
          for k, v in vae.state_dict().items() if not k.endswith(".lfq.mask")}
    _save_weights(sd, out_dir / "vae.safetensors")
    arch.setdefault("training", {})["decoder_finetune"] = {"steps": step, "minutes": round(minutes, 1), "batch": batch,
                                                           "lr": lr, "final_mse_ema": hist}
    (out_dir / "config.json").write_text(json.dumps(arch, indent=2) + "\n")
    return arch["training"]["decoder_finetune"]


# ------------------------------------------------------------------------------------------ evaluation
def generate_images(adapter, prompts: list[str], seed: int, batch: int = 32, **sampling) -> list[np.ndarray]:
    """Generate one image per prompt (float HWC in [0, 1]); rows of a batch share one seeded generator."""
    out: list[np.ndarray] = []
    guidance = sampling.pop("cfg", adapter.cfg.cfg)
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        with torch.no_grad():
            cond = adapter.encode_prompts(chunk)
            img = adapter.reference_generate(cond, guidance=guidance, seed=seed * 1000 + i, **sampling)
        out += list(img.permute(0, 2, 3, 1).float().cpu().numpy())
    return out


def evaluate_weights(adapter, split: str = "heldout", n: int = 60, seeds=(0, 1, 2, 3), split_seed: int = 0,
                     **sampling) -> dict[str, Any]:
    """Judge scores (:func:`stagevar.toy.evaluate.evaluate`) on ``n`` prompts of ``split`` x ``seeds``."""
    from stagevar.toy.evaluate import score, tabulate
    from stagevar.toy.prompts import make_split

    items = make_split(split, n, split_seed)
    prompts = [it["prompt"] for it in items]
    images, specs = [], []
    t0 = time.time()
    for s in seeds:
        images += generate_images(adapter, prompts, int(s), **dict(sampling))
        specs += [it["spec"] for it in items]
    passed = [score(im, sp) for im, sp in zip(images, specs)]
    res = tabulate(passed, specs)
    # per-image outcomes (seed-major, prompts in split order): settings scored on the same
    # split, n and seeds can be compared image by image (paired differences)
    res["passed"] = "".join("1" if ok else "0" for ok in passed)
    res["seconds"] = round(time.time() - t0, 1)
    res["sampling"] = {"cfg": sampling.get("cfg", adapter.cfg.cfg), "tau": sampling.get("tau", adapter.cfg.tau),
                       "top_k": sampling.get("top_k", adapter.cfg.top_k), "top_p": sampling.get("top_p", adapter.cfg.top_p)}
    res["split"], res["split_seed"], res["n_prompts"], res["seeds"] = split, split_seed, n, list(seeds)
    return res


def default_grid(n_scales: int) -> list[dict[str, Any]]:
    """The ``--sweep`` settings: constant guidance x tau, greedy bits, top-p; per-scale guidance
    that leaves the first 2 or 3 scales unguided (1) and guides the rest with 3 or 5; and
    upstream VAR's linear ramp from 1 on the first scale to 3 or 5 on the last."""
    grid = [{"cfg": c, "tau": t, "top_k": 0, "top_p": 0.0} for c in (1.5, 3.0, 5.0) for t in (0.5, 1.0)]
    grid += [{"cfg": 3.0, "tau": 1.0, "top_k": 1, "top_p": 0.0}, {"cfg": 3.0, "tau": 1.0, "top_k": 0, "top_p": 0.9}]
    grid += [{"cfg": (1.0,) * k + (c,) * (n_scales - k), "tau": 1.0, "top_k": 0, "top_p": 0.0}
             for k in (2, 3) for c in (3.0, 5.0)]
    grid += [{"cfg": guidance_ramp(c, n_scales), "tau": 1.0, "top_k": 0, "top_p": 0.0} for c in (3.0, 5.0)]
    return grid


def apply_override(arch: dict[str, Any], item: str) -> None:
    """``--set train.batch=64``: replace one existing value of the config (VALUE parsed as YAML)."""
    import yaml
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise SystemExit(f"error: --set {item!r}: expected KEY=VALUE, e.g. --set train.batch=64")
    node, parts = arch, key.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            raise SystemExit(f"error: --set {item!r}: the config has no section {part!r}")
        node = node[part]
    if parts[-1] not in node:
        raise SystemExit(f"error: --set {item!r}: the config has no key {key!r} (known in that section: "
                         f"{', '.join(sorted(node))})")
    node[parts[-1]] = yaml.safe_load(raw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m stagevar.toy.train",
        description="Train infinity-mini (BSQ VAE, then the Infinity transformer) on the toy scenes; "
                    "or evaluate / sweep the sampling settings of trained weights.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python -m stagevar.toy.train --config stagevar/toy/configs/mini.yaml --out runs/mini\n"
               "  nohup python -m stagevar.toy.train --config stagevar/toy/configs/mini.yaml --out runs/mini "
               "> runs/mini.log 2>&1 &\n"
               "  python -m stagevar.toy.train --config stagevar/toy/configs/mini.yaml --out runs/smoke --max-minutes 2\n"
               "  python -m stagevar.toy.train --config stagevar/toy/configs/mini.yaml --init stagevar/toy/weights "
               "--out runs/gpu --device cuda --max-minutes 5 --workers 12 --set train.batch=64\n"
               "  python -m stagevar.toy.train --sweep runs/mini/final --split calibration --n 48 --seeds 0\n"
               "  python -m stagevar.toy.train --export runs/mini/ckpt.pt --out runs/mini/interim\n"
               "  python -m stagevar.toy.train --finetune-decoder runs/mini/final 10 --out runs/mini/final_dec\n"
               "  python -m stagevar.toy.train --average stagevar/toy/weights runs/ft/final 0.5 --out runs/avg\n"
               "  python -m stagevar.toy.train --evaluate stagevar/toy/weights --split heldout --n 60 --seeds 0 1 2 3\n"
               "Re-running with the same --out resumes from OUT/ckpt.pt; the final weights are in OUT/final/.")
    p.add_argument("--config", help="YAML config (e.g. stagevar/toy/configs/mini.yaml)")
    p.add_argument("--out", help="run directory (checkpoint, log.jsonl, final/)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-clock budget of the whole run (overrides the YAML)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="end the transformer phase after this many steps instead of the minutes (train.max_steps; "
                        "train.vae_steps does the same for the VAE phase)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--init", type=Path, metavar="WEIGHTS_DIR",
                   help="start from trained weights (same architecture) instead of from scratch; skips the VAE phase")
    p.add_argument("--workers", type=int, default=0,
                   help="processes rendering the training scenes (default 0: in the training process)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.batch=64 (repeatable; VALUE is YAML)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--export", metavar="CKPT",
                   help="write the weights of a run's checkpoint (e.g. one still training) to --out and exit")
    p.add_argument("--raw", action="store_true", help="with --export: the raw transformer weights instead of the EMA")
    p.add_argument("--finetune-decoder", nargs=2, metavar=("WEIGHTS_DIR", "MINUTES"),
                   help="train only the VAE decoder of trained weights (labels unchanged); writes --out")
    p.add_argument("--average", nargs=3, metavar=("FIRST", "SECOND", "ALPHA"),
                   help="average two weights directories of one architecture and VAE, (1 - ALPHA) * FIRST + "
                        "ALPHA * SECOND (transformer and text encoder); writes --out")
    g = p.add_argument_group("evaluation (instead of training)")
    g.add_argument("--evaluate", metavar="WEIGHTS_DIR", help="score weights with their default sampling settings")
    g.add_argument("--sweep", metavar="WEIGHTS_DIR", help="score weights over a grid of cfg / tau / top_k / top_p")
    g.add_argument("--split", default="heldout", help="prompt split (train, calibration, heldout)")
    g.add_argument("--n", type=int, default=60, help="prompts (categories round-robin)")
    g.add_argument("--split-seed", type=int, default=0,
                   help="which draw of the split (default 0; another seed gives other prompts of the same split)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="sampling seeds per prompt")
    g.add_argument("--cfg", type=guidance_argument, default=None, help=GUIDANCE_HELP)
    g.add_argument("--tau", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--json", help="append results (one JSON line each, with per-image outcomes in 'passed') to this file")
    a = p.parse_args(argv)
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    if a.export:
        if not a.out:
            p.error("--export needs --out (a new weights directory)")
        print(json.dumps(export_checkpoint(Path(a.export), Path(a.out), raw=a.raw)), flush=True)
        return 0
    if a.average:
        if not a.out:
            p.error("--average needs --out (a new weights directory)")
        try:
            alpha = float(a.average[2])
        except ValueError:
            p.error(f"--average: ALPHA={a.average[2]!r} is not a number")
        print(json.dumps(average_weights(Path(a.average[0]), Path(a.average[1]), alpha, Path(a.out))), flush=True)
        return 0
    if a.finetune_decoder:
        if not a.out:
            p.error("--finetune-decoder needs --out (a new weights directory)")
        res = finetune_decoder(Path(a.finetune_decoder[0]), Path(a.out), float(a.finetune_decoder[1]), device=a.device,
                               quiet=a.quiet)
        print(json.dumps(res), flush=True)
        return 0
    if a.evaluate or a.sweep:
        from stagevar.toy.model import load_mini
        adapter = load_mini(a.evaluate or a.sweep, device=a.device)
        if a.evaluate:
            over = {k: v for k, v in (("cfg", a.cfg), ("tau", a.tau), ("top_k", a.top_k), ("top_p", a.top_p)) if v is not None}
            grid = [over]
        else:
            grid = default_grid(len(adapter.scale_schedule))
        for sampling in grid:
            res = evaluate_weights(adapter, a.split, a.n, tuple(a.seeds), a.split_seed, **sampling)
            res["weights"] = str(a.evaluate or a.sweep)
            print(json.dumps({k: v for k, v in res.items() if k != "passed"}), flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(res) + "\n")
        return 0
    if not a.config or not a.out:
        p.error("--config and --out are required for training (or use --evaluate / --sweep)")
    import yaml
    arch = yaml.safe_load(Path(a.config).read_text())
    for item in a.set:
        apply_override(arch, item)
    train(arch, Path(a.out), device=a.device, max_minutes=a.max_minutes, threads=a.threads, quiet=a.quiet,
          init=a.init, workers=a.workers, max_steps=a.max_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
