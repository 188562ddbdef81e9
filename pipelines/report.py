"""The sweep report: pareto.csv/png, robustness.csv/png and report.md tying them together.

Inputs are two dataframes, so the report can be rebuilt from the CSVs alone:
- trials: one row per trial with `trial_id`, `objective`, its hyperparameters, `reward`, `kl`
  (the evaluation reward to maximise and KL(policy || reference) to minimise);
- robustness: long form, one row per (trial, shift, level) with `reward`, `kl`, `pair_accuracy`
  (what `robust-dpo evaluate` writes; `objective` is joined from the trials when absent).

Rules, stated once (and in report.md):
- the front is `pipelines.pareto.pareto_front` (reward up, KL down); its hypervolume is taken
  against the reference point (min reward - 10% of the reward range, max KL + 10% of the KL range)
  unless one is given;
- per trial, worst-case reward = min of `reward` over every evaluated (shift, level) and average
  reward = its mean over the same rows; the best trial of an objective is the one with the highest
  worst-case reward (ties: higher average, then trial_id);
- AUC of a curve = trapezoid integral of the metric over the shift level (for the mixture grid on
  [0, 1] this is the area under J(alpha) of OBJECTIVES.md 8.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from pipelines import pareto
from pipelines.paths import atomic_path, write_text_atomic

TRIAL_COLUMNS = ("trial_id", "objective")
METRIC_COLUMNS = ("reward", "kl")
ROBUSTNESS_COLUMNS = ("trial_id", "objective", "shift", "level", "reward", "kl", "pair_accuracy")
# Curves drawn per shift kind: reward (generative) and pair accuracy (implicit, under the level's labels).
PANEL_METRICS = (("reward", "reward"), ("pair_accuracy", "pair accuracy"))
BASELINE_OBJECTIVE = "reference"  # rows of the untrained reference model, drawn as a grey baseline


@dataclass(frozen=True)
class ReportPaths:
    """Where `write_report` put each file."""

    pareto_csv: Path
    pareto_png: Path
    robustness_csv: Path
    robustness_png: Path
    report_md: Path


# [1] Tables -------------------------------------------------------------------------------------


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} lacks column(s) {missing}; it has: {', '.join(map(str, df.columns))}")


def build_pareto_table(
    trials: pd.DataFrame, hyperparameter_cols: Optional[Sequence[str]] = None
) -> pd.DataFrame:
    """pareto.csv: trial_id, objective, hyperparameters..., reward, kl, on_front (input row order).

    Args:
        trials: one row per trial.
        hyperparameter_cols: hyperparameter columns to keep; None = every column other than
            trial_id, objective, reward, kl and on_front.
    """
    _require(trials, (*TRIAL_COLUMNS, *METRIC_COLUMNS), "the trials table")
    if trials["trial_id"].duplicated().any():
        dup = trials.loc[trials["trial_id"].duplicated(), "trial_id"].iloc[0]
        raise ValueError(f"trial_id '{dup}' appears twice in the trials table")
    reserved = {*TRIAL_COLUMNS, *METRIC_COLUMNS, "on_front"}
    if hyperparameter_cols is None:
        hyperparameter_cols = [c for c in trials.columns if c not in reserved]
    table = trials[[*TRIAL_COLUMNS, *hyperparameter_cols, *METRIC_COLUMNS]].reset_index(drop=True).copy()
    table["on_front"] = pareto.pareto_front(table, "reward", "kl")
    return table


def build_robustness_table(robustness: pd.DataFrame, trials: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """robustness.csv: the required columns first, then any extra metric columns, sorted."""
    df = robustness.copy()
    if "objective" not in df.columns:
        if trials is None:
            raise ValueError("the robustness table has no 'objective' column and no trials table to join it from")
        objective = dict(zip(trials["trial_id"], trials["objective"]))
        unknown = sorted(set(df["trial_id"]) - set(objective))
        if unknown:
            raise ValueError(f"robustness rows of trial '{unknown[0]}', which is not in the trials table")
        df["objective"] = df["trial_id"].map(objective)
    for col in ("reward", "kl", "pair_accuracy"):
        if col not in df.columns:
            df[col] = np.nan  # e.g. no generative evaluation: reported as missing, not dropped
    _require(df, ROBUSTNESS_COLUMNS, "the robustness table")
    extra = [c for c in df.columns if c not in ROBUSTNESS_COLUMNS]
    df = df[[*ROBUSTNESS_COLUMNS, *extra]]
    return df.sort_values(["objective", "trial_id", "shift", "level"], kind="stable").reset_index(drop=True)


def area_under_curve(levels: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid integral of `values` over `levels` (sorted first); NaN if fewer than 2 finite points."""
    lv, vv = np.asarray(levels, dtype=float), np.asarray(values, dtype=float)
    keep = np.isfinite(lv) & np.isfinite(vv)
    lv, vv = lv[keep], vv[keep]
    if len(lv) < 2:
        return float("nan")
    order = np.argsort(lv, kind="stable")
    lv, vv = lv[order], vv[order]
    return float(np.sum(np.diff(lv) * (vv[1:] + vv[:-1]) / 2.0))


def summarise_trials(robustness: pd.DataFrame) -> pd.DataFrame:
    """Per trial: worst-case and average reward (and pair accuracy) over every (shift, level).

    Returns:
        One row per trial_id with objective, worst_reward, mean_reward, worst_pair_accuracy,
        mean_pair_accuracy, n_levels.
    """
    grouped = robustness.groupby("trial_id", sort=True)
    return pd.DataFrame(
        {
            "objective": grouped["objective"].first(),
            "worst_reward": grouped["reward"].min(),
            "mean_reward": grouped["reward"].mean(),
            "worst_pair_accuracy": grouped["pair_accuracy"].min(),
            "mean_pair_accuracy": grouped["pair_accuracy"].mean(),
            "n_levels": grouped.size(),
        }
    ).reset_index()


def select_best_trials(summary: pd.DataFrame) -> pd.DataFrame:
    """The best trial per objective: highest worst-case reward, then average reward, then trial_id.

    Objectives whose rewards are all missing fall back to worst-case pair accuracy (stated in the
    `rule` column).
    """
    rows = []
    for objective, group in summary.groupby("objective", sort=True):
        key = "worst_reward" if group["worst_reward"].notna().any() else "worst_pair_accuracy"
        tie = "mean_reward" if key == "worst_reward" else "mean_pair_accuracy"
        ranked = group.assign(_k=group[key].fillna(-np.inf), _t=group[tie].fillna(-np.inf))
        ranked = ranked.sort_values(["_k", "_t", "trial_id"], ascending=[False, False, True], kind="stable")
        rows.append(ranked.iloc[0].drop(["_k", "_t"]).to_dict() | {"rule": key})
    return pd.DataFrame(rows)


# [2] Plots --------------------------------------------------------------------------------------


def objective_colours(objectives: Sequence[str]) -> dict[str, tuple]:
    """A fixed colour per objective (sorted order, tab10 then tab20), grey for the reference."""
    import matplotlib

    names = sorted(o for o in set(objectives) if o != BASELINE_OBJECTIVE)
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    colours = {name: cmap(i % cmap.N) for i, name in enumerate(names)}
    colours[BASELINE_OBJECTIVE] = (0.45, 0.45, 0.45, 1.0)
    return colours


def _label(row: Mapping, hyperparameter_cols: Sequence[str]) -> str:
    parts = []
    for col in hyperparameter_cols:
        value = row.get(col)
        if value is None or (isinstance(value, float) and np.isnan(value)):
            continue
        parts.append(f"{col}={value:g}" if isinstance(value, (int, float)) else f"{col}={value}")
    return ", ".join(parts)


def _annotate_points(ax, table: pd.DataFrame, hyperparameter_cols: Sequence[str], annotate_all: bool) -> None:
    """Label front points (black) and, for small sweeps, the others (grey), nudging labels that would
    overlap an earlier one down by a line (greedy, in display pixels)."""
    fig = ax.figure
    fig.canvas.draw()  # fixes the axis limits so data -> pixel is final
    placed: list[tuple[float, float]] = []
    rows = table.sort_values(["on_front", "kl"], ascending=[False, True])
    for _, row in rows.iterrows():
        if not (row["on_front"] or annotate_all) or not np.isfinite([row["kl"], row["reward"]]).all():
            continue
        x, y = ax.transData.transform((row["kl"], row["reward"]))
        dy = -14.0
        while any(abs(x - px) < 160 and abs(y + dy - py) < 12 for px, py in placed):
            dy -= 12.0
        placed.append((x, y + dy))
        text = f"{row['objective']} {_label(row, hyperparameter_cols)}".strip()
        ax.annotate(text, (row["kl"], row["reward"]), textcoords="offset pixels", xytext=(8, dy), fontsize=7,
                    color="black" if row["on_front"] else "dimgrey")


def plot_pareto(table: pd.DataFrame, path: Path, ref_point: tuple[float, float], volume: float,
                hyperparameter_cols: Sequence[str]) -> None:
    """Reward (y) vs KL (x); colour per objective; the front as a step line, front points ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    colours = objective_colours(table["objective"])
    fig, ax = plt.subplots(figsize=(9.0, 6.2), dpi=120)
    points = table[["reward", "kl"]].to_numpy(dtype=float)
    xs, ys = pareto.front_steps(points, ref_point)
    if len(xs):
        ax.fill_between(xs, ys, ref_point[0], color="black", alpha=0.06, zorder=1)
        ax.plot(xs, ys, color="black", lw=1.5, zorder=2)
    handles = []
    for objective, group in table.groupby("objective", sort=True):
        on = group["on_front"].to_numpy(dtype=bool)
        ax.scatter(group["kl"][on], group["reward"][on], s=90, color=colours[objective], edgecolors="black",
                   linewidths=1.8, zorder=4)
        ax.scatter(group["kl"][~on], group["reward"][~on], s=45, color=colours[objective], alpha=0.75, zorder=3)
        handles.append(Line2D([], [], marker="o", ls="", color=colours[objective], label=objective))
    handles.append(Line2D([], [], color="black", lw=1.5, marker="o", mfc="white", mec="black",
                          label=f"Pareto front (ringed), hypervolume {volume:.4g}"))
    ax.scatter([ref_point[1]], [ref_point[0]], marker="x", color="black", s=70, zorder=3)
    handles.append(Line2D([], [], marker="x", ls="", color="black",
                          label=f"reference point: KL {ref_point[1]:.3g}, reward {ref_point[0]:.3g}"))
    _annotate_points(ax, table, hyperparameter_cols, annotate_all=len(table) <= 20)
    ax.set_xlabel("KL(policy || reference), nats per sequence (lower is better)")
    ax.set_ylabel("evaluation reward (higher is better)")
    ax.set_title(f"Reward vs KL: {int(table['on_front'].sum())} of {len(table)} trials on the Pareto front, "
                 f"hypervolume {volume:.4g} against the reference point (x)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="best")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def shift_metric(df: pd.DataFrame, shift: str) -> str:
    """The metric a shift moves: "reward" if any trained trial's reward varies over its levels, else
    "pair_accuracy" (label flips and source mixtures change the labels, not the policy's samples)."""
    part = df[(df["shift"] == shift) & (df["objective"] != BASELINE_OBJECTIVE)]
    spread = part.groupby("trial_id")["reward"].agg(lambda v: np.nanmax(v) - np.nanmin(v) if v.notna().any() else 0.0)
    return "reward" if (spread > 1e-12).any() else "pair_accuracy"


def robustness_panels(df: pd.DataFrame) -> list[tuple[str, str]]:
    """(shift, metric) panels: each shift's moving metric (mixture first), then the pair accuracy of
    shifts whose moving metric is the reward."""
    shifts = sorted(df["shift"].unique(), key=lambda s: (s != "mixture", s))
    panels = [(s, shift_metric(df, s)) for s in shifts]
    panels += [(s, "pair_accuracy") for s, m in list(panels) if m == "reward" and df.loc[df["shift"] == s, "pair_accuracy"].notna().any()]
    return sorted(panels, key=lambda p: (p[1] != "reward", p[0] != "mixture", p[0]))


def plot_robustness(df: pd.DataFrame, best: pd.DataFrame, path: Path,
                    train_levels: Mapping[str, float]) -> None:
    """One panel per (shift kind, metric it moves): metric vs level, best trial per objective bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = robustness_panels(df)
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    colours = objective_colours(df["objective"])
    best_ids = set(best["trial_id"])
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.4 * nrows), dpi=120, squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (shift, metric) in zip(axes.flat, panels):
        name = dict(PANEL_METRICS)[metric]
        part = df[df["shift"] == shift]
        for trial_id, curve in part.groupby("trial_id", sort=True):
            curve = curve.sort_values("level")
            objective = curve["objective"].iloc[0]
            style = "--" if objective == BASELINE_OBJECTIVE else "-"
            if trial_id not in best_ids:  # the other trials of an objective: thin, faint, unlabelled
                ax.plot(curve["level"], curve[metric], style, color=colours[objective], lw=0.8, alpha=0.3)
                continue
            if curve[metric].notna().sum() == 0:
                continue
            worst = curve.loc[curve[metric].idxmin()]
            auc = area_under_curve(curve["level"], curve[metric])
            ax.plot(curve["level"], curve[metric], style, marker="o", ms=3, lw=2, color=colours[objective],
                    label=f"{objective}: worst {worst[metric]:.3f}, AUC {auc:.3f}")
            ax.scatter([worst["level"]], [worst[metric]], marker="v", s=90, color=colours[objective],
                       edgecolors="black", zorder=4)
        if shift in train_levels:
            ax.axvline(train_levels[shift], color="black", ls=":", lw=1)
            ax.text(train_levels[shift], 0.02, " training level", transform=ax.get_xaxis_transform(), fontsize=7)
        ax.set_title(f"{name} under {shift} shift", fontsize=10)
        ax.set_xlabel(f"{shift} level" + (" alpha (reward = alpha r1 + (1 - alpha) r2)" if shift == "mixture" else ""))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best", title="best trial per objective (v = worst case)", title_fontsize=7)
    fig.suptitle("Robustness under shift: best trial per objective by worst-case reward (faint: other trials)",
                 fontsize=11)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


# [3] The report ---------------------------------------------------------------------------------


def _markdown_table(df: pd.DataFrame, float_format: str = "{:.4f}") -> str:
    def fmt(value) -> str:
        if isinstance(value, float):
            return "n/a" if np.isnan(value) else float_format.format(value)
        return str(value)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def write_pareto(
    trials: pd.DataFrame,
    output_dir: str | Path,
    *,
    hyperparameter_cols: Optional[Sequence[str]] = None,
    ref_point: Optional[tuple[float, float]] = None,
) -> tuple[pd.DataFrame, tuple[float, float], float]:
    """Write pareto.csv and pareto.png into `output_dir` (the part of the report a sweep alone gives).

    Returns:
        (the pareto table, the reference point used, the front's hypervolume).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = build_pareto_table(trials, hyperparameter_cols)
    hyper = [c for c in table.columns if c not in (*TRIAL_COLUMNS, *METRIC_COLUMNS, "on_front")]
    points = table[["reward", "kl"]].to_numpy(dtype=float)
    if ref_point is None:
        finite = np.isfinite(points).all(axis=1)
        ref_point = pareto.default_reference_point(points) if finite.any() else (0.0, 0.0)
    volume = pareto.hypervolume(points, ref_point)
    with atomic_path(out / "pareto.csv") as tmp:
        table.to_csv(tmp, index=False)
    plot_pareto(table, out / "pareto.png", ref_point, volume, hyper)
    return table, ref_point, volume


def write_report(
    trials: pd.DataFrame,
    robustness: pd.DataFrame,
    output_dir: str | Path,
    *,
    hyperparameter_cols: Optional[Sequence[str]] = None,
    ref_point: Optional[tuple[float, float]] = None,
    train_levels: Optional[Mapping[str, float]] = None,
    title: str = "robust-dpo sweep report",
) -> ReportPaths:
    """Write pareto.csv/png, robustness.csv/png and report.md into `output_dir`.

    Args:
        trials: one row per trial (see module docstring).
        robustness: long-form evaluation rows (see module docstring).
        output_dir: created if missing; files are overwritten.
        hyperparameter_cols: hyperparameter columns of `trials`; None = every non-reserved column.
        ref_point: (reward, kl) reference of the hypervolume; None = `pareto.default_reference_point`.
        train_levels: shift -> the level the training data came from (e.g. {"mixture": 0.1}),
            drawn as a dotted line.
        title: the report's heading.
    """
    out = Path(output_dir)
    paths = ReportPaths(out / "pareto.csv", out / "pareto.png", out / "robustness.csv",
                        out / "robustness.png", out / "report.md")
    ref_is_default = ref_point is None
    table, ref_point, volume = write_pareto(trials, out, hyperparameter_cols=hyperparameter_cols, ref_point=ref_point)
    hyper = [c for c in table.columns if c not in (*TRIAL_COLUMNS, *METRIC_COLUMNS, "on_front")]
    finite = np.isfinite(table[["reward", "kl"]].to_numpy(dtype=float)).all(axis=1)

    rob = build_robustness_table(robustness, trials)
    with atomic_path(paths.robustness_csv) as tmp:
        rob.to_csv(tmp, index=False)
    # The reference's implicit reward is identically 0 (every pair a tie, pair_accuracy 0 by the
    # strict rule): it has no pair accuracy to rank or draw, so the tables and plots leave it out.
    rob = rob.assign(pair_accuracy=rob["pair_accuracy"].where(rob["objective"] != BASELINE_OBJECTIVE))
    summary = summarise_trials(rob)
    best = select_best_trials(summary)
    plot_robustness(rob, best, paths.robustness_png, dict(train_levels or {}))

    per_shift = []
    for row in best.itertuples(index=False):
        part = rob[rob["trial_id"] == row.trial_id]
        cells = {"objective": row.objective, "best trial": row.trial_id,
                 "hyperparameters": _label(table.set_index("trial_id").loc[row.trial_id].to_dict(), hyper)
                 if row.trial_id in set(table["trial_id"]) else "",
                 "worst-case reward": row.worst_reward, "average reward": row.mean_reward,
                 "worst pair acc.": row.worst_pair_accuracy}
        for shift, curve in part.groupby("shift", sort=True):
            metric = shift_metric(rob, shift)
            cells[f"{shift} AUC ({'reward' if metric == 'reward' else 'pair acc.'})"] = area_under_curve(
                curve["level"], curve[metric])
        per_shift.append(cells)
    best_table = pd.DataFrame(per_shift).sort_values("worst-case reward", ascending=False, kind="stable")
    n_failed = int((~finite).sum())
    front = table[table["on_front"]].sort_values("kl")
    lines = [
        f"# {title}", "",
        f"{len(table)} trials over {table['objective'].nunique()} objectives; "
        f"{len(rob)} evaluation rows over shifts {', '.join(sorted(rob['shift'].unique()))}."
        + (f" {n_failed} trial(s) have no reward/KL and are off the front." if n_failed else ""), "",
        "## Which objective holds up under shift", "",
        "Best trial per objective = the trial with the highest worst-case reward, where worst-case reward is "
        "the minimum of `reward` over every evaluated (shift, level) and average reward its mean over the "
        "same rows (ties: higher average, then trial id). AUC = trapezoid integral over the shift level "
        "of the metric that varies (reward, else pair accuracy). Sorted by worst-case reward.", "",
        _markdown_table(best_table), "",
        "![robustness](robustness.png)", "",
        "Rows: [robustness.csv](robustness.csv) (long form: trial_id, objective, shift, level, reward, kl, "
        "pair_accuracy, ...). Reward is the configured reward of policy samples under each level "
        "(the mixture level alpha scores the same samples with alpha r1 + (1 - alpha) r2); pair accuracy is "
        "the fraction of held-out pairs with Delta_chosen > Delta_rejected under that level's labels.", "",
        "## Reward vs KL", "",
        f"Pareto front (reward up, KL down): {len(front)} of {len(table)} trials. Hypervolume "
        f"**{volume:.6g}** (reward x nats) against the reference point reward = {ref_point[0]:.6g}, "
        f"KL = {ref_point[1]:.6g}" + (" (default: min reward and max KL over the trials, each pushed 10% of "
                                    "its range further)." if ref_is_default else " (given)."), "",
        _markdown_table(front.assign(hyperparameters=[_label(r, hyper) for r in front.to_dict("records")])[
            ["trial_id", "objective", "hyperparameters", "reward", "kl"]]), "",
        "![pareto](pareto.png)", "",
        "All trials: [pareto.csv](pareto.csv).", "",
    ]
    write_text_atomic(paths.report_md, "\n".join(lines))
    return paths
