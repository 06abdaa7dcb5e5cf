"""Calibration measurements; all of them run generation through :class:`stagevar.runtime.Runtime`."""
