"""Bundled prompt sets for calibration and held-out verification, for every model family.

* models of the procedural-scene world (``infinity-mini``, ``infinity-mini-256``,
  ``infinity-tiny``): draws of the grammar's seeded ``heldout`` split, whose compositions the
  model never trained on; ``verification`` is one draw (:data:`VERIFICATION_DRAW`), so the images
  calibration picks its operating points on are not the ones ``stagevar-calibrate bench`` and
  ``stagevar evaluate`` score (draw 0); ``report`` is another (:data:`REPORT_DRAW`): the chosen
  point's numbers written into a policy come from it. ``infinity-mini``
  (:data:`HELDOUT_CALIBRATED`) is calibrated on draws of the held-out split too, from
  :data:`CALIBRATION_DRAW_BASE` on, never the draws above or a bench's: the search must see the
  prompts the model will be judged on. On the ``calibration`` split (compositions the model was
  trained on) two 2x plans that lose 0.023 and 0.061 of the evaluator score on 512 held-out
  images measure alike (SSIM -0.0004 +- 0.0014, no evaluator loss for either), while 32
  held-out images tell them apart (-0.0048 +- 0.0013); a 2x,3x,4x calibration on held-out
  prompts was no worse than the shipped policy at any point and better at 3x, one on the
  calibration split worse at 2x and 4x (``benchmarks/RESULTS.md``, 2026-12-04 night).
  ``infinity-tiny`` (random weights, no evaluator) keeps the ``calibration`` split, and so does
  ``infinity-mini-256`` until its defaults are measured again on held-out prompts (its shipped
  3x point, calibrated on that split, already loses nothing on unseen prompts);
* other text-to-image models: short GenEval-style prompts below;
* class-conditional models (``var-*``): ImageNet class names spread over the label range (resolved by
  :func:`stagevar.models.imagenet.class_id`; a user file may mix names and ids).

A user file (``--prompts FILE``) has one prompt per line.
"""
from __future__ import annotations

from stagevar.io import read_prompt_file

__all__ = ["bundled", "read_prompt_file"]

SCENE_MODELS = ("infinity-mini", "infinity-mini-256", "infinity-tiny")
#: the scene models calibrated on draws of the held-out split (the compositions the evaluator judges)
HELDOUT_CALIBRATED = ("infinity-mini",)

TEXT_PROMPTS_CALIBRATION = [
    "a photo of a red apple on a wooden table", "two dogs playing in the snow", "a blue car parked left of a tree",
    "a bowl of soup next to a spoon", "a lighthouse on a cliff at sunset", "three yellow tulips in a glass vase",
    "a cat sleeping on a green sofa", "a city street at night with neon signs",
]
TEXT_PROMPTS_HELDOUT = [
    "a white horse in a field of flowers", "a purple umbrella above a bench", "four oranges on a plate",
    "a snowy mountain reflected in a lake", "a robot reading a book", "a brown bear to the right of a river",
    "a teapot and two cups", "a sailboat on a calm sea",
]
# ImageNet classes 1, 88, 207, 279, 360, 417, 580, 812 and 22, 130, 291, 388, 511, 649, 776, 971
CLASS_PROMPTS_CALIBRATION = ["goldfish", "macaw", "golden retriever", "Arctic fox", "otter", "balloon", "greenhouse",
                             "space shuttle"]
CLASS_PROMPTS_HELDOUT = ["bald eagle", "flamingo", "lion", "giant panda", "convertible", "megalith", "sax", "bubble"]


#: the draw of the held-out split that verification uses (benchmarks and evaluation score draw 0)
VERIFICATION_DRAW = 1
#: the draw the numbers written into a policy are measured on (bench's fresh draw is 2)
REPORT_DRAW = 3
#: calibration draw N of a :data:`HELDOUT_CALIBRATED` model is draw ``CALIBRATION_DRAW_BASE + N``
#: of the held-out split: far from the small draws that verification, reports and benches use
CALIBRATION_DRAW_BASE = 100
SPLITS = ("calibration", "heldout", "verification", "report")


def bundled(model: str, split: str, n: int, draw: int = 0) -> list[str]:
    """``n`` prompts of ``split`` (one of :data:`SPLITS`) suitable for ``model``. Without a grammar to
    draw from (other models), ``verification`` and ``report`` are the held-out list; the report
    set then differs from the selection set by its seeds only (:mod:`calibrate.verify`).
    ``draw`` chooses another draw of the calibration prompts (other models: the list rotated).

    >>> bundled("infinity-mini", "calibration", 3)
    ['a triangle', 'a square and a triangle', 'three purple squares']
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    if model in SCENE_MODELS:
        from stagevar.toy.prompts import make_split
        heldout_draw = {"verification": VERIFICATION_DRAW, "report": REPORT_DRAW}.get(split)
        if split == "calibration" and model in HELDOUT_CALIBRATED:
            heldout_draw = CALIBRATION_DRAW_BASE + draw
        if heldout_draw is not None:
            return [it["prompt"] for it in make_split("heldout", n, seed=heldout_draw)]
        return [it["prompt"] for it in make_split(split, n, seed=draw if split == "calibration" else 0)]
    if model.startswith("var-"):
        base = CLASS_PROMPTS_CALIBRATION if split == "calibration" else CLASS_PROMPTS_HELDOUT
    else:
        base = TEXT_PROMPTS_CALIBRATION if split == "calibration" else TEXT_PROMPTS_HELDOUT
    start = draw * n if split == "calibration" else 0
    return [base[(start + i) % len(base)] for i in range(n)]


