"""The only place where logits become log-probabilities: fp32, next-token aligned, -100 masked.

Labels follow the Hugging Face causal-LM convention: `labels` are the input ids with IGNORE_INDEX
at prompt and padding positions, and logits[:, t] predicts labels[:, t + 1]. Every function
shifts once, so outputs have T - 1 positions. Log-softmax runs in fp32 whatever the model dtype
(the DPO reference implementation's issue #37: bf16 log-probs are too coarse for log-ratios).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from robust_objectives.types import Tensor

IGNORE_INDEX = -100


def shift_labels(labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Next-token targets and their mask.

    Args:
        labels: (N, T) token ids, ignore_index at prompt/padding.
        ignore_index: label value of positions that are not scored.

    Returns:
        targets: (N, T - 1) labels[:, 1:] with ignored positions replaced by 0 (a valid index).
        mask: (N, T - 1) bool, True at scored (response) positions.
    """
    targets = labels[:, 1:]
    mask = targets != ignore_index
    return targets.masked_fill(~mask, 0), mask


def label_logps(logits: Tensor, targets: Tensor) -> Tensor:
    """log softmax(logits)[target] in fp32 (or fp64) as logit[target] - logsumexp(logits)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def compute_token_logps(
    logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Per-token log-probs of the labels.

    Args:
        logits: (N, T, V) model outputs, any float dtype.
        labels: (N, T) token ids with ignore_index at unscored positions.
        ignore_index: label value of unscored positions.

    Returns:
        token_logps: (N, T - 1) log pi(labels[:, t+1] | prefix), fp32 or wider, 0 where masked.
        mask: (N, T - 1) bool, True at scored positions.
    """
    targets, mask = shift_labels(labels, ignore_index=ignore_index)
    token_logps = label_logps(logits[:, :-1], targets)
    return token_logps.masked_fill(~mask, 0.0), mask


def compute_sequence_logps(
    logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Summed response log-probs, as DPO uses them.

    Args:
        logits: (N, T, V) model outputs.
        labels: (N, T) token ids with ignore_index at unscored positions.
        ignore_index: label value of unscored positions.

    Returns:
        sequence_logps: (N,) sum over scored positions of the label log-probs.
        lengths: (N,) number of scored positions (IPO's per-token average divides by it).
    """
    token_logps, mask = compute_token_logps(logits, labels, ignore_index=ignore_index)
    return token_logps.sum(dim=-1), mask.sum(dim=-1)


def compute_vocab_logps(
    logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor, Tensor]:
    """Full-vocabulary log-softmax at every position, for token-level objectives (TDPO, Ra-DPO).

    Args:
        logits: (N, T, V) model outputs.
        labels: (N, T) token ids with ignore_index at unscored positions.
        ignore_index: label value of unscored positions.

    Returns:
        vocab_logps: (N, T - 1, V) log pi(. | prefix) in fp32 or wider (all positions; the mask says
            which count).
        token_logps: (N, T - 1) label log-probs gathered from vocab_logps, 0 where masked.
        mask: (N, T - 1) bool, True at scored positions.
    """
    targets, mask = shift_labels(labels, ignore_index=ignore_index)
    shifted = logits[:, :-1]
    vocab_logps = torch.log_softmax(shifted.to(torch.promote_types(shifted.dtype, torch.float32)), dim=-1)
    token_logps = vocab_logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return vocab_logps, token_logps.masked_fill(~mask, 0.0), mask


def projected_label_logps(
    hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, chunk_size: int
) -> Tensor:
    """log softmax(head(hidden))[targets] at M gathered positions, chunk_size positions at a time.

    With one chunk (M <= chunk_size) the (M, V) logits are computed once and kept for the backward.
    With more, each chunk runs under torch.utils.checkpoint: the forward keeps no (chunk, V) logits
    and the backward recomputes them one chunk at a time, so peak extra memory is one chunk's fp32
    logits.  Values and gradients (double backward included, for WDPO) are those of the plain path.

    Args:
        hidden: (M, d) final hidden states at the scored positions (the LM head's input).
        head: the output projection, (m, d) -> (m, V) logits (an nn.Linear, a LoRA-wrapped one, ...).
        targets: (M,) token ids the positions predict.
        chunk_size: positions per chunk, >= 1.

    Returns:
        (M,) label log-probs, fp32 or wider.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    out_dtype = torch.promote_types(hidden.dtype, torch.float32)
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=out_dtype)

    def piece(h: Tensor, t: Tensor) -> Tensor:
        return label_logps(head(h), t)

    if hidden.shape[0] <= chunk_size:
        return piece(hidden, targets)
    return torch.cat([
        checkpoint(piece, hidden[start : start + chunk_size], targets[start : start + chunk_size], use_reentrant=False)
        for start in range(0, hidden.shape[0], chunk_size)
    ])


def chunked_token_logps(
    hidden_states: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    chunk_size: int,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """compute_token_logps(hidden_states @ W^T + b, labels) without materialising the logits.

    Only scored positions are projected, through projected_label_logps (chunked, checkpointed).

    Args:
        hidden_states: (N, T, d) final hidden states (the LM head's input).
        lm_head_weight: (V, d) output projection.
        labels: (N, T) token ids with ignore_index at unscored positions.
        chunk_size: scored positions per chunk, >= 1 (e.g. 1024 for V = 150k: 0.6 GB fp32).
        bias: optional (V,) output bias.
        ignore_index: label value of unscored positions.

    Returns:
        token_logps: (N, T - 1) fp32 or wider, 0 where masked.
        mask: (N, T - 1) bool, True at scored positions.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    targets, mask = shift_labels(labels, ignore_index=ignore_index)
    scored = projected_label_logps(hidden_states[:, :-1][mask], lambda h: F.linear(h, lm_head_weight, bias),
                                   targets[mask], chunk_size)
    token_logps = torch.zeros(mask.shape, dtype=scored.dtype, device=scored.device)
    return token_logps.masked_scatter(mask, scored), mask
