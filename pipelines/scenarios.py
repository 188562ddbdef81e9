"""`robust-dpo run scenario=NAME`: the four test-beds of OBJECTIVES.md section 8 on the embedded world.

A scenario is a set of `run` keys (world, objectives, grids, shift grids) that one paper's claim
needs; the user's own keys win over it (`robust-dpo run scenario=mixture search.seeds=5 ...`).
Grids are the papers' (tune_spaces' wide spaces) shrunk to what a 2-core machine runs in minutes.
Every scenario keeps DPO's beta frontier (`run.frontier_betas`), against which the report compares
each objective at matched KL.  README.md's "Scenarios" table gives each one's world, grid,
evaluation and the claim it checks: mixture (E1), source (E3), label_noise (E4), token_risk (E2).
"""

from __future__ import annotations

from typing import Any, Callable

from pipelines.errors import UserError

SCENARIOS = {  # name -> the world keys it starts from
    "mixture": {"judge_bias": 0.0},
    "source": {},
    "label_noise": {"label_noise": 0.2, "judge_bias": 0.0},
    "token_risk": {"judge_bias": 0.0},
}


def scenario_values(name: str, build_world: Callable[[dict], Any]) -> dict:
    """The run keys of scenario `name`.  `build_world(defaults)` builds the world config from the
    scenario's world keys with the user's over them; the scenario's other keys may follow it
    (label_noise's cDPO / rDPO rates are synth.label_noise).  The caller merges the user's keys over
    the result."""
    if name not in SCENARIOS:
        raise UserError(f"config key 'scenario': unknown scenario {name!r}; valid: {', '.join(SCENARIOS)}")
    synth = build_world(SCENARIOS[name])
    golden = f"mixture:alpha={synth.alpha_train}"
    rate = synth.label_noise
    keys = {
        "mixture": {
            "search": {"objectives": ["dpo", "kldpo", "wdpo"],
                       "overrides": {"kldpo": {"tau": [0.5, 1.0]}, "wdpo": {"rho": [0.01, 0.05]}}},
            "run": {"grid": ["mixture:alpha=0:1:6"]},
        },
        "source": {
            "search": {"objectives": ["dpo", "dora"],
                       "overrides": {"dora": {"lam": [1.0, 1000.0],
                                              "calibration": ["calibration", "calibration_oracle", "one"]}}},
            "run": {"grid": ["source_mixture:target=0:1:3", golden]},
        },
        "label_noise": {
            "search": {"objectives": ["dpo", "cdpo", "rdpo", "drdpo", "kldpo"],
                       "overrides": {"cdpo": {"label_smoothing": rate}, "rdpo": {"label_smoothing": rate},
                                     "drdpo": {"beta_prime": 1.0}, "kldpo": {"tau": 1.0}}},
            "run": {"grid": [golden]},
        },
        "token_risk": {
            "search": {"objectives": ["dpo", "tdpo2", "radpo2"], "overrides": {"radpo2": {"risk": ["cvar", "erm"]}}},
            "run": {"grid": [golden]},
            "evaluate": {"generation": {"samples_per_prompt": 8}},
        },
    }[name]
    return {"synth": dict(SCENARIOS[name]), **keys}
