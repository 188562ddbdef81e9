"""Token-level objectives: TDPO1/TDPO2 (sequential KL) and Ra-DPO1/Ra-DPO2 (sequential risk ratio).

l = -log sigmoid(beta [h - alpha (D_l - D'_w)]), where D is a sequential divergence of pi_theta from
pi_ref on the dataset response (risk_measures.py), alpha = 1 and D'_w = D_w for the "1" variants,
and D'_w = stopgrad(D_w) for the "2" variants (OBJECTIVES.md 3.2; [RA-CODE] detaches the chosen
risk ratio). The implicit reward is beta (Delta + alpha D'), so rewards/margins is the sigmoid's
argument; rewards/accuracy_delta (1[Delta_w > Delta_l]) stays comparable with the other methods.
"""

from __future__ import annotations

import torch.nn.functional as F

from robust_objectives.dpo import compute_log_ratios, mean_output, require_field, require_pairs, summarize_rewards
from robust_objectives.hyperparameters import check_hyperparameters
from robust_objectives.risk_measures import compute_sequence_divergence
from robust_objectives.types import ObjectiveOutput, PreferenceLogps

TDPO_PAPER = "https://arxiv.org/abs/2404.11999"
RADPO_PAPER = "https://arxiv.org/abs/2505.20359"
_VOCAB_FIELDS = (
    "policy_chosen_vocab_logps",
    "policy_rejected_vocab_logps",
    "reference_chosen_vocab_logps",
    "reference_rejected_vocab_logps",
    "chosen_mask",
    "rejected_mask",
)


def _token_level(
    inputs: PreferenceLogps,
    objective: str,
    *,
    beta: float,
    alpha: float,
    stop_chosen_gradient: bool,
    measure: str,
    mu: float,
) -> ObjectiveOutput:
    inputs = require_pairs(inputs, objective)
    fields = {name: require_field(inputs, name, objective) for name in _VOCAB_FIELDS}
    chosen_divergence, chosen_kl = compute_sequence_divergence(
        fields["policy_chosen_vocab_logps"], fields["reference_chosen_vocab_logps"],
        fields["chosen_mask"], measure=measure, mu=mu,
    )
    rejected_divergence, rejected_kl = compute_sequence_divergence(
        fields["policy_rejected_vocab_logps"], fields["reference_rejected_vocab_logps"],
        fields["rejected_mask"], measure=measure, mu=mu,
    )
    chosen, rejected = compute_log_ratios(inputs)
    if stop_chosen_gradient:
        chosen_term = alpha * chosen_divergence.detach()
    else:
        chosen_term = alpha * chosen_divergence
    rejected_term = alpha * rejected_divergence
    # u - delta = beta [h - alpha (D_l - D'_w)]: Eq. 17 (variant 1) and Eq. 19 (variant 2) of RADPO_PAPER
    # (numbering of the ICML-2025 submission text, OBJECTIVES.md section 0).
    chosen_rewards = beta * (chosen + chosen_term)
    rejected_rewards = beta * (rejected + rejected_term)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    metrics = summarize_rewards(chosen_rewards, rejected_rewards, chosen, rejected)
    metrics["seq_kl/chosen"] = chosen_kl.mean()
    metrics["seq_kl/rejected"] = rejected_kl.mean()
    if measure != "kl":
        metrics["risk_ratio/chosen"] = chosen_divergence.detach().mean()
        metrics["risk_ratio/rejected"] = rejected_divergence.detach().mean()
    return mean_output(losses, metrics)


def tdpo1(inputs: PreferenceLogps, *, beta: float = 0.1) -> ObjectiveOutput:
    """TDPO1: l = -log s(beta [h - (D_l - D_w)]), D = sequential KL(pi_ref || pi_theta).

    https://arxiv.org/abs/2404.11999 (OBJECTIVES.md 3.2). Worked example: one response position,
    pi_ref = (1/2, 1/2), pi_theta = (3/4, 1/4) on y_w and pi_theta = pi_ref on y_l, h = 0:
    D_w = (1/2) log(2/3) + (1/2) log 2 = (1/2) log(4/3), D_l = 0, l = log(1 + exp(-beta D_w)).

    Args:
        inputs: PreferenceLogps with the four (B, T, V) vocab log-prob fields and (B, T) masks.
        beta: KL-regularisation strength, > 0.

    Returns:
        ObjectiveOutput: loss = mean(losses), losses (B,), metrics (rewards beta(Delta + D),
        seq_kl/chosen, seq_kl/rejected).
    """
    check_hyperparameters("tdpo1", {"beta": beta})
    return _token_level(inputs, "tdpo1", beta=beta, alpha=1.0, stop_chosen_gradient=False, measure="kl", mu=1.0)


def tdpo2(inputs: PreferenceLogps, *, beta: float = 0.1, alpha: float = 0.5) -> ObjectiveOutput:
    """TDPO2: l = -log s(beta [h - alpha (D_l - stopgrad(D_w))]), D = sequential KL.

    Args:
        inputs: PreferenceLogps with the four (B, T, V) vocab log-prob fields and (B, T) masks.
        beta: KL-regularisation strength, > 0.
        alpha: weight of the sequential-KL difference, >= 0 (0.5 in the paper).

    Returns:
        ObjectiveOutput: loss = mean(losses), losses (B,), metrics (rewards beta(Delta + alpha D),
        seq_kl/chosen, seq_kl/rejected).
    """
    check_hyperparameters("tdpo2", {"beta": beta, "alpha": alpha})
    return _token_level(inputs, "tdpo2", beta=beta, alpha=alpha, stop_chosen_gradient=True, measure="kl", mu=1.0)


def radpo1(
    inputs: PreferenceLogps,
    *,
    beta: float = 0.1,
    mu: float = 0.95,
    risk: str = "cvar",
) -> ObjectiveOutput:
    """Ra-DPO1: l = -log s(beta [h - (D_l - D_w)]), D = sequential risk ratio (Eq. 17 of Ra-DPO).

    https://arxiv.org/abs/2505.20359; D[b] = sum over response positions of phi, phi one of the risk
    measures of risk_measures.py. risk="cvar" with mu = 1 and risk="erm" with mu -> 0 give TDPO1.
    At pi_theta == pi_ref (the first step, a fresh LoRA) d is 0 up to rounding; the tie rule of
    risk_measures.py makes the loss and the first gradient equal TDPO1's for "cvar" and "cvar_official".

    Args:
        inputs: PreferenceLogps with the four (B, T, V) vocab log-prob fields and (B, T) masks.
        beta: KL-regularisation strength, > 0.
        mu: CVaR level in (0, 1] for "cvar"/"cvar_official"; entropic coefficient > 0 for "erm".
        risk: "cvar" (paper), "cvar_official" (authors' code) or "erm" (entropic).

    Returns:
        ObjectiveOutput: loss = mean(losses), losses (B,), metrics (rewards beta(Delta + D),
        risk_ratio/chosen, risk_ratio/rejected, seq_kl/chosen, seq_kl/rejected).
    """
    check_hyperparameters("radpo1", {"beta": beta, "mu": mu, "risk": risk})
    return _token_level(inputs, "radpo1", beta=beta, alpha=1.0, stop_chosen_gradient=False, measure=risk, mu=mu)


def radpo2(
    inputs: PreferenceLogps,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    mu: float = 0.95,
    risk: str = "cvar",
) -> ObjectiveOutput:
    """Ra-DPO2: l = -log s(beta [h - alpha (D_l - stopgrad(D_w))]), D = risk ratio (Eq. 19 of Ra-DPO).

    At pi_theta == pi_ref the tie rule of risk_measures.py makes the first step equal TDPO2's.

    Args:
        inputs: PreferenceLogps with the four (B, T, V) vocab log-prob fields and (B, T) masks.
        beta: KL-regularisation strength, > 0.
        alpha: weight of the risk-ratio difference, >= 0 (0.5 in the paper).
        mu: CVaR level in (0, 1] for "cvar"/"cvar_official"; entropic coefficient > 0 for "erm".
        risk: "cvar" (paper), "cvar_official" (authors' code) or "erm" (entropic).

    Returns:
        ObjectiveOutput: loss = mean(losses), losses (B,), metrics (rewards beta(Delta + alpha D),
        risk_ratio/chosen, risk_ratio/rejected, seq_kl/chosen, seq_kl/rejected).
    """
    check_hyperparameters("radpo2", {"beta": beta, "alpha": alpha, "mu": mu, "risk": risk})
    return _token_level(inputs, "radpo2", beta=beta, alpha=alpha, stop_chosen_gradient=True, measure=risk, mu=mu)
