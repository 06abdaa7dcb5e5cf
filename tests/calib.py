"""Shared inputs of the calibration tests: the small record's prompts, seeds and settings, and
hand-built records and helpers (imported by the test modules; fixtures are in conftest.py)."""
from __future__ import annotations

import json

from calibrate.calibration import MeasureSettings
from calibrate.measure.common import Variant, variant_grid
from calibrate.record import CalibrationRecord

PROMPTS = ["a red circle", "two blue squares"]
SEEDS = [0]
BATCH = 2
SETTINGS = MeasureSettings(keeps=(0.5,), selections=("random_projection",), sensitivity_from=5, guidance_from=4,
                           latency_repeats=1, latency_check_policies=1, stage_images=6)    # 2 prompts x seeds 0-2
SENS_FIELDS = ("ssim", "semantic", "hf_ratio", "quality", "quality_worst", "damage")


def norm(d) -> str:
    """Canonical JSON text (tuples == lists, NaN == NaN) for comparing records."""
    return json.dumps(d, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def record_variants(settings: MeasureSettings = SETTINGS) -> list[Variant]:
    return variant_grid(settings.keeps, settings.selections)


def hand_record(n: int = 7, depth: int = 2, refinement_start: int = 4, semantic_end: int = 1) -> CalibrationRecord:
    sched = [[1, 2 ** k, 2 ** k] for k in range(n)]
    stages = {"semantic": [0, semantic_end], "structure": [semantic_end + 1, refinement_start - 1],
              "refinement": [refinement_start, n - 1], "rule": "hand-made", "evidence": {}}
    return CalibrationRecord(key="hand", inputs={"model": {"scale_schedule": sched}, "num_layers": depth},
                             convergence={}, sensitivity=[], spectra=[], latency={}, latency_check=[], stages=stages)
