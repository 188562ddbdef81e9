"""Global-batch statistics for batch-coupled objectives, without torch.distributed (STYLE.md G1).

So that 2 workers x 4 pairs mean the same as 1 worker x 8 pairs, the training stage passes
`gather`, which all-gathers a detached (B, ...) tensor from every worker into (N, ...), N = W * B
(equal shards), in rank order. A batch-coupled objective writes its global loss L as a function of
per-example losses l_1..l_N whose gradient is sum_i a_i grad l_i, with a_i = dL/dl_i computed from
gathered, detached values, and returns

    loss = S - stopgrad(S) + L_global,   S = mean_local(N a_i l_i).

(a) Its value is L_global, the same on every worker. (b) Averaging the workers' gradients, as DDP
does, gives (1/W) sum_workers (1/B) sum_local N a_i grad l_i = sum_all a_i grad l_i = grad L.
With gather=None (one worker) N = B and this is the plain formula in value and gradient.
"""

from __future__ import annotations

from typing import Optional

import torch

from robust_objectives.types import GatherFn, Tensor


def gather_detached(values: Tensor, gather: Optional[GatherFn]) -> Tensor:
    """All-gathers detached per-example values of this worker's batch.

    Args:
        values: (B, ...) local values.
        gather: the training stage's all-gather, or None for a single worker.

    Returns:
        (N, ...) detached values of the global batch in rank order (N = B when gather is None).
    """
    local = values.detach()
    if gather is None:
        return local
    gathered = gather(local)
    if gathered.shape[1:] != local.shape[1:] or gathered.shape[0] % max(local.shape[0], 1) != 0:
        raise ValueError(
            f"gather returned shape {tuple(gathered.shape)} for a local batch of shape "
            f"{tuple(local.shape)}; it must concatenate equal shards along dim 0"
        )
    return gathered.detach()


def combine_global(local_losses: Tensor, local_weights: Tensor, global_value: Tensor) -> Tensor:
    """The loss of the module docstring: value global_value, worker-averaged gradient grad L.

    Args:
        local_losses: (B,) per-example losses l_i of this worker, with grad.
        local_weights: (B,) N * dL/dl_i for this worker's examples (detached here).
        global_value: scalar L over the global batch (detached here).

    Returns:
        Scalar loss to backpropagate.
    """
    surrogate = (local_weights.detach() * local_losses).mean()
    return surrogate - surrogate.detach() + global_value.detach()


def summarize_weights(prefix: str, log_weights: Tensor) -> dict[str, Tensor]:
    """Statistics of the per-example weights of the global batch.

    Args:
        prefix: metric family, e.g. "kldpo".
        log_weights: (N,) log of the unnormalised weights dL/dl_i up to a common factor.

    Returns:
        <prefix>/weight_max: max of N * normalised weights (1 = uniform, N = one example takes all);
        <prefix>/weight_entropy: entropy of the normalised weights in nats (log N = uniform).
    """
    probs = torch.softmax(log_weights.detach(), dim=0)
    return {
        f"{prefix}/weight_max": probs.max() * probs.numel(),
        f"{prefix}/weight_entropy": torch.special.entr(probs).sum(),
    }
