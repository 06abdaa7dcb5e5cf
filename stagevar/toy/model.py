"""``infinity-mini``: the embedded default model, a small text-to-image Infinity trained on the toy world.

Three parts, all trained here by `stagevar-train` (the :mod:`training` package) on procedural scenes
(:mod:`stagevar.toy.scenes`, prompts of :mod:`stagevar.toy.prompts`):

* a small BSQ VAE (:class:`~stagevar.models.bsq_vae.BSQVAE`, stride 8, d = 16 bits per token);
* :class:`MiniTextEncoder`: word embeddings of the prompt vocabulary + 2 transformer encoder
  layers -> ``TextCondition(kv_compact, lens)`` with ``lens`` = words + EOS;
* the project's :class:`~stagevar.models.infinity.InfinityTransformer` at a small config
  (10 scales up to 16x16 = 680 tokens, 128x128 images).

The shipped weights live in ``stagevar/toy/weights/`` (``config.json``, ``transformer.safetensors``,
``vae.safetensors``, ``text.safetensors``; see ``MODEL_CARD.md`` there). Importing this module is
cheap (torch + numpy only); weights are read when the model is built.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from stagevar.errors import StageVarError
from stagevar.guidance import parse_guidance
from stagevar.models.base import ConditionError
from stagevar.models.infinity import InfinityAdapter, InfinityConfig, set_compute_dtype_
from stagevar.models.text import TextCondition

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHT_FILES = ("config.json", "transformer.safetensors", "vae.safetensors", "text.safetensors")
MODEL_NAME = "infinity-mini"


@dataclasses.dataclass(frozen=True)
class MiniVariant:
    """One embedded model of the toy world: its name, image side, weights directory (whose
    ``config.json`` fixes the architecture) and how its weights are trained."""

    name: str
    image_size: int
    weights_dir: Path
    train_command: str
    description: str
    #: its defaults for ``stagevar-calibrate`` (``register_model(calibration=...)``)
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)


#: the embedded models, by image side (a weights directory's ``config.json`` names its side)
VARIANTS = {
    128: MiniVariant(MODEL_NAME, 128, WEIGHTS_DIR,
                     "stagevar-train --config training/configs/mini.yaml --out runs/mini (92 minutes on 2 CPU cores; "
                     "the shipped weights trained on to 175, see MODEL_CARD.md), then copy runs/mini/final/* into "
                     "stagevar/toy/weights/",
                     "Infinity trained here on the toy scenes (depth 8, width 256, 10 scales to 16x16, 128px, BSQ VAE "
                     "d=16); weights shipped in stagevar/toy/weights"),
    256: MiniVariant("infinity-mini-256", 256, WEIGHTS_DIR.parent / "weights-256",
                     "stagevar-train --config training/configs/mini256.yaml --init stagevar/toy/weights --out "
                     "runs/mini256 (or benchmarks/train256-gpu.sh on a GPU), then copy runs/mini256/final/* into "
                     "stagevar/toy/weights-256/",
                     "infinity-mini's architecture at 256px (13 scales to 32x32, the last three 75% of the tokens, "
                     "as Infinity-2B's at 1024px); weights trained here, 951 CPU steps from infinity-mini's, shipped in "
                     "stagevar/toy/weights-256 (see its MODEL_CARD.md)",
                     # an image costs about 4x infinity-mini's (2,680 tokens against 670): fewer keeps
                     # and latency rounds in the calibration pass, fewer trials and verification images,
                     # so that `stagevar-calibrate --budget 2x,3x,4x` fits in 30 minutes on 2 CPU cores
                     calibration={"measure": {"keeps": (0.5, 0.25, 0.1), "latency_repeats": 2},
                                  "trials": 16, "local_trials": 6, "search_images": 8, "num_heldout": 24,
                                  "num_report": 32, "verify_candidates": 3, "verify_near": 1, "verify_repeats": 3,
                                  "selection_images": 72}),
}


def variant_of(arch: dict[str, Any]) -> MiniVariant:
    """The embedded model an architecture belongs to (by its image side; other sides, as in the
    trainer's tests, count as infinity-mini)."""
    return VARIANTS.get(int(arch.get("image_size", 128)), VARIANTS[128])

#: The architecture trained by ``training/configs/mini.yaml`` (the YAML may override it).
DEFAULT_SCHEDULE = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


class MiniWeightsError(StageVarError):
    """The shipped weights of infinity-mini are missing or unreadable."""


# ------------------------------------------------------------------------------------ text encoder
class MiniTextEncoder(nn.Module):
    """Prompt -> per-token features for Infinity's cross-attention (a tiny stand-in for Flan-T5).

    Words of :data:`stagevar.toy.prompts.VOCAB` are embedded, an EOS embedding is appended, learned
    positions are added and two pre-norm transformer encoder layers (padding masked) mix them.
    The output keeps the real tokens + EOS of each prompt, concatenated (Infinity's compact layout).
    """

    def __init__(self, vocab_size: int, width: int = 128, layers: int = 2, heads: int = 4,
                 max_tokens: int = 12, ffn_mult: int = 2):
        super().__init__()
        self.vocab_size, self.width, self.max_tokens = vocab_size, width, max_tokens
        self.tok = nn.Embedding(vocab_size, width)
        self.eos = nn.Parameter(torch.randn(width) * 0.02)
        self.pos = nn.Parameter(torch.randn(max_tokens + 1, width) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, width * ffn_mult, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.tok.weight, std=0.02)

    def config_dict(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "width": self.width, "layers": len(self.layers),
                "heads": self.layers[0].self_attn.num_heads, "max_tokens": self.max_tokens,
                "ffn_mult": self.layers[0].linear1.out_features // self.width}

    @staticmethod
    def tokenize(prompts: Sequence[str]) -> tuple[torch.Tensor, list[int]]:
        """Word ids (B, MAX_TOKENS) padded with PAD_ID, and the number of words of each prompt."""
        from stagevar.toy.prompts import PAD_ID, tokenize
        ids, lens = [], []
        for p in prompts:
            try:
                row = tokenize(p)
            except ValueError as e:
                raise ConditionError(f"the embedded models' scene grammar (stagevar/toy/GRAMMAR.md) cannot encode "
                                     f"prompt {p!r}: {e}") from None
            n = sum(1 for t in row if t != PAD_ID)
            if n == 0:
                raise ConditionError(f"empty prompt {p!r}: every prompt must contain words")
            ids.append(row)
            lens.append(n)
        return torch.tensor(ids, dtype=torch.long), lens

    def encode_ids(self, ids_BT: torch.Tensor, n_words: Sequence[int]) -> TextCondition:
        B, T = ids_BT.shape
        dev = self.tok.weight.device
        ids_BT = ids_BT.to(dev)
        x = torch.cat((self.tok(ids_BT), torch.zeros(B, 1, self.width, device=dev)), dim=1)   # (B, T+1, C)
        n = torch.tensor(list(n_words), device=dev)
        ar = torch.arange(T + 1, device=dev)
        eos_at = (ar[None, :] == n[:, None])
        x = torch.where(eos_at[..., None], self.eos.to(x.dtype).expand(B, T + 1, -1), x)
        x = x + self.pos[: T + 1]
        pad = ar[None, :] > n[:, None]                   # True = ignore
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        x = self.norm(x)
        keep = ~pad
        return TextCondition(x[keep], [int(v) + 1 for v in n_words])

    def forward(self, prompts: Sequence[str]) -> TextCondition:
        ids, n = self.tokenize(prompts)
        return self.encode_ids(ids, n)


# ------------------------------------------------------------------------------------ config
def infinity_config(arch: dict[str, Any]) -> InfinityConfig:
    """The :class:`InfinityConfig` of a ``config.json`` / YAML ``transformer`` section."""
    t = dict(arch["transformer"])
    sched = tuple((1, int(s), int(s)) for s in arch["schedule"])
    sampling = dict(arch.get("sampling", {}))
    return InfinityConfig(
        depth=int(t["depth"]), embed_dim=int(t["embed_dim"]), num_heads=int(t["num_heads"]),
        text_channels=int(arch["text"]["width"]), codebook_dim=int(arch["vae"]["codebook_dim"]),
        scale_schedule=sched, rope_grid=(sched[-1][1], sched[-1][2]), mlp_ratio=float(t.get("mlp_ratio", 4.0)),
        text_maxlen=int(arch["text"].get("max_tokens", 12)) + 1, vae_stride=int(arch["vae"]["patch_size"]),
        cfg=parse_guidance(sampling.get("cfg", 3.0)), tau=float(sampling.get("tau", 1.0)),
        top_k=int(sampling.get("top_k", 0)), top_p=float(sampling.get("top_p", 0.0)),
    )


def build_parts(arch: dict[str, Any]):
    """Fresh (untrained) ``(InfinityConfig, BSQVAE, MiniTextEncoder, InfinityTransformer-holding adapter)``."""
    from stagevar.models.bsq_vae import BSQVAE, BSQVAEConfig
    from stagevar.toy.prompts import VOCAB

    cfg = infinity_config(arch)
    vae = BSQVAE(BSQVAEConfig.from_dict(arch["vae"]))
    txt = arch["text"]
    text = MiniTextEncoder(len(VOCAB), width=int(txt["width"]), layers=int(txt.get("layers", 2)),
                           heads=int(txt.get("heads", 4)), max_tokens=int(txt.get("max_tokens", 12)),
                           ffn_mult=int(txt.get("ffn_mult", 2)))
    adapter = InfinityAdapter(variant_of(arch).name, cfg, vae, text)
    return cfg, adapter


def init_transformer_(tr: nn.Module, seed: int = 0) -> None:
    """Upstream-style init of the parts PyTorch leaves at zero / N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    C = tr.cfg.embed_dim
    std = math.sqrt(1 / C / 3)
    with torch.no_grad():
        tr.cfg_uncond.copy_(torch.randn(tr.cfg_uncond.shape, generator=g) * math.sqrt(1 / tr.cfg.text_channels / 3))
        tr.pos_start.copy_(torch.randn(tr.pos_start.shape, generator=g) * std)
        tr.lvl_embed.weight.copy_(torch.randn(tr.lvl_embed.weight.shape, generator=g) * std)
        tr.head.weight.mul_(0.1)
        tr.head.bias.zero_()


# ------------------------------------------------------------------------------------ loading
def load_mini(weights: str | Path | None = None, device="cpu", dtype=torch.float32,
              variant: MiniVariant | None = None) -> InfinityAdapter:
    """Build an embedded model from a weights directory (default: ``variant``'s, infinity-mini's
    shipped ``stagevar/toy/weights`` when none is given). With a ``variant``, weights of the other
    embedded model are refused; without one, the weights' ``config.json`` says which it is."""
    from safetensors.torch import load_file

    asked = variant                         # None: whichever embedded model the weights' config.json names
    variant = variant or VARIANTS[128]
    wdir = Path(weights) if weights is not None else variant.weights_dir
    name = variant.name
    missing = [f for f in WEIGHT_FILES if not (wdir / f).is_file()]
    if missing:
        raise MiniWeightsError(
            f"{name} weights are missing in {wdir}: {', '.join(missing)}. Train them with `{variant.train_command}`, "
            "or pass --weights DIR pointing at a directory holding those files (--random-weights: its architecture "
            "with random weights, for speed only).")
    try:
        arch = json.loads((wdir / "config.json").read_text())
        found = variant_of(arch)
        if asked is None:
            variant, name = found, found.name
        elif found.name != name:
            raise MiniWeightsError(
                f"{wdir} holds {found.name}'s weights (config.json: image_size {arch.get('image_size')}), not {name}'s "
                f"({variant.image_size}px). Load them as --model {found.name}, or pass the weights of {name} "
                f"(default: {variant.weights_dir}).")
        _, adapter = build_parts(arch)
        for part, fname in (("transformer", "transformer.safetensors"), ("vae", "vae.safetensors"),
                            ("text_encoder", "text.safetensors")):
            sd = load_file(str(wdir / fname))
            mod = getattr(adapter, part)
            res = mod.load_state_dict(sd, strict=False)
            bad = [k for k in res.missing_keys if not k.endswith(("zero_k_bias", ".lfq.mask"))]
            if bad or res.unexpected_keys:
                raise MiniWeightsError(
                    f"{wdir / fname} does not match the {name} architecture in config.json: "
                    f"missing {bad[:5]}, unexpected {res.unexpected_keys[:5]}; re-copy the weights of one training run.")
    except MiniWeightsError:
        raise
    except (OSError, ValueError, KeyError) as e:
        raise MiniWeightsError(f"cannot read {name} weights from {wdir}: {e}") from None
    return set_compute_dtype_(adapter.to(device=device), dtype).eval()


def _weights_dir(weights, name: str = MODEL_NAME) -> Path | None:
    """A directory holding the model's files: ``weights`` itself or ``weights/<name>`` (so a
    shared ``$STAGEVAR_WEIGHTS`` root works); None means the model's own directory."""
    if weights is None:
        return None
    root = Path(weights)
    for cand in (root, root / name):
        if cand.is_dir() and (cand / "config.json").is_file():
            return cand
    return None


def random_mini(device="cpu", dtype=torch.float32, seed: int = 0, variant: MiniVariant | None = None) -> InfinityAdapter:
    """An embedded model's architecture (its weights directory's ``config.json``) with seeded random
    weights (speed tests without the weights)."""
    from stagevar.models.infinity import randomize_

    variant = variant or VARIANTS[128]
    cfg_file = variant.weights_dir / "config.json"
    if not cfg_file.is_file():
        raise MiniWeightsError(f"{variant.name}: {cfg_file} is missing (it fixes the architecture); reinstall stagevar.")
    _, adapter = build_parts(json.loads(cfg_file.read_text()))
    randomize_(adapter.transformer, seed=seed)
    randomize_(adapter.vae, seed=seed + 1)
    for mod in adapter.modules():
        for bname, buf in mod.named_buffers(recurse=False):
            if bname == "zero_k_bias":
                buf.zero_()
    return set_compute_dtype_(adapter.to(device=device), dtype).eval()


def _register() -> None:
    from stagevar.models.catalog import register_model

    for variant in VARIANTS.values():
        def build(weights=None, device="cpu", dtype=torch.float32, random_weights=False, _v=variant, **_):
            if random_weights:
                return random_mini(device=device, dtype=dtype, variant=_v)
            return load_mini(_weights_dir(weights, _v.name), device=device, dtype=dtype, variant=_v)

        register_model(variant.name, family="infinity", needs_weights=False, scorer="evaluator",
                       description=variant.description, calibration=variant.calibration)(build)


_register()
