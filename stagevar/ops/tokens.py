"""Token subsets: which tokens of a scale are computed, and how the others are restored.

Three selections (``ScalePlan.selection``):

* ``deviation`` (FastVAR, arXiv 2503.23367, "cached token pruning"): keep the tokens whose hidden
  state deviates most from the scale's mean, ``||x_i - mean(x)||^2`` - the high-frequency tokens.
* ``uniform``: a regular grid of representatives: the scale's ``h x w`` grid is cut into
  ``gh x gw`` cells and the token nearest each cell's centre is computed.
* ``random_projection`` (StageVAR, arXiv 2512.16483, low-rank late-scale features): the inputs are
  projected along the token axis onto ``r = gh*gw`` tokens, ``X_r = P X``, where ``P`` is a random
  sparse projection whose row ``i`` is a random convex combination of the tokens of cell ``i``
  (see :mod:`stagevar.ops.projection`). Output ``i`` is placed at the representative position of
  cell ``i`` (its centre token, whose RoPE position the computed token carries).

The cells make both grid-based selections spatially uniform; the count is rounded to a grid
(``gh = round(h*sqrt(keep))``, ``gw = round(n/gh)``), so ``r`` can differ slightly from ``keep*M``.
For the unconditional rows (guidance on) the conditional rows' choice is reused, so that the two
halves of every guided token pair are the same token.

Restoration (``ScalePlan.restore``), for every token that was not computed, at the layer boundary
``c`` where the subset ends (the previous scale's hidden states are upsampled bilinearly to this
scale's grid):

* ``cached_update``: ``x_c = x_a + up(prev_c - prev_a)`` - the token keeps its own input and
  receives the update the skipped layers made at the previous scale (FastVAR restores cached
  sub-layer outputs the same way);
* ``cached_output``: ``x_c = up(prev_c)``.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from stagevar.ops.projection import cell_layout, cell_sum, random_cell_projection


@dataclasses.dataclass
class Selection:
    """The computed subset of one scale. ``positions`` (rows, n) index the scale's tokens;
    ``weights`` (rows, M) and ``cells`` (M,) are set for projections (``None`` for a gather)."""

    positions: torch.Tensor
    cells: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    members: torch.Tensor | None = None           # (cells, S) tokens of each cell (projections)

    @property
    def count(self) -> int:
        return self.positions.shape[1]

    def apply(self, x_BLC: torch.Tensor) -> torch.Tensor:
        """The subset's input: gathered tokens, or the projected (mixed) tokens."""
        if self.weights is None:
            idx = self.positions.unsqueeze(-1).expand(-1, -1, x_BLC.shape[-1])
            return torch.gather(x_BLC, 1, idx)
        return cell_sum(x_BLC * self.weights.unsqueeze(-1).to(x_BLC.dtype), self.cells, self.members)


def grid_dims(h: int, w: int, n: int) -> tuple[int, int]:
    """The ``gh x gw`` cell grid a grid-based selection of about ``n`` of ``h x w`` tokens uses."""
    gh = max(1, min(h, round(h * math.sqrt(n / (h * w)))))
    return gh, max(1, min(w, round(n / gh)))


def grid_selection(method: str, hw: tuple[int, int], n: int, batch_size: int, rows: int, device=None,
                   generator: torch.Generator | None = None) -> Selection:
    """The ``uniform`` or ``random_projection`` subset of a scale: it does not depend on the hidden
    states, so an engine can build it before the scale runs (the projection's weights are drawn
    from ``generator``, on ``device``)."""
    h, w = hw
    gh, gw = grid_dims(h, w, n)
    cells, centres, members = cell_layout(h, w, gh, gw, device)
    pos = centres.unsqueeze(0).expand(rows, -1)
    if method == "uniform":
        return Selection(pos)
    if method == "random_projection":
        weights = random_cell_projection(cells, members, batch_size, generator)
        return Selection(pos, cells, weights.repeat(rows // batch_size, 1), members)
    raise ValueError(f"unknown selection {method!r}")


def deviation_selection(x_BLC: torch.Tensor, n: int, batch_size: int) -> Selection:
    """FastVAR's high-deviation tokens of the conditional rows, reused for the unconditional ones."""
    rows = x_BLC.shape[0]
    xc = x_BLC[:batch_size].float()
    score = (xc - xc.mean(dim=1, keepdim=True)).pow(2).sum(-1)             # (B, M)
    pos = score.topk(n, dim=1).indices.sort(dim=1).values
    return Selection(pos.repeat(rows // batch_size, 1))


def select_tokens(method: str, x_BLC: torch.Tensor, hw: tuple[int, int], n: int, batch_size: int,
                  generator: torch.Generator | None = None) -> Selection:
    """Choose ``n`` tokens (about ``n`` for grid methods) of a scale with grid ``hw``.

    ``x_BLC`` is the hidden state at the first layer of the subset, rows = B or 2B (cond first).
    ``generator`` (on the device of ``x_BLC``) draws the random projection.

    >>> x = torch.zeros(1, 4, 1); x[0, 2, 0] = 5.0
    >>> select_tokens("deviation", x, (2, 2), 1, 1).positions.tolist()
    [[2]]
    """
    if method == "deviation":
        return deviation_selection(x_BLC, n, batch_size)
    return grid_selection(method, hw, n, batch_size, x_BLC.shape[0], x_BLC.device, generator)


def upsample_hidden(prev_BLC: torch.Tensor, prev_hw: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Previous scale's hidden states (rows, h'*w', C) -> (rows, h*w, C), bilinear."""
    rows, _, C = prev_BLC.shape
    g = prev_BLC.transpose(1, 2).reshape(rows, C, *prev_hw)
    g = F.interpolate(g.float(), size=hw, mode="bilinear", align_corners=False).to(prev_BLC.dtype)
    return g.reshape(rows, C, -1).transpose(1, 2)


def restore_tokens(mode: str, sel: Selection, x_sub: torch.Tensor, x_start_full: torch.Tensor,
                   prev_start_up: torch.Tensor, prev_end_up: torch.Tensor) -> torch.Tensor:
    """Full-grid hidden states at the end of the subset: computed tokens at their positions, the
    others restored (``cached_update`` or ``cached_output``, see the module docstring)."""
    if mode == "cached_update":
        full = x_start_full + (prev_end_up - prev_start_up)
    elif mode == "cached_output":
        full = prev_end_up.clone()
    else:
        raise ValueError(f"unknown restore mode {mode!r}")
    idx = sel.positions.unsqueeze(-1).expand(-1, -1, full.shape[-1])
    return full.scatter(1, idx, x_sub.to(full.dtype))
