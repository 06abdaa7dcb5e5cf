"""``T5TextEncoder`` (the flan-t5-xl text encoder of the real Infinity checkpoints) on a tiny
random T5 with a word-level tokenizer saved the way a local Hugging Face copy is: the compact
condition keeps each prompt's real tokens (EOS included) and nothing of the padding, so a prompt
encodes the same alone or in a padded batch, and the adapter generates from it."""
from __future__ import annotations

import pytest
import torch

from stagevar.errors import StageVarError
from stagevar.models.text import T5TextEncoder

VOCAB = ["<pad>", "</s>", "<unk>", "a", "an", "red", "blue", "green", "circle", "square", "triangle", "two",
         "left", "of", "above", "cat"]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    d = tmp_path_factory.mktemp("flan-t5-mini")
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(d)
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(VOCAB), d_model=256, d_kv=32, d_ff=128, num_layers=2, num_heads=4,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(d)
    return d


def test_compact_condition_keeps_real_tokens_and_ignores_padding(t5_dir):
    enc = T5TextEncoder(t5_dir)
    prompts = ["a red circle", "two blue squares left of a green triangle", "cat"]
    cond = enc(prompts)
    assert cond.lens == [4, 9, 2]                                  # words + EOS (unknown words map to <unk>)
    assert cond.kv_compact.shape == (15, 256) and cond.kv_compact.dtype == torch.float32
    start = 0
    for p, n in zip(prompts, cond.lens):
        alone = enc([p])
        assert alone.lens == [n]
        torch.testing.assert_close(cond.kv_compact[start:start + n], alone.kv_compact, atol=1e-5, rtol=1e-5)
        # the same as the encoder run directly on the unpadded ids
        ids = enc.tokenizer(p, return_tensors="pt").input_ids
        assert ids[0, -1].item() == 1 and ids.shape[1] == n
        direct = enc.encoder(input_ids=ids).last_hidden_state[0]
        torch.testing.assert_close(alone.kv_compact, direct, atol=1e-5, rtol=1e-5)
        start += n


def test_infinity_adapter_generates_from_the_t5_condition(t5_dir):
    from stagevar.models.registry import load_model
    from stagevar.runtime import Runtime
    model = load_model("infinity-tiny")                           # text_channels 256, as the tiny T5's width
    model.text_encoder = T5TextEncoder(t5_dir)
    cond = model.encode_prompts(["a red circle", "two blue squares"])
    assert cond.lens == [4, 4]
    a = Runtime(model).generate(condition=cond, seed=0).images
    b = Runtime(model).generate(["a red circle", "two blue squares"], seed=0).images
    assert a.shape[0] == 2 and torch.isfinite(a).all() and torch.equal(a, b)
    other = Runtime(model).generate(["a green triangle", "two blue squares"], seed=0).images
    assert not torch.equal(other[0], a[0])                        # the prompt reaches the transformer


def test_a_directory_without_the_model_is_one_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(StageVarError) as ei:
        T5TextEncoder(tmp_path)
    msg = str(ei.value)
    assert str(tmp_path) in msg and "flan-t5-xl" in msg and "\n" not in msg
