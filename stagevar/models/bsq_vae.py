"""Infinity's BSQ VAE: convolutional encoder/decoder and the multi-scale bitwise quantizer.

A re-implementation of ``infinity/models/bsq_vae/`` of FoundationVision/Infinity (commit
``4c27bbb``): ``flux_vqgan.py`` (``AutoEncoder``, ``Encoder``, ``Decoder``, ``ResnetBlock``,
``Downsample``, ``Upsample``, ``Normalize``), ``conv.py`` (``Conv``) and ``multiscale_bsq.py``
(``MultiScaleBSQ``, ``BSQ``), restricted to what ``vae_model(...)`` builds for images:
``cnn_type='2d'``, no attention (``cnn_attention='no'``), GroupNorm, ``use_vae=False``,
``quantizer_type='MultiScaleBSQ'``, ``new_quant=True``, no projections and no LayerNorm before the
quantizer (``codebook_size == 2**codebook_dim``), ``schedule_mode='dynamic'``.

The state dict matches upstream key for key (``*.conv.weight`` / ``*.norm.weight`` wrappers, and the
quantizer buffer listed twice because upstream's ``AutoEncoder.quantize`` is an alias of
``AutoEncoder.quantizer``), so released checkpoints (``state_dict["vae"]``) load directly.

How Infinity uses the VAE (README of the reference data, section E):

* inference: bits (B, 1, h, w, d) per scale -> :func:`bits_to_codes` -> :func:`accumulate_codes`
  (trilinear upsampling to the last scale, summed) -> :meth:`BSQVAE.decode` (the decoder called
  directly, then clamped to [-1, 1]; there is no ``post_quant_conv``);
* training: image -> :meth:`BSQVAE.encode` -> :meth:`BSQVAE.features_to_bits` (residual
  quantisation: area-downsampled residual, sign, trilinear upsampling back) -> bit labels; the
  teacher-forcing input is :meth:`BSQVAE.quantize_multiscale` ``(...).next_inputs`` (exactly
  upstream ``BitwiseSelfCorrection.flip_requant`` with ``residual_mode='cumulative'``), or
  :func:`accumulate_codes` of ``bits_to_codes`` of (possibly flipped) bits.

Layouts matter for bit-exactness on CPU and are reproduced: the quantizer makes the same
contiguous copies as upstream, and :meth:`BSQVAE.decode` runs the decoder channels-last, as
upstream's inference does (its summed codes are a channels-last view).

Tensor suffixes: ``B`` batch, ``d`` codebook dimension (= latent channels), ``C`` channels,
``H, W`` full latent (or image) size, ``h, w`` size of one scale, ``1`` the singleton time axis,
``L`` tokens.

>>> cfg = BSQVAEConfig.golden_tiny()
>>> vae = BSQVAE(cfg).eval()
>>> bits = [torch.randint(0, 2, (1, 1, h, w, cfg.codebook_dim)) for (_, h, w) in [(1, 1, 1), (1, 2, 2)]]
>>> summed_BdHW, next_inputs = accumulate_codes([bits_to_codes(b) for b in bits], [(1, 1, 1), (1, 2, 2)])
>>> tuple(summed_BdHW.shape), tuple(next_inputs[0].shape)
((1, 32, 2, 2), (1, 4, 32))
>>> tuple(vae.decode(summed_BdHW).shape)
(1, 3, 32, 32)
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stagevar.errors import StageVarError

logger = logging.getLogger(__name__)

ScaleSchedule = Sequence[tuple[int, int, int]]

# Interpolation modes of upstream MultiScaleBSQ (``z_interplote_down`` / ``z_interplote_up``).
_DOWN_MODE = "area"
_UP_MODE = "trilinear"


class BSQVAEConfigError(StageVarError, ValueError):
    """An invalid :class:`BSQVAEConfig` (the message names the field and the value)."""


def _group_count(channels: int) -> int:
    """GroupNorm groups of upstream ``Normalize``: 32 if divisible, else 24, else unsupported."""
    if channels % 32 == 0:
        return 32
    if channels % 24 == 0:
        return 24
    raise BSQVAEConfigError(
        f"BSQ VAE GroupNorm needs channel counts divisible by 32 or 24 (upstream Normalize); got {channels}. "
        "Choose base_ch and ch_mult so that every base_ch * mult is a multiple of 32 (or 24)."
    )


@dataclasses.dataclass(frozen=True)
class BSQVAEConfig:
    """Architecture of the BSQ VAE (the arguments ``vae_model(...)`` passes to ``AutoEncoder``).

    Fields not listed are fixed by ``vae_model`` (``infinity/models/bsq_vae/vae.py``) for every
    released model: ``num_res_blocks=2``, ``cnn_type='2d'``, ``cnn_attention='no'``,
    ``norm_type='group'``, ``use_vae=False``, ``new_quant=True``, ``schedule_mode='dynamic'``,
    ``codebook_size=2**codebook_dim``. ``base_ch`` is hard-coded to 128 there; the golden tiny
    model overrides it with 32.

    >>> BSQVAEConfig.d32_reg().downsample_factor
    16
    >>> BSQVAEConfig.from_dict({"codebook_dim": 14, "patch_size": 8, "encoder_ch_mult": [1, 2, 4, 4],
    ...                         "decoder_ch_mult": [1, 2, 4, 4]}) == BSQVAEConfig.d56_f8_14_patchify()
    True
    """

    codebook_dim: int = 32
    patch_size: int = 16
    base_ch: int = 128
    encoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 2, 4, 4, 4)
    num_res_blocks: int = 2
    in_channels: int = 3
    out_channels: int = 3

    def __post_init__(self) -> None:
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(int(v) for v in value))
        for name in ("codebook_dim", "patch_size", "base_ch", "num_res_blocks", "in_channels", "out_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BSQVAEConfigError(f"BSQVAEConfig.{name} must be a positive integer; got {value!r}.")
        if self.patch_size & (self.patch_size - 1):
            raise BSQVAEConfigError(f"BSQVAEConfig.patch_size must be a power of two; got {self.patch_size}.")
        levels = int(math.log2(self.patch_size))
        for name in ("encoder_ch_mult", "decoder_ch_mult"):
            mult = getattr(self, name)
            if not mult or any(m < 1 for m in mult):
                raise BSQVAEConfigError(f"BSQVAEConfig.{name} must be a non-empty list of positive ints; got {list(mult)}.")
            # Encoder downsamples at levels i < log2(p), decoder upsamples at 1 <= i <= log2(p):
            # both reach the patch size only if there are more than log2(p) levels.
            if len(mult) <= levels:
                raise BSQVAEConfigError(
                    f"BSQVAEConfig.{name} has {len(mult)} levels but patch_size {self.patch_size} needs at least "
                    f"{levels + 1} (one per 2x resampling plus the full-resolution level)."
                )
            for m in mult:
                _group_count(self.base_ch * m)

    # ------------------------------------------------------------------ official configurations
    @classmethod
    def d32_reg(cls) -> "BSQVAEConfig":
        """Infinity-2B tokenizer (``infinity_vae_d32reg.pth``): d=32, 16x, ch_mult [1,2,4,4,4]."""
        return cls(codebook_dim=32, patch_size=16, base_ch=128,
                   encoder_ch_mult=(1, 2, 4, 4, 4), decoder_ch_mult=(1, 2, 4, 4, 4))

    @classmethod
    def d56_f8_14_patchify(cls) -> "BSQVAEConfig":
        """Infinity-8B tokenizer: d=14, 8x, ch_mult [1,2,4,4] (the transformer patchifies 2x2 -> 56)."""
        return cls(codebook_dim=14, patch_size=8, base_ch=128,
                   encoder_ch_mult=(1, 2, 4, 4), decoder_ch_mult=(1, 2, 4, 4))

    @classmethod
    def golden_tiny(cls) -> "BSQVAEConfig":
        """The seeded golden model of the reference data (README B2): base_ch 32, ch_mult [1,1,2,2,2]."""
        return cls(codebook_dim=32, patch_size=16, base_ch=32,
                   encoder_ch_mult=(1, 1, 2, 2, 2), decoder_ch_mult=(1, 1, 2, 2, 2))

    # ------------------------------------------------------------------ derived sizes
    @property
    def codebook_size(self) -> int:
        return 2 ** self.codebook_dim

    @property
    def z_channels(self) -> int:
        return self.codebook_dim

    @property
    def downsample_factor(self) -> int:
        return self.patch_size

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["encoder_ch_mult"] = list(self.encoder_ch_mult)
        out["decoder_ch_mult"] = list(self.decoder_ch_mult)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BSQVAEConfig":
        """Strict constructor: unknown keys are rejected with the list of valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise BSQVAEConfigError(
                f"unknown BSQVAEConfig key(s) {unknown}; valid keys are {sorted(names)}."
            )
        return cls(**dict(data))


# ======================================================================================== blocks
def _swish(x: Tensor) -> Tensor:
    """``x * sigmoid(x)``, written as upstream ``swish`` (not ``F.silu``: same maths, other rounding)."""
    return x * torch.sigmoid(x)


class _Conv(nn.Module):
    """2-D convolution wrapped in a ``.conv`` attribute (upstream ``conv.Conv`` with cnn_type '2d')."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.conv(x_BCHW)


class _Norm(nn.Module):
    """GroupNorm (eps 1e-6, affine) wrapped in a ``.norm`` attribute (upstream ``Normalize``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.GroupNorm(_group_count(channels), channels, eps=1e-6, affine=True)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.norm(x_BCHW)


class _ResnetBlock(nn.Module):
    """norm1 -> swish -> conv1 -> norm2 -> swish -> conv2, plus a 1x1 ``nin_shortcut`` when the
    channel count changes (upstream ``ResnetBlock``)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.norm1 = _Norm(in_ch)
        self.conv1 = _Conv(in_ch, out_ch, 3, padding=1)
        self.norm2 = _Norm(out_ch)
        self.conv2 = _Conv(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = _Conv(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x_BCHW: Tensor) -> Tensor:
        h = self.conv1(_swish(self.norm1(x_BCHW)))
        h = self.conv2(_swish(self.norm2(h)))
        skip = self.nin_shortcut(x_BCHW) if self.nin_shortcut is not None else x_BCHW
        return skip + h


class _Downsample(nn.Module):
    """Zero-pad right/bottom by one, then a 3x3 stride-2 convolution (upstream ``Downsample``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _Conv(channels, channels, 3, stride=2, padding=0)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.conv(F.pad(x_BCHW, (0, 1, 0, 1), mode="constant", value=0.0))


class _Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution (upstream ``Upsample``, no pixel shuffle)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = _Conv(channels, channels, 3, padding=1)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.conv(F.interpolate(x_BCHW, scale_factor=2, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks) and an optional ``downsample``/``upsample``.

    Upstream also registers an empty ``attn`` ModuleList per level; it holds no state and is omitted.
    """

    def __init__(self, blocks: list[nn.Module], resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        if resample is not None:
            self.add_module(resample_name, resample)
        self._resample_name = resample_name if resample is not None else None

    def forward(self, x_BCHW: Tensor) -> Tensor:
        for blk in self.block:
            x_BCHW = blk(x_BCHW)
        if self._resample_name is not None:
            x_BCHW = getattr(self, self._resample_name)(x_BCHW)
        return x_BCHW


class _Mid(nn.Module):
    """Two ResnetBlocks at the lowest resolution (no attention: ``cnn_attention='no'``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = _ResnetBlock(channels, channels)
        self.block_2 = _ResnetBlock(channels, channels)

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.block_2(self.block_1(x_BCHW))


class BSQEncoder(nn.Module):
    """Image (B, 3, H, W) -> continuous features (B, d, H/p, W/p) (upstream ``flux_vqgan.Encoder``).

    Level ``i`` has ``num_res_blocks`` blocks ``base_ch*in_ch_mult[i] -> base_ch*ch_mult[i]``
    (``in_ch_mult = (1,) + ch_mult``) and downsamples when ``i < log2(patch_size)``.
    """

    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.encoder_ch_mult
        max_down = int(math.log2(cfg.patch_size))
        self.conv_in = _Conv(cfg.in_channels, ch, 3, padding=1)
        in_mult = (1,) + tuple(mult)
        levels = []
        block_in = ch
        for i, m in enumerate(mult):
            block_in, block_out = ch * in_mult[i], ch * m
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(_ResnetBlock(block_in, block_out))
                block_in = block_out
            levels.append(_Level(blocks, _Downsample(block_in) if i < max_down else None, "downsample"))
        self.down = nn.ModuleList(levels)
        self.mid = _Mid(block_in)
        self.norm_out = _Norm(block_in)
        self.conv_out = _Conv(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, img_BCHW: Tensor) -> Tensor:
        h = self.conv_in(img_BCHW)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class BSQDecoder(nn.Module):
    """Latent (B, d, h, w) -> image (B, 3, h*p, w*p), unclamped (upstream ``flux_vqgan.Decoder``).

    Levels run from the last to the first; level ``i`` has ``num_res_blocks + 1`` blocks with
    output width ``base_ch*ch_mult[i]`` and upsamples when ``1 <= i <= log2(patch_size)``.
    ``up`` is indexed by level (upstream builds it with ``insert(0, ...)``).
    """

    def __init__(self, cfg: BSQVAEConfig):
        super().__init__()
        ch, mult = cfg.base_ch, cfg.decoder_ch_mult
        max_up = int(math.log2(cfg.patch_size))
        block_in = ch * mult[-1]
        self.conv_in = _Conv(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in)
        levels: list[nn.Module] = [None] * len(mult)  # type: ignore[list-item]
        for i in reversed(range(len(mult))):
            block_out = ch * mult[i]
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(_ResnetBlock(block_in, block_out))
                block_in = block_out
            levels[i] = _Level(blocks, _Upsample(block_in) if 1 <= i <= max_up else None, "upsample")
        self.up = nn.ModuleList(levels)
        self.norm_out = _Norm(block_in)
        self.conv_out = _Conv(block_in, cfg.out_channels, 3, padding=1)

    def forward(self, z_BdHW: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z_BdHW))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
        return self.conv_out(_swish(self.norm_out(h)))


# ===================================================================================== quantizer
def _codebook_scale(codebook_dim: int) -> float:
    """``1/sqrt(d)``: upstream ``MultiScaleBSQ`` passes ``codebook_scale = 1/np.sqrt(codebook_dim)``."""
    return 1.0 / math.sqrt(codebook_dim)


def bits_to_codes(bits_B1hwd: Tensor) -> Tensor:
    """Bit labels (B, 1, h, w, d) in {0, 1} -> codes (B, d, 1, h, w), float32.

    Upstream ``BSQ.indices_to_codes(bits, 'bit_label')``: ``bits * s * 2 - s`` with
    ``s = 1/sqrt(d)``, then ``F.normalize`` over ``d`` (numerically almost a no-op: it can move a
    value by an ulp, which is reproduced here), then moved to channel-first. Any integer or bool
    dtype is accepted (upstream uses int64; the golden files store uint8).

    >>> codes = bits_to_codes(torch.tensor([1, 0, 1, 1]).view(1, 1, 1, 1, 4))
    >>> codes.shape, codes.flatten().tolist()
    (torch.Size([1, 4, 1, 1, 1]), [0.5, -0.5, 0.5, 0.5])
    """
    if bits_B1hwd.ndim != 5:
        raise ValueError(f"bits must be (B, 1, h, w, d); got shape {tuple(bits_B1hwd.shape)}")
    s = _codebook_scale(bits_B1hwd.shape[-1])
    bits = bits_B1hwd.to(torch.float32).unsqueeze(-2)  # (B, 1, h, w, 1, d): upstream's codebook axis
    codes = bits * s * 2 - s
    codes = F.normalize(codes, dim=-1).flatten(-2)  # (B, 1, h, w, d)
    return codes.permute(0, 4, 1, 2, 3)  # (B, d, 1, h, w), a view as upstream's rearrange


class BSQ(nn.Module):
    """Binary spherical quantizer of one scale (upstream ``multiscale_bsq.BSQ`` with ``new_quant``).

    Holds the persistent int64 buffer ``mask = 2**arange(d-1, ..., 0)`` (used upstream only for
    integer labels; kept for state-dict compatibility).
    """

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.codebook_dim = codebook_dim
        self.codebook_scale = _codebook_scale(codebook_dim)
        self.register_buffer("mask", 2 ** torch.arange(codebook_dim - 1, -1, -1))

    def forward(self, z_Bd1hw: Tensor) -> tuple[Tensor, Tensor]:
        """Features (B, d, 1, h, w) -> (quantized (B, d, 1, h, w), bits (B, 1, h, w, d) int64).

        Upstream ``BSQ.forward`` + ``quantize_new``, in float32: L2-normalise each position over
        ``d``, ``zhat = where(z > 0, 1, -1) / sqrt(d)``, straight-through ``z + (zhat - z).detach()``
        (kept because its rounding is what upstream returns), ``bits = quantized > 0``.
        Upstream returns int32 bits; int64 is returned here (the sampler's dtype, usable as targets).
        """
        B, d, t, h, w = z_Bd1hw.shape
        if d != self.codebook_dim:
            raise ValueError(f"expected {self.codebook_dim} channels, got {d}")
        # A contiguous (B, N, 1, d) copy, as upstream's einops pack makes: the layout decides the
        # reduction order of the norm below, hence its last-ulp rounding.
        z_BNd = z_Bd1hw.permute(0, 2, 3, 4, 1).contiguous().reshape(B, t * h * w, 1, d).float()
        z_BNd = F.normalize(z_BNd, dim=-1)
        one = torch.ones((), dtype=z_BNd.dtype, device=z_BNd.device)
        zhat = torch.where(z_BNd > 0, one, -one) * (1.0 / (d ** 0.5))
        quantized = z_BNd + (zhat - z_BNd).detach()
        bits = (quantized > 0).to(torch.int64).reshape(B, t, h, w, d)
        quantized = quantized.reshape(B, t, h, w, d).permute(0, 4, 1, 2, 3)
        return quantized, bits

    def indices_to_codes(self, bits_B1hwd: Tensor) -> Tensor:
        """Upstream ``indices_to_codes(bits, label_type='bit_label')``; see :func:`bits_to_codes`."""
        if bits_B1hwd.shape[-1] != self.codebook_dim:
            raise ValueError(f"expected bits with last dim {self.codebook_dim}, got {tuple(bits_B1hwd.shape)}")
        return bits_to_codes(bits_B1hwd)


@dataclasses.dataclass
class MultiScaleQuantized:
    """Result of :meth:`MultiScaleBSQ.forward`.

    Attributes:
        bits: per scale (B, 1, h, w, d) int64 bit labels (the classification targets).
        codes: per scale (B, d, 1, h, w) quantized values at the scale's own size.
        summed_codes_BdHW: sum of the codes upsampled to the full size (the decoder input).
        next_inputs: for scales 1..N-1, the (B, h*w, d) transformer input (before ``word_embed``)
            built from the running sum as ``BitwiseSelfCorrection.flip_requant`` builds it;
            ``torch.cat(next_inputs, 1)`` is the teacher-forcing ``x_BLC_wo_prefix``.
    """

    bits: list[Tensor]
    codes: list[Tensor]
    summed_codes_BdHW: Tensor
    next_inputs: list[Tensor]


class MultiScaleBSQ(nn.Module):
    """Residual bitwise quantisation over a scale schedule (upstream ``MultiScaleBSQ``).

    Only the configuration of the released tokenizers is implemented: no projection, no LayerNorm,
    no stochastic depth / random flip / level drop, ``out_fact = 1``.
    """

    def __init__(self, codebook_dim: int):
        super().__init__()
        self.lfq = BSQ(codebook_dim)

    def forward(
        self,
        features_BdHW: Tensor,
        scale_schedule: ScaleSchedule,
        *,
        residual_mode: Literal["iterative", "cumulative"] = "iterative",
        spatial_patchify: bool = False,
    ) -> MultiScaleQuantized:
        """Quantise features (B, d, H, W) (or (B, d, 1, H, W)) at every scale of ``scale_schedule``.

        For each scale ``(t, h, w)``: the residual is area-downsampled to ``(t, h, w)``, quantised by
        :class:`BSQ`, trilinearly upsampled back to the full size (``align_corners=False``) and
        added to the running sum; the next scale's input is the running sum trilinearly resampled
        to that scale.

        ``residual_mode='iterative'`` is ``MultiScaleBSQ.forward`` (``residual -= upsampled`` at
        every scale; resampling skipped where a scale already has the full size).
        ``'cumulative'`` is Infinity's training-time ``BitwiseSelfCorrection.flip_requant`` without
        bit flips (``residual = features - running sum``; the last scale is never downsampled).
        Both give the same bits up to float rounding of near-zero residuals. ``spatial_patchify``
        (8B) pixel-unshuffles the next inputs by 2, as ``flip_requant`` does.
        """
        if residual_mode not in ("iterative", "cumulative"):
            raise ValueError(f"residual_mode must be 'iterative' or 'cumulative'; got {residual_mode!r}")
        if len(scale_schedule) == 0:
            raise ValueError("scale_schedule is empty")
        cumulative = residual_mode == "cumulative"
        x = features_BdHW.float()
        if x.ndim == 4:
            x = x.unsqueeze(2)
        full = tuple(x.shape[2:])
        last = len(scale_schedule) - 1
        residual = x
        summed: Tensor | None = None
        all_bits, all_codes, next_inputs = [], [], []
        for si, size in enumerate(scale_schedule):
            size = tuple(int(v) for v in size)
            if cumulative:
                residual = x if summed is None else x - summed
                r = F.interpolate(residual, size=size, mode=_DOWN_MODE).contiguous() if si != last else residual
            else:
                r = F.interpolate(residual, size=size, mode=_DOWN_MODE) if size != full else residual
            quantized, bits = self.lfq(r)
            all_bits.append(bits)
            all_codes.append(quantized)
            if cumulative or size != full:
                quantized = F.interpolate(quantized, size=full, mode=_UP_MODE).contiguous()
            if not cumulative:
                residual = residual - quantized
            summed = quantized if summed is None else summed + quantized
            if si != last:
                nxt = F.interpolate(summed, size=tuple(int(v) for v in scale_schedule[si + 1]), mode=_UP_MODE)
                nxt = nxt.contiguous()
                if spatial_patchify:
                    nxt = F.pixel_unshuffle(nxt.squeeze(-3), 2)
                next_inputs.append(nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1))
        assert summed is not None
        summed_out = summed.squeeze(2) if summed.shape[2] == 1 else summed
        return MultiScaleQuantized(all_bits, all_codes, summed_out, next_inputs)


# ================================================================================= accumulation
def accumulate_step(
    summed_codes_Bd1HW: Tensor | None,
    codes_Bd1hw: Tensor,
    si: int,
    scale_schedule: ScaleSchedule,
    *,
    spatial_patchify: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Add the codes of scale ``si`` to the running sum and build the next scale's input.

    Upstream ``Infinity.autoregressive_infer_cfg`` (bit-label branch): for ``si < N-1``,
    ``summed += interpolate(codes, size=schedule[-1], mode='trilinear')`` and the next input is
    ``interpolate(summed, size=schedule[si+1], mode='trilinear')`` (trilinear also when shrinking)
    reshaped to (B, h'w', d); for the last scale ``summed += codes`` and there is no next input.
    ``scale_schedule`` is the *VAE* schedule; with ``spatial_patchify`` (8B) the next input is
    ``pixel_unshuffle(·, 2)`` first, giving (B, h'w'/4, 4d).

    Returns ``(summed_codes_Bd1HW, next_input_BLd or None)``; pass ``None`` as the first sum.
    """
    last = len(scale_schedule) - 1
    if codes_Bd1hw.ndim == 4:
        codes_Bd1hw = codes_Bd1hw.unsqueeze(2)
    if si != last:
        full = tuple(int(v) for v in scale_schedule[-1])
        up = F.interpolate(codes_Bd1hw, size=full, mode=_UP_MODE)
        summed = up if summed_codes_Bd1HW is None else summed_codes_Bd1HW + up
        nxt = F.interpolate(summed, size=tuple(int(v) for v in scale_schedule[si + 1]), mode=_UP_MODE)
        nxt = nxt.squeeze(-3)  # (B, d, h', w')
        if spatial_patchify:
            nxt = F.pixel_unshuffle(nxt, 2)
        return summed, nxt.reshape(*nxt.shape[:2], -1).permute(0, 2, 1)
    summed = codes_Bd1hw if summed_codes_Bd1HW is None else summed_codes_Bd1HW + codes_Bd1hw
    return summed, None


def accumulate_codes(
    codes_per_scale: Sequence[Tensor],
    scale_schedule: ScaleSchedule,
    *,
    spatial_patchify: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """Sum per-scale codes (B, d, 1, h, w) into the decoder input and collect the next inputs.

    Returns ``(summed_codes_BdHW, next_inputs)``: the (B, d, H, W) latent :meth:`BSQVAE.decode`
    takes, and for scales ``1..N-1`` the (B, h*w, d) inputs of the transformer (before
    ``word_embed``). ``torch.cat(next_inputs, 1)`` is the teacher-forcing ``x_BLC_wo_prefix``
    (README E, "Teacher forcing"; upstream ``BitwiseSelfCorrection.flip_requant``).

    >>> sched = [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    >>> codes = [torch.ones(2, 8, 1, h, w) for (_, h, w) in sched]
    >>> summed, nxt = accumulate_codes(codes, sched)
    >>> tuple(summed.shape), [tuple(x.shape) for x in nxt], float(summed.max())
    ((2, 8, 4, 4), [(2, 4, 8), (2, 16, 8)], 3.0)
    """
    if len(codes_per_scale) != len(scale_schedule):
        raise ValueError(f"{len(codes_per_scale)} code tensors for a {len(scale_schedule)}-scale schedule")
    summed: Tensor | None = None
    next_inputs: list[Tensor] = []
    for si, codes in enumerate(codes_per_scale):
        summed, nxt = accumulate_step(summed, codes, si, scale_schedule, spatial_patchify=spatial_patchify)
        if nxt is not None:
            next_inputs.append(nxt)
    assert summed is not None
    if summed.shape[2] != 1:
        raise ValueError(f"only images (t = 1) are supported; summed codes have shape {tuple(summed.shape)}")
    return summed.squeeze(2), next_inputs


# ========================================================================================= model
class BSQVAE(nn.Module):
    """Infinity's BSQ VAE (upstream ``flux_vqgan.AutoEncoder`` as built by ``vae_model``).

    Submodules in upstream order: ``encoder``, ``decoder``, ``quantizer`` and its alias
    ``quantize`` (the same module, so its buffer appears twice in ``state_dict()``).

    >>> vae = BSQVAE(BSQVAEConfig.golden_tiny()).eval()
    >>> img = torch.zeros(1, 3, 32, 32)
    >>> feats = vae.encode(img)
    >>> bits = vae.features_to_bits(feats, [(1, 1, 1), (1, 2, 2)])
    >>> [tuple(b.shape) for b in bits]
    [(1, 1, 1, 1, 32), (1, 1, 2, 2, 32)]
    """

    def __init__(self, config: BSQVAEConfig | None = None):
        super().__init__()
        self.config = config if config is not None else BSQVAEConfig.d32_reg()
        self.codebook_dim = self.config.codebook_dim
        self.encoder = BSQEncoder(self.config)
        self.decoder = BSQDecoder(self.config)
        self.quantizer = MultiScaleBSQ(self.config.codebook_dim)
        self.quantize = self.quantizer  # upstream alias: listed twice in the state dict

    # ------------------------------------------------------------------ encode / quantise
    def encode(self, img_B3HW: Tensor) -> Tensor:
        """Image in [-1, 1] (B, 3, H, W) -> continuous features (B, d, H/p, W/p), float32.

        Upstream ``AutoEncoder.encode_for_raw_features`` (the encoder output, cast to float32).
        """
        return self.encoder(img_B3HW).float()

    def quantize_multiscale(
        self,
        features_BdHW: Tensor,
        scale_schedule: ScaleSchedule,
        *,
        residual_mode: Literal["iterative", "cumulative"] = "iterative",
        spatial_patchify: bool = False,
    ) -> MultiScaleQuantized:
        """Residual BSQ over ``scale_schedule`` (the VAE schedule); see :class:`MultiScaleBSQ`.

        With ``residual_mode='cumulative'`` the result's ``next_inputs`` are exactly upstream's
        training input (``BitwiseSelfCorrection.flip_requant`` with no bit flips).
        """
        return self.quantizer(
            features_BdHW, scale_schedule, residual_mode=residual_mode, spatial_patchify=spatial_patchify
        )

    def features_to_bits(
        self,
        features_BdHW: Tensor,
        scale_schedule: ScaleSchedule,
        *,
        residual_mode: Literal["iterative", "cumulative"] = "iterative",
    ) -> list[Tensor]:
        """Per-scale bit labels (B, 1, h, w, d) int64 of the features (upstream ``all_bit_indices``)."""
        return self.quantize_multiscale(features_BdHW, scale_schedule, residual_mode=residual_mode).bits

    def bits_to_codes(self, bits_B1hwd: Tensor) -> Tensor:
        """Upstream ``quantizer.lfq.indices_to_codes(bits, 'bit_label')``: (B, 1, h, w, d) -> (B, d, 1, h, w)."""
        return self.quantizer.lfq.indices_to_codes(bits_B1hwd)

    # ------------------------------------------------------------------ decode
    def decode(self, summed_codes_BdHW: Tensor, *, channels_last: bool = True) -> Tensor:
        """Latent (B, d, H, W) (or (B, d, 1, H, W)) -> image (B, 3, H*p, W*p) clamped to [-1, 1].

        Upstream ``AutoEncoder.decode``: ``clamp(decoder(z), -1, 1)``; the decoder is applied
        directly to the summed codes (no ``post_quant_conv`` exists).

        The latent is made channels-last first. Upstream's decoder input always is: ``indices_to_codes``
        returns a permuted (channels-last) view, and the trilinear upsampling and the running sum keep
        that layout, so every decoder convolution runs on channels-last tensors. The convolution
        kernels of the two layouts round differently (max 8e-5 on the golden image), so the layout is
        part of reproducing upstream; a tensor from :func:`accumulate_codes` already has it.
        ``channels_last=False`` keeps the caller's layout instead (upstream ``AutoEncoder.decode``
        called on some other tensor, e.g. the contiguous output of the quantizer).
        """
        if summed_codes_BdHW.ndim == 5:
            if summed_codes_BdHW.shape[2] != 1:
                raise ValueError(f"only images (t = 1) can be decoded; got shape {tuple(summed_codes_BdHW.shape)}")
            summed_codes_BdHW = summed_codes_BdHW.squeeze(2)
        z_BdHW = summed_codes_BdHW
        if channels_last:
            z_BdHW = z_BdHW.contiguous(memory_format=torch.channels_last)
        return torch.clamp(self.decoder(z_BdHW), min=-1, max=1)

    def decode_bits(self, bits_per_scale: Sequence[Tensor], scale_schedule: ScaleSchedule) -> Tensor:
        """Bit labels of every scale -> image in [-1, 1] (upstream ``decode_from_indices``, bit labels)."""
        summed, _ = accumulate_codes([self.bits_to_codes(b) for b in bits_per_scale], scale_schedule)
        return self.decode(summed)

    # ------------------------------------------------------------------ weights
    def load_weights(
        self,
        state_dict: Mapping[str, Tensor],
        *,
        missing_ok_prefixes: Sequence[str] = (),
    ) -> None:
        """Load a checkpoint state dict, upcasting/downcasting floats to the model's dtype.

        Accepts upstream checkpoint dicts (``{"vae": state_dict, ...}``, as ``vae_model`` reads
        them) and plain-``nn.Conv2d``/``nn.GroupNorm`` key names (``x.weight`` for
        ``x.conv.weight`` / ``x.norm.weight``, the renaming upstream ``load_cnn`` performs).
        The ``*.lfq.mask`` buffers are derived and may be absent. Every other model key must be
        present unless it starts with one of ``missing_ok_prefixes``; unexpected keys are errors.
        """
        if "vae" in state_dict and not isinstance(state_dict["vae"], Tensor):
            state_dict = state_dict["vae"]  # type: ignore[assignment]
        own = self.state_dict()
        remapped: dict[str, Tensor] = {}
        unexpected: list[str] = []
        for key, value in state_dict.items():
            target = key
            if target not in own:
                stem, _, leaf = key.rpartition(".")
                for wrapper in ("conv", "norm"):
                    if f"{stem}.{wrapper}.{leaf}" in own:
                        target = f"{stem}.{wrapper}.{leaf}"
                        break
            if target not in own:
                unexpected.append(key)
                continue
            if own[target].shape != value.shape:
                raise WeightsShapeError(
                    f"BSQ VAE weight {key!r} has shape {tuple(value.shape)} but the model "
                    f"({self.config}) expects {tuple(own[target].shape)}: wrong configuration for this checkpoint?"
                )
            remapped[target] = value.to(own[target].dtype) if value.is_floating_point() else value
        missing = [
            k for k in own
            if k not in remapped and not k.endswith(".lfq.mask") and not k.startswith(tuple(missing_ok_prefixes))
        ]
        if missing or unexpected:
            raise WeightsShapeError(
                f"BSQ VAE checkpoint does not match the model ({self.config}): "
                f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}."
            )
        result = self.load_state_dict(remapped, strict=False)
        logger.debug("BSQ VAE loaded %d tensors; left at init: %d keys", len(remapped), len(result.missing_keys))


class WeightsShapeError(StageVarError):
    """A BSQ VAE checkpoint that does not fit the configured architecture."""
