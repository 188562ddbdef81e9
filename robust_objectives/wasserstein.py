"""WDPO: Wasserstein-robust DPO via a penalty on the loss's gradient w.r.t. the input embeddings.

https://arxiv.org/abs/2502.01930 (OBJECTIVES.md section 4). For a W_2 ball of radius rho the
worst-case loss is approximately E l + rho sqrt(E ||grad_z l||^2) (Gao et al. 2022). Token ids are
discrete, so z is the input-embedding tensor of both sequences of a pair (App. F), and the
penalty needs a double backward: the embedding gradient is taken with create_graph=True so the
optimizer step also differentiates the penalty.
"""

from __future__ import annotations

from typing import Optional

import torch

from robust_objectives.dpo import (
    compute_pair_losses,
    mean_output,
    pair_log_ratios,
    require_field,
    to_compute_dtype,
)
from robust_objectives.global_batch import combine_global, gather_detached
from robust_objectives.types import GatherFn, ObjectiveOutput, PreferenceLogps, Tensor

WDPO_PAPER = "https://arxiv.org/abs/2502.01930"


def compute_embedding_penalties(losses: Tensor, embeddings: Tensor, *, create_graph: bool) -> Tensor:
    """g_i = ||d l_i / d e_i||^2 summed over both sequences of pair i (rows i and B + i).

    One backward of sum_i l_i suffices: pair i's loss depends only on rows i and B + i (examples of
    a batch do not interact in the policy's forward), so row i of the gradient is d l_i / d e_i.

    Args:
        losses: (B,) per-pair losses computed from `embeddings`.
        embeddings: (2B, T', d) input embeddings, chosen rows then rejected rows, requires_grad.
        create_graph: keep the graph of the gradient (training: the penalty is differentiated).

    Returns:
        (B,) penalties in fp32 or wider.

    Raises:
        ValueError: the row count is not 2B, or no gradient can reach `embeddings` from `losses`
            (the embeddings do not require grad, or the log-probs were not computed from them in a
            recorded graph, e.g. they were detached or sliced under torch.no_grad()). Returning 0
            there would silently turn WDPO into DPO.
    """
    batch = losses.shape[0]
    if embeddings.shape[0] != 2 * batch:
        raise ValueError(
            f"wdpo: policy_input_embeddings has {embeddings.shape[0]} rows, expected 2B = {2 * batch}"
        )
    if not embeddings.requires_grad:
        raise ValueError("wdpo needs policy_input_embeddings with requires_grad=True")
    grads = None
    if losses.requires_grad:
        (grads,) = torch.autograd.grad(
            losses.sum(), embeddings, create_graph=create_graph, allow_unused=True
        )
    if grads is None:
        raise ValueError(
            "wdpo: no gradient reaches policy_input_embeddings from the losses, so the penalty "
            "||d l / d e||^2 cannot be computed (it is not 0): the policy log-probs must be computed "
            "from these embeddings in a graph recorded with grad (not detached, cloned with "
            "detach(), or sliced under torch.no_grad()); use rho=0 for plain DPO"
        )
    row_norms = to_compute_dtype(grads).pow(2).flatten(1).sum(dim=1)  # (2B,)
    return row_norms[:batch] + row_norms[batch:]


def wdpo(
    inputs: PreferenceLogps,
    *,
    beta: float = 0.1,
    rho: float = 0.01,
    penalty: str = "pointwise",
    gather: Optional[GatherFn] = None,
) -> ObjectiveOutput:
    """WDPO. "pointwise": mean_i(l_i + rho g_i); "sqrt": mean_i l_i + rho sqrt(mean_i g_i).

    "pointwise" is the per-pair upper bound the official LLM code uses (App. F of
    https://arxiv.org/abs/2502.01930); "sqrt" is Algorithm 1 and is **Batch-coupled** (the mean
    inside the sqrt is over the global batch when `gather` is given; its gradient coefficient
    rho / (2 sqrt(mean g)) is taken as 0 when mean g = 0, where g's own gradient is 0 anyway).
    g_i = ||d l_i / d e_i||^2 with e_i both rows of pair i; the graph is kept (double backward)
    when grad is enabled, and dropped (create_graph=False) when called under torch.no_grad(),
    which still needs a policy forward recorded with grad. rho = 0 gives DPO and needs no
    embeddings (given none, no penalty is computed and wdpo/grad_norm_sq is not reported). With
    embeddings, a ValueError is raised when no gradient can reach them from the losses (detached,
    or sliced under torch.no_grad()): the penalty would otherwise silently be 0.

    Worked example: chosen logp = <a, e_w>, rejected logp = <b, e_l>, h = 0 gives
    d l / d e_w = -(beta/2) a, d l / d e_l = (beta/2) b, g = (beta^2/4)(|a|^2 + |b|^2), and the
    pointwise loss log 2 + rho g.

    Args:
        inputs: PreferenceLogps with policy_input_embeddings (2B, T', d), requires_grad, from which
            the policy log-probs were computed (optional when rho = 0).
        beta: KL-regularisation strength, > 0.
        rho: robustness radius rho_o, >= 0 (the two forms' scales are not comparable).
        penalty: "pointwise" or "sqrt".
        gather: for "sqrt", all-gather of detached (B, 2) values over workers; ignored otherwise.

    Returns:
        ObjectiveOutput: loss; losses (B,) = l_i + rho g_i for "pointwise", l_i for "sqrt";
        metrics (rewards, wdpo/grad_norm_sq = mean g, wdpo/penalty = the term added to the loss).
    """
    create_graph = torch.is_grad_enabled()
    if rho == 0 and inputs.policy_input_embeddings is None:
        # DPO: the penalty would be multiplied by 0, so no embeddings (and no double backward).
        chosen, rejected, metrics = pair_log_ratios(inputs, "wdpo", {"beta": beta, "rho": rho, "penalty": penalty})
        losses = compute_pair_losses(chosen - rejected, beta)
        metrics["wdpo/penalty"] = torch.zeros_like(losses.detach()).mean()
        return mean_output(losses, metrics)
    with torch.enable_grad():
        chosen, rejected, metrics = pair_log_ratios(inputs, "wdpo", {"beta": beta, "rho": rho, "penalty": penalty})
        embeddings = require_field(inputs, "policy_input_embeddings", "wdpo")
        losses = compute_pair_losses(chosen - rejected, beta)  # per-pair DPO loss l_i
        if not create_graph and not losses.requires_grad:
            raise ValueError(
                "wdpo: the policy log-probs carry no graph; run the policy forward with grad "
                "enabled (the penalty is then computed with create_graph=False under no_grad)"
            )
        penalties = compute_embedding_penalties(losses, embeddings, create_graph=create_graph)
    if penalty == "pointwise":
        per_pair = losses + rho * penalties  # l^W_i of App. F, WDPO_PAPER
        metrics["wdpo/grad_norm_sq"] = penalties.detach().mean()
        metrics["wdpo/penalty"] = rho * penalties.detach().mean()
        return mean_output(per_pair, metrics)
    stats = gather_detached(torch.stack([losses, penalties], dim=1), gather)
    mean_penalty = stats[:, 1].mean()
    root = torch.sqrt(mean_penalty)
    value = stats[:, 0].mean() + rho * root  # L_W of Algorithm 1, WDPO_PAPER
    # d sqrt(G) / dG = 1 / (2 sqrt G); at G = 0 every g_i = 0 is a minimum, so grad g_i = 0 and the
    # coefficient is set to 0 rather than inf (which would make 0 * inf = NaN).
    safe_root = root.clamp(min=torch.finfo(root.dtype).tiny)
    coefficient = torch.where(mean_penalty > 0, rho / (2.0 * safe_root), torch.zeros_like(root))
    loss = combine_global(losses + coefficient * penalties, torch.ones_like(losses), value)
    metrics["wdpo/grad_norm_sq"] = mean_penalty
    metrics["wdpo/penalty"] = rho * root
    return ObjectiveOutput(loss=loss, losses=losses.detach(), metrics=metrics)
