"""Stage 4 (train): one objective on Ray Train's TorchTrainer, on CPU or GPUs, resumable.

    robust-dpo synth --output worlds/default
    robust-dpo data --dataset worlds/default/data --tokenizer worlds/default/tokenizer \
        --output worlds/default/tokenized
    robust-dpo train --output runs/dpo model.path=worlds/default/reference_model \
        data.path=worlds/default/tokenized objective.name=dpo objective.beta=0.1 \
        train.num_workers=2 train.max_steps=20
    robust-dpo train --output runs/kl --config pipelines/configs/train_kldpo_lora.yaml
    # resume / recover: rerun the same command (same --output); worker faults: train.max_failures=1
    # drill: ROBUST_DPO_FAIL_AT_STEP=3 robust-dpo train ... (rank 0 raises once after step 3)
    # cluster: the same under `ray job submit -- ...` with train.use_gpu=true train.num_workers=N

Writes DIR/config.yaml (resolved config), DIR/metrics.csv (one row per report), DIR/checkpoints/
(Ray Train storage: checkpoint_<step>/, the latest train.keep_checkpoints kept) and
DIR/final_model/ (HF model dir, LoRA merged, + tokenizer; load with from_pretrained).

Layers (RAY_NOTES.md 5.1-5.3, STYLE.md G7): `train_fn_per_worker(loop_config)` is the per-worker
loop; `build_trainer(cfg, output_dir, callbacks)` builds the TorchTrainer (Tune's driver function
passes TuneReportCallback); `train(cfg)` validates, fits and collects the outputs.

- Data (train_data.py): every worker streams the same seeded global batches and keeps its slice,
  so step s sees the same pairs for any worker count and a restart skips exactly s batches.
- Step (train_step.py): gradients averaged over workers; batch-coupled objectives see the whole
  optimizer step (all workers, all accumulation micro-steps) through `gather`.
- Metrics: all-reduced before ray.train.report; every report carries a checkpoint, and the
  metrics history rides in it (train_state.py), so DIR/metrics.csv survives restarts.
- WDPO: eager attention (fused SDPA has no double backward), inputs_embeds kept in the graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pipelines import config as config_lib
from pipelines import schema
from pipelines import train_config as tc
from pipelines.errors import UserError
from pipelines.train_data import iter_eval_micro_batches, iter_global_batches, split_global_batch
from pipelines.train_config import (  # re-exported for the tune stage
    TrainStageConfig,
    build_train_config,
    load_train_config,
    train_config_to_dict,
)

__all__ = [
    "TrainResult", "TrainStageConfig", "build_train_config", "build_trainer", "load_train_config",
    "split_global_batch", "train", "train_config_to_dict", "train_fn_per_worker",
]

FAIL_ENV = "ROBUST_DPO_FAIL_AT_STEP"
CHECKPOINTS = "checkpoints"  # RunConfig name: DIR/checkpoints is the Ray Train run folder
LEADING_COLUMNS = ("step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                   "rewards/margins", "logps/chosen", "logps/rejected", "tokens_per_s", "padding_fraction",
                   "lr", "grad_norm")


@dataclass(frozen=True, kw_only=True)
class RunPlan:
    """Driver-computed facts the workers need (JSON-able, part of train_loop_config)."""

    total_steps: int  # optimizer steps of the run
    steps_per_epoch: int  # full global batches per pass over the train split
    listwise: bool  # dataset format
    has_eval: bool  # an eval dataset is attached
    fail_at_step: int = 0  # ROBUST_DPO_FAIL_AT_STEP (0 = never)
    fail_marker: str = ""  # file that makes the injected failure fire once


@dataclass(frozen=True)
class TrainResult:
    """What `train` returns."""

    output_dir: Path
    final_model_path: Path | None
    metrics: dict[str, Any]  # the last report
    metrics_dataframe: Any  # pandas DataFrame, one row per report
    checkpoint_path: Path | None


# [1] The per-worker loop -----------------------------------------------------------------------


def build_schedule(optimizer, cfg: TrainStageConfig, total_steps: int):
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


def build_worker_models(cfg: TrainStageConfig, device):
    """Policy (LoRA-wrapped when lora.r > 0) and, for full fine-tuning with a live reference, a
    frozen reference copy; both FSDP2-sharded under train.strategy=fsdp.

    Returns:
        (policy, reference) where reference is None for LoRA (adapter-disabled base) or a
        precomputed reference.
    """
    from pipelines import model as model_lib

    attn = tc.attention_implementation(cfg)
    policy = model_lib.load_causal_lm(cfg.model.path, attn_implementation=attn, device=device)
    if cfg.lora.r > 0:
        policy = model_lib.add_lora(policy, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                                    target_modules=cfg.lora.target_modules, seed=cfg.train.seed)
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


def build_step_context(cfg: TrainStageConfig, *, rank: int = 0, world_size: int = 1):
    """The worker's StepContext: which objective, which inputs it needs, how gradients are reduced
    (also used by benchmarks/throughput.py, so the benchmark runs exactly this step)."""
    import robust_objectives as ro

    from pipelines import train_step as step_lib

    name = cfg.objective.name
    return step_lib.StepContext(
        objective=ro.get_objective(name), hyperparameters=dict(cfg.objective.hyperparameters),
        listwise=name in ro.LISTWISE, needs_vocab=name in ro.TOKEN_LEVEL,
        needs_embeddings=name in ro.NEEDS_EMBEDDINGS, batch_coupled=name in ro.BATCH_COUPLED,
        live_reference=cfg.reference.mode == "live", precision=cfg.train.precision,
        max_grad_norm=cfg.train.max_grad_norm, global_accumulation=cfg.train.global_accumulation,
        world_size=world_size, rank=rank, seed=cfg.train.seed, sync_gradients=cfg.train.strategy == "ddp",
    )


def train_fn_per_worker(loop_config: dict) -> None:
    """Ray Train worker: rebuild the config, restore, then step / report / checkpoint until done."""
    import ray.train
    import ray.train.torch
    import torch

    from pipelines import model as model_lib
    from pipelines import train_state
    from pipelines import train_step as step_lib
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = build_train_config(loop_config["config"])  # [1] typed config, first line (G6)
    plan = RunPlan(**loop_config["plan"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)

    policy, reference = build_worker_models(cfg, device)  # [2] models
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = build_schedule(optimizer, cfg, plan.total_steps)
    ctx = build_step_context(cfg, rank=rank, world_size=world)

    step, history = 0, []  # [3] restore: weights, optimizer, scheduler, step (= data position)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = train_state.load_checkpoint(Path(directory), policy, optimizer, scheduler)
        step, history = state["step"], state["history"]
        if rank == 0:
            _say(f"[train] resumed from step {step}")

    collate = model_lib.collate_lists if plan.listwise else model_lib.collate_pairs
    pad = model_lib.pad_token_id_of(policy)

    def prepare(rows):
        return model_lib.move_batch(collate(rows, pad), device)

    train_data = ray.train.get_dataset_shard("train")
    eval_data = ray.train.get_dataset_shard("eval") if plan.has_eval else None
    interval: list[dict[str, float]] = []
    started = time.perf_counter()
    while step < plan.total_steps:  # [4] epochs of global batches, resumed mid-epoch
        epoch, offset = divmod(step, plan.steps_per_epoch)
        before = step
        for rows in iter_global_batches(train_data, batch_size=cfg.train.batch_size, seed=cfg.train.seed,
                                        epoch=epoch, shuffle_buffer=cfg.data.shuffle_buffer, skip=offset):
            micro = [prepare(r) for r in split_global_batch(
                rows, rank=rank, world_size=world, micro_batch_size=cfg.train.micro_batch_size)]
            metrics = step_lib.train_step(policy, reference, optimizer, scheduler, micro, ctx, step)
            step += 1
            interval.append(metrics)
            if step == plan.fail_at_step and rank == 0 and not os.path.exists(plan.fail_marker):
                Path(plan.fail_marker).write_text(f"injected failure at step {step}\n")
                raise RuntimeError(f"{FAIL_ENV}={step}: injected failure on rank 0 (fires once)")
            if step % cfg.train.checkpoint_every == 0 or step == plan.total_steps:  # [5] report
                elapsed = time.perf_counter() - started  # training only: eval and checkpoint excluded
                row = _average_interval(interval)
                row.update(step=step, epoch=step / plan.steps_per_epoch,
                           tokens_per_s=sum(m["tokens"] for m in interval) / max(elapsed, 1e-9))
                interval = []
                if eval_data is not None and (cfg.train.eval_every == 0 or step % cfg.train.eval_every == 0
                                              or step == plan.total_steps):
                    batches = (None if b is None else prepare(b) for b in iter_eval_micro_batches(
                        eval_data, rank=rank, world_size=world, micro_batch_size=cfg.train.micro_batch_size,
                        max_rows=cfg.data.max_eval_pairs))
                    row.update(step_lib.evaluate(policy, reference, batches, ctx))
                history.append(row)
                _report(row, history, policy, optimizer, scheduler, cfg, step=step, rank=rank,
                        final=step == plan.total_steps, total=plan.total_steps)
                started = time.perf_counter()
            if step >= plan.total_steps:
                break
        if step == before:  # the split shrank since the driver counted it: fail, do not spin
            raise RuntimeError(f"epoch {epoch} of the train split yielded no batch after skipping {offset}")


def _report(row, history, policy, optimizer, scheduler, cfg, *, step, rank, final, total) -> None:
    """Checkpoint (rank 0 writes; FSDP gathers on all ranks) and ray.train.report on every rank."""
    import ray.train

    from pipelines import train_state

    with tempfile.TemporaryDirectory(prefix="robust_dpo_ckpt_") as tmp:
        directory = Path(tmp)
        train_state.save_checkpoint(directory, policy, optimizer, scheduler, step=step, history=history, rank=rank)
        if final:
            sharded = cfg.train.strategy == "fsdp"
            weights = train_state.trainable_state_dict(policy) if sharded else None
            if rank == 0:
                train_state.save_final_model(directory / train_state.FINAL_MODEL_DIR, policy,
                                             model_path=cfg.model.path, lora=cfg.lora.r > 0, weights=weights)
        if rank == 0:
            _say(_progress_line(row, total))
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(row, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:06d}")


def _say(line: str) -> None:
    # Train V2 patches print() to tee into its logger, which reaches the driver twice; the raw
    # stream is forwarded once.
    print(line, file=sys.__stdout__, flush=True)


def _progress_line(row: dict[str, float], total: int) -> str:
    parts = [f"step {int(row['step'])}/{total}", f"loss {row['loss']:.4f}",
             f"acc {row['rewards/accuracies']:.3f}", f"margin {row['rewards/margins']:.4f}",
             f"tokens/s {row['tokens_per_s']:.0f}"]
    if "eval/loss" in row:
        parts += [f"eval/loss {row['eval/loss']:.4f}", f"eval/acc {row['eval/accuracy']:.3f}"]
    return "[train] " + " | ".join(parts)


# [2] Driver: validate, build the TorchTrainer, collect the outputs ------------------------------


def _read_columns(info: tc.DatasetInfo, cfg: TrainStageConfig, columns: Sequence[str]) -> list[str]:
    if info.format == "listwise":
        wanted = list(schema.LIST_TOKEN_COLUMNS) + ["scores", "calibration", schema.REFERENCE_LIST_COLUMN]
    else:
        wanted = list(schema.PAIR_TOKEN_COLUMNS) + ["calibration", *schema.REFERENCE_PAIR_COLUMNS]
    if cfg.reference.mode == "live":
        wanted = [c for c in wanted if not c.startswith("reference_")]
    return [c for c in wanted if c in columns]


def _check_resumable(cfg: TrainStageConfig, output_dir: Path) -> None:
    """A rerun into an existing DIR must train the same thing (only RESUMABLE_CHANGES may differ)."""
    saved_path = output_dir / "config.yaml"
    if not saved_path.is_file() or not (output_dir / CHECKPOINTS).exists():
        return
    saved = tc.flatten(config_lib.load_yaml(saved_path))
    current = tc.flatten(train_config_to_dict(cfg))
    for key in sorted(set(saved) | set(current)):
        if key in tc.RESUMABLE_CHANGES or key == "output":
            continue
        if saved.get(key) != current.get(key):
            raise UserError(
                f"--output '{output_dir}' holds a run with {key}={saved.get(key)!r}, but this run has "
                f"{key}={current.get(key)!r}; use a new --output to start over, or the same config to resume"
            )


def _plan(cfg: TrainStageConfig, info: tc.DatasetInfo, output_dir: Path) -> RunPlan:
    fail_at = os.environ.get(FAIL_ENV, "").strip()
    if fail_at and not fail_at.isdigit():
        raise UserError(f"{FAIL_ENV}={fail_at!r} must be a step number")
    return RunPlan(
        total_steps=tc.total_steps(cfg, info),
        steps_per_epoch=info.train_rows // cfg.train.batch_size,
        listwise=info.format == "listwise",
        has_eval=info.eval_split is not None,
        fail_at_step=int(fail_at or 0),
        fail_marker=str(output_dir / f".fault_injected_at_step_{fail_at or 0}"),
    )


def prepare_run(cfg: TrainStageConfig, output_dir: str | Path) -> tuple[tc.DatasetInfo, RunPlan, Path]:
    """Every input check (UserError, exit 2) before Ray starts a worker; precompute the reference
    when reference.mode=precomputed.  Returns (dataset info, plan, resolved data path)."""
    output_dir = Path(output_dir).resolve()
    info = tc.inspect_dataset(cfg)
    tc.check_model(cfg)
    _check_resumable(cfg, output_dir)
    data_path = Path(cfg.data.path).resolve()
    if cfg.reference.mode == "precomputed":
        from pipelines import reference as reference_lib

        data_path = reference_lib.precompute_reference(cfg, info)
        info = dataclasses.replace(info, columns=tc.count_split(data_path / cfg.data.train_split)[1])
    return info, _plan(cfg, info, output_dir), data_path


def build_trainer(cfg: TrainStageConfig, output_dir: str | Path, callbacks: Sequence[Any] = ()):
    """The TorchTrainer of this run (validated first).  `callbacks` go to RunConfig (Tune adds
    ray.tune.integration.ray_train.TuneReportCallback).  Storage: `output_dir`/checkpoints, a fixed
    name, so rerunning with the same output_dir resumes from its latest checkpoint."""
    output_dir = Path(output_dir).resolve()
    return _build_trainer(cfg, output_dir, *prepare_run(cfg, output_dir), callbacks=callbacks)


def _build_trainer(cfg: TrainStageConfig, output_dir: Path, info: tc.DatasetInfo, plan: RunPlan, data_path: Path,
                   callbacks: Sequence[Any] = ()):
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.ray_session import ensure_ray

    ensure_ray()
    if cfg.train.use_gpu and not os.environ.get("RAY_ADDRESS") and ray.cluster_resources().get("GPU", 0) < 1:
        raise UserError("train.use_gpu=true but this Ray session has no GPU; set train.use_gpu=false")
    columns = _read_columns(info, cfg, info.columns)
    train_files = schema.split_files(data_path, cfg.data.train_split)
    datasets = {"train": ray.data.read_parquet(train_files).select_columns(columns)}
    if info.eval_split:
        datasets["eval"] = ray.data.read_parquet(schema.split_files(data_path, info.eval_split)).select_columns(columns)
    for name, ds in datasets.items():
        ds.context.enable_progress_bars = False  # workers print one line per report instead
        ds.context.execution_options.preserve_order = True  # sorted file order, run after run
        # Tokenised ids are small: read the parquet once into the object store, so each epoch and
        # each evaluation on every worker streams blocks instead of re-launching read tasks.
        datasets[name] = ds.materialize()
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": train_config_to_dict(cfg), "plan": dataclasses.asdict(plan)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=CHECKPOINTS,
            storage_path=str(output_dir),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        # Not split: every worker streams the whole, order-preserved split and takes its slice of
        # each global batch (module docstring), so batches do not depend on the worker count.
        dataset_config=ray.train.DataConfig(
            datasets_to_split=[], execution_options=ray.data.ExecutionOptions(preserve_order=True)
        ),
    )


def write_config(cfg: TrainStageConfig, path: Path) -> None:
    """DIR/config.yaml: the resolved config in its user-facing form (loadable with --config)."""
    import yaml

    path.write_text(yaml.safe_dump(train_config_to_dict(cfg), sort_keys=False))


def write_metrics_csv(history: list[dict[str, Any]], path: Path):
    """DIR/metrics.csv: one row per report, the TRL columns first, eval/* last."""
    import pandas as pd

    frame = pd.DataFrame(history)
    rest = sorted(c for c in frame.columns if c not in LEADING_COLUMNS)
    ordered = [c for c in LEADING_COLUMNS if c in frame.columns]
    ordered += [c for c in rest if not c.startswith("eval/")] + [c for c in rest if c.startswith("eval/")]
    frame = frame[ordered] if len(frame.columns) else frame
    frame.to_csv(path, index=False)
    return frame


def collect_outputs(output_dir: Path, checkpoint_dir: Path | None) -> TrainResult:
    """metrics.csv and final_model/ from the latest checkpoint (history survives restarts)."""
    from pipelines import train_state

    history = train_state.read_train_state(checkpoint_dir)["history"] if checkpoint_dir else []
    frame = write_metrics_csv(history, output_dir / "metrics.csv")
    final = None
    if checkpoint_dir is not None and (checkpoint_dir / train_state.FINAL_MODEL_DIR).is_dir():
        final = output_dir / train_state.FINAL_MODEL_DIR
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(checkpoint_dir / train_state.FINAL_MODEL_DIR, final)
    return TrainResult(output_dir=output_dir, final_model_path=final, metrics=history[-1] if history else {},
                       metrics_dataframe=frame, checkpoint_path=checkpoint_dir)


def train(cfg: TrainStageConfig, output_dir: str | Path | None = None, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Validate, fit (or resume, or notice the run is complete), write metrics.csv and final_model/.

    Args:
        cfg: the stage config; `output_dir` defaults to cfg.output.
        callbacks: ray.train.UserCallbacks for RunConfig (Tune passes TuneReportCallback).

    Raises:
        UserError: bad input (before any worker starts).
        RuntimeError: training failed after train.max_failures restarts (metrics.csv is still
            written from the latest checkpoint).
    """
    from pipelines import train_state

    output_dir = Path(output_dir or cfg.output or "")
    if not str(output_dir) or str(output_dir) == ".":
        raise UserError("the train stage needs an output directory (--output DIR)")
    output_dir = output_dir.resolve()
    cfg = dataclasses.replace(cfg, output=str(output_dir))
    info, plan, data_path = prepare_run(cfg, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, output_dir / "config.yaml")
    latest = train_state.find_latest_checkpoint(output_dir / CHECKPOINTS)
    if latest is not None and train_state.read_train_state(latest)["step"] >= plan.total_steps and (
        latest / train_state.FINAL_MODEL_DIR
    ).is_dir():
        print(f"[train] {output_dir} is already complete ({plan.total_steps} steps); nothing to do", flush=True)
        return collect_outputs(output_dir, latest)
    trainer = _build_trainer(cfg, output_dir, info, plan, data_path, callbacks=callbacks)
    error = None
    try:
        result = trainer.fit()
        error = result.error
    except Exception as exc:  # noqa: BLE001 - Ray's TrainingFailedError and friends
        error = exc
    outputs = collect_outputs(output_dir, train_state.find_latest_checkpoint(output_dir / CHECKPOINTS))
    if error is not None:
        raise RuntimeError(f"training failed: {str(error).strip().splitlines()[0] if str(error).strip() else error!r}")
    return outputs


# [3] CLI ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="run directory (rerun the same one to resume)")
    parser.add_argument("--config", default=None, help="YAML config (see pipelines/configs/train_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. objective.name=kldpo train.lr=1e-5")


def main(args: argparse.Namespace) -> int:
    cfg = load_train_config(args.config, [*args.overrides, f"output={args.output}"])
    started = time.perf_counter()
    try:
        result = train(cfg)
    except RuntimeError as exc:
        print(f"robust-dpo: error: {exc}", file=sys.stderr, flush=True)
        return 1
    last = result.metrics
    print(f"[train] done in {time.perf_counter() - started:.1f}s: step {int(last.get('step', 0))}, "
          f"loss {last.get('loss', float('nan')):.4f}; metrics {result.output_dir / 'metrics.csv'}, "
          f"model {result.final_model_path}", flush=True)
    return 0
