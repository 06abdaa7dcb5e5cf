"""Random projection along the token axis (StageVAR, arXiv 2512.16483).

Late-scale features are close to low rank, so a scale's ``M`` tokens can be summarised by ``r``
projected tokens ``X_r = P X`` (``P``: r x M). We use a *local* random projection: the grid is cut
into ``r`` cells and row ``i`` of ``P`` is a random convex combination of the tokens of cell ``i``
(weights ``1 + u``, ``u ~ U(-1/2, 1/2)``, normalised to sum 1). Locality keeps each projected token
a valid sample of its neighbourhood, so it can be computed at the cell's representative position
(its centre token) with that position's RoPE, and its output placed there.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=256)
def _cell_grid(h: int, w: int, gh: int, gw: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ci = torch.arange(h, device=device) * gh // h
    cj = torch.arange(w, device=device) * gw // w
    cells = (ci[:, None] * gw + cj[None, :]).reshape(-1)
    # centre token of cell (a, b): middle of its row span and column span
    r0 = torch.arange(gh, device=device)
    c0 = torch.arange(gw, device=device)
    row_start = (r0 * h + gh - 1) // gh
    row_end = ((r0 + 1) * h + gh - 1) // gh
    col_start = (c0 * w + gw - 1) // gw
    col_end = ((c0 + 1) * w + gw - 1) // gw
    rc = (row_start + row_end) // 2
    cc = (col_start + col_end) // 2
    centres = (rc[:, None] * w + cc[None, :]).reshape(-1)
    return cells, centres


def cell_grid(h: int, w: int, gh: int, gw: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut an ``h x w`` grid into ``gh x gw`` cells.

    Returns ``cells`` (h*w,) the cell index of every token (row-major), and ``centres`` (gh*gw,)
    the token index of each cell's centre. Built once per grid and device (the tensors are shared:
    do not modify them).

    >>> cells, centres = cell_grid(4, 4, 2, 2)
    >>> cells.view(4, 4)[0].tolist(), centres.tolist()
    ([0, 0, 1, 1], [5, 7, 13, 15])
    """
    return _cell_grid(int(h), int(w), int(gh), int(gw), torch.device(device if device is not None else "cpu"))


def random_cell_projection(cells: torch.Tensor, num_cells: int, batch_size: int,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-token weights (B, M) such that the weights of each cell sum to 1 (random convex
    combinations). ``P[i, j] = weights[j]`` if ``cells[j] == i`` else 0. Drawn on the device of
    ``cells`` (``generator``, if given, must live there), so nothing waits for the host."""
    M = cells.shape[0]
    u = torch.rand(batch_size, M, generator=generator, device=cells.device) - 0.5
    wts = 1.0 + u
    sums = torch.zeros(batch_size, num_cells, device=cells.device).index_add_(1, cells, wts)
    return wts / sums[:, cells]
