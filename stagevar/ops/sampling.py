"""Top-k / top-p sampling of categorical logits (upstream VAR / Infinity semantics), without a
host synchronisation.

``torch.multinomial`` draws one sample per row as an exponential race: ``argmax(p / q)`` with
``q ~ Exp(1)`` drawn by ``exponential_`` on the generator (its fast path for one sample), but its
argument checks first read two values back to the host. Drawing ``q`` ourselves gives the very same
indices and leaves the generator in the very same state, with no ``.item()``: the sampler can run
inside a CUDA graph, and the noise can be drawn ahead of time (:func:`sampling_noise`), which is
what a graph-ready engine does.

``top_k=1`` is greedy: every logit but the maximum becomes -inf, so the race returns the argmax
while still consuming the generator (as upstream does).
"""
from __future__ import annotations

import torch


def sampling_noise(shape: tuple[int, ...], generator: torch.Generator | None = None, device=None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The ``Exp(1)`` noise the sampler races the probabilities ``(rows, V)`` against: the draw
    ``torch.multinomial(probs, 1, generator=generator)`` makes internally."""
    return torch.empty(shape, device=device, dtype=dtype).exponential_(1, generator=generator)


def sample_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                       generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one index per row of ``logits_BlV`` (B, l, V) -> (B, l). Does not modify the input.
    ``noise`` (B*l, V): the draw of :func:`sampling_noise` for these logits (default: drawn here
    from ``generator``).

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
    if noise is None:
        noise = sampling_noise(probs.shape, generator, probs.device, probs.dtype)
    return (probs / noise).argmax(dim=-1).view(B, l)
