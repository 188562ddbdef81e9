"""Small real-architecture models and word-level tokenizers, built from a config and saved locally.

Nothing here downloads: the embedded world and the tests build a `LlamaForCausalLM` from a
`LlamaConfig` and a `WordLevel` tokenizer, save both with `save_pretrained`, and every stage then
loads them back through `from_pretrained(path)`, exactly as it would load a hub model.
"""

from __future__ import annotations

from typing import Sequence

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")


def build_word_tokenizer(words: Sequence[str], chat_template: str | None = None):
    """A whitespace word-level `PreTrainedTokenizerFast` over SPECIAL_TOKENS + `words`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(list(SPECIAL_TOKENS) + [w for w in words if w not in SPECIAL_TOKENS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


def build_tiny_causal_lm(
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    eos_token_id: int = 3,
):
    """A randomly initialised `LlamaForCausalLM` (a real transformers architecture), fp32, eval mode, with MLP
    width 2 x hidden_size and 128 positions."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()
