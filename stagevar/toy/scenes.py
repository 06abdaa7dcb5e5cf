"""Procedural scenes for the toy text-to-image model: a few flat shapes on a light background.

The world is deliberately small (3 shapes x 6 colours x 3 sizes, 1-4 objects) so that a
miniature Infinity-style model can learn it on a CPU, and so that an analytic judge
(:mod:`stagevar.toy.evaluate`) can read the generated images back without a neural detector.
Everything here is chosen to make that read-back easy and unambiguous:

* colours are far apart in RGB and highly saturated, while backgrounds are light and nearly
  grey, so "object vs background" and "which colour" are separable by simple geometry in RGB;
* shapes have very different bounding-box fill ratios (circle pi/4, square 1, triangle 1/2);
* objects never overlap and keep a gap, so connected components are objects.

This module is imported at generation time and therefore depends on numpy only (no scipy).

Coordinates are fractions of the canvas: ``cx`` grows to the right, ``cy`` grows downwards
(image row order), both in ``[0, 1]``; ``cx, cy`` is the centre of the object's bounding box.
Rendering is deterministic: the same :class:`Scene` gives the same bytes at a given ``size``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Iterable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

#: Named object colours. Chosen saturated and mutually distant (closest pair: yellow/orange, about
#: 22 degrees apart as seen from the background), so blur, noise and VAE drift keep them apart.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 0),
    "purple": (135, 45, 185),
    "orange": (250, 120, 0),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)

#: Side of the object's bounding box as a fraction of the canvas side. The smallest one is still
#: about 10 px at 64 px resolution, enough for the judge to tell the shapes apart after blur.
SIZES: dict[str, float] = {"small": 0.16, "medium": 0.22, "large": 0.30}

#: Light, nearly neutral backgrounds: the judge finds objects as saturated deviations from them.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (246, 246, 244),
    "ivory": (245, 242, 228),
    "lightgray": (226, 226, 224),
    "mist": (230, 236, 242),
}
TEXTURES: tuple[str, ...] = ("plain", "gradient", "noise")

#: Peak amplitude (0-255 units) of the background textures; low so they never look like objects.
TEXTURE_AMPLITUDE = 7.0
#: Minimum empty space between two objects' bounding boxes and between a box and the border
#: (fractions of the canvas); keeps blurred objects from merging into one blob.
OBJECT_GAP = 0.05
BORDER_MARGIN = 0.04
#: Supersampling factor per axis for anti-aliasing (16 samples per pixel).
SUPERSAMPLE = 4


def _check_name(kind: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}; expected one of: {', '.join(allowed)}")


@dataclasses.dataclass(frozen=True)
class Obj:
    """One flat object; ``size`` is a name from :data:`SIZES`, ``cx, cy`` its box centre in [0, 1]."""

    shape: str
    colour: str
    size: str
    cx: float
    cy: float

    def __post_init__(self) -> None:
        _check_name("shape", self.shape, SHAPES)
        _check_name("colour", self.colour, COLOURS)
        _check_name("size", self.size, SIZES)
        for name in ("cx", "cy"):
            v = float(getattr(self, name))
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"Obj.{name}={v} is outside [0, 1] (coordinates are canvas fractions)")
            object.__setattr__(self, name, v)

    @property
    def side(self) -> float:
        """Bounding-box side as a fraction of the canvas."""
        return SIZES[self.size]

    def box(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` of the bounding box in canvas fractions."""
        h = self.side / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Scene:
    """A complete, renderable description of one image.

    ``objects`` may be given as any sequence; it is stored as a tuple so the scene stays hashable.
    ``texture_seed`` seeds the background texture, so the scene alone fixes every pixel.
    """

    objects: tuple[Obj, ...] = ()
    background: str = "white"
    texture: str = "plain"
    texture_seed: int = 0

    def __post_init__(self) -> None:
        objs = tuple(self.objects)
        for o in objs:
            if not isinstance(o, Obj):
                raise TypeError(f"Scene.objects must hold Obj instances, got {type(o).__name__}")
        object.__setattr__(self, "objects", objs)
        _check_name("background", self.background, BACKGROUNDS)
        _check_name("texture", self.texture, TEXTURES)
        object.__setattr__(self, "texture_seed", int(self.texture_seed))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (round-trips through :meth:`from_dict`)."""
        return {
            "objects": [o.to_dict() for o in self.objects],
            "background": self.background,
            "texture": self.texture,
            "texture_seed": self.texture_seed,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        return cls(
            objects=tuple(Obj(**o) for o in d.get("objects", ())),
            background=d.get("background", "white"),
            texture=d.get("texture", "plain"),
            texture_seed=int(d.get("texture_seed", 0)),
        )


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _background(scene: Scene, size: int) -> np.ndarray:
    """Float (size, size, 3) background; textures are defined on the unit square so they look the
    same at every resolution."""
    base = np.asarray(BACKGROUNDS[scene.background], dtype=np.float64)
    img = np.broadcast_to(base, (size, size, 3)).copy()
    if scene.texture == "plain":
        return img
    rng = np.random.default_rng(scene.texture_seed)
    t = (np.arange(size, dtype=np.float64) + 0.5) / size
    if scene.texture == "gradient":
        theta = rng.uniform(0.0, 2.0 * np.pi)
        field = (t[None, :] - 0.5) * np.cos(theta) + (t[:, None] - 0.5) * np.sin(theta)
        field = field / 0.7071  # the extreme corners reach +-1
    else:  # "noise": smooth blotches, bilinear upsampling of a coarse random grid
        grid = 6
        coarse = rng.standard_normal((grid, grid))
        coarse /= max(np.abs(coarse).max(), 1e-9)
        u = t * (grid - 1)
        i0 = np.clip(np.floor(u).astype(int), 0, grid - 2)
        f = u - i0
        rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]          # (size, grid)
        field = rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]      # (size, size)
    tint = 1.0 + 0.15 * rng.standard_normal(3)  # a hint of colour variation, still near-neutral
    img += TEXTURE_AMPLITUDE * field[:, :, None] * tint[None, None, :]
    return img


def _coverage(obj: Obj, size: int) -> tuple[slice, slice, np.ndarray]:
    """Anti-aliased coverage of one object inside its pixel bounding box.

    Supersamples :data:`SUPERSAMPLE`^2 points per pixel and box-averages them, which is what a
    camera with a square pixel aperture would record for a perfectly sharp shape.
    """
    half = obj.side * size / 2
    cx, cy = obj.cx * size, obj.cy * size
    x0 = max(int(np.floor(cx - half)) - 1, 0)
    x1 = min(int(np.ceil(cx + half)) + 1, size)
    y0 = max(int(np.floor(cy - half)) - 1, 0)
    y1 = min(int(np.ceil(cy + half)) + 1, size)
    ss = SUPERSAMPLE
    xs = x0 + (np.arange((x1 - x0) * ss) + 0.5) / ss
    ys = y0 + (np.arange((y1 - y0) * ss) + 0.5) / ss
    X = xs[None, :] - cx
    Y = ys[:, None] - cy
    if obj.shape == "circle":
        inside = X * X + Y * Y <= half * half
    elif obj.shape == "square":
        inside = (np.abs(X) <= half) & (np.abs(Y) <= half)
    else:  # triangle: apex at the top centre, base along the bottom of the box
        inside = (Y <= half) & (np.abs(X) <= (Y + half) / 2)
    cov = inside.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    return slice(y0, y1), slice(x0, x1), cov


def render(scene: Scene, size: int = 128) -> np.ndarray:
    """Render ``scene`` to a ``(size, size, 3)`` uint8 RGB image (deterministic, anti-aliased)."""
    if int(size) != size or size < 16:
        raise ValueError(f"render size must be an integer >= 16, got {size!r}")
    size = int(size)
    img = _background(scene, size)
    for obj in scene.objects:
        ys, xs, cov = _coverage(obj, size)
        colour = np.asarray(PALETTE[obj.colour], dtype=np.float64)
        region = img[ys, xs]
        img[ys, xs] = region * (1.0 - cov[:, :, None]) + colour * cov[:, :, None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Layout (seeded rejection sampling)
# ----------------------------------------------------------------------------------------------


def boxes_separated(a: Obj, b: Obj, gap: float = OBJECT_GAP) -> bool:
    """True when the two bounding boxes are at least ``gap`` apart along some axis."""
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return (ax1 + gap <= bx0) or (bx1 + gap <= ax0) or (ay1 + gap <= by0) or (by1 + gap <= ay0)


def layout(
    items: Sequence[tuple[str, str, str]],
    rng: np.random.Generator,
    accept: Callable[[tuple[Obj, ...]], bool] | None = None,
    max_tries: int = 4000,
) -> tuple[Obj, ...]:
    """Place ``(shape, colour, size)`` items at random non-overlapping positions.

    Objects are placed one at a time (each with up to ``max_tries`` candidate positions) and the
    whole layout is redrawn when it gets stuck or when ``accept`` (a constraint on the finished
    layout, e.g. "A left of B") rejects it. Raises ``RuntimeError`` if nothing fits, which only
    happens for impossible requests (e.g. many large objects).
    """
    for _attempt in range(200):
        placed: list[Obj] = []
        for shape, colour, size in items:
            side = SIZES[size]
            lo, hi = BORDER_MARGIN + side / 2, 1.0 - BORDER_MARGIN - side / 2
            for _ in range(max_tries // 20):
                cand = Obj(shape, colour, size, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
                if all(boxes_separated(cand, p) for p in placed):
                    placed.append(cand)
                    break
            else:
                break
        if len(placed) == len(items) and (accept is None or accept(tuple(placed))):
            return tuple(placed)
    raise RuntimeError(f"could not lay out {list(items)} without overlap (try smaller sizes or fewer objects)")


def random_sizes(n: int, rng: np.random.Generator) -> list[str]:
    """Sizes for ``n`` objects; crowded scenes avoid 'large' so every layout fits comfortably."""
    names = list(SIZES)
    allowed = names if n <= 2 else names[:2]
    return [allowed[int(i)] for i in rng.integers(0, len(allowed), size=n)]


def random_background(rng: np.random.Generator) -> dict[str, Any]:
    """Keyword arguments of :class:`Scene` for a random background (name, texture, seed)."""
    return {
        "background": list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
        "texture": TEXTURES[int(rng.integers(len(TEXTURES)))],
        "texture_seed": int(rng.integers(0, 2**31 - 1)),
    }


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A random scene of 1-4 objects (any shapes/colours), e.g. for renderer tests and demos."""
    n = int(rng.integers(1, 5)) if n_objects is None else int(n_objects)
    if not 1 <= n <= 4:
        raise ValueError(f"n_objects must be in 1..4, got {n}")
    shapes = [SHAPES[int(i)] for i in rng.integers(0, len(SHAPES), size=n)]
    colours = [COLOURS[int(i)] for i in rng.integers(0, len(COLOURS), size=n)]
    items = list(zip(shapes, colours, random_sizes(n, rng)))
    bg = random_background(rng)
    return Scene(objects=layout(items, rng), **bg)
