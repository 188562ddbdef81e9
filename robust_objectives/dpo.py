"""DPO and IPO, the reference points every robust variant reduces to, and the pieces they share.

Notation (OBJECTIVES.md section 1): Delta = log pi_theta(y|x) - log pi_ref(y|x) summed over response
tokens, h = Delta_w - Delta_l, and the per-pair DPO loss l = -log sigmoid(beta h).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

from robust_objectives.hyperparameters import check_hyperparameters
from robust_objectives.types import ObjectiveOutput, PreferenceLogps, Tensor

DPO_PAPER = "https://arxiv.org/abs/2305.18290"
IPO_PAPER = "https://arxiv.org/abs/2310.12036"


def to_compute_dtype(x: Tensor) -> Tensor:
    """Upcasts to at least float32 (bf16/fp16 -> fp32, fp64 stays fp64): all objective math is fp32+."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def require_pairs(inputs: object, objective: str) -> PreferenceLogps:
    """Checks that a pairwise objective got a PreferenceLogps (listwise ones take ListwiseLogps)."""
    if not isinstance(inputs, PreferenceLogps):
        raise TypeError(f"{objective} takes PreferenceLogps, got {type(inputs).__name__}")
    return inputs


def require_field(inputs: object, name: str, objective: str) -> Tensor:
    """Returns `inputs.<name>` or raises ValueError naming the missing field."""
    value = getattr(inputs, name)
    if value is None:
        raise ValueError(f"{objective} needs inputs.{name}, which is None")
    return value


def compute_log_ratios(inputs: PreferenceLogps) -> tuple[Tensor, Tensor]:
    """Sequence log-ratios Delta_w, Delta_l, in fp32 or wider; the reference is detached.

    Returns:
        chosen_log_ratios: (B,) log pi_theta(y_w|x) - log pi_ref(y_w|x).
        rejected_log_ratios: (B,) same for y_l.
    """
    chosen = to_compute_dtype(inputs.policy_chosen_logps) - to_compute_dtype(
        inputs.reference_chosen_logps.detach()
    )
    rejected = to_compute_dtype(inputs.policy_rejected_logps) - to_compute_dtype(
        inputs.reference_rejected_logps.detach()
    )
    return chosen, rejected


def compute_pair_losses(margins: Tensor, beta: float) -> Tensor:
    """Per-pair DPO loss -log sigmoid(beta h), Eq. 7 of https://arxiv.org/abs/2305.18290.

    Args:
        margins: (B,) h = Delta_w - Delta_l.
        beta: KL-regularisation strength.

    Returns:
        (B,) losses, with grad.
    """
    return -F.logsigmoid(beta * margins)


def summarize_rewards(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_log_ratios: Tensor,
    rejected_log_ratios: Tensor,
) -> dict[str, Tensor]:
    """TRL-compatible reward metrics plus the method-agnostic accuracy (OBJECTIVES.md section 1).

    Args:
        chosen_rewards: (B,) the method's implicit reward of y_w (beta Delta_w for DPO; TDPO and
            Ra-DPO add their sequential divergence).
        rejected_rewards: (B,) same for y_l.
        chosen_log_ratios: (B,) Delta_w.
        rejected_log_ratios: (B,) Delta_l.

    Returns:
        Detached scalars: rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies
        (mean 1[r_w > r_l], method-specific) and rewards/accuracy_delta (mean 1[Delta_w > Delta_l],
        comparable across methods).
    """
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/accuracy_delta": (chosen_log_ratios.detach() > rejected_log_ratios.detach())
        .to(chosen_rewards.dtype)
        .mean(),
    }


def pair_log_ratios(
    inputs: object, objective: str, hyperparameters: Mapping[str, Any]
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The preamble of a sequence-level pairwise objective whose implicit reward is beta Delta.

    Checks the hyperparameters, requires PreferenceLogps, and computes the log-ratios and the
    reward metrics, leaving the objective only its own formula.

    Args:
        inputs: what the objective was called with.
        objective: registry name (error messages, hyperparameter ranges).
        hyperparameters: every hyperparameter of the objective, `beta` included.

    Returns:
        chosen_log_ratios: (B,) Delta_w, with grad.
        rejected_log_ratios: (B,) Delta_l, with grad.
        metrics: summarize_rewards at rewards beta Delta_w, beta Delta_l.
    """
    check_hyperparameters(objective, hyperparameters)
    chosen, rejected = compute_log_ratios(require_pairs(inputs, objective))
    beta = hyperparameters["beta"]
    return chosen, rejected, summarize_rewards(beta * chosen, beta * rejected, chosen, rejected)


def mean_output(losses: Tensor, metrics: dict[str, Tensor]) -> ObjectiveOutput:
    """ObjectiveOutput of a non-coupled objective: loss = mean of the (B,) per-example losses."""
    return ObjectiveOutput(loss=losses.mean(), losses=losses.detach(), metrics=metrics)


def dpo(inputs: PreferenceLogps, *, beta: float = 0.1) -> ObjectiveOutput:
    """Direct Preference Optimization: mean_i -log sigmoid(beta h_i).

    Worked example: policy == reference gives h = 0 and l = log 2 for every pair, and
    dl/d policy_chosen_logps = -beta sigmoid(-beta h) = -beta / 2.

    Args:
        inputs: PreferenceLogps; uses the four (B,) sequence log-prob fields.
        beta: KL-regularisation strength, > 0 (0.1 in the paper).

    Returns:
        ObjectiveOutput with loss = mean(losses), losses (B,) = l_i, and reward metrics.
    """
    chosen, rejected, metrics = pair_log_ratios(inputs, "dpo", {"beta": beta})
    losses = compute_pair_losses(chosen - rejected, beta)  # Eq. 7 of DPO_PAPER
    return mean_output(losses, metrics)


def ipo(inputs: PreferenceLogps, *, beta: float = 0.1) -> ObjectiveOutput:
    """Identity Preference Optimization with TRL's per-token averaged log-ratios.

    l_i = (hbar_i - 1/(2 beta))^2 with hbar = Delta_w/|y_w| - Delta_l/|y_l| (Eq. 17 of
    https://arxiv.org/abs/2310.12036; per-token normalisation as in TRL 1.16, which the IPO authors
    confirmed). beta plays the role of IPO's tau; there is no beta multiplier on hbar.

    Worked example: Delta_w = 2 over 4 tokens, Delta_l = -1 over 2 tokens -> hbar = 0.5 + 0.5 = 1;
    beta = 0.25 -> target 1/(2 beta) = 2, l = (1 - 2)^2 = 1, dl/d policy_chosen_logps = 2(1-2)/4 = -0.5.

    Args:
        inputs: PreferenceLogps with chosen_lengths and rejected_lengths (B,) response token counts
            (a count of 0 is treated as 1; its Delta is 0 anyway).
        beta: regularisation, > 0; the margin target is 1/(2 beta).

    Returns:
        ObjectiveOutput with loss = mean(losses), losses (B,) = l_i, and reward metrics (beta Delta).
    """
    chosen, rejected, metrics = pair_log_ratios(inputs, "ipo", {"beta": beta})
    chosen_lengths = to_compute_dtype(require_field(inputs, "chosen_lengths", "ipo")).clamp(min=1)
    rejected_lengths = to_compute_dtype(require_field(inputs, "rejected_lengths", "ipo")).clamp(min=1)
    mean_margins = chosen / chosen_lengths - rejected / rejected_lengths
    losses = (mean_margins - 1.0 / (2.0 * beta)) ** 2  # Eq. 17 of IPO_PAPER
    metrics["ipo/mean_token_margin"] = mean_margins.detach().mean()
    return mean_output(losses, metrics)
