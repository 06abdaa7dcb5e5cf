"""The training run: settings checked up front, phase 1 (the BSQ VAE), phase 2 (the transformer by
teacher forcing), checkpoints every ``ckpt_minutes`` (a re-run resumes), the EMA weights judged on
calibration prompts when asked, and the export of ``final/`` and ``final_raw/``."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from stagevar.errors import StageVarError
from stagevar.toy.model import MiniTextEncoder, build_parts, init_transformer_
from stagevar.toy.prompts import CATEGORIES
from training.data import SceneStream, alternative_scenes
from training.evaluation import evaluate_weights
from training.targets import (bit_ce, nearest_scene, own_bit_sampler, sample_own_prefix, teacher_forced_logits,
                              teacher_forcing_targets, to_device)
from training.weights import atomic_save, check_init, device_label, export


@dataclasses.dataclass
class Budget:
    """What bounds each phase, and the optional parts of a run, from the config's ``train`` section
    (checked before any work)."""

    budget_s: float                 # the whole run, seconds
    vae_budget_s: float             # phase 1, seconds (0 after --init)
    vae_steps: int                  # > 0: phase 1 ends after these steps instead
    tr_steps: int                   # > 0: phase 2 ends after these steps instead
    eval_steps: int                 # > 0: judge the EMA weights every that many steps
    eval_every_s: float             # > 0: ... every that many seconds of phase 2
    eval_n: int                     # calibration prompts per judgement
    own_scales: int                 # self-sampled prefix: scales (0: off)
    own_prob: float                 # ... fraction of the rows
    match_k: int                    # ... matched to the nearest of K scenes of the prompt (0: off)
    own_cats: list[str]             # ... only rows of these prompt categories (empty: all)

    @classmethod
    def from_config(cls, arch: dict[str, Any], tc: dict[str, Any], max_minutes: float | None,
                    warm_start: bool) -> "Budget":
        budget_s = float(tc["max_minutes"]) * 60
        vae_steps, tr_steps, eval_steps = (int(tc.get(k, 0) or 0) for k in ("vae_steps", "max_steps", "eval_steps"))
        if min(vae_steps, tr_steps, eval_steps) < 0:
            raise StageVarError(f"train.vae_steps={vae_steps}, train.max_steps={tr_steps} and train.eval_steps="
                                f"{eval_steps} must be >= 0 (0: bounded by minutes / off)")
        own_scales, own_prob = int(tc.get("self_prefix_scales", 0)), float(tc.get("self_prefix_prob", 0.0))
        if own_scales < 0 or not 0.0 <= own_prob <= 1.0:
            raise StageVarError(f"train.self_prefix_scales={own_scales} must be >= 0 and train.self_prefix_prob="
                                f"{own_prob} in [0, 1]")
        own_scales = own_scales if own_prob > 0 else 0
        match_k = int(tc.get("self_prefix_match", 0))
        own_cats = list(tc.get("self_prefix_categories") or [])
        if any(c not in CATEGORIES for c in own_cats):
            raise StageVarError(f"train.self_prefix_categories={own_cats}: each must be one of {', '.join(CATEGORIES)}")
        if match_k < 0 or (match_k and not own_scales):
            raise StageVarError(f"train.self_prefix_match={match_k} must be >= 0, and > 0 only together with "
                                f"train.self_prefix_scales > 0 and train.self_prefix_prob > 0")
        eval_every_s, eval_n = float(tc.get("eval_minutes", 0) or 0) * 60, int(tc.get("eval_prompts", 48))
        if eval_every_s < 0 or (eval_every_s and eval_n < 1):
            raise StageVarError(f"train.eval_minutes={tc.get('eval_minutes')} must be >= 0 (0: off) and "
                                f"train.eval_prompts={eval_n} >= 1")
        # a run shortened by --max-minutes gives the VAE at most a quarter of it
        shortened = max_minutes is not None and max_minutes < float(arch["train"]["max_minutes"])
        vae_budget_s = min(float(tc["vae_minutes"]) * 60, 0.25 * budget_s) if shortened else float(tc["vae_minutes"]) * 60
        return cls(budget_s, 0.0 if warm_start else vae_budget_s, vae_steps, tr_steps, eval_steps, eval_every_s, eval_n,
                   own_scales, own_prob, match_k, own_cats)

    def summary(self) -> dict[str, Any]:
        """The optional parts, as recorded in the weights' ``config.json``."""
        meta: dict[str, Any] = {}
        if self.own_scales:
            meta["self_prefix"] = {"scales": self.own_scales, "prob": self.own_prob,
                                   **({"match": self.match_k} if self.match_k else {}),
                                   **({"categories": self.own_cats} if self.own_cats else {})}
        if self.tr_steps or self.vae_steps:
            meta["step_budget"] = {"vae_steps": self.vae_steps, "max_steps": self.tr_steps}
        if self.eval_every_s or self.eval_steps:
            meta["eval"] = {**({"minutes": self.eval_every_s / 60} if self.eval_every_s else {}),
                            **({"steps": self.eval_steps} if self.eval_steps else {}),
                            "prompts": self.eval_n, "split": "calibration", "log": "log.jsonl"}
        return meta


def train(arch: dict[str, Any], out: Path, device: str = "cpu", max_minutes: float | None = None,
          threads: int = 2, quiet: bool = False, init: Path | None = None, workers: int = 0,
          max_steps: int | None = None) -> Path:
    """Train (or resume ``out/ckpt.pt``); ``init``: start from a weights directory instead of from
    scratch (its VAE and text encoder, its transformer as both raw and EMA weights; no VAE phase).
    ``max_steps`` (or ``train.max_steps``) > 0 ends the transformer phase after that many steps and
    ``train.vae_steps`` > 0 the VAE phase, instead of the minutes. Returns ``out/final``."""
    return Trainer(arch, Path(out), device, max_minutes, threads, quiet, init, workers, max_steps).run()


class Trainer:
    """One run in ``out``: the models, optimisers, data stream and random generators, resumed from
    ``out/ckpt.pt`` when it exists; :meth:`run` trains what is left and exports."""

    def __init__(self, arch, out: Path, device: str, max_minutes, threads: int, quiet: bool, init, workers: int,
                 max_steps):
        self.arch, self.out, self.threads, self.quiet = arch, out, threads, quiet
        tc = dict(arch["train"])
        if max_minutes is not None:
            tc["max_minutes"] = float(max_minutes)
        if max_steps is not None:
            tc["max_steps"] = int(max_steps)
        self.tc = tc
        self.budget = Budget.from_config(arch, tc, max_minutes, warm_start=init is not None)
        self.init_meta = check_init(arch, init) if init is not None else None
        if device == "cpu":
            torch.set_num_threads(threads)
        self.dev = dev = torch.device(device)
        out.mkdir(parents=True, exist_ok=True)
        self.seed = seed = int(arch.get("seed", 0))
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)

        cfg, self.adapter = build_parts(arch)
        init_transformer_(self.adapter.transformer, seed)
        if init is not None:
            from stagevar.toy.model import load_mini
            start = load_mini(init)
            for part in ("vae", "text_encoder", "transformer"):
                getattr(self.adapter, part).load_state_dict(getattr(start, part).state_dict())
            del start
        self.adapter.to(dev)
        self.vae, self.tr, self.text = self.adapter.vae, self.adapter.transformer, self.adapter.text_encoder
        self.vae_sched = [tuple(s) for s in cfg.scale_schedule]
        self.amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=bool(tc.get("bf16", True)))

        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=float(tc["vae_lr"]), betas=(0.9, 0.99),
                                         weight_decay=0.0)
        wd = float(tc["weight_decay"])
        self.tr_opt = torch.optim.AdamW(_param_groups(self.tr, wd) + _param_groups(self.text, wd), lr=float(tc["lr"]),
                                        betas=(0.9, 0.97))
        self.ema_tr = copy.deepcopy(self.tr).requires_grad_(False)
        self.stream = SceneStream(seed, int(arch["image_size"]), workers=workers,
                                  category_weights=tc.get("category_weights"))
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.state = {"phase": "vae" if init is None else "transformer", "vae_step": 0, "tr_step": 0, "elapsed": 0.0,
                      "vae_elapsed": 0.0}
        self.ckpt_path = out / "ckpt.pt"
        if self.ckpt_path.exists():
            self._resume()
        (out / "config.resolved.json").write_text(json.dumps({**arch, "train": tc}, indent=2))

    # ------------------------------------------------------------------ checkpoint, log, clock
    def _resume(self) -> None:
        ck = torch.load(self.ckpt_path, map_location=self.dev, weights_only=False)
        self.vae.load_state_dict(ck["vae"]); self.tr.load_state_dict(ck["tr"]); self.text.load_state_dict(ck["text"])
        self.ema_tr.load_state_dict(ck["ema_tr"])
        self.vae_opt.load_state_dict(ck["vae_opt"]); self.tr_opt.load_state_dict(ck["tr_opt"])
        self.stream.load_state(ck["stream"]); self.gen.set_state(ck["gen"]); torch.set_rng_state(ck["torch_rng"])
        random.setstate(ck["py_rng"])
        self.state = st = ck["state"]
        print(f"resumed from {self.ckpt_path}: phase {st['phase']}, vae step {st['vae_step']}, "
              f"transformer step {st['tr_step']}, {st['elapsed'] / 60:.1f} min done", flush=True)

    def _save_ckpt(self) -> None:
        atomic_save({"vae": self.vae.state_dict(), "tr": self.tr.state_dict(), "text": self.text.state_dict(),
                     "ema_tr": self.ema_tr.state_dict(), "vae_opt": self.vae_opt.state_dict(),
                     "tr_opt": self.tr_opt.state_dict(), "stream": self.stream.state(), "gen": self.gen.get_state(),
                     "torch_rng": torch.get_rng_state(), "py_rng": random.getstate(), "state": self.state,
                     "arch": self.arch}, self.ckpt_path)

    def _log(self, rec: dict[str, Any]) -> None:
        rec = {"time_min": round(self.state["elapsed"] / 60, 3), **rec}
        self.log_f.write(json.dumps(rec) + "\n")
        self.log_f.flush()

    def _tick(self) -> None:
        """Count the time since the last tick as training time; checkpoint every ``ckpt_minutes``."""
        now = time.time()
        dt, self.t_prev = now - self.t_prev, now
        self.state["elapsed"] += dt
        if self.state["phase"] == "vae":
            self.state["vae_elapsed"] += dt
        self.bar.update(int(self.state["elapsed"]) - self.bar.n)
        if now - self.last_ckpt > float(self.tc["ckpt_minutes"]) * 60:
            self._save_ckpt()
            self.last_ckpt = time.time()

    # ------------------------------------------------------------------ the run
    def run(self) -> Path:
        try:
            from tqdm import tqdm
        except ImportError:                      # a bare machine (a lent GPU): no bar, the log still written
            tqdm = _NoBar
        self.log_f = open(self.out / "log.jsonl", "a")
        self.bar = tqdm(total=int(self.budget.budget_s), initial=int(self.state["elapsed"]), unit="s",
                        desc=self.state["phase"], disable=self.quiet, mininterval=5, dynamic_ncols=True)
        self.last_ckpt = self.t_prev = time.time()
        try:
            self._vae_phase()
            self._transformer_phase()
        finally:
            self.bar.close()
            self.stream.close()
            self.log_f.close()
        self.state["phase"] = "done"
        self._save_ckpt()
        return self._export()

    def _vae_phase(self) -> None:
        """Phase 1: encoder -> multi-scale residual BSQ (straight-through) -> decoder; MSE + L1,
        object pixels weighted up."""
        b, st, tc = self.budget, self.state, self.tc
        self.vae.train()
        ema_loss = None
        while st["phase"] == "vae":
            if (st["vae_step"] >= b.vae_steps) if b.vae_steps else (st["vae_elapsed"] >= b.vae_budget_s):
                st["phase"] = "transformer"
                self._save_ckpt()
                break
            step = st["vae_step"]
            lr = float(tc["vae_lr"]) * min(1.0, (step + 1) / 50)
            for g in self.vae_opt.param_groups:
                g["lr"] = lr
            _, img = self.stream.batch(int(tc["vae_batch"]))
            mse, l1 = self._vae_step(img.to(self.dev))
            st["vae_step"] += 1
            ema_loss = mse if ema_loss is None else 0.95 * ema_loss + 0.05 * mse
            psnr = 10 * math.log10(4.0 / max(mse, 1e-10))
            self.bar.set_postfix_str(f"vae step {step} mse {ema_loss:.4f} psnr {psnr:.1f}")
            if step % int(tc["log_every"]) == 0:
                self._log({"phase": "vae", "step": step, "mse": mse, "l1": l1, "psnr": psnr, "lr": lr})
            self._tick()

    def _vae_step(self, img: torch.Tensor) -> tuple[float, float]:
        vae, tc = self.vae, self.tc
        with torch.autocast(**self.amp):
            feats = vae.encode(img)
        q = vae.quantize_multiscale(feats.float(), self.vae_sched)
        with torch.autocast(**self.amp):
            rec = vae.decoder(q.summed_codes_BdHW.contiguous()).float()
        mse = F.mse_loss(rec, img)
        l1 = F.l1_loss(rec, img)
        # object pixels (saturated; backgrounds are near-grey) weigh more: they are what the judge reads
        sat = (img.amax(1, keepdim=True) - img.amin(1, keepdim=True)) > 0.3
        w = 1.0 + float(tc.get("vae_object_weight", 0.0)) * sat.float()
        err = (rec - img).square() + float(tc["vae_l1"]) * (rec - img).abs()
        loss = (err * w).mean() / w.mean()
        self.vae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
        self.vae_opt.step()
        return mse.item(), l1.item()

    def _transformer_phase(self) -> None:
        """Phase 2: the transformer (and text encoder) by teacher forcing, an EMA kept, a cosine
        learning rate over the steps or the minutes left after the VAE."""
        b, st, tc = self.budget, self.state, self.tc
        self.vae.eval().requires_grad_(False)
        self.tr.train(); self.text.train()
        self.bar.set_description("transformer")
        sizes = [h * w for (_, h, w) in self.vae_sched]
        self.tok_w = torch.cat([torch.full((n,), float(n) ** -float(tc["scale_weight_power"])) for n in sizes]).to(self.dev)
        self.tr_params = list(self.tr.parameters()) + list(self.text.parameters())
        self.ema_params, self.raw_params = list(self.ema_tr.parameters()), list(self.tr.parameters())
        tr_budget = max(b.budget_s - st["vae_elapsed"], 1.0)
        base_lr, min_frac = float(tc["lr"]), float(tc["min_lr_frac"])
        self.hist = {"loss": None, "acc": None}
        while (st["tr_step"] < b.tr_steps) if b.tr_steps else (st["elapsed"] < b.budget_s):
            step = st["tr_step"]
            frac = min(1.0, step / b.tr_steps if b.tr_steps else (st["elapsed"] - st["vae_elapsed"]) / tr_budget)
            lr = base_lr * min(1.0, (step + 1) / int(tc["warmup_steps"])) * \
                (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in self.tr_opt.param_groups:
                g["lr"] = lr
            self._transformer_step(step, lr)
            self._tick()
            if (b.eval_steps and st["tr_step"] % b.eval_steps == 0) or \
                    (b.eval_every_s and st["elapsed"] - st["vae_elapsed"] >= (st.get("evals", 0) + 1) * b.eval_every_s):
                self._score_ema()

    def _transformer_step(self, step: int, lr: float) -> None:
        tc, dev, gen = self.tc, self.dev, self.gen
        short = random.random() < float(tc["short_prob"])
        n_sc = min(int(tc["short_scales"]), len(self.vae_sched)) if short else len(self.vae_sched)
        B = int(tc["short_batch"]) if short else int(tc["batch"])
        prompts, img = self.stream.batch(B)
        img = to_device(img, dev)
        with torch.no_grad():
            with torch.autocast(**self.amp):
                feats = self.vae.encode(img)
            flip_p = float(torch.rand((), generator=gen)) * float(tc["flip_max"])
        kv, lens = self._condition(prompts, B)
        with torch.no_grad():
            feats, own, own_rows, matched = self._own_prefix(feats, kv, lens, B, n_sc)
            labels, x_in = teacher_forcing_targets(self.vae, feats.float(), self.vae_sched, n_sc, flip_p, gen, **own)
        with torch.autocast(**self.amp):
            logits, level = teacher_forced_logits(self.tr, kv, lens, x_in, n_sc)
        ce = bit_ce(logits, labels)                                        # (B, L)
        w = self.tok_w[: ce.shape[1]]
        if matched is not None:
            # matched rows learn only the scales after their own prefix (the prefix is not a target)
            w_rows = w.expand(B, -1).clone()
            w_rows[matched] = w_rows[matched] * (level >= self.budget.own_scales).to(w_rows.dtype)
            loss = ((ce * w_rows).sum(1) / w_rows.sum(1)).mean()
        else:
            loss = (ce * w).sum(1).mean() / w.sum()
        self.tr_opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.tr_params, float(tc["grad_clip"]))
        self.tr_opt.step()
        with torch.no_grad():
            d = min(float(tc["ema"]), (1 + step) / (10 + step))
            torch._foreach_lerp_(self.ema_params, self.raw_params, 1 - d)
        self.state["tr_step"] += 1
        if step % int(tc["log_every"]) == 0 or step < 5:
            # metrics only on logged steps: reading them waits for the device (keeps a GPU busy otherwise)
            with torch.no_grad():
                acc = (logits.detach().float().view(*labels.shape, 2).argmax(-1) == labels).float().mean().item()
                per_scale = [ce[:, level == s].mean().item() for s in range(n_sc)]
            for k, v in (("loss", loss.item()), ("acc", acc)):
                self.hist[k] = v if self.hist[k] is None else 0.8 * self.hist[k] + 0.2 * v
            self.bar.set_postfix_str(f"step {step} {'S' if short else 'F'} loss {self.hist['loss']:.4f} "
                                     f"acc {self.hist['acc']:.3f} lr {lr:.2e}")
            self._log({"phase": "transformer", "step": step, "short": short, "loss": loss.item(), "acc": acc,
                       "ce_per_scale": [round(v, 4) for v in per_scale], "lr": lr, "flip_p": flip_p,
                       "grad_norm": float(gn),
                       **({"own_prefix_rows": int(own_rows.sum())} if self.budget.own_scales else {}),
                       **({"matched_rows": int(matched.sum())} if matched is not None else {})})

    def _condition(self, prompts: list[str], B: int):
        """The prompts' text keys/values; rows dropped to the learned null text with probability
        ``cond_drop`` (classifier-free guidance)."""
        ids, nw = MiniTextEncoder.tokenize(prompts)
        cond = self.text.encode_ids(ids, nw)
        kv, lens = cond.kv_compact, cond.lens
        drop = (torch.rand(B, generator=self.gen) < float(self.tc["cond_drop"])).tolist()
        if any(drop):
            parts, start = [], 0
            for r, n in enumerate(lens):
                parts.append(self.tr.cfg_uncond[:n] if drop[r] else kv[start:start + n])
                start += n
            kv = torch.cat(parts, 0)
        return kv, lens

    def _own_prefix(self, feats, kv, lens, B: int, n_sc: int):
        """The rows that take the EMA model's own sampled prefix (and, with ``self_prefix_match``,
        the scene of their prompt nearest to it). Returns (features, keyword arguments of
        :func:`teacher_forcing_targets`, own rows, matched rows or None)."""
        b, dev = self.budget, self.dev
        own: dict[str, Any] = {}
        matched = None
        own_rows = torch.rand(B, generator=self.gen) < b.own_prob if b.own_scales > 0 else torch.zeros(B, dtype=torch.bool)
        if b.own_cats:
            own_rows &= torch.tensor([it["spec"]["category"] in b.own_cats for it in self.stream.last_items])
        if not bool(own_rows.any()):
            return feats, own, own_rows, matched
        own_rows = to_device(own_rows, dev)
        sampler = own_bit_sampler(self.ema_tr, kv.detach(), lens, self.gen, self.amp)
        if b.match_k:
            # the model's own coarse layout first, then the scene of the prompt closest to it
            n_own = min(b.own_scales, n_sc)
            mine, summed = sample_own_prefix(sampler, self.vae_sched, n_own, B, feats.shape[1], dev)
            rows = own_rows.nonzero().flatten()
            alt = alternative_scenes([self.stream.last_items[int(r)] for r in rows.tolist()], b.match_k - 1,
                                     int(self.arch["image_size"]))
            with torch.autocast(**self.amp):
                alt_f = self.vae.encode(to_device(alt, dev)).float()
            cand = torch.cat((feats[rows].float().unsqueeze(1),
                              alt_f.view(len(rows), b.match_k - 1, *alt_f.shape[1:])), 1)
            pick = nearest_scene(summed[rows], cand, tuple(self.vae_sched[min(b.own_scales, n_sc - 1)][1:]))
            feats = feats.float().clone()
            feats[rows] = cand[torch.arange(len(rows), device=dev), pick]
            sampler = lambda si, prefix, _m=mine: _m[si]                   # noqa: E731
            matched = own_rows
        own = dict(own_bits=sampler, own_scales=b.own_scales, own_rows=own_rows)
        return feats, own, own_rows, matched

    def _score_ema(self) -> None:
        """Judge the EMA weights on ``eval_n`` prompts of the calibration split (seed 0, the config's
        sampling settings) and log the result; the time it takes is not training time."""
        ema, text, adapter = self.ema_tr, self.text, self.adapter
        was = ema.training
        adapter.transformer = ema
        ema.eval(); text.eval()
        try:
            res = evaluate_weights(adapter, "calibration", self.budget.eval_n, (0,), 0)
        finally:
            adapter.transformer = self.tr
            ema.train(was); text.train()
        st = self.state
        st["evals"] = st.get("evals", 0) + 1
        self.t_prev = time.time()
        self._log({"phase": "eval", "step": st["tr_step"], "split": "calibration", "images": res["num_images"],
                   "overall": res["overall"], **{c: res[c] for c in CATEGORIES if c in res}, "seconds": res["seconds"]})
        if not self.quiet:
            self.bar.write(f"eval at step {st['tr_step']}: overall {res['overall']:.3f} on {res['num_images']} "
                           f"calibration images ({res['seconds']:.0f} s)")

    def _export(self) -> Path:
        st, tc = self.state, self.tc
        meta = {"vae_steps": st["vae_step"], "transformer_steps": st["tr_step"],
                "minutes": round(st["elapsed"] / 60, 1), "device": device_label(self.dev), "threads": self.threads,
                "seed": self.seed, "batch": int(tc["batch"]), "short_batch": int(tc["short_batch"]), "lr": float(tc["lr"])}
        if self.stream.weights:
            meta["category_weights"] = self.stream.weights
        meta.update(self.budget.summary())
        if self.init_meta is not None:
            meta["init"] = self.init_meta
        export(self.out / "final", self.arch, self.adapter, self.ema_tr.state_dict(), {**meta, "transformer_weights": "ema"})
        export(self.out / "final_raw", self.arch, self.adapter, self.tr.state_dict(), {**meta, "transformer_weights": "raw"})
        print(f"done: {meta}; weights in {self.out / 'final'}", flush=True)
        return self.out / "final"


class _NoBar:
    """What the run uses of a tqdm bar, doing nothing (when tqdm is not installed)."""

    def __init__(self, *a, initial: int = 0, **k):
        self.n = initial

    def update(self, k: int) -> None:
        self.n += k

    def set_postfix_str(self, *a, **k) -> None:
        pass

    set_description = set_postfix_str

    def write(self, text: str) -> None:
        print(text, flush=True)

    def close(self) -> None:
        pass


def _param_groups(model, wd: float):
    """Weight decay on matrices only (not embeddings, the null text or positions)."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in n and "cfg_uncond" not in n and "pos" not in n else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]
