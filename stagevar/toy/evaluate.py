"""A GenEval-like analytic judge for images of the toy world.

GenEval scores a text-to-image model by detecting the objects in each generated image and
checking the prompt's requirements (presence, exact count, colour, relative position, colour
binding); the headline number is the mean of six per-category accuracies. The toy world is
simple enough to replace the neural detector by geometry, which makes the judge exact on clean
renders, deterministic, fast on a CPU, and free of weights:

1. **Background.** The median colour of a thin frame around the image (objects keep a margin).
2. **Colour segmentation.** Each palette colour ``c`` defines the segment from the background
   ``bg`` to ``c``; anti-aliasing and blur only mix an object with the background, so its pixels
   stay on that segment. A pixel belongs to the colour whose segment passes closest, provided it
   lies at least half-way along it (``alpha >= 0.5``, i.e. the usual 50 % coverage boundary).
3. **Components.** 8-connected components of the foreground; blobs below
   :data:`MIN_AREA` of the canvas are noise and dropped; a component whose pixels carry two
   substantial colours (two objects that touch) is split by colour.
4. **Colour** of a component: the segment nearest to the mean of its core pixels.
5. **Box and mask** at sub-pixel precision: the component's alpha along its own colour is
   bilinearly upsampled (to :data:`WORK_RESOLUTION`) and thresholded at 0.5 again, so the box of
   a 10-px object is not off by a whole pixel.
6. **Shape** from geometry of that mask (see :func:`_classify_shape`): the vertical centroid
   offset (a triangle's centroid sits 1/6 of its height below the box centre), the fill ratio
   of the box (circle pi/4 = 0.785, square 1, triangle 0.5) and the occupancy of the box corners.

The rules of :func:`check` follow GenEval's ``evaluate_images.py``; see ``GRAMMAR.md``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage

from ..errors import StageVarError
from .prompts import CATEGORIES, parse_prompt, relations_between, validate_spec
from .scenes import PALETTE

logger = logging.getLogger(__name__)

_NAMES: tuple[str, ...] = tuple(PALETTE)
_RGB = np.asarray([PALETTE[n] for n in _NAMES], dtype=np.float32)

#: Components smaller than this fraction of the canvas are noise (the smallest object, a small
#: triangle, covers 0.0128).
MIN_AREA = 0.003
#: A pixel is foreground when it lies at least this far along its colour's bg->colour segment.
ALPHA_FOREGROUND = 0.5
#: Pixels at least this far along are "core" pixels, used to decide the colour of a component.
ALPHA_CORE = 0.75
#: Each component's alpha map is bilinearly upsampled as if the image had at least this side
#: before its box and mask are measured: the 50 % boundary then falls between original pixels,
#: so the box (and with it the fill ratio that tells shapes apart) is not off by a whole pixel.
WORK_RESOLUTION = 192
#: GenEval's margin for relative positions (fraction of the summed box extents).
POSITION_MARGIN = 0.1


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object; coordinates are canvas fractions (x right, y down), ``area`` is the
    fraction of the canvas covered, ``bbox`` is ``(x0, y0, x1, y1)``. ``shape`` is ``"unknown"``
    for blobs that fit no shape (e.g. elongated)."""

    shape: str
    colour: str
    cx: float
    cy: float
    area: float
    bbox: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    fill: float = 0.0


_EIGHT = np.ones((3, 3), dtype=bool)


def _as_uint8(image: Any) -> np.ndarray:
    """uint8 (H, W, 3); floats are taken as [0, 1] (model outputs), alpha is dropped."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {arr.shape}")
    arr = arr[:, :, :3]
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    return np.clip(arr, 0, 255).astype(np.uint8)


def estimate_background(img: np.ndarray) -> np.ndarray:
    """Median colour of a frame 1/32 of the side wide (objects stay clear of the border)."""
    h, w = img.shape[:2]
    b = max(1, min(h, w) // 32)
    frame = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3),
                            img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)])
    return np.median(frame.astype(np.float32), axis=0)


def _segment_fit(d: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For offsets ``d`` (N, 3) from the background and segment directions ``v`` (K, 3): the
    position along each segment ``alpha`` (N, K) and the distance to it (N, K)."""
    vv = np.maximum((v * v).sum(1), 1.0)
    alpha = d @ v.T / vv
    a = np.clip(alpha, 0.0, None)
    resid2 = (d * d).sum(1, keepdims=True) - 2 * a * (d @ v.T) + a * a * vv
    return alpha, np.sqrt(np.maximum(resid2, 0.0))


def _classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Shape of a binary blob (cropped to its bounding box) and its fill ratio.

    Three blur-tolerant cues, measured on renders at 64 and 128 px with blur sigma 1 and noise
    std 8 (worst cases in brackets):

    * vertical centroid offset / height: triangle (apex up) +1/6 [>= 0.08], others 0 [<= 0.025];
    * fill ratio of the box: circle pi/4 [0.73-0.83], square 1 [>= 0.86], triangle 1/2 [<= 0.69];
    * mean occupancy of the four corner patches (20 % of each side): circle [<= 0.24],
      square [>= 0.5], the cue that survives the corner rounding of small blurred squares.
    """
    h, w = mask.shape
    n = float(mask.sum())
    fill = n / float(h * w)
    if max(h, w) > 1.7 * min(h, w) or fill < 0.3:
        return "unknown", fill
    rows = np.arange(h, dtype=np.float64) + 0.5
    voff = float((mask.sum(1) * rows).sum() / n / h - 0.5)
    if voff > 0.055 or fill < 0.62:
        return "triangle", fill
    ch, cw = max(1, int(round(0.2 * h))), max(1, int(round(0.2 * w)))
    corners = (mask[:ch, :cw].mean() + mask[:ch, -cw:].mean() + mask[-ch:, :cw].mean() + mask[-ch:, -cw:].mean()) / 4
    if corners >= 0.37 or fill >= 0.885:
        return "square", fill
    return "circle", fill


def detect(image: Any, min_area: float = MIN_AREA) -> list[Detection]:
    """Objects found in ``image`` (uint8 ``(H, W, 3)``; floats in [0, 1] are accepted), largest first."""
    img = _as_uint8(image)
    h, w = img.shape[:2]
    bg = estimate_background(img)
    d = img.reshape(-1, 3).astype(np.float32) - bg
    v = _RGB - bg
    vlen = np.linalg.norm(v, axis=1)
    # alpha >= 0.5 on any segment implies |d| >= 0.5 |v|: fit only pixels that far from the bg.
    cand = np.flatnonzero((d * d).sum(1) >= (ALPHA_FOREGROUND * 0.9 * vlen.min()) ** 2)
    best = np.zeros(h * w, dtype=np.int64)
    a_best = np.zeros(h * w, dtype=np.float32)
    fg = np.zeros(h * w, dtype=bool)
    if cand.size:
        alpha, resid = _segment_fit(d[cand], v)
        # Only segments the pixel actually moves along are candidates; the closest one wins.
        k = np.argmin(np.where(alpha > 0.25, resid, np.inf), axis=1)
        rows = np.arange(cand.size)
        a_k, r_k = alpha[rows, k], resid[rows, k]
        best[cand], a_best[cand] = k, a_k
        # Foreground: half-way to a colour and not far off its segment (grey/black blobs are
        # not palette objects).
        fg[cand] = (a_k >= ALPHA_FOREGROUND) & (r_k <= 0.5 * a_k * vlen[k] + 20.0)
    fg, best, a_best, d = fg.reshape(h, w), best.reshape(h, w), a_best.reshape(h, w), d.reshape(h, w, 3)
    labels, n = ndimage.label(fg, structure=_EIGHT)
    if n == 0:
        return []
    min_px = max(3, int(round(min_area * h * w)))
    factor = max(1, int(np.ceil(WORK_RESOLUTION / min(h, w))))
    dets: list[Detection] = []
    for lab, sl in enumerate(ndimage.find_objects(labels), start=1):
        comp = labels[sl] == lab
        npx = int(comp.sum())
        if npx < min_px:
            continue
        hist = np.bincount(best[sl][comp], minlength=len(_NAMES))
        significant = np.flatnonzero(hist >= max(min_px, 0.2 * npx))
        if len(significant) <= 1:
            parts = [comp]
        else:  # touching objects of different colours: split by per-pixel colour
            parts = []
            for k in significant:
                sub, m = ndimage.label(comp & (best[sl] == k), structure=_EIGHT)
                parts.extend(sub == j for j in range(1, m + 1))
        for part in parts:
            if int(part.sum()) < min_px:
                continue
            full = np.zeros((h, w), dtype=bool)
            full[sl] = part
            det = _describe(full, sl, d, a_best, v, factor, min_area)
            if det is not None:
                dets.append(det)
    dets.sort(key=lambda t: -t.area)
    return dets


def _describe(mask: np.ndarray, sl: tuple[slice, slice], d: np.ndarray, a_best: np.ndarray,
              v: np.ndarray, factor: int, min_area: float) -> Detection | None:
    """Colour, sub-pixel box and shape of one component (``mask`` is full-size)."""
    h, w = mask.shape
    core = mask[sl] & (a_best[sl] >= ALPHA_CORE)
    pix = d[sl][core] if core.sum() >= 4 else d[sl][mask[sl]]
    alpha, resid = _segment_fit(pix.mean(0, keepdims=True), v)
    k = int(np.argmin(np.where(alpha[0] > 0.25, resid[0], np.inf)))
    # Alpha along this component's own colour, in a 2-px padded crop, with every pixel that is
    # not this component or its immediate rim zeroed (neighbours must not leak in).
    pad = 2
    y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, h)
    x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, w)
    near = ndimage.binary_dilation(mask[y0:y1, x0:x1], structure=_EIGHT, iterations=pad)
    a = (d[y0:y1, x0:x1] @ v[k]) / float(v[k] @ v[k])
    a = np.where(near, np.clip(a, 0.0, 1.5), 0.0)
    if factor > 1:  # bilinear upsampling puts the 50 % boundary between the original pixels
        a = ndimage.zoom(a, factor, order=1, mode="nearest", grid_mode=True)
    up, m = ndimage.label(a >= ALPHA_FOREGROUND, structure=_EIGHT)
    if m == 0:
        return None
    if m > 1:
        up = up == (1 + int(np.argmax(ndimage.sum_labels(np.ones_like(a), up, index=np.arange(1, m + 1)))))
    else:
        up = up == 1
    up = ndimage.binary_fill_holes(up)
    ys, xs = np.nonzero(up)
    by0, by1, bx0, bx1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    shape, fill = _classify_shape(up[by0:by1, bx0:bx1])
    area = float(up.sum()) / (factor * factor * h * w)
    if area < min_area:
        return None
    box = ((x0 + bx0 / factor) / w, (y0 + by0 / factor) / h, (x0 + bx1 / factor) / w, (y0 + by1 / factor) / h)
    return Detection(shape=shape, colour=_NAMES[k], cx=(box[0] + box[2]) / 2, cy=(box[1] + box[3]) / 2,
                     area=area, bbox=box, fill=fill)


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def _matches(dets: Sequence[Detection], shape: str, colour: str | None = None) -> list[Detection]:
    return [t for t in dets if t.shape == shape and (colour is None or t.colour == colour)]


def check(detections: Sequence[Detection], spec: dict[str, Any]) -> tuple[bool, str]:
    """``(passed, reason)`` of the GenEval rule of ``spec['category']`` on detections
    (largest first, as :func:`detect` returns them):

    * every category: no unrecognisable blob and no more objects than the prompt names;
    * single_object / two_object: at least one object of each named shape;
    * counting: exactly ``count`` objects of the shape, all of the named colour (if named);
    * colors: the largest object of the shape has the colour;
    * color_attr: each (shape, colour) is present, on different objects;
    * position: the largest match of object 0 stands in ``relation`` to the largest other match
      of object 1 (GenEval's centre-offset rule with margin :data:`POSITION_MARGIN`).
    """
    validate_spec(spec)
    cat, objs = spec["category"], spec["objects"]
    # The toy world is clutter-free: a scene holds exactly the objects its prompt names. An image
    # with unrecognisable blobs or more objects than named fails every category (stricter than
    # GenEval, whose photos hold other things; here it stops noise from passing presence tests).
    unknown = [t for t in detections if t.shape == "unknown"]
    if unknown:
        return False, f"{len(unknown)} unrecognisable blob(s)"
    named = sum(int(o.get("count", 1)) for o in objs)
    if len(detections) > named:
        return False, f"{len(detections)} objects found, the prompt names {named}"
    if cat in ("single_object", "two_object"):
        for o in objs:
            if not _matches(detections, o["shape"]):
                return False, f"no {o['shape']} found"
        return True, "all shapes present"
    if cat == "counting":
        o = objs[0]
        found = _matches(detections, o["shape"])
        if len(found) != o["count"]:
            return False, f"found {len(found)} {o['shape']}(s), expected {o['count']}"
        wrong = [t.colour for t in found if o["colour"] is not None and t.colour != o["colour"]]
        if wrong:
            return False, f"{len(wrong)} {o['shape']}(s) are not {o['colour']} ({', '.join(wrong)})"
        return True, "count and colour correct"
    if cat == "colors":
        o = objs[0]
        found = _matches(detections, o["shape"])
        if not found:
            return False, f"no {o['shape']} found"
        if found[0].colour != o["colour"]:
            return False, f"the {o['shape']} is {found[0].colour}, expected {o['colour']}"
        return True, "colour correct"
    if cat == "color_attr":
        used: set[int] = set()
        for o in objs:
            cands = [t for t in _matches(detections, o["shape"], o["colour"]) if id(t) not in used]
            if not cands:
                have = sorted({t.colour for t in _matches(detections, o["shape"])})
                return False, f"no {o['colour']} {o['shape']} (found {o['shape']}s in: {have or 'none'})"
            used.add(id(cands[0]))
        return True, "attributes bound correctly"
    # position
    a_spec, b_spec = objs
    a_found = _matches(detections, a_spec["shape"], a_spec["colour"])
    if not a_found:
        return False, f"no {a_spec['colour'] or ''} {a_spec['shape']} (object A)".replace("  ", " ")
    a = a_found[0]
    b_found = [t for t in _matches(detections, b_spec["shape"], b_spec["colour"]) if t is not a]
    if not b_found:
        return False, f"no {b_spec['colour'] or ''} {b_spec['shape']} (object B)".replace("  ", " ")
    rel = relations_between(a.bbox, b_found[0].bbox, POSITION_MARGIN)
    if spec["relation"] not in rel:
        return False, f"A is {sorted(rel) or 'not clearly placed'} relative to B, expected {spec['relation']}"
    return True, "relation holds"


def score(image: Any, spec: dict[str, Any]) -> bool:
    """True when ``image`` satisfies ``spec`` under the GenEval rules of :func:`check`."""
    return check(detect(image), spec)[0]


def evaluate(images: Iterable[Any], specs: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Per-category accuracy and ``overall`` = mean of the per-category accuracies (GenEval).

    Returns ``{category: accuracy, ..., "overall": float, "counts": {category: n}, "num_images": N}``
    with only the categories that occur; ``overall`` averages those (a warning is logged when
    some of the six are missing, since the number is then not comparable).
    """
    specs = list(specs)
    return tabulate([score(image, spec) for image, spec in zip(images, specs, strict=True)], specs)


def tabulate(passed: Sequence[bool], specs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:func:`evaluate`'s table from per-image outcomes already judged (``passed[i]`` for ``specs[i]``)."""
    hits: dict[str, list[bool]] = {}
    for ok, spec in zip(passed, specs, strict=True):
        hits.setdefault(spec["category"], []).append(bool(ok))
    result: dict[str, Any] = {}
    for cat in CATEGORIES:
        if cat in hits:
            result[cat] = float(np.mean(hits[cat]))
    missing = [c for c in CATEGORIES if c not in hits]
    if missing and hits:
        logger.warning("evaluation has no images for %s; 'overall' averages the other categories", ", ".join(missing))
    result["overall"] = float(np.mean([result[c] for c in hits])) if hits else float("nan")
    result["counts"] = {c: len(hits[c]) for c in CATEGORIES if c in hits}
    result["num_images"] = len(passed)
    return result


def degrade(image: np.ndarray, rng: np.random.Generator, sigma: float = 1.0, noise_std: float = 8.0) -> np.ndarray:
    """Gaussian blur (``sigma`` px) plus Gaussian noise (``noise_std`` in 0-255 units): a stand-in
    for the softness and grain of images decoded by a VAE, used to test the judge's robustness."""
    x = np.asarray(image, dtype=np.float32)
    if sigma > 0:
        x = ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest")
    if noise_std > 0:
        x = x + rng.normal(0.0, noise_std, size=x.shape).astype(np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Directories of samples
# ----------------------------------------------------------------------------------------------

_LEADING_INT = re.compile(r"^(\d+)")


class ToyEvalInputError(StageVarError, ValueError):
    """A prompts file or samples folder that :func:`evaluate_directory` cannot use."""


def _read_prompts(prompts_file: Path) -> list[dict[str, Any]]:
    """Entries ``{"prompt", "spec", "file"}`` of a JSONL or plain-text prompts file."""
    if not prompts_file.is_file():
        raise ToyEvalInputError(f"prompts file {prompts_file} does not exist")
    numbered = [(no, ln.strip()) for no, ln in enumerate(prompts_file.read_text(encoding="utf-8").splitlines(), 1)]
    numbered = [(no, ln) for no, ln in numbered if ln and not ln.startswith("#")]
    is_jsonl = bool(numbered) and numbered[0][1].startswith("{")
    entries = []
    for no, ln in numbered:
        try:
            if is_jsonl:
                try:
                    rec = json.loads(ln)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or ("prompt" not in rec and "spec" not in rec):
                    raise ValueError("needs a 'prompt' (or 'spec') field")
                spec = rec.get("spec") or parse_prompt(rec["prompt"])
                validate_spec(spec)
                entries.append({"prompt": rec.get("prompt"), "spec": spec, "file": rec.get("file")})
            else:
                entries.append({"prompt": ln, "spec": parse_prompt(ln), "file": None})
        except ValueError as e:
            raise ToyEvalInputError(f"{prompts_file}, line {no}: {e}") from None
    return entries


def evaluate_directory(images_dir: str | os.PathLike, prompts_file: str | os.PathLike) -> dict[str, Any]:
    """Judge a folder of PNG samples against their prompts; returns :func:`evaluate`'s dict plus
    ``"missing"`` (prompts without any image).

    ``prompts_file`` is either JSONL, one ``{"file": "x.png", "prompt": "..."}`` per line (``file``
    relative to ``images_dir``; a ``"spec"`` field, if present, is used instead of parsing), or
    plain text with one prompt per line (blank lines and ``#`` comments skipped). For plain text,
    prompt ``i`` (0-based) owns every PNG whose relative path starts with the integer ``i``:
    ``00012.png``, ``12_3.png`` or GenEval's ``00012/samples/0003.png``; several samples per
    prompt are scored individually. A JSONL line without ``file`` uses the same index rule.
    """
    from stagevar.io import read_png

    root = Path(images_dir)
    pfile = Path(prompts_file)
    if not root.is_dir():
        raise ToyEvalInputError(f"images directory {root} does not exist (pass the folder holding the PNG samples)")
    entries = _read_prompts(pfile)
    by_index: dict[int, list[Path]] = {}
    for p in sorted(root.rglob("*.png")):
        m = _LEADING_INT.match(p.relative_to(root).parts[0])
        if m:
            by_index.setdefault(int(m.group(1)), []).append(p)
    paths, specs, missing = [], [], 0
    for i, ent in enumerate(entries):
        files = [root / ent["file"]] if ent.get("file") else by_index.get(i, [])
        files = [f for f in files if f.is_file()]
        if not files:
            missing += 1
            logger.warning("no image for prompt %d (%r) in %s", i, ent.get("prompt"), root)
            continue
        paths.extend(files)
        specs.extend([ent["spec"]] * len(files))
    logger.info("judging %d images for %d prompts from %s", len(paths), len(entries), root)
    result = evaluate((read_png(p) for p in paths), specs)  # one image in memory at a time
    result["missing"] = missing
    return result
