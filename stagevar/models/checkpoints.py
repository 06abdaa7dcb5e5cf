"""Loading official checkpoints safely: ``.pth`` (``weights_only=True``, memory-mapped),
``.safetensors``, and sharded directories (``*.index.json`` weight maps or a folder of shards).

Errors are :class:`~stagevar.models.catalog.WeightsError` with the file, what was expected and
where it comes from.
"""
from __future__ import annotations

import json
import logging
import pickle
import zipfile
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from stagevar.models.catalog import WeightsError

log = logging.getLogger(__name__)

_WRAPPERS = ("state_dict", "model", "module", "ema", "trainer", "gpt_fsdp", "gpt_wo_ddp")


def find(root: Path, name: str, model: str, is_dir: bool = False) -> Path:
    """``root/name`` (also tried with a ``.safetensors`` suffix instead of ``.pth``)."""
    root = Path(root)
    if not root.exists():
        raise WeightsError(f"weights directory {root} does not exist (model {model!r}). Pass --weights DIR or set $STAGEVAR_WEIGHTS.")
    cands = [root / name]
    if name.endswith(".pth"):
        cands.append(root / (name[:-4] + ".safetensors"))
    for c in cands:
        if c.exists() and (c.is_dir() if is_dir else True):
            return c
    raise WeightsError(f"model {model!r}: expected {'directory' if is_dir else 'file'} {root / name} is missing. "
                       f"Files present in {root}: {', '.join(sorted(p.name for p in root.iterdir())[:12]) or '(none)'}.")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint file or sharded directory into a flat state dict (never unpickles code)."""
    path = Path(path)
    if path.is_dir():
        index = sorted(path.glob("*.index.json"))
        if index:
            files = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
            shards = [path / f for f in files]
        else:
            shards = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".pth", ".bin", ".pt"))
        if not shards:
            raise WeightsError(f"{path}: no checkpoint shards (*.safetensors, *.pth, *.bin) found in this directory")
        sd: dict[str, torch.Tensor] = {}
        for s in shards:
            sd.update(load_state_dict_file(s))
        return sd
    if path.stat().st_size == 0:
        raise WeightsError(f"{path}: the file is empty (a failed or interrupted download?). Download it again.")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc}). The file may be truncated; download it again.") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise WeightsError(f"{path}: refused to load: the checkpoint contains objects other than tensors ({str(exc).splitlines()[0]}). "
                           "stagevar loads checkpoints with weights_only=True so that a file cannot run code; "
                           "use the official checkpoint or convert it to safetensors.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise WeightsError(f"{path}: could not read the checkpoint ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                           "the file may be truncated or not a PyTorch checkpoint. Download it again.") from None
    return _unwrap(obj, path)


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = next((obj[k] for k in _WRAPPERS if k in obj and isinstance(obj[k], dict)), None)
            if inner is None:
                break
            obj = inner
    raise WeightsError(f"{path}: does not hold a state dict of tensors (top-level keys: {list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__}).")


def assign(module: nn.Module, sd: dict[str, torch.Tensor], what: str, *, resize: Iterable[str] = (),
           derived: Iterable[str] = (), optional_prefixes: Iterable[str] = ()) -> None:
    """Load ``sd`` into ``module`` (which may live on the meta device) with exact key checking.

    ``resize``: parameters whose first dim may differ (upstream resizes ``cfg_uncond``);
    ``optional_prefixes``: keys that may be absent (e.g. a VAE encoder not needed to generate).
    Floating tensors are cast to the module's dtype."""
    expected = module.state_dict()
    optional_prefixes = tuple(optional_prefixes)
    missing = [k for k in expected if k not in sd and not k.startswith(optional_prefixes)]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{what}: the checkpoint does not match the architecture: {len(missing)} missing key(s) "
            f"{missing[:5]}{'...' if len(missing) > 5 else ''}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}. Is this the checkpoint of this model?"
        )
    fixed = {}
    for k, ref in expected.items():
        if k not in sd:
            fixed[k] = torch.zeros(ref.shape, dtype=ref.dtype) if ref.is_meta else ref
            continue
        v = sd[k]
        if v.shape != ref.shape:
            if k in resize and v.ndim == ref.ndim and v.shape[1:] == ref.shape[1:]:
                n = ref.shape[0]
                v = v[:n] if v.shape[0] >= n else torch.cat([v, torch.zeros((n - v.shape[0], *v.shape[1:]), dtype=v.dtype)])
            else:
                raise WeightsError(f"{what}: tensor {k!r} has shape {tuple(v.shape)} in the checkpoint but the model expects "
                                   f"{tuple(ref.shape)}. Is this the checkpoint of this model?")
        fixed[k] = v.to(ref.dtype) if v.is_floating_point() and ref.is_floating_point() else v
    module.load_state_dict(fixed, strict=True, assign=True)
