"""ImageNet-1k class names for the class-conditional models (``var-*``).

The table (``imagenet_classes.tsv``, next to this file) maps each ILSVRC2012 class index to its
WordNet synonyms, e.g. ``207 -> golden retriever``, ``1 -> goldfish, Carassius auratus``.
:func:`class_id` resolves a user's name to an index:

1. case-insensitive match on the *first* synonym (the class's name) of exactly one class;
2. otherwise, case-insensitive match on any synonym of exactly one class;
3. a name shared by several classes is settled by an exact, case-sensitive match if that is
   unique (``"Cardigan"`` is the corgi, 264; ``"cardigan"`` the sweater, 474);
4. anything still ambiguous (``"crane"``: the bird 134 or the machine 517) raises
   :class:`~stagevar.models.base.ConditionError` listing the candidates; an unknown name raises
   one with the closest names.

Spaces, underscores and repeated blanks are equivalent (``golden_retriever``).
"""
from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path

from stagevar.models.base import ConditionError

__all__ = ["class_id", "class_name", "class_synonyms", "NUM_CLASSES"]

NUM_CLASSES = 1000
_TABLE = Path(__file__).with_name("imagenet_classes.tsv")


def _norm(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name).strip()


@functools.lru_cache(maxsize=1)
def _table() -> tuple[tuple[str, ...], ...]:
    rows: dict[int, tuple[str, ...]] = {}
    for line in _TABLE.read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#"):
            continue
        idx, names = line.split("\t")
        rows[int(idx)] = tuple(_norm(n) for n in names.split(","))
    if sorted(rows) != list(range(NUM_CLASSES)):
        raise RuntimeError(f"{_TABLE} is damaged: expected class ids 0..{NUM_CLASSES - 1}")
    return tuple(rows[i] for i in range(NUM_CLASSES))


@functools.lru_cache(maxsize=1)
def _index() -> tuple[dict[str, set[int]], dict[str, set[int]], dict[str, set[int]]]:
    primary: dict[str, set[int]] = {}
    any_name: dict[str, set[int]] = {}
    exact: dict[str, set[int]] = {}
    for i, names in enumerate(_table()):
        primary.setdefault(names[0].lower(), set()).add(i)
        for n in names:
            any_name.setdefault(n.lower(), set()).add(i)
            exact.setdefault(n, set()).add(i)
    return primary, any_name, exact


def class_synonyms(idx: int) -> tuple[str, ...]:
    """All WordNet synonyms of class ``idx`` (the first is its name)."""
    if not 0 <= int(idx) < NUM_CLASSES:
        raise ConditionError(f"ImageNet class id {idx} is out of range 0..{NUM_CLASSES - 1}")
    return _table()[int(idx)]


def class_name(idx: int) -> str:
    """The name of class ``idx`` (its first synonym), e.g. ``class_name(207) == 'golden retriever'``."""
    return class_synonyms(idx)[0]


def class_id(name: str) -> int:
    """ImageNet class index of ``name`` (see the module docstring for the rules).

    >>> class_id("golden retriever"), class_id("Tinca tinca"), class_id("Cardigan")
    (207, 0, 264)
    """
    key = _norm(str(name))
    low = key.lower()
    primary, any_name, exact = _index()
    for table in (primary, any_name):
        hits = table.get(low, set())
        if len(hits) == 1:
            return next(iter(hits))
    if hits:                                   # any_name's: a name of several classes
        exact_hits = exact.get(key, set())
        if len(exact_hits) == 1:
            return next(iter(exact_hits))
        options = "; ".join(f"{i} ({', '.join(_table()[i][:3])})" for i in sorted(hits))
        raise ConditionError(f"ImageNet class name {name!r} is ambiguous: it names classes {options}. "
                             "Give the class id instead (e.g. 'class 134') or a more specific synonym.")
    close = difflib.get_close_matches(low, list(any_name), n=3, cutoff=0.75)
    hint = ("; closest names: " + ", ".join(f"{c!r} ({min(any_name[c])})" for c in close)) if close else ""
    raise ConditionError(f"unknown ImageNet class name {name!r}{hint}. Prompts for class-conditional models are "
                         "ImageNet class names (e.g. 'golden retriever'), ids ('207', 'class 207') or 'unconditional'.")
