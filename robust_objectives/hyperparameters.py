"""Validation of objective hyperparameters: one rule per hyperparameter name, used by every objective.

Each objective calls `check_hyperparameters` on entry, and the training stage calls it (through
`robust_objectives.validate_hyperparameters`) before any worker starts, so a bad value fails early
with one line naming the objective, the hyperparameter and the valid range.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

# Token-level risk measures of Ra-DPO (OBJECTIVES.md section 3): the paper's CVaR, the authors'
# code's split-vocabulary quantile form, and the entropic risk (Renyi divergence of order 1 + mu).
RISK_MEASURES = ("cvar", "cvar_official", "erm")
# WDPO regulariser forms (OBJECTIVES.md section 4.2): App. F's per-pair squared norm, Alg. 1's sqrt.
PENALTIES = ("pointwise", "sqrt")


def _number(objective: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{objective}: {key} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{objective}: {key} must be finite, got {value!r}")
    return float(value)


def _positive(objective: str, key: str, value: Any) -> None:
    if _number(objective, key, value) <= 0:
        raise ValueError(f"{objective}: {key} must be > 0, got {value!r}")


def _non_negative(objective: str, key: str, value: Any) -> None:
    if _number(objective, key, value) < 0:
        raise ValueError(f"{objective}: {key} must be >= 0, got {value!r}")


def _label_smoothing(objective: str, key: str, value: Any) -> None:
    eps = _number(objective, key, value)
    # rDPO divides by 1 - 2 eps (TRL rejects eps >= 0.5 for loss_type="robust"); cDPO's eps is a
    # flip probability, and eps > 0.5 would mean the labels are mostly wrong.
    if objective == "rdpo" and not 0.0 <= eps < 0.5:
        raise ValueError(f"rdpo: {key} must be in [0, 0.5), got {value!r}")
    if not 0.0 <= eps <= 0.5:
        raise ValueError(f"{objective}: {key} must be in [0, 0.5], got {value!r}")


def _choice(options: tuple[str, ...]):
    def check(objective: str, key: str, value: Any) -> None:
        if value not in options:
            raise ValueError(f"{objective}: {key} must be one of {sorted(options)}, got {value!r}")

    return check


def _boolean(objective: str, key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{objective}: {key} must be true or false, got {value!r}")


_RULES = {
    "beta": _positive,
    "beta_prime": _positive,
    "tau": _positive,
    "lam": _positive,
    "max_weight": _positive,
    "rho": _non_negative,
    "alpha": _non_negative,
    "label_smoothing": _label_smoothing,
    "normalize": _boolean,
    "penalty": _choice(PENALTIES),
    "risk": _choice(RISK_MEASURES),
}


def _check_mu(objective: str, mu: Any, risk: str) -> None:
    value = _number(objective, "mu", mu)
    if risk == "erm":
        if value <= 0:
            raise ValueError(f"{objective}: mu (entropic risk coefficient) must be > 0, got {mu!r}")
    elif not 0.0 < value <= 1.0:
        raise ValueError(f"{objective}: mu (CVaR level, risk={risk!r}) must be in (0, 1], got {mu!r}")


def check_hyperparameters(objective: str, values: Mapping[str, Any]) -> None:
    """Raises ValueError with a one-line message if any hyperparameter value is out of range.

    Args:
        objective: registry name, used in the message and for objective-specific ranges.
        values: hyperparameter name -> value (all of them, defaults included).
    """
    for key, value in values.items():
        if key == "mu":
            continue
        _RULES[key](objective, key, value)
    if "mu" in values:
        _check_mu(objective, values["mu"], values.get("risk", "cvar"))
