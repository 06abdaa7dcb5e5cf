"""Latency budgets: ``3x`` (a speedup over the full model) or ``700ms`` / ``1.5s`` (the latency of one
batch), alone or as a comma-separated list."""
from __future__ import annotations

import dataclasses
import re

from stagevar.errors import StageVarError


class BudgetError(StageVarError):
    exit_code = 2


@dataclasses.dataclass(frozen=True)
class Budget:
    """``3x`` (speedup over the full model) or ``700ms`` / ``1.5s`` (latency of one batch)."""

    text: str
    speedup: float | None = None
    seconds: float | None = None

    def target_seconds(self, baseline_s: float) -> float:
        return baseline_s / self.speedup if self.speedup is not None else self.seconds

    @property
    def name(self) -> str:
        return self.text


_BUDGET = re.compile(r"(\d+(?:\.\d+)?)(x|ms|s)")


def parse_budget(text: str) -> Budget:
    """A budget from its text.

    >>> parse_budget("3x").speedup, parse_budget("700ms").seconds
    (3.0, 0.7)
    """
    t = str(text).strip().lower()
    m = _BUDGET.fullmatch(t)
    if not m:
        raise BudgetError(f"invalid budget {text!r}: use a speedup such as 3x or 2.5x, or a latency per batch such as "
                          "700ms or 1.5s (several: --budget 2x,3x,4x).")
    v, unit = float(m.group(1)), m.group(2)
    if unit == "x":
        if v <= 1.0:
            raise BudgetError(f"invalid budget {text!r}: a speedup budget must be greater than 1x (1x is the full model).")
        return Budget(t, speedup=v)
    secs = v / 1000 if unit == "ms" else v
    if secs <= 0:
        raise BudgetError(f"invalid budget {text!r}: a latency budget must be positive.")
    return Budget(t, seconds=secs)


def parse_budgets(text: str) -> list[Budget]:
    parts = [p for p in str(text).split(",") if p.strip()]
    if not parts:
        raise BudgetError("no budget given: use e.g. --budget 3x or --budget 2x,3x,4x.")
    out = [parse_budget(p) for p in parts]
    if len({(b.speedup, b.seconds) for b in out}) != len(out):
        raise BudgetError(f"budget list {text!r} repeats a budget.")
    return out


@dataclasses.dataclass(frozen=True)
class BudgetSet:
    """The budgets one study searches, named as the policy file names them.

    >>> BudgetSet.of(parse_budgets("2x,3x,4x")).name, BudgetSet.of([parse_budget("700ms")]).name
    ('2x-3x-4x', '700ms')
    """

    name: str

    @classmethod
    def of(cls, budgets: list[Budget]) -> "BudgetSet":
        return cls("-".join(b.name for b in budgets))
