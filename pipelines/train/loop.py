"""The per-worker loop of the train stage: what every Ray Train worker runs, step by step.

`train_fn_per_worker(loop_config)` rebuilds the typed config, builds the policy (and a frozen
reference for full fine-tuning), restores the latest checkpoint, then for each global batch calls
`step.train_step` (forward, objective, backward, gradient sync, optimizer step) and, every
`train.checkpoint_every` steps, reports all-reduced metrics with a checkpoint.  One optimizer step,
from here to the objective's line of math: `train_fn_per_worker` -> `step.train_step` ->
`step.compute_objective` -> `pipelines.model.compute_row_logps` -> `robust_objectives.<name>`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.train import config as tc
from pipelines.train.batches import iter_eval_micro_batches, iter_global_batches, split_global_batch
from pipelines.train.config import TrainConfig, build_train_config

FAIL_ENV = "ROBUST_DPO_FAIL_AT_STEP"


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """Driver-computed facts the workers need (JSON-able, part of train_loop_config)."""

    total_steps: int  # optimizer steps of the run
    steps_per_epoch: int  # full global batches per pass over the train split
    listwise: bool  # dataset format
    has_eval: bool  # an eval dataset is attached
    fail_at_step: int = 0  # ROBUST_DPO_FAIL_AT_STEP (0 = never)
    fail_marker: str = ""  # file that makes the injected failure fire once


# [1] The per-worker loop -----------------------------------------------------------------------


def build_schedule(optimizer, cfg: TrainConfig, total_steps: int):
    """Linear warmup to train.lr over warmup_steps, then constant / linear / cosine decay to 0."""
    import torch

    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.lr_schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps)
        if t.lr_schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_optimizer(cfg: TrainConfig, parameters):
    """AdamW; the fused kernel (one pass over each tensor, torch >= 2.4 on CPU and CUDA: 5x faster
    than the per-tensor loop for a 55M-parameter model on 2 CPU cores) except under FSDP, whose
    DTensor shards take the foreach path."""
    import torch

    return torch.optim.AdamW(parameters, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                             fused=cfg.train.strategy == "ddp")


def build_worker_models(cfg: TrainConfig, device):
    """(policy, reference): the policy LoRA-wrapped when lora.r > 0; a frozen reference copy only for
    full fine-tuning with a live reference (else None: LoRA's adapter-disabled base or precomputed
    columns); both FSDP2-sharded under train.strategy=fsdp."""
    from pipelines import model as model_lib

    attn = tc.attention_implementation(cfg)
    policy = model_lib.load_causal_lm(cfg.model.path, attn_implementation=attn, device=device)
    if cfg.lora.r > 0:
        policy = model_lib.add_lora(policy, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                    target_modules=cfg.lora.target_modules, seed=cfg.train.seed)
    if cfg.train.gradient_checkpointing:
        model_lib.enable_activation_checkpointing(policy)
    reference = None
    if cfg.reference.mode == "live" and cfg.lora.r == 0:
        reference = model_lib.load_causal_lm(cfg.model.path, attn_implementation=attn, device=device).eval()
        reference.requires_grad_(False)
    if cfg.train.strategy == "fsdp":
        shard_model(policy)
        if reference is not None:
            shard_model(reference)
    policy.train()
    return policy, reference


def shard_model(model) -> None:
    """torch FSDP2: one shard group per decoder layer (the model's _no_split_modules), then the root."""
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer_types = set(getattr(base, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_types:
            fully_shard(module)
    fully_shard(model)


def _average_interval(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r})
    return {k: sum(r.get(k, math.nan) for r in rows) / len(rows) for k in keys}


def build_step_context(cfg: TrainConfig, *, rank: int = 0, world_size: int = 1):
    """The worker's StepContext: which objective, which inputs it needs, how gradients are reduced
    (also used by benchmarks/throughput.py, so the benchmark runs exactly this step)."""
    import robust_objectives as ro

    from pipelines.train import step as step_lib

    spec = ro.get_spec(cfg.objective.name)  # the capability table: what the objective needs
    return step_lib.StepContext(
        objective=spec.fn, hyperparameters=dict(cfg.objective.hyperparameters),
        listwise=spec.listwise, needs_vocab=spec.token_level,
        needs_embeddings=spec.needs_embeddings, batch_coupled=spec.batch_coupled,
        live_reference=cfg.reference.mode == "live", precision=cfg.train.precision,
        max_grad_norm=cfg.train.max_grad_norm, global_accumulation=cfg.train.global_accumulation,
        world_size=world_size, rank=rank, seed=cfg.train.seed, sync_gradients=cfg.train.strategy == "ddp",
    )


@dataclass
class WorkerState:
    """What one worker carries from step to step (restored from the latest checkpoint on restart)."""

    policy: Any  # the trained model (LoRA-wrapped when lora.r > 0; FSDP2-sharded under fsdp)
    reference: Any  # frozen reference copy, or None (LoRA adapter-disabled base / precomputed columns)
    optimizer: Any  # AdamW over the trainable parameters
    scheduler: Any  # LambdaLR of build_schedule
    step: int = 0  # optimizer steps done (= the data position: batches are a pure function of it)
    history: list = field(default_factory=list)  # every reported metrics row so far (rides in checkpoints)
    timings: dict = field(default_factory=dict)  # this attempt's worker phases so far (rides in checkpoints)


def worker_timings():
    """(the worker's Timings, its process's creation time in epoch seconds); the Timings starts with
    `start` = seconds from that creation to the train function (Ray's actor start, imports, the
    worker group's setup)."""
    import psutil

    from pipelines.timings import Timings

    timings = Timings("worker")
    created_at = psutil.Process().create_time()
    timings.add("start", max(0.0, time.time() - created_at))
    return timings, created_at


def train_fn_per_worker(loop_config: dict) -> None:
    """Ray Train worker: rebuild the config, restore, then step / report / checkpoint until done."""
    import ray.train
    import ray.train.torch
    import torch

    from pipelines import collate as collate_lib
    from pipelines import model as model_lib
    from pipelines.train import state as train_state
    from pipelines.train import step as step_lib

    timings, created_at = worker_timings()
    cfg = build_train_config(loop_config["config"])  # [1] typed config, first line (G6)
    plan = RunPlan(**loop_config["plan"])
    progress = loop_config.get("progress")  # a ray.util.queue.Queue the driver prints from, or None
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)

    policy, reference = build_worker_models(cfg, device)  # [2] models and optimizer
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, trainable)
    state = WorkerState(policy=policy, reference=reference, optimizer=optimizer,
                        scheduler=build_schedule(optimizer, cfg, plan.total_steps))
    ctx = build_step_context(cfg, rank=rank, world_size=world)

    checkpoint = ray.train.get_checkpoint()  # [3] restore: weights, optimizer, scheduler, step
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = train_state.load_checkpoint(Path(directory), policy, optimizer, state.scheduler)
        state.step, state.history = saved["step"], saved["history"]

    collate = collate_lib.collate_lists if plan.listwise else collate_lib.collate_pairs
    pad = model_lib.pad_token_id_of(policy)
    layout, response_head = tc.batch_layout(cfg)

    def prepare(rows):
        return model_lib.move_batch(collate(rows, pad, layout=layout, response_head=response_head), device)

    tracker = None  # rank 0 reports every row to the asked-for trackers (pipelines/tracking.py)
    if rank == 0 and cfg.tracking:
        from pipelines.tracking import RunTracker

        tracker = RunTracker(cfg.tracking_config(), cfg.output, Path(cfg.output).name,
                             tc.flatten({"objective": {"name": cfg.objective.name, **cfg.objective.hyperparameters},
                                      "train": dataclasses.asdict(cfg.train), "lora": dataclasses.asdict(cfg.lora)}))

    train_data = ray.train.get_dataset_shard("train")
    eval_data = ray.train.get_dataset_shard("eval") if plan.has_eval else None
    interval: list[dict[str, float]] = []
    timings.add("setup", time.perf_counter() - timings.started)
    started = mark = time.perf_counter()
    while state.step < plan.total_steps:  # [4] epochs of global batches, resumed mid-epoch
        epoch, offset = divmod(state.step, plan.steps_per_epoch)
        before = state.step
        for rows in iter_global_batches(train_data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                        epoch=epoch, shuffle_buffer=cfg.data.shuffle_buffer, skip=offset):
            micro = [prepare(r) for r in split_global_batch(
                rows, rank=rank, world_size=world, micro_batch_size=cfg.train.micro_batch_size)]
            timings.add("data", time.perf_counter() - mark)
            # [5] one optimizer step: forward, objective, backward, gradient sync, AdamW (step.py)
            with timings.phase("steps"):
                metrics = step_lib.train_step(policy, reference, optimizer, state.scheduler, micro, ctx, state.step)
            state.step += 1
            interval.append(metrics)
            maybe_inject_failure(plan, state.step, rank)
            if state.step % cfg.train.checkpoint_every == 0 or state.step == plan.total_steps:  # [6] report
                elapsed = time.perf_counter() - started  # training only: eval and checkpoint excluded
                row = _average_interval(interval)
                row.update(step=state.step, epoch=state.step / plan.steps_per_epoch,
                           tokens_per_s=sum(m["tokens"] for m in interval) / max(elapsed, 1e-9))
                interval = []
                if eval_data is not None and (cfg.train.eval_every == 0 or state.step % cfg.train.eval_every == 0
                                              or state.step == plan.total_steps):
                    batches = (None if b is None else prepare(b) for b in iter_eval_micro_batches(
                        eval_data, rank=rank, world_size=world, micro_batch_size=cfg.train.micro_batch_size,
                        max_rows=cfg.data.max_eval_pairs))
                    with timings.phase("evaluation"):
                        row.update(step_lib.evaluate(policy, reference, batches, ctx))
                state.history.append(row)
                state.timings = {**timings.report(), "created_at": created_at, "reported_at": time.time()}
                with timings.phase("checkpoints"):
                    _report(state, row, cfg, final=state.step == plan.total_steps, rank=rank)
                if progress is not None and rank == 0:
                    progress.put(row)
                if tracker is not None:
                    tracker.log(row, state.step)
                started = time.perf_counter()
            mark = time.perf_counter()
            if state.step >= plan.total_steps:
                break
        if state.step == before:  # the split shrank since the driver counted it: fail, do not spin
            raise RuntimeError(f"epoch {epoch} of the train split yielded no batch after skipping {offset}")
    if tracker is not None:
        tracker.close()


def maybe_inject_failure(plan: RunPlan, step: int, rank: int) -> None:
    """The fault drill (ROBUST_DPO_FAIL_AT_STEP=s): rank 0 raises once, right after step s; a marker
    file in the run directory makes it fire only in the first attempt."""
    if step == plan.fail_at_step and rank == 0 and not os.path.exists(plan.fail_marker):
        Path(plan.fail_marker).write_text(f"injected failure at step {step}\n")
        raise RuntimeError(f"{FAIL_ENV}={step}: injected failure on rank 0 (fires once)")


def _report(state: WorkerState, row: dict[str, float], cfg: TrainConfig, *, final: bool, rank: int) -> None:
    """Checkpoint (rank 0 writes; FSDP gathers on all ranks) and ray.train.report on every rank."""
    import ray.train

    from pipelines.train import state as train_state

    with tempfile.TemporaryDirectory(prefix="robust_dpo_ckpt_") as tmp:
        final_model = None
        if final:
            sharded = cfg.train.strategy == "fsdp"
            weights = train_state.trainable_state_dict(state.policy) if sharded else None  # every rank gathers
            final_model = functools.partial(train_state.save_final_model, model=state.policy,
                                            model_path=cfg.model.path, lora=cfg.lora.r > 0, weights=weights)
        train_state.save_checkpoint(Path(tmp), state.policy, state.optimizer, state.scheduler, step=state.step,
                                    history=state.history, rank=rank, timings=state.timings, final_model=final_model)
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(row, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{state.step:06d}")
