"""Objectives for preference labels flipped with a known rate eps: conservative DPO and robust DPO.

cDPO (https://ericmitchell.ai/cdpo.pdf) smooths the label: it is DPO against a target that prefers
y_w with probability 1 - eps. rDPO (Chowdhury et al. 2024, https://arxiv.org/abs/2403.00409) instead
de-biases the loss so that its expectation over the flip equals the clean DPO loss (OBJECTIVES.md
section 2.2; TRL's loss_type="robust").
"""

from __future__ import annotations

import torch.nn.functional as F

from robust_objectives.dpo import mean_output, pair_log_ratios
from robust_objectives.types import ObjectiveOutput, PreferenceLogps

CDPO_NOTE = "https://ericmitchell.ai/cdpo.pdf"
RDPO_PAPER = "https://arxiv.org/abs/2403.00409"


def cdpo(
    inputs: PreferenceLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> ObjectiveOutput:
    """Conservative DPO: l = -(1 - eps) log s(beta h) - eps log s(-beta h).

    Worked example: beta = 1, h = log 3 gives s(h) = 3/4, s(-h) = 1/4, so with eps = 0.1
    l = 0.9 log(4/3) + 0.1 log 4. eps = 0 is DPO.

    Args:
        inputs: PreferenceLogps; uses the four (B,) sequence log-prob fields.
        beta: KL-regularisation strength, > 0.
        label_smoothing: eps in [0, 0.5], the assumed probability that a label is flipped.

    Returns:
        ObjectiveOutput with loss = mean(losses), losses (B,), and reward metrics (beta Delta).
    """
    hyperparameters = {"beta": beta, "label_smoothing": label_smoothing}
    chosen, rejected, metrics = pair_log_ratios(inputs, "cdpo", hyperparameters)
    logits = beta * (chosen - rejected)
    # Cross-entropy against the smoothed target (1 - eps, eps): the cDPO loss of CDPO_NOTE.
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return mean_output(losses, metrics)


def rdpo(
    inputs: PreferenceLogps,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
) -> ObjectiveOutput:
    """Robust (de-biased) DPO: l = [-(1 - eps) log s(beta h) + eps log s(-beta h)] / (1 - 2 eps).

    Unbiased under flips with known rate eps: (1 - eps) l(h) + eps l(-h) = -log s(beta h), because
    the log s(beta h) coefficients sum to -((1-eps)^2 - eps^2)/(1-2eps) = -1 and the log s(-beta h)
    ones cancel. The loss is unbounded below as h -> +inf (monitor rewards/margins).

    Worked example: beta = 1, h = log 3, eps = 0.1: l = (0.9 log(4/3) - 0.1 log 4) / 0.8.

    Args:
        inputs: PreferenceLogps; uses the four (B,) sequence log-prob fields.
        beta: KL-regularisation strength, > 0.
        label_smoothing: eps in [0, 0.5), the known flip rate; eps = 0 is DPO.

    Returns:
        ObjectiveOutput with loss = mean(losses), losses (B,), and reward metrics (beta Delta).
    """
    hyperparameters = {"beta": beta, "label_smoothing": label_smoothing}
    chosen, rejected, metrics = pair_log_ratios(inputs, "rdpo", hyperparameters)
    logits = beta * (chosen - rejected)
    # De-biased loss of RDPO_PAPER (TRL 1.16 dpo_trainer.py, loss_type="robust").
    losses = (
        -(1.0 - label_smoothing) * F.logsigmoid(logits) + label_smoothing * F.logsigmoid(-logits)
    ) / (1.0 - 2.0 * label_smoothing)
    return mean_output(losses, metrics)
