"""VAR's multi-scale VQVAE ("VQVAE ch160 v4096 z32"), written from the upstream description.

Facts follow FoundationVision/VAR at commit 78b9539: ``models/vqvae.py`` (:class:`VQVAE`),
``models/quant.py`` (``VectorQuantizer2``, ``Phi``, ``PhiPartiallyShared``) and
``models/basic_vae.py`` (the taming/latent-diffusion ``Encoder`` / ``Decoder``, ``vq-f16`` config:
``ch_mult=(1, 1, 2, 2, 4)``, two residual blocks per level, self-attention at the lowest level and
in the middle, GroupNorm(32, eps 1e-6), SiLU). The module tree reproduces upstream's
``state_dict()`` key for key and in order, so ``vae_ch160v4096z32.pth`` loads directly.

The quantiser is residual and multi-scale: a 16x16 latent ``f_hat`` is the sum over scales ``k``
of ``Phi_k(upsample(embedding(idx_k)))``, where ``Phi_k(h) = (1 - r) h + r conv3x3_k(h)`` with
``r = 0.5`` and four convolutions shared between the ten scales.

Legend: ``B`` batch, ``C`` channels (``Cvae`` = 32 latent channels), ``h w`` / ``H W`` spatial
grid, ``l`` tokens of one scale (``pn * pn``), ``L`` tokens of all scales, ``V`` vocabulary.
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["VQVAE", "VectorQuantizer2", "Phi", "phi_index", "Encoder", "Decoder"]


# ----------------------------------------------------------------------------------------- blocks
def group_norm(channels: int) -> nn.GroupNorm:
    """``basic_vae.Normalize``: GroupNorm with 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block (``basic_vae.ResnetBlock``); 1x1 ``nin_shortcut`` when the
    channel count changes. Dropout is omitted (0 in every VAR configuration)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x_BChw)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x_BChw) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with a fused 1x1 ``qkv`` conv (``basic_vae.AttnBlock``):
    ``x + proj_out(softmax(q k^T / sqrt(C)) v)`` over the h*w positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        B, C, h, w = x_BChw.shape
        q, k, v = self.qkv(self.norm(x_BChw)).reshape(B, 3, C, h * w).unbind(1)   # each (B, C, hw)
        # Two explicit batched matmuls in upstream's association (scores scaled after the
        # product): this keeps the decoded image bit-identical to upstream's on CPU, which a
        # fused attention kernel does not (~3e-6 differences).
        attn_BLL = torch.bmm(q.transpose(1, 2), k).mul_(C ** -0.5).softmax(dim=2)   # [query, key]
        out_BChw = torch.bmm(v, attn_BLL.transpose(1, 2)).reshape(B, C, h, w)
        return x_BChw + self.proj_out(out_BChw)


class Upsample2x(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv (``basic_vae.Upsample2x``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x_BChw, scale_factor=2, mode="nearest"))


class Downsample2x(nn.Module):
    """Pad right/bottom by one, then a stride-2 3x3 conv (``basic_vae.Downsample2x``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x_BChw, (0, 1, 0, 1)))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), ``attn`` (AttnBlocks, lowest level only)
    and an optional ``downsample`` / ``upsample`` - upstream builds these as bare ``nn.Module``s."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, blk in enumerate(self.block):
            h = blk(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, using_sa: bool):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels) if using_sa else nn.Identity()
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> latent (B, z, H/16, W/16) (``basic_vae.Encoder``)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 in_channels: int = 3, using_sa: bool = True, using_mid_sa: bool = True):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, 1, 1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        block_in = ch
        for lvl in range(n):
            block_in, block_out = ch * in_mult[lvl], ch * ch_mult[lvl]
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if lvl == n - 1 and using_sa:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if lvl != n - 1:
                level.downsample = Downsample2x(block_in)
            self.down.append(level)
        self.mid = _Mid(block_in, using_mid_sa)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x_BChw: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x_BChw)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, 3, 16h, 16w), unclamped (``basic_vae.Decoder``).

    ``up[i]`` is the level at resolution ``i`` (0 = full resolution); the forward pass walks them
    from the lowest resolution up, as upstream (which builds the list by prepending)."""

    def __init__(self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 in_channels: int = 3, using_sa: bool = True, using_mid_sa: bool = True):
        super().__init__()
        n = len(ch_mult)
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = _Mid(block_in, using_mid_sa)
        levels: list[nn.Module] = []
        for lvl in reversed(range(n)):
            block_out = ch * ch_mult[lvl]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if lvl == n - 1 and using_sa:
                    attns.append(AttnBlock(block_in))
            level = _Level(blocks, attns)
            if lvl != 0:
                level.upsample = Upsample2x(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, in_channels, 3, 1, 1)

    def forward(self, z_BChw: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z_BChw))
        for level in reversed(self.up):
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------- quantiser
class Phi(nn.Conv2d):
    """``quant.Phi``: ``(1 - r) h + r conv3x3(h)``, the residual refinement of an upsampled scale."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h_BChw: torch.Tensor) -> torch.Tensor:
        return h_BChw.mul(1 - self.resi_ratio) + super().forward(h_BChw).mul_(self.resi_ratio)


def phi_ticks(count: int) -> np.ndarray:
    """Anchor positions in [0, 1] of ``count`` shared Phi convs (``quant.PhiPartiallyShared``):
    ``linspace(1/(3K), 1-1/(3K), K)`` for K = 4, else ``linspace(1/(2K), 1-1/(2K), K)``."""
    if count == 4:
        return np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count)
    return np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)


def phi_index(si: int, num_scales: int, count: int) -> int:
    """Which of ``count`` Phi convs scale ``si`` (of ``num_scales``) uses: the tick nearest to
    ``si / (num_scales - 1)``.

    Computed in float64 numpy exactly as upstream: for 10 scales, ``si = 2`` is an exact tie in
    real arithmetic (2/9 is 5/36 from 1/12 and from 13/36) and float64 rounding picks index 1.

    >>> [phi_index(si, 10, 4) for si in range(10)]
    [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    """
    at = si / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(phi_ticks(count) - at)).item())


class PhiPartiallyShared(nn.Module):
    """``K`` Phi convs shared between scales by position (``quant.PhiPartiallyShared``)."""

    def __init__(self, qresi_ls: nn.ModuleList):
        super().__init__()
        self.qresi_ls = qresi_ls

    def for_scale(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi_ls[phi_index(si, num_scales, len(self.qresi_ls))]


class PhiShared(nn.Module):
    """One Phi conv for every scale (``quant.PhiShared``, ``share_quant_resi=1``)."""

    def __init__(self, qresi: nn.Module):
        super().__init__()
        self.qresi = qresi

    def for_scale(self, si: int, num_scales: int) -> nn.Module:
        return self.qresi


class PhiNonShared(nn.ModuleList):
    """One Phi conv per anchor, picked like the partially shared case (``quant.PhiNonShared``)."""

    def for_scale(self, si: int, num_scales: int) -> nn.Module:
        return self[phi_index(si, num_scales, len(self))]


class VectorQuantizer2(nn.Module):
    """Multi-scale residual quantiser (``quant.VectorQuantizer2``), inference paths only.

    Holds the codebook ``embedding`` (V, Cvae), the Phi convs ``quant_resi`` and upstream's
    training statistic buffer ``ema_vocab_hit_SV`` (kept for checkpoint compatibility).
    """

    def __init__(self, vocab_size: int, Cvae: int, patch_nums: Sequence[int], quant_resi: float = 0.5,
                 share_quant_resi: int = 4, default_qresi_counts: int = 0, using_znorm: bool = False):
        super().__init__()
        self.vocab_size, self.Cvae = vocab_size, Cvae
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.using_znorm = using_znorm

        def make_phi() -> nn.Module:
            return Phi(Cvae, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        if share_quant_resi == 0:
            self.quant_resi = PhiNonShared([make_phi() for _ in range(default_qresi_counts or len(self.patch_nums))])
        elif share_quant_resi == 1:
            self.quant_resi = PhiShared(make_phi())
        else:
            self.quant_resi = PhiPartiallyShared(nn.ModuleList([make_phi() for _ in range(share_quant_resi)]))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, Cvae)
        # the Phi conv of every scale, looked up once (a plain tuple: the modules stay registered above)
        self._phi_by_scale = tuple(self.quant_resi.for_scale(si, self.num_scales) for si in range(self.num_scales))

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def phi(self, si: int) -> nn.Module:
        """The Phi conv of scale ``si``."""
        return self._phi_by_scale[si]

    # ---- codes <-> latent
    def embed_idx(self, idx_Bl: torch.Tensor, pn: int) -> torch.Tensor:
        """Codebook lookup: token ids (B, pn*pn) in row-major order -> ``h_BChw`` (B, Cvae, pn, pn)."""
        B = idx_Bl.shape[0]
        return self.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)

    def add_scale(self, si: int, f_hat_BChw: torch.Tensor, h_BChw: torch.Tensor) -> torch.Tensor:
        """``f_hat += Phi_si(bicubic_upsample(h))`` in place (no upsampling at the last scale);
        returns ``f_hat``. Bicubic uses ``align_corners=False`` (``F.interpolate`` default)."""
        H, W = f_hat_BChw.shape[-2:]
        if h_BChw.shape[-2:] != (H, W):
            h_BChw = F.interpolate(h_BChw, size=(H, W), mode="bicubic")
        return f_hat_BChw.add_(self.phi(si)(h_BChw))

    @staticmethod
    def area_downsample(f_hat_BChw: torch.Tensor, pn: int) -> torch.Tensor:
        """Adaptive average ("area") downsampling of ``f_hat`` to (pn, pn): the next scale's input."""
        return F.interpolate(f_hat_BChw, size=(pn, pn), mode="area")

    def get_next_autoregressive_input(self, si: int, f_hat_BChw: torch.Tensor,
                                      h_BChw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One inference step (``VectorQuantizer2.get_next_autoregressive_input``): accumulate scale
        ``si`` into ``f_hat`` (in place) and return ``(f_hat, next_BChw)`` where ``next_BChw`` is
        ``f_hat`` area-downsampled to scale ``si + 1`` (None after the last scale)."""
        self.add_scale(si, f_hat_BChw, h_BChw)
        if si == self.num_scales - 1:
            return f_hat_BChw, None
        return f_hat_BChw, self.area_downsample(f_hat_BChw, self.patch_nums[si + 1])

    def idxBl_to_var_input(self, idx_Bl_list: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """Teacher-forcing input of VAR (``VectorQuantizer2.idxBl_to_var_input``): the sequence of
        next-scale inputs produced by accumulating scales 0..N-2, concatenated -> (B, L - l_0, Cvae).

        >>> q = VectorQuantizer2(16, 4, (1, 2))
        >>> q.idxBl_to_var_input([torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)]).shape
        torch.Size([3, 4, 4])
        """
        B = idx_Bl_list[0].shape[0]
        H = W = self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
        pieces = []
        for si in range(self.num_scales - 1):
            self.add_scale(si, f_hat, self.embed_idx(idx_Bl_list[si], self.patch_nums[si]))
            nxt = self.area_downsample(f_hat, self.patch_nums[si + 1])
            pieces.append(nxt.reshape(B, self.Cvae, -1).transpose(1, 2))
        return torch.cat(pieces, dim=1) if pieces else None

    def idxBl_to_fhat(self, idx_Bl_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Final latent of a full token pyramid (``embed_to_fhat(all_to_max_scale=True, last_one=True)``)."""
        B = idx_Bl_list[0].shape[0]
        H = W = self.patch_nums[-1]
        f_hat = self.embedding.weight.new_zeros(B, self.Cvae, H, W, dtype=torch.float32)
        for si, pn in enumerate(self.patch_nums):
            self.add_scale(si, f_hat, self.embed_idx(idx_Bl_list[si], pn))
        return f_hat

    def f_to_idxBl(self, f_BChw: torch.Tensor) -> list[torch.Tensor]:
        """Quantise an encoder latent into the token pyramid (``f_to_idxBl_or_fhat(to_fhat=False)``):
        nearest codebook entry (L2, or cosine with ``using_znorm``) of the area-downsampled residual."""
        B, C, H, W = f_BChw.shape
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        out = []
        emb = self.embedding.weight
        for si, pn in enumerate(self.patch_nums):
            z = f_rest if si == self.num_scales - 1 else F.interpolate(f_rest, size=(pn, pn), mode="area")
            z_NC = z.permute(0, 2, 3, 1).reshape(-1, C)
            if self.using_znorm:
                idx_N = torch.argmax(F.normalize(z_NC, dim=-1) @ F.normalize(emb.T, dim=0), dim=1)
            else:
                d = z_NC.square().sum(1, keepdim=True) + emb.square().sum(1)
                d.addmm_(z_NC, emb.T, alpha=-2, beta=1)
                idx_N = torch.argmin(d, dim=1)
            h = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)
            if si != self.num_scales - 1:
                h = F.interpolate(h, size=(H, W), mode="bicubic")
            h = self.phi(si)(h.contiguous())
            f_hat.add_(h)
            f_rest.sub_(h)
            out.append(idx_N.reshape(B, pn * pn))
        return out


# ----------------------------------------------------------------------------------------- VQVAE
class VQVAE(nn.Module):
    """VAR's tokenizer (``vqvae.VQVAE``): encoder -> ``quant_conv`` -> multi-scale quantiser ->
    ``post_quant_conv`` -> decoder. Downsampling factor 16.

    >>> vae = VQVAE(ch=32, patch_nums=(1, 2))
    >>> [k for k in vae.state_dict()][-4:]
    ['quant_conv.weight', 'quant_conv.bias', 'post_quant_conv.weight', 'post_quant_conv.bias']
    """

    def __init__(
        self,
        vocab_size: int = 4096,
        z_channels: int = 32,
        ch: int = 160,
        patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        using_znorm: bool = False,
    ):
        super().__init__()
        self.vocab_size, self.Cvae, self.ch = vocab_size, z_channels, ch
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.ch_mult = tuple(ch_mult)
        self.downsample = 2 ** (len(self.ch_mult) - 1)
        dd = dict(ch=ch, ch_mult=self.ch_mult, num_res_blocks=num_res_blocks, z_channels=z_channels,
                  using_sa=using_sa, using_mid_sa=using_mid_sa)
        self.encoder = Encoder(**dd)
        self.decoder = Decoder(**dd)
        self.quantize = VectorQuantizer2(vocab_size, z_channels, self.patch_nums, quant_resi=quant_resi,
                                         share_quant_resi=share_quant_resi,
                                         default_qresi_counts=default_qresi_counts, using_znorm=using_znorm)
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_ks, 1, pad)
        self._config = dict(vocab_size=vocab_size, z_channels=z_channels, ch=ch, patch_nums=list(self.patch_nums),
                            ch_mult=list(self.ch_mult), num_res_blocks=num_res_blocks, using_sa=using_sa,
                            using_mid_sa=using_mid_sa, quant_conv_ks=quant_conv_ks, quant_resi=quant_resi,
                            share_quant_resi=share_quant_resi, using_znorm=using_znorm)

    def config_dict(self) -> dict:
        """The constructor arguments (JSON-able), for architecture fingerprints."""
        return dict(self._config)

    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Decode a latent to an image in [-1, 1] (``VQVAE.fhat_to_img``: decoder, then clamp)."""
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp_(-1, 1)

    def fhat_to_img01(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        """Decode to [0, 1], exactly as ``VAR.autoregressive_infer_cfg`` returns: ``(img + 1) * 0.5``."""
        return self.fhat_to_img(f_hat_BChw).add_(1).mul_(0.5)

    def img_to_idxBl(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Tokenise images in [-1, 1] (``VQVAE.img_to_idxBl``) -> list of (B, pn*pn) token ids."""
        return self.quantize.f_to_idxBl(self.quant_conv(self.encoder(img_B3HW)))

    def idxBl_to_img(self, idx_Bl_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Decode a full token pyramid to an image in [-1, 1]."""
        return self.fhat_to_img(self.quantize.idxBl_to_fhat(idx_Bl_list))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As upstream: a checkpoint whose ``ema_vocab_hit_SV`` has another number of scales keeps
        this model's buffer (the statistic is training-only)."""
        key = "quantize.ema_vocab_hit_SV"
        if key in state_dict and tuple(state_dict[key].shape) != tuple(self.quantize.ema_vocab_hit_SV.shape):
            state_dict = dict(state_dict)
            state_dict[key] = self.quantize.ema_vocab_hit_SV.detach().clone()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
