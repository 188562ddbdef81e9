"""`robust-dpo tune`: search the robustness radius / temperature / risk level and beta with Ray Tune.

    robust-dpo tune --output runs/sweep model.path=runs/world/reference_model data.path=runs/data \\
        trial_eval.reward=world:runs/world search.objectives=dpo,kldpo,wdpo train.max_steps=40
    # Optuna, multi-objective (reward up, KL down), 8 trials per objective:
    robust-dpo tune --output runs/sweep ... search.search=optuna search.num_samples=8
    # on a cluster: `ray job submit --working-dir . -- robust-dpo tune ... train.use_gpu=true`

Train V2 pattern (RAY_NOTES.md 5.3): a Tune *function trainable* (`train_driver_fn`) builds the
trial's TorchTrainer (`pipelines.train`) with `TuneReportCallback`, so rank 0's all-reduced training
metrics stream to Tune; after `fit()` the trial samples from its final policy in a Ray task (a GPU
one on a GPU cluster) and reports `reward` (mean reward of the samples under `trial_eval.reward`)
and `kl` (exact per-token KL(policy || reference) summed along each sample, averaged).

Resume: every trial has a deterministic name built from its hyperparameters and trains into
`DIR/trials/<name>/` (the train stage resumes from its latest checkpoint there); a trial whose
`trial_result.json` exists is reported from it without training.  So rerunning the same command
after an interruption redoes only the unfinished trials.

Outputs in DIR: `trials.csv` (one row per trial: trial_id, objective, hyperparameters, reward, kl,
final_model, status), `pareto.csv` and `pareto.png` (front and hypervolume, `pipelines.report`),
`tune_config.yaml`, and Tune's own experiment folder `DIR/tune/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from pipelines import config as config_lib
from pipelines import console
from pipelines import timings as timings_lib
from pipelines import tracking as tracking_lib
from pipelines.console import Progress, say
from pipelines.errors import UserError
from pipelines.tracking import MlflowConfig, WandbConfig
from pipelines.train.config import TrainConfig, TrainLoopConfig, build_train_config
from pipelines.paths import OutputPath, RewardSpec, atomic_path, write_text_atomic

TRIALS_DIR = "trials"
TRIAL_RESULT = "trial_result.json"
DRIVER_RESOURCE = "TRAIN_DRIVER_RESOURCE"  # custom resource cluster.yaml gives the CPU head node
DEFAULT_OBJECTIVES = ("dpo", "rdpo", "drdpo", "kldpo", "wdpo", "dora", "radpo2")


@dataclass(frozen=True, kw_only=True)
class SearchConfig:
    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))  # registry names swept
    search: Literal["grid", "optuna"] = "grid"  # grid = tune_spaces grids; optuna = multi-objective TPE per objective
    wide: bool = False  # grid: the wide grids of tune_spaces instead of the small defaults
    num_samples: int = 8  # optuna: trials per objective; >= 1
    max_concurrent_trials: int = 0  # 0 = from the cluster: GPUs (or CPUs) / per-trial need, capped by local cores
    asha: bool = False  # early-stop trials with ASHA on `asha_metric` (single metric, RAY_NOTES 5.3)
    asha_metric: str = "loss"  # a training metric every report carries
    asha_mode: Literal["min", "max"] = "min"  # min: a lower asha_metric is better
    asha_grace_period: int = 1  # reports before a trial may be stopped
    max_failures: int = 0  # trial-driver restarts (ray.tune.FailureConfig); worker restarts are train.max_failures
    seed: int = 0  # optuna sampler seed
    seeds: int = 1  # grid: train every grid point this many times, training seeds train.seed + 0 .. seeds - 1 (trial names end in -seed_K)
    overrides: dict = field(default_factory=dict)  # objective -> {hyperparameter: value or [values]}

    def __post_init__(self):
        if not self.objectives:
            raise config_lib.FieldError("objectives", "is empty")
        config_lib.check(self, ">= 1", "num_samples", "seeds")
        if self.seeds > 1 and self.search != "grid":
            raise config_lib.FieldError("seeds", f"= {self.seeds} repeats grid points: it needs search.search=grid")
        stray = sorted(set(self.overrides) - set(self.objectives))
        if stray:
            raise config_lib.FieldError(f"overrides.{stray[0]}", "is not among the swept objectives")


@dataclass(frozen=True, kw_only=True)
class TrialEvalConfig:
    reward: RewardSpec = ""  # world:DIR[:NAME] | hf:PATH | module:function; required (scores the samples)
    num_prompts: int = 32  # distinct eval prompts (first in file order); >= 1
    samples_per_prompt: int = 4  # samples per prompt at temperature 1; >= 1
    max_new_tokens: int = 16  # response cap in tokens
    seed: int = 0  # sampling seed (same uniforms for every trial: common random numbers)

    def __post_init__(self):
        config_lib.check(self, ">= 1", "num_prompts", "samples_per_prompt", "max_new_tokens")


@dataclass(frozen=True, kw_only=True)
class TuneConfig(tracking_lib.TrackedConfig):
    """The whole tune stage: `search.*`, `trial_eval.*`, tracking, and every other key is a train-config value."""

    output: OutputPath  # required: sweep directory; --output
    search: SearchConfig = field(default_factory=SearchConfig)
    trial_eval: TrialEvalConfig = field(default_factory=TrialEvalConfig)
    tracking: list[str] = field(default_factory=list)  # report to any of tensorboard, mlflow, wandb (pipelines/tracking.py)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    base: dict = config_lib.catch_all(schema=TrainConfig)  # train-config values shared by every trial (model.path, train.max_steps, ...): every key not above


# [1] Trials: explicit, validated, deterministically named --------------------------------------


def trial_name(objective: dict[str, Any], seed: int | None = None) -> str:
    """`kldpo-beta_0.1-tau_0.5` (`-seed_2` appended for a repeated grid point): readable, stable across
    reruns (keys sorted), path-safe, no '=' (evaluate's `--checkpoint NAME=PATH` splits on it)."""
    parts = [objective["name"]] + [f"{k}_{objective[k]}" for k in sorted(objective) if k != "name"]
    name = "-".join(str(p).replace("/", "_").replace(" ", "") for p in parts)
    if len(name) > 120:  # long override lists: keep it a valid directory name
        name = f"{objective['name']}-{hashlib.sha256(name.encode()).hexdigest()[:12]}"
    return name if seed is None else f"{name}-seed_{seed}"


def config_trial_name(config: dict[str, Any]) -> str:
    """The trial name of a Tune trial's config (its objective section and, with search.seeds > 1, seed)."""
    return trial_name(config["objective"], config.get("seed"))


def trial_train_config(cfg: TuneConfig, objective: dict[str, Any], output_dir: Path, seed: int | None = None):
    """The TrainConfig of one trial: base values <- the trial's objective section (and its training
    seed: train.seed + the repetition index)."""
    values = config_lib.deep_merge(cfg.base, {"objective": objective, "output": str(output_dir)})
    values["objective"] = {**cfg.base.get("objective", {}), **objective}
    if seed is not None:
        train = values.get("train", {})
        values["train"] = {**train, "seed": int(train.get("seed", TrainLoopConfig.seed)) + seed}
    return build_train_config(values)


def grid_sections(cfg: TuneConfig) -> list[dict[str, Any]]:
    """Every grid point over the objectives, validated against the registry (ValueError -> UserError)."""
    import tune_spaces

    sections = []
    for name in cfg.search.objectives:
        try:
            sections += tune_spaces.list_grid_points(name, wide=cfg.search.wide, overrides=cfg.search.overrides.get(name))
        except ValueError as exc:
            raise UserError(f"search.objectives/overrides: {exc}") from None
    return sections


def check_tune_config(cfg: TuneConfig) -> None:
    """Everything checkable before Ray starts: objectives, overrides, the base train config, reward."""
    import robust_objectives

    try:
        for name in cfg.search.objectives:
            robust_objectives.get_spec(name)
    except robust_objectives.UnknownObjectiveError as error:
        raise UserError(f"config key 'search.objectives': {error}") from error
    if not cfg.trial_eval.reward:
        raise UserError("config key 'trial_eval.reward' is required: the reward that scores each trial's samples "
                        "(world:DIR, hf:PATH or module:function)")
    from pipelines.evaluate.rewards import RewardFunction

    RewardFunction(cfg.trial_eval.reward)  # loads / imports now: a bad spec fails before any trial
    sections = grid_sections(cfg) if cfg.search.search == "grid" else []
    first = {"name": cfg.search.objectives[0]}
    train_cfg = trial_train_config(cfg, first, Path(cfg.output) / TRIALS_DIR / "check")
    from pipelines.train import config as tc

    tc.inspect_dataset(train_cfg)
    tc.check_model(train_cfg)
    for section in sections:
        trial_train_config(cfg, section, Path(cfg.output) / TRIALS_DIR / trial_name(section))


# [2] The trial: train (TorchTrainer), then sample and score ------------------------------------


def score_policy(policy_path: str, reference_path: str, data_path: str, trial_eval: dict) -> dict[str, float]:
    """Mean reward and mean sequence KL(policy || reference) of samples on the eval prompts.

    Sampling, decoding and scoring are the evaluate stage's `SampleResponses`, so a trial's numbers
    are computed exactly as `robust-dpo evaluate` computes them.
    """
    import numpy as np
    import torch

    from pipelines import schema
    from pipelines.evaluate.generation import SampleResponses

    te = TrialEvalConfig(**trial_eval)
    manifest = schema.read_manifest(data_path)
    split = "eval" if "eval" in manifest["splits"] else "train"
    table = pd.read_parquet(schema.split_dir(data_path, split), columns=["prompt", "prompt_input_ids"])
    table = table.drop_duplicates("prompt").head(te.num_prompts)
    tokenizer = policy_path if Path(policy_path, "tokenizer_config.json").exists() else reference_path
    sampler = SampleResponses(policies=[policy_path], reference_path=reference_path, tokenizer_path=tokenizer,
                              max_new_tokens=te.max_new_tokens, seed=te.seed, use_gpu=torch.cuda.is_available(),
                              reward=te.reward, reward_keys={"reward": None})
    n = te.samples_per_prompt
    prompt_ids = np.empty(len(table) * n, dtype=object)
    prompt_ids[:] = [list(map(int, ids)) for ids in table["prompt_input_ids"] for _ in range(n)]
    out = sampler({"model_index": np.zeros(len(table) * n, dtype=np.int64),
                   "prompt_index": np.repeat(np.arange(len(table)), n),
                   "sample_index": np.tile(np.arange(n), len(table)),
                   "prompt": np.asarray([p for p in table["prompt"] for _ in range(n)], dtype=object),
                   "prompt_input_ids": prompt_ids})
    return {"reward": float(np.mean(out["reward"])), "kl": float(np.mean(out["kl"])),
            "kl_mc": float(np.mean(out["kl_mc"])), "response_length": float(np.mean(out["length"]))}


def train_driver_fn(config: dict[str, Any], tables: dict | None = None) -> None:
    """Tune function trainable: one trial = one TorchTrainer run + one scoring task.  `tables` are
    the data splits, read once by the sweep (`tune.with_parameters`: one copy in the object store)."""
    import ray
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines import train as train_lib

    cfg = config_lib.build(TuneConfig, config["stage"])
    objective, seed = dict(config["objective"]), config.get("seed")
    name = trial_name(objective, seed)
    trial_dir = Path(cfg.output) / TRIALS_DIR / name
    result_file = trial_dir / TRIAL_RESULT
    if result_file.is_file():  # finished in an earlier run of the same sweep
        ray.tune.report(json.loads(result_file.read_text()))
        return
    train_cfg = trial_train_config(cfg, objective, trial_dir, seed)
    started = time.perf_counter()
    result = train_lib.train(train_cfg, trial_dir, callbacks=[TuneReportCallback()], tables=tables)
    train_seconds = time.perf_counter() - started
    resources = {"num_gpus": 1} if train_cfg.train.use_gpu else {"num_cpus": 1}
    # "DEFAULT" lets the task leave the trial's placement group (it only holds the driver's CPU share).
    scores = ray.get(ray.remote(score_policy).options(**resources, scheduling_strategy="DEFAULT").remote(
        str(result.final_model_path), train_cfg.model.path, train_cfg.data.path, dataclasses.asdict(cfg.trial_eval)))
    final = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    row = {**final, **scores, "trial_id": name, "objective": objective["name"], "seed": seed or 0,
           **{f"hp/{k}": v for k, v in objective.items() if k != "name"},
           "final_model": str(result.final_model_path), "train_seconds": train_seconds,
           "sampling_seconds": time.perf_counter() - started - train_seconds}
    write_text_atomic(result_file, json.dumps(row, indent=2, sort_keys=True))  # the trial's "done" marker
    ray.tune.report(row)


# [3] The sweep ------------------------------------------------------------------------------------


def concurrency(cfg: TuneConfig, train_cfg) -> int:
    """max_concurrent_trials: cluster GPUs (or CPUs) / one trial's need; locally also <= physical cores."""
    import ray

    if cfg.search.max_concurrent_trials:
        return cfg.search.max_concurrent_trials
    resources = ray.cluster_resources()
    workers = train_cfg.train.num_workers
    if train_cfg.train.use_gpu:
        return max(1, int(resources.get("GPU", 0)) // workers)
    need = workers * train_cfg.train.cpus_per_worker + 1  # workers + the scoring task
    fits = max(1, int(resources.get("CPU", 1) // need))
    return fits if os.environ.get("RAY_ADDRESS") else max(1, min(fits, (os.cpu_count() or 2) // workers))


def _searches(cfg: TuneConfig) -> list[tuple[str, dict, Any, int]]:
    """(label, param_space, search_alg, num_samples) per Tuner run: one grid, or one Optuna per objective."""
    from ray import tune

    import tune_spaces

    stage = {"stage": json.loads(json.dumps(dataclasses.asdict(cfg)))}
    if cfg.search.search == "grid":
        seeds = {"seed": tune.grid_search(list(range(cfg.search.seeds)))} if cfg.search.seeds > 1 else {}
        return [("grid", {**stage, "objective": tune.grid_search(grid_sections(cfg)), **seeds}, None, 1)]
    from ray.tune.search.optuna import OptunaSearch

    runs = []
    for name in cfg.search.objectives:
        space = tune_spaces.build_param_space(name, grid=False, overrides=cfg.search.overrides.get(name))
        searcher = OptunaSearch(metric=["reward", "kl"], mode=["max", "min"], seed=cfg.search.seed)
        runs.append((name, {**stage, **space}, searcher, cfg.search.num_samples))
    return runs


def trial_timings(output_dir: Path) -> dict[str, dict]:
    """Per finished trial: its train stage's timings.json plus the sampling that scored it."""
    out = {}
    for result in sorted((output_dir / TRIALS_DIR).glob(f"*/{TRIAL_RESULT}")):
        train_report = timings_lib.read(result.parent)
        if train_report is None:
            continue
        row = json.loads(result.read_text())
        phases = {**train_report["phases"], "sampling and scoring": round(row.get("sampling_seconds", 0.0), 3)}
        out[result.parent.name] = {"stage": "trial", "total_seconds": round(row.get("train_seconds", 0.0)
                                   + row.get("sampling_seconds", 0.0), 3), "phases": phases}
    return out


def collect_trials(output_dir: Path) -> pd.DataFrame:
    """trials.csv: one row per finished trial (from each trial's trial_result.json)."""
    rows = [json.loads(p.read_text()) for p in sorted((output_dir / TRIALS_DIR).glob(f"*/{TRIAL_RESULT}"))]
    frame = pd.DataFrame(rows)
    hyperparameters = [c.removeprefix("hp/") for c in frame.columns if c.startswith("hp/")]
    if len(frame):
        frame = frame.rename(columns=lambda c: c.removeprefix("hp/"))
        lead = ["trial_id", "objective", "reward", "kl"]
        frame = frame[lead + [c for c in frame.columns if c not in lead]]
    with atomic_path(output_dir / "trials.csv") as tmp:
        frame.to_csv(tmp, index=False)
    frame.attrs["hyperparameters"] = hyperparameters
    return frame


def tune(cfg: TuneConfig) -> pd.DataFrame:
    """Run the sweep (or finish an interrupted one); write trials.csv and the Pareto report.

    Returns the finished trials; `trials.attrs["failed"]` lists the failed ones as
    (trial name, first line of the error, path of the full error file)."""
    import ray.tune
    from ray import tune as tune_api

    from pipelines import report
    from pipelines.ray_session import ensure_ray

    timings = timings_lib.Timings("tune")
    check_tune_config(cfg)
    tracking_lib.check_backends(cfg.tracking_config())
    output_dir = Path(cfg.output).resolve()
    cfg = dataclasses.replace(cfg, output=str(output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, output_dir / "tune_config.yaml")
    # Training reports stream to Tune before the final reward/kl report: they lack the searcher's metrics.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    ensure_ray()
    train_cfg = trial_train_config(cfg, {"name": cfg.search.objectives[0]}, output_dir / TRIALS_DIR / "check")
    limit = concurrency(cfg, train_cfg)
    resources = {"CPU": 0.5}
    if ray.cluster_resources().get(DRIVER_RESOURCE):
        resources[DRIVER_RESOURCE] = 0.01  # trial drivers on the head (not preemptible GPU nodes)
    tables = None
    if train_cfg.reference.mode == "live":  # the splits, read once for every trial
        from pipelines.train import read_training_tables

        with timings.phase("read data"):
            tables = read_training_tables(train_cfg)
    trainable = ray.tune.with_resources(ray.tune.with_parameters(train_driver_fn, tables=tables), resources)
    searches = _searches(cfg)
    total = sum(len(space["objective"]["grid_search"]) * cfg.search.seeds if label == "grid" else samples
                for label, space, _, samples in searches)
    say("tune", f"{total} trial(s), up to {limit} at a time; trials in {output_dir / TRIALS_DIR}")
    failed: list[tuple[str, str, str]] = []
    with Progress("tune", "trials", total) as progress, timings.phase("trials"):
        for label, space, searcher, samples in searches:
            scheduler = None
            if cfg.search.asha:
                scheduler = tune_api.schedulers.ASHAScheduler(
                    metric=cfg.search.asha_metric, mode=cfg.search.asha_mode,
                    grace_period=cfg.search.asha_grace_period, max_t=10**9)
            tuner = ray.tune.Tuner(
                trainable,
                param_space=space,
                # reuse_actors: a finished trial's driver process (torch, transformers and Ray Train
                # already imported) runs the next trial, instead of a new process per trial.
                tune_config=ray.tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=samples,
                                                max_concurrent_trials=limit, reuse_actors=True,
                                                trial_dirname_creator=lambda t: config_trial_name(t.config)),
                run_config=ray.tune.RunConfig(
                    name=f"tune-{label}", storage_path=str(output_dir / "tune"),
                    failure_config=ray.tune.FailureConfig(max_failures=cfg.search.max_failures),
                    verbose=2 if console.verbose() else 0,
                    callbacks=[trial_progress_callback(progress)]
                    + tracking_lib.tune_callbacks(cfg.tracking_config(), output_dir)),
            )
            for result in tuner.fit():
                if result.error is not None:
                    failed.append(record_failure(output_dir, result))
    trials = collect_trials(output_dir)
    for name, trial in trial_timings(output_dir).items():
        timings.child(name, trial)
    if len(trials):
        with timings.phase("report"):
            report.write_pareto(trials, output_dir, setting_cols=trials.attrs["hyperparameters"])
        tracking_lib.log_report(cfg.tracking_config(), output_dir, output_dir.name,
                                [output_dir / name for name in ("trials.csv", "pareto.csv", "pareto.png")])
    for name, first, log in failed:
        say("tune", f"trial {name} FAILED: {first} (full error: {log})")
    say("tune", f"{len(trials)} of {total} trial(s) finished{f', {len(failed)} failed' if failed else ''}; "
                f"{output_dir / 'trials.csv'}, {output_dir / 'pareto.csv'}")
    trials.attrs["failed"] = failed
    timings.write(output_dir)
    return trials


def record_failure(output_dir: Path, result) -> tuple[str, str, str]:
    """A failed trial's name, the first line of its error, and `trials/<name>/error.txt` (written here:
    the whole error with its traceback)."""
    name = config_trial_name(result.config) if result.config else Path(result.path).name
    text = "".join(traceback.format_exception(result.error))
    path = output_dir / TRIALS_DIR / name / "error.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    lines = [line.strip() for line in str(result.error).strip().splitlines() if line.strip()]
    return name, (lines[-1] if lines else type(result.error).__name__)[:200], str(path)


def trial_progress_callback(progress: Progress):
    """A Tune callback that counts finished trials and notes the running trials' training steps."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self) -> None:
            self.steps: dict[str, str] = {}

        def _note(self) -> str:
            return ", ".join(f"{k} step {v}" for k, v in sorted(self.steps.items())[:4])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if "step" in result:
                self.steps[config_trial_name(trial.config)] = str(int(result["step"]))
                progress.note(self._note())

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.steps.pop(config_trial_name(trial.config), None)
            progress.update(1, postfix=self._note() or "-")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.on_trial_complete(iteration, trials, trial)

    return TrialProgress()


# [4] CLI ----------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="sweep directory (rerun the same one to resume)")
    parser.add_argument("--config", default=None, help="YAML with search:, trial_eval: and train-config sections")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="search.objectives=dpo,kldpo trial_eval.reward=world:DIR model.path=... data.path=...")


CONFIG = TuneConfig  # the keys `--help` lists


def build_config(args: argparse.Namespace) -> TuneConfig:
    return config_lib.load(TuneConfig, args.config, args.overrides, flags={"output": args.output})


def main(args: argparse.Namespace) -> int:
    trials = tune(build_config(args))
    if len(trials):
        with pd.option_context("display.width", 160):
            print(trials[["trial_id", "objective", "reward", "kl"]].to_string(index=False), file=console.out())
    return 1 if trials.attrs.get("failed") or not len(trials) else 0
