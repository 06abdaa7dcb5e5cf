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
def _cell_grid(h: int, w: int, gh: int, gw: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ci = torch.arange(h) * gh // h
    cj = torch.arange(w) * gw // w
    cells = (ci[:, None] * gw + cj[None, :]).reshape(-1)
    # centre token of cell (a, b): middle of its row span and column span
    r0 = torch.arange(gh)
    c0 = torch.arange(gw)
    row_start = (r0 * h + gh - 1) // gh
    row_end = ((r0 + 1) * h + gh - 1) // gh
    col_start = (c0 * w + gw - 1) // gw
    col_end = ((c0 + 1) * w + gw - 1) // gw
    rc = (row_start + row_end) // 2
    cc = (col_start + col_end) // 2
    centres = (rc[:, None] * w + cc[None, :]).reshape(-1)
    # the tokens of every cell in token order, padded with M (an index past the last token)
    members: list[list[int]] = [[] for _ in range(gh * gw)]
    for j, c in enumerate(cells.tolist()):
        members[c].append(j)
    width = max(len(m) for m in members)
    padded = torch.tensor([m + [h * w] * (width - len(m)) for m in members], dtype=torch.long)
    return cells.to(device), centres.to(device), padded.to(device)


def cell_grid(h: int, w: int, gh: int, gw: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut an ``h x w`` grid into ``gh x gw`` cells.

    Returns ``cells`` (h*w,) the cell index of every token (row-major), and ``centres`` (gh*gw,)
    the token index of each cell's centre. Built once per grid and device (the tensors are shared:
    do not modify them).

    >>> cells, centres = cell_grid(4, 4, 2, 2)
    >>> cells.view(4, 4)[0].tolist(), centres.tolist()
    ([0, 0, 1, 1], [5, 7, 13, 15])
    """
    cells, centres, _ = cell_layout(h, w, gh, gw, device)
    return cells, centres


def cell_layout(h: int, w: int, gh: int, gw: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cell_grid`'s ``cells`` and ``centres``, and ``members`` (gh*gw, S): the tokens of every
    cell in token order, padded with ``h*w`` (see :func:`cell_sum`).

    >>> cell_layout(2, 3, 1, 2)[2].tolist()
    [[0, 1, 3, 4], [2, 5, 6, 6]]
    """
    return _cell_grid(int(h), int(w), int(gh), int(gw), torch.device(device if device is not None else "cpu"))


def cell_sum(values: torch.Tensor, cells: torch.Tensor, members: torch.Tensor, ordered: bool | None = None) -> torch.Tensor:
    """``out[:, i]`` = the sum of ``values[:, j]`` over the tokens ``j`` of cell ``i``, in token
    order: (rows, M, ...) -> (rows, cells, ...). ``members``: :func:`cell_members` of the grid.

    ``index_add_`` does this sequentially on a CPU; on CUDA it accumulates with atomics in whatever
    order the threads arrive, so one generation could round differently twice. There the members
    of every cell are added slot by slot in token order (a fixed order, the CPU's), so every engine
    gives the same bits.

    ``ordered`` (default: on CUDA) chooses the slot-by-slot sum.

    >>> cells, _, members = cell_layout(2, 3, 1, 2)
    >>> cell_sum(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]), cells, members).tolist()
    [[12.0, 9.0]]
    """
    if not (values.device.type == "cuda" if ordered is None else ordered):
        out = values.new_zeros(values.shape[0], members.shape[0], *values.shape[2:])
        return out.index_add_(1, cells, values)
    padded = torch.cat((values, values.new_zeros(values.shape[0], 1, *values.shape[2:])), dim=1)
    out = padded[:, members[:, 0]]
    for s in range(1, members.shape[1]):
        out = out + padded[:, members[:, s]]
    return out


def random_cell_projection(cells: torch.Tensor, members: torch.Tensor, batch_size: int,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-token weights (B, M) such that the weights of each cell sum to 1 (random convex
    combinations). ``P[i, j] = weights[j]`` if ``cells[j] == i`` else 0. Drawn on the device of
    ``cells`` (``generator``, if given, must live there), so nothing waits for the host."""
    M = cells.shape[0]
    u = torch.rand(batch_size, M, generator=generator, device=cells.device) - 0.5
    wts = 1.0 + u
    sums = cell_sum(wts, cells, members)
    return wts / sums[:, cells]
