"""Fixtures shared by the calibration tests (their inputs are in ``calib.py``)."""
from __future__ import annotations

import pytest
import torch

from calib import BATCH, PROMPTS, SEEDS, SETTINGS
from calibrate import calibration
from calibrate.measure import common


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module: on a shared, busy CPU, torch's thread pool spin-waits and
    a generation gets 4-10x slower. (A record's key does not depend on the thread count.)"""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def model():
    """``infinity-tiny`` (a module may define its own ``model``)."""
    from stagevar.models.registry import load_model
    return load_model("infinity-tiny")


@pytest.fixture(scope="session")
def measured(model, tmp_path_factory):
    """(out directory, record) of one from-scratch calibration pass with :data:`calib.SETTINGS`,
    measured once per session."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("calibration")
        rec = calibration.measure(model, PROMPTS, SEEDS, out=out, batch_size=BATCH, settings=SETTINGS, progress=False)
    finally:
        torch.set_num_threads(old)
    return out, rec


@pytest.fixture(scope="session")
def record(measured):
    return measured[1]


@pytest.fixture(scope="session")
def subject(model):
    return common.Subject(model, PROMPTS, SEEDS, BATCH)


@pytest.fixture(scope="session")
def reference(subject):
    return subject.run(None)


@pytest.fixture
def small_measure(monkeypatch):
    """Make every calibration (command or :func:`calibrate.pipeline.calibrate`) measure with
    :data:`calib.SETTINGS`, so a command finds the session's record (same key) instead of
    measuring again.

    ``measure``'s default settings are bound when it is defined, so patching the class would not
    reach it: patch the keyword default itself. The search builds its latency model from the
    *default* variant grid rather than the record's, so patch that default too.
    """
    monkeypatch.setitem(calibration.measure.__kwdefaults__, "settings", SETTINGS)
    real = common.variant_grid
    monkeypatch.setattr(common, "variant_grid", lambda keeps=SETTINGS.keeps, selections=SETTINGS.selections,
                        **k: real(keeps, selections, **k))
    return SETTINGS
