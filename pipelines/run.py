"""`robust-dpo run`: the whole chain on the embedded default world, one command, resumable.

    robust-dpo run --output runs/default                          # defaults: minutes on a 2-core laptop
    robust-dpo run --output runs/noisy synth.label_noise=0.2 search.objectives=dpo,rdpo,drdpo
    robust-dpo run --output runs/big train.max_steps=200 search.wide=true    # wider grids, longer training
    robust-dpo run --output runs/seeds search.seeds=3                         # intervals over training seeds
    robust-dpo run --output runs/e1 scenario=mixture study.world_seeds=[0,1]   # a test-bed, over two worlds

The chain (each step skips what an earlier run of the same --output already finished):
  [1] world     `robust-dpo synth`    -> DIR/world      (tokenizer, reference model, pairs, rewards)
  [2] data      `robust-dpo data`     -> DIR/data       (validated, tokenised, Ray Data)
  [3] sweep     `robust-dpo tune`     -> DIR/sweep      (TorchTrainer per trial, reward and KL per trial)
  [4] evaluate  `robust-dpo evaluate` -> DIR/evaluation (every trial + the reference under the shift grid)
  [5] report    pareto.csv/png, robustness.csv/png, report.md in DIR
With `study.world_seeds=[...]` steps 1-4 run once per world (DIR/world_<seed>/...) and one report
covers them all.  The sweep always holds DPO's beta frontier (`run.frontier_betas`), the report's
baseline at matched KL, and the evaluation holds out half of its prompts for the selection rule
(`evaluate.generation.validation_fraction`); `scenario=NAME` starts from a test-bed's keys
(pipelines/scenarios.py).
Keys: `synth.*` (the world), `run.*` (below), `search.*` and `trial_eval.*` (the sweep), `evaluate.*`
(evaluation options: `evaluate.generation.num_prompts`, ...), and train-config sections shared by
every trial (`train.*`, `lora.*`, `objective.*`, `reference.*`).  `load_run_config` builds all of
it, the trials' train config included, so a typo anywhere fails (exit 2) before the world is made.
"""

from __future__ import annotations

import argparse
import itertools
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal, Sequence

import pandas as pd

from pipelines import console
from pipelines import config as config_lib
from pipelines import data, evaluate, report, scenarios, schema, study, tune
from pipelines import world as world_lib
from pipelines import timings as timings_lib
from pipelines import tracking as tracking_lib
from pipelines.console import say
from pipelines.errors import UserError
from pipelines.tracking import MlflowConfig, WandbConfig
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
    frontier_betas: list[float] = field(default_factory=lambda: [0.03, 0.1, 0.3, 1.0])  # DPO trials added at these betas: the report's frontier at matched KL; [] = the sweep's own DPO trials only


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    world_seeds: list[int] = field(default_factory=list)  # repeat world, data, sweep and evaluation per synth.seed in the list, one report; [] = synth.seed only


@dataclass(frozen=True, kw_only=True)
class RunConfig(tracking_lib.TrackedConfig):
    """The whole run stage: every section typed except `base`, which `load_run_config` checks as a train config."""

    output: OutputPath  # required: run directory; --output
    scenario: Literal["", "mixture", "source", "label_noise", "token_risk"] = ""  # a test-bed's keys to start from (pipelines/scenarios.py); user keys win
    synth: WorldConfig = field(default_factory=WorldConfig)
    run: RunOptionsConfig = field(default_factory=RunOptionsConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    trial_eval: TrialEvalConfig = field(default_factory=TrialEvalConfig)
    evaluate: EvaluateOptionsConfig = field(default_factory=EvaluateOptionsConfig)  # beta is the trained objective.beta
    tracking: list[str] = field(default_factory=list)  # report to any of tensorboard, mlflow, wandb (pipelines/tracking.py)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    base: dict = config_lib.catch_all(schema=TrainConfig)  # train-config values for every trial (train.*, lora.*, objective.*): every key not above


def load_run_config(path: str | None, overrides: Sequence[str], output: str) -> RunConfig:
    """`config.load` with run's own defaults (DEFAULT_TRAIN; evaluation sizes for the world's short
    responses), then the trials' train config built from `base`: every key is checked here."""
    values = config_lib.collect(path, overrides, flags={"output": output})
    if values.get("scenario"):
        values = _with_scenario(values)
    synth = config_lib.build(WorldConfig, values.get("synth"), prefix="synth")
    defaults = {"base": DEFAULT_TRAIN, "evaluate": {"generation": {
        "num_prompts": 64, "samples_per_prompt": 4, "max_new_tokens": synth.max_response_words + 1,
        "validation_fraction": 0.5}}}
    cfg = config_lib.build(RunConfig, config_lib.deep_merge(defaults, values))
    for key in OWN_KEYS:
        if key in cfg.base:
            raise UserError(f"config key '{key}' is set by `robust-dpo run` itself (the world's model and data)")
    if "beta" in values.get("evaluate", {}):
        raise UserError("config key 'evaluate.beta' is set by `robust-dpo run` itself (the trials' objective.beta)")
    cfg = resolve_config_paths(cfg)  # against the shell's directory, like every stage's config.load
    sweep = sweep_config(cfg, Path(cfg.output), reward="world:placeholder")
    sections = tune.grid_sections(sweep) if cfg.search.search == "grid" else []
    for section in sections + [{"name": name} for name in sweep.search.objectives]:
        tune.trial_train_config(sweep, section, Path(cfg.output) / tune.TRIALS_DIR / "check")
    return cfg


def _with_scenario(values: dict) -> dict:
    """The user's keys over the scenario's; the scenario's search overrides of objectives the user
    took out of search.objectives are left out with them."""
    build_world = lambda defaults: config_lib.build(  # noqa: E731
        WorldConfig, config_lib.deep_merge(defaults, values.get("synth", {})), prefix="synth")
    merged = config_lib.deep_merge(scenarios.scenario_values(str(values["scenario"]), build_world), values)
    search = merged.get("search", {})
    own = values.get("search", {}).get("overrides", {})
    kept = config_lib.coerce(search.get("objectives", []), list[str], "search.objectives")
    search["overrides"] = {k: v for k, v in search.get("overrides", {}).items() if k in kept or k in own}
    return merged


def frontier_search(search: SearchConfig, betas: Sequence[float]) -> SearchConfig:
    """The sweep's search with DPO at `betas` too (union with DPO's own grid or override): DPO's beta
    frontier, against which the report compares every objective at matched KL."""
    if not betas or search.search != "grid":
        return search
    import tune_spaces

    space = tune_spaces.get_space("dpo").params["beta"]
    own = search.overrides.get("dpo", {}).get("beta", list(space.wide if search.wide else space.small))
    own = own if isinstance(own, (list, tuple)) else [own]
    grid = sorted({float(b) for b in [*own, *betas]})
    objectives = list(search.objectives) if "dpo" in search.objectives else ["dpo", *search.objectives]
    overrides = {**search.overrides, "dpo": {**search.overrides.get("dpo", {}), "beta": grid}}
    return replace(search, objectives=objectives, overrides=overrides)


def sweep_config(cfg: RunConfig, out: Path, reward: str) -> TuneConfig:
    """The tune stage's config of the sweep: the trials train the world's model on the world's data."""
    base = config_lib.deep_merge(cfg.base, {"model": {"path": str(out / "world" / "reference_model")},
                                            "data": {"path": str(out / "data")}})
    trial_eval = cfg.trial_eval if cfg.trial_eval.reward else replace(cfg.trial_eval, reward=reward)
    return TuneConfig(output=str(out / "sweep"), search=frontier_search(cfg.search, cfg.run.frontier_betas),
                      trial_eval=trial_eval, base=base, tracking=cfg.tracking, mlflow=cfg.mlflow, wandb=cfg.wandb)


def _world(cfg: RunConfig, world_dir: Path, step: str) -> None:
    matches = world_lib.world_matches(world_dir, cfg.synth)
    if matches:
        say("run", f"{step}[1/5] world: already generated")
        return
    if matches is False:
        raise UserError(f"{world_dir} holds a world made with other synth.* keys; use another --output")
    say("run", f"{step}[1/5] world: generating")
    world_lib.generate_world(cfg.synth, world_dir, log=lambda m: None if m.startswith(" ") else say("synth", m))


def _data(world_dir: Path, data_dir: Path, step: str) -> None:
    if (data_dir / schema.MANIFEST_FILE).is_file():
        say("run", f"{step}[2/5] data: already prepared")
        return
    say("run", f"{step}[2/5] data: validating and tokenising with Ray Data")
    data.prepare_data(data.DataConfig(dataset=str(world_dir / "data"), tokenizer=str(world_dir / "tokenizer"),
                                      output=str(data_dir), max_length=64))


def _chain(cfg: RunConfig, out: Path, timings: timings_lib.Timings, step: str = "") -> tuple:
    """Steps 1-4 in `out` for one world: (trials, evaluation rows with `objective`, the samples' KL
    tail per trial, failed trials)."""
    world_dir, data_dir = out / "world", out / "data"
    with timings.phase("world"):
        _world(cfg, world_dir, step)
    with timings.phase("data"):
        _data(world_dir, data_dir, step)
    reward = cfg.run.reward or f"world:{world_dir}"

    say("run", f"{step}[3/5] sweep: one TorchTrainer per trial under Ray Tune")
    with timings.phase("sweep"):
        trials = tune.tune(sweep_config(cfg, out, reward))
    suffix = f" ({step.rstrip(': ')})" if step else ""
    timings.child(f"sweep{suffix}", timings_lib.read(out / "sweep"))
    failed = trials.attrs.get("failed", [])
    if not len(trials):
        raise RuntimeError(f"no trial finished ({len(failed)} failed: the lines above name their error files)")

    say("run", f"{step}[4/5] evaluate: {len(trials)} trial(s) under {', '.join(cfg.run.grid)}")
    checkpoints = [f"{row.trial_id}={row.final_model}" for row in trials.itertuples()]
    if cfg.run.include_reference:
        checkpoints.append(f"{report.BASELINE_OBJECTIVE}={world_dir / 'reference_model'}")
    options = replace(cfg.evaluate, beta=float(cfg.base.get("objective", {}).get("beta", 0.1)))  # the trained beta
    eval_cfg = EvaluateConfig.from_options(
        options, checkpoints=checkpoints, reference=str(world_dir / "reference_model"), data=str(data_dir),
        output=str(out / "evaluation"), grid=list(cfg.run.grid), reward=reward)
    with timings.phase("evaluate"):
        robustness = evaluate.evaluate(eval_cfg)
    timings.child(f"evaluate{suffix}", timings_lib.read(out / "evaluation"))
    robustness = robustness.assign(objective=robustness["trial_id"].map(
        dict(zip(trials["trial_id"], trials["objective"]))).fillna(report.BASELINE_OBJECTIVE))
    samples_file = out / "evaluation" / "samples.parquet"
    extras = None
    if samples_file.is_file():
        samples = pd.read_parquet(samples_file, columns=["trial_id", "kl", "prompt_set"])
        extras = study.kl_tail(samples[samples["prompt_set"] == "test"])
    return trials, robustness, extras, failed


def _tag_world(seed: int, trials: pd.DataFrame, robustness: pd.DataFrame, extras) -> tuple:
    """Trial ids `w<seed>.<trial>` and a world_seed column: one report over several worlds."""
    tag = lambda frame: frame.assign(trial_id=[f"w{seed}.{t}" for t in frame["trial_id"]])  # noqa: E731
    return (tag(trials).assign(world_seed=seed), tag(robustness).assign(world_seed=seed),
            None if extras is None else tag(extras))


def run(cfg: RunConfig) -> Path:
    """The whole chain (once per world of study.world_seeds); returns the path of report.md."""
    timings = timings_lib.Timings("run")
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, out / "run_config.yaml")
    parts, failed = [], []
    for seed in cfg.study.world_seeds or [None]:
        if seed is None:
            parts.append(_chain(cfg, out, timings))
        else:
            world_cfg = replace(cfg, synth=replace(cfg.synth, seed=int(seed)))
            trials, robustness, extras, lost = _chain(world_cfg, out / f"world_{seed}", timings, f"world {seed}: ")
            parts.append((*_tag_world(int(seed), trials, robustness, extras), lost))
        failed += parts[-1][3]

    say("run", "[5/5] report")
    report_started = time.perf_counter()
    rows = pd.concat([p[0] for p in parts], ignore_index=True)
    robustness = pd.concat([p[1] for p in parts], ignore_index=True)
    extras = [p[2] for p in parts if p[2] is not None]
    hyper = [c for c in rows.columns if c in _hyperparameter_names(rows["objective"].unique())]
    paths = report.write_report(rows, robustness, out, hyperparameter_cols=hyper,
                                train_levels={"mixture": cfg.synth.alpha_train},
                                extras=pd.concat(extras, ignore_index=True) if extras else None,
                                title=f"robust-dpo run: {out.name}" + (f" (scenario {cfg.scenario})" if cfg.scenario else ""))
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
    """The registry hyperparameters of the objectives and their input keys (DoRA's calibration)."""
    import robust_objectives

    import tune_spaces

    names: set[str] = set()
    for name in objectives:
        if name != report.BASELINE_OBJECTIVE:
            names |= set(robust_objectives.objective_hyperparameters(name)) | set(tune_spaces.input_keys(name))
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
    lines = report_md.read_text().split("## Reward vs KL")[0].splitlines()
    rows = itertools.dropwhile(lambda line: not line.startswith("|"), lines)
    return "\n".join(itertools.takewhile(lambda line: line.startswith("|"), rows))
