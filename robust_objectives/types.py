"""Containers passed to and returned by every objective.

Shapes use B = pairs (or lists) in this worker's batch, T = response positions, V = vocabulary,
K = responses per list, d = hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

Tensor = torch.Tensor

# A callable that all-gathers a *detached* per-example tensor of shape (B, ...) from every worker
# and returns the concatenation (N, ...) in rank order, N = world_size * B.  The training stage
# builds it from torch.distributed; on one worker it is the identity.  Objectives never import
# torch.distributed themselves (STYLE.md G1).
GatherFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class PreferenceLogps:
    """Log-probabilities of a batch of preference pairs (chosen = preferred response).

    Attributes:
        policy_chosen_logps: (B,) summed log pi_theta(y_w | x) over response tokens, with grad.
        policy_rejected_logps: (B,) summed log pi_theta(y_l | x), with grad.
        reference_chosen_logps: (B,) summed log pi_ref(y_w | x), no grad.
        reference_rejected_logps: (B,) summed log pi_ref(y_l | x), no grad.
        chosen_lengths: (B,) number of response tokens of y_w (IPO's per-token average).
        rejected_lengths: (B,) number of response tokens of y_l.
        policy_chosen_vocab_logps: (B, T, V) log-softmax of the policy at each response position
            of y_w (token-level objectives: TDPO, Ra-DPO).
        policy_rejected_vocab_logps: (B, T, V) same for y_l.
        reference_chosen_vocab_logps: (B, T, V) reference log-softmax for y_w, no grad.
        reference_rejected_vocab_logps: (B, T, V) same for y_l.
        chosen_mask: (B, T) 1 at response positions of y_w, 0 at padding.
        rejected_mask: (B, T) same for y_l.
        calibration: (B,) DoRA's calibration value h~ per pair.
        policy_input_embeddings: (2B, T', d) the input-embedding tensor (chosen rows, then rejected
            rows) from which the policy log-probs above were computed, kept in the graph (WDPO).
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    reference_chosen_logps: Tensor
    reference_rejected_logps: Tensor
    chosen_lengths: Optional[Tensor] = None
    rejected_lengths: Optional[Tensor] = None
    policy_chosen_vocab_logps: Optional[Tensor] = None
    policy_rejected_vocab_logps: Optional[Tensor] = None
    reference_chosen_vocab_logps: Optional[Tensor] = None
    reference_rejected_vocab_logps: Optional[Tensor] = None
    chosen_mask: Optional[Tensor] = None
    rejected_mask: Optional[Tensor] = None
    calibration: Optional[Tensor] = None
    policy_input_embeddings: Optional[Tensor] = None


@dataclass(frozen=True)
class ListwiseLogps:
    """Log-probabilities of B prompts with K scored responses each (Plackett-Luce objectives).

    Attributes:
        policy_logps: (B, K) summed response log-probs under the policy, with grad.
        reference_logps: (B, K) summed response log-probs under the reference, no grad.
        scores: (B, K) reward scores; higher is better (the ranking comes from them).
        calibration: (B, K) DoRA's calibration value h~ per response, or None.
    """

    policy_logps: Tensor
    reference_logps: Tensor
    scores: Tensor
    calibration: Optional[Tensor] = None


@dataclass(frozen=True)
class ObjectiveOutput:
    """What every objective returns.

    Attributes:
        loss: scalar to backpropagate; the batch reduction is included.  For batch-coupled
            objectives called with a `gather`, its value is the global-batch loss and its gradient,
            averaged over workers as DDP does, equals the global loss's gradient.
        losses: (B,) per-example base losses (e.g. the per-pair DPO loss), detached.
        metrics: detached scalar tensors keyed by name (weight max/entropy, penalty, risk ratio ...).
    """

    loss: Tensor
    losses: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
