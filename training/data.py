"""The training data: an endless, deterministic stream of (prompt, scene) pairs of the ``train``
split (never stored; rendered on the fly, optionally by a process pool), and alternative scenes
of a prompt."""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from stagevar.errors import StageVarError


class SceneStream:
    """Endless deterministic stream of (prompt, image) pairs from the ``train`` split grammar."""

    CHUNK = 4096

    def __init__(self, seed: int, image_size: int, workers: int = 0, category_weights: dict[str, float] | None = None):
        from stagevar.toy.prompts import CATEGORIES
        self.seed, self.size = int(seed), int(image_size)
        self.chunk, self.pos, self.items = 0, 0, None
        self.last_items: list[dict[str, Any]] = []
        self.workers = int(workers)
        self._pool = None
        self.weights = {str(k): float(v) for k, v in (category_weights or {}).items()}
        bad = sorted(k for k, v in self.weights.items() if k not in CATEGORIES or not v > 0)
        if bad:
            raise StageVarError(f"train.category_weights: {', '.join(bad)}: each key must be one of "
                             f"{', '.join(CATEGORIES)} with a positive weight (categories not named weigh 1)")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def state(self) -> dict[str, int]:
        return {"chunk": self.chunk, "pos": self.pos}

    def load_state(self, st: dict[str, int]) -> None:
        self.chunk, self.pos, self.items = int(st["chunk"]), int(st["pos"]), None

    def _chunk_items(self) -> list[dict[str, Any]]:
        """One chunk of the stream. With ``category_weights`` the chunk is drawn from a split
        ``max(weight)`` times larger, keeping each item with probability ``weight / max(weight)``
        of its category (distinct items, not repeats); without, the split itself."""
        from stagevar.toy.prompts import make_split
        top = max([1.0, *self.weights.values()])
        items = make_split("train", math.ceil(self.CHUNK * top), self.seed * 100_003 + self.chunk)
        if not self.weights:
            return items
        rng = np.random.default_rng([self.seed, self.chunk, 1])
        keep = rng.random(len(items))
        return [it for it, u in zip(items, keep) if u < self.weights.get(it["spec"]["category"], 1.0) / top]

    def _next_item(self) -> dict[str, Any]:
        if self.items is None:
            self.items = self._chunk_items()
        it = self.items[self.pos]
        self.pos += 1
        if self.pos == len(self.items):
            self.chunk, self.pos, self.items = self.chunk + 1, 0, None
        return it

    def batch(self, n: int) -> tuple[list[str], torch.Tensor]:
        """The next ``n`` pairs; with ``workers`` > 0 a process pool renders them (the same images)."""
        items = [self._next_item() for _ in range(n)]
        self.last_items = items
        jobs = [(it, self.size) for it in items]
        if self.workers > 0:
            if self._pool is None:
                import multiprocessing
                self._pool = multiprocessing.get_context("spawn").Pool(self.workers)
            imgs = self._pool.map(_render_item, jobs, chunksize=max(1, n // (4 * self.workers)))
        else:
            imgs = [_render_item(j) for j in jobs]
        return [it["prompt"] for it in items], _image_batch(imgs)


def alternative_scenes(items: list[dict[str, Any]], k: int, size: int) -> torch.Tensor:
    """``k`` more ground-truth scenes of each item's prompt (other layouts, sizes, backgrounds and
    unnamed colours; deterministic in the item's seed): (len(items) * k, 3, size, size) in [-1, 1],
    item-major."""
    from stagevar.toy.prompts import scene_for_spec
    from stagevar.toy.scenes import render
    imgs = [render(scene_for_spec(it["spec"], np.random.default_rng([int(it["seed"]), 7919, j])), size)
            for it in items for j in range(k)]
    return _image_batch(imgs)


def _image_batch(imgs: list[np.ndarray]) -> torch.Tensor:
    """Rendered uint8 HWC images -> (B, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _render_item(job: tuple[dict[str, Any], int]) -> np.ndarray:
    from stagevar.toy.prompts import scene_for_item
    from stagevar.toy.scenes import render
    item, size = job
    return render(scene_for_item(item), size)
