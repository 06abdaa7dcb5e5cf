"""The table of registered models and the errors of finding and loading them: what a model module
needs to register itself (:func:`register_model`) without importing the registry that imports it.
:mod:`stagevar.models.registry` builds and loads models from this table."""
from __future__ import annotations

import dataclasses
from typing import Callable

from stagevar.errors import StageVarError

#: the model every command uses when none is named: the embedded one, whose weights ship with stagevar
DEFAULT_MODEL = "infinity-mini"

_REGISTRY: dict[str, "ModelEntry"] = {}


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., "object"]
    description: str
    family: str
    needs_weights: bool
    narrowable: bool = False
    scorer: str = "codes"


class UnknownModelError(StageVarError):
    pass


class WeightsError(StageVarError):
    pass


def register_model(name: str, *, description: str, family: str, needs_weights: bool = True, narrowable: bool = False,
                   scorer: str = "codes"):
    """Decorator registering a builder under ``name``. Raises on duplicates. ``narrowable``: the
    builder takes ``narrow=WIDTH`` (the same structure at a reduced width, random weights).
    ``scorer``: the semantic scorer calibration compares its images with (``calibrate.metrics.SCORERS``:
    ``evaluator`` for models of the procedural scenes, ``codes`` where no better one is known)."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].builder.__module__})")
        _REGISTRY[name] = ModelEntry(name, fn, description, family, needs_weights, narrowable, scorer)
        return fn

    return deco
