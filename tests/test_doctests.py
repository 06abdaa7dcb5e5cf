"""The examples in the docstrings run and give what they show (a moved or renamed function breaks
its example, not only its callers)."""
import doctest
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts)
                 for pkg in ("stagevar", "calibrate", "training") for p in (ROOT / pkg).rglob("*.py")
                 if ">>> " in p.read_text(encoding="utf-8"))


def test_the_examples_are_found():
    assert "calibrate.verify" in MODULES and "calibrate.budget" in MODULES and len(MODULES) >= 20


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
