"""Stage 4 (train): one objective on Ray Train's TorchTrainer, on CPU or GPUs, resumable.

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

Layers (RAY_NOTES.md 5.1-5.3, STYLE.md G7): `train(cfg)` validates, builds the TorchTrainer
(`build_trainer`; Tune's driver function adds TuneReportCallback), fits and collects the outputs;
`loop.train_fn_per_worker` is the per-worker loop.  Every worker streams the same seeded global
batches and keeps its slice (batches.py: step s sees the same pairs for any worker count); gradients
and metrics are averaged over workers (step.py); every report carries a checkpoint with the metrics
history (state.py), so DIR/metrics.csv survives restarts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipelines import console
from pipelines import config as config_lib
from pipelines import schema
from pipelines.console import Progress, say
from pipelines.errors import UserError, first_line
from pipelines.paths import atomic_path
from pipelines.schema import CALIBRATION_COLUMNS
from pipelines.train import config as tc
from pipelines.train.config import TrainConfig, train_config_to_dict
from pipelines.train.loop import FAIL_ENV, RunPlan, train_fn_per_worker

CHECKPOINTS = "checkpoints"  # RunConfig name: DIR/checkpoints is the Ray Train run folder
LEADING_COLUMNS = ("step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
                   "rewards/margins", "logps/chosen", "logps/rejected", "tokens_per_s", "padding_fraction",
                   "lr", "grad_norm")


@dataclass(frozen=True)
class TrainResult:
    """What `train` returns."""

    output_dir: Path
    final_model_path: Path | None
    metrics: dict[str, Any]  # the last report
    metrics_dataframe: Any  # pandas DataFrame, one row per report


# [2] Driver: validate, build the TorchTrainer, collect the outputs ------------------------------


def _read_columns(info: tc.DatasetInfo, cfg: TrainConfig) -> list[str]:
    """The columns training reads: tokens, the reference's log-probs (precomputed mode) and every
    calibration column (a sweep's trials share one read and pick theirs: `_calibration_column`)."""
    if info.format == "listwise":
        wanted = list(schema.LIST_TOKEN_COLUMNS) + ["scores", *CALIBRATION_COLUMNS, schema.REFERENCE_LIST_COLUMN]
    else:
        wanted = list(schema.PAIR_TOKEN_COLUMNS) + [*CALIBRATION_COLUMNS, *schema.REFERENCE_PAIR_COLUMNS]
    if cfg.reference.mode == "live":
        wanted = [c for c in wanted if not c.startswith("reference_")]
    return [c for c in wanted if c in info.columns]


def _calibration_column(table, cfg: TrainConfig):
    """The `calibration` column the objective reads: objective.calibration's column, or ones ("one":
    h~ = 1, DoRA's DRO-only ablation); the other calibration columns are dropped."""
    import pyarrow as pa

    source = cfg.objective.calibration
    column = None
    if source == "one":
        if "responses_input_ids" in table.column_names:
            column = pa.array([[1.0] * len(r) for r in table.column("responses_input_ids").to_pylist()],
                              type=pa.list_(pa.float64()))
        else:
            column = pa.array([1.0] * table.num_rows, type=pa.float64())
    elif source in table.column_names:
        column = table.column(source)
    table = table.drop([c for c in CALIBRATION_COLUMNS if c in table.column_names])
    return table if column is None else table.append_column("calibration", column)


def _check_resumable(cfg: TrainConfig, output_dir: Path) -> None:
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


def prepare_run(cfg: TrainConfig, output_dir: str | Path) -> tuple[tc.DatasetInfo, RunPlan, Path]:
    """Every input check (UserError, exit 2) before Ray starts a worker; precompute the reference
    when reference.mode=precomputed.  Returns (dataset info, plan, resolved data path)."""
    output_dir = Path(output_dir).resolve()
    info = tc.inspect_dataset(cfg)
    tc.check_model(cfg)
    _check_resumable(cfg, output_dir)
    data_path = Path(cfg.data.path).resolve()
    if cfg.reference.mode == "precomputed":
        from pipelines import reference as reference_lib

        data_path = reference_lib.compute_reference_dataset(reference_stage_config(cfg))
        info = dataclasses.replace(info, columns=tc.count_split(data_path / cfg.data.train_split)[1])
    fail_at = os.environ.get(FAIL_ENV, "").strip()
    if fail_at and not fail_at.isdigit():
        raise UserError(f"{FAIL_ENV}={fail_at!r} must be a step number")
    plan = RunPlan(total_steps=tc.total_steps(cfg, info), steps_per_epoch=info.steps_per_epoch,
                   listwise=info.format == "listwise", has_eval=info.eval_split is not None,
                   fail_at_step=int(fail_at or 0),
                   fail_marker=str(output_dir / f".fault_injected_at_step_{fail_at or 0}"))
    return info, plan, data_path


def reference_stage_config(cfg: TrainConfig):
    """The reference stage's config for reference.mode=precomputed (the run's own model, data, kernel)."""
    from pipelines.reference import ReferenceCacheConfig

    return ReferenceCacheConfig(
        data=str(cfg.data.path), model=cfg.model.path, output=cfg.reference.cache_dir,
        batch_size=cfg.reference.batch_size, concurrency=cfg.reference.concurrency, use_gpu=cfg.train.use_gpu,
        precision=cfg.train.precision, attn_implementation=tc.attention_implementation(cfg),
    )


def read_split(data_path: str | Path, split: str, columns: Sequence[str]):
    """One split of a `robust-dpo data` dataset as one Arrow table, its files in sorted order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f, columns=list(columns)) for f in schema.split_files(data_path, split)])


def read_training_tables(cfg: TrainConfig) -> dict[str, Any]:
    """The splits `train(cfg)` reads, as its `tables` argument: a sweep (reference.mode=live) reads
    them once for every trial."""
    info = tc.inspect_dataset(cfg)
    return {split: read_split(cfg.data.path, split, _read_columns(info, cfg)) for split in _splits(cfg, info).values()}


def _splits(cfg: TrainConfig, info: tc.DatasetInfo) -> dict[str, str]:
    """Trainer dataset name -> split folder: train, and eval when the dataset has one."""
    return {"train": cfg.data.train_split, **({"eval": info.eval_split} if info.eval_split else {})}


def build_trainer(cfg: TrainConfig, output_dir: Path, info: tc.DatasetInfo, plan: RunPlan, data_path: Path,
                  timings: Any, callbacks: Sequence[Any] = (), progress: Any = None,
                  tables: Mapping[str, Any] | None = None):
    """The TorchTrainer of a checked run (`prepare_run`), in `train`'s Ray session.  `progress` is a
    ray.util.queue.Queue rank 0 puts report rows on; `tables` are splits already read (split name ->
    Arrow table).  Storage: `output_dir`/checkpoints, a fixed name, so rerunning with the same
    output_dir resumes."""
    import ray
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    if cfg.train.use_gpu and not os.environ.get("RAY_ADDRESS") and ray.cluster_resources().get("GPU", 0) < 1:
        raise UserError("train.use_gpu=true but this Ray session has no GPU; set train.use_gpu=false")
    data_started = time.perf_counter()
    columns = _read_columns(info, cfg)
    datasets = {}
    for name, split in _splits(cfg, info).items():
        # Tokenised ids are small: the split goes into the object store once, as Arrow blocks, so
        # each epoch and each evaluation on every worker streams them (no read tasks per epoch).
        # Read here with pyarrow (the driver already reads the manifest from this path): Ray Data's
        # read_parquet + materialize costs seconds of task start-up per split for the same bytes.
        table = (tables or {}).get(split)
        if table is None:
            table = read_split(data_path, split, columns)
        ds = ray.data.from_arrow(_calibration_column(table.select(columns), cfg))
        ds.context.enable_progress_bars = False  # workers print one line per report instead
        ds.context.execution_options.preserve_order = True  # sorted file order, run after run
        datasets[name] = ds
    timings.add("data", time.perf_counter() - data_started)
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": train_config_to_dict(cfg), "plan": dataclasses.asdict(plan), "progress": progress},
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


def write_config(cfg: TrainConfig, path: Path) -> None:
    """DIR/config.yaml: the resolved config in its user-facing form (loadable with --config)."""
    import yaml

    path.write_text(yaml.safe_dump(train_config_to_dict(cfg), sort_keys=False))


def write_metrics_csv(history: list[dict[str, Any]], path: Path):
    """DIR/metrics.csv: one row per report, the TRL columns first, eval/* last."""
    import pandas as pd

    frame = pd.DataFrame(history)
    rest = sorted((c for c in frame.columns if c not in LEADING_COLUMNS), key=lambda c: (c.startswith("eval/"), c))
    frame = frame[[c for c in LEADING_COLUMNS if c in frame.columns] + rest]
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def collect_outputs(output_dir: Path, checkpoint_dir: Path | None) -> TrainResult:
    """metrics.csv and final_model/ from the latest checkpoint (history survives restarts)."""
    from pipelines.train import state as train_state  # torch: not for `train --help`

    history = train_state.read_train_state(checkpoint_dir)["history"] if checkpoint_dir else []
    frame = write_metrics_csv(history, output_dir / "metrics.csv")
    final = None
    if checkpoint_dir is not None and (checkpoint_dir / train_state.FINAL_MODEL_DIR).is_dir():
        final = output_dir / train_state.FINAL_MODEL_DIR
        if final.exists():
            shutil.rmtree(final)
        shutil.copytree(checkpoint_dir / train_state.FINAL_MODEL_DIR, final)
    return TrainResult(output_dir=output_dir, final_model_path=final, metrics=history[-1] if history else {},
                       metrics_dataframe=frame)


def train(cfg: TrainConfig, output_dir: str | Path | None = None, callbacks: Sequence[Any] = (),
          show_progress: bool = False, tables: Mapping[str, Any] | None = None) -> TrainResult:
    """Validate, fit (or resume, or notice the run is complete), write metrics.csv and final_model/.

    `output_dir` defaults to cfg.output; `callbacks` go to RunConfig (Tune passes TuneReportCallback);
    `tables` (`read_training_tables`) are ignored with reference.mode=precomputed, whose splits carry
    the reference columns.  Raises UserError on bad input (before any worker starts), RuntimeError
    when training failed after train.max_failures restarts (metrics.csv is still written).
    """
    from pipelines.timings import Timings
    from pipelines.train import state as train_state

    timings = Timings("train")
    output_dir = Path(output_dir or cfg.output or "")
    if str(output_dir) == ".":  # Path("") is "." too
        raise UserError("the train stage needs an output directory (--output DIR)")
    output_dir = output_dir.resolve()
    cfg = dataclasses.replace(cfg, output=str(output_dir))
    with timings.phase("validate"):
        info, plan, data_path = prepare_run(cfg, output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_config(cfg, output_dir / "config.yaml")
    latest = train_state.find_latest_checkpoint(output_dir / CHECKPOINTS)
    start_step = train_state.read_train_state(latest)["step"] if latest is not None else 0
    if start_step >= plan.total_steps and (latest / train_state.FINAL_MODEL_DIR).is_dir():
        say("train", f"{output_dir} is already complete ({plan.total_steps} steps); nothing to do")
        return collect_outputs(output_dir, latest)
    if start_step:
        say("train", f"resuming {output_dir} from step {start_step}/{plan.total_steps}")
    from pipelines.ray_session import ensure_ray

    with timings.phase("Ray session"):
        ensure_ray()
    queue = printer = None
    if show_progress:  # rank 0 puts each report row; a driver thread prints them
        from ray.util.queue import Queue

        with timings.phase("progress channel"):
            queue = Queue()
        printer = threading.Thread(target=_print_progress, args=(queue, start_step, plan.total_steps), daemon=True)
    trainer = build_trainer(cfg, output_dir, info, plan, data_path, timings, callbacks=callbacks, progress=queue,
                            tables=tables if cfg.reference.mode == "live" else None)
    if printer is not None:
        printer.start()
    fit_started = time.time()
    try:
        result = trainer.fit()
        error = result.error
    except Exception as exc:  # noqa: BLE001 - Ray's TrainingFailedError and friends
        error = exc
    fit_ended = time.time()
    if queue is not None:
        queue.put(None)  # the printer's end
        printer.join(timeout=10)
        queue.shutdown()
    latest = train_state.find_latest_checkpoint(output_dir / CHECKPOINTS)
    with timings.phase("outputs"):
        outputs = collect_outputs(output_dir, latest)
    split_fit(timings, fit_started, fit_ended, train_state.read_train_state(latest).get("timings") if latest else None)
    timings.write(output_dir)
    if error is not None:
        log = write_error(output_dir, error)
        raise RuntimeError(f"training failed: {first_line(error)} (full error: {log})") from error
    return outputs


def split_fit(timings, fit_started: float, fit_ended: float, worker: dict | None) -> None:
    """The fit's wall time (epoch seconds `fit_started`..`fit_ended`) as the rank-0 worker's own
    phases (its last checkpoint's record: process start, setup, data, steps, evaluation,
    checkpoints) plus what the worker did not see: Ray Train's controller and worker group before
    the worker process existed, and after its last report (the last checkpoint's persistence, the
    worker group's and controller's teardown)."""
    worker = worker or {}
    seen = 0.0
    for name, seconds in (worker.get("phases") or {}).items():
        timings.add(f"worker {name}", seconds)
        seen += seconds
    if "created_at" in worker and "reported_at" in worker:
        before = max(0.0, worker["created_at"] - fit_started)
        after = max(0.0, fit_ended - worker["reported_at"])
        timings.add("Ray Train start-up (controller, worker group)", before)
        timings.add("Ray Train last report and teardown", after)
        seen += before + after
    timings.add("Ray Train reports, other", max(0.0, fit_ended - fit_started - seen))


def write_error(output_dir: Path, error: BaseException) -> Path:
    """`output_dir/logs/error.txt`: the whole error with its traceback (the console shows one line)."""
    path = output_dir / "logs" / "error.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(traceback.format_exception(error)))
    return path


def _print_progress(queue, start_step: int, total: int) -> None:
    """Driver thread: one progress update per report row that rank 0 puts on `queue` (None ends)."""
    done = start_step
    with Progress("train", "steps", total) as bar:
        if start_step:
            bar.update(start_step)
        while True:
            row = queue.get()
            if row is None:
                return
            step = int(row["step"])
            bar.update(max(0, step - done), postfix=_progress_note(row))
            done = step


def _progress_note(row: dict[str, float]) -> str:
    parts = [f"loss {row['loss']:.4f}", f"acc {row['rewards/accuracies']:.3f}", f"margin {row['rewards/margins']:.4f}",
             f"tokens/s {row['tokens_per_s']:.0f}"]
    if "eval/loss" in row:
        parts += [f"eval/loss {row['eval/loss']:.4f}", f"eval/acc {row['eval/accuracy']:.3f}"]
    return " | ".join(parts)


# [3] CLI ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="run directory (rerun the same one to resume)")
    parser.add_argument("--config", default=None, help="YAML config (see pipelines/configs/train_*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. objective.name=kldpo train.lr=1e-5")


CONFIG = TrainConfig  # the keys `--help` lists


def build_config(args: argparse.Namespace) -> TrainConfig:
    return config_lib.load(TrainConfig, args.config, args.overrides, flags={"output": args.output})


def main(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    try:
        result = train(cfg, show_progress=True)
    except RuntimeError as exc:
        print(f"robust-dpo: error: {exc}", file=console.err(), flush=True)
        return 1
    last = result.metrics
    say("train", f"done: step {int(last.get('step', 0))}, loss {last.get('loss', float('nan')):.4f}; "
                 f"metrics {result.output_dir / 'metrics.csv'}, model {result.final_model_path}")
    return 0
