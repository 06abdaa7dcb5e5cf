"""Infinity (bitwise next-scale text-to-image transformer), written from the upstream description.

Facts (architecture, state-dict keys, numerics) follow FoundationVision/Infinity
``infinity/models/infinity.py`` and ``infinity/models/basic.py`` at commit 4c27bbb; the module
layout reproduces upstream's ``state_dict()`` key for key (``block_chunks.{i}.module.{j}.*`` or
``blocks.{i}.*`` when there is one chunk), so official checkpoints load directly.

Pieces:
* :class:`InfinityConfig` - one architecture at every size (2B, 8B, the embedded mini, tiny tests).
* :class:`InfinityTransformer` - the network: text pooling / projection, shared AdaLN, blocks
  (cosine self-attention with 2-D RoPE and a KV cache, cross-attention to the prompt, FFN), head.
* :class:`InfinityAdapter` - the :class:`~stagevar.models.base.Adapter` the runtime drives, plus
  the plain upstream-order sampler (:meth:`InfinityAdapter.reference_generate`).

Legend: ``B`` rows, ``L`` tokens, ``C`` width, ``H`` heads, ``c`` head width, ``V`` = 2*d logits
(a pair per bit), ``d`` bits per token (VAE codebook dim), ``T`` text tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stagevar.guidance import guidance_per_scale, is_guided, parse_guidance
from stagevar.models.layers import FFN
from stagevar.models.base import Adapter, ConditionError, GenerationState, Schedule
from stagevar.models.kv_cache import KVCache, StaticKVCache, attention_dtype
from stagevar.models.text import TextCondition
from stagevar.ops.sampling import sample_top_k_top_p

log = logging.getLogger(__name__)

# Upstream's dynamic-resolution table (infinity/utils/dynamic_resolution.py): (h, w) per scale of
# the '1M' schedule for each h/w ratio template; smaller "pn" use a prefix of 7/10/12 scales.
_RATIO_TO_HW: dict[float, list[tuple[int, int]]] = {
    1.000: [(1, 1), (2, 2), (4, 4), (6, 6), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (32, 32), (40, 40), (48, 48), (64, 64)],
    1.250: [(1, 1), (2, 2), (3, 3), (5, 4), (10, 8), (15, 12), (20, 16), (25, 20), (30, 24), (35, 28), (45, 36), (55, 44), (70, 56)],
    1.333: [(1, 1), (2, 2), (4, 3), (8, 6), (12, 9), (16, 12), (20, 15), (24, 18), (28, 21), (36, 27), (48, 36), (60, 45), (72, 54)],
    1.500: [(1, 1), (2, 2), (3, 2), (6, 4), (9, 6), (15, 10), (21, 14), (27, 18), (33, 22), (39, 26), (48, 32), (63, 42), (78, 52)],
    1.750: [(1, 1), (2, 2), (3, 3), (7, 4), (11, 6), (14, 8), (21, 12), (28, 16), (35, 20), (42, 24), (56, 32), (70, 40), (84, 48)],
    2.000: [(1, 1), (2, 2), (4, 2), (6, 3), (10, 5), (16, 8), (22, 11), (30, 15), (38, 19), (46, 23), (60, 30), (74, 37), (90, 45)],
    2.500: [(1, 1), (2, 2), (5, 2), (10, 4), (15, 6), (20, 8), (25, 10), (30, 12), (40, 16), (50, 20), (65, 26), (80, 32), (100, 40)],
    3.000: [(1, 1), (2, 2), (6, 2), (9, 3), (15, 5), (21, 7), (27, 9), (36, 12), (45, 15), (54, 18), (72, 24), (90, 30), (111, 37)],
}
_PN_TO_NUM_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}


def _ratio_table() -> dict[float, list[tuple[int, int]]]:
    table = dict(_RATIO_TO_HW)
    for ratio, hws in _RATIO_TO_HW.items():
        if ratio != 1.0:
            table[int(1 / ratio * 1000) / 1000] = [(w, h) for (h, w) in hws]
    return table


RATIO_TABLE = _ratio_table()


def upstream_schedule(h_div_w: float = 1.0, pn: str = "1M") -> tuple[Schedule, tuple[int, int]]:
    """Infinity's scale schedule for an aspect ratio and pixel budget, and its RoPE grid.

    The ratio is snapped to the nearest template, as upstream does. Returns
    ``([(1, h, w), ...], (H_1M, W_1M))``: the RoPE grid is the last scale of the 1M schedule of
    that template, for every ``pn``.

    >>> sched, grid = upstream_schedule(1.0, "0.06M")
    >>> sched[-1], grid
    ((1, 16, 16), (64, 64))
    """
    if pn not in _PN_TO_NUM_SCALES:
        raise ValueError(f"unknown pn {pn!r}; expected one of {sorted(_PN_TO_NUM_SCALES)}")
    templates = sorted(RATIO_TABLE)
    ratio = min(templates, key=lambda t: abs(t - float(h_div_w)))
    hws = RATIO_TABLE[ratio]
    n = _PN_TO_NUM_SCALES[pn]
    return [(1, h, w) for (h, w) in hws[:n]], hws[-1]


# ----------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class InfinityConfig:
    """Architecture of one Infinity transformer (+ the VAE it decodes with)."""

    depth: int
    embed_dim: int
    num_heads: int
    text_channels: int
    codebook_dim: int                    # d of the VAE (bits per VAE position)
    scale_schedule: tuple[tuple[int, int, int], ...]
    rope_grid: tuple[int, int]           # (H, W) grid RoPE positions are normalised to
    mlp_ratio: float = 4.0
    text_maxlen: int = 512
    block_chunks: int = 1
    apply_spatial_patchify: bool = False
    norm_eps: float = 1e-6
    pad_to_multiplier: int = 128
    lvl_embed_rows: int = 15
    vae_stride: int = 16                 # pixels per transformer token
    # sampling defaults (upstream scripts): cfg on logits, constant over scales, or one value per
    # scale (upstream ``cfg_list``)
    cfg: float | tuple[float, ...] = 3.0
    tau: float = 0.5
    top_k: int = 900
    top_p: float = 0.97

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio / 256) * 256

    @property
    def d_token(self) -> int:
        """Bits per transformer token (4*d with 2x2 spatial patchify, as the 8B model)."""
        return self.codebook_dim * (4 if self.apply_spatial_patchify else 1)

    @property
    def vocab(self) -> int:
        return 2 * self.d_token

    @property
    def pool_heads(self) -> int:
        return self.text_channels // (64 if self.embed_dim > 4096 else 128)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scale_schedule"] = [list(s) for s in self.scale_schedule]
        d["rope_grid"] = list(self.rope_grid)
        if isinstance(self.cfg, tuple):
            d["cfg"] = list(self.cfg)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InfinityConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown InfinityConfig keys: {sorted(unknown)}")
        d = dict(d)
        d["scale_schedule"] = tuple(tuple(int(v) for v in s) for s in d["scale_schedule"])
        d["rope_grid"] = tuple(int(v) for v in d["rope_grid"])
        if "cfg" in d:
            d["cfg"] = parse_guidance(d["cfg"])
        return cls(**d)


# ----------------------------------------------------------------------------------------- RoPE
def rope2d_table(head_dim: int, schedule: Schedule, grid: tuple[int, int], base: float = 10000.0) -> list[torch.Tensor]:
    """Per scale, the (cos, sin) table ``(2, h*w, head_dim/2)`` of Infinity's 2-D RoPE.

    ``rope2d_normalized_by_hw=2`` ("STAR style"): token (i, j) of an (h, w) scale takes the
    rotation of grid row ``round(i*H/h)`` and column ``round(j*W/w)`` (round half to even, as torch
    does), where (H, W) is the RoPE grid. Pair p of a head vector (elements 2p, 2p+1) rotates with
    the row angle for p < head_dim/4 and with the column angle otherwise.
    """
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, dtype=torch.int64).float() / half))
    uph, upw = grid
    out = []
    for (_, ph, pw) in schedule:
        rows = (torch.arange(ph) * (uph / ph)).round().int().float()
        cols = (torch.arange(pw) * (upw / pw)).round().int().float()
        ang_r = torch.outer(rows, inv_freq)[:, None, :].expand(ph, pw, -1)
        ang_c = torch.outer(cols, inv_freq)[None, :, :].expand(ph, pw, -1)
        ang = torch.cat([ang_r, ang_c], dim=-1).reshape(ph * pw, half)
        out.append(torch.stack([ang.cos(), ang.sin()], dim=0))
    return out


def rope_apply_table(cos_sin: torch.Tensor) -> torch.Tensor:
    """A (2, L, c/2) table of :func:`rope2d_table` in the form :func:`apply_rope` uses, built once
    per model: (2, L, c) with ``[cos, cos]`` and ``[-sin, sin]`` on every pair."""
    cos, sin = cos_sin[0], cos_sin[1]
    return torch.stack([torch.stack([cos, cos], -1), torch.stack([-sin, sin], -1)]).flatten(-2)


def apply_rope(x_BHLc: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2p, 2p+1) of ``x``: ``(x0 cos - x1 sin, x0 sin + x1 cos)``, as
    ``x * [cos, cos] + (x1, x0) * [-sin, sin]`` (the same roundings, four ops instead of seven).
    ``table``: :func:`rope_apply_table`'s, broadcast to (2, 1|B, 1, L, c)."""
    swapped = x_BHLc.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x_BHLc * table[0] + swapped * table[1]


# ----------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(self.eps))) * self.weight


def ada_layer_norm(x: torch.Tensor, eps: float, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine, then ``* (1 + scale) + shift`` (upstream fused_ada_layer_norm)."""
    x = F.layer_norm(x.float(), (x.shape[-1],), None, None, eps)
    return x.mul(scale.add(1)).add_(shift)


class TextKV:
    """Prompt tokens in the padded layout cross-attention uses.

    ``kv_BTC`` (rows, T, C) padded per row, ``mask_B1T`` additive mask (0 / -inf) broadcast over
    heads and queries. Built once per generation from the compact ``(kv, lens)`` form.
    """

    def __init__(self, kv_compact: torch.Tensor, lens: Sequence[int]):
        self.lens = [int(n) for n in lens]
        rows, T = len(self.lens), max(self.lens)
        kv = kv_compact.new_zeros(rows, T, kv_compact.shape[-1])
        mask = torch.full((rows, 1, 1, T), float("-inf"), dtype=kv_compact.dtype, device=kv_compact.device)
        start = 0
        for r, n in enumerate(self.lens):
            kv[r, :n] = kv_compact[start:start + n]
            mask[r, ..., :n] = 0.0
            start += n
        self.kv_BTC = kv
        self.mask = mask

    def select_rows(self, n: int) -> "TextKV":
        out = TextKV.__new__(TextKV)
        out.lens, out.kv_BTC, out.mask = self.lens[:n], self.kv_BTC[:n], self.mask[:n]
        return out


class CrossAttention(nn.Module):
    """Cross-attention to the prompt (plain softmax attention, scale c^-1/2, non-causal).

    With ``for_attn_pool`` the query is one learned vector per head (``mat_q`` parameter): the
    attentive pooling that makes the start-of-sequence token / AdaLN condition.
    """

    def __init__(self, embed_dim: int, kv_dim: int, num_heads: int, for_attn_pool: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.for_attn_pool = for_attn_pool
        self.scale = 1 / math.sqrt(self.head_dim)
        if for_attn_pool:
            self.mat_q = nn.Parameter(torch.zeros(1, num_heads, self.head_dim))
        else:
            self.mat_q = nn.Linear(embed_dim, embed_dim, bias=True)
        self.mat_kv = nn.Linear(kv_dim, embed_dim * 2, bias=False)
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def text_kv(self, text: TextKV) -> tuple[torch.Tensor, torch.Tensor]:
        rows, T, _ = text.kv_BTC.shape
        kv = F.linear(text.kv_BTC, self.mat_kv.weight, torch.cat((self.zero_k_bias, self.v_bias)))
        kv = kv.view(rows, T, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return kv[0], kv[1]          # (rows, H, T, c) each

    def forward(self, x_BLC: torch.Tensor | None, text: TextKV, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        k, v = kv if kv is not None else self.text_kv(text)
        rows = k.shape[0]
        if self.for_attn_pool:
            q = self.mat_q.to(k.dtype).unsqueeze(2).expand(rows, -1, -1, -1)      # (rows, H, 1, c)
            L = 1
        else:
            L = x_BLC.shape[1]
            q = self.mat_q(x_BLC).view(rows, L, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=text.mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(rows, L, -1))


class TextAttentivePool(nn.Module):
    def __init__(self, text_channels: int, embed_dim: int):
        super().__init__()
        head_dim = 64 if embed_dim > 4096 else 128
        self.ca = CrossAttention(embed_dim, text_channels, text_channels // head_dim, for_attn_pool=True)

    def forward(self, text: TextKV) -> torch.Tensor:
        return self.ca(None, text).squeeze(1)


class SelfAttention(nn.Module):
    """Cosine self-attention (L2-normalised q, k; learned per-head scale; softmax scale 1)."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        self.max_scale_mul = math.log(100)
        self.mat_qkv = nn.Linear(embed_dim, embed_dim * 3, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def constants(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused qkv bias ``[q_bias, 0, v_bias]`` and the clamped per-head scale: functions of
        the weights alone, computed once per generation rather than at every scale."""
        return (torch.cat((self.q_bias, self.zero_k_bias, self.v_bias)),
                self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())

    def forward(self, x_BLC: torch.Tensor, rope: torch.Tensor, cache: KVCache | StaticKVCache | None,
                attn_mask: torch.Tensor | None = None, consts: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        B, L, C = x_BLC.shape
        bias, scale_mul = self.constants() if consts is None else consts
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias)
        q, k, v = qkv.view(B, L, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1, eps=1e-12).mul(scale_mul)
        k = F.normalize(k, dim=-1, eps=1e-12)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            k, v = cache.append(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttnBlock(nn.Module):
    """Self-attention -> cross-attention -> FFN, with shared AdaLN (six modulation vectors)."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C, self.eps = C, cfg.norm_eps
        self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))
        self.sa = SelfAttention(C, cfg.num_heads)
        self.ca = CrossAttention(C, C, cfg.num_heads)
        self.ffn = FFN(C, cfg.mlp_hidden)
        self.ca_norm = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=True)

    def forward(self, x, gss_B16C, text: TextKV, text_kv, rope, cache, attn_mask=None, sa_consts=None):
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (self.ada_gss + gss_B16C).unbind(2)
        x = x + self.sa(ada_layer_norm(x, self.eps, scale1, shift1), rope, cache, attn_mask, sa_consts).mul_(gamma1)
        x = x + self.ca(self.ca_norm(x), text, text_kv).float()
        x = x + self.ffn(ada_layer_norm(x, self.eps, scale2, shift2)).mul(gamma2)
        return x


class _Chunk(nn.Module):
    """Upstream groups blocks in chunks (``block_chunks.{i}.module.{j}``); kept for the key names."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.module = nn.ModuleList(blocks)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int, D: int, eps: float):
        super().__init__()
        self.C, self.eps = C, eps
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return ada_layer_norm(x_BLC, self.eps, scale, shift)


class InfinityTransformer(nn.Module):
    """The Infinity network; ``state_dict()`` equals upstream's for the same configuration."""

    def __init__(self, cfg: InfinityConfig):
        super().__init__()
        self.cfg = cfg
        C, Ct5 = cfg.embed_dim, cfg.text_channels
        self.cfg_uncond = nn.Parameter(torch.zeros(cfg.text_maxlen, Ct5))
        self.pos_start = nn.Parameter(torch.zeros(1, 1, C))
        self.text_norm = RMSNorm(Ct5, cfg.norm_eps)
        self.text_proj_for_sos = TextAttentivePool(Ct5, C)
        self.text_proj_for_ca = nn.Sequential(nn.Linear(Ct5, C), nn.GELU(approximate="tanh"), nn.Linear(C, C))
        self.lvl_embed = nn.Embedding(cfg.lvl_embed_rows, C)
        self.word_embed = nn.Linear(cfg.d_token, C)
        self.shared_ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(C, 6 * C))
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab)
        blocks = [CrossAttnBlock(cfg) for _ in range(cfg.depth)]
        if cfg.block_chunks > 1:
            per = cfg.depth // cfg.block_chunks
            if per * cfg.block_chunks != cfg.depth:
                raise ValueError(f"depth {cfg.depth} is not divisible by block_chunks {cfg.block_chunks}")
            self.block_chunks = nn.ModuleList(_Chunk(blocks[i * per:(i + 1) * per]) for i in range(cfg.block_chunks))
        else:
            self.blocks = nn.ModuleList(blocks)
        self._blocks = blocks  # flat view (not registered twice: plain list)
        self._rope = None

    @property
    def layers(self) -> list[CrossAttnBlock]:
        return self._blocks

    def rope_tables(self, device) -> list[torch.Tensor]:
        """Per scale the (2, h*w, c) table of :func:`apply_rope`, built once per device."""
        if self._rope is None or self._rope[0].device != torch.device(device):
            tables = rope2d_table(self.cfg.head_dim, list(self.cfg.scale_schedule), self.cfg.rope_grid)
            self._rope = [rope_apply_table(t).to(device) for t in tables]
        return self._rope

    # ---- conditioning
    def encode_text(self, kv_compact: torch.Tensor, lens: Sequence[int]):
        """Normalised text -> (pooled cond_BD, AdaLN gss (rows,1,6,C), TextKV for cross-attention)."""
        kv = self.text_norm(kv_compact)
        cond_BD = self.text_proj_for_sos(TextKV(kv, lens))
        ca = TextKV(self.text_proj_for_ca(kv), lens)
        gss = self.shared_ada_lin(cond_BD.float()).float().view(-1, 1, 6, self.cfg.embed_dim)
        return cond_BD, gss, ca

    def unconditional_text(self, lens: Sequence[int]) -> torch.Tensor:
        """The null-text rows for each prompt length (``cfg_uncond[:len]``), compact layout."""
        return torch.cat([self.cfg_uncond[:n] for n in lens], dim=0)

    def logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(h_BLC.float(), cond_BD.float()))

    # ---- teacher forcing (training and reference checks)
    def forward(self, kv_compact: torch.Tensor, lens: Sequence[int], x_BLC_wo_prefix: torch.Tensor,
                return_hidden: bool = False, num_scales: int | None = None):
        """Teacher-forced logits for all scales at once (block-causal mask), like upstream
        ``Infinity.forward`` with ``cond_drop_rate = 0``. ``x_BLC_wo_prefix``: (B, L-1, d_token);
        ``num_scales``: only the first scales (the input holds their tokens only; training)."""
        cfg = self.cfg
        sched = list(cfg.scale_schedule)[:num_scales]
        B = x_BLC_wo_prefix.shape[0]
        cond_BD, gss, text = self.encode_text(kv_compact, lens)
        text_kv = [blk.ca.text_kv(text) for blk in self._blocks]
        sos = cond_BD.unsqueeze(1) + self.pos_start.expand(B, 1, -1)
        x = torch.cat((sos, self.word_embed(x_BLC_wo_prefix.float())), dim=1)
        sizes = [t * h * w for (t, h, w) in sched]
        L = sum(sizes)
        level = torch.cat([torch.full((n,), i, dtype=torch.long, device=x.device) for i, n in enumerate(sizes)])
        x = x + self.lvl_embed(level).unsqueeze(0)
        mask = torch.where(level[:, None] >= level[None, :], 0.0, float("-inf")).to(x.dtype)
        rope = torch.cat(self.rope_tables(x.device)[:len(sched)], dim=1)[:, None, None]      # (2,1,1,L,c)
        for blk, kv in zip(self._blocks, text_kv):
            x = blk(x, gss, text, kv, rope, None, mask)
        logits = self.logits(x[:, :L], cond_BD)
        return (logits, x) if return_hidden else logits


# ----------------------------------------------------------------------------------------- text
class HashTextEncoder(nn.Module):
    """A deterministic stand-in text encoder for random-weight models (tests, speed benchmarks):
    each word maps to a fixed pseudo-random vector (seeded by a hash of the word), plus EOS."""

    def __init__(self, channels: int, max_len: int = 64):
        super().__init__()
        self.channels, self.max_len = channels, max_len

    def _vec(self, word: str) -> torch.Tensor:
        import zlib
        g = torch.Generator().manual_seed(zlib.crc32(word.encode()))
        return torch.randn(self.channels, generator=g)

    def forward(self, prompts: Sequence[str]) -> TextCondition:
        rows, lens = [], []
        for p in prompts:
            words = p.lower().split()[: self.max_len - 1] + ["</s>"]
            rows += [self._vec(w) for w in words]
            lens.append(len(words))
        return TextCondition(torch.stack(rows), lens)


# ----------------------------------------------------------------------------------------- adapter
@dataclasses.dataclass
class InfinityState(GenerationState):
    cond_BD: torch.Tensor = None          # (rows, C) pooled text
    gss: torch.Tensor = None              # (rows, 1, 6, C)
    text: TextKV = None
    text_kv: list = None                  # per layer (k, v) of the prompt
    caches: list = None                   # per layer self-attention KVCache (or StaticKVCache)
    sa_consts: list = None                # per layer (qkv bias, scale) of the self-attention (weights only)
    next_input: torch.Tensor = None       # (B, h*w, d_token) codes-space input of the next scale
    summed_codes: torch.Tensor = None     # (B, d, 1, H, W)
    cfg: tuple = ()                       # guidance per scale
    tau: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    static: bool = False                  # caches and the latent live in buffers written in place


def _reduced_precision(method):
    """Run an adapter step under autocast when the transformer holds bfloat16 / float16 weights
    (as upstream: reduced-precision blocks under ``torch.autocast``; norms and the VAE stay float32).
    A float32 model runs as written."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        dtype = self.compute_dtype
        if dtype == torch.float32:
            return method(self, *args, **kwargs)
        with torch.autocast(self.device.type, dtype=dtype):
            return method(self, *args, **kwargs)

    return wrapper


class InfinityAdapter(Adapter):
    """Runtime adapter for Infinity. Holds the transformer, the VAE and a text encoder."""

    family = "infinity"

    def __init__(self, name: str, cfg: InfinityConfig, vae: nn.Module, text_encoder: nn.Module | None = None):
        super().__init__()
        self.name = name
        self.cfg = cfg
        self.transformer = InfinityTransformer(cfg)
        self.vae = vae
        self.text_encoder = text_encoder if text_encoder is not None else HashTextEncoder(cfg.text_channels)
        #: the dtype the VAE decodes in (None: on CUDA the compute dtype, under autocast, as upstream;
        #: float32 elsewhere, where reduced-precision convolutions are slower)
        self.decode_dtype: torch.dtype | None = None

    # ---- description
    @property
    def scale_schedule(self) -> Schedule:
        return [tuple(s) for s in self.cfg.scale_schedule]

    @property
    def num_layers(self) -> int:
        return self.cfg.depth

    @property
    def image_size(self) -> tuple[int, int]:
        _, h, w = self.cfg.scale_schedule[-1]
        f = self.cfg.vae_stride * (2 if self.cfg.apply_spatial_patchify else 1)
        return h * f, w * f

    def architecture(self) -> dict[str, Any]:
        d = self.cfg.to_dict()
        for k in ("cfg", "tau", "top_k", "top_p"):
            d.pop(k)
        d["family"] = self.family
        vae_cfg = getattr(self.vae, "config", None)
        d["vae"] = vae_cfg.to_dict() if hasattr(vae_cfg, "to_dict") else type(self.vae).__name__
        return d

    @property
    def default_guidance(self) -> float | tuple[float, ...]:
        return self.cfg.cfg

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the transformer's matrices (float32, or bfloat16 / float16 under autocast)."""
        return self.transformer.word_embed.weight.dtype

    def encode_prompts(self, prompts: Sequence[str]) -> TextCondition:
        if not prompts:
            raise ConditionError("no prompt given: pass at least one prompt")
        for p in prompts:
            if not isinstance(p, str) or not p.strip():
                raise ConditionError(f"empty prompt {p!r}: every prompt must contain words")
        cond = self.text_encoder(list(prompts))
        return TextCondition(cond.kv_compact.to(self.device, self.compute_dtype), list(cond.lens))

    # ---- generation steps
    @_reduced_precision
    def prepare(self, condition: TextCondition, *, guidance: float | Sequence[float], seed: int,
                tau: float | None = None, top_k: int | None = None, top_p: float | None = None,
                kv_capacity: Sequence[int] | None = None) -> InfinityState:
        """``guidance``: one scale, or one per scale (upstream ``cfg_list``); the unconditional
        branch runs when any scale is guided (its KV cache serves the later scales).
        ``kv_capacity`` (tokens per layer): static caches and latent, written in place."""
        tr = self.transformer
        B = condition.batch_size
        cfg_list = guidance_per_scale(guidance, len(self.cfg.scale_schedule))
        guided = is_guided(cfg_list, len(cfg_list))
        kv, lens = condition.kv_compact, list(condition.lens)
        if guided:
            kv = torch.cat((kv, tr.unconditional_text(lens).to(kv.dtype)), dim=0)
            lens = lens + lens
        cond_BD, gss, text = tr.encode_text(kv, lens)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        rows = 2 * B if guided else B
        state = InfinityState(
            batch_size=B, guided=guided, generator=gen,
            cond_BD=cond_BD, gss=gss, text=text,
            text_kv=[blk.ca.text_kv(text) for blk in tr.layers],
            sa_consts=[blk.sa.constants() for blk in tr.layers],
            caches=[KVCache() for _ in tr.layers] if kv_capacity is None else self._static_caches(rows, kv_capacity),
            next_input=None, summed_codes=None if kv_capacity is None else self._zero_latent(B),
            static=kv_capacity is not None,
            cfg=cfg_list, tau=self.cfg.tau if tau is None else float(tau),
            top_k=self.cfg.top_k if top_k is None else int(top_k),
            top_p=self.cfg.top_p if top_p is None else float(top_p),
        )
        assert state.rows == rows
        return state

    def _static_caches(self, rows: int, capacity: Sequence[int]) -> list[StaticKVCache]:
        cfg = self.cfg
        if len(capacity) != cfg.depth:
            raise ValueError(f"kv_capacity has {len(capacity)} entries, the model has {cfg.depth} layers")
        # keys leave RoPE in float32, values the projection in the compute dtype; each is stored in the
        # dtype attention computes in
        dt, dev = self.compute_dtype, self.device
        k_dtype, v_dtype = attention_dtype(dev.type, dt, torch.float32), attention_dtype(dev.type, dt, dt)
        return [StaticKVCache(rows, cfg.num_heads, int(n), cfg.head_dim, k_dtype, v_dtype, dev) for n in capacity]

    def _zero_latent(self, B: int) -> torch.Tensor:
        """The latent buffer of a static generation, in the layout the running sum of the eager
        one has (channels-last, as the codes come from the quantizer): layouts round differently."""
        _, H, W = self._vae_schedule()[-1]
        return torch.zeros(B, self.cfg.codebook_dim, 1, H, W, device=self.device).contiguous(memory_format=torch.channels_last_3d)

    def condition_signature(self, condition: TextCondition) -> tuple[int, int]:
        return condition.batch_size, max(condition.lens)

    def runs_unconditional(self, guidance: Any) -> bool:
        n = len(self.cfg.scale_schedule)
        return is_guided(guidance_per_scale(guidance, n), n)

    def state_inputs(self, state: InfinityState) -> dict[str, torch.Tensor]:
        out = {"cond_BD": state.cond_BD, "gss": state.gss, "text.kv": state.text.kv_BTC, "text.mask": state.text.mask}
        for i, (k, v) in enumerate(state.text_kv):
            out[f"text_kv.{i}.k"], out[f"text_kv.{i}.v"] = k, v
        if state.static:
            out["summed_codes"] = state.summed_codes
        return out

    def sampling_noise_shape(self, batch_size: int, k: int) -> tuple[int, int]:
        _, h, w = self.cfg.scale_schedule[k]
        return batch_size * h * w * self.cfg.d_token, 2
    @_reduced_precision
    def scale_input(self, state: InfinityState, k: int) -> torch.Tensor:
        tr = self.transformer
        rows = state.rows
        if k == 0:
            x = state.cond_BD.unsqueeze(1) + tr.pos_start.expand(rows, 1, -1)
        else:
            x = tr.word_embed(state.next_input)
            x = x.repeat(rows // x.shape[0], 1, 1)
        return x + tr.lvl_embed.weight[k]

    @_reduced_precision
    def forward_layers(self, state: InfinityState, k: int, x_BLC: torch.Tensor, layers: range,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
        table = self.transformer.rope_tables(x_BLC.device)[k]                  # (2, l, c)
        if positions is None:
            rope = table[:, None, None]                                           # (2,1,1,l,c/2)
        else:
            rope = table[:, positions][:, :, None]                               # (2,rows,1,n,c/2)
        blocks = self.transformer.layers
        for i in layers:
            x_BLC = blocks[i](x_BLC, state.gss, state.text, state.text_kv[i], rope, state.caches[i], None, state.sa_consts[i])
        return x_BLC

    @_reduced_precision
    def head(self, state: InfinityState, k: int, h_BLC: torch.Tensor) -> torch.Tensor:
        return self.transformer.logits(h_BLC, state.cond_BD).float()

    def guide(self, state: InfinityState, k: int, logits_BLV: torch.Tensor) -> torch.Tensor:
        logits_BLV = logits_BLV.mul(1 / state.tau)
        if state.guided:
            B, cfg = state.batch_size, state.cfg[k]
            return cfg * logits_BLV[:B] + (1 - cfg) * logits_BLV[B:]
        return logits_BLV

    def sample(self, state: InfinityState, k: int, logits_BLV: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Bit labels: bit j of a token is sampled from its logit pair (2j, 2j+1).
        Returns bits (B, 1, h, w, d_vae) in VAE layout (2x2 un-patchified for the 8B)."""
        B, l, _ = logits_BLV.shape
        _, h, w = self.cfg.scale_schedule[k]
        pairs = logits_BLV.reshape(B, -1, 2)
        bits = sample_top_k_top_p(pairs, top_k=state.top_k, top_p=state.top_p, generator=state.generator, noise=noise)
        bits = bits.reshape(B, h, w, -1)
        if self.cfg.apply_spatial_patchify:
            bits = F.pixel_shuffle(bits.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)
        return bits.unsqueeze(1)

    def _vae_schedule(self) -> list[tuple[int, int, int]]:
        f = 2 if self.cfg.apply_spatial_patchify else 1
        return [(t, h * f, w * f) for (t, h, w) in self.cfg.scale_schedule]

    def update(self, state: InfinityState, k: int, codes: torch.Tensor) -> None:
        vae_sched = self._vae_schedule()
        z = self.vae.bits_to_codes(codes)                                       # (B, d, 1, h, w)
        last = k == len(vae_sched) - 1
        up = z if last else F.interpolate(z, size=vae_sched[-1], mode="trilinear")
        if state.static:
            state.summed_codes.add_(up)                                         # the latent stays where it is
        else:
            state.summed_codes = up if state.summed_codes is None else state.summed_codes + up
        if last:
            state.next_input = None
            return
        nxt = F.interpolate(state.summed_codes, size=vae_sched[k + 1], mode="trilinear").squeeze(-3)
        if self.cfg.apply_spatial_patchify:
            nxt = F.pixel_unshuffle(nxt, 2)
        state.next_input = nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1)

    def drop_unconditional(self, state: InfinityState) -> None:
        if not state.guided:
            return
        B = state.batch_size
        state.cond_BD, state.gss = state.cond_BD[:B], state.gss[:B]
        state.text = state.text.select_rows(B)
        state.text_kv = [(k[:B], v[:B]) for (k, v) in state.text_kv]
        for c in state.caches:
            c.select_rows(B)
        state.guided = False

    def decode(self, state: InfinityState) -> torch.Tensor:
        """The latent -> images in [0, 1]; on CUDA with a reduced compute dtype the VAE runs under
        autocast in it, as upstream decodes (``decode_dtype`` overrides)."""
        dtype = self.decode_dtype or (self.compute_dtype if self.device.type == "cuda" else torch.float32)
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32):
            img = self.vae.decode(state.summed_codes.squeeze(-3))
        return (img.float().clamp(-1, 1) + 1) / 2

    def finish(self, state: InfinityState) -> None:
        state.caches = None
        state.text_kv = None

    # ---- the plain sampler
    @torch.no_grad()
    @_reduced_precision
    def reference_generate(self, condition: TextCondition, *, guidance: float, seed: int, trace: dict | None = None,
                           force_bits: list | None = None, on_scale=None, **sampling) -> torch.Tensor:
        """Upstream ``autoregressive_infer_cfg`` (cfg on logits, per-scale cfg, constant tau) as one loop.

        ``trace`` (optional dict) receives ``guided_logits`` (B, L, V), ``bits`` (per scale),
        ``summed_codes``; ``force_bits`` replaces the sampled bits of each scale (teacher-forced
        inference for reference checks); ``on_scale(k, state)`` is called once scale k's codes are
        in the latent (``self.decode(state)`` then gives the partial image)."""
        tr = self.transformer
        st = self.prepare(condition, guidance=guidance, seed=seed, **sampling)
        B, rows = st.batch_size, st.rows
        blocks = tr.layers
        ropes = tr.rope_tables(self.device)
        x = st.cond_BD.unsqueeze(1) + tr.pos_start.expand(rows, 1, -1)
        guided_all = []
        for si, (_, ph, pw) in enumerate(self.cfg.scale_schedule):
            x = x + tr.lvl_embed.weight[si]
            rope = ropes[si][:, None, None]
            for i, blk in enumerate(blocks):
                x = blk(x, st.gss, st.text, st.text_kv[i], rope, st.caches[i], None, st.sa_consts[i])
            logits = tr.logits(x, st.cond_BD).float().mul(1 / st.tau)
            if st.guided:
                logits = st.cfg[si] * logits[:B] + (1 - st.cfg[si]) * logits[B:]
            guided_all.append(logits)
            bits = self.sample(st, si, logits) if force_bits is None else force_bits[si]
            if trace is not None:
                trace.setdefault("bits", []).append(bits)
            self.update(st, si, bits)
            if on_scale is not None:
                on_scale(si, st)
            if st.next_input is not None:
                x = tr.word_embed(st.next_input).repeat(rows // B, 1, 1)
        if trace is not None:
            trace["guided_logits"] = torch.cat(guided_all, dim=1)
            trace["summed_codes"] = st.summed_codes
            trace["cond_BD"] = st.cond_BD
        img = self.decode(st)
        self.finish(st)
        return img


# ----------------------------------------------------------------------------------------- registry
def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights that keep every part of the network visible (no zeroed biases or
    tiny AdaLN gammas as in the training init): biases 0.1z, norm weights 1+0.1z, matrices
    z/sqrt(fan_in), ``scale_mul`` ln4+0.3z, everything else 0.5z."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            z = torch.randn(p.shape, generator=g)
            if name.endswith("bias"):
                v = 0.1 * z
            elif name.endswith("scale_mul_1H11"):
                v = math.log(4) + 0.3 * z
            elif p.ndim == 1:
                v = 1 + 0.1 * z
            elif p.ndim >= 2 and name.endswith("weight"):
                v = z / math.sqrt(p[0].numel())
            else:
                v = 0.5 * z
            p.copy_(v.to(p.dtype))
    return module


def set_compute_dtype_(adapter: "InfinityAdapter", dtype: torch.dtype) -> "InfinityAdapter":
    """The transformer's weights in ``dtype`` (bfloat16 / float16 for speed), except its LayerNorms,
    which stay float32 like the residual stream they normalise; the VAE and text encoder are
    left as they are. Generation then runs under autocast (see ``_reduced_precision``)."""
    if dtype != torch.float32:
        adapter.transformer.to(dtype)
        for mod in adapter.transformer.modules():
            if isinstance(mod, nn.LayerNorm):
                mod.float()
    return adapter


def _finish(adapter: "InfinityAdapter", device, dtype) -> "InfinityAdapter":
    return set_compute_dtype_(adapter.to(device=device), dtype).eval()


def narrowed(cfg: InfinityConfig, vae_cfg, width: int):
    """``cfg`` at width ``width`` (and a 128-channel text, a VAE of base width 24): the same depth,
    heads, schedule and layers, so the same ops per image as the full model."""
    from stagevar.errors import StageVarError
    if width < cfg.num_heads or width % cfg.num_heads or (width // cfg.num_heads) % 4:
        raise StageVarError(f"--narrow {width}: the width must be a multiple of 4 x the {cfg.num_heads} heads "
                            f"(e.g. {4 * cfg.num_heads}), so that each head keeps a 2-D RoPE.")
    return (dataclasses.replace(cfg, embed_dim=int(width), text_channels=128),
            dataclasses.replace(vae_cfg, base_ch=24))


def _official(name: str, cfg: InfinityConfig, vae_cfg_name: str, ckpt_names: dict[str, str], weights, device, dtype,
              random_weights: bool, text_dir_name: str = "flan-t5-xl", narrow: int | None = None):
    from stagevar.models import bsq_vae, checkpoints
    from stagevar.models.catalog import WeightsError

    vae_cfg = getattr(bsq_vae.BSQVAEConfig, vae_cfg_name)()
    if narrow is not None:
        cfg, vae_cfg = narrowed(cfg, vae_cfg, narrow)
    with torch.device("meta"):
        adapter = InfinityAdapter(name, cfg, bsq_vae.BSQVAE(vae_cfg))
    if random_weights:
        if torch.device(device).type == "meta":   # shapes only (manifests, FLOP counts)
            return adapter.eval()
        adapter = adapter.to_empty(device=device)
        randomize_(adapter.transformer, seed=0)
        randomize_(adapter.vae, seed=1)
        adapter.transformer.rope_tables(device)
        for mod in adapter.modules():  # buffers (zero_k_bias, masks) must hold their real values
            for bname, buf in list(mod.named_buffers(recurse=False)):
                if bname == "zero_k_bias":
                    buf.zero_()
        if hasattr(adapter.vae, "reset_buffers"):
            adapter.vae.reset_buffers()
        return _finish(adapter, device, dtype)
    if weights is None:
        raise WeightsError(
            f"model {name!r} needs its official weights: pass --weights DIR (or set $STAGEVAR_WEIGHTS) to a directory "
            f"holding {', '.join(ckpt_names.values())} and {text_dir_name}/ (from the FoundationVision/Infinity release "
            "and google/flan-t5-xl on Hugging Face). For speed-only runs use --random-weights."
        )
    tr_sd = checkpoints.load_state_dict_file(checkpoints.find(weights, ckpt_names["transformer"], name))
    vae_sd = checkpoints.load_state_dict_file(checkpoints.find(weights, ckpt_names["vae"], name))
    checkpoints.assign(adapter.transformer, tr_sd, f"{name} transformer ({ckpt_names['transformer']})",
                       resize={"cfg_uncond"}, derived=())
    checkpoints.assign(adapter.vae, vae_sd, f"{name} VAE ({ckpt_names['vae']})", optional_prefixes=("encoder.", "quant_conv."))
    text_dir = checkpoints.find(weights, text_dir_name, name, is_dir=True)
    from stagevar.models.text import T5TextEncoder
    adapter.text_encoder = T5TextEncoder(text_dir, device=device)
    return _finish(adapter, device, dtype)


def _register() -> None:
    from stagevar.models.catalog import register_model

    # random weights: its stages mean nothing, so its convergence curves use the record's images only
    @register_model("infinity-tiny", family="infinity", needs_weights=False,
                    description="Infinity at a tiny config (depth 2, width 128, 7 scales, 256px), seeded random weights; for tests",
                    calibration={"measure": {"stage_images": 0}})
    def infinity_tiny(weights=None, device="cpu", dtype=torch.float32, random_weights=True, seed: int = 0, **_):
        from stagevar.models.bsq_vae import BSQVAE, BSQVAEConfig
        adapter = InfinityAdapter("infinity-tiny", tiny_config(), BSQVAE(BSQVAEConfig.golden_tiny()))
        randomize_(adapter.transformer, seed=8765 + seed)
        randomize_(adapter.vae, seed=4321 + seed)
        if hasattr(adapter.vae, "reset_buffers"):
            adapter.vae.reset_buffers()
        return _finish(adapter, device, dtype)

    @register_model("infinity-2b", family="infinity", narrowable=True,
                    description="Infinity-2B (depth 32, width 2048), 1024px, 13 scales; weights infinity_2b_reg.pth + infinity_vae_d32_reg.pth")
    def infinity_2b(weights=None, device="cpu", dtype=torch.float32, random_weights=False, h_div_w: float = 1.0,
                    narrow: int | None = None, pn: str = "1M", **_):
        sched, grid = upstream_schedule(h_div_w, pn)
        cfg = InfinityConfig(depth=32, embed_dim=2048, num_heads=16, text_channels=2048, codebook_dim=32,
                             scale_schedule=tuple(sched), rope_grid=grid, block_chunks=8, cfg=3.0, tau=0.5)
        return _official("infinity-2b", cfg, "d32_reg",
                         {"transformer": "infinity_2b_reg.pth", "vae": "infinity_vae_d32_reg.pth"},
                         weights, device, dtype, random_weights, narrow=narrow)

    @register_model("infinity-8b", family="infinity", narrowable=True,
                    description="Infinity-8B (depth 40, width 3584, 2x2 spatial patchify), 1024px; weights infinity_8b_weights/ + infinity_vae_d56_f8_14_patchify.pth")
    def infinity_8b(weights=None, device="cpu", dtype=torch.float32, random_weights=False, h_div_w: float = 1.0,
                    narrow: int | None = None, pn: str = "1M", **_):
        sched, grid = upstream_schedule(h_div_w, pn)
        cfg = InfinityConfig(depth=40, embed_dim=3584, num_heads=28, text_channels=2048, codebook_dim=14,
                             scale_schedule=tuple(sched), rope_grid=grid, block_chunks=8, apply_spatial_patchify=True,
                             vae_stride=8, cfg=3.0, tau=0.5)
        return _official("infinity-8b", cfg, "d56_f8_14_patchify",
                         {"transformer": "infinity_8b_weights", "vae": "infinity_vae_d56_f8_14_patchify.pth"},
                         weights, device, dtype, random_weights, narrow=narrow)


def tiny_config(h_div_w: float = 1.0) -> InfinityConfig:
    """The configuration of the upstream-derived golden tensors (shared/reference, section B2)."""
    sched, grid = upstream_schedule(h_div_w, "0.06M")
    return InfinityConfig(depth=2, embed_dim=128, num_heads=2, text_channels=256, codebook_dim=32,
                          scale_schedule=tuple(sched), rope_grid=grid, block_chunks=2, cfg=3.0, tau=0.5, top_k=0, top_p=0.0)


_register()
