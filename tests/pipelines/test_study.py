"""Seeds, intervals, the selection rule and DPO's frontier at matched KL (pipelines/study.py), worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from pipelines import study
from pipelines.study import Study

T_975_2DOF = 4.302652729911275  # t_{0.975, 2}, from a t table
T_975_1DOF = 12.706204736174707  # t_{0.975, 1}


def test_t_interval_by_hand():
    # [1, 2, 3]: mean 2, s = 1, half width t_{.975,2} * 1 / sqrt(3)
    mean, lo, hi, n = study.t_interval([1.0, 2.0, 3.0])
    half = T_975_2DOF / math.sqrt(3)
    assert (mean, n) == (2.0, 3) and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    # NaN and None are not seeds; one value has no interval; none has no mean
    assert study.t_interval([5.0, float("nan"), None])[0] == 5.0
    assert math.isnan(study.t_interval([5.0])[1]) and study.t_interval([5.0])[3] == 1
    assert math.isnan(study.t_interval([])[0]) and study.t_interval([])[3] == 0
    # a constant sample: a zero-width interval
    assert study.t_interval([0.3, 0.3])[1:3] == pytest.approx((0.3, 0.3))


def test_verdict_rule():
    assert study.verdict(0.01, 0.2, 5) == "holds"
    assert study.verdict(-0.2, -0.01, 5) == "does not hold"
    assert study.verdict(-0.1, 0.1, 5) == "inconclusive"
    assert study.verdict(0.1, 0.2, 1) == "inconclusive"  # one seed proves nothing
    assert study.verdict(float("nan"), float("nan"), 3) == "inconclusive"


def test_frontier_interpolates_and_never_extrapolates():
    kls, values = [0.0, 1.0, 3.0], [0.5, 0.4, 0.1]
    assert study.frontier_at(kls, values, 2.0) == pytest.approx(0.4 + 0.5 * (0.1 - 0.4))  # 0.25
    assert study.frontier_at(kls, values, 1.0) == pytest.approx(0.4)
    assert math.isnan(study.frontier_at(kls, values, 3.5)) and math.isnan(study.frontier_at(kls, values, -0.1))
    # two points at one KL are averaged: (0, .5) and (1, mean(.2, .4) = .3) -> .4 at KL .5
    assert study.frontier_at([0.0, 1.0, 1.0], [0.5, 0.2, 0.4], 0.5) == pytest.approx(0.4)


def _per_trial() -> pd.DataFrame:
    """Two training seeds of one world.  DPO at two betas, the reference (KL 0) and a kldpo setting.

    seed 0: frontier (0, .5) (1, .4) (3, .1); kldpo at KL 2 -> frontier .25, worst .30 -> diff +.05
    seed 1: frontier (0, .5) (1, .3) (3, .2); kldpo at KL 2 -> frontier .25, worst .35 -> diff +.10
    kldpo tau=9 at KL 4 on seed 0: beyond DPO's largest KL -> no frontier (NaN)
    """
    rows = [
        ("r", "reference", "reference", "0:*", 0.0, 0.5),
        ("d1s0", "dpo", "dpo beta=1", "0:0", 1.0, 0.4), ("d3s0", "dpo", "dpo beta=0.1", "0:0", 3.0, 0.1),
        ("d1s1", "dpo", "dpo beta=1", "0:1", 1.0, 0.3), ("d3s1", "dpo", "dpo beta=0.1", "0:1", 3.0, 0.2),
        ("k0", "kldpo", "kldpo tau=1", "0:0", 2.0, 0.30), ("k1", "kldpo", "kldpo tau=1", "0:1", 2.0, 0.35),
        ("far", "kldpo", "kldpo tau=9", "0:0", 4.0, 0.9),
    ]
    return pd.DataFrame(rows, columns=["trial_id", "objective", "setting", "unit", "kl", "worst_reward"])


def test_matched_kl_differences_are_paired_per_seed():
    diffs = study.matched_kl_differences(_per_trial(), "worst_reward").set_index("trial_id")
    assert set(diffs.index) == {"k0", "k1", "far"}  # DPO and the reference are the frontier itself
    assert diffs.loc["k0", "frontier"] == pytest.approx(0.25) and diffs.loc["k0", "diff"] == pytest.approx(0.05)
    assert diffs.loc["k1", "diff"] == pytest.approx(0.10)
    assert math.isnan(diffs.loc["far", "diff"])
    summary = study.difference_summary(study.matched_kl_differences(_per_trial(), "worst_reward"))
    half = T_975_1DOF * np.std([0.05, 0.10], ddof=1) / math.sqrt(2)
    assert summary["kldpo tau=1"]["mean"] == pytest.approx(0.075)
    assert summary["kldpo tau=1"]["lo"] == pytest.approx(0.075 - half)
    assert summary["kldpo tau=1"]["verdict"] == "inconclusive"  # 2 seeds: t = 12.7
    assert summary["kldpo tau=9"]["n"] == 0


def test_paired_differences_against_one_setting():
    diffs = study.paired_differences(_per_trial(), "worst_reward", "dpo beta=1")
    kl = diffs[diffs["setting"] == "kldpo tau=1"].set_index("unit")["diff"]
    assert kl.to_dict() == pytest.approx({"0:0": 0.30 - 0.4, "0:1": 0.35 - 0.3})
    ref = diffs[diffs["setting"] == "reference"].set_index("unit")["diff"]  # the reference pairs with each seed
    assert ref.to_dict() == pytest.approx({"0:0": 0.5 - 0.4, "0:1": 0.5 - 0.3})


def _rob(curves: dict, val_curves: dict | None = None) -> pd.DataFrame:
    rows = []
    for trial, curve in curves.items():
        for level, reward in zip((0.0, 0.5, 1.0), curve):
            row = {"trial_id": trial, "shift": "mixture", "level": level, "reward": reward, "kl": 1.0}
            if val_curves:
                row |= {"val_reward": val_curves[trial][int(level * 2)], "val_kl": 1.0}
            rows.append(row)
    return pd.DataFrame(rows)


def test_selection_uses_validation_prompts_never_the_reported_numbers():
    trials = pd.DataFrame([
        {"trial_id": "a", "objective": "kldpo", "tau": 0.5, "seed": 0},
        {"trial_id": "b", "objective": "kldpo", "tau": 1.0, "seed": 0},
    ])
    test = {"a": (0.9, 0.8, 0.7), "b": (0.9, 0.6, 0.5)}  # on test prompts a is better (worst .7 vs .5)
    val = {"a": (0.9, 0.8, 0.4), "b": (0.9, 0.6, 0.5)}  # on validation prompts b is (.5 vs .4)
    rob = _rob(test, val).assign(objective="kldpo")
    honest = Study(trials, rob, ["tau"])
    assert honest.rule == "validation"
    assert honest.selected["setting"].tolist() == ["kldpo tau=1"]
    assert honest.selected["worst_reward"].tolist() == pytest.approx([0.5])  # reported: its test number
    assert honest.oracle["setting"].tolist() == ["kldpo tau=0.5"]  # the labelled oracle column
    oracle = Study(trials, _rob(test).assign(objective="kldpo"), ["tau"])
    assert oracle.rule == "oracle" and oracle.selected["setting"].tolist() == ["kldpo tau=0.5"]


def test_settings_aggregate_over_seeds_and_worlds():
    trials = pd.DataFrame([
        {"trial_id": f"w{w}.s{s}", "objective": "dpo", "beta": 0.1, "seed": s, "world_seed": w}
        for w in (0, 1) for s in (0, 1)
    ])
    worst = {"w0.s0": 0.1, "w0.s1": 0.2, "w1.s0": 0.3, "w1.s1": 0.4}
    rob = pd.concat([_rob({t: (0.9, 0.9, v)}) for t, v in worst.items()]).assign(objective="dpo")
    result = Study(trials, rob, ["beta"], train_alpha=0.5)
    assert set(result.per_trial["unit"]) == {"0:0", "0:1", "1:0", "1:1"}
    row = result.settings.iloc[0]
    mean, lo, hi, n = study.t_interval(list(worst.values()))
    assert (row["setting"], row["n"]) == ("dpo beta=0.1", 4)
    assert (row["worst_reward"], row["worst_reward_lo"], row["worst_reward_hi"]) == pytest.approx((mean, lo, hi))
    assert row["train_reward"] == pytest.approx(0.9)  # J(0.5) is a grid level
    table = result.settings_table()
    assert table["selected"].tolist() == [True] and table["rule"].tolist() == ["oracle"]


def test_trial_metrics_by_hand():
    rob = _rob({"a": (0.9, 0.6, 0.2)}).assign(objective="dpo")
    rob = pd.concat([rob, pd.DataFrame([{"trial_id": "a", "shift": "label_flip", "level": 0.2, "reward": 0.95,
                                          "kl": 7.0, "objective": "dpo"}])])
    m = study.trial_metrics(rob, train_alpha=0.1).iloc[0]
    assert m["worst_reward"] == pytest.approx(0.2)
    assert m["mixture_auc"] == pytest.approx(0.25 * (0.9 + 0.6) + 0.25 * (0.6 + 0.2))
    assert m["train_reward"] == pytest.approx(0.9 + 0.2 * (0.6 - 0.9))  # J linear between 0 and .5
    assert m["kl"] == pytest.approx(1.0)  # the mixture rows' KL, not a resampled level's


def test_kl_tail_by_hand():
    samples = pd.DataFrame({"trial_id": ["a"] * 20, "kl": np.arange(20, dtype=float)})
    tail = study.kl_tail(samples).iloc[0]
    q = np.quantile(np.arange(20.0), 0.95)  # 18.05
    assert tail["kl_p95"] == pytest.approx(q) and tail["kl_cvar95"] == pytest.approx(19.0)
