"""VAR (class-conditional next-scale prediction), written from the upstream description.

Facts (architecture, state-dict keys, numerics, the sampling loop) follow FoundationVision/VAR at
commit 78b9539: ``models/var.py`` (``VAR``, ``SharedAdaLin``, ``autoregressive_infer_cfg``,
``forward``), ``models/basic_var.py`` (``SelfAttention``, ``AdaLNSelfAttn``, ``AdaLNBeforeHead``,
``FFN``), ``models/helpers.py`` (top-k / top-p sampling) and ``models/__init__.py``
(``build_vae_var``: ``width = 64 * depth``, ``heads = depth``, MLP ratio 4, LayerNorm eps 1e-6).
:class:`VAR` reproduces upstream's ``state_dict()`` key for key and in order (buffers
``lvl_1L``, ``attn_bias_for_masking`` and ``zero_k_bias`` included), so the released
``var_d{16,20,24,30,36}.pth`` load directly; the tokenizer lives in :mod:`stagevar.models.vqvae`.

Pieces:
* :class:`VARConfig` - one architecture (d16 ... d36 and the tiny test model) + sampling defaults.
* :class:`VAR` - the transformer: class embedding (id ``num_classes`` = unconditional), AdaLN
  blocks with cosine attention and a KV cache, AdaLN head; ``forward`` is teacher forcing.
* :class:`VARAdapter` - the :class:`~stagevar.models.base.Adapter` the runtime drives, plus the
  plain upstream-order sampler (:meth:`VARAdapter.reference_generate`).
* Builders registered as ``var-d16``, ``var-d20``, ``var-d24``, ``var-d30``, ``var-d36`` (512 px,
  shared AdaLN) and ``var-tiny`` (the golden reference configuration, seeded random weights).

Legend: ``B`` rows, ``L`` tokens (all scales), ``l`` tokens of one scale, ``C`` width, ``D``
condition width (= C), ``H`` heads, ``c`` head width, ``V`` vocabulary (4096), ``Cv`` VQVAE
latent channels (32), ``hw`` spatial grid.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stagevar.guidance import GuidanceError, format_guidance, parse_guidance
from stagevar.models.layers import FFN
from stagevar.models import imagenet
from stagevar.models.base import Adapter, ConditionError, GenerationState, Schedule
from stagevar.models.kv_cache import KVCache, StaticKVCache
from stagevar.models.catalog import WeightsError, register_model
from stagevar.models.vqvae import VQVAE
from stagevar.ops.sampling import sample_top_k_top_p

log = logging.getLogger(__name__)

PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)
VAE_CHECKPOINT = "vae_ch160v4096z32"
HF_RELEASE = "https://huggingface.co/FoundationVision/var"

# Upstream clamps the learned attention temperature at log(100), computed in float32
# (``torch.log(torch.tensor(100)).item()``, basic_var.SelfAttention).
_MAX_SCALE_MUL = float(torch.log(torch.tensor(100.0)).item())


# ----------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class VARConfig:
    """Architecture of one VAR transformer and the VQVAE it decodes with, plus sampling defaults.

    Width and heads follow ``build_vae_var``: ``embed_dim = 64 * depth``, ``num_heads = depth``.

    >>> VARConfig(depth=16).embed_dim, VARConfig(depth=16).L
    (1024, 680)
    """

    depth: int
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    shared_aln: bool = False
    num_classes: int = 1000
    attn_l2_norm: bool = True
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    cond_drop_rate: float = 0.1
    vocab_size: int = 4096
    Cvae: int = 32
    vae_ch: int = 160
    share_quant_resi: int = 4
    # sampling defaults of upstream's demo_sample.ipynb
    cfg: float = 4.0
    top_k: int = 900
    top_p: float = 0.95
    width: int | None = None               # None: upstream's 64 * depth (another width: a narrowed structure)

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ValueError(f"VARConfig.depth must be >= 1, got {self.depth}")
        if self.width is not None and (self.width < self.depth or self.width % self.depth):
            raise ValueError(f"VARConfig.width must be a multiple of the {self.depth} heads, got {self.width}")
        if not self.patch_nums or list(self.patch_nums) != sorted(self.patch_nums):
            raise ValueError(f"VARConfig.patch_nums must be increasing, got {self.patch_nums}")
        object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))

    @property
    def embed_dim(self) -> int:
        return 64 * self.depth if self.width is None else self.width

    @property
    def num_heads(self) -> int:
        return self.depth

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.embed_dim * self.mlp_ratio)

    @property
    def L(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def first_l(self) -> int:
        return self.patch_nums[0] ** 2

    @property
    def begin_ends(self) -> list[tuple[int, int]]:
        """``(begin, end)`` token offsets of every scale in the flattened sequence."""
        out, cur = [], 0
        for p in self.patch_nums:
            out.append((cur, cur + p * p))
            cur += p * p
        return out

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * 16

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_nums"] = list(self.patch_nums)
        if d["width"] is None:                     # the upstream width: not part of the description
            del d["width"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VARConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown VARConfig keys: {sorted(unknown)} (known: {sorted(names)})")
        return cls(**dict(d))

    @classmethod
    def from_build_kwargs(cls, kwargs: Mapping[str, Any]) -> "VARConfig":
        """From the keyword arguments of upstream ``models.build_vae_var`` (as recorded in a
        reference directory's ``golden_meta.json``). Arguments that only select kernels or the
        training init (``device``, ``flash_if_available``, ``fused_if_available``, ``init_*``)
        are accepted and ignored; anything else unknown is an error.

        >>> VARConfig.from_build_kwargs({"depth": 2, "ch": 32, "V": 4096}).vae_ch
        32
        """
        rename = {"V": "vocab_size", "Cvae": "Cvae", "ch": "vae_ch", "share_quant_resi": "share_quant_resi",
                  "num_classes": "num_classes", "depth": "depth", "shared_aln": "shared_aln",
                  "attn_l2_norm": "attn_l2_norm", "patch_nums": "patch_nums"}
        ignored = {"device", "flash_if_available", "fused_if_available", "init_adaln", "init_adaln_gamma",
                   "init_head", "init_std"}
        out: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in rename:
                out[rename[key]] = tuple(value) if key == "patch_nums" else value
            elif key not in ignored:
                raise ValueError(f"unsupported build_vae_var argument {key!r}={value!r}; "
                                 f"supported: {sorted(rename)} (ignored: {sorted(ignored)})")
        return cls(**out)


# ----------------------------------------------------------------------------------------- layers
def ada_layer_norm(x_BLC: torch.Tensor, eps: float, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine, then ``* (1 + scale) + shift`` (``AdaLNSelfAttn.forward``)."""
    return F.layer_norm(x_BLC, (x_BLC.shape[-1],), None, None, eps).mul(scale.add(1)).add_(shift)


class SelfAttention(nn.Module):
    """``basic_var.SelfAttention``: fused qkv projection with biases ``[q_bias, 0, v_bias]``.

    With ``attn_l2_norm`` ("cosine" attention, every released model): ``q`` and ``k`` are
    L2-normalised per head, ``q`` is multiplied by ``exp(min(scale_mul_1H11, ln 100))`` and the
    softmax scale is 1; otherwise the scale is ``0.25 / sqrt(c)``.
    """

    def __init__(self, embed_dim: int, num_heads: int, attn_l2_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(embed_dim, 3 * embed_dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(embed_dim))
        self.v_bias = nn.Parameter(torch.zeros(embed_dim))
        self.register_buffer("zero_k_bias", torch.zeros(embed_dim))
        self.proj = nn.Linear(embed_dim, embed_dim)

    def forward(self, x_BLC: torch.Tensor, attn_bias: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """``attn_bias`` (additive, 0 / -inf) is the block-causal mask of teacher forcing; the
        KV-cached inference passes none: queries of a scale see every cached token."""
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                           # (B, H, L, c) each
        if self.attn_l2_norm:
            scale_mul = self.scale_mul_1H11.clamp_max(_MAX_SCALE_MUL).exp()
            q = F.normalize(q, dim=-1).mul(scale_mul)
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.append(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class SharedAdaLin(nn.Linear):
    """``var.SharedAdaLin``: one Linear(D, 6C) for all blocks, output viewed as (B, 1, 6, C)."""

    def forward(self, cond_BD: torch.Tensor) -> torch.Tensor:
        C = self.weight.shape[0] // 6
        return super().forward(cond_BD).view(-1, 1, 6, C)


class AdaLNSelfAttn(nn.Module):
    """``basic_var.AdaLNSelfAttn``: attention + FFN, each modulated by AdaLN.

    The six modulation vectors come, in the order ``gamma1, gamma2, scale1, scale2, shift1,
    shift2``, from the block's own ``ada_lin`` (SiLU -> Linear(D, 6C)) or, with shared AdaLN (d36),
    from ``ada_gss + shared_ada_lin(cond)``. :meth:`modulation` computes them once per
    condition; :meth:`forward` applies them.
    """

    def __init__(self, cfg: VARConfig):
        super().__init__()
        C = cfg.embed_dim
        self.C, self.eps, self.shared_aln = C, cfg.norm_eps, cfg.shared_aln
        if cfg.shared_aln:
            self.ada_gss = nn.Parameter(torch.zeros(1, 1, 6, C))
        self.attn = SelfAttention(C, cfg.num_heads, cfg.attn_l2_norm)
        self.ffn = FFN(C, cfg.mlp_hidden)
        if not cfg.shared_aln:
            self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(C, 6 * C))

    def modulation(self, cond_BD_or_gss: torch.Tensor) -> torch.Tensor:
        """(rows, D) condition, or the (rows, 1, 6, C) shared projection -> (rows, 1, 6, C)."""
        if self.shared_aln:
            return self.ada_gss + cond_BD_or_gss
        return self.ada_lin(cond_BD_or_gss).view(-1, 1, 6, self.C)

    def forward(self, x_BLC: torch.Tensor, mod_B16C: torch.Tensor, attn_bias: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mod_B16C.unbind(2)
        x_BLC = x_BLC + self.attn(ada_layer_norm(x_BLC, self.eps, scale1, shift1), attn_bias, cache).mul_(gamma1)
        x_BLC = x_BLC + self.ffn(ada_layer_norm(x_BLC, self.eps, scale2, shift2)).mul(gamma2)
        return x_BLC


class AdaLNBeforeHead(nn.Module):
    """``basic_var.AdaLNBeforeHead``: LayerNorm modulated by ``(scale, shift) = ada_lin(cond)``."""

    def __init__(self, C: int, D: int, eps: float):
        super().__init__()
        self.C, self.eps = C, eps
        self.ada_lin = nn.Sequential(nn.SiLU(inplace=False), nn.Linear(D, 2 * C))

    def modulation(self, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.ada_lin(cond_BD).view(-1, 1, 2, self.C)

    def modulate(self, x_BLC: torch.Tensor, mod_B12C: torch.Tensor) -> torch.Tensor:
        scale, shift = mod_B12C.unbind(2)
        return ada_layer_norm(x_BLC, self.eps, scale, shift)

    def forward(self, x_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        return self.modulate(x_BLC, self.modulation(cond_BD))


class VAR(nn.Module):
    """The VAR transformer (``var.VAR`` without the VQVAE, which upstream also keeps outside its
    module tree). ``state_dict()`` equals upstream's for the same configuration."""

    def __init__(self, cfg: VARConfig):
        super().__init__()
        self.cfg = cfg
        C, L = cfg.embed_dim, cfg.L
        self.num_classes = cfg.num_classes
        self.cond_drop_rate = cfg.cond_drop_rate
        # parameters and buffers of the module itself come first in upstream's state_dict
        self.pos_start = nn.Parameter(torch.zeros(1, cfg.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, L, C))
        self.register_buffer("lvl_1L", torch.zeros(1, L, dtype=torch.long))
        self.register_buffer("attn_bias_for_masking", torch.zeros(1, 1, L, L))
        self.word_embed = nn.Linear(cfg.Cvae, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)
        self.lvl_embed = nn.Embedding(len(cfg.patch_nums), C)
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(inplace=False), SharedAdaLin(C, 6 * C))
                               if cfg.shared_aln else nn.Identity())
        self.blocks = nn.ModuleList(AdaLNSelfAttn(cfg) for _ in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the derived buffers (needed after ``to_empty``): the level of every token
        ``lvl_1L`` (1, L), the block-causal mask ``attn_bias_for_masking`` (1, 1, L, L) (0 where
        level(query) >= level(key), else -inf) and the zero key bias of every attention."""
        dev = self.lvl_1L.device
        level = torch.cat([torch.full((p * p,), i, dtype=torch.long, device=dev)
                           for i, p in enumerate(self.cfg.patch_nums)])
        self.lvl_1L.copy_(level.view(1, -1))
        bias = torch.where(level[:, None] >= level[None, :], 0.0, float("-inf"))
        self.attn_bias_for_masking.copy_(bias.view(1, 1, *bias.shape))
        for blk in self.blocks:
            blk.attn.zero_k_bias.zero_()

    # ---- pieces shared by teacher forcing and inference
    def lvl_pos(self) -> torch.Tensor:
        """Level + absolute position embedding of every token, (1, L, C)."""
        return self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def condition(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """What the blocks' ``modulation`` takes: ``cond_BD`` or ``shared_ada_lin(cond_BD)`` (d36)."""
        return self.shared_ada_lin(cond_BD)

    def get_logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        """``VAR.get_logits``: AdaLN head norm (in float32) + linear head -> float32 logits."""
        return self.logits_from_modulation(h_BLC, self.head_nm.modulation(cond_BD))

    def logits_from_modulation(self, h_BLC: torch.Tensor, head_mod_B12C: torch.Tensor) -> torch.Tensor:
        """:meth:`get_logits` with the head modulation precomputed. The normalised hidden state
        is computed in float32 as upstream; the head runs in the parameters' dtype (what
        upstream's autocast does in reduced precision)."""
        x = self.head_nm.modulate(h_BLC.float(), head_mod_B12C).float()
        return self.head(x.to(self.head.weight.dtype)).float()

    # ---- teacher forcing
    def forward(self, label_B: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, *, return_hidden: bool = False):
        """Teacher-forced logits of every scale in one pass (``VAR.forward``), block-causal mask.

        ``x_BLCv_wo_first_l`` (B, L - first_l, Cv) is ``VectorQuantizer2.idxBl_to_var_input``
        of the ground-truth tokens (a prefix of the scales is accepted). In training mode labels
        are replaced by the unconditional id with probability ``cond_drop_rate``; unlike upstream
        (which drops even in eval mode) nothing is dropped in eval mode.
        Returns logits (B, L, V), or ``(logits, hidden)`` where ``hidden`` holds ``cond_BD``,
        ``x_block0_input`` and ``h_last_block_output``.
        """
        B = x_BLCv_wo_first_l.shape[0]
        L = self.cfg.first_l + x_BLCv_wo_first_l.shape[1]
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(B, device=label_B.device) < self.cond_drop_rate
            label_B = torch.where(drop, self.num_classes, label_B)
        sos = cond_BD = self.class_emb(label_B)
        sos = sos.unsqueeze(1).expand(B, self.cfg.first_l, -1) + self.pos_start.expand(B, self.cfg.first_l, -1)
        x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.to(sos.dtype))), dim=1)
        x_BLC = x_BLC + (self.lvl_embed(self.lvl_1L[:, :L].expand(B, -1)) + self.pos_1LC[:, :L])
        x0 = x_BLC
        attn_bias = self.attn_bias_for_masking[:, :, :L, :L].to(x_BLC.dtype)
        cond = self.condition(cond_BD)
        for blk in self.blocks:
            x_BLC = blk(x_BLC, blk.modulation(cond), attn_bias)
        logits = self.get_logits(x_BLC, cond_BD)
        if return_hidden:
            return logits, {"cond_BD": cond_BD, "x_block0_input": x0, "h_last_block_output": x_BLC}
        return logits


# ----------------------------------------------------------------------------------------- adapter
@dataclasses.dataclass
class VARState(GenerationState):
    labels: torch.Tensor = None           # (B,) class ids
    cfg: float = 1.0
    top_k: int = 0
    top_p: float = 0.0
    cond_BD: torch.Tensor = None          # (rows, C) class embeddings, cond rows then uncond rows
    block_mods: list = None               # per block (rows, 1, 6, C) AdaLN modulations
    head_mod: torch.Tensor = None         # (rows, 1, 2, C) head AdaLN modulation
    lvl_pos: torch.Tensor = None          # (1, L, C)
    caches: list = None                   # per block KVCache
    f_hat: torch.Tensor = None            # (B, Cv, H, W) accumulated latent
    next_input: torch.Tensor = None       # (B, l_next, C) input of scale next_k (before the row doubling)
    next_k: int = 0
    tokens: list = None                   # per scale (B, l) sampled ids


class VARAdapter(Adapter):
    """Runtime adapter for VAR: holds the transformer (``self.transformer``) and the VQVAE
    (``self.vae``). Their ``state_dict()``s are the two upstream checkpoints key for key.

    Conditions are class labels (LongTensor (B,)); id ``num_classes`` is the unconditional class.
    Upstream always doubles the batch (cond rows, then uncond rows) and guides with a ramp
    ``t = cfg * k / (N - 1)``: ``logits = (1 + t) * cond - t * uncond``.
    """

    family = "var"

    def __init__(self, name: str, cfg: VARConfig):
        super().__init__()
        self.name = name
        self.cfg = cfg
        self.transformer = VAR(cfg)
        self.vae = VQVAE(vocab_size=cfg.vocab_size, z_channels=cfg.Cvae, ch=cfg.vae_ch, patch_nums=cfg.patch_nums,
                         share_quant_resi=cfg.share_quant_resi)

    # ---- description
    @property
    def scale_schedule(self) -> Schedule:
        return [(1, p, p) for p in self.cfg.patch_nums]

    @property
    def num_layers(self) -> int:
        return self.cfg.depth

    @property
    def image_size(self) -> tuple[int, int]:
        return self.cfg.image_size, self.cfg.image_size

    def architecture(self) -> dict[str, Any]:
        d = self.cfg.to_dict()
        for k in ("cfg", "top_k", "top_p", "cond_drop_rate"):
            d.pop(k)
        d["family"] = self.family
        d["vae"] = self.vae.config_dict()
        return d

    @property
    def default_guidance(self) -> float:
        return self.cfg.cfg

    # ---- conditions
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Class prompts -> labels (B,). Accepted forms: ``"207"``, ``"class 207"``, an ImageNet
        class name or synonym (``"golden retriever"``, :mod:`stagevar.models.imagenet`) and
        ``"unconditional"`` (id ``num_classes``).

        >>> VARAdapter.parse_class_prompt("class 207", 1000), VARAdapter.parse_class_prompt("goldfish", 1000)
        (207, 1)
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ConditionError("no prompt given: pass at least one ImageNet class name or id, e.g. 'golden retriever' "
                                  "or 'class 207'")
        labels = [self.parse_class_prompt(p, self.cfg.num_classes) for p in prompts]
        return torch.tensor(labels, dtype=torch.long, device=self.device)

    @staticmethod
    def parse_class_prompt(prompt: Any, num_classes: int = 1000) -> int:
        """One prompt -> class id; raises :class:`ConditionError` naming the prompt."""
        if isinstance(prompt, bool):
            raise ConditionError(f"invalid class prompt {prompt!r}")
        if isinstance(prompt, int):
            value = prompt
        else:
            text = str(prompt).strip().lower()
            if text in ("unconditional", "uncond", "null"):
                return num_classes
            m = re.fullmatch(r"(?:class\s*)?(-?\d+)", text)
            if m is None:
                if num_classes != imagenet.NUM_CLASSES:
                    raise ConditionError(
                        f"cannot use prompt {prompt!r} as a class: this model has {num_classes} classes, not ImageNet's "
                        f"{imagenet.NUM_CLASSES}, so only class ids 0..{num_classes - 1} ('7', 'class 7') or "
                        "'unconditional' are understood")
                return imagenet.class_id(str(prompt))
            value = int(m.group(1))
        if not 0 <= value < num_classes:
            raise ConditionError(f"class id {value} (prompt {prompt!r}) is out of range: VAR knows classes 0..{num_classes - 1}")
        return value

    def _labels(self, condition: Any) -> torch.Tensor:
        """Class ids (B,) on the model's device. Values are checked on the host when they are there
        (ints, a CPU tensor); a tensor already on the device is checked there, without waiting."""
        n = self.cfg.num_classes
        if isinstance(condition, int) and not isinstance(condition, bool):
            condition = [condition]
        if isinstance(condition, torch.Tensor) and condition.device.type != "cpu":
            labels = condition.to(device=self.device, dtype=torch.long).reshape(-1)
            if labels.numel() == 0:
                raise ConditionError("empty condition: pass at least one class label")
            torch._assert_async(((labels >= 0) & (labels <= n)).all(), f"class labels must lie in 0..{n}")
            return labels
        if isinstance(condition, torch.Tensor):
            values = [int(v) for v in condition.reshape(-1).tolist()]
        elif isinstance(condition, (list, tuple)) and all(isinstance(c, int) and not isinstance(c, bool) for c in condition):
            values = list(condition)
        else:
            return self.encode_prompts(list(condition))
        if not values:
            raise ConditionError("empty condition: pass at least one class label")
        bad = [v for v in values if not 0 <= v <= n]
        if bad:
            raise ConditionError(f"class label {bad[0]} is out of range 0..{n} ({n} = unconditional)")
        return torch.tensor(values, dtype=torch.long, device=self.device)

    # ---- generation steps
    @torch.no_grad()
    def prepare(self, condition: Any, *, guidance: float, seed: int,
                top_k: int | None = None, top_p: float | None = None,
                kv_capacity: Sequence[int] | None = None) -> VARState:
        """Class embeddings for the cond rows and the unconditional rows (always both, as upstream),
        the per-block AdaLN modulations, empty KV caches and a zero latent; seeds the RNG.
        ``kv_capacity`` (tokens per block): static caches written in place."""
        tr = self.transformer
        cfg = parse_guidance(guidance)
        if not isinstance(cfg, float):
            raise GuidanceError(f"guidance {format_guidance(cfg)}: VAR takes one number; it ramps the "
                                "guidance over the scales itself (upstream's t = cfg * k / (N - 1))")
        labels = self._labels(condition)
        B = labels.shape[0]
        cond_BD = tr.class_emb(torch.cat((labels, torch.full_like(labels, tr.num_classes))))
        cond = tr.condition(cond_BD)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(int(seed))
        H = W = self.cfg.patch_nums[-1]
        return VARState(
            batch_size=B, guided=True, generator=gen, labels=labels, cfg=cfg,
            top_k=self.cfg.top_k if top_k is None else int(top_k),
            top_p=self.cfg.top_p if top_p is None else float(top_p),
            cond_BD=cond_BD, block_mods=[blk.modulation(cond) for blk in tr.blocks],
            head_mod=tr.head_nm.modulation(cond_BD), lvl_pos=tr.lvl_pos(),
            caches=[KVCache() for _ in tr.blocks] if kv_capacity is None else self._static_caches(2 * B, kv_capacity),
            f_hat=cond_BD.new_zeros(B, self.cfg.Cvae, H, W, dtype=self.vae.post_quant_conv.weight.dtype),
            next_input=None, next_k=0, tokens=[],
        )

    def _static_caches(self, rows: int, capacity: Sequence[int]) -> list[StaticKVCache]:
        cfg = self.cfg
        if len(capacity) != cfg.depth:
            raise ValueError(f"kv_capacity has {len(capacity)} entries, the model has {cfg.depth} blocks")
        dtype = self.transformer.word_embed.weight.dtype
        return [StaticKVCache(rows, cfg.num_heads, int(n), cfg.head_dim, dtype, dtype, self.device) for n in capacity]

    def condition_signature(self, condition: Any) -> tuple[int]:
        return (int(self._labels(condition).shape[0]),)

    def runs_unconditional(self, guidance: Any) -> bool:
        return True                                 # upstream VAR always runs both branches

    def state_inputs(self, state: VARState) -> dict[str, torch.Tensor]:
        out = {"cond_BD": state.cond_BD, "head_mod": state.head_mod, "lvl_pos": state.lvl_pos, "f_hat": state.f_hat}
        for i, m in enumerate(state.block_mods):
            out[f"block_mods.{i}"] = m
        return out

    def sampling_noise_shape(self, batch_size: int, k: int) -> tuple[int, int]:
        pn = self.cfg.patch_nums[k]
        return batch_size * pn * pn, self.cfg.vocab_size

    @torch.no_grad()
    def scale_input(self, state: VARState, k: int) -> torch.Tensor:
        """Scale 0: ``sos + pos_start + lvl_pos`` per row; later scales: ``word_embed`` of the
        area-downsampled latent + ``lvl_pos`` (absolute positions included), repeated per branch."""
        tr, first_l, rows = self.transformer, self.cfg.first_l, state.rows
        if k == 0:
            sos = state.cond_BD
            return (sos.unsqueeze(1).expand(rows, first_l, -1) + tr.pos_start.expand(rows, first_l, -1)
                    + state.lvl_pos[:, :first_l])
        if state.next_input is None or state.next_k != k:
            raise RuntimeError(f"scale_input(k={k}) needs update(k={k - 1}) first (next input is for scale {state.next_k})")
        x = state.next_input
        return x.repeat(rows // x.shape[0], 1, 1)

    @torch.no_grad()
    def forward_layers(self, state: VARState, k: int, x_BLC: torch.Tensor, layers: range,
                       positions: torch.Tensor | None = None) -> torch.Tensor:
        """Run blocks ``layers`` without a mask (the KV cache makes attention block-causal) and
        append the tokens' keys/values to each block's cache. VAR's positions are absolute
        embeddings already added by :meth:`scale_input`, so a subset needs nothing more."""
        if x_BLC.shape[0] != state.rows:
            raise ValueError(f"x_BLC has {x_BLC.shape[0]} rows but the state has {state.rows}")
        if positions is not None and tuple(positions.shape) != tuple(x_BLC.shape[:2]):
            raise ValueError(f"positions {tuple(positions.shape)} do not match x_BLC {tuple(x_BLC.shape[:2])}")
        blocks = self.transformer.blocks
        for i in layers:
            x_BLC = blocks[i](x_BLC, state.block_mods[i], None, state.caches[i])
        return x_BLC

    @torch.no_grad()
    def head(self, state: VARState, k: int, h_BLC: torch.Tensor) -> torch.Tensor:
        tr = self.transformer
        mod = state.head_mod if h_BLC.shape[0] == state.head_mod.shape[0] else state.head_mod[: h_BLC.shape[0]]
        return tr.logits_from_modulation(h_BLC, mod)

    def guidance_weight(self, state: VARState, k: int) -> float:
        """Upstream's ramp ``t = cfg * k / (N - 1)`` (scale 0 is never guided)."""
        ratio = k / (len(self.cfg.patch_nums) - 1)
        return state.cfg * ratio

    def guide(self, state: VARState, k: int, logits_BLV: torch.Tensor) -> torch.Tensor:
        B = state.batch_size
        if not state.guided:
            return logits_BLV[:B]
        t = self.guidance_weight(state, k)
        return (1 + t) * logits_BLV[:B] - t * logits_BLV[B:]

    def sample(self, state: VARState, k: int, logits_BLV: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Top-k / top-p multinomial sampling with ``state.generator`` -> token ids (B, l)."""
        return sample_top_k_top_p(logits_BLV, top_k=state.top_k, top_p=state.top_p, generator=state.generator,
                                  noise=noise)

    @torch.no_grad()
    def update(self, state: VARState, k: int, codes: torch.Tensor) -> None:
        """Accumulate ``Phi_k(upsample(embedding(codes)))`` into ``f_hat`` and build the input of
        scale ``k + 1`` (``VectorQuantizer2.get_next_autoregressive_input``)."""
        quant, B, pn = self.vae.quantize, state.batch_size, self.cfg.patch_nums[k]
        h_BChw = quant.embed_idx(codes.reshape(B, pn * pn), pn)
        state.f_hat, nxt = quant.get_next_autoregressive_input(k, state.f_hat, h_BChw)
        state.tokens.append(codes)
        if nxt is None:
            state.next_input, state.next_k = None, k + 1
            return
        state.next_input = self._embed_next(state.lvl_pos, nxt, k + 1)
        state.next_k = k + 1

    def _embed_next(self, lvl_pos: torch.Tensor, next_BChw: torch.Tensor, k: int) -> torch.Tensor:
        tr = self.transformer
        B = next_BChw.shape[0]
        begin, end = self.cfg.begin_ends[k]
        x = next_BChw.reshape(B, self.cfg.Cvae, -1).transpose(1, 2).to(tr.word_embed.weight.dtype)
        return tr.word_embed(x) + lvl_pos[:, begin:end]

    def drop_unconditional(self, state: VARState) -> None:
        if not state.guided:
            return
        B = state.batch_size
        state.cond_BD = state.cond_BD[:B]
        state.block_mods = [m[:B] for m in state.block_mods]
        state.head_mod = state.head_mod[:B]
        for c in state.caches:
            c.select_rows(B)
        state.guided = False

    @torch.no_grad()
    def decode(self, state: VARState) -> torch.Tensor:
        """``VQVAE.fhat_to_img`` (decoder, clamp to [-1, 1]) mapped to [0, 1]."""
        f_hat = state.f_hat.to(self.vae.post_quant_conv.weight.dtype)
        return self.vae.fhat_to_img01(f_hat)

    def finish(self, state: VARState) -> None:
        state.caches = None
        state.block_mods = None

    # ---- the plain sampler
    @torch.no_grad()
    def reference_latent(self, condition: Any, *, guidance: float, seed: int, top_k: int | None = None,
                         top_p: float | None = None, trace: dict | None = None,
                         force_tokens: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """``VAR.autoregressive_infer_cfg`` (``more_smooth=False``) written as one loop, up to the
        latent: returns ``f_hat`` (B, Cv, H, W).

        ``trace`` (optional dict) receives per scale ``guided_logits``, ``raw_logits`` (2B rows)
        and ``tokens``; ``force_tokens`` replaces the sampled ids of each scale (teacher-forced
        inference for reference checks; the RNG is still consumed as in free running)."""
        tr, quant, cfg = self.transformer, self.vae.quantize, self.cfg
        labels = self._labels(condition)
        B, N = labels.shape[0], len(cfg.patch_nums)
        top_k = cfg.top_k if top_k is None else int(top_k)
        top_p = cfg.top_p if top_p is None else float(top_p)
        rng = torch.Generator(device=self.device)
        rng.manual_seed(int(seed))

        sos = cond_BD = tr.class_emb(torch.cat((labels, torch.full_like(labels, tr.num_classes))))
        lvl_pos = tr.lvl_pos()
        x = (sos.unsqueeze(1).expand(2 * B, cfg.first_l, -1) + tr.pos_start.expand(2 * B, cfg.first_l, -1)
             + lvl_pos[:, :cfg.first_l])
        f_hat = sos.new_zeros(B, cfg.Cvae, cfg.patch_nums[-1], cfg.patch_nums[-1],
                              dtype=self.vae.post_quant_conv.weight.dtype)
        caches = [KVCache() for _ in tr.blocks]
        for si, pn in enumerate(cfg.patch_nums):
            ratio = si / (N - 1)
            cond = tr.condition(cond_BD)
            for blk, cache in zip(tr.blocks, caches):
                x = blk(x, blk.modulation(cond), None, cache)
            logits = tr.get_logits(x, cond_BD)
            t = guidance * ratio
            guided = (1 + t) * logits[:B] - t * logits[B:]
            idx = sample_top_k_top_p(guided, top_k=top_k, top_p=top_p, generator=rng)
            if force_tokens is not None:
                idx = force_tokens[si].to(idx.device).reshape(B, pn * pn)
            if trace is not None:
                trace.setdefault("raw_logits", []).append(logits)
                trace.setdefault("guided_logits", []).append(guided)
                trace.setdefault("tokens", []).append(idx)
            f_hat, nxt = quant.get_next_autoregressive_input(si, f_hat, quant.embed_idx(idx, pn))
            if nxt is not None:
                x = self._embed_next(lvl_pos, nxt, si + 1).repeat(2, 1, 1)
        if trace is not None:
            trace["f_hat"] = f_hat
            trace["cond_BD"] = cond_BD
        return f_hat

    @torch.no_grad()
    def reference_generate(self, condition: Any, *, guidance: float, seed: int, top_k: int | None = None,
                           top_p: float | None = None, trace: dict | None = None,
                           force_tokens: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Upstream ``autoregressive_infer_cfg`` as one loop -> images (B, 3, H, W) in [0, 1]."""
        f_hat = self.reference_latent(condition, guidance=guidance, seed=seed, top_k=top_k, top_p=top_p,
                                      trace=trace, force_tokens=force_tokens)
        return self.vae.fhat_to_img01(f_hat)


# ----------------------------------------------------------------------------------------- weights
# Buffers that are derived from the configuration (recomputed, never taken from a file) or are
# training statistics; a checkpoint may or may not contain them.
_VAR_DERIVED = re.compile(r"^(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)$")
_VAE_DERIVED = re.compile(r"^quantize\.ema_vocab_hit_SV$")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.pth`` (``torch.load(..., weights_only=True, mmap=True)``) or ``.safetensors``
    (see :func:`stagevar.models.checkpoints.load_state_dict_file`)."""
    from stagevar.models.checkpoints import load_state_dict_file
    return load_state_dict_file(Path(path))


def _few(keys: Sequence[str], n: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_checked_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
                            derived: re.Pattern | None = None,
                            allow_missing: Callable[[str], bool] | None = None) -> None:
    """Load ``state_dict`` into ``module`` after checking it key for key and shape for shape.

    Keys matching ``derived`` may be absent (and are ignored when present); keys for which
    ``allow_missing(key)`` is true may be absent. Any other missing key, unexpected key or shape
    mismatch raises :class:`WeightsError` naming the first few. Values are cast to the module's
    dtype on copy (e.g. bf16 files into a float32 model).
    """
    own = module.state_dict()
    is_derived = (lambda k: bool(derived.match(k))) if derived is not None else (lambda k: False)
    allowed = allow_missing or (lambda k: False)
    missing = [k for k in own if k not in state_dict and not is_derived(k) and not allowed(k)]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        raise WeightsError(
            f"{source} does not match {type(module).__name__} ({'; '.join(parts)}). "
            "Is it the right checkpoint for this model? The VAR checkpoints are the plain state dicts "
            f"var_d<depth>.pth and {VAE_CHECKPOINT}.pth of the FoundationVision/VAR release ({HF_RELEASE}).")
    bad_shapes = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state_dict.items()
                  if not is_derived(k) and tuple(v.shape) != tuple(own[k].shape)]
    if bad_shapes:
        raise WeightsError(f"{source}: tensor shapes do not match {type(module).__name__}: {_few(bad_shapes, 3)}")
    to_load = {k: v for k, v in state_dict.items() if not is_derived(k)}
    nn.Module.load_state_dict(module, to_load, strict=False)


def _fan_in(shape: Sequence[int]) -> int:
    return math.prod(shape) // shape[0]


@torch.no_grad()
def randomize_(module: nn.Module, seed: int, overrides: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
               *, round_to_bf16: bool = False, device: torch.device | str = "cpu") -> None:
    """Seeded random weights that keep every part of the network visible (unlike the training
    init, which zeroes biases and scales AdaLN gamma by 1e-5). The recipe of the reference data
    (``shared/reference/README.md`` B): one generator over ``named_parameters()`` in order,
    ``z = randn(shape)``; ``*bias`` 0.1 z; 1-D ``weight`` 1 + 0.1 z; ``scale_mul_1H11`` ln 4 + 0.3 z;
    >=2-D ``weight`` z / sqrt(fan_in); anything else 0.5 z; ``overrides[name](z, param)`` first.
    With ``round_to_bf16`` the values are rounded to bfloat16-representable floats (as the
    golden files store them)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    for name, p in module.named_parameters():
        z = torch.randn(tuple(p.shape), generator=gen, device=device, dtype=torch.float32)
        if name in overrides:
            val = overrides[name](z, p)
        elif name.endswith("bias"):
            val = 0.1 * z
        elif name.endswith("scale_mul_1H11"):
            val = math.log(4.0) + 0.3 * z
        elif name.endswith("weight") and p.ndim == 1:
            val = 1 + 0.1 * z
        elif name.endswith("weight") and p.ndim >= 2:
            val = z / math.sqrt(_fan_in(p.shape))
        else:
            val = 0.5 * z
        if round_to_bf16:
            val = val.bfloat16().float()
        p.copy_(val)


def randomize_var_(transformer: VAR, seed: int, **kw) -> None:
    """:func:`randomize_` with VAR's overrides (class_emb 1.0 z; lvl_embed, pos_1LC, pos_start 0.5 z;
    head 4 z / sqrt(C))."""
    C = transformer.cfg.embed_dim
    half = lambda z, p: 0.5 * z  # noqa: E731
    randomize_(transformer, seed, {
        "class_emb.weight": lambda z, p: 1.0 * z,
        "lvl_embed.weight": half, "pos_1LC": half, "pos_start": half,
        "head.weight": lambda z, p: z * (4 / math.sqrt(C)),
    }, **kw)


def randomize_vae_(vae: VQVAE, seed: int, **kw) -> None:
    """:func:`randomize_` with the VQVAE's override (codebook 1.0 z)."""
    randomize_(vae, seed, {"quantize.embedding.weight": lambda z, p: 1.0 * z}, **kw)


# ----------------------------------------------------------------------------------------- builders
def materialize(name: str, cfg: VARConfig, device: torch.device | str, dtype: torch.dtype) -> VARAdapter:
    """Build on the meta device (no memory, no init cost), then allocate on ``device``
    (uninitialised) with the transformer in ``dtype`` and the VQVAE in float32 (or ``dtype``
    when that is float64), and recompute the derived buffers. Weights must be loaded next."""
    with torch.device("meta"):
        adapter = VARAdapter(name, cfg)
    adapter.transformer.to(dtype=dtype)
    adapter.vae.to(dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    adapter.to_empty(device=device)
    adapter.transformer.reset_buffers()
    adapter.vae.quantize.ema_vocab_hit_SV.zero_()
    adapter.eval()
    adapter.requires_grad_(False)
    return adapter


def weight_files(weights: Path, depth: int) -> tuple[Path, Path]:
    """Locate ``var_d{depth}`` and the VQVAE checkpoint (``.pth`` or ``.safetensors``) in a
    directory (a file path means its directory). Raises :class:`WeightsError` listing what is missing."""
    folder = weights if weights.is_dir() else weights.parent
    found, missing = [], []
    for stem in (f"var_d{depth}", VAE_CHECKPOINT):
        cands = [folder / f"{stem}.pth", folder / f"{stem}.safetensors"]
        hit = next((c for c in cands if c.is_file()), None)
        if hit is None:
            missing.append(f"{stem}.pth")
        found.append(hit)
    if missing:
        raise WeightsError(
            f"VAR weights not found in {folder}: missing {', '.join(missing)}. The directory must contain "
            f"var_d{depth}.pth and {VAE_CHECKPOINT}.pth (or .safetensors) from the FoundationVision/VAR release "
            f"on Hugging Face ({HF_RELEASE}); pass it with --weights DIR or $STAGEVAR_WEIGHTS.")
    return found[0], found[1]


def build_var(name: str, cfg: VARConfig, *, weights: Path | str | None = None, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, random_weights: bool = False, seed: int = 0) -> VARAdapter:
    """Build a VAR adapter: official weights from a directory, or seeded random weights."""
    device = torch.device(device)
    if random_weights:
        adapter = materialize(name, cfg, device, dtype)
        randomize_var_(adapter.transformer, seed, device=device)
        randomize_vae_(adapter.vae, seed + 1, device=device)
        log.info("built %s with seeded random weights (seed %d)", name, seed)
        return adapter
    if weights is None:
        raise WeightsError(
            f"{name} needs weights: pass --weights DIR (or set $STAGEVAR_WEIGHTS) to a directory with "
            f"var_d{cfg.depth}.pth and {VAE_CHECKPOINT}.pth from the FoundationVision/VAR release on Hugging Face "
            f"({HF_RELEASE}), or use random weights for speed measurements.")
    var_path, vae_path = weight_files(Path(weights), cfg.depth)
    var_sd, vae_sd = read_state_dict(var_path), read_state_dict(vae_path)
    # check both files against the meta model before allocating anything
    with torch.device("meta"):
        probe = VARAdapter(name, cfg)
    load_checked_state_dict(probe.transformer, _meta_view(var_sd), source=str(var_path), derived=_VAR_DERIVED)
    load_checked_state_dict(probe.vae, _meta_view(vae_sd), source=str(vae_path), derived=_VAE_DERIVED)
    del probe
    adapter = materialize(name, cfg, device, dtype)
    load_checked_state_dict(adapter.transformer, var_sd, source=str(var_path), derived=_VAR_DERIVED)
    load_checked_state_dict(adapter.vae, vae_sd, source=str(vae_path), derived=_VAE_DERIVED)
    log.info("loaded %s from %s and %s", name, var_path, vae_path)
    return adapter


def _meta_view(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(tuple(v.shape), device="meta", dtype=v.dtype) for k, v in sd.items()}


#: The golden reference configuration (``shared/reference/README.md`` B1): depth 2, width 128,
#: the ch=32 VQVAE, weights drawn with seeds 5678 (VAR) and 1234 (VQVAE), rounded to bf16.
TINY_CONFIG = VARConfig(depth=2, vae_ch=32)
TINY_SEEDS = {"var": 5678, "vqvae": 1234}

_CONFIGS = {
    "var-d16": VARConfig(depth=16),
    "var-d20": VARConfig(depth=20),
    "var-d24": VARConfig(depth=24),
    "var-d30": VARConfig(depth=30),
    "var-d36": VARConfig(depth=36, shared_aln=True, patch_nums=PATCH_NUMS_512),
}


def _register_official(name: str, description: str) -> None:
    cfg = _CONFIGS[name]

    @register_model(name, description=description, family="var", narrowable=True)
    def build(weights=None, device="cpu", dtype=torch.float32, random_weights=False, narrow=None) -> VARAdapter:
        if narrow is not None:
            from stagevar.errors import StageVarError
            if narrow < cfg.depth or narrow % cfg.depth:
                raise StageVarError(f"--narrow {narrow}: the width must be a multiple of {name}'s {cfg.depth} heads "
                                    f"(e.g. {2 * cfg.depth}).")
            return build_var(name, dataclasses.replace(cfg, width=int(narrow)), device=device, dtype=dtype, random_weights=True)
        return build_var(name, cfg, weights=weights, device=device, dtype=dtype, random_weights=random_weights)

    build.__name__ = f"build_{name.replace('-', '_')}"


_register_official("var-d16", "VAR-d16 (310M), ImageNet 256x256 class-conditional, 10 scales")
_register_official("var-d20", "VAR-d20 (600M), ImageNet 256x256 class-conditional, 10 scales")
_register_official("var-d24", "VAR-d24 (1.0B), ImageNet 256x256 class-conditional, 10 scales")
_register_official("var-d30", "VAR-d30 (2.0B), ImageNet 256x256 class-conditional, 10 scales")
_register_official("var-d36", "VAR-d36-s (2.3B, shared AdaLN), ImageNet 512x512 class-conditional, 10 scales")


@register_model("var-tiny", description="tiny VAR (depth 2, width 128, ch-32 VQVAE) with the seeded weights of the "
                "reference golden files; for tests", family="var", needs_weights=False)
def build_var_tiny(weights=None, device="cpu", dtype=torch.float32, random_weights=False) -> VARAdapter:
    """The golden configuration with its weights regenerated from the seeds (no file needed).

    The weights are drawn on the CPU in float32 (so they are the golden values on every device),
    then moved to ``device`` / ``dtype``."""
    adapter = materialize("var-tiny", TINY_CONFIG, torch.device("cpu"), torch.float32)
    randomize_var_(adapter.transformer, TINY_SEEDS["var"], round_to_bf16=True)
    randomize_vae_(adapter.vae, TINY_SEEDS["vqvae"], round_to_bf16=True)
    adapter.transformer.to(device=device, dtype=dtype)
    adapter.vae.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return adapter
