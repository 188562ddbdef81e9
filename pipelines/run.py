"""`robust-dpo run`: the whole chain on the embedded default world, one command, resumable.

    robust-dpo run --output runs/default                          # defaults: minutes on a 2-core laptop
    robust-dpo run --output runs/noisy synth.label_noise=0.2 run.objectives=dpo,rdpo,drdpo
    robust-dpo run --output runs/big train.max_steps=200 search.wide=true    # wider grids, longer training

The chain (each step skips what an earlier run of the same --output already finished):
  [1] world     `robust-dpo synth`    -> DIR/world      (tokenizer, reference model, pairs, rewards)
  [2] data      `robust-dpo data`     -> DIR/data       (validated, tokenised, Ray Data)
  [3] sweep     `robust-dpo tune`     -> DIR/sweep      (TorchTrainer per trial, reward and KL per trial)
  [4] evaluate  `robust-dpo evaluate` -> DIR/evaluation (every trial + the reference under the shift grid)
  [5] report    pareto.csv/png, robustness.csv/png, report.md in DIR
Keys: `synth.*` (the world), `run.*` (below), `search.*` and `trial_eval.*` (the sweep), `evaluate.*`
(evaluation), and train-config sections shared by every trial (`train.*`, `lora.*`, `objective.*`,
`reference.*`).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipelines import config as config_lib
from pipelines.errors import UserError

# Training defaults for the embedded world's tiny model (train-config values; user keys win).
DEFAULT_TRAIN = {
    "train": {"lr": 2e-3, "batch_size": 64, "micro_batch_size": 64, "epochs": 2, "checkpoint_every": 16,
              "warmup_steps": 2, "max_grad_norm": 1.0},
}
EVAL_SECTIONS = ("synth", "run", "search", "trial_eval", "evaluate")


@dataclass(frozen=True, kw_only=True)
class RunSection:
    grid: list[str] = field(default_factory=lambda: [
        "mixture:alpha=0:1:6", "label_flip:eps=0:0.4:3", "source_mixture:target=0:1:3"])  # evaluation shift grids
    reward: str = ""  # reward of the evaluation; "" = the world's mixture (levels of the mixture grid)
    include_reference: bool = True  # evaluate the untrained reference as a baseline row


@dataclass(frozen=True, kw_only=True)
class RunStageConfig:
    output: str  # required: run directory
    synth: Any = None  # the world's keys (pipelines.world.WorldConfig), strict
    run: RunSection = field(default_factory=RunSection)
    search: dict = field(default_factory=dict)  # pipelines.tune.SearchConfig keys
    trial_eval: dict = field(default_factory=dict)  # pipelines.tune.TrialEvalConfig keys
    evaluate: dict = field(default_factory=dict)  # pipelines.evaluate.EvaluateConfig keys (generation.*, ...)
    base: dict = field(default_factory=dict)  # train-config values for every trial


def load_run_config(path: str | None, overrides: Sequence[str], output: str) -> RunStageConfig:
    from pipelines.world import WorldConfig

    values = config_lib.load_yaml(path) if path else {}
    values = config_lib.deep_merge(values, config_lib.parse_overrides(overrides))
    sections = {k: values.pop(k) for k in list(values) if k in EVAL_SECTIONS}
    base = config_lib.deep_merge(DEFAULT_TRAIN, values)
    for key in ("model", "data", "output"):
        if key in base:
            raise UserError(f"config key '{key}' is set by `robust-dpo run` itself (the world's model and data)")
    sections["synth"] = config_lib.build(WorldConfig, sections.get("synth", {}), prefix="synth")
    return config_lib.build(RunStageConfig, {**sections, "base": base, "output": output})


def _step(label: str, started: float) -> None:
    print(f"[run] {label} ({time.perf_counter() - started:.0f}s elapsed)", flush=True)


def _world(cfg: RunStageConfig, world_dir: Path, started: float) -> None:
    from pipelines import world as world_lib

    matches = world_lib.world_matches(world_dir, cfg.synth)
    if matches:
        _step("[1/5] world: already generated", started)
        return
    if matches is False:
        raise UserError(f"{world_dir} holds a world made with other synth.* keys; use another --output")
    _step("[1/5] world: generating", started)
    world_lib.generate_world(cfg.synth, world_dir, log=lambda m: print(f"[run]   {m}", flush=True))


def _data(world_dir: Path, data_dir: Path, started: float) -> None:
    from pipelines import data, schema

    if (data_dir / schema.MANIFEST_FILE).is_file():
        _step("[2/5] data: already prepared", started)
        return
    _step("[2/5] data: validating and tokenising with Ray Data", started)
    data.prepare_data(data.DataConfig(dataset=str(world_dir / "data"), tokenizer=str(world_dir / "tokenizer"),
                                      output=str(data_dir), max_length=64))


def run(cfg: RunStageConfig) -> Path:
    """The whole chain; returns the path of report.md."""
    from pipelines import evaluate, report, tune

    started = time.perf_counter()
    out = Path(cfg.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, out / "run_config.yaml")
    world_dir, data_dir = out / "world", out / "data"
    _world(cfg, world_dir, started)
    _data(world_dir, data_dir, started)
    reward = cfg.run.reward or f"world:{world_dir}"

    _step("[3/5] sweep: one TorchTrainer per trial under Ray Tune", started)
    base = config_lib.deep_merge(cfg.base, {"model": {"path": str(world_dir / "reference_model")},
                                            "data": {"path": str(data_dir)}})
    tune_cfg = config_lib.build(tune.TuneStageConfig, {
        "output": str(out / "sweep"), "search": cfg.search, "base": base,
        "trial_eval": {"reward": reward, **cfg.trial_eval}})
    trials = tune.tune(tune_cfg)
    if not len(trials):
        raise RuntimeError("no trial finished; see the Tune output above")

    _step(f"[4/5] evaluate: {len(trials)} trial(s) under {', '.join(cfg.run.grid)}", started)
    checkpoints = [f"{row.trial_id}={row.final_model}" for row in trials.itertuples()]
    if cfg.run.include_reference:
        checkpoints.append(f"{report.BASELINE_OBJECTIVE}={world_dir / 'reference_model'}")
    eval_values = config_lib.deep_merge({"generation": {"num_prompts": 32, "samples_per_prompt": 4,
                                                        "max_new_tokens": cfg.synth.max_response_words + 1}},
                                        cfg.evaluate)
    eval_cfg = config_lib.build(evaluate.EvaluateConfig, {
        **eval_values, "checkpoints": checkpoints, "reference": str(world_dir / "reference_model"),
        "data": str(data_dir), "output": str(out / "evaluation"), "grid": list(cfg.run.grid), "reward": reward,
        "beta": float(base.get("objective", {}).get("beta", 0.1))})
    robustness = evaluate.evaluate(eval_cfg)

    _step("[5/5] report", started)
    rows = trials.copy()
    if cfg.run.include_reference:
        robustness = robustness.assign(objective=robustness["trial_id"].map(
            dict(zip(trials["trial_id"], trials["objective"]))).fillna(report.BASELINE_OBJECTIVE))
    hyper = [c for c in rows.columns if c in _hyperparameter_names(rows["objective"].unique())]
    paths = report.write_report(rows, robustness, out, hyperparameter_cols=hyper,
                                train_levels={"mixture": cfg.synth.alpha_train},
                                title=f"robust-dpo run: {out.name}")
    _step(f"done: {paths.report_md}", started)
    return paths.report_md


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


def main(args: argparse.Namespace) -> int:
    path = run(load_run_config(args.config, args.overrides, args.output))
    print(path.read_text().split("## Reward vs KL")[0], flush=True)
    return 0


