"""Where the reference data (state-dict manifests, golden tensors dumped from the upstream code) is,
for the tests that compare with it.

The folder is ``$STAGEVAR_SHARED/reference`` or ``<repo>/../shared/reference``. A test whose data is
missing fails: a CI run must not pass by skipping the fidelity checks. On a checkout without the
shared folder, ``STAGEVAR_SKIP_REFERENCE=1`` skips those tests instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("STAGEVAR_SHARED") or Path(__file__).resolve().parents[2] / "shared")
REFERENCE = SHARED / "reference"


def need(path: Path) -> Path:
    """``path`` if it exists; else fail the test (or skip it with ``STAGEVAR_SKIP_REFERENCE=1``)."""
    path = Path(path)
    if path.exists():
        return path
    msg = (f"reference data not found at {path}: set STAGEVAR_SHARED to the shared folder (the one holding "
           "reference/), or STAGEVAR_SKIP_REFERENCE=1 to skip the tests that compare with it")
    if os.environ.get("STAGEVAR_SKIP_REFERENCE") == "1":
        pytest.skip(msg)
    pytest.fail(msg)
