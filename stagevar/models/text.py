"""Text encoders producing Infinity's compact condition ``(kv_compact, lens)``.

:class:`T5TextEncoder` reproduces upstream ``encode_prompt`` (tools/run_infinity.py): flan-t5-xl
tokenizer with ``max_length=512``, padding to the longest prompt, the encoder's
``last_hidden_state`` in float32, and only the real tokens of each prompt kept (attention mask
sum, EOS included), concatenated. It needs the optional ``transformers`` extra and a local copy
of ``google/flan-t5-xl`` (no download is attempted).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from stagevar.errors import StageVarError


@dataclasses.dataclass
class TextCondition:
    """Prompts in upstream's compact form: ``kv_compact`` (sum(lens), Ct5) and ``lens``."""

    kv_compact: torch.Tensor
    lens: list[int]

    @property
    def batch_size(self) -> int:
        return len(self.lens)

    @property
    def cu_seqlens(self) -> torch.Tensor:
        return F.pad(torch.tensor(self.lens, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))


class T5TextEncoder(nn.Module):
    def __init__(self, path: str | Path, device="cpu"):
        super().__init__()
        try:
            from transformers import AutoTokenizer, T5EncoderModel
        except ImportError:
            raise StageVarError("the flan-t5-xl text encoder needs the 'transformers' package: pip install 'stagevar[text]'") from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.encoder = T5EncoderModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StageVarError(f"{path}: cannot load the flan-t5-xl text encoder (a local copy of google/flan-t5-xl: "
                                f"config.json, the weights and the tokenizer files are needed): {first}") from None
        self.encoder = self.encoder.to(device).eval()

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]):
        tok = self.tokenizer(list(prompts), max_length=512, padding="longest", truncation=True, return_tensors="pt")
        ids = tok.input_ids.to(self.encoder.device)
        mask = tok.attention_mask.to(self.encoder.device)
        feats = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        lens = mask.sum(dim=-1).tolist()
        kv = torch.cat([feats[i, :n] for i, n in enumerate(lens)], dim=0)
        return TextCondition(kv, [int(n) for n in lens])
