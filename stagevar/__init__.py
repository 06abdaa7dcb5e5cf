"""stagevar: stage-aware acceleration of next-scale ("VAR") image generators.

Public API::

    import stagevar
    model = stagevar.load_model("infinity-mini")                  # the embedded default model
    policy = stagevar.load_policy("policies/infinity-mini.128.2x-3x-4x.yaml")
    images = stagevar.generate(model, ["two green squares"], policy, seed=0)   # (B, 3, H, W) in [0, 1]
    images = stagevar.generate(model, ["two green squares"], policy, engine="static")  # eager | static | graphs

Importing this package never imports ``calibrate``, optuna or scipy (the runtime stays light).

Tensor layout suffixes used throughout: ``B`` batch rows, ``L`` tokens, ``C`` channels/width,
``V`` logits per token, ``H`` heads, ``c`` head width, ``d`` bits per token, ``hw`` grid.
"""
from __future__ import annotations

from stagevar.errors import StageVarError
from stagevar.models.catalog import DEFAULT_MODEL
from stagevar.policy import Policy, ScalePlan, load_policy
from stagevar.version import __version__

__all__ = ["__version__", "StageVarError", "Policy", "ScalePlan", "load_policy", "load_model", "list_models",
           "generate", "Runtime", "DEFAULT_MODEL"]


def load_model(name: str = DEFAULT_MODEL, weights=None, **kwargs):
    """Build a registered model (see :func:`stagevar.models.registry.load_model`)."""
    from stagevar.models.registry import load_model as _load
    return _load(name, weights, **kwargs)


def list_models() -> list[str]:
    from stagevar.models.registry import list_models as _list
    return _list()


def generate(model, prompts, policy=None, operating_point=None, **kwargs):
    from stagevar.runtime import generate as _generate
    return _generate(model, prompts, policy, operating_point, **kwargs)


def __getattr__(name):
    if name == "Runtime":
        from stagevar.runtime import Runtime
        return Runtime
    raise AttributeError(name)
