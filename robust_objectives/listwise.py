"""Listwise objectives over K scored responses per prompt: DPO-PL and DoRA on top of it.

The Plackett-Luce loss ranks the K responses by reward score (descending; ties keep their input
order, torch's stable sort) and, with s_k = beta (log pi_theta - log pi_ref)(y_(k)), is
l_b = -(1/K) sum_k [s_k - logsumexp_{j >= k} s_j] (DPO paper App. A.3, https://arxiv.org/abs/2305.18290;
the 1/K mean includes the trivial last term, as in the DoRA code). For K = 2 it is half the DPO loss.
"""

from __future__ import annotations

from typing import Optional

import torch

from robust_objectives.distributional import check_calibration, reduce_dora_losses
from robust_objectives.dpo import mean_output, require_field, to_compute_dtype
from robust_objectives.hyperparameters import check_hyperparameters
from robust_objectives.types import GatherFn, ListwiseLogps, ObjectiveOutput, Tensor


def _require_lists(inputs: object, objective: str) -> ListwiseLogps:
    if not isinstance(inputs, ListwiseLogps):
        raise TypeError(f"{objective} takes ListwiseLogps, got {type(inputs).__name__}")
    return inputs


def rank_by_scores(values: Tensor, scores: Tensor) -> Tensor:
    """`values` (B, K) reordered per list by descending score, ties in input order (stable sort).

    This is the one listwise ranking: column 0 is the top-scored response (the "chosen" of the
    reward and log-prob metrics), column -1 the bottom-scored one (the "rejected").
    """
    order = torch.argsort(scores.detach(), dim=-1, descending=True, stable=True)
    return values.gather(-1, order)


def compute_plackett_luce_losses(inputs: ListwiseLogps, beta: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-list Plackett-Luce losses and listwise reward metrics.

    Args:
        inputs: ListwiseLogps with (B, K) policy_logps, reference_logps and scores.
        beta: KL-regularisation strength, > 0.

    Returns:
        losses: (B,) l_b, with grad.
        metrics: rewards/chosen and rewards/rejected (mean reward of the top- and bottom-scored
            response), rewards/margins, and rewards/accuracies / rewards/accuracy_delta: the share of
            response pairs with different scores whose reward / log-ratio order agrees with the scores.
    """
    log_ratios = to_compute_dtype(inputs.policy_logps) - to_compute_dtype(inputs.reference_logps.detach())
    ranked = rank_by_scores(beta * log_ratios, inputs.scores)  # (B, K) rewards, best first
    # logsumexp over j >= k for every k: a reversed cumulative logsumexp.
    tail_normalizers = torch.logcumsumexp(ranked.flip(-1), dim=-1).flip(-1)
    losses = -(ranked - tail_normalizers).mean(dim=-1)

    detached = ranked.detach()
    ranked_scores = rank_by_scores(inputs.scores.detach(), inputs.scores)
    ranked_ratios = rank_by_scores(log_ratios.detach(), inputs.scores)
    better = ranked_scores[:, :, None] > ranked_scores[:, None, :]  # (B, K, K) score order j over k
    pairs = better.sum().clamp(min=1)
    metrics = {
        "rewards/chosen": detached[:, 0].mean(),
        "rewards/rejected": detached[:, -1].mean(),
        "rewards/margins": (detached[:, 0] - detached[:, -1]).mean(),
        "rewards/accuracies": ((detached[:, :, None] > detached[:, None, :]) & better).sum() / pairs,
        "rewards/accuracy_delta": ((ranked_ratios[:, :, None] > ranked_ratios[:, None, :]) & better).sum()
        / pairs,
    }
    return losses, metrics


def dpo_pl(inputs: ListwiseLogps, *, beta: float = 0.1) -> ObjectiveOutput:
    """DPO with a Plackett-Luce ranking over K responses: mean_b l_b (module docstring).

    Worked example: K = 3 with ranked rewards s = (log 3, 0, 0) gives
    l = -(1/3)[(log 3 - log 5) + (0 - log 2) + 0] = (1/3) log(10/3).

    Args:
        inputs: ListwiseLogps with (B, K) policy_logps, reference_logps and scores.
        beta: KL-regularisation strength, > 0.

    Returns:
        ObjectiveOutput: loss = mean(losses), losses (B,) = l_b, listwise reward metrics.
    """
    check_hyperparameters("dpo_pl", {"beta": beta})
    losses, metrics = compute_plackett_luce_losses(_require_lists(inputs, "dpo_pl"), beta)
    return mean_output(losses, metrics)


def dora_pl(
    inputs: ListwiseLogps,
    *,
    beta: float = 0.1,
    lam: float = 1.0,
    gather: Optional[GatherFn] = None,
) -> ObjectiveOutput:
    """DoRA over Plackett-Luce lists: lam (logsumexp_b(cbar_b l_b / lam) - log N). **Batch-coupled.**

    https://arxiv.org/abs/2504.05831 (OBJECTIVES.md 6.3, DoRA's DPO-PL instantiation): cbar_b is
    the mean calibration h~ of list b's K responses, l_b the Plackett-Luce loss. At N = 1 it is
    cbar l exactly; with cbar = 1 and lam -> inf it is dpo_pl.

    Worked example (beta = 1, lam = 1, K = 2): lists with rewards (0, 0) and (log 3, 0) have
    l = ((1/2) log 2, (1/2) log(4/3)); with cbar = (2, 2) the loss is log((2 + 4/3)/2) = log(5/3).

    Args:
        inputs: ListwiseLogps with (B, K) policy_logps, reference_logps, scores and calibration.
        beta: KL-regularisation strength, > 0.
        lam: DRO temperature, > 0.
        gather: all-gather of detached (B, 3) values over workers; None for one worker.

    Returns:
        ObjectiveOutput: loss (global value, see global_batch.py), losses (B,) = l_b, metrics
        (listwise rewards, dora_pl/weight_max, dora_pl/weight_entropy, dora_pl/calibration_mean,
        dora_pl/base_loss_mean).
    """
    check_hyperparameters("dora_pl", {"beta": beta, "lam": lam})
    inputs = _require_lists(inputs, "dora_pl")
    calibration = check_calibration(require_field(inputs, "calibration", "dora_pl"), "dora_pl").mean(dim=-1)
    losses, metrics = compute_plackett_luce_losses(inputs, beta)
    return reduce_dora_losses(losses, calibration, lam, gather, "dora_pl", metrics)
