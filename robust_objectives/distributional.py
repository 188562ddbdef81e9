"""Batch-reweighting objectives: Dr.DPO, KLDPO and DoRA (pairwise). All are **batch-coupled**.

Each pair's weight depends on the other pairs' losses (OBJECTIVES.md section 1, class (b)), so the
statistics are taken over the global batch of all workers through `gather`; global_batch.py shows
why the returned loss has the global value and, averaged over workers, the global gradient.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from robust_objectives.dpo import compute_pair_losses, pair_log_ratios, require_field, to_compute_dtype
from robust_objectives.global_batch import combine_global, gather_detached, summarize_weights
from robust_objectives.types import GatherFn, ObjectiveOutput, PreferenceLogps, Tensor

DRDPO_PAPER = "https://arxiv.org/abs/2407.07880"
KLDPO_PAPER = "https://arxiv.org/abs/2502.01930"
DORA_PAPER = "https://arxiv.org/abs/2504.05831"


def drdpo(
    inputs: PreferenceLogps,
    *,
    beta: float = 0.1,
    beta_prime: float = 1.0,
    gather: Optional[GatherFn] = None,
) -> ObjectiveOutput:
    """Dr.DPO: L = -beta' (logsumexp_i(-l_i / beta') - log N). **Batch-coupled.**

    Loss of https://arxiv.org/abs/2407.07880 (OBJECTIVES.md 2.4), written with logsumexp. dL/dl_i =
    softmax(-l / beta')_i: high-loss (likely flipped) pairs are down-weighted. beta' -> inf gives DPO.

    Worked example: beta = 1, beta' = 1, l = (log 2, log 4/3) (h = 0 and h = log 3) gives
    L = -log((1/2 + 3/4) / 2) = log(8/5), weights softmax(-l) = (2/5, 3/5), and dL/d policy_chosen_logps
    = (2/5 (-1/2), 3/5 (-1/4)) = (-1/5, -3/20).

    Args:
        inputs: PreferenceLogps; uses the four (B,) sequence log-prob fields.
        beta: KL-regularisation strength, > 0.
        beta_prime: temperature of the log-mean-exp, > 0.
        gather: all-gather of detached (B,) losses over workers; None for one worker.

    Returns:
        ObjectiveOutput: loss (global value, see global_batch.py), losses (B,) = l_i, metrics
        (rewards, drdpo/weight_max, drdpo/weight_entropy, drdpo/base_loss_mean).
    """
    chosen, rejected, metrics = pair_log_ratios(inputs, "drdpo", {"beta": beta, "beta_prime": beta_prime})
    losses = compute_pair_losses(chosen - rejected, beta)  # per-pair DPO loss l_i
    all_losses = gather_detached(losses, gather)
    n = all_losses.shape[0]
    log_normalizer = torch.logsumexp(-all_losses / beta_prime, dim=0)
    value = -beta_prime * (log_normalizer - math.log(n))  # Dr.DPO loss, DRDPO_PAPER
    weights = n * torch.exp(-losses.detach() / beta_prime - log_normalizer)
    metrics.update(summarize_weights("drdpo", -all_losses / beta_prime))
    metrics["drdpo/base_loss_mean"] = all_losses.mean()
    return ObjectiveOutput(
        loss=combine_global(losses, weights, value), losses=losses.detach(), metrics=metrics
    )


def kldpo(
    inputs: PreferenceLogps,
    *,
    beta: float = 0.1,
    tau: float = 1.0,
    normalize: bool = False,
    max_weight: float = 10.0,
    gather: Optional[GatherFn] = None,
) -> ObjectiveOutput:
    """KLDPO: L = mean_i(w_i l_i) with detached weights. **Batch-coupled.**

    Algorithm 2 / App. F of https://arxiv.org/abs/2502.01930 as in the official code
    (OBJECTIVES.md 5.2): w_i = min(exp((l_i - m)/tau), max_weight), m the global-batch mean loss;
    the weights are not normalised (mean w >= 1 acts as a mild learning-rate boost).
    normalize=True uses w = N softmax(l / tau), whose gradient sum_i softmax_i grad l_i is that of
    tau log mean exp(l / tau), the KL-DRO dual at multiplier tau; max_weight does not apply there
    (those weights are bounded by N). High-loss pairs are up-weighted; tau -> inf gives DPO.

    Worked example (tau = 1, l = (log 2, log 4/3)): m = (l_1 + l_2)/2, so w = (sqrt(3/2), sqrt(2/3))
    and L = (sqrt(3/2) log 2 + sqrt(2/3) log(4/3)) / 2; normalize=True: w = 2 (2, 4/3)/(10/3) =
    (6/5, 4/5) and L = (3/5) log 2 + (2/5) log(4/3).

    Args:
        inputs: PreferenceLogps; uses the four (B,) sequence log-prob fields.
        beta: KL-regularisation strength, > 0.
        tau: temperature in loss units, > 0 (l is about 0.69 at initialisation).
        normalize: False = official un-normalised clamped weights; True = N softmax(l / tau).
        max_weight: cap on the un-normalised weights, > 0 (10 in the official code).
        gather: all-gather of detached (B,) losses over workers; None for one worker.

    Returns:
        ObjectiveOutput: loss (global value), losses (B,) = l_i, metrics (rewards,
        kldpo/weight_max, kldpo/weight_entropy, kldpo/weight_mean, kldpo/base_loss_mean).
    """
    hyperparameters = {"beta": beta, "tau": tau, "normalize": normalize, "max_weight": max_weight}
    chosen, rejected, metrics = pair_log_ratios(inputs, "kldpo", hyperparameters)
    losses = compute_pair_losses(chosen - rejected, beta)  # per-pair DPO loss l_i
    all_losses = gather_detached(losses, gather)
    n = all_losses.shape[0]
    if normalize:
        log_normalizer = torch.logsumexp(all_losses / tau, dim=0)
        all_log_weights = math.log(n) + all_losses / tau - log_normalizer
        log_weights = math.log(n) + losses.detach() / tau - log_normalizer
    else:
        # Centred exponent, clamped in log space so a small tau cannot overflow (OBJECTIVES.md 5.4).
        mean_loss = all_losses.mean()
        all_log_weights = ((all_losses - mean_loss) / tau).clamp(max=math.log(max_weight))
        log_weights = ((losses.detach() - mean_loss) / tau).clamp(max=math.log(max_weight))
    all_weights = torch.exp(all_log_weights)
    value = (all_weights * all_losses).mean()  # L^KL = sum_i P(i) l_i, Alg. 2 of KLDPO_PAPER
    metrics.update(summarize_weights("kldpo", all_log_weights))
    metrics["kldpo/weight_max"] = all_weights.max()
    metrics["kldpo/weight_mean"] = all_weights.mean()
    metrics["kldpo/base_loss_mean"] = all_losses.mean()
    return ObjectiveOutput(
        loss=combine_global(losses, torch.exp(log_weights), value), losses=losses.detach(), metrics=metrics
    )


def dora(
    inputs: PreferenceLogps,
    *,
    beta: float = 0.1,
    lam: float = 1.0,
    gather: Optional[GatherFn] = None,
) -> ObjectiveOutput:
    """DoRA (pairwise): L = lam (logsumexp_i(c_i l_i / lam) - log N), c = calibration. **Batch-coupled.**

    Calibrated KL-DRO dual of https://arxiv.org/abs/2504.05831 (OBJECTIVES.md 6.3). dL/dl_i =
    c_i softmax(c l / lam)_i: target-like (large c) pairs with high loss get the weight. With c = 1,
    lam -> inf gives DPO; with N = 1 it is c l exactly (the released code's batch-1 degeneracy).

    Worked example (beta = 1, lam = 1, c = (2, 1), l = (log 2, log 4/3)): L = log((4 + 4/3)/2) =
    log(8/3); softmax(c l) = (3/4, 1/4), so dL/dl = (3/2, 1/4) and dL/d policy_chosen_logps =
    (3/2 (-1/2), 1/4 (-1/4)) = (-3/4, -1/16).

    Args:
        inputs: PreferenceLogps with calibration (B,) h~ >= 0 (from the stage-1 classifier).
        beta: KL-regularisation strength, > 0.
        lam: DRO temperature, > 0 (1 in all the paper's experiments).
        gather: all-gather of detached (B, 3) values (c l, l, c) over workers; None for one worker.

    Returns:
        ObjectiveOutput: loss (global value), losses (B,) = l_i (uncalibrated), metrics (rewards,
        dora/weight_max, dora/weight_entropy, dora/calibration_mean, dora/base_loss_mean).
    """
    chosen, rejected, metrics = pair_log_ratios(inputs, "dora", {"beta": beta, "lam": lam})
    calibration = check_calibration(require_field(inputs, "calibration", "dora"), "dora")
    losses = compute_pair_losses(chosen - rejected, beta)  # per-pair DPO loss l_i
    return reduce_dora_losses(losses, calibration, lam, gather, "dora", metrics)


def check_calibration(calibration: Tensor, objective: str) -> Tensor:
    """Detached fp32+ calibration values h~, which must be finite and >= 0 (one clear error if not).

    h~ = p / (alpha p + a (1 - p)) lies in [0, 1/alpha] for a classifier probability p; a negative or
    NaN value would silently flip or poison the DRO weights (OBJECTIVES.md 6.2).
    """
    calibration = to_compute_dtype(calibration.detach())
    if not bool(torch.isfinite(calibration).all()) or bool((calibration < 0).any()):
        raise ValueError(f"{objective}: inputs.calibration must be finite and >= 0")
    return calibration


def reduce_dora_losses(
    losses: Tensor,
    calibration: Tensor,
    lam: float,
    gather: Optional[GatherFn],
    prefix: str,
    metrics: dict[str, Tensor],
) -> ObjectiveOutput:
    """DoRA's reduction lam (logsumexp(c l / lam) - log N) over the global batch (dora, dora_pl).

    Args:
        losses: (B,) per-example losses l_b with grad.
        calibration: (B,) detached calibration c_b.
        lam: DRO temperature, > 0.
        gather: all-gather of detached (B, ...) values, or None (called once, on (B, 3)).
        prefix: metric family.
        metrics: metrics to extend.

    Returns:
        ObjectiveOutput: loss (global value), losses (B,) = l_b, metrics extended with
        <prefix>/weight_max, weight_entropy (of softmax(c l / lam)), calibration_mean, base_loss_mean.
    """
    calibration = calibration.to(losses.dtype)
    scaled = calibration * losses.detach()
    all_scaled = gather_detached(torch.stack([scaled, losses.detach(), calibration], dim=1), gather)
    n = all_scaled.shape[0]
    log_normalizer = torch.logsumexp(all_scaled[:, 0] / lam, dim=0)
    value = lam * (log_normalizer - math.log(n))  # dual form lam log E exp(h~ l / lam), DORA_PAPER
    weights = n * calibration * torch.exp(scaled / lam - log_normalizer)
    metrics.update(summarize_weights(prefix, all_scaled[:, 0] / lam))
    metrics[f"{prefix}/calibration_mean"] = all_scaled[:, 2].mean()
    metrics[f"{prefix}/base_loss_mean"] = all_scaled[:, 1].mean()
    return ObjectiveOutput(
        loss=combine_global(losses, weights, value), losses=losses.detach(), metrics=metrics
    )
