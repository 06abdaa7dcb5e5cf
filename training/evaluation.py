"""Judging trained weights with the embedded evaluator (``--evaluate``) and over a grid of sampling
settings (``--sweep``), with per-image outcomes for paired comparisons."""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from stagevar.errors import StageVarError
from stagevar.guidance import guidance_ramp


def _hwc(img: torch.Tensor) -> list[np.ndarray]:
    return list(img.permute(0, 2, 3, 1).float().cpu().numpy())


def generate_images(adapter, prompts: list[str], seed: int, batch: int = 32, partials: dict[int, list] | None = None,
                    **sampling) -> list[np.ndarray]:
    """Generate one image per prompt (float HWC in [0, 1]); rows of a batch share one seeded generator.

    ``partials`` (scale -> list): the decoded partial image after each of those scales is appended
    to its list, in the order of the prompts (the final scale's are the images returned)."""
    out: list[np.ndarray] = []
    guidance = sampling.pop("cfg", adapter.cfg.cfg)

    def on_scale(k, state):
        if k in partials:
            partials[k] += _hwc(adapter.decode(state))

    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        with torch.no_grad():
            cond = adapter.encode_prompts(chunk)
            img = adapter.reference_generate(cond, guidance=guidance, seed=seed * 1000 + i,
                                             on_scale=on_scale if partials else None, **sampling)
        out += _hwc(img)
    return out


def evaluate_weights(adapter, split: str = "heldout", n: int = 60, seeds=(0, 1, 2, 3), split_seed: int = 0,
                     from_scale: int | None = None, **sampling) -> dict[str, Any]:
    """Judge scores (:func:`stagevar.toy.evaluate.evaluate`) on ``n`` prompts of ``split`` x ``seeds``.

    ``from_scale``: also judge the partial image after each scale from this one on (``by_scale``:
    scale -> the same table). Where the score stops changing, the content the evaluator reads is
    settled; a score that is already low there is the early scales' doing, not the late ones'."""
    from stagevar.toy.evaluate import score, tabulate
    from stagevar.toy.prompts import make_split

    num_scales = len(adapter.scale_schedule)
    if from_scale is not None and not 0 <= from_scale < num_scales:
        raise StageVarError(f"--from-scale {from_scale}: the model has scales 0-{num_scales - 1}")
    items = make_split(split, n, split_seed)
    prompts = [it["prompt"] for it in items]
    images, specs = [], []
    partials = {k: [] for k in range(from_scale, num_scales - 1)} if from_scale is not None else None
    t0 = time.time()
    for s in seeds:
        images += generate_images(adapter, prompts, int(s), partials=partials, **dict(sampling))
        specs += [it["spec"] for it in items]
    passed = [score(im, sp) for im, sp in zip(images, specs)]
    res = tabulate(passed, specs)
    if partials is not None:
        res["by_scale"] = {str(k): _table(tabulate([score(im, sp) for im, sp in zip(imgs, specs)], specs))
                           for k, imgs in partials.items()}
        res["by_scale"][str(num_scales - 1)] = _table(res)
    # per-image outcomes (seed-major, prompts in split order): settings scored on the same
    # split, n and seeds can be compared image by image (paired differences)
    res["passed"] = "".join("1" if ok else "0" for ok in passed)
    res["seconds"] = round(time.time() - t0, 1)
    res["sampling"] = {"cfg": sampling.get("cfg", adapter.cfg.cfg), "tau": sampling.get("tau", adapter.cfg.tau),
                       "top_k": sampling.get("top_k", adapter.cfg.top_k), "top_p": sampling.get("top_p", adapter.cfg.top_p)}
    res["split"], res["split_seed"], res["n_prompts"], res["seeds"] = split, split_seed, n, list(seeds)
    return res


def _table(res: dict[str, Any]) -> dict[str, float]:
    """The per-category and overall scores of a :func:`tabulate` result, rounded."""
    return {k: round(v, 4) for k, v in res.items() if isinstance(v, float)}


def default_grid(n_scales: int) -> list[dict[str, Any]]:
    """The ``--sweep`` settings: constant guidance x tau, greedy bits, top-p; per-scale guidance
    that leaves the first 2 or 3 scales unguided (1) and guides the rest with 3 or 5; and
    upstream VAR's linear ramp from 1 on the first scale to 3 or 5 on the last."""
    grid = [{"cfg": c, "tau": t, "top_k": 0, "top_p": 0.0} for c in (1.5, 3.0, 5.0) for t in (0.5, 1.0)]
    grid += [{"cfg": 3.0, "tau": 1.0, "top_k": 1, "top_p": 0.0}, {"cfg": 3.0, "tau": 1.0, "top_k": 0, "top_p": 0.9}]
    grid += [{"cfg": (1.0,) * k + (c,) * (n_scales - k), "tau": 1.0, "top_k": 0, "top_p": 0.0}
             for k in (2, 3) for c in (3.0, 5.0)]
    grid += [{"cfg": guidance_ramp(c, n_scales), "tau": 1.0, "top_k": 0, "top_p": 0.0} for c in (3.0, 5.0)]
    return grid
