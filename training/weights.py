"""Weights directories (``config.json`` + three safetensors files): export from a run or a
checkpoint, the check before a warm start, and the average of two directories."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from stagevar.errors import StageVarError
from stagevar.io import atomic_write
from stagevar.toy.model import build_parts


def atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


#: ``config.json`` sections that fix the architecture: weights can only be continued or averaged
#: between directories that agree on all of them.
ARCH_KEYS = ("image_size", "schedule", "vae", "text", "transformer")


def save_weights(sd: dict[str, torch.Tensor], path: Path) -> None:
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
        save_weights(clean(sd), out_dir / fname)
    cfg = {k: arch[k] for k in (*ARCH_KEYS, "sampling")}
    cfg["training"] = meta
    atomic_write(out_dir / "config.json", json.dumps(cfg, indent=2) + "\n")


def device_label(dev: torch.device) -> str:
    """The device as recorded in ``config.json`` (a GPU's name included)."""
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def check_init(arch: dict[str, Any], init: Path) -> dict[str, Any]:
    """The training record of the weights directory ``init``, after checking that its architecture
    is the config's: the same VAE, text encoder and transformer (a warm start cannot change
    shapes). The schedule may grow: ``init``'s schedule must then be the first scales of the
    config's (each learned scale keeps its meaning; the new last scales start untrained), at a
    larger ``image_size``, so that a 256² model starts from the 128² one."""
    cfg_path = Path(init) / "config.json"
    if not cfg_path.is_file():
        raise StageVarError(f"--init {init}: no config.json there (pass a weights directory such as "
                            "stagevar/toy/weights or a run's final/)")
    have = json.loads(cfg_path.read_text())
    for key in ("vae", "text", "transformer"):
        if have.get(key) != arch.get(key):
            raise StageVarError(f"--init {init}: its {key!r} ({have.get(key)}) differs from the config's "
                                f"({arch.get(key)}); a warm start needs the same architecture")
    old, new = list(have.get("schedule") or []), list(arch.get("schedule") or [])
    grown = old != new
    if grown and (len(old) >= len(new) or new[:len(old)] != old):
        raise StageVarError(f"--init {init}: its schedule {old} is neither the config's {new} nor its first scales; "
                            "a warm start keeps every learned scale and may only add scales after them")
    if grown == (have.get("image_size") == arch.get("image_size")):
        raise StageVarError(f"--init {init}: image_size {have.get('image_size')} -> {arch.get('image_size')} with "
                            f"schedule {old} -> {new}; a grown schedule needs a larger image and the same schedule "
                            "the same image")
    rec = {"from": str(init), "training": have.get("training", {})}
    if grown:
        rec["grown_from"] = {"image_size": have.get("image_size"), "schedule": old}
    return rec


def export_checkpoint(ckpt: Path, out_dir: Path, raw: bool = False) -> dict[str, Any]:
    """Weights directory (as ``final/``) from a training checkpoint, at whatever step it holds."""
    if not Path(ckpt).is_file():
        raise StageVarError(f"--export {ckpt}: no such checkpoint (a run writes OUT/ckpt.pt)")
    ck = torch.load(ckpt, map_location="cpu", weights_only=False)
    arch, st = ck["arch"], ck["state"]
    _, adapter = build_parts(arch)
    adapter.vae.load_state_dict(ck["vae"])
    adapter.text_encoder.load_state_dict(ck["text"])
    meta = {"vae_steps": st["vae_step"], "transformer_steps": st["tr_step"], "minutes": round(st["elapsed"] / 60, 1),
            "seed": int(arch.get("seed", 0)), "transformer_weights": "raw" if raw else "ema", "exported_from": str(ckpt)}
    export(Path(out_dir), arch, adapter, ck["tr" if raw else "ema_tr"], meta)
    return meta


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
        raise StageVarError(f"--average: ALPHA={alpha} must be in [0, 1] (the weight of the second directory)")
    cfgs = []
    for d in (first, second):
        missing = [f for f in ("config.json", "vae.safetensors", *AVERAGED_FILES) if not (d / f).is_file()]
        if missing:
            raise StageVarError(f"--average: {d} is not a weights directory (missing {', '.join(missing)})")
        cfgs.append(json.loads((d / "config.json").read_text()))
    diff = [k for k in ARCH_KEYS if cfgs[0].get(k) != cfgs[1].get(k)]
    if diff:
        raise StageVarError(f"--average: {first} and {second} differ in config.json {', '.join(diff)}; only one "
                         f"architecture can be averaged")
    vae_bytes = (first / "vae.safetensors").read_bytes()
    if vae_bytes != (second / "vae.safetensors").read_bytes():
        raise StageVarError(f"--average: {first}/vae.safetensors and {second}/vae.safetensors differ; the "
                         f"transformers were trained on different bit labels and cannot be averaged")
    out_dir.mkdir(parents=True, exist_ok=True)
    for fname in AVERAGED_FILES:
        a, b = load_file(str(first / fname)), load_file(str(second / fname))
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise StageVarError(f"--average: {first}/{fname} and {second}/{fname} hold different tensors")
        mixed = {k: ((1 - alpha) * a[k].float() + alpha * b[k].float()).to(a[k].dtype).contiguous()
                 if a[k].is_floating_point() else a[k] for k in a}
        save_weights(mixed, out_dir / fname)
    atomic_write(out_dir / "vae.safetensors", vae_bytes)
    cfg = dict(cfgs[0])
    cfg["training"] = {"average": {"alpha": alpha,
                                   "first": {"from": str(first), "training": cfgs[0].get("training")},
                                   "second": {"from": str(second), "training": cfgs[1].get("training")}}}
    atomic_write(out_dir / "config.json", json.dumps(cfg, indent=2) + "\n")
    return {"alpha": alpha, "first": str(first), "second": str(second), "out": str(out_dir)}
