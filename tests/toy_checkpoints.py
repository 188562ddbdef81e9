"""Test-only: a tiny saved model + tokenizer, loaded back through the real `from_pretrained` path."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipelines.world.toy_models import build_tiny_causal_lm, build_word_tokenizer


def save_tiny_model_and_tokenizer(path: str | Path, words: Sequence[str], seed: int = 0, **model_kwargs) -> Path:
    """Build a word tokenizer and a tiny Llama over it, save both to `path`, return `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_tokenizer(words)
    model = build_tiny_causal_lm(
        len(tokenizer),
        seed=seed,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **model_kwargs,
    )
    tokenizer.save_pretrained(path)
    model.save_pretrained(path)
    return path
