"""Policy and reference models, batch collation, and the one concatenated forward per micro-batch.

A micro-batch of B pairs becomes 2B right-padded rows `prompt + response` (chosen rows 0..B-1, then
rejected rows B..2B-1; OBJECTIVES.md section 1) with labels -100 on prompt and padding; a listwise
micro-batch of B prompts x K responses becomes B*K rows (row b*K + k).  One forward gives every
row's summed response log-prob through `robust_objectives.logps` (the only logits -> log-prob
code), plus, only when the objective needs them, per-position vocabulary log-probs (TDPO, Ra-DPO)
or the input-embedding tensor kept in the graph (WDPO's double backward).

With LoRA (peft) the reference is the same module with its adapters disabled
(`with model.disable_adapter()` under no_grad): no second copy of the weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from robust_objectives import ListwiseLogps, PreferenceLogps
from robust_objectives import logps as logps_lib

IGNORE_INDEX = logps_lib.IGNORE_INDEX


# [1] Collation: rows of token ids -> one padded batch ------------------------------------------


def _as_ids(value: Any) -> list[int]:
    return [int(t) for t in value]


def pad_rows(sequences: Sequence[tuple[list[int], int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `(ids, prompt_length)` rows into input_ids / attention_mask / labels of shape (N, L)."""
    length = max(len(ids) for ids, _ in sequences)
    n = len(sequences)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(sequences):
        tokens = torch.tensor(ids, dtype=torch.long)
        input_ids[row, : len(ids)] = tokens
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_length : len(ids)] = tokens[prompt_length:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _optional_float(rows: Mapping[str, Any], name: str) -> Optional[torch.Tensor]:
    if name not in rows:
        return None
    return torch.as_tensor(np.stack([np.asarray(v, dtype=np.float64) for v in rows[name]]), dtype=torch.float32)


def collate_pairs(rows: Mapping[str, Sequence[Any]], pad_token_id: int) -> dict[str, Any]:
    """Concatenate B preference pairs into one 2B-row batch (chosen rows, then rejected rows).

    Args:
        rows: columns of the dataset contract (pipelines/schema.py): prompt_input_ids,
            chosen_input_ids, rejected_input_ids (each a length-B sequence of id lists), and
            optionally calibration / reference_chosen_logps / reference_rejected_logps (B,).
        pad_token_id: id written at padding positions (masked out; any valid id works).

    Returns:
        dict with input_ids, attention_mask, labels (2B, L) (labels -100 on prompt and padding),
        chosen_lengths / rejected_lengths (B,) response token counts, num_pairs B, and the optional
        float columns as (B,) tensors.
    """
    prompts = [_as_ids(p) for p in rows["prompt_input_ids"]]
    chosen = [_as_ids(c) for c in rows["chosen_input_ids"]]
    rejected = [_as_ids(r) for r in rows["rejected_input_ids"]]
    sequences = [(p + c, len(p)) for p, c in zip(prompts, chosen)]
    sequences += [(p + r, len(p)) for p, r in zip(prompts, rejected)]
    batch: dict[str, Any] = pad_rows(sequences, pad_token_id)
    batch["num_pairs"] = len(prompts)
    batch["chosen_lengths"] = torch.tensor([len(c) for c in chosen], dtype=torch.long)
    batch["rejected_lengths"] = torch.tensor([len(r) for r in rejected], dtype=torch.long)
    for name in ("calibration", "reference_chosen_logps", "reference_rejected_logps"):
        value = _optional_float(rows, name)
        if value is not None:
            batch[name] = value
    return batch


def collate_lists(rows: Mapping[str, Sequence[Any]], pad_token_id: int) -> dict[str, Any]:
    """Flatten B prompts x K scored responses into B*K rows (row b*K + k).

    Args:
        rows: prompt_input_ids (B lists), responses_input_ids (B lists of K id lists), scores
            (B lists of K), optionally calibration and reference_logps (B lists of K).
        pad_token_id: id written at padding positions.

    Returns:
        dict with input_ids, attention_mask, labels (B*K, L), scores (B, K), num_pairs B,
        list_size K, and calibration / reference_logps (B, K) when present.

    Raises:
        ValueError: lists of different sizes in one batch (the (B, K) objectives need one K).
    """
    prompts = [_as_ids(p) for p in rows["prompt_input_ids"]]
    responses = [[_as_ids(r) for r in group] for group in rows["responses_input_ids"]]
    sizes = {len(group) for group in responses}
    if len(sizes) != 1:
        raise ValueError(f"listwise batch mixes list sizes {sorted(sizes)}; every row needs the same K")
    sequences = [(p + r, len(p)) for p, group in zip(prompts, responses) for r in group]
    batch: dict[str, Any] = pad_rows(sequences, pad_token_id)
    batch["num_pairs"] = len(prompts)
    batch["list_size"] = sizes.pop()
    batch["scores"] = _optional_float(rows, "scores")
    for name in ("calibration", "reference_logps"):
        value = _optional_float(rows, name)
        if value is not None:
            batch[name] = value
    return batch


def count_tokens(batch: Mapping[str, Any]) -> tuple[int, int]:
    """(non-padding tokens, padded positions) of a collated batch."""
    mask = batch["attention_mask"]
    return int(mask.sum()), int(mask.numel())


# [2] Models ------------------------------------------------------------------------------------


def load_causal_lm(path: str, *, attn_implementation: str, device: torch.device | str = "cpu"):
    """`AutoModelForCausalLM.from_pretrained(path)` in fp32 on `device` (bf16 is autocast, not storage)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load, per worker, is noise in the run's log
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    return model.to(device)


def add_lora(model, *, r: int, alpha: float, dropout: float, target_modules: Sequence[str], seed: int):
    """Wrap `model` with peft LoRA adapters; only the adapters train.

    The adapter init (LoRA's A matrices are random) is seeded so every worker, and a rerun with any
    number of workers, starts from the same weights.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) or None,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def pad_token_id_of(model) -> int:
    config = model.config
    for value in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


# [3] The forward: rows -> log-probs -------------------------------------------------------------


@dataclass(frozen=True)
class RowLogps:
    """Log-probs of the N rows of one collated batch under one model.

    Attributes:
        logps: (N,) summed response log-probs, fp32.
        lengths: (N,) response token counts.
        vocab_logps: (N, T, V) per-position log-softmax over the response span, or None.
        mask: (N, T) True at response positions (aligned with vocab_logps), or None.
        embeddings: (N, L, d) input embeddings the logits were computed from (graph kept), or None.
    """

    logps: torch.Tensor
    lengths: torch.Tensor
    vocab_logps: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    embeddings: Optional[torch.Tensor] = None


def autocast_context(device_type: str, precision: str):
    """bf16 autocast (fp32 master weights) or nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_row_logps(
    model,
    batch: Mapping[str, Any],
    *,
    vocab: bool = False,
    embeddings: bool = False,
    precision: str = "fp32",
) -> RowLogps:
    """One forward of all rows of `batch`; log-probs via robust_objectives.logps in fp32.

    Args:
        model: a causal LM (possibly peft-wrapped), already on the batch's device.
        batch: collate_pairs / collate_lists output moved to the model's device.
        vocab: also return per-position vocabulary log-probs over the response span.
        embeddings: feed `inputs_embeds = model.get_input_embeddings()(input_ids)` and return it;
            if the embedding layer is frozen (LoRA) the tensor is made a leaf requiring grad, so
            d loss / d embeddings still exists (WDPO).
        precision: "fp32" or "bf16" (autocast).

    Returns:
        RowLogps of the N = 2B (or B*K) rows.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
    embeds = None
    with autocast_context(input_ids.device.type, precision):
        if embeddings:
            embeds = model.get_input_embeddings()(input_ids)
            if not embeds.requires_grad:
                embeds = embeds.detach().requires_grad_(True)
            kwargs["inputs_embeds"] = embeds
        else:
            kwargs["input_ids"] = input_ids
        logits = model(**kwargs).logits  # (N, L, V)
    if not vocab:
        logps, lengths = logps_lib.compute_sequence_logps(logits, labels)
        return RowLogps(logps=logps, lengths=lengths, embeddings=embeds)
    vocab_logps, token_logps, mask = logps_lib.compute_vocab_logps(logits, labels)
    # Keep only the response span: columns before the earliest response position are all masked.
    first = int(mask.any(dim=0).nonzero()[0]) if bool(mask.any()) else 0
    return RowLogps(
        logps=token_logps.sum(dim=-1),
        lengths=mask.sum(dim=-1),
        vocab_logps=vocab_logps[:, first:],
        mask=mask[:, first:],
        embeddings=embeds,
    )


def compute_reference_row_logps(
    policy, reference, batch: Mapping[str, Any], *, vocab: bool = False, precision: str = "fp32"
) -> RowLogps:
    """Reference log-probs under no_grad: a frozen copy, or the policy with LoRA adapters disabled."""
    with torch.no_grad():
        if reference is not None:
            return compute_row_logps(reference, batch, vocab=vocab, precision=precision)
        if not is_peft_model(policy):
            raise ValueError("a live reference needs either a reference model or a LoRA policy")
        with policy.disable_adapter():
            return compute_row_logps(policy, batch, vocab=vocab, precision=precision)


# [4] Objective inputs -----------------------------------------------------------------------------


def build_preference_logps(batch: Mapping[str, Any], policy: RowLogps, reference: RowLogps | None) -> PreferenceLogps:
    """Split the 2B rows into the chosen / rejected fields of PreferenceLogps.

    The reference comes from `reference` (live) or from the batch's precomputed columns.
    """
    b = batch["num_pairs"]
    if reference is not None:
        reference_chosen, reference_rejected = reference.logps[:b], reference.logps[b:]
    else:
        reference_chosen = batch["reference_chosen_logps"].to(policy.logps)
        reference_rejected = batch["reference_rejected_logps"].to(policy.logps)
    fields: dict[str, Any] = dict(
        policy_chosen_logps=policy.logps[:b],
        policy_rejected_logps=policy.logps[b:],
        reference_chosen_logps=reference_chosen.detach(),
        reference_rejected_logps=reference_rejected.detach(),
        chosen_lengths=batch["chosen_lengths"],
        rejected_lengths=batch["rejected_lengths"],
        calibration=batch.get("calibration"),
        policy_input_embeddings=policy.embeddings,
    )
    if policy.vocab_logps is not None:
        assert reference is not None and reference.vocab_logps is not None
        fields.update(
            policy_chosen_vocab_logps=policy.vocab_logps[:b],
            policy_rejected_vocab_logps=policy.vocab_logps[b:],
            reference_chosen_vocab_logps=reference.vocab_logps[:b].detach(),
            reference_rejected_vocab_logps=reference.vocab_logps[b:].detach(),
            chosen_mask=policy.mask[:b],
            rejected_mask=policy.mask[b:],
        )
    return PreferenceLogps(**fields)


def build_listwise_logps(batch: Mapping[str, Any], policy: RowLogps, reference: RowLogps | None) -> ListwiseLogps:
    """Reshape B*K row log-probs into the (B, K) fields of ListwiseLogps."""
    b, k = batch["num_pairs"], batch["list_size"]
    if reference is not None:
        reference_logps = reference.logps.reshape(b, k)
    else:
        reference_logps = batch["reference_logps"].to(policy.logps)
    return ListwiseLogps(
        policy_logps=policy.logps.reshape(b, k),
        reference_logps=reference_logps.detach(),
        scores=batch["scores"],
        calibration=batch.get("calibration"),
    )


def move_batch(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Tensors to `device`; ints stay."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
