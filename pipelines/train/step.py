"""One optimizer step and one evaluation pass of a data-parallel worker; torch.distributed, no Ray.

What is global (STYLE.md G8: decided once, here):
- Gradients: every worker backpropagates loss / A for each of its A micro-batches, then the
  gradients are averaged over the W workers (`all_reduce_gradients`, a bucketed all-reduce: the
  DDP computation, done after the last micro-step) or reduced by FSDP.  The optimizer therefore
  sees the gradient of the mean over all W x A micro-batches.
- Batch-coupled objectives (robust_objectives.BATCH_COUPLED: kldpo, drdpo, dora, dora_pl, wdpo with
  penalty="sqrt") get `gather`, an all-gather of the detached per-example values they ask for.
  Within one micro-step that is the W workers' micro-batches.  With `global_accumulation` and A > 1
  it is the whole optimizer step: a first no-grad pass over the A micro-batches records what the
  objective gathers, the records are all-gathered once, and in the gradient pass `gather` returns
  all W x A micro-batches' values (the current micro-batch's own values in place).  The objective's
  loss then has the whole step's value, and its gradients averaged over W x A contributors are the
  whole step's gradient (robust_objectives/global_batch.py).  Cost: one extra policy forward per
  micro-step, for coupled objectives only; each micro-step is seeded identically in both passes.
- Metrics: the objective's own `metrics` are the only definition of rewards/* (and of its method
  statistics); the step adds only the loss, the policy's log-probs (logps/*) and token counts.
  Per-pair means are weighted by pairs and summed over micro-steps and workers (all-reduce)
  before anyone reports them, so rank 0's report is the global value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

import robust_objectives as ro
from pipelines import model as model_lib
from pipelines.collate import count_tokens

# What `evaluate` reports, each prefixed eval/ (eval/accuracy = the objective's rewards/accuracies)
EVAL_KEYS = ("loss", "accuracy", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected")
BUCKET_ELEMENTS = 2**24  # gradient all-reduce bucket (64 MiB of fp32)


@dataclass
class StepContext:
    """Everything a step needs besides the models and data (built once per worker)."""

    objective: Callable[..., Any]  # robust_objectives function
    hyperparameters: dict  # its keyword arguments
    listwise: bool  # ListwiseLogps instead of PreferenceLogps
    needs_vocab: bool  # token-level objective
    needs_embeddings: bool  # WDPO
    batch_coupled: bool  # pass `gather` (only coupled objectives take it)
    live_reference: bool  # False: reference log-probs come from batch columns
    precision: str = "fp32"
    max_grad_norm: float = 1.0
    global_accumulation: bool = True
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    sync_gradients: bool = True  # False under FSDP (it reduces gradients itself)
    uses_gather: Optional[bool] = None  # learned on the first coupled step


# [1] Collectives -----------------------------------------------------------------------------


def all_gather_detached(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Concatenate equal-shape detached tensors of every worker along dim 0, in rank order."""
    tensor = tensor.detach().contiguous()
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def all_reduce_gradients(parameters: Sequence[torch.nn.Parameter], world_size: int) -> None:
    """Average .grad over workers in flat buckets (what DDP does, after the last micro-step).

    Why not `ray.train.torch.prepare_model` / DDP: WDPO differentiates its loss through
    `torch.autograd.grad(..., create_graph=True)` on the input embeddings (a double backward), which
    DDP's reducer hooks do not support, and global accumulation replays each micro-step twice (a
    recording pass, then the gradient pass), which would fire DDP's hooks twice.  One explicit
    reduction after the last micro-step is DDP's arithmetic without either problem.

    A trainable parameter without a gradient gets zeros, so every worker reduces the same buckets.
    """
    if world_size == 1:
        return
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if size >= BUCKET_ELEMENTS:
            buckets.append([])
            size = 0
        buckets[-1].append(p.grad)
        size += p.grad.numel()
    for bucket in filter(None, buckets):
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world_size
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))


# [2] One micro-batch ---------------------------------------------------------------------------


def compute_reference(policy, reference, batch, ctx: StepContext) -> Optional[model_lib.RowLogps]:
    if not ctx.live_reference:
        return None  # precomputed: the batch carries the reference's log-probs
    return model_lib.compute_reference_row_logps(policy, reference, batch, vocab=ctx.needs_vocab,
                                                 precision=ctx.precision)


def compute_objective(policy, batch, reference_logps, ctx: StepContext, gather, *, objective_grad: bool = True):
    """Policy forward + objective on one collated micro-batch (`gather` goes to coupled objectives only).
    Returns (ObjectiveOutput, the PreferenceLogps / ListwiseLogps it was given)."""
    policy_logps = model_lib.compute_row_logps(policy, batch, vocab=ctx.needs_vocab, embeddings=ctx.needs_embeddings,
                                               precision=ctx.precision)
    build = model_lib.build_listwise_logps if ctx.listwise else model_lib.build_preference_logps
    inputs = build(batch, policy_logps, reference_logps)
    coupling = {"gather": gather} if ctx.batch_coupled else {}
    with torch.set_grad_enabled(objective_grad):
        out = ctx.objective(inputs, **ctx.hyperparameters, **coupling)
    return out, inputs


def summarize_micro_batch(out, inputs, ctx: StepContext) -> dict[str, float]:
    """Per-micro-batch metric means: the objective's own metrics (rewards/*, defined there once) plus
    what only the step sees: the loss and the policy's summed log-probs (logps/*; listwise: of the
    top- and bottom-scored response, ranked by robust_objectives.rank_by_scores as rewards/* are)."""
    with torch.no_grad():
        if ctx.listwise:
            ranked = ro.rank_by_scores(inputs.policy_logps.detach().float(), inputs.scores)
            chosen, rejected = ranked[:, 0], ranked[:, -1]
        else:
            chosen, rejected = inputs.policy_chosen_logps.detach().float(), inputs.policy_rejected_logps.detach().float()
        metrics = {key: float(value.detach().float()) for key, value in out.metrics.items()}
        metrics["loss"] = float(out.loss.detach())
        metrics["logps/chosen"] = float(chosen.mean())
        metrics["logps/rejected"] = float(rejected.mean())
    return metrics


class MetricSums:
    """Pair-weighted sums of metric means, all-reduced across workers in one collective."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts = [0.0, 0.0, 0.0, 0.0]  # pairs, tokens, positions, padding

    def add(self, metrics: Mapping[str, float], pairs: int, tokens: int = 0, positions: int = 0,
            padding: int = 0) -> None:
        """tokens: useful tokens (an unshared forward's count); positions computed; padding among them."""
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + value * pairs
        self.counts = [c + n for c, n in zip(self.counts, (pairs, tokens, positions, padding))]

    def reduce(self, world_size: int, device, keys: Sequence[str] | None = None) -> dict[str, float]:
        """Global means (every worker must call this with the same `keys`, in the same order)."""
        keys = list(keys if keys is not None else sorted(self.sums))
        total = torch.tensor([self.sums.get(k, 0.0) for k in keys] + self.counts, dtype=torch.float64, device=device)
        if world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        *sums, pairs, tokens, positions, padding = total.tolist()
        out = {k: v / pairs if pairs else math.nan for k, v in zip(keys, sums)}
        out.update(pairs=pairs, tokens=tokens, positions=positions,
                   padding_fraction=padding / positions if positions else math.nan)
        return out


# [3] One optimizer step ------------------------------------------------------------------------


def _seed_micro_step(ctx: StepContext, step: int, micro: int) -> None:
    # Per-(step, rank, micro-step) seeds: dropout masks are reproducible after a restart and equal
    # in both passes of global accumulation, with no RNG state to checkpoint.
    torch.manual_seed(((ctx.seed * 1_000_003 + step) * 1009 + ctx.rank) * 101 + micro)


def _replay(full: list[torch.Tensor], offset: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`gather` of the second pass: the whole step's values, this micro-batch's own ones in place."""
    recorded = iter(full)

    def gather(tensor: torch.Tensor) -> torch.Tensor:
        values = next(recorded).clone()
        values[offset : offset + tensor.shape[0]] = tensor.detach()
        return values

    return gather


def _record_step_statistics(policy, reference, micro_batches, ctx, step, references):
    """First pass of global accumulation: the objective's gathered values for every micro-batch,
    all-gathered across workers.  Returns per-call tensors of shape (W * A * B, ...) laid out as
    [rank][micro-step][pair], or None if the objective gathers nothing (e.g. wdpo pointwise)."""
    records: list[list[torch.Tensor]] = []
    for m, batch in enumerate(micro_batches):
        _seed_micro_step(ctx, step, m)
        calls: list[torch.Tensor] = []

        def record(tensor: torch.Tensor) -> torch.Tensor:  # the first pass's `gather`: returns its input
            calls.append(tensor.detach().clone())
            return tensor.detach()

        with torch.set_grad_enabled(ctx.needs_embeddings):
            compute_objective(policy, batch, references[m], ctx, record, objective_grad=False)
        if not calls:
            return None
        records.append(calls)
    return [all_gather_detached(torch.cat(per_call), ctx.world_size) for per_call in zip(*records)]


def train_step(policy, reference, optimizer, scheduler, micro_batches: Sequence[Mapping[str, Any]],
               ctx: StepContext, step: int) -> dict[str, float]:
    """Forward/backward over this worker's micro-batches, gradient sync, clip, optimizer and scheduler step.

    `reference` is None for LoRA (adapter-disabled base) or a precomputed reference; `micro_batches`
    are collated, on the device, equal pairs each; `step` (0-based) seeds the micro-steps.  Returns
    the step's global metrics: loss, reward and objective metrics, grad_norm, lr, pairs, tokens,
    padding_fraction.
    """
    accumulation = len(micro_batches)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    full = references = None
    if ctx.batch_coupled and ctx.global_accumulation and accumulation > 1 and ctx.uses_gather is not False:
        # Reference log-probs are computed once and reused by both passes.
        references = [compute_reference(policy, reference, b, ctx) for b in micro_batches]
        full = _record_step_statistics(policy, reference, micro_batches, ctx, step, references)
        ctx.uses_gather = full is not None
    sums = MetricSums()
    optimizer.zero_grad(set_to_none=True)
    for m, batch in enumerate(micro_batches):
        _seed_micro_step(ctx, step, m)
        pairs = batch["num_pairs"]
        if full is not None:
            gather = _replay(full, (ctx.rank * accumulation + m) * pairs)
        else:
            gather = lambda t: all_gather_detached(t, ctx.world_size)  # noqa: E731
        reference_logps = references[m] if references else compute_reference(policy, reference, batch, ctx)
        out, inputs = compute_objective(policy, batch, reference_logps, ctx, gather)
        (out.loss / accumulation).backward()
        sums.add(summarize_micro_batch(out, inputs, ctx), pairs, *count_tokens(batch))
    if ctx.sync_gradients:
        all_reduce_gradients(trainable, ctx.world_size)
    max_norm = ctx.max_grad_norm if ctx.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    metrics = sums.reduce(ctx.world_size, micro_batches[0]["input_ids"].device)
    return {**metrics, "grad_norm": float(grad_norm), "lr": lr}


# [4] Evaluation --------------------------------------------------------------------------------


def evaluate(policy, reference, batches: Iterable[Optional[Mapping[str, Any]]], ctx: StepContext) -> dict[str, float]:
    """Held-out metrics, prefixed eval/: eval/loss is the mean per-pair base loss (ObjectiveOutput
    .losses: per-pair, independent of the batch for the coupled objectives), eval/accuracy the
    objective's rewards/accuracies, and the reward and log-prob metrics.  `batches` are this worker's
    collated micro-batches on the device (None = no rows here; it still joins the all-reduce)."""
    was_training = policy.training
    policy.eval()
    sums = MetricSums()
    for batch in batches:
        if batch is None:
            continue
        reference_logps = compute_reference(policy, reference, batch, ctx)
        with torch.set_grad_enabled(ctx.needs_embeddings):
            out, inputs = compute_objective(policy, batch, reference_logps, ctx, None, objective_grad=False)
        metrics = summarize_micro_batch(out, inputs, ctx)
        metrics["loss"] = float(out.losses.float().mean())
        metrics["accuracy"] = metrics["rewards/accuracies"]
        sums.add({k: metrics[k] for k in EVAL_KEYS}, batch["num_pairs"])
        del out, inputs
    policy.train(was_training)
    reduced = sums.reduce(ctx.world_size, next(policy.parameters()).device, keys=EVAL_KEYS)
    return {f"eval/{k}": reduced[k] for k in (*EVAL_KEYS, "pairs")}
