"""Top-k / top-p sampling of categorical logits (upstream VAR / Infinity semantics).

``top_k=1`` is greedy: every logit but the maximum becomes -inf, so the multinomial draw returns
the argmax while still consuming the generator (as upstream does).
"""
from __future__ import annotations

import torch


def sample_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample one index per row of ``logits_BlV`` (B, l, V) -> (B, l). Does not modify the input.

    >>> torch.manual_seed(0) and None
    >>> sample_top_k_top_p(torch.tensor([[[0.0, 5.0, 1.0]]]), top_k=1).tolist()
    [[1]]
    """
    B, l, V = logits_BlV.shape
    logits = logits_BlV.clone()
    if 0 < top_k < V:
        kth = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), float("-inf"))
    probs = logits.softmax(dim=-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, replacement=True, generator=generator).view(B, l)
