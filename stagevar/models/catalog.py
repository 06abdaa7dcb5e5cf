"""The table of registered models and the errors of finding and loading them: what a model module
needs to register itself (:func:`register_model`) without importing the registry that imports it.
:mod:`stagevar.models.registry` builds and loads models from this table."""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable, Mapping

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
    #: this model's defaults for ``stagevar-calibrate``'s options (by option name without dashes,
    #: e.g. ``trials``), and ``measure``: its calibration pass's settings
    #: (``calibrate.calibration.MeasureSettings`` fields); empty: the commands' own defaults
    calibration: Mapping[str, Any] = dataclasses.field(default_factory=lambda: types.MappingProxyType({}))


class UnknownModelError(StageVarError):
    pass


class WeightsError(StageVarError):
    pass


def register_model(name: str, *, description: str, family: str, needs_weights: bool = True, narrowable: bool = False,
                   scorer: str = "codes", calibration: Mapping[str, Any] | None = None):
    """Decorator registering a builder under ``name``. Raises on duplicates. ``narrowable``: the
    builder takes ``narrow=WIDTH`` (the same structure at a reduced width, random weights).
    ``scorer``: the semantic scorer calibration compares its images with (``calibrate.metrics.SCORERS``:
    ``evaluator`` for models of the procedural scenes, ``codes`` where no better one is known).
    ``calibration``: defaults of ``stagevar-calibrate``'s options for this model (a model that is slow
    to generate asks for fewer trials and images), see :attr:`ModelEntry.calibration`."""

    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered (by {_REGISTRY[name].builder.__module__})")
        _REGISTRY[name] = ModelEntry(name, fn, description, family, needs_weights, narrowable, scorer,
                                     types.MappingProxyType(dict(calibration or {})))
        return fn

    return deco
