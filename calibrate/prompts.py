"""Bundled prompt sets for calibration and held-out verification, for every model family.

* models of the procedural-scene world (``infinity-mini``, ``infinity-tiny``): the grammar's
  seeded ``calibration`` / ``heldout`` splits (held-out prompt combinations never appear in
  calibration);
* other text-to-image models: short GenEval-style prompts below;
* class-conditional models (``var-*``): ImageNet class ids spread over the label range.

A user file (``--prompts FILE``) has one prompt per line.
"""
from __future__ import annotations

from pathlib import Path

from stagevar.errors import StageVarError

SCENE_MODELS = ("infinity-mini", "infinity-tiny")

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
CLASS_IDS_CALIBRATION = ["1", "88", "207", "279", "360", "417", "580", "812"]
CLASS_IDS_HELDOUT = ["22", "130", "291", "388", "511", "649", "776", "971"]


def bundled(model: str, split: str, n: int) -> list[str]:
    """``n`` prompts of ``split`` ('calibration' or 'heldout') suitable for ``model``."""
    if split not in ("calibration", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    if model in SCENE_MODELS:
        from stagevar.toy.prompts import make_split
        return [it["prompt"] for it in make_split(split, n, seed=0)]
    if model.startswith("var-"):
        base = CLASS_IDS_CALIBRATION if split == "calibration" else CLASS_IDS_HELDOUT
    else:
        base = TEXT_PROMPTS_CALIBRATION if split == "calibration" else TEXT_PROMPTS_HELDOUT
    return [base[i % len(base)] for i in range(n)]


def read_prompt_file(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise StageVarError(f"prompts file {p} not found.")
    data = p.read_bytes()
    if len(data) > 10_000_000:
        raise StageVarError(f"prompts file {p} is {len(data) / 1e6:.0f} MB; a calibration prompt set is a few dozen lines.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise StageVarError(f"prompts file {p} is not UTF-8 text; expected one prompt per line.") from None
    if "\x00" in text:
        raise StageVarError(f"prompts file {p} contains NUL bytes (a binary file?); expected one prompt per line.")
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise StageVarError(f"prompts file {p} has no prompts (empty, or only comments).")
    return prompts
