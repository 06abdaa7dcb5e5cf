"""Singular-value spectra of per-scale token features (the low-rank evidence behind token subsets).

For scale k and layer boundary l, each image's hidden states form an (M x C) matrix. Its singular
values, squared and normalised to sum 1, are the energy spectrum; the effective rank at e% energy
is the smallest r whose top-r energy reaches e%. Reported as the mean over images, with the rank
also given as a fraction of min(M, C).
"""
from __future__ import annotations

import numpy as np

ENERGIES = (0.90, 0.95, 0.99)


def effective_rank(singular_values: np.ndarray, energy: float) -> int:
    """Smallest r with sum(s[:r]^2) >= energy * sum(s^2).

    >>> effective_rank(np.array([3.0, 4.0, 0.0]), 0.99)
    2
    """
    e = np.asarray(singular_values, dtype=np.float64) ** 2
    tot = e.sum()
    if tot <= 0:
        return 0
    c = np.cumsum(np.sort(e)[::-1]) / tot
    return int(np.searchsorted(c, energy - 1e-12) + 1)


def spectra_rows(features: dict[tuple[int, int], np.ndarray], max_len: int = 64):
    """features[(scale, layer)] = (P, M, C) -> (rows, arrays for spectra.npz)."""
    rows, arrays = [], {}
    for (k, layer), x in sorted(features.items()):
        P, M, C = x.shape
        spectra = []
        ranks = {e: [] for e in ENERGIES}
        for mat in x:
            s = np.linalg.svd(mat.astype(np.float64) - mat.mean(0, keepdims=True), compute_uv=False)
            spectra.append(s ** 2 / max((s ** 2).sum(), 1e-30))
            for e in ENERGIES:
                ranks[e].append(effective_rank(s, e))
        spec = np.mean(spectra, axis=0)
        arrays[f"scale{k:02d}_layer{layer:02d}"] = spec[:max_len].astype(np.float32)
        full = min(M, C)
        row = {"scale": k, "layer": layer, "tokens": M, "full_rank": full}
        for e in ENERGIES:
            r = float(np.mean(ranks[e]))
            row[f"eff_rank_{int(e * 100)}"] = r
            row[f"eff_rank_frac_{int(e * 100)}"] = r / full if full else 0.0
        rows.append(row)
    return rows, arrays
