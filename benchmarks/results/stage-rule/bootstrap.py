"""The record's stage rule (per-image ends, half the images) and its bootstrap support (prompts
resampled, each with its seeds) on saved curves (curves_by_draw.py), one line a draw: python bootstrap.py curves.json [MEAN]; with MEAN
the mean-curve rule of records without per-image values instead."""
import json, sys
from calibrate.measure.stages import boundary_support, detect_stages

d = json.load(open(sys.argv[1]))
for row in d["draws"]:
    c = row["curves"]
    if len(sys.argv) > 2:
        c.pop("images", None)
    else:
        c["images"] = {"semantic": row["per_image"]["semantic"], "structure": row["per_image"]["ssim"], "prompts": row["prompts"]}
    n = len(c["ssim"])
    st = detect_stages(c, n)
    b = boundary_support(c, n) if "images" in c else None
    print(row["draw"], f"semantic 0-{st['semantic'][1]} structure {st['structure'][0]}-{st['structure'][1]} "
          f"refinement {st['refinement'][0]}-{n - 1}", "" if b is None else
          f" support {b['support']:.2f}  semantic end {b['semantic_end']}  structure end {b['structure_end']}")
