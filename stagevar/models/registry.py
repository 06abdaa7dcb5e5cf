"""Model registry: names -> builders, and where weights come from.

>>> from stagevar.models.registry import list_models
>>> "infinity-tiny" in list_models()
True

A builder is a function ``build(weights=None, device="cpu", dtype=torch.float32, random_weights=False)
-> Adapter`` registered with :func:`register_model`. ``weights`` is a file or directory (or
``None``: look in ``$STAGEVAR_WEIGHTS``, or use the weights shipped in the package where a model
has them). A model that needs official weights and gets none (or ``hf``) finds them in the local
Hugging Face cache (:mod:`stagevar.models.hub`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from stagevar.errors import StageVarError
from stagevar.models.catalog import _REGISTRY, ModelEntry, UnknownModelError, WeightsError, register_model

__all__ = ["ModelEntry", "UnknownModelError", "WeightsError", "register_model", "list_models", "model_entry", "calibration_defaults",
           "load_model", "load_model_from_args", "add_model_arguments", "resolve_device", "weights_root"]


def _ensure_builtin() -> None:
    # Importing the modules registers their models (kept lazy: importing stagevar stays cheap).
    from stagevar.models import infinity  # noqa: F401
    try:
        from stagevar.models import var  # noqa: F401
    except ImportError:  # pragma: no cover - the VAR family is optional while it is being built
        pass
    try:
        from stagevar.toy import model as _toy  # noqa: F401
    except ImportError:  # pragma: no cover
        pass


def list_models() -> list[str]:
    _ensure_builtin()
    return sorted(_REGISTRY)


def calibration_defaults(name: str) -> Mapping[str, Any]:
    """The calibration defaults model ``name`` registers (:attr:`ModelEntry.calibration`); empty for
    an unknown name (whose command reports it when it loads the model)."""
    try:
        return model_entry(name).calibration
    except UnknownModelError:
        return {}


def model_entry(name: str) -> ModelEntry:
    _ensure_builtin()
    if name not in _REGISTRY:
        raise UnknownModelError(
            f"unknown model {name!r}. Registered models: {', '.join(sorted(_REGISTRY))}. "
            "Run `stagevar list-models` to see them with descriptions."
        )
    return _REGISTRY[name]


def _is_hub_keyword(root: Path) -> bool:
    """``--weights hf`` asks for the Hugging Face cache (unless a directory ``hf`` is there)."""
    return str(root) == "hf" and not root.exists()


def weights_root(weights: str | os.PathLike | None) -> Path | None:
    """The weights location: the argument, else ``$STAGEVAR_WEIGHTS``, else None."""
    if weights is not None:
        return Path(weights).expanduser()
    env = os.environ.get("STAGEVAR_WEIGHTS")
    return Path(env).expanduser() if env else None


def load_model(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    random_weights: bool = False,
    narrow: int | None = None,
):
    """Build a registered model and load its weights.

    ``narrow``: the model's exact structure (depth, heads, schedule, every op) at width ``narrow``,
    with seeded random weights: host-side costs (dispatched ops, launches, syncs) of a large model,
    counted on a small machine.

    >>> m = load_model("infinity-tiny")           # tiny seeded random model, for tests
    >>> m.scale_schedule[-1]
    (1, 16, 16)
    """
    entry = model_entry(name)
    device = resolve_device(device)
    if narrow is None:
        root = weights_root(weights)
        if entry.needs_weights and not random_weights and (root is None or _is_hub_keyword(root)):
            from stagevar.models.hub import weights_from_hub_cache
            root = weights_from_hub_cache(name)          # --weights hf, or nothing given: the local HF cache
        elif root is not None and _is_hub_keyword(root):
            root = None                                  # random or embedded weights: nothing to look up
        return entry.builder(weights=root, device=device, dtype=dtype, random_weights=random_weights)
    narrowable = sorted(n for n, e in _REGISTRY.items() if e.narrowable)
    if not entry.narrowable:
        raise StageVarError(f"--narrow: model {name!r} cannot be built at another width; models that can: "
                            f"{', '.join(narrowable)}.")
    if not random_weights:
        raise StageVarError(f"--narrow {narrow} builds {name}'s structure at width {narrow}, which no checkpoint has: "
                            "add --random-weights.")
    return entry.builder(weights=None, device=device, dtype=dtype, random_weights=True, narrow=int(narrow))


def add_model_arguments(p, random_weights_help: str = "seeded random weights at full size (speed only)") -> None:
    """The options :func:`load_model_from_args` reads, for a command's parser."""
    from stagevar.models.catalog import DEFAULT_MODEL
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"registered model (default {DEFAULT_MODEL}; see list-models)")
    p.add_argument("--weights", type=Path, help="weights directory, or 'hf' for the local Hugging Face cache (default "
                                                "$STAGEVAR_WEIGHTS, else the Hugging Face cache; embedded models need none)")
    p.add_argument("--random-weights", action="store_true", help=random_weights_help)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype (default float32)")


def load_model_from_args(args):
    """:func:`load_model` from a command's parsed arguments (``model``, ``weights``, ``device``,
    ``dtype`` as a name, ``random_weights``)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    return load_model(args.model, args.weights, device=args.device, dtype=dtype, random_weights=args.random_weights)


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse a device string, with a clear error when it is not available here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StageVarError(f"invalid device {device!r}: {exc}. Use 'cpu', 'cuda' or 'cuda:N'.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StageVarError(
            f"device {device!r} was requested but this machine has no CUDA device available "
            "(torch.cuda.is_available() is False). Use --device cpu."
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise StageVarError(f"device {device!r} does not exist: only {torch.cuda.device_count()} CUDA device(s).")
    return dev
