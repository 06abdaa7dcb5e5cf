"""Self-attention KV caches of the next-scale samplers: keys and values ``(rows, H, L, c)`` of every
token computed so far, grown scale by scale along ``L``.

* :class:`KVCache` (the ``eager`` engine, and the upstream-order reference samplers): each scale
  concatenates its keys / values to the cache, a new allocation per block per scale.
* :class:`StaticKVCache` (the ``static`` and ``graphs`` engines): one buffer per block, allocated
  once in the compute dtype for the plan's whole length; a scale writes its slice in place and
  attention reads the prefix, so every address is fixed (what a CUDA graph needs) and nothing is
  re-cast or copied.

Both give attention the same values: a static cache stores keys and values in the dtype attention
computes in (:func:`attention_dtype`: under CUDA autocast the reduced dtype, the cast autocast
would otherwise make of the whole cache at every call; on CPU, where autocast computes attention in
the inputs' widest dtype, the dtype they arrive in). Dropping the unconditional rows keeps the
first ``B`` rows.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from stagevar.errors import StageVarError


class CacheOverflowError(StageVarError):
    """A plan appends more tokens than the preallocated cache holds."""


@functools.lru_cache(maxsize=None)
def attention_dtype(device_type: str, autocast_dtype: torch.dtype, input_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``scaled_dot_product_attention`` computes in for ``input_dtype`` inputs under
    ``torch.autocast(device_type, autocast_dtype)`` (asked once per combination).

    >>> attention_dtype("cpu", torch.float32, torch.float32)
    torch.float32
    """
    if autocast_dtype == torch.float32:
        return input_dtype
    x = torch.zeros(1, 1, 1, 8, device=device_type, dtype=input_dtype)
    with torch.autocast(device_type, dtype=autocast_dtype):
        return F.scaled_dot_product_attention(x, x, x).dtype


class KVCache:
    """Keys and values of one attention layer, grown by concatenation.

    >>> c = KVCache(); _ = c.append(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4)); c.length
    3
    """

    __slots__ = ("k", "v")

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else int(self.k.shape[2])

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this scale's keys/values; returns everything cached so far."""
        if self.k is None:
            self.k, self.v = k_BHlc, v_BHlc
        else:
            self.k = torch.cat((self.k, k_BHlc), dim=2)
            self.v = torch.cat((self.v, v_BHlc), dim=2)
        return self.k, self.v

    def select_rows(self, n: int) -> None:
        """Keep the first ``n`` rows (drop the unconditional half)."""
        if self.k is not None:
            self.k, self.v = self.k[:n], self.v[:n]

    def copy(self) -> "KVCache":
        """Another cache holding the same tensors: appends and row selections replace them and
        never write into them, so the two go on independently."""
        c = KVCache()
        c.k, c.v = self.k, self.v
        return c


class StaticKVCache:
    """Keys and values of one attention layer in buffers allocated once, written in place.

    ``capacity``: the tokens this layer appends over the whole generation (the plan knows it).

    >>> c = StaticKVCache(2, 1, 5, 4, torch.float32, torch.float32, "cpu")
    >>> k, v = c.append(torch.ones(2, 1, 3, 4), torch.ones(2, 1, 3, 4)); tuple(k.shape), c.length
    ((2, 1, 3, 4), 3)
    """

    __slots__ = ("k_buf", "v_buf", "length", "rows")

    def __init__(self, rows: int, heads: int, capacity: int, head_dim: int, k_dtype: torch.dtype, v_dtype: torch.dtype,
                 device) -> None:
        self.k_buf = torch.empty(rows, heads, capacity, head_dim, dtype=k_dtype, device=device)
        self.v_buf = torch.empty(rows, heads, capacity, head_dim, dtype=v_dtype, device=device)
        self.length = 0
        self.rows = rows

    @property
    def capacity(self) -> int:
        return int(self.k_buf.shape[2])

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this scale's keys/values after the cached ones; returns views of everything cached."""
        start, end = self.length, self.length + k_BHlc.shape[2]
        if end > self.capacity:
            raise CacheOverflowError(f"the KV cache holds {self.capacity} tokens, but this generation appends "
                                     f"{end}; the plan the cache was sized for is not the one being run")
        rows = k_BHlc.shape[0]
        self.k_buf[:rows, :, start:end].copy_(k_BHlc)
        self.v_buf[:rows, :, start:end].copy_(v_BHlc)
        self.length = end
        return self.k_buf[:rows, :, :end], self.v_buf[:rows, :, :end]

    def select_rows(self, n: int) -> None:
        """Keep the first ``n`` rows: later appends and reads use ``[:n]`` (no copy)."""
        self.rows = n

    def reset(self) -> None:
        """Empty the cache for the next generation (the buffers are kept)."""
        self.length = 0
        self.rows = int(self.k_buf.shape[0])
