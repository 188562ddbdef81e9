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
- settings, seeds, intervals, the selection rule and DPO's frontier at matched KL: `pipelines.study`
  (one setting = an objective and its hyperparameters; its trials over seeds are its units);
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
from pipelines import study as study_lib
from pipelines.paths import atomic_path, write_text_atomic
from pipelines.study import area_under_curve

TRIAL_COLUMNS = ("trial_id", "objective")
METRIC_COLUMNS = ("reward", "kl")
ROBUSTNESS_COLUMNS = ("trial_id", "objective", "shift", "level", "reward", "kl", "pair_accuracy")
# Curves drawn per shift kind: reward (generative) and pair accuracy (implicit, under the level's labels).
PANEL_METRICS = (("reward", "reward"), ("pair_accuracy", "pair accuracy"))
BASELINE_OBJECTIVE = study_lib.REFERENCE  # rows of the untrained reference model, drawn as a grey baseline
SEED_COLUMNS = ("seed", "world_seed")  # repetitions of a setting, not hyperparameters
RESERVED_COLUMNS = (*TRIAL_COLUMNS, *METRIC_COLUMNS, "on_front", *SEED_COLUMNS)  # every other column: a hyperparameter
# Per-trial metrics in the report's tables: column -> name.
METRIC_NAMES = {"worst_reward": "worst case", "mixture_auc": "mixture AUC", "train_reward": "reward at alpha_train",
                "kl": "KL", "kl_p95": "KL p95", "kl_cvar95": "KL CVaR95"}


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
    """pareto.csv: trial_id, objective, hyperparameters..., seed columns, reward, kl, on_front (input row order).

    Args:
        trials: one row per trial.
        hyperparameter_cols: hyperparameter columns to keep; None = every column other than
            trial_id, objective, reward, kl and on_front.
    """
    _require(trials, (*TRIAL_COLUMNS, *METRIC_COLUMNS), "the trials table")
    if trials["trial_id"].duplicated().any():
        dup = trials.loc[trials["trial_id"].duplicated(), "trial_id"].iloc[0]
        raise ValueError(f"trial_id '{dup}' appears twice in the trials table")
    if hyperparameter_cols is None:
        hyperparameter_cols = [c for c in trials.columns if c not in RESERVED_COLUMNS]
    seeds = [c for c in SEED_COLUMNS if c in trials.columns and c not in hyperparameter_cols]
    table = trials[[*TRIAL_COLUMNS, *hyperparameter_cols, *seeds, *METRIC_COLUMNS]].reset_index(drop=True).copy()
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


# [2] Plots --------------------------------------------------------------------------------------


def objective_colours(objectives: Sequence[str]) -> dict[str, tuple]:
    """A fixed colour per objective (sorted order, tab10 then tab20), grey for the reference."""
    import matplotlib

    names = sorted(o for o in set(objectives) if o != BASELINE_OBJECTIVE)
    cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
    colours = {name: cmap(i % cmap.N) for i, name in enumerate(names)}
    colours[BASELINE_OBJECTIVE] = (0.45, 0.45, 0.45, 1.0)
    return colours


_label = study_lib.hyperparameter_label


def _whiskers(ax, x, x_lo, x_hi, y, y_lo, y_hi, colour, **kwargs) -> None:
    """A point with its x and y intervals (drawn only where both ends are finite)."""
    xerr = [[x - x_lo], [x_hi - x]] if np.isfinite([x_lo, x_hi]).all() else None
    yerr = [[y - y_lo], [y_hi - y]] if np.isfinite([y_lo, y_hi]).all() else None
    ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="none", ecolor=colour, elinewidth=1.2, capsize=3, **kwargs)


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
                hyperparameter_cols: Sequence[str], settings: Optional[pd.DataFrame] = None) -> None:
    """Reward (y) vs KL (x); colour per objective; the front as a step line, front points ringed;
    with seeds, each setting's mean with its 95% intervals as whiskers (`settings`: study.aggregate
    of reward and kl)."""
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
    if settings is not None and (settings["n"] > 1).any():
        for row in settings.itertuples(index=False):
            _whiskers(ax, row.kl, row.kl_lo, row.kl_hi, row.reward, row.reward_lo, row.reward_hi,
                      colours[row.objective], zorder=3)
            ax.scatter([row.kl], [row.reward], marker="D", s=30, color=colours[row.objective],
                       edgecolors="white", zorder=5)
        handles.append(Line2D([], [], marker="D", color="grey", lw=1.2,
                              label="setting mean over seeds, 95% t interval (whiskers)"))
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


def setting_curves(rob: pd.DataFrame, keys: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per (setting, shift, level): the mean of `metric` over the setting's units and its t interval."""
    merged = rob.merge(keys[["trial_id", "setting"]], on="trial_id", how="inner")
    rows = []
    for (setting, objective, shift, level), part in merged.groupby(["setting", "objective", "shift", "level"],
                                                                   sort=True):
        mean, lo, hi, n = study_lib.t_interval(part[metric])
        rows.append({"setting": setting, "objective": objective, "shift": shift, "level": level,
                     "mean": mean, "lo": lo, "hi": hi, "n": n})
    return pd.DataFrame(rows, columns=["setting", "objective", "shift", "level", "mean", "lo", "hi", "n"])


def plot_robustness(df: pd.DataFrame, study: study_lib.Study, path: Path, train_levels: Mapping[str, float]) -> None:
    """One panel per (shift kind, metric it moves): the metric vs level, each selected setting's mean
    over seeds bold with its 95% band (other settings faint); then worst-case reward vs KL with DPO's
    beta frontier (mean over seeds per beta, through the reference at KL 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = robustness_panels(df)
    ncols = 2
    nrows = -(-(len(panels) + 1) // ncols)
    colours = objective_colours(df["objective"])
    keys = study.per_trial[["trial_id", "setting"]]
    selected = set(study.selected["setting"])
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 4.4 * nrows), dpi=120, squeeze=False)
    for ax in axes.flat[len(panels) + 1:]:
        ax.set_visible(False)
    for ax, (shift, metric) in zip(axes.flat, panels):
        name = dict(PANEL_METRICS)[metric]
        curves = setting_curves(df[df["shift"] == shift], keys, metric)
        for setting, curve in curves.groupby("setting", sort=True):
            curve = curve.sort_values("level")
            objective = curve["objective"].iloc[0]
            style = "--" if objective == BASELINE_OBJECTIVE else "-"
            if setting not in selected:  # the other settings of an objective: thin, faint, unlabelled
                ax.plot(curve["level"], curve["mean"], style, color=colours[objective], lw=0.8, alpha=0.3)
                continue
            if curve["mean"].notna().sum() == 0:
                continue
            worst = curve.loc[curve["mean"].idxmin()]
            auc = area_under_curve(curve["level"], curve["mean"])
            n = int(curve["n"].max())
            ax.plot(curve["level"], curve["mean"], style, marker="o", ms=3, lw=2, color=colours[objective],
                    label=f"{setting}: worst {worst['mean']:.3f}, AUC {auc:.3f}" + (f" ({n} seeds)" if n > 1 else ""))
            if n > 1:
                ax.fill_between(curve["level"], curve["lo"], curve["hi"], color=colours[objective], alpha=0.15)
            ax.scatter([worst["level"]], [worst["mean"]], marker="v", s=90, color=colours[objective],
                       edgecolors="black", zorder=4)
        if shift in train_levels:
            ax.axvline(train_levels[shift], color="black", ls=":", lw=1)
            ax.text(train_levels[shift], 0.02, " training level", transform=ax.get_xaxis_transform(), fontsize=7)
        ax.set_title(f"{name} under {shift} shift", fontsize=10)
        ax.set_xlabel(f"{shift} level" + (" alpha (reward = alpha r1 + (1 - alpha) r2)" if shift == "mixture" else ""))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="best", title="selected setting per objective (v = worst case; band: 95% t)",
                      title_fontsize=6)
    _plot_frontier(axes.flat[len(panels)], study, colours)
    fig.suptitle(f"Robustness under shift: the setting selected per objective ({study.rule} rule; faint: the "
                 "other settings), and worst case against DPO's beta frontier at matched KL", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def _plot_frontier(ax, study: study_lib.Study, colours: Mapping[str, tuple]) -> None:
    """Worst-case reward vs KL: DPO's frontier (its settings' means, joined in KL order, with the
    reference at KL 0) and every selected setting as a point with its intervals."""
    front = study.settings[study.settings["objective"].isin([study_lib.BASELINE, study_lib.REFERENCE])]
    front = front.sort_values("kl")
    if len(front):
        ax.plot(front["kl"], front["worst_reward"], "-", color="black", lw=1.5, label="DPO beta frontier (mean)")
        for row in front.itertuples(index=False):
            _whiskers(ax, row.kl, row.kl_lo, row.kl_hi, row.worst_reward, row.worst_reward_lo,
                      row.worst_reward_hi, "black", alpha=0.5)
            ax.annotate(row.setting.replace("dpo ", ""), (row.kl, row.worst_reward), textcoords="offset pixels",
                        xytext=(6, 6), fontsize=6)
    for row in study.selected.itertuples(index=False):
        if row.objective in (study_lib.BASELINE, study_lib.REFERENCE):
            continue
        _whiskers(ax, row.kl, row.kl_lo, row.kl_hi, row.worst_reward, row.worst_reward_lo, row.worst_reward_hi,
                  colours[row.objective])
        diff = study.matched["worst_reward"].get(row.setting)
        ax.scatter([row.kl], [row.worst_reward], s=60, color=colours[row.objective], edgecolors="black", zorder=4,
                   label=f"{row.setting}: {study_lib.format_difference(diff)} vs frontier")
    ax.set_title("worst-case reward vs KL: DPO's beta frontier and the selected settings", fontsize=10)
    ax.set_xlabel("KL(policy || reference), nats per sequence")
    ax.set_ylabel("worst-case reward (min over every shift level)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6, loc="best")


# [3] The report ---------------------------------------------------------------------------------


def _markdown_table(df: pd.DataFrame, float_format: str = "{:.4f}") -> str:
    def fmt(value) -> str:
        if isinstance(value, float):
            return "n/a" if np.isnan(value) else float_format.format(value)
        return str(value)

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _interval(row, metric: str) -> str:
    return study_lib.format_interval(row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"])


def write_pareto(
    trials: pd.DataFrame,
    output_dir: str | Path,
    *,
    hyperparameter_cols: Optional[Sequence[str]] = None,
    ref_point: Optional[tuple[float, float]] = None,
    setting_cols: Optional[Sequence[str]] = None,
) -> tuple[pd.DataFrame, tuple[float, float], float]:
    """Write pareto.csv and pareto.png into `output_dir` (the part of the report a sweep alone gives).
    `setting_cols` name the columns that make trials one setting over seeds (default: the
    hyperparameter columns); pareto.png draws each setting's mean with its intervals.

    Returns:
        (the pareto table, the reference point used, the front's hypervolume).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = build_pareto_table(trials, hyperparameter_cols)
    hyper = [c for c in table.columns if c not in RESERVED_COLUMNS]
    points = table[["reward", "kl"]].to_numpy(dtype=float)
    if ref_point is None:
        finite = np.isfinite(points).all(axis=1)
        ref_point = pareto.default_reference_point(points) if finite.any() else (0.0, 0.0)
    volume = pareto.hypervolume(points, ref_point)
    with atomic_path(out / "pareto.csv") as tmp:
        table.to_csv(tmp, index=False)
    keys = study_lib.trial_settings(table.assign(**{c: trials[c].to_numpy() for c in setting_cols or [] if c not in table}),
                                    table.iloc[:0], hyper if setting_cols is None else setting_cols)
    settings = study_lib.aggregate(keys.merge(table[["trial_id", "reward", "kl"]], on="trial_id"), ["reward", "kl"])
    plot_pareto(table, out / "pareto.png", ref_point, volume, hyper, settings)
    return table, ref_point, volume


def write_report(
    trials: pd.DataFrame,
    robustness: pd.DataFrame,
    output_dir: str | Path,
    *,
    hyperparameter_cols: Optional[Sequence[str]] = None,
    ref_point: Optional[tuple[float, float]] = None,
    train_levels: Optional[Mapping[str, float]] = None,
    extras: Optional[pd.DataFrame] = None,
    title: str = "robust-dpo sweep report",
) -> ReportPaths:
    """Write pareto.csv/png, robustness.csv/png and report.md into `output_dir`.

    Args:
        trials: one row per trial (see module docstring); optional `seed` / `world_seed` columns
            make trials of one setting repetitions of it (`pipelines.study`).
        robustness: long-form evaluation rows (see module docstring); `val_reward` / `val_kl`
            (validation prompts) make the selection honest.
        output_dir: created if missing; files are overwritten.
        hyperparameter_cols: hyperparameter columns of `trials`; None = every non-reserved column.
        ref_point: (reward, kl) reference of the hypervolume; None = `pareto.default_reference_point`.
        train_levels: shift -> the level the training data came from (e.g. {"mixture": 0.1}),
            drawn as a dotted line; the mixture one is where "reward at the training mixture" is read.
        extras: per trial_id, more per-trial metrics (study.TAIL_METRICS: the on-policy KL tail).
        title: the report's heading.
    """
    out = Path(output_dir)
    paths = ReportPaths(out / "pareto.csv", out / "pareto.png", out / "robustness.csv",
                        out / "robustness.png", out / "report.md")
    ref_is_default = ref_point is None
    table, ref_point, volume = write_pareto(trials, out, hyperparameter_cols=hyperparameter_cols, ref_point=ref_point)
    hyper = [c for c in table.columns if c not in RESERVED_COLUMNS]
    finite = np.isfinite(table[["reward", "kl"]].to_numpy(dtype=float)).all(axis=1)

    rob = build_robustness_table(robustness, trials)
    with atomic_path(paths.robustness_csv) as tmp:
        rob.to_csv(tmp, index=False)
    # The reference's implicit reward is identically 0 (every pair a tie, pair_accuracy 0 by the
    # strict rule): it has no pair accuracy to rank or draw, so the tables and plots leave it out.
    rob = rob.assign(pair_accuracy=rob["pair_accuracy"].where(rob["objective"] != BASELINE_OBJECTIVE))
    train_levels = dict(train_levels or {})
    study = study_lib.Study(table, rob, hyper, train_alpha=train_levels.get("mixture"), extras=extras)
    plot_robustness(rob, study, paths.robustness_png, train_levels)
    with atomic_path(out / "trial_metrics.csv") as tmp:
        study.per_trial.to_csv(tmp, index=False)
    with atomic_path(out / "settings.csv") as tmp:
        study.settings_table().to_csv(tmp, index=False)

    lines = [
        f"# {title}", "",
        f"{len(table)} trials over {table['objective'].nunique()} objectives and {len(study.settings)} settings "
        f"({study.units} seed unit(s): training seed x world); {len(rob)} evaluation rows over shifts "
        f"{', '.join(sorted(rob['shift'].unique()))}."
        + (f" {int((~finite).sum())} trial(s) have no reward/KL and are off the front." if (~finite).any() else ""), "",
        "## Which objective holds up under shift", "",
        *_rules(study),
        "",
        _markdown_table(_selected_table(study)), "",
        "![robustness](robustness.png)", "",
        "Per trial: [trial_metrics.csv](trial_metrics.csv); per setting, with every interval, the matched-KL "
        "differences and the selection: [settings.csv](settings.csv).", "",
        "Rows: [robustness.csv](robustness.csv) (long form: trial_id, objective, shift, level, reward, kl, "
        "pair_accuracy, ...; `val_*` on the validation prompts). Reward is the configured reward of policy samples "
        "under each level (the mixture level alpha scores the same samples with alpha r1 + (1 - alpha) r2).", "",
        "## Reward vs KL", "",
        f"Pareto front of the trials (reward at the sweep's trial evaluation up, KL down): "
        f"{int(table['on_front'].sum())} of {len(table)} trials. Hypervolume "
        f"**{volume:.6g}** (reward x nats) against the reference point reward = {ref_point[0]:.6g}, "
        f"KL = {ref_point[1]:.6g}" + (" (default: min reward and max KL over the trials, each pushed 10% of "
                                    "its range further)." if ref_is_default else " (given)."), "",
        _markdown_table(table[table["on_front"]].sort_values("kl").assign(
            hyperparameters=lambda d: [_label(r, hyper) for r in d.to_dict("records")])[
            ["trial_id", "objective", "hyperparameters", "reward", "kl"]]), "",
        "![pareto](pareto.png)", "",
        "All trials: [pareto.csv](pareto.csv).", "",
        "## Against DPO's beta frontier at matched KL", "",
        "Every trained setting of another objective against DPO at its own KL (rule above): the frontier's "
        "value at the setting's KL, the paired difference with its 95% t interval over seed units, and "
        "the verdict; `outside` = the setting's KL is beyond the largest DPO KL on some unit (no "
        "extrapolation). Δ vs DPO (selected) compares with the selected DPO setting on the same units.", "",
        _markdown_table(_matched_table(study)), "",
        "## The whole grid (test prompts)", "",
        "Every setting, mean [95% t interval] over its seed units; `selection` is the metric the rule "
        "ranks (validation worst case, or the test one under the oracle rule).", "",
        _markdown_table(_grid_table(study)), "",
    ]
    write_text_atomic(paths.report_md, "\n".join(lines))
    return paths


def _rules(study: study_lib.Study) -> list[str]:
    selection = (
        "**Selection (honest):** per objective, the setting with the highest mean worst-case reward on the "
        "*validation* prompts (disjoint from the test prompts every number below comes from; ties: lower "
        "validation KL). The `oracle` column is the best test worst case any setting of the objective "
        "reached: selection on the reported numbers, shown only as an upper bound."
        if study.rule == "validation" else
        "**Selection (oracle):** these rows have no validation prompts, so the setting per objective is the "
        "one with the highest mean *test* worst-case reward: selection on the reported numbers, optimistic "
        "for objectives with more settings (`robust-dpo run` sets aside validation prompts).")
    return [
        selection, "",
        "Worst-case reward = min of the reward over every evaluated (shift, level); mixture AUC = trapezoid "
        "integral of J(alpha) over the mixture grid; reward at the training mixture = J(alpha_train); KL = "
        "mean sequence KL(policy || reference) of the samples. Each cell: mean over seed units (training "
        "seed x world) [95% Student-t interval, t_{0.975, n-1} s / sqrt(n)]. **vs DPO at matched KL**: per "
        "unit, the setting's worst case minus DPO's frontier at the setting's KL (DPO's beta settings and "
        "the untrained reference at KL 0, linearly interpolated; no extrapolation), then the t interval "
        "of those paired differences; verdict `holds` when the interval is above 0, `does not hold` when "
        "below, else `inconclusive`.",
    ]


def _selected_table(study: study_lib.Study) -> pd.DataFrame:
    oracle = dict(zip(study.oracle["objective"], study.oracle["worst_reward"]))
    rows = []
    for row in study.selected.sort_values("worst_reward", ascending=False, kind="stable").to_dict("records"):
        diff = study.matched["worst_reward"].get(row["setting"])
        rows.append({
            "objective": row["objective"], "selected setting": row["setting"], "seeds": row["n"],
            "worst-case reward": _interval(row, "worst_reward"), "mixture AUC": _interval(row, "mixture_auc"),
            "reward at alpha_train": _interval(row, "train_reward"), "KL": _interval(row, "kl"),
            "vs DPO at matched KL": study_lib.format_difference(diff),
            "verdict": diff["verdict"] if diff and diff["n"] else "-",
            "oracle worst case": f"{oracle.get(row['objective'], float('nan')):.3f}"})
    return pd.DataFrame(rows)


def _matched_table(study: study_lib.Study) -> pd.DataFrame:
    diffs = study.matched_diffs["worst_reward"]
    outside = set(diffs.loc[diffs["diff"].isna(), "setting"])
    frontier = diffs.groupby("setting")["frontier"].mean()
    rows = []
    for row in study.settings.to_dict("records"):
        if row["objective"] in (study_lib.BASELINE, study_lib.REFERENCE):
            continue
        cells = {"setting": row["setting"], "seeds": row["n"], "KL": _interval(row, "kl"),
                 "worst case": _interval(row, "worst_reward"),
                 "DPO frontier there": f"{frontier.get(row['setting'], float('nan')):.3f}"}
        for metric, name in METRIC_NAMES.items():
            if metric in study.matched:  # every metric but the KL
                diff = study.matched[metric].get(row["setting"])
                cells[f"Δ {name}"] = study_lib.format_difference(diff) + (f" ({diff['verdict']})" if diff and diff["n"] else "")
        cells["Δ worst case vs DPO (selected)"] = study_lib.format_difference(study.vs_dpo.get(row["setting"]))
        cells["note"] = "outside" if row["setting"] in outside else ""
        rows.append(cells)
    return pd.DataFrame(rows)


def _grid_table(study: study_lib.Study) -> pd.DataFrame:
    selected = set(study.selected["setting"])
    rows = []
    for row in study.settings.sort_values(["objective", "setting"]).to_dict("records"):
        cells = {"setting": row["setting"], "seeds": row["n"],
                 "selection": (f"{row['val_worst_reward']:.3f}" if study.rule == "validation"
                               else f"{row['worst_reward']:.3f}") + (" (selected)" if row["setting"] in selected else "")}
        for metric, name in METRIC_NAMES.items():
            if metric in row:
                cells[name] = _interval(row, metric)
        rows.append(cells)
    return pd.DataFrame(rows)
