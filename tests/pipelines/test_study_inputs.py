"""What the study needs from the stages: seeded trials, validation prompts, DoRA's calibration
columns, scenarios and DPO's frontier in the sweep (no Ray)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from pipelines import config as config_lib
from pipelines.data import formats, shifts
from pipelines.errors import UserError
from pipelines.evaluate import summarise_levels, validation_prompts


# [1] Seeds in the sweep ----------------------------------------------------------------------------


def test_seeded_trials_are_named_and_trained_with_their_seed(tmp_path):
    from pipelines.tune import SearchConfig, TuneConfig, trial_name, trial_train_config

    section = {"name": "kldpo", "beta": 0.1, "tau": 0.5}
    assert trial_name(section) == "kldpo-beta_0.1-tau_0.5"
    assert trial_name(section, 2) == "kldpo-beta_0.1-tau_0.5-seed_2"
    cfg = TuneConfig(output=str(tmp_path), base={"model": {"path": "m"}, "data": {"path": "d"}, "train": {"seed": 10}})
    assert trial_train_config(cfg, section, tmp_path / "t", 2).train.seed == 12  # base seed + repetition
    assert trial_train_config(cfg, section, tmp_path / "t").train.seed == 10
    with pytest.raises(config_lib.FieldError, match="needs search.search=grid"):
        SearchConfig(seeds=3, search="optuna")
    with pytest.raises(config_lib.FieldError):
        SearchConfig(seeds=0)


# [2] Validation prompts in evaluation --------------------------------------------------------------


def test_validation_prompts_are_a_fixed_exact_split():
    prompts = [f"t{i:02d} t{j:02d}" for i in range(8) for j in range(4)]  # 32 distinct
    held = validation_prompts(prompts, 0.5)
    assert len(held) == 16 and held <= set(prompts)
    assert validation_prompts(list(reversed(prompts)) + prompts[:5], 0.5) == held  # order and repeats aside
    assert validation_prompts(prompts, 0.0) == set()
    assert validation_prompts(prompts, 0.25) < held or len(validation_prompts(prompts, 0.25)) == 8


def test_summarise_levels_reports_test_prompts_and_validation_apart():
    """Prompt p (validation) has reward 1, q and r (test) rewards .2 and .4; the level's rows hold p, q, q, r."""
    samples = pd.DataFrame({
        "trial_id": ["m"] * 6, "prompt": ["p", "p", "q", "q", "r", "r"], "kl": [1.0, 1.0, 2.0, 2.0, 4.0, 4.0],
        "kl_mc": [0.0] * 6, "reward_base": [1.0, 1.0, 0.2, 0.2, 0.4, 0.4],
        "prompt_set": ["validation", "validation", "test", "test", "test", "test"]})
    rows = pd.DataFrame({"prompt": ["p", "q", "q", "r"], "ckpt0_chosen_logps": [0.0] * 4,
                         "ckpt0_rejected_logps": [-1.0] * 4, "ref_chosen_logps": [0.0] * 4,
                         "ref_rejected_logps": [0.0] * 4})
    out = summarise_levels([("m", "path")], [("none", 0.0, "")], {("none", ""): rows}, samples,
                           {("none", ""): "reward_base"}, beta=0.1).iloc[0]
    assert out["reward"] == pytest.approx((0.2 + 0.2 + 0.4) / 3)  # q twice, r once; p left out
    assert out["kl"] == pytest.approx((2 + 2 + 4) / 3) and out["n_prompts"] == 2
    assert out["val_reward"] == pytest.approx(1.0) and out["val_kl"] == pytest.approx(1.0)
    assert out["pair_accuracy"] == 1.0  # pair metrics use every pair


# [3] DoRA's calibration: the columns, the choice, and the recomputation under a source shift -------


def test_formats_pass_calibration_oracle_and_p_target_through():
    record = {"prompt": "a", "chosen": "b", "rejected": "c", "calibration": 0.9, "calibration_oracle": 1.1,
              "p_target_chosen": 0.8, "p_target_rejected": 0.5}
    out = formats._extras(record, None)
    assert out == {"calibration": 0.9, "calibration_oracle": 1.1, "p_target_chosen": 0.8, "p_target_rejected": 0.5}
    with pytest.raises(formats.RowError, match=r"must be in \[0, 1\]"):
        formats._extras({**record, "p_target_chosen": 1.5}, None)
    with pytest.raises(formats.RowError, match="required because p_target_chosen is present"):
        formats._extras({k: v for k, v in record.items() if k != "p_target_rejected"}, None)
    assert formats._extras({"p_target": [0.1, 0.9, 0.5], "calibration_oracle": [1, 2, 3]}, 3) == {
        "p_target": [0.1, 0.9, 0.5], "calibration_oracle": [1.0, 2.0, 3.0]}


def test_source_shift_recomputes_calibration_for_the_new_mix():
    """h~ = 1 / (A + (1 - A)(1 - p)/p) at A = .25: p = .8 -> 1 / (.25 + .1875) = 2.2857..., p = .5 -> 1."""
    table = pa.table({"row_id": ["a", "b"], "source": ["target", "synthetic"], "calibration": [9.0, 9.0],
                      "p_target_chosen": [0.8, 0.5], "p_target_rejected": [0.5, 0.5]})
    out = shifts.resample_sources(table, target=0.25, recalibrate=True, column="source",
                                  rates={"target": 1.0, "other": 1.0}, key_map={"target": "target"},
                                  sampling="thin", seed=0, tag="t")
    assert out.column("calibration").to_pylist() == pytest.approx([0.5 * (1 / 0.4375 + 1.0), 1.0])
    kept = shifts.resample_sources(table, target=0.25, recalibrate=False, column="source",
                                   rates={"target": 1.0, "other": 1.0}, key_map={"target": "target"},
                                   sampling="thin", seed=0, tag="t")
    assert kept.column("calibration").to_pylist() == [9.0, 9.0]
    assert shifts.dora_calibration([1.0], 0.5)[0] == pytest.approx(1 / (0.5 + 0.5 * 1e-6 / (1 - 1e-6)))  # clipped


def test_objective_calibration_picks_the_column(tmp_path):
    from pipelines.train import _calibration_column
    from pipelines.train.config import build_train_config, resolve_objective_config, train_config_to_dict

    table = pa.table({"chosen_input_ids": [[1], [2]], "calibration": [0.5, 2.0], "calibration_oracle": [1.5, 0.5]})
    base = {"model": {"path": "m"}, "data": {"path": "d"}, "output": str(tmp_path)}
    for source, expected in (("calibration", [0.5, 2.0]), ("calibration_oracle", [1.5, 0.5]), ("one", [1.0, 1.0])):
        cfg = build_train_config({**base, "objective": {"name": "dora", "calibration": source}})
        out = _calibration_column(table, cfg)
        assert out.column("calibration").to_pylist() == expected and "calibration_oracle" not in out.column_names
        assert build_train_config(train_config_to_dict(cfg)) == cfg  # the key survives config.yaml
    with pytest.raises(UserError, match="objective 'dpo' takes no calibration"):
        resolve_objective_config({"name": "dpo", "calibration": "calibration_oracle"})
    dpo = build_train_config({**base, "objective": {"name": "dpo"}})
    assert "calibration" not in train_config_to_dict(dpo)["objective"]


def test_tune_spaces_sweep_calibration_and_risk_variants():
    import tune_spaces

    points = tune_spaces.list_grid_points("dora", overrides={"calibration": ["calibration", "one"], "lam": [1.0, 5.0]})
    assert [(p["lam"], p["calibration"]) for p in points] == [(1.0, "calibration"), (1.0, "one"),
                                                             (5.0, "calibration"), (5.0, "one")]
    risks = tune_spaces.list_grid_points("radpo2", overrides={"risk": ["cvar", "erm"]})
    assert [(p["risk"], p["mu"]) for p in risks] == [("cvar", 0.95), ("erm", 5.0)]  # each variant's own mu grid
    with pytest.raises(ValueError, match="has no hyperparameter 'calibration'"):
        tune_spaces.list_grid_points("dpo", overrides={"calibration": "one"})


# [4] Scenarios and DPO's frontier in `run` ---------------------------------------------------------


def _run_config(*overrides):
    from pipelines.run import load_run_config

    return load_run_config(None, list(overrides), "runs/x")


def test_scenarios_set_their_keys_and_user_keys_win():
    from pipelines.run import sweep_config

    mixture = _run_config("scenario=mixture")
    assert mixture.synth.judge_bias == 0.0 and mixture.run.grid == ["mixture:alpha=0:1:6"]
    assert mixture.search.objectives == ["dpo", "kldpo", "wdpo"]
    noisy = _run_config("scenario=label_noise", "synth.label_noise=0.3")
    assert noisy.synth.label_noise == 0.3
    assert noisy.search.overrides["rdpo"] == {"label_smoothing": 0.3}  # rDPO gets the true rate
    mine = _run_config("scenario=mixture", "search.objectives=[dpo,kldpo]", "search.overrides.kldpo.tau=2.0")
    assert mine.search.overrides == {"kldpo": {"tau": 2.0}}  # wdpo's scenario grid left with wdpo
    with pytest.raises(UserError, match="unknown scenario 'nope'; valid: mixture, source, label_noise, token_risk"):
        _run_config("scenario=nope")
    source = sweep_config(_run_config("scenario=source"), __import__("pathlib").Path("runs/x"), "world:w")
    dora = [s for s in __import__("pipelines.tune", fromlist=["x"]).grid_sections(source) if s["name"] == "dora"]
    assert len(dora) == 6 and {s["calibration"] for s in dora} == {"calibration", "calibration_oracle", "one"}


def test_frontier_betas_join_dpo_grid():
    from pipelines.run import frontier_search
    from pipelines.tune import SearchConfig

    search = frontier_search(SearchConfig(objectives=["kldpo"]), [0.3, 0.03])
    assert search.objectives == ["dpo", "kldpo"] and search.overrides["dpo"]["beta"] == [0.03, 0.1, 0.3]
    own = frontier_search(SearchConfig(objectives=["dpo"], overrides={"dpo": {"beta": 0.5}}), [0.3])
    assert own.overrides["dpo"]["beta"] == [0.3, 0.5]
    assert frontier_search(SearchConfig(objectives=["dpo"]), []) == SearchConfig(objectives=["dpo"])
    cfg = _run_config("study.world_seeds=[3,4]", "search.seeds=2")
    assert cfg.study.world_seeds == [3, 4] and cfg.search.seeds == 2
    assert cfg.evaluate.generation.validation_fraction == 0.5  # run always holds out validation prompts


def test_the_scenario_key_lists_every_scenario():
    import typing

    from pipelines.run import RunConfig
    from pipelines.scenarios import SCENARIOS

    choices = typing.get_args(typing.get_type_hints(RunConfig)["scenario"])
    assert set(choices) == {"", *SCENARIOS}
