"""benchmarks/claims.py: the claims table's arithmetic on hand-made runs, and a 1-seed smoke of every
scenario through the product's own command (slow tier)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import claims

ROOT = Path(__file__).resolve().parents[1]


def _run() -> tuple[pd.DataFrame, pd.DataFrame]:
    """One world, seeds 0 and 1: DPO at beta 1 (KL 1) and 0.1 (KL 3), the reference, two DoRA settings.

    DPO's frontier on each seed passes through (0, .5), (1, .4), (3, .1) and (0, .5), (1, .3), (3, .2).
    dora lam=1 at KL 2: metric .30 / .35 -> frontier .25 / .25 -> +.05 / +.10 (mean .075)
    dora lam=1000 at KL 2: metric .20 / .30 -> paired with lam=1: +.10 / +.05
    """
    rows = [
        ("r", "reference", "reference", "0:*", 0.0, 0.5),
        ("a", "dpo", "dpo beta=1", "0:0", 1.0, 0.4), ("b", "dpo", "dpo beta=0.1", "0:0", 3.0, 0.1),
        ("c", "dpo", "dpo beta=1", "0:1", 1.0, 0.3), ("d", "dpo", "dpo beta=0.1", "0:1", 3.0, 0.2),
        ("e", "dora", "dora beta=0.1, calibration=calibration, lam=1", "0:0", 2.0, 0.30),
        ("f", "dora", "dora beta=0.1, calibration=calibration, lam=1", "0:1", 2.0, 0.35),
        ("g", "dora", "dora beta=0.1, calibration=calibration, lam=1000", "0:0", 2.0, 0.20),
        ("h", "dora", "dora beta=0.1, calibration=calibration, lam=1000", "0:1", 2.0, 0.30),
    ]
    per_trial = pd.DataFrame(rows, columns=["trial_id", "objective", "setting", "unit", "kl", "train_reward"])
    settings = per_trial.groupby(["objective", "setting"], as_index=False).size().assign(
        selected=lambda d: d["setting"].isin(["dpo beta=1", "reference", "dora beta=0.1, calibration=calibration, lam=1"]))
    return settings, per_trial


def test_setting_labels_parse_and_match():
    assert claims.setting_values("dora beta=0.1, calibration=one, lam=1") == {
        "objective": "dora", "beta": 0.1, "calibration": "one", "lam": 1.0}
    settings, _ = _run()
    assert claims.find_setting(settings, {"objective": "dora", "lam": 1000.0}).endswith("lam=1000")
    assert claims.find_setting(settings, {"objective": "dora", "selected": True}).endswith("lam=1")
    assert claims.find_setting(settings, {"objective": "dora"}) is None  # two match: not one setting
    assert claims.find_setting(settings, {"objective": "wdpo"}) is None


def test_measure_against_the_frontier_and_a_setting_with_its_direction():
    settings, per_trial = _run()
    up = claims.Claim("p", "source", "higher", "train_reward", {"objective": "dora", "lam": 1.0})
    row = claims.measure(up, settings, per_trial)
    assert row["mean"] == pytest.approx(0.075) and row["n"] == 2 and row["verdict"] == "inconclusive"
    assert row["against"] == "DPO's beta frontier at matched KL"
    paired = claims.Claim("p", "source", "x", "train_reward", {"objective": "dora", "lam": 1.0},
                          {"objective": "dora", "lam": 1000.0})
    row = claims.measure(paired, settings, per_trial)
    assert row["mean"] == pytest.approx(0.075) and row["against"].endswith("same seeds")
    # A constant difference has a zero-width interval: the verdict follows the claim's direction.
    per_trial.loc[per_trial["trial_id"] == "f", "train_reward"] = 0.40  # +.10 vs lam=1000 on both seeds
    for direction, verdict in ((1, "holds"), (-1, "does not hold")):
        claim = claims.Claim("p", "source", "x", "train_reward", {"objective": "dora", "lam": 1.0},
                             {"objective": "dora", "lam": 1000.0}, direction=direction)
        assert claims.measure(claim, settings, per_trial)["verdict"] == verdict
    missing = claims.measure(claims.Claim("p", "source", "x", "train_reward", {"objective": "wdpo"}), settings, per_trial)
    assert missing["verdict"] == "not measured" and math.isnan(missing["mean"])


def test_every_claim_names_a_scenario_and_a_metric_the_report_has():
    from pipelines import scenarios, study

    for claim in claims.CLAIMS:
        assert claim.scenario in scenarios.SCENARIOS and claim.scenario in claims.SCENARIOS
        assert claim.metric in {**study.METRICS, **study.TAIL_METRICS}
        assert claim.direction in (1, -1)


@pytest.mark.slow
def test_every_scenario_runs_one_seed_through_the_product(tmp_path):
    """`python -m benchmarks.claims --smoke`: each scenario's `robust-dpo run` on a tiny world, then CLAIMS.md."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROBUST_DPO_", "RAY_ADDRESS"))}
    done = subprocess.run([sys.executable, "-m", "benchmarks.claims", "--smoke", "--seeds", "1", "--parallel", "2",
                           "--work", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line for line in (tmp_path / "CLAIMS.md").read_text().splitlines() if line.startswith("| ") and
             line.split("|")[1].strip().isdigit()]
    assert len(table) == len(claims.CLAIMS)
    for name in claims.SCENARIOS:
        report = (tmp_path / name / "report.md").read_text()
        assert f"(scenario {name})" in report and "Selection (honest)" in report
    source = pd.read_csv(tmp_path / "source" / "settings.csv")
    assert sorted(claims.setting_values(s)["calibration"] for s in source["setting"] if s.startswith("dora")) == [
        "calibration_oracle", "one"]
    noise = pd.read_csv(tmp_path / "label_noise" / "settings.csv")
    rdpo = [claims.setting_values(s) for s in noise["setting"] if s.startswith("rdpo")]
    assert [r["label_smoothing"] for r in rdpo] == [0.2]  # the true flip rate
    risk = pd.read_csv(tmp_path / "token_risk" / "settings.csv")
    assert sorted(claims.setting_values(s)["risk"] for s in risk["setting"] if s.startswith("radpo2")) == ["cvar", "erm"]
    assert risk["kl_cvar95"].notna().all() and (risk["kl_cvar95"] >= risk["kl"] - 1e-9).all()
    mixture = pd.read_csv(tmp_path / "mixture" / "trial_metrics.csv")
    assert mixture["mixture_auc"].notna().all()
