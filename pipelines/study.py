"""Seeds, intervals, honest selection and DPO's beta frontier: the statistics of the report, pure functions.

A *setting* is an objective with its hyperparameters (e.g. `kldpo tau=0.5, beta=0.1`); a *unit* is
one independent repetition of it: a training seed (`search.seeds`) on one world (`study.world_seeds`),
written "world:seed".  Every number the report gives for a setting is a mean over its units with a
95% Student-t interval (`t_interval`), and every comparison with DPO is paired: both sides are
measured on the same unit (same world, same training seed, same evaluation prompts and sampling
uniforms), and the interval is the t interval of the per-unit differences.

Rules, stated once (report.md repeats them):
- per trial, on one prompt set (test, or validation for selection): worst-case reward = min of the
  reward over every evaluated (shift, level); mixture AUC = trapezoid integral of J(alpha) over the
  mixture grid; reward at the training mixture = J(alpha_train), linear interpolation between grid
  levels (exact for the convex mixture, J is linear in alpha); KL = mean sequence KL of the samples;
- selection: per objective, the setting with the highest mean *validation* worst-case reward (ties:
  lower mean validation KL, then name).  Validation prompts are disjoint from the test prompts the
  report's numbers come from (`robust-dpo evaluate` generation.validation_fraction); without them the
  choice is made on the test numbers and labelled "oracle";
- DPO's frontier at matched KL: on each unit, DPO's settings (swept over beta) and the untrained
  reference (DPO's beta -> infinity limit, KL 0) give points (KL, metric); the frontier at KL k is the
  linear interpolation between the two points whose KL brackets k; outside [0, the largest DPO KL]
  there is no frontier (NaN: no extrapolation).  A setting's matched-KL difference on a unit is its
  metric minus the frontier at its own KL on that unit;
- verdict of a difference: "holds" when the 95% interval lies above 0, "does not hold" when it lies
  below 0, "inconclusive" otherwise (or with fewer than 2 units).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
BASELINE = "dpo"  # the objective whose beta sweep is the frontier
REFERENCE = "reference"  # the untrained reference model's rows (report.BASELINE_OBJECTIVE)
# Per-trial metrics: (column, higher is better)
METRICS = {"worst_reward": True, "mixture_auc": True, "train_reward": True, "kl": False}
TAIL_METRICS = {"kl_p95": False, "kl_cvar95": False}  # on-policy per-sequence KL tail (token_risk)
ANY_UNIT = "*"  # the reference has no training seed: it pairs with every seed of its world


def t_interval(values: Iterable[float], confidence: float = CONFIDENCE) -> tuple[float, float, float, int]:
    """Mean and two-sided Student-t interval of the finite values: mean +- t_{(1+c)/2, n-1} s / sqrt(n)
    with s the sample standard deviation (ddof 1).

    Returns:
        (mean, low, high, n); low = high = NaN when n < 2, everything NaN when n = 0.
    """
    from scipy import stats

    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, 1
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return mean, mean - half, mean + half, n


def verdict(low: float, high: float, n: int) -> str:
    """'holds' (interval above 0), 'does not hold' (below 0) or 'inconclusive' (straddles 0, < 2 units)."""
    if n < 2 or not (np.isfinite(low) and np.isfinite(high)):
        return "inconclusive"
    return "holds" if low > 0 else "does not hold" if high < 0 else "inconclusive"


def unit_world(unit: str) -> str:
    return str(unit).split(":", 1)[0]


# [1] Per trial ------------------------------------------------------------------------------------


def area_under_curve(levels: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid integral of `values` over `levels` (sorted first); NaN if fewer than 2 finite points."""
    lv, vv = np.asarray(levels, dtype=float), np.asarray(values, dtype=float)
    keep = np.isfinite(lv) & np.isfinite(vv)
    lv, vv = lv[keep], vv[keep]
    if len(lv) < 2:
        return float("nan")
    order = np.argsort(lv, kind="stable")
    return float(np.trapezoid(vv[order], lv[order]))


def trial_metrics(rob: pd.DataFrame, *, reward: str = "reward", kl: str = "kl",
                  train_alpha: Optional[float] = None) -> pd.DataFrame:
    """One row per trial_id of METRICS, from long-form evaluation rows (trial_id, shift, level, and the
    `reward` / `kl` columns named).  Shifts whose rows lack the reward are left out of the worst case."""
    out = []
    for trial_id, part in rob.groupby("trial_id", sort=True):
        rewards = part[reward].to_numpy(dtype=float)
        mix = part[part["shift"] == "mixture"].sort_values("level")
        levels, curve = mix["level"].to_numpy(dtype=float), mix[reward].to_numpy(dtype=float)
        ok = np.isfinite(levels) & np.isfinite(curve)
        levels, curve = levels[ok], curve[ok]
        auc = area_under_curve(levels, curve)
        at_train = math.nan
        if train_alpha is not None and len(levels) and levels.min() <= train_alpha <= levels.max():
            at_train = float(np.interp(train_alpha, levels, curve))
        plain = part[part["shift"].isin(["mixture", "none"])]
        kls = (plain if len(plain) else part)[kl].to_numpy(dtype=float)
        out.append({"trial_id": trial_id,
                    "worst_reward": float(np.nanmin(rewards)) if np.isfinite(rewards).any() else math.nan,
                    "mixture_auc": auc, "train_reward": at_train,
                    "kl": float(np.nanmean(kls)) if np.isfinite(kls).any() else math.nan})
    return pd.DataFrame(out, columns=["trial_id", *METRICS])


def kl_tail(samples: pd.DataFrame, quantile: float = 0.95) -> pd.DataFrame:
    """Per trial_id: the `quantile` quantile of the per-sample sequence KL and its CVaR (the mean of
    the samples at or above that quantile), OBJECTIVES.md 8.2's tail-risk metrics."""
    rows = []
    for trial_id, part in samples.groupby("trial_id", sort=True):
        kl = np.sort(part["kl"].to_numpy(dtype=float))
        kl = kl[np.isfinite(kl)]
        if not len(kl):
            rows.append({"trial_id": trial_id, "kl_p95": math.nan, "kl_cvar95": math.nan})
            continue
        q = float(np.quantile(kl, quantile))
        rows.append({"trial_id": trial_id, "kl_p95": q, "kl_cvar95": float(kl[kl >= q].mean())})
    return pd.DataFrame(rows, columns=["trial_id", *TAIL_METRICS])


# [2] Per setting ----------------------------------------------------------------------------------


def aggregate(per_trial: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per (objective, setting): n (units) and, per metric, its mean, _lo and _hi (t interval)."""
    rows = []
    for (objective, setting), part in per_trial.groupby(["objective", "setting"], sort=True):
        row = {"objective": objective, "setting": setting, "n": int(part["unit"].nunique())}
        for metric in metrics:
            mean, lo, hi, _ = t_interval(part[metric]) if metric in part else (math.nan,) * 3 + (0,)
            row |= {metric: mean, f"{metric}_lo": lo, f"{metric}_hi": hi}
        rows.append(row)
    return pd.DataFrame(rows)


def select_settings(agg: pd.DataFrame, metric: str = "worst_reward") -> pd.DataFrame:
    """Per objective, the setting with the highest mean `metric` (ties: lower mean KL, then setting)."""
    ranked = agg.assign(_m=-agg[metric].fillna(-np.inf), _k=agg["kl"].fillna(np.inf))
    ranked = ranked.sort_values(["objective", "_m", "_k", "setting"], kind="stable")
    return ranked.groupby("objective", sort=True).head(1).drop(columns=["_m", "_k"]).reset_index(drop=True)


# [3] DPO's frontier at matched KL -----------------------------------------------------------------


def frontier_at(kls: Sequence[float], values: Sequence[float], kl: float) -> float:
    """The frontier through the points (kls, values) at `kl`: linear interpolation between the points
    that bracket it (points at one KL averaged); NaN outside [min KL, max KL] or without two points."""
    frame = pd.DataFrame({"kl": np.asarray(kls, dtype=float), "v": np.asarray(values, dtype=float)}).dropna()
    frame = frame.groupby("kl", as_index=False)["v"].mean().sort_values("kl")
    if not np.isfinite(kl) or len(frame) == 0:
        return math.nan
    xs, ys = frame["kl"].to_numpy(), frame["v"].to_numpy()
    if kl < xs[0] or kl > xs[-1]:
        return math.nan
    return float(np.interp(kl, xs, ys))


def frontier_points(per_trial: pd.DataFrame, unit: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(KL, metric) of the baseline's trials on `unit` plus the reference of its world (KL 0)."""
    base = per_trial[(per_trial["objective"] == BASELINE) & (per_trial["unit"] == unit)]
    ref = per_trial[(per_trial["objective"] == REFERENCE) & (per_trial["unit"].map(unit_world) == unit_world(unit))]
    kls = np.concatenate([base["kl"].to_numpy(dtype=float), np.zeros(len(ref))])
    return kls, np.concatenate([base[metric].to_numpy(dtype=float), ref[metric].to_numpy(dtype=float)])


def matched_kl_differences(per_trial: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per trained non-baseline trial: `metric` minus DPO's frontier at the trial's KL on its unit
    (columns trial_id, objective, setting, unit, frontier, diff)."""
    rows = []
    for row in per_trial.itertuples(index=False):
        if row.objective in (BASELINE, REFERENCE):
            continue
        kls, values = frontier_points(per_trial, row.unit, metric)
        front = frontier_at(kls, values, row.kl) if len(kls) >= 2 else math.nan
        rows.append({"trial_id": row.trial_id, "objective": row.objective, "setting": row.setting,
                     "unit": row.unit, "frontier": front, "diff": getattr(row, metric) - front})
    return pd.DataFrame(rows, columns=["trial_id", "objective", "setting", "unit", "frontier", "diff"])


def paired_differences(per_trial: pd.DataFrame, metric: str, baseline_setting: str) -> pd.DataFrame:
    """Per trial of another setting: `metric` minus the baseline setting's on the same unit (the
    reference pairs with every unit of its world)."""
    base = per_trial[per_trial["setting"] == baseline_setting]
    by_unit = dict(zip(base["unit"], base[metric]))
    by_world = {unit_world(u): v for u, v in by_unit.items() if str(u).endswith(":" + ANY_UNIT)}
    rows = []
    for row in per_trial.itertuples(index=False):
        if row.setting == baseline_setting:
            continue
        other = by_unit.get(row.unit, by_world.get(unit_world(row.unit), math.nan))
        if str(row.unit).endswith(":" + ANY_UNIT):  # the reference against every unit of its world
            for unit, value in by_unit.items():
                if unit_world(unit) == unit_world(row.unit):
                    rows.append({"setting": row.setting, "unit": unit, "diff": getattr(row, metric) - value})
            continue
        rows.append({"setting": row.setting, "unit": row.unit, "diff": getattr(row, metric) - other})
    return pd.DataFrame(rows, columns=["setting", "unit", "diff"])


def difference_summary(diffs: pd.DataFrame) -> dict[str, dict[str, float]]:
    """setting -> {mean, lo, hi, n, verdict} of its per-unit differences."""
    out = {}
    for setting, part in diffs.groupby("setting", sort=True):
        mean, lo, hi, n = t_interval(part["diff"])
        out[setting] = {"mean": mean, "lo": lo, "hi": hi, "n": n, "verdict": verdict(lo, hi, n)}
    return out


def format_interval(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    """'0.512 [0.498, 0.526]', or '0.512' without an interval, or 'n/a'."""
    if not np.isfinite(mean):
        return "n/a"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def format_difference(summary: Mapping[str, float] | None, digits: int = 3) -> str:
    if not summary or not np.isfinite(summary["mean"]):
        return "n/a"
    return f"{summary['mean']:+.{digits}f}" + (
        f" [{summary['lo']:+.{digits}f}, {summary['hi']:+.{digits}f}]" if np.isfinite(summary["lo"]) else "")


# [4] The study of one report: settings, units, selection, the frontier comparisons --------------


def hyperparameter_label(row: Mapping, hyperparameter_cols: Sequence[str]) -> str:
    """'beta=0.1, tau=0.5' from a trial row (missing and NaN values left out)."""
    parts = []
    for col in hyperparameter_cols:
        value = row.get(col)
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        parts.append(f"{col}={value:g}" if isinstance(value, (int, float)) else f"{col}={value}")
    return ", ".join(parts)


def _seed(value) -> int:
    return 0 if value is None or (isinstance(value, float) and np.isnan(value)) else int(value)


def trial_settings(trials: pd.DataFrame, rob: pd.DataFrame, hyperparameter_cols: Sequence[str]) -> pd.DataFrame:
    """trial_id -> objective, setting (the objective and its hyperparameters, seeds aside) and unit
    ("world:seed", from the trials' `world_seed` and `seed` columns, 0 when absent) for every trial,
    and for the evaluated models that are not trials (the reference: unit "world:*")."""
    rows = []
    for row in trials.to_dict("records"):
        label = hyperparameter_label(row, hyperparameter_cols)
        rows.append({"trial_id": row["trial_id"], "objective": row["objective"],
                     "setting": f"{row['objective']} {label}".strip(),
                     "unit": f"{_seed(row.get('world_seed'))}:{_seed(row.get('seed'))}"})
    others = rob[~rob["trial_id"].isin(set(trials["trial_id"]))]
    for trial_id, part in others.groupby("trial_id", sort=True):
        world = _seed(part["world_seed"].iloc[0]) if "world_seed" in part else 0
        rows.append({"trial_id": trial_id, "objective": part["objective"].iloc[0],
                     "setting": str(part["objective"].iloc[0]), "unit": f"{world}:{ANY_UNIT}"})
    return pd.DataFrame(rows, columns=["trial_id", "objective", "setting", "unit"])


class Study:
    """Everything the report says about settings, from the trials and the long-form evaluation rows.

    Attributes:
        per_trial: trial_id, objective, setting, unit and METRICS (+ tail metrics) on the test prompts.
        per_trial_val: the same on the validation prompts, or None when the rows have none.
        settings: `aggregate` of per_trial (+ `val_worst_reward`, the selection metric, when validated).
        rule: "validation" (selected on validation prompts) or "oracle" (on the reported numbers).
        selected: per objective, the chosen setting's row of `settings`.
        oracle: per objective, the setting with the highest mean *test* worst-case reward.
        matched_diffs: metric (every one but kl) -> per-trial differences against DPO's frontier at
            matched KL (`matched_kl_differences`).
        matched: metric -> setting -> the summary of those differences.
        vs_dpo: setting -> difference summary of worst-case reward against the selected DPO setting.
    """

    def __init__(self, trials: pd.DataFrame, rob: pd.DataFrame, hyperparameter_cols: Sequence[str],
                 train_alpha: Optional[float] = None, extras: Optional[pd.DataFrame] = None) -> None:
        keys = trial_settings(trials, rob, hyperparameter_cols)
        test = trial_metrics(rob, train_alpha=train_alpha)
        if extras is not None and len(extras):
            test = test.merge(extras, on="trial_id", how="left")
        self.metrics = [m for m in [*METRICS, *TAIL_METRICS] if m in test]
        self.per_trial = keys.merge(test, on="trial_id", how="inner")
        self.settings = aggregate(self.per_trial, self.metrics)
        self.per_trial_val = None
        if "val_reward" in rob and rob["val_reward"].notna().any():
            val = trial_metrics(rob, reward="val_reward", kl="val_kl", train_alpha=train_alpha)
            self.per_trial_val = keys.merge(val, on="trial_id", how="inner")
            chosen = aggregate(self.per_trial_val, ["worst_reward", "kl"])
            self.settings = self.settings.merge(
                chosen[["setting", "worst_reward", "kl"]].rename(
                    columns={"worst_reward": "val_worst_reward", "kl": "val_kl"}), on="setting", how="left")
            self.rule = "validation"
            self.selected = self.settings.merge(select_settings(chosen)[["setting"]], on="setting")
        else:
            self.rule = "oracle"
            self.selected = select_settings(self.settings)
        self.selected = self.selected.sort_values("objective").reset_index(drop=True)
        self.oracle = select_settings(self.settings)
        self.matched_diffs = {m: matched_kl_differences(self.per_trial, m) for m in self.metrics if m != "kl"}
        self.matched = {m: difference_summary(diffs) for m, diffs in self.matched_diffs.items()}
        dpo = self.selected[self.selected["objective"] == BASELINE]["setting"]
        self.vs_dpo = (difference_summary(paired_differences(self.per_trial, "worst_reward", dpo.iloc[0]))
                       if len(dpo) else {})
        self.units = int(self.per_trial.loc[~self.per_trial["unit"].str.endswith(ANY_UNIT), "unit"].nunique())

    def settings_table(self) -> pd.DataFrame:
        """settings.csv: `settings` plus `selected` (the rule's choice), and per metric m the
        matched-KL difference `vs_dpo_<m>` with `_lo`, `_hi`, `_n`, `_verdict`."""
        table = self.settings.assign(selected=self.settings["setting"].isin(set(self.selected["setting"])),
                                     rule=self.rule)
        for metric, by_setting in self.matched.items():
            for field in ("mean", "lo", "hi", "n", "verdict"):
                name = f"vs_dpo_{metric}" + ("" if field == "mean" else f"_{field}")
                table[name] = [by_setting.get(s, {}).get(field) for s in table["setting"]]
        return table
