"""The sweep report: tables, rules (worked by hand), and the files write_report produces."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines import pareto
from pipelines.report import (
    ROBUSTNESS_COLUMNS,
    area_under_curve,
    build_pareto_table,
    build_robustness_table,
    robustness_panels,
    shift_metric,
    write_pareto,
    write_report,
)


def _trials() -> pd.DataFrame:
    return pd.DataFrame([
        {"trial_id": "a", "objective": "dpo", "tau": np.nan, "reward": 0.9, "kl": 3.0},
        {"trial_id": "b", "objective": "kldpo", "tau": 0.5, "reward": 0.8, "kl": 2.0},
        {"trial_id": "c", "objective": "kldpo", "tau": 1.0, "reward": 0.7, "kl": 2.5},  # dominated by b
    ])


def _robustness() -> pd.DataFrame:
    """Mixture reward curves over alpha in {0, .5, 1} and flat-reward label flips at eps in {0, .4}.

    dpo:   mixture 0.9, 0.6, 0.2   -> worst 0.2, mean over all 5 rows (0.9+0.6+0.2+0.9+0.9)/5 = 0.70
    kldpo b: 0.8, 0.7, 0.5         -> worst 0.5, mean (0.8+0.7+0.5+0.8+0.8)/5 = 0.72
    kldpo c: 0.7, 0.6, 0.5         -> worst 0.5 (tie with b), mean 0.64 -> b wins on the average
    """
    rows = []
    for trial, curve in {"a": (0.9, 0.6, 0.2), "b": (0.8, 0.7, 0.5), "c": (0.7, 0.6, 0.5)}.items():
        for level, r in zip((0.0, 0.5, 1.0), curve):
            rows.append({"trial_id": trial, "shift": "mixture", "level": level, "reward": r, "kl": 1.0,
                         "pair_accuracy": 0.6 + 0.1 * r})
        for level, acc in zip((0.0, 0.4), (0.8, 0.6)):
            rows.append({"trial_id": trial, "shift": "label_flip", "level": level, "reward": curve[0], "kl": 1.0,
                         "pair_accuracy": acc, "margin": 0.1})
    return pd.DataFrame(rows)


def test_area_under_curve_by_hand():
    """Trapezoids on [0, .5] and [.5, 1] of (1, 0, 1): 0.5 * 0.5 + 0.5 * 0.5 = 0.5; order-free."""
    assert area_under_curve([0.0, 0.5, 1.0], [1.0, 0.0, 1.0]) == pytest.approx(0.5)
    assert area_under_curve([1.0, 0.0, 0.5], [1.0, 1.0, 0.0]) == pytest.approx(0.5)
    assert np.isnan(area_under_curve([0.0], [1.0]))


def test_pareto_table_columns_and_front():
    table = build_pareto_table(_trials())
    assert list(table.columns) == ["trial_id", "objective", "tau", "reward", "kl", "on_front"]
    assert table["on_front"].tolist() == [True, True, False]
    with pytest.raises(ValueError, match="trial_id 'a' appears twice"):
        build_pareto_table(pd.concat([_trials(), _trials().iloc[:1]]))
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['kl'\]"):
        build_pareto_table(_trials().drop(columns="kl"))


def test_robustness_table_joins_objective_and_keeps_extras():
    table = build_robustness_table(_robustness(), _trials())
    assert list(table.columns[: len(ROBUSTNESS_COLUMNS)]) == list(ROBUSTNESS_COLUMNS)
    assert "margin" in table.columns and set(table["objective"]) == {"dpo", "kldpo"}
    with pytest.raises(ValueError, match="trial 'zz', which is not in the trials table"):
        build_robustness_table(pd.DataFrame([{"trial_id": "zz", "shift": "m", "level": 0.0}]), _trials())
    no_reward = build_robustness_table(_robustness().drop(columns="reward"), _trials())
    assert no_reward["reward"].isna().all()  # reported as missing, not dropped


def test_selection_rule_and_shift_metrics():
    from pipelines.study import Study

    rob = build_robustness_table(_robustness(), _trials())
    study = Study(_trials(), rob, ["tau"], train_alpha=0.1)
    per_trial = study.per_trial.set_index("trial_id")
    assert per_trial.loc["a", "worst_reward"] == pytest.approx(0.2)
    # J(0.1) on the grid 0, .5, 1 of a: 0.9 + 0.1 / 0.5 * (0.6 - 0.9) = 0.84; AUC .25 * (.9 + .6) + .25 * (.6 + .2)
    assert per_trial.loc["a", "train_reward"] == pytest.approx(0.84)
    assert per_trial.loc["a", "mixture_auc"] == pytest.approx(0.575)
    # No validation prompts: the oracle rule; b and c tie on worst (0.5) and KL -> the setting name
    assert study.rule == "oracle"
    assert dict(zip(study.selected["objective"], study.selected["setting"])) == {"dpo": "dpo", "kldpo": "kldpo tau=0.5"}
    assert shift_metric(rob, "mixture") == "reward" and shift_metric(rob, "label_flip") == "pair_accuracy"
    assert robustness_panels(rob) == [("mixture", "reward"), ("mixture", "pair_accuracy"),
                                      ("label_flip", "pair_accuracy")]


def test_write_report_files(tmp_path):
    import matplotlib.image

    paths = write_report(_trials(), _robustness(), tmp_path / "report", train_levels={"mixture": 0.1})
    front = pd.read_csv(paths.pareto_csv)
    assert list(front.columns) == ["trial_id", "objective", "tau", "reward", "kl", "on_front"]
    rob = pd.read_csv(paths.robustness_csv)
    assert list(rob.columns[:7]) == list(ROBUSTNESS_COLUMNS) and len(rob) == 15
    for png in (paths.pareto_png, paths.robustness_png):
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    text = paths.report_md.read_text()
    points = _trials()[["reward", "kl"]].to_numpy()
    ref = pareto.default_reference_point(points)
    assert f"{pareto.hypervolume(points, ref):.6g}" in text
    # The worst-case table is sorted by worst-case reward: kldpo (0.5) above dpo (0.2); one seed: no interval.
    table_lines = [line for line in text.splitlines() if line.startswith("| kldpo") or line.startswith("| dpo")]
    assert [line.split("|")[1].strip() for line in table_lines[:2]] == ["kldpo", "dpo"]
    assert "| kldpo | kldpo tau=0.5 | 1 | 0.500 |" in text
    assert "Selection (oracle)" in text
    assert "![pareto](pareto.png)" in text and "![robustness](robustness.png)" in text


def test_write_pareto_alone_and_the_reference_baseline(tmp_path):
    table, ref, volume = write_pareto(_trials(), tmp_path / "sweep")
    assert (tmp_path / "sweep" / "pareto.csv").is_file() and (tmp_path / "sweep" / "pareto.png").is_file()
    assert volume == pytest.approx(pareto.hypervolume(_trials()[["reward", "kl"]].to_numpy(), ref))
    assert table["on_front"].tolist() == [True, True, False]
    # The untrained reference ties every pair: its pair accuracy stays in the CSV but is n/a in the table.
    rob = pd.concat([_robustness().assign(objective=lambda d: d["trial_id"].map({"a": "dpo", "b": "kldpo", "c": "kldpo"})),
                     pd.DataFrame([{"trial_id": "ref", "objective": "reference", "shift": "mixture", "level": 0.0,
                                    "reward": 0.4, "kl": 0.0, "pair_accuracy": 0.0}])])
    paths = write_report(_trials(), rob, tmp_path / "full")
    assert pd.read_csv(paths.robustness_csv).query("trial_id == 'ref'")["pair_accuracy"].tolist() == [0.0]
    assert "| reference | reference | 1 | 0.400 |" in paths.report_md.read_text()


def test_write_report_with_seeds_gives_intervals_and_dpo_at_matched_kl(tmp_path):
    """Two seeds.  Worst cases: reference .5 (KL 0); dpo beta=1 .4/.3 (KL 1); dpo beta=0.1 .1/.2 (KL 3);
    kldpo .30/.35 (KL 2) -> DPO's frontier at KL 2 is .25 on both seeds -> +.05/+.10, mean +.075."""
    worst = {("dpo", 1.0, 0): (0.4, 1.0), ("dpo", 1.0, 1): (0.3, 1.0), ("dpo", 0.1, 0): (0.1, 3.0),
             ("dpo", 0.1, 1): (0.2, 3.0), ("kldpo", 0.1, 0): (0.30, 2.0), ("kldpo", 0.1, 1): (0.35, 2.0)}
    trials, rows = [], []
    for (objective, beta, seed), (value, kl) in worst.items():
        trial = f"{objective}-{beta}-{seed}"
        trials.append({"trial_id": trial, "objective": objective, "beta": beta, "seed": seed, "reward": value, "kl": kl})
        rows += [{"trial_id": trial, "shift": "mixture", "level": a, "reward": r, "kl": kl, "pair_accuracy": 0.6}
                 for a, r in ((0.0, 0.9), (1.0, value))]
    rows += [{"trial_id": "ref", "objective": "reference", "shift": "mixture", "level": a, "reward": r, "kl": 0.0,
              "pair_accuracy": 0.0} for a, r in ((0.0, 0.9), (1.0, 0.5))]
    trials = pd.DataFrame(trials)
    rob = pd.DataFrame(rows).assign(objective=lambda d: d["trial_id"].map(
        dict(zip(trials["trial_id"], trials["objective"]))).fillna("reference"))
    paths = write_report(trials, rob, tmp_path, hyperparameter_cols=["beta"], train_levels={"mixture": 0.1})
    settings = pd.read_csv(tmp_path / "settings.csv").set_index("setting")
    assert settings.loc["kldpo beta=0.1", "n"] == 2
    assert settings.loc["kldpo beta=0.1", "vs_dpo_worst_reward"] == pytest.approx(0.075)
    assert settings.loc["kldpo beta=0.1", "vs_dpo_worst_reward_verdict"] == "inconclusive"
    assert np.isnan(settings.loc["dpo beta=1", "vs_dpo_worst_reward"])  # DPO is the frontier itself
    assert settings.loc["dpo beta=1", "selected"]  # the better worst case of DPO's two betas (oracle rule here)
    text = paths.report_md.read_text()
    mean, lo, hi, _ = __import__("pipelines.study", fromlist=["t"]).t_interval([0.30, 0.35])
    assert f"| kldpo | kldpo beta=0.1 | 2 | {mean:.3f} [{lo:.3f}, {hi:.3f}] |" in text
    assert "## Against DPO's beta frontier at matched KL" in text and "+0.075 [" in text
    assert len(pd.read_csv(tmp_path / "trial_metrics.csv")) == 7
