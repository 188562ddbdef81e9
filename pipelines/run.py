"""`robust-dpo run`: the whole chain on the embedded default world, one command, resumable.

    robust-dpo run --output runs/default                          # defaults: minutes on a 2-core laptop
    robust-dpo run --output runs/noisy synth.label_noise=0.2 search.objectives=dpo,rdpo,drdpo
    robust-dpo run --output runs/big train.max_steps=200 search.wide=true    # wider grids, longer training

The chain (each step skips what an earlier run of the same --output already finished):
  [1] world     `robust-dpo synth`    -> DIR/world      (tokenizer, reference model, pairs, rewards)
  [2] data      `robust-dpo data`     -> DIR/data       (validated, tokenised, Ray Data)
  [3] sweep     `robust-dpo tune`     -> DIR/sweep      (TorchTrainer per trial, reward and KL per trial)
  [4] evaluate  `robust-dpo evaluate` -> DIR/evaluation (every trial + the reference under the shift grid)
  [5] report    pareto.csv/png, robustness.csv/png, report.md in DIR
Keys: `synth.*` (the world), `run.*` (below), `search.*` and `trial_eval.*` (the sweep), `evaluate.*`
(evaluation options: `evaluate.generation.num_prompts`, ...), and train-config sections shared by
every trial (`train.*`, `lora.*`, `objective.*`, `reference.*`).  `load_run_config` builds all of
it, the trials' train config included, so a typo anywhere fails (exit 2) before the world is made.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from pipelines import console
from pipelines import config as config_lib
from pipelines import data, evaluate, report, schema, tune
from pipelines import world as world_lib
from pipelines import timings as timings_lib
from pipelines import tracking as tracking_lib
from pipelines.console import say
from pipelines.errors import UserError
from pipelines.tracking import MlflowConfig, TrackingConfig, WandbConfig
from pipelines.evaluate import EvaluateConfig, EvaluateOptionsConfig
from pipelines.train.config import TrainConfig
from pipelines.tune import SearchConfig, TrialEvalConfig, TuneConfig
from pipelines.world import WorldConfig
from pipelines.paths import OutputPath, RewardSpec, resolve_config_paths, write_text_atomic

# Training defaults for the embedded world's tiny model (train-config values; user keys win).
DEFAULT_TRAIN = {
    "train": {"lr": 2e-3, "batch_size": 64, "micro_batch_size": 64, "epochs": 2, "checkpoint_every": 16,
              "warmup_steps": 2, "max_grad_norm": 1.0},
}
# Keys `run` sets itself: the trials train the world's model on the world's data.
OWN_KEYS = ("model", "data", "output")


@dataclass(frozen=True, kw_only=True)
class RunOptionsConfig:
    grid: list[str] = field(default_factory=lambda: [
        "mixture:alpha=0:1:6", "label_flip:eps=0:0.4:3", "source_mixture:target=0:1:3"])  # evaluation shift grids
    reward: RewardSpec = ""  # reward of the evaluation; "" = the world's mixture (levels of the mixture grid)
    include_reference: bool = True  # evaluate the untrained reference as a baseline row


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The whole run stage: every section typed except `base`, which `load_run_config` checks as a train config."""

    output: OutputPath  # required: run directory; --output
    synth: WorldConfig = field(default_factory=WorldConfig)
    run: RunOptionsConfig = field(default_factory=RunOptionsConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    trial_eval: TrialEvalConfig = field(default_factory=TrialEvalConfig)
    evaluate: EvaluateOptionsConfig = field(default_factory=EvaluateOptionsConfig)  # beta is the trained objective.beta
    tracking: list[str] = field(default_factory=list)  # report to any of tensorboard, mlflow, wandb (pipelines/tracking.py)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    base: dict = config_lib.catch_all(schema=TrainConfig)  # train-config values for every trial (train.*, lora.*, objective.*): every key not above

    def __post_init__(self):
        tracking_lib.check_names(self.tracking)

    def tracking_config(self) -> TrackingConfig:
        return TrackingConfig(backends=list(self.tracking), mlflow=self.mlflow, wandb=self.wandb)


def load_run_config(path: str | None, overrides: Sequence[str], output: str) -> RunConfig:
    """`config.load` with run's own defaults (DEFAULT_TRAIN; evaluation sizes for the world's short
    responses), then the trials' train config built from `base`: every key is checked here."""
    values = config_lib.collect(path, overrides, flags={"output": output})
    synth = config_lib.build(WorldConfig, values.get("synth"), prefix="synth")
    defaults = {"base": DEFAULT_TRAIN, "evaluate": {"generation": {
        "num_prompts": 32, "samples_per_prompt": 4, "max_new_tokens": synth.max_response_words + 1}}}
    cfg = config_lib.build(RunConfig, config_lib.deep_merge(defaults, values))
    for key in OWN_KEYS:
        if key in cfg.base:
            raise UserError(f"config key '{key}' is set by `robust-dpo run` itself (the world's model and data)")
    if "beta" in values.get("evaluate", {}):
        raise UserError("config key 'evaluate.beta' is set by `robust-dpo run` itself (the trials' objective.beta)")
    cfg = resolve_config_paths(cfg)  # against the shell's directory, like every stage's config.load
    sweep = sweep_config(cfg, Path(cfg.output), reward="world:placeholder")
    sections = tune.grid_sections(sweep) if cfg.search.search == "grid" else []
    for section in sections + [{"name": name} for name in cfg.search.objectives]:
        tune.trial_train_config(sweep, section, Path(cfg.output) / tune.TRIALS_DIR / "check")
    return cfg


def sweep_config(cfg: RunConfig, out: Path, reward: str) -> TuneConfig:
    """The tune stage's config of the sweep: the trials train the world's model on the world's data."""
    base = config_lib.deep_merge(cfg.base, {"model": {"path": str(out / "world" / "reference_model")},
                                            "data": {"path": str(out / "data")}})
    trial_eval = cfg.trial_eval if cfg.trial_eval.reward else replace(cfg.trial_eval, reward=reward)
    return TuneConfig(output=str(out / "sweep"), search=cfg.search, trial_eval=trial_eval, base=base,
                      tracking=cfg.tracking, mlflow=cfg.mlflow, wandb=cfg.wandb)


def _world(cfg: RunConfig, world_dir: Path) -> None:
    matches = world_lib.world_matches(world_dir, cfg.synth)
    if matches:
        say("run", "[1/5] world: already generated")
        return
    if matches is False:
        raise UserError(f"{world_dir} holds a world made with other synth.* keys; use another --output")
    say("run", "[1/5] world: generating")
    world_lib.generate_world(cfg.synth, world_dir, log=lambda m: None if m.startswith(" ") else say("synth", m))


def _data(world_dir: Path, data_dir: Path) -> None:
    if (data_dir / schema.MANIFEST_FILE).is_file():
        say("run", "[2/5] data: already prepared")
        return
    say("run", "[2/5] data: validating and tokenising with Ray Data")
    data.prepare_data(data.DataConfig(dataset=str(world_dir / "data"), tokenizer=str(world_dir / "tokenizer"),
                                      output=str(data_dir), max_length=64))


def run(cfg: RunConfig) -> Path:
    """The whole chain; returns the path of report.md."""
    timings = timings_lib.Timings("run")
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, out / "run_config.yaml")
    world_dir, data_dir = out / "world", out / "data"
    with timings.phase("world"):
        _world(cfg, world_dir)
    with timings.phase("data"):
        _data(world_dir, data_dir)
    reward = cfg.run.reward or f"world:{world_dir}"

    say("run", "[3/5] sweep: one TorchTrainer per trial under Ray Tune")
    with timings.phase("sweep"):
        trials = tune.tune(sweep_config(cfg, out, reward))
    timings.child("sweep", timings_lib.read(out / "sweep"))
    failed = trials.attrs.get("failed", [])
    if not len(trials):
        raise RuntimeError(f"no trial finished ({len(failed)} failed: the lines above name their error files)")

    say("run", f"[4/5] evaluate: {len(trials)} trial(s) under {', '.join(cfg.run.grid)}")
    checkpoints = [f"{row.trial_id}={row.final_model}" for row in trials.itertuples()]
    if cfg.run.include_reference:
        checkpoints.append(f"{report.BASELINE_OBJECTIVE}={world_dir / 'reference_model'}")
    options = replace(cfg.evaluate, beta=float(cfg.base.get("objective", {}).get("beta", 0.1)))  # the trained beta
    eval_cfg = EvaluateConfig.from_options(
        options, checkpoints=checkpoints, reference=str(world_dir / "reference_model"), data=str(data_dir),
        output=str(out / "evaluation"), grid=list(cfg.run.grid), reward=reward)
    with timings.phase("evaluate"):
        robustness = evaluate.evaluate(eval_cfg)
    timings.child("evaluate", timings_lib.read(out / "evaluation"))

    say("run", "[5/5] report")
    report_started = time.perf_counter()
    rows = trials.copy()
    if cfg.run.include_reference:
        robustness = robustness.assign(objective=robustness["trial_id"].map(
            dict(zip(trials["trial_id"], trials["objective"]))).fillna(report.BASELINE_OBJECTIVE))
    hyper = [c for c in rows.columns if c in _hyperparameter_names(rows["objective"].unique())]
    paths = report.write_report(rows, robustness, out, hyperparameter_cols=hyper,
                                train_levels={"mixture": cfg.synth.alpha_train},
                                title=f"robust-dpo run: {out.name}")
    timings.add("report", time.perf_counter() - report_started)
    timings.write(out)
    write_text_atomic(paths.report_md, paths.report_md.read_text() + "\n" + timings_lib.markdown(timings.report()))
    tracking_lib.log_report(cfg.tracking_config(), out, out.name,
                            [paths.report_md, out / "pareto.png", out / "robustness.png"])
    if failed:
        raise TrialsFailed(paths.report_md, failed)
    say("run", f"done: {paths.report_md}")
    return paths.report_md


class TrialsFailed(RuntimeError):
    """Some trials failed; the report of the finished ones was still written."""

    def __init__(self, report_md: Path, failed: list) -> None:
        super().__init__(f"{len(failed)} trial(s) failed; the report covers the finished ones: {report_md}")
        self.report_md, self.failed = report_md, failed


def _hyperparameter_names(objectives) -> set[str]:
    import robust_objectives

    names: set[str] = set()
    for name in objectives:
        names |= set(robust_objectives.objective_hyperparameters(name))
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/default", help="run directory (rerun the same one to resume)")
    parser.add_argument("--config", default=None, help="YAML with synth:, run:, search:, train: ... sections")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="synth.seed=1 synth.alpha_train=0.1 search.objectives=dpo,kldpo train.epochs=3 ...")


CONFIG = RunConfig  # the keys `--help` lists


def build_config(args: argparse.Namespace) -> RunConfig:
    return load_run_config(args.config, args.overrides, args.output)


def main(args: argparse.Namespace) -> int:
    try:
        path = run(build_config(args))
    except TrialsFailed as failure:
        say("run", f"done with failures: {failure}")
        return 1
    except RuntimeError as error:
        print(f"robust-dpo: error: {error}", file=console.err(), flush=True)
        return 1
    print(summary_table(path), file=console.out(), flush=True)
    return 0


def summary_table(report_md: Path) -> str:
    """The report's first table ("which objective holds up"), for the console."""
    text = report_md.read_text().split("## Reward vs KL")[0]
    return "\n".join(line for line in text.splitlines() if line.startswith("|"))


