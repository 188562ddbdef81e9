"""The papers' claims, measured by the product: `python -m benchmarks.claims --seeds 5` -> benchmarks/CLAIMS.md.

For each scenario of `pipelines/scenarios.py` it runs the product's own command

    robust-dpo run --output WORK/<scenario> scenario=<scenario> search.seeds=N

(a subprocess each; rerunning the same command resumes every finished world, trial and evaluation),
then reads the run's `trial_metrics.csv` (one row per trial: its setting, seed unit and metrics on the
test prompts) and `settings.csv` (per setting: means, 95% t intervals, the selection, and the paired
differences to DPO's beta frontier at matched KL, `pipelines.study`).  Each claim is one row: the
setting it is about, the metric, what it is compared with (DPO at matched KL, or another setting on
the same seeds), the mean paired difference with its 95% t interval over seeds, and the verdict
(`holds` when the interval lies on the claimed side of 0, `does not hold` when on the other side,
`inconclusive` when it straddles 0).  Where a claim is about an objective's best setting, the setting
is the one the report selects on validation prompts; the claims and their settings are fixed here,
before any number is seen.

    python -m benchmarks.claims --seeds 5                    # the table (about an hour on 2 cores)
    python -m benchmarks.claims --smoke --work /tmp/claims   # 1 seed, tiny world, smallest grids: minutes
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipelines import study as study_lib

SCENARIOS = ("mixture", "source", "label_noise", "token_risk")
# --smoke: a tiny world, two optimizer steps, DPO at its default beta only, and per scenario the
# objectives whose scenario keys are new (two trials each): WDPO's rho; DoRA's oracle and DRO-only
# calibration; rDPO's rate following synth.label_noise and Dr.DPO; both Ra-DPO risk measures.
SMOKE_KEYS = ["synth.n_train=128", "synth.n_eval=32", "synth.ref_steps=30", "synth.n_classifier=64",
              "train.max_steps=2", "train.batch_size=16", "train.micro_batch_size=16", "train.checkpoint_every=2",
              "trial_eval.num_prompts=4", "trial_eval.samples_per_prompt=2", "evaluate.generation.num_prompts=8",
              "evaluate.generation.samples_per_prompt=2", "run.frontier_betas=[]"]
SMOKE_SCENARIO_KEYS = {
    "mixture": ["search.objectives=[dpo,wdpo]", "search.overrides.wdpo.rho=0.01"],
    "source": ["search.objectives=[dora]", "search.overrides.dora.lam=1.0",
               "search.overrides.dora.calibration=[calibration_oracle,one]"],
    "label_noise": ["search.objectives=[rdpo,drdpo]"],
    "token_risk": ["search.objectives=[radpo2]"],
}


@dataclass(frozen=True)
class Claim:
    """One paper's claim as a measurable comparison.

    setting: {"objective": NAME, key: value, ...} naming one setting, or {"objective": NAME,
        "selected": True} for the setting the report selects (validation prompts).
    against: "frontier" (DPO's beta frontier at matched KL, paired per seed) or a second setting
        spec like `setting` (paired on the same seeds).
    direction: +1 if the claim says the metric is higher, -1 if lower.
    """

    paper: str
    scenario: str
    text: str
    metric: str
    setting: dict
    against: object = "frontier"
    direction: int = 1
    note: str = ""


DORA = {"objective": "dora", "lam": 1.0, "calibration": "calibration"}
CLAIMS = [
    Claim("WDPO (Xu et al., NeurIPS 2025)", "mixture", "WDPO keeps a higher worst-case reward over the mixture shift than DPO",
          "worst_reward", {"objective": "wdpo", "selected": True}),
    Claim("WDPO (Xu et al., NeurIPS 2025)", "mixture", "WDPO has a larger area under J(alpha) than DPO", "mixture_auc",
          {"objective": "wdpo", "selected": True}),
    Claim("KLDPO (Xu et al., NeurIPS 2025)", "mixture", "KLDPO keeps a higher worst-case reward over the mixture shift than DPO",
          "worst_reward", {"objective": "kldpo", "selected": True}),
    Claim("KLDPO (Xu et al., NeurIPS 2025)", "mixture", "KLDPO has a larger area under J(alpha) than DPO", "mixture_auc",
          {"objective": "kldpo", "selected": True}),
    Claim("DoRA (Zhu et al., NeurIPS 2025)", "source", "DoRA (classifier h~, lam = 1) reaches a higher golden reward than DPO",
          "train_reward", DORA),
    Claim("DoRA (Zhu et al., NeurIPS 2025)", "source", "DoRA beats reweighting only (h~ l, no DRO: lam = 1000)", "train_reward",
          DORA, {"objective": "dora", "lam": 1000.0, "calibration": "calibration"}),
    Claim("DoRA (Zhu et al., NeurIPS 2025)", "source", "reweighting only beats DRO only (h~ = 1, lam = 1)", "train_reward",
          {"objective": "dora", "lam": 1000.0, "calibration": "calibration"},
          {"objective": "dora", "lam": 1.0, "calibration": "one"}),
    Claim("DoRA (Zhu et al., NeurIPS 2025)", "source", "with the oracle h~ DoRA gains more than with the classifier's", "train_reward",
          {"objective": "dora", "lam": 1.0, "calibration": "calibration_oracle"}, DORA),
    Claim("Dr.DPO (Wu et al., ICLR 2025)", "label_noise", "Dr.DPO reaches a higher golden reward than DPO under flipped labels",
          "train_reward", {"objective": "drdpo", "selected": True}),
    Claim("rDPO (Chowdhury et al. 2024)", "label_noise",
          "rDPO with the true flip rate reaches a higher golden reward than DPO", "train_reward",
          {"objective": "rdpo", "selected": True}),
    Claim("rDPO (Chowdhury et al. 2024)", "label_noise", "rDPO beats cDPO (label smoothing) at the same rate",
          "train_reward", {"objective": "rdpo", "selected": True}, {"objective": "cdpo", "selected": True}),
    Claim("OBJECTIVES.md 8.4 (KLDPO vs flips)", "label_noise",
          "KLDPO, which up-weights high-loss pairs, is hurt by flipped labels (lower golden reward than DPO)",
          "train_reward", {"objective": "kldpo", "selected": True}, direction=-1),
    Claim("Ra-DPO (Zhang et al., NeurIPS 2025)", "token_risk",
          "Ra-DPO (CVaR) has a lighter tail of the sequential KL than DPO at the same mean KL (CVaR95 of the "
          "per-sequence KL)", "kl_cvar95", {"objective": "radpo2", "risk": "cvar"}, direction=-1),
    Claim("Ra-DPO (Zhang et al., NeurIPS 2025)", "token_risk", "Ra-DPO (CVaR) gets more reward per nat of KL than DPO",
          "train_reward", {"objective": "radpo2", "risk": "cvar"}),
    Claim("Ra-DPO (Zhang et al., NeurIPS 2025)", "token_risk", "Ra-DPO (ERM) has a lighter sequential-KL tail than DPO",
          "kl_cvar95", {"objective": "radpo2", "risk": "erm"}, direction=-1),
    Claim("TDPO (Zeng et al., ICML 2024)", "token_risk", "TDPO2 gets more reward per nat of KL than DPO", "train_reward",
          {"objective": "tdpo2"}),
]


# [1] Reading a run --------------------------------------------------------------------------------


def setting_values(setting: str) -> dict:
    """'dora beta=0.1, calibration=one, lam=1' -> {'objective': 'dora', 'beta': 0.1, 'calibration': 'one', 'lam': 1.0}."""
    objective, _, rest = setting.partition(" ")
    out: dict = {"objective": objective}
    for part in filter(None, rest.split(", ")):
        key, _, value = part.partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            out[key] = value
    return out


def find_setting(settings: pd.DataFrame, spec: dict) -> str | None:
    """The one setting of `settings` matching `spec` (see Claim), or None."""
    if spec.get("selected"):
        rows = settings[(settings["objective"] == spec["objective"]) & settings["selected"].astype(bool)]
    else:
        keep = [s for s in settings["setting"] if all(
            setting_values(s).get(k) == v for k, v in spec.items())]
        rows = settings[settings["setting"].isin(keep)]
    return str(rows["setting"].iloc[0]) if len(rows) == 1 else None


def measure(claim: Claim, settings: pd.DataFrame, per_trial: pd.DataFrame) -> dict:
    """One row of the claims table."""
    setting = find_setting(settings, claim.setting)
    row = {"claim": claim, "setting": setting or f"(not in the run: {claim.setting})", "mean": math.nan,
           "lo": math.nan, "hi": math.nan, "n": 0, "units": 0}
    if setting is None:
        return row | {"verdict": "not measured", "against": str(claim.against)}
    if claim.against == "frontier":
        diffs = study_lib.matched_kl_differences(per_trial, claim.metric)
        against = "DPO's beta frontier at matched KL"
    else:
        other = find_setting(settings, claim.against)
        if other is None:
            return row | {"verdict": "not measured", "against": f"(not in the run: {claim.against})"}
        diffs = study_lib.paired_differences(per_trial, claim.metric, other)
        against = f"{other}, same seeds"
    mean, lo, hi, n = study_lib.t_interval(diffs.loc[diffs["setting"] == setting, "diff"])
    sign = claim.direction
    verdict = study_lib.verdict(sign * (lo if sign > 0 else hi), sign * (hi if sign > 0 else lo), n)
    units = int(per_trial.loc[per_trial["setting"] == setting, "unit"].nunique())
    return row | {"mean": mean, "lo": lo, "hi": hi, "n": n, "units": units, "verdict": verdict, "against": against}


# [2] Running the scenarios ------------------------------------------------------------------------


def run_scenario(name: str, work: Path, seeds: int, smoke: bool, log) -> float:
    """`robust-dpo run` of one scenario; returns its wall seconds (raises on a non-zero exit)."""
    command = ["robust-dpo", "run", "--output", str(work / name), f"scenario={name}", f"search.seeds={seeds}"]
    if smoke:
        command += SMOKE_KEYS + SMOKE_SCENARIO_KEYS[name]
    log(f"$ {shlex.join(command)}")
    started = time.perf_counter()
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    (work / f"{name}.log").write_text(result.stdout)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-15:])
        raise RuntimeError(f"scenario {name}: `robust-dpo run` exited {result.returncode} after {seconds:.0f} s:\n{tail}")
    log(f"  scenario {name}: {seconds:.0f} s")
    (work / f"{name}.seconds").write_text(f"{seconds:.1f}\n")  # for --from-runs
    return seconds


def read_run(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_csv(run_dir / "settings.csv"), pd.read_csv(run_dir / "trial_metrics.csv", dtype={"unit": str})


# [3] CLAIMS.md ------------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 3, sign: bool = True) -> str:
    return "n/a" if not math.isfinite(value) else (f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}")


def claims_markdown(rows: list[dict], runs: dict[str, tuple[pd.DataFrame, pd.DataFrame]], command: str, seeds: int,
                    seconds: dict[str, float], total: float) -> str:
    lines = [
        "# Claims of the papers, measured by the product", "",
        f"Command: `{command}` (from the repository root; the runs go to a work folder outside git). "
        f"Seeds: {seeds} training seeds per setting (`search.seeds={seeds}`), on one world per scenario "
        f"(synth.seed 0). Wall time: {total / 60:.1f} min on {os.cpu_count()} CPU cores "
        f"({platform.machine()}, Python {platform.python_version()}): "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()) + ".", "",
        "How each row is measured (fixed before the runs): the setting is named by the claim, or, where the "
        "claim is about an objective's best setting, is the one `robust-dpo run` selects on the validation "
        "prompts (half of the 64 sampled eval prompts, disjoint from the test half every number here comes "
        "from). `vs DPO at matched KL`: on each seed, the setting's metric minus DPO's beta frontier (DPO at "
        "beta 0.03, 0.1, 0.3, 1 and the untrained reference at KL 0, linearly interpolated at the setting's "
        "own KL; no extrapolation). Otherwise the paired difference with the named setting on the same seeds. "
        "Δ is the mean over seeds with its 95% Student-t interval; the sign is that of the metric (for the "
        "KL tail, lower is the claimed direction). Verdict: `holds` when the interval lies on the claimed side "
        "of 0, `does not hold` when on the other side, `inconclusive` when it contains 0 (at this number of "
        "seeds).", "",
        "Metrics (test prompts): worst case = min over the scenario's shift levels of the mean reward of the "
        "policy's samples; mixture AUC = area under J(alpha), alpha = 0..1; golden reward = J(alpha_train), "
        "the reward the evaluation labels come from (no judge bias, no flips); KL CVaR95 = mean of the "
        "per-sequence KL(policy || reference) of the samples at or above its 95th percentile.", "",
        "| # | paper | claim (our words) | scenario | setting | metric | compared with | Δ [95% CI] | seeds | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, 1):
        c = row["claim"]
        interval = (f"{_fmt(row['mean'])} [{_fmt(row['lo'])}, {_fmt(row['hi'])}]" if math.isfinite(row["lo"])
                    else _fmt(row["mean"]))
        seeds = f"{row['n']}" if row["n"] == row["units"] else f"{row['n']} of {row['units']}"
        lines.append(f"| {i} | {c.paper} | {c.text} | {c.scenario} | {row['setting']} | {c.metric} | "
                     f"{row['against']} | {interval} | {seeds} | **{row['verdict']}** |")
    lines += ["", "`n of N` seeds: on the other seeds the setting's KL was beyond DPO's largest KL on that seed, "
              "so the frontier has no value there (no extrapolation) and the seed is left out."]
    lines += ["", "## The settings behind the rows", "",
              "Per scenario, every setting's mean [95% t interval] over seeds on the test prompts "
              "(`settings.csv` of the run).", ""]
    for name, (settings, _) in runs.items():
        cols = [c for c in ("kl", "worst_reward", "mixture_auc", "train_reward", "kl_cvar95") if c in settings]
        lines += [f"### {name}", "", "| setting | seeds | selected | " + " | ".join(cols) + " |",
                  "|---|---|---|" + "---|" * len(cols)]
        for r in settings.sort_values(["objective", "setting"]).to_dict("records"):
            cells = [study_lib.format_interval(r[c], r[f"{c}_lo"], r[f"{c}_hi"]) for c in cols]
            lines.append(f"| {r['setting']} | {r['n']} | {'yes' if r['selected'] else ''} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="training seeds per setting (search.seeds)")
    parser.add_argument("--work", default="runs/claims", help="folder of the scenario runs (rerun to resume)")
    parser.add_argument("--output", default=None, help="CLAIMS.md path (default benchmarks/CLAIMS.md; WORK/CLAIMS.md with --smoke)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    parser.add_argument("--smoke", action="store_true", help="tiny world, two optimizer steps, smallest grids")
    parser.add_argument("--parallel", type=int, default=1,
                        help="scenario runs at once (each its own Ray session: their start-up phases overlap)")
    parser.add_argument("--from-runs", action="store_true",
                        help="rebuild the table from WORK's finished runs (and their recorded wall times) without running")
    args = parser.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    output = Path(args.output or (work / "CLAIMS.md" if args.smoke else Path(__file__).parent / "CLAIMS.md"))
    names = [n for n in args.scenarios.split(",") if n]
    log = lambda m: print(f"[claims] {m}", file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    if args.from_runs:
        seconds = {name: float((work / f"{name}.seconds").read_text()) for name in names}
    else:
        with ThreadPoolExecutor(max(1, args.parallel)) as pool:
            done = pool.map(lambda name: run_scenario(name, work, args.seeds, args.smoke, log), names)
            seconds = dict(zip(names, done))
    runs = {name: read_run(work / name) for name in names}
    rows = [measure(claim, *runs[claim.scenario]) for claim in CLAIMS if claim.scenario in runs]
    given = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--from-runs"]
    command = ("python -m benchmarks.claims " + shlex.join(given)).strip()
    total = sum(seconds.values()) if args.from_runs else time.perf_counter() - started
    text = claims_markdown(rows, runs, command, args.seeds, seconds, total)
    if args.from_runs:
        text = text.replace(" (from the repository root;", " (from the repository root; this table was rebuilt "
                            "from that command's runs with `--from-runs`, wall time = the runs' recorded times;", 1)
    output.write_text(text)
    log(f"wrote {output} ({len(rows)} claims, {(time.perf_counter() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
