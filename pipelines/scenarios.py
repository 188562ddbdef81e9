"""`robust-dpo run scenario=NAME`: the four test-beds of OBJECTIVES.md section 8 on the embedded world.

A scenario is a set of `run` keys (world, objectives, grids, shift grids) that one paper's claim
needs; the user's own keys win over it (`robust-dpo run scenario=mixture search.seeds=5 ...`).
Grids are the papers' (tune_spaces' wide spaces) shrunk to what a 2-core machine runs in minutes:
the values kept are stated per scenario.  Every scenario keeps DPO's beta frontier
(`run.frontier_betas`), against which the report compares each objective at matched KL.

| scenario | world | objectives (grid) | evaluation | claim checked (metric) |
|---|---|---|---|---|
| mixture (E1) | conflicting r1/r2, labels from alpha_train = 0.1, no judge bias | kldpo tau 0.5, 1; wdpo rho 0.01, 0.05 | mixture alpha = 0..1 (6) | WDPO / KLDPO: higher worst case and AUC over alpha than DPO (worst case, mixture AUC) |
| source (E3) | human + synthetic sources, verbosity-biased synthetic judge | dora lam 1 (DoRA) and 1000 (reweighting only) x calibration classifier / oracle / one (DRO only) | source_mixture target = 0..1 (3), golden mixture at alpha_train | DoRA >= reweighting >= DRO only; oracle h~ larger gains (golden reward) |
| label_noise (E4) | labels flipped at synth.label_noise (default 0.2), no judge bias | cdpo and rdpo at the true rate, drdpo beta' 1, kldpo tau 1 | golden labels at alpha_train, no shift | Dr.DPO and rDPO help under flips, KLDPO is hurt (golden reward) |
| token_risk (E2) | no judge bias | tdpo2 alpha 0.5; radpo2 CVaR mu 0.95 and ERM mu 5 | golden reward at alpha_train; per-sequence KL tail (p95, CVaR95) of 8 samples per prompt | Ra-DPO: lower sequential KL (tail) at matched reward; reward at matched KL |
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from pipelines.errors import UserError


def _mixture(synth) -> dict:
    return {
        "search": {"objectives": ["dpo", "kldpo", "wdpo"],
                   "overrides": {"kldpo": {"tau": [0.5, 1.0]}, "wdpo": {"rho": [0.01, 0.05]}}},
        "run": {"grid": ["mixture:alpha=0:1:6"]},
    }


def _source(synth) -> dict:
    return {
        "search": {"objectives": ["dpo", "dora"],
                   "overrides": {"dora": {"lam": [1.0, 1000.0],
                                          "calibration": ["calibration", "calibration_oracle", "one"]}}},
        "run": {"grid": ["source_mixture:target=0:1:3", f"mixture:alpha={synth.alpha_train}"]},
    }


def _label_noise(synth) -> dict:
    rate = synth.label_noise
    return {
        "search": {"objectives": ["dpo", "cdpo", "rdpo", "drdpo", "kldpo"],
                   "overrides": {"cdpo": {"label_smoothing": rate}, "rdpo": {"label_smoothing": rate},
                                 "drdpo": {"beta_prime": 1.0}, "kldpo": {"tau": 1.0}}},
        "run": {"grid": [f"mixture:alpha={synth.alpha_train}"]},
    }


def _token_risk(synth) -> dict:
    return {
        "search": {"objectives": ["dpo", "tdpo2", "radpo2"], "overrides": {"radpo2": {"risk": ["cvar", "erm"]}}},
        "run": {"grid": [f"mixture:alpha={synth.alpha_train}"]},
        "evaluate": {"generation": {"samples_per_prompt": 8}},
    }


# name -> (the world keys it starts from, the other keys given the resulting world config)
SCENARIOS: dict[str, tuple[dict, Callable[[Any], dict]]] = {
    "mixture": ({"judge_bias": 0.0}, _mixture),
    "source": ({}, _source),
    "label_noise": ({"label_noise": 0.2, "judge_bias": 0.0}, _label_noise),
    "token_risk": ({"judge_bias": 0.0}, _token_risk),
}


def check_name(name: str) -> None:
    if name not in SCENARIOS:
        raise UserError(f"config key 'scenario': unknown scenario {name!r}; valid: {', '.join(SCENARIOS)}")


def scenario_values(name: str, build_world: Callable[[dict], Any]) -> dict:
    """The run keys of scenario `name`.  `build_world(defaults)` builds the world config from the
    scenario's world keys with the user's over them; the scenario's other keys may follow it
    (label_noise's cDPO / rDPO rates are synth.label_noise).  The caller merges the user's keys over
    the result."""
    check_name(name)
    world_defaults, keys = SCENARIOS[name]
    return {"synth": dict(world_defaults), **keys(build_world(world_defaults))}
