"""Fine-tuning the VAE decoder alone: the encoder and quantiser stay frozen, so the bit labels the
transformer learned do not change."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stagevar.io import atomic_write
from training.data import SceneStream
from training.weights import save_weights


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
    save_weights(sd, out_dir / "vae.safetensors")
    arch.setdefault("training", {})["decoder_finetune"] = {"steps": step, "minutes": round(minutes, 1), "batch": batch,
                                                           "lr": lr, "final_mse_ema": hist}
    atomic_write(out_dir / "config.json", json.dumps(arch, indent=2) + "\n")
    return arch["training"]["decoder_finetune"]
