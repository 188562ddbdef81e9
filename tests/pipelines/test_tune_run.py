"""`robust-dpo tune` and `robust-dpo run`: config splitting, checks, and one end-to-end smoke run.

The smoke run is the smallest whole chain: a tiny world, two objectives (one batch-coupled), two
optimizer steps each, a 2-trial Tune grid over TorchTrainer drivers, evaluation under three shift
grids, the report.  A rerun of the same --output must resume (skip every finished step).
"""

from __future__ import annotations

import json

import pandas as pd
from pathlib import Path

import pytest

from pipelines import config
from pipelines import tune as tune_lib
from pipelines.cli import main
from pipelines.errors import UserError
from smoke_keys import SMOKE_RUN_KEYS


def test_trial_name_is_deterministic_and_safe():
    a = tune_lib.trial_name({"name": "kldpo", "tau": 0.5, "beta": 0.1})
    b = tune_lib.trial_name({"beta": 0.1, "name": "kldpo", "tau": 0.5})
    assert a == b == "kldpo-beta_0.1-tau_0.5"
    assert "=" not in a and "/" not in tune_lib.trial_name({"name": "x", "p": "a/b"})


def _tune_config(*overrides, output="out"):
    return config.load(tune_lib.TuneConfig, None, overrides, flags={"output": output}, strict_paths=False)


def test_tune_config_splits_sweep_keys_from_train_keys():
    cfg = _tune_config("search.objectives=dpo,kldpo", "trial_eval.reward=world:w", "train.max_steps=3",
                       "model.path=m", "objective.beta=0.2")
    assert cfg.search.objectives == ["dpo", "kldpo"]
    # paths are resolved against the working directory, inside the train-config section too
    assert cfg.trial_eval.reward == f"world:{Path.cwd() / 'w'}"
    assert cfg.base == {"train": {"max_steps": 3}, "model": {"path": str(Path.cwd() / "m")}, "objective": {"beta": 0.2}}
    with pytest.raises(UserError, match="unknown config key 'search.objectivs'"):
        _tune_config("search.objectivs=dpo")


def test_tune_checks_fail_before_ray(tmp_path):
    cfg = _tune_config("search.objectives=dpo,kldpoo", "trial_eval.reward=world:w", output=str(tmp_path))
    with pytest.raises(UserError, match="unknown objective 'kldpoo'"):
        tune_lib.check_tune_config(cfg)
    cfg = _tune_config("search.objectives=dpo", output=str(tmp_path))
    with pytest.raises(UserError, match="trial_eval.reward' is required"):
        tune_lib.check_tune_config(cfg)
    cfg = _tune_config("search.objectives=kldpo", "search.overrides={kldpo: {taux: [1]}}",
                       "trial_eval.reward=pipelines.evaluate.rewards:word_count",
                       f"model.path={tmp_path}", f"data.path={tmp_path}", output=str(tmp_path))
    with pytest.raises(UserError, match="taux"):
        tune_lib.check_tune_config(cfg)


@pytest.mark.ray
@pytest.mark.slow
def test_run_smoke_end_to_end_and_resume(smoke_run, capsys):
    out = smoke_run
    args = ["run", "--output", str(out), *SMOKE_RUN_KEYS]

    pareto = pd.read_csv(out / "pareto.csv")
    assert {"trial_id", "objective", "beta", "tau", "reward", "kl", "on_front"} <= set(pareto.columns)
    assert sorted(pareto["objective"]) == ["dpo", "kldpo"]
    assert pareto["on_front"].any() and (pareto["kl"] >= 0).all()
    assert pareto["reward"].between(0, 1).all()  # world rewards are sigmoids

    rob = pd.read_csv(out / "robustness.csv")
    assert list(rob.columns[:7]) == ["trial_id", "objective", "shift", "level", "reward", "kl", "pair_accuracy"]
    mixture = rob[rob["shift"] == "mixture"]
    assert sorted(mixture["level"].unique()) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert set(rob["shift"]) == {"mixture", "label_flip", "source_mixture"}
    assert set(rob["objective"]) == {"dpo", "kldpo", "reference"}
    ref_kl = rob.loc[rob["objective"] == "reference", "kl"]
    assert (ref_kl.abs() < 1e-9).all()  # the reference against itself: exact KL 0

    for name in ("pareto.png", "robustness.png", "report.md", "run_config.yaml"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "worst-case reward" in report and "Hypervolume" in report
    # Where the time went: every stage's timings.json, nested in the run's, and a table in the report.
    timings = json.loads((out / "timings.json").read_text())
    assert list(timings["phases"]) == ["world", "data", "sweep", "evaluate", "report"]
    assert sum(timings["phases"].values()) <= timings["total_seconds"] + 1e-3
    trials = timings["children"]["sweep"]["children"]
    assert sorted(trials) == ["dpo-beta_0.1", "kldpo-beta_0.1-tau_0.5"]
    for trial in trials.values():
        assert {"validate", "data", "worker start", "worker setup", "worker steps", "worker checkpoints",
                "Ray Train start-up (controller, worker group)", "sampling and scoring"} <= set(trial["phases"])
        assert trial["phases"]["worker steps"] > 0 and trial["phases"]["sampling and scoring"] > 0
    assert "sampling and scoring" in timings["children"]["evaluate"]["phases"]
    for stage in ("world", "data", "evaluation"):
        assert json.loads((out / stage / "timings.json").read_text())["total_seconds"] > 0, stage
    assert "## Where the time went" in report and "| sweep |" in report and "| worker steps |" in report

    trial_dirs = sorted(p.name for p in (out / "sweep" / "trials").iterdir())
    assert trial_dirs == ["dpo-beta_0.1", "kldpo-beta_0.1-tau_0.5"]
    row = json.loads((out / "sweep" / "trials" / "dpo-beta_0.1" / "trial_result.json").read_text())
    assert row["step"] == 2 and row["objective"] == "dpo"

    # Rerun: world, data and every trial are reused (trial_result.json is not rewritten).
    stamp = (out / "sweep" / "trials" / "dpo-beta_0.1" / "trial_result.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "world: already generated" in printed and "data: already prepared" in printed
    assert (out / "sweep" / "trials" / "dpo-beta_0.1" / "trial_result.json").stat().st_mtime_ns == stamp


@pytest.mark.ray
@pytest.mark.slow
def test_tune_with_a_failing_trial_exits_1_names_it_and_tracks_the_rest(ray_session, tmp_path, tiny_model_dir,
                                                                        pairs_dataset, capsys):
    """dpo_pl cannot train on pairs: its trial fails inside Tune (the up-front checks validate the first
    objective's data only), so tune writes what finished, names the failure and its error file, and
    exits 1.  The finished trial's metrics reach MLflow and TensorBoard exactly as in its metrics.csv."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "sweep"
    args = ["tune", "--output", str(out), f"model.path={tiny_model_dir}", f"data.path={pairs_dataset}",
            "search.objectives=dpo,dpo_pl", "trial_eval.reward=pipelines.evaluate.rewards:word_count",
            "train.max_steps=3", "train.batch_size=8", "train.checkpoint_every=1", "trial_eval.num_prompts=2",
            "trial_eval.samples_per_prompt=1", "tracking=mlflow,tensorboard"]
    capsys.readouterr()
    assert main(args) == 1
    printed = capsys.readouterr().out
    failed = [line for line in printed.splitlines() if "FAILED" in line]
    assert len(failed) == 1 and "dpo_pl-beta_0.1" in failed[0] and "is listwise" in failed[0], printed
    error_file = out / "trials" / "dpo_pl-beta_0.1" / "error.txt"
    full = error_file.read_text()  # the whole remote traceback, down to the line that raised
    assert str(error_file) in failed[0] and "in inspect_dataset" in full and "is listwise" in full.splitlines()[-1]
    trials = pd.read_csv(out / "trials.csv")
    assert list(trials["objective"]) == ["dpo"]

    metrics = pd.read_csv(out / "trials" / "dpo-beta_0.1" / "metrics.csv")
    assert list(metrics["step"]) == [1, 2, 3]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    dpo_run = next(r for r in runs if r.data.params.get("objective/name") == "dpo")
    steps = {int(m.value): m.step for m in client.get_metric_history(dpo_run.info.run_id, "step")}
    for column in ("loss", "rewards/margins", "eval/loss", "grad_norm"):
        logged = {m.step: m.value for m in client.get_metric_history(dpo_run.info.run_id, column)}
        assert [logged[steps[s]] for s in metrics["step"]] == pytest.approx(list(metrics[column]), rel=1e-12)
    assert any(r.info.run_name == "sweep-report" for r in runs)  # trials.csv + Pareto as artifacts

    events = next((out / "tune").rglob("dpo-beta_0.1/events.out.tfevents*"))
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    by_iteration = {int(e.value): e.step for e in accumulator.Scalars("ray/tune/step")}
    tb_loss = {e.step: e.value for e in accumulator.Scalars("ray/tune/loss")}
    assert [tb_loss[by_iteration[s]] for s in metrics["step"]] == pytest.approx(list(metrics["loss"]), rel=1e-6)
