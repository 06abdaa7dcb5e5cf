"""The prompt grammar of the toy world, its machine-readable specs, tokens and dataset splits.

Six prompt categories mirror GenEval (see ``GRAMMAR.md`` for the full grammar):

=================  ===============================================  ===========================
category           canonical prompt                                 what the judge tests
=================  ===============================================  ===========================
``single_object``  "a circle"                                       >= 1 circle
``two_object``     "a circle and a square"                          >= 1 of each shape
``counting``       "three green triangles"                          exactly 3 triangles, green
``colors``         "a red circle"                                   the (largest) circle is red
``position``       "a red circle left of a blue square"             relation between centres
``color_attr``     "a red square and a green circle"                colour bound to each shape
=================  ===============================================  ===========================

As in GenEval, ``single_object`` and ``two_object`` prompts name shapes only and ``colors`` /
``color_attr`` add the colours. That keeps every prompt's text unambiguous, so
:func:`parse_prompt` is an exact inverse of :func:`spec_to_prompt` and a plain list of prompts is
enough to evaluate a model. Every colour x shape pair occurs as a single-object prompt
(``colors``) in every split.

The *spec* (a JSON-able dict) is the contract between prompts, the scene generator and the
judge (:mod:`stagevar.toy.evaluate`)::

    {"category": "position",
     "objects": [{"shape": "circle", "colour": "red", "count": 1},
                 {"shape": "square", "colour": "blue", "count": 1}],
     "relation": "left of"}          # objects[0] <relation> objects[1]; None elsewhere

``colour`` is ``None`` where the prompt names no colour; ``count`` is 1 except in ``counting``.
"""
from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from .scenes import COLOURS, SHAPES, Obj, Scene, layout, random_background, random_sizes

logger = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
ARTICLES: tuple[str, ...] = ("a", "an")
MAX_COUNT = 4

#: (colour, shape) pairs that never occur inside a ``position`` or ``color_attr`` prompt of the
#: ``train``/``calibration`` splits; every ``position``/``color_attr`` prompt of ``heldout``
#: contains at least one. The pairs themselves stay seen as single objects (``colors``).
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("red", "triangle"), ("blue", "circle"), ("yellow", "square"), ("purple", "triangle")}
)
#: (count, colour, shape) triples that never occur as ``counting`` prompts outside ``heldout``;
#: every ``counting`` prompt of ``heldout`` is one of them.
HELDOUT_COUNTS: frozenset[tuple[int, str, str]] = frozenset(
    {(3, "red", "circle"), (2, "blue", "triangle"), (4, "green", "square"),
     (2, "yellow", "circle"), (3, "purple", "square"), (4, "orange", "triangle")}
)

SPLITS: tuple[str, ...] = ("train", "calibration", "heldout")
_SPLIT_STREAM = {name: i for i, name in enumerate(SPLITS)}

PAD = "<pad>"
PAD_ID = 0
MAX_TOKENS = 12
_WORDS = set(COLOURS) | set(SHAPES) | set(PLURALS.values()) | set(NUMBER_WORDS.values()) | set(ARTICLES) | {
    "and", "left", "right", "of", "above", "below"}
#: Sorted vocabulary; ``"<pad>"`` sorts first, so ``VOCAB[PAD_ID] == PAD``.
VOCAB: list[str] = sorted(_WORDS | {PAD})
assert VOCAB[PAD_ID] == PAD
_WORD_ID = {w: i for i, w in enumerate(VOCAB)}
_SINGULAR = {p: s for s, p in PLURALS.items()}
_COUNT_OF = {w: n for n, w in NUMBER_WORDS.items()}


# ----------------------------------------------------------------------------------------------
# Specs and their canonical text
# ----------------------------------------------------------------------------------------------


def _obj(shape: str, colour: str | None = None, count: int = 1) -> dict[str, Any]:
    return {"shape": shape, "colour": colour, "count": int(count)}


def make_spec(category: str, objects: list[dict[str, Any]], relation: str | None = None) -> dict[str, Any]:
    """Build and validate a spec (the single place that knows what a valid spec looks like)."""
    spec = {"category": category, "objects": [_obj(o["shape"], o.get("colour"), o.get("count", 1)) for o in objects],
            "relation": relation}
    validate_spec(spec)
    return spec


def validate_spec(spec: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the problem if ``spec`` is not one the grammar can express."""
    cat = spec.get("category")
    if cat not in CATEGORIES:
        raise ValueError(f"spec category {cat!r} is not one of: {', '.join(CATEGORIES)}")
    objs = spec.get("objects")
    n_expected = 2 if cat in ("two_object", "position", "color_attr") else 1
    if not isinstance(objs, list) or len(objs) != n_expected:
        raise ValueError(f"a {cat} spec needs {n_expected} object(s), got {objs!r}")
    for o in objs:
        if o.get("shape") not in SHAPES:
            raise ValueError(f"spec object shape {o.get('shape')!r} is not one of: {', '.join(SHAPES)}")
        if o.get("colour") is not None and o["colour"] not in COLOURS:
            raise ValueError(f"spec object colour {o['colour']!r} is not one of: {', '.join(COLOURS)} (or None)")
        cnt = o.get("count")
        if not isinstance(cnt, int) or not 1 <= cnt <= MAX_COUNT or (cat != "counting" and cnt != 1):
            raise ValueError(f"spec object count {cnt!r} is invalid for {cat} (1..{MAX_COUNT} in counting, else 1)")
    rel = spec.get("relation")
    if (cat == "position") != (rel is not None) or (rel is not None and rel not in RELATIONS):
        raise ValueError(f"spec relation {rel!r}: position needs one of {', '.join(RELATIONS)}; other categories None")
    coloured = [o.get("colour") is not None for o in objs]
    if cat in ("single_object", "two_object") and any(coloured):
        raise ValueError(f"{cat} prompts name no colour (use 'colors' / 'color_attr' for coloured objects)")
    if cat in ("colors", "color_attr") and not all(coloured):
        raise ValueError(f"{cat} needs a colour on every object")
    if cat == "two_object" and objs[0]["shape"] == objs[1]["shape"]:
        raise ValueError(f"two_object needs two different shapes (say 'two {PLURALS[objs[0]['shape']]}' instead)")
    if cat == "color_attr" and (objs[0]["shape"] == objs[1]["shape"] or objs[0]["colour"] == objs[1]["colour"]):
        raise ValueError("color_attr needs two different shapes with two different colours (else binding is untestable)")
    if cat == "position" and (objs[0]["shape"], objs[0]["colour"]) == (objs[1]["shape"], objs[1]["colour"]):
        raise ValueError("position needs two distinguishable objects (different shape or colour)")


def _np_text(o: dict[str, Any], counted: bool) -> str:
    words = []
    if counted:
        words.append(NUMBER_WORDS[o["count"]])
    first = o["colour"] or o["shape"]
    if not counted:
        words.append("an" if first[0] in "aeiou" else "a")
    if o["colour"]:
        words.append(o["colour"])
    words.append(PLURALS[o["shape"]] if counted and o["count"] > 1 else o["shape"])
    return " ".join(words)


def spec_to_prompt(spec: dict[str, Any]) -> str:
    """The canonical prompt text of a spec (what :func:`sample_prompt` returns)."""
    validate_spec(spec)
    cat, objs = spec["category"], spec["objects"]
    if cat == "counting":
        return _np_text(objs[0], counted=True)
    if cat in ("single_object", "colors"):
        return _np_text(objs[0], counted=False)
    joiner = spec["relation"] if cat == "position" else "and"
    return f"{_np_text(objs[0], False)} {joiner} {_np_text(objs[1], False)}"


def _choice(rng: np.random.Generator, seq) -> Any:
    return seq[int(rng.integers(len(seq)))]


def _two(rng: np.random.Generator, seq) -> tuple[Any, Any]:
    i, j = rng.choice(len(seq), size=2, replace=False)
    return seq[int(i)], seq[int(j)]


def sample_spec(category: str, rng: np.random.Generator) -> dict[str, Any]:
    """A uniformly random spec of ``category`` over the whole grammar (no split restrictions)."""
    if category == "single_object":
        return make_spec(category, [_obj(_choice(rng, SHAPES))])
    if category == "two_object":
        a, b = _two(rng, SHAPES)
        return make_spec(category, [_obj(a), _obj(b)])
    if category == "counting":
        return make_spec(category, [_obj(_choice(rng, SHAPES), _choice(rng, COLOURS), int(rng.integers(1, MAX_COUNT + 1)))])
    if category == "colors":
        return make_spec(category, [_obj(_choice(rng, SHAPES), _choice(rng, COLOURS))])
    if category == "color_attr":
        (s1, s2), (c1, c2) = _two(rng, SHAPES), _two(rng, COLOURS)
        return make_spec(category, [_obj(s1, c1), _obj(s2, c2)])
    if category == "position":
        while True:
            a = _obj(_choice(rng, SHAPES), _choice(rng, COLOURS))
            b = _obj(_choice(rng, SHAPES), _choice(rng, COLOURS))
            if (a["shape"], a["colour"]) != (b["shape"], b["colour"]):
                return make_spec(category, [a, b], _choice(rng, RELATIONS))
    raise ValueError(f"unknown category {category!r}; expected one of: {', '.join(CATEGORIES)}")


def sample_prompt(category: str, rng: np.random.Generator) -> tuple[str, dict[str, Any]]:
    """``(prompt_text, spec)`` for a random prompt of ``category`` (whole grammar, any split)."""
    spec = sample_spec(category, rng)
    return spec_to_prompt(spec), spec


# ----------------------------------------------------------------------------------------------
# Parsing and tokens
# ----------------------------------------------------------------------------------------------


def normalize(text: str) -> list[str]:
    """Lower-case words of ``text``; commas and a final full stop are ignored."""
    return re.sub(r"[,.;!]", " ", str(text).lower()).split()


def _unknown_error(unknown: list[str], text: str) -> ValueError:
    words = ", ".join(repr(w) for w in dict.fromkeys(unknown))
    vocab = ", ".join(w for w in VOCAB if w != PAD)
    return ValueError(f"unknown word(s) {words} in prompt {text!r}; the toy grammar knows only: {vocab}")


def _parse_np(words: list[str], text: str) -> tuple[int | None, str | None, str]:
    """``[a|an|one..four] [colour] shape(s)`` -> (count or None for an article, colour, shape)."""
    usage = "'[a|an|one|two|three|four] [colour] shape', e.g. 'a red circle' or 'three blue squares'"
    w = list(words)
    count: int | None = None
    if w and w[0] in ARTICLES:
        w.pop(0)
    elif w and w[0] in _COUNT_OF:
        count = _COUNT_OF[w.pop(0)]
    colour = w.pop(0) if w and w[0] in COLOURS else None
    if len(w) != 1 or (w[0] not in SHAPES and w[0] not in _SINGULAR):
        raise ValueError(f"cannot read {' '.join(words)!r} in prompt {text!r} as {usage}")
    return count, colour, _SINGULAR.get(w[0], w[0])


def parse_prompt(text: str) -> dict[str, Any]:
    """The spec of a prompt: the exact inverse of :func:`spec_to_prompt`, tolerant of case,
    whitespace, commas, a final full stop, 'a'/'an' mix-ups and 'one' used as an article inside
    two-object prompts. A prompt that *starts* with a number word is a ``counting`` prompt.

    Raises ``ValueError`` naming the unknown word(s) and listing the vocabulary, or naming the
    part that does not fit the grammar.
    """
    words = normalize(text)
    if not words:
        raise ValueError("empty prompt")
    unknown = [w for w in words if w not in _WORDS]
    if unknown:
        raise _unknown_error(unknown, text)
    # Find the connective: a relation (position) or 'and' (two objects).
    cuts = []
    for i, w in enumerate(words):
        if w in ("left", "right"):
            if i + 1 >= len(words) or words[i + 1] != "of":
                raise ValueError(f"{w!r} must be followed by 'of' in prompt {text!r}")
            cuts.append((i, 2, f"{w} of"))
        elif w in ("above", "below", "and"):
            cuts.append((i, 1, w))
        elif w == "of" and (i == 0 or words[i - 1] not in ("left", "right")):
            raise ValueError(f"'of' is only used in 'left of' / 'right of' (prompt {text!r})")
    if len(cuts) > 1:
        raise ValueError(f"prompt {text!r} joins more than two objects; the grammar allows one 'and' or one relation")
    if not cuts:
        count, colour, shape = _parse_np(words, text)
        if count is not None:
            return make_spec("counting", [_obj(shape, colour, count)])
        return make_spec("colors" if colour else "single_object", [_obj(shape, colour)])
    i, n, joiner = cuts[0]
    parts = [_parse_np(words[:i], text), _parse_np(words[i + n:], text)]
    for count, _, _ in parts:
        if count not in (None, 1):
            raise ValueError(f"counts are only allowed in single-object prompts (prompt {text!r})")
    objs = [_obj(shape, colour) for _, colour, shape in parts]
    if joiner != "and":
        return make_spec("position", objs, joiner)
    n_col = sum(o["colour"] is not None for o in objs)
    if n_col == 1:
        raise ValueError(f"prompt {text!r}: give both objects a colour (color_attr) or neither (two_object)")
    return make_spec("color_attr" if n_col == 2 else "two_object", objs)


def tokenize(text: str) -> list[int]:
    """Word ids into :data:`VOCAB`, right-padded with :data:`PAD_ID` to :data:`MAX_TOKENS`.

    Raises ``ValueError`` for unknown words (same message as :func:`parse_prompt`) and for prompts
    longer than :data:`MAX_TOKENS` words (the grammar's longest prompt has 8).
    """
    words = normalize(text)
    unknown = [w for w in words if w not in _WORDS]
    if unknown:
        raise _unknown_error(unknown, text)
    if len(words) > MAX_TOKENS:
        raise ValueError(f"prompt {text!r} has {len(words)} words; at most {MAX_TOKENS} fit the text encoder")
    ids = [_WORD_ID[w] for w in words]
    return ids + [PAD_ID] * (MAX_TOKENS - len(ids))


def detokenize(ids) -> str:
    """Inverse of :func:`tokenize` (pads dropped)."""
    return " ".join(VOCAB[int(i)] for i in ids if int(i) != PAD_ID)


# ----------------------------------------------------------------------------------------------
# Ground-truth scenes
# ----------------------------------------------------------------------------------------------

#: Ground-truth position scenes satisfy the relation with this (stricter than the judge's 0.1)
#: margin and with no second relation, so the picture says exactly one thing.
GT_POSITION_MARGIN = 0.2


def relations_between(a: tuple[float, float, float, float], b: tuple[float, float, float, float],
                      margin: float = 0.1) -> set[str]:
    """GenEval's relative position of box ``a`` to box ``b`` (boxes ``(x0, y0, x1, y1)``, y down).

    The centre offset is shrunk on each axis by ``margin`` x (sum of the two box extents) and a
    relation holds when the shrunk offset along its axis exceeds half of the full offset's length.
    """
    ca = np.array([(a[0] + a[2]) / 2, (a[1] + a[3]) / 2])
    cb = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    dims = np.array([a[2] - a[0] + b[2] - b[0], a[3] - a[1] + b[3] - b[1]])
    off = ca - cb
    norm = float(np.linalg.norm(off))
    rev = np.maximum(np.abs(off) - margin * dims, 0.0) * np.sign(off)
    if norm == 0.0 or np.all(np.abs(rev) < 1e-3):
        return set()
    dx, dy = rev / norm
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def scene_for_spec(spec: dict[str, Any], rng: np.random.Generator) -> Scene:
    """A random ground-truth :class:`Scene` that satisfies ``spec`` and contains nothing else.

    Unnamed colours are drawn at random (different objects may share one); sizes, positions and
    the background are random.
    """
    validate_spec(spec)
    cat, objs = spec["category"], spec["objects"]
    if cat == "counting":
        o = objs[0]
        n = o["count"]
        colour = o["colour"] or _choice(rng, COLOURS)
        names = [(o["shape"], colour)] * n
    else:
        names = [(o["shape"], o["colour"] or _choice(rng, COLOURS)) for o in objs]
    sizes = random_sizes(len(names), rng)
    items = [(s, c, z) for (s, c), z in zip(names, sizes)]
    accept = None
    if cat == "position":
        rel = spec["relation"]

        def accept(placed: tuple[Obj, ...]) -> bool:
            return relations_between(placed[0].box(), placed[1].box(), GT_POSITION_MARGIN) == {rel}

    bg = random_background(rng)
    return Scene(objects=layout(items, rng, accept=accept), **bg)


# ----------------------------------------------------------------------------------------------
# Negatives (specs the ground-truth scene must NOT satisfy)
# ----------------------------------------------------------------------------------------------

#: Which corruptions make sense per category (used for the judge's rejection tests).
PERTURBATIONS: dict[str, tuple[str, ...]] = {
    "single_object": ("wrong_shape",),
    "two_object": ("wrong_shape",),
    "counting": ("wrong_count", "wrong_colour", "wrong_shape"),
    "colors": ("wrong_colour", "wrong_shape"),
    "position": ("swapped_position", "wrong_colour", "wrong_shape"),
    "color_attr": ("swapped_binding", "wrong_colour", "wrong_shape"),
}


def perturb_spec(spec: dict[str, Any], kind: str, rng: np.random.Generator) -> dict[str, Any]:
    """A spec that differs from ``spec`` in exactly one tested attribute, so that a scene drawn for
    it must fail ``spec``: another shape or colour for one object, another count, the opposite
    relation, or the two colours swapped between the objects."""
    validate_spec(spec)
    cat = spec["category"]
    if kind not in PERTURBATIONS[cat]:
        raise ValueError(f"perturbation {kind!r} does not apply to {cat}; use one of {PERTURBATIONS[cat]}")
    objs = [dict(o) for o in spec["objects"]]
    relation = spec["relation"]
    if kind == "swapped_position":
        relation = OPPOSITE[relation]
    elif kind == "swapped_binding":
        objs[0]["colour"], objs[1]["colour"] = objs[1]["colour"], objs[0]["colour"]
    elif kind == "wrong_count":
        n = objs[0]["count"]  # off by one: the hardest count error to see
        choices = [m for m in (n - 1, n + 1) if 1 <= m <= MAX_COUNT]
        objs[0]["count"] = _choice(rng, choices)
    else:
        i = int(rng.integers(len(objs)))
        for _ in range(1000):
            new = dict(objs[i])
            if kind == "wrong_shape":
                new["shape"] = _choice(rng, [s for s in SHAPES if s != objs[i]["shape"]])
            else:
                new["colour"] = _choice(rng, [c for c in COLOURS if c != objs[i]["colour"]])
            trial = {"category": cat, "objects": objs[:i] + [new] + objs[i + 1:], "relation": relation}
            try:
                validate_spec(trial)  # keep the negative expressible (distinct shapes/colours etc.)
            except ValueError:
                continue
            return trial
        raise RuntimeError(f"no valid {kind} perturbation of {spec}")  # pragma: no cover
    out = {"category": cat, "objects": objs, "relation": relation}
    validate_spec(out)
    return out


# ----------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------


def is_heldout(spec: dict[str, Any]) -> bool:
    """True when ``spec`` contains a held-out combination (see :data:`HELDOUT_PAIRS`/`HELDOUT_COUNTS`)."""
    cat = spec["category"]
    if cat in ("position", "color_attr"):
        return any((o["colour"], o["shape"]) in HELDOUT_PAIRS for o in spec["objects"])
    if cat == "counting":
        o = spec["objects"][0]
        return (o["count"], o["colour"], o["shape"]) in HELDOUT_COUNTS
    return False


def _cycled(options: list, rng: np.random.Generator):
    """Endless stream over ``options`` in freshly shuffled rounds: a split covers every option
    once it holds a full round, instead of only with high probability."""
    while True:
        for i in rng.permutation(len(options)):
            yield options[int(i)]


def make_split(name: str, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` items ``{"prompt", "spec", "seed"}``, categories balanced round-robin.

    ``train`` and ``calibration`` never contain a held-out combination; in ``heldout`` every
    ``position``, ``color_attr`` and ``counting`` prompt contains one (the other categories have
    no held-out combinations). Small finite categories are drawn in shuffled rounds, so every
    split of ``n >= 108`` items holds every colour x shape pair as a ``colors`` prompt, every shape
    as a ``single_object`` prompt and every ordered shape pair as a ``two_object`` prompt (and
    ``heldout`` every held-out count triple once ``n >= 36``). Each split draws from its own random
    stream (``seed`` and the split name), so equal seeds still give different splits. ``seed`` of
    an item seeds :func:`scene_for_spec` for its ground-truth image (see :func:`scene_for_item`).
    """
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of: {', '.join(SPLITS)}")
    if n < 0:
        raise ValueError(f"split size must be >= 0, got {n}")
    rng = np.random.default_rng([int(seed), _SPLIT_STREAM[name]])
    streams = {
        "single_object": _cycled([[_obj(s)] for s in SHAPES], rng),
        "two_object": _cycled([[_obj(a), _obj(b)] for a in SHAPES for b in SHAPES if a != b], rng),
        "colors": _cycled([[_obj(s, c)] for c in COLOURS for s in SHAPES], rng),
    }
    if name == "heldout":
        streams["counting"] = _cycled([[_obj(s, c, k)] for k, c, s in sorted(HELDOUT_COUNTS)], rng)
    items = []
    for i in range(n):
        cat = CATEGORIES[i % len(CATEGORIES)]
        if cat in streams:
            spec = make_spec(cat, next(streams[cat]))
        else:
            for _ in range(10_000):
                spec = sample_spec(cat, rng)
                if is_heldout(spec) == (name == "heldout"):
                    break
            else:  # pragma: no cover - acceptance rates are >= 1/12
                raise RuntimeError(f"could not draw a {cat} prompt for split {name}")
        items.append({"prompt": spec_to_prompt(spec), "spec": spec, "seed": int(rng.integers(0, 2**63 - 1))})
    return items


def scene_for_item(item: dict[str, Any]) -> Scene:
    """The ground-truth scene of a :func:`make_split` item (deterministic in the item's seed)."""
    return scene_for_spec(item["spec"], np.random.default_rng(item["seed"]))
