"""Fixtures shared by the calibration tests."""
from __future__ import annotations

import pytest

from calibrate import calibration
from calibrate.calibration import MeasureSettings
from calibrate.measure import common

#: the smallest calibration pass: one keep ratio and selection, the last two scales of
#: ``infinity-tiny``, one latency round and one latency check
SMALL_SETTINGS = MeasureSettings(keeps=(0.5,), selections=("random_projection",), sensitivity_from=5,
                                 latency_repeats=1, latency_check_policies=1)


@pytest.fixture
def small_measure(monkeypatch):
    """Make every calibration (command or :func:`calibrate.pipeline.calibrate`) measure with
    :data:`SMALL_SETTINGS`.

    ``measure``'s default settings are bound when it is defined, so patching the class would not
    reach it: patch the keyword default itself. The search builds its latency model from the
    *default* variant grid rather than the record's, so patch that default too.
    """
    monkeypatch.setitem(calibration.measure.__kwdefaults__, "settings", SMALL_SETTINGS)
    real = common.variant_grid
    monkeypatch.setattr(common, "variant_grid", lambda keeps=SMALL_SETTINGS.keeps, selections=SMALL_SETTINGS.selections,
                        **k: real(keeps, selections, **k))
    return SMALL_SETTINGS
