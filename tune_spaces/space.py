"""The data types of a search space: one `ParamSpace` per hyperparameter, one `ObjectiveSpace` per objective.

A space is plain data (tuples of floats and bounds), so it can be read, printed, tested and
documented without Ray.  `tune_spaces.build_param_space` turns it into Ray Tune primitives
(`tune.grid_search`, `tune.uniform`, `tune.loguniform`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional


@dataclass(frozen=True, kw_only=True)
class ParamSpace:
    """How one hyperparameter is swept.

    Attributes:
        small: the default grid (1-2 values): what `robust-dpo run` sweeps on a 2-core laptop.
        wide: the grid for real use (paper grids, widened around the papers' defaults).
        low: lower bound of the random-search domain (Optuna / random search).
        high: upper bound of the random-search domain.
        log: sample log-uniformly (scale parameters: beta, tau, rho, lam) instead of uniformly.
    """

    small: tuple[float, ...]
    wide: tuple[float, ...]
    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not self.small or not self.wide:
            raise ValueError("a ParamSpace needs at least one small and one wide grid value")
        if not self.low < self.high:
            raise ValueError(f"ParamSpace bounds must satisfy low < high, got [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-uniform ParamSpace needs low > 0, got {self.low}")


@dataclass(frozen=True, kw_only=True)
class ObjectiveSpace:
    """The search space of one registry objective.

    Attributes:
        name: the registry name (`robust_objectives.OBJECTIVES` key).
        family: the tune_spaces module it lives in ("baselines", "distributional", "risk").
        robustness: the hyperparameters that set the objective's robustness (radius, temperature,
            risk level, noise rate), primary first; empty for plain DPO/IPO/TDPO1/DPO-PL.
        params: the swept hyperparameters, `beta` included.
        variant_param: a categorical hyperparameter whose value changes the *scale* of another
            one (Ra-DPO's `risk`: CVaR's mu is a tail mass in (0, 1], ERM's mu is an entropic
            coefficient ~5; WDPO's `penalty`: the sqrt and pointwise rho are not comparable).
        default_variant: the registry default of `variant_param` (the variant used when the
            overrides do not set it).
        variants: variant value -> the params that replace `params` entries under that variant.
    """

    name: str
    family: str
    robustness: tuple[str, ...]
    params: Mapping[str, ParamSpace]
    variant_param: Optional[str] = None
    default_variant: Optional[str] = None
    variants: Mapping[str, Mapping[str, ParamSpace]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.variant_param is None) != (self.default_variant is None):
            raise ValueError(f"objective '{self.name}': variant_param and default_variant go together")
        if self.default_variant is not None and self.default_variant not in self.variants:
            raise ValueError(f"objective '{self.name}': default variant {self.default_variant!r} has no space")
        missing = [p for p in self.robustness if p not in self.params]
        if missing:
            raise ValueError(f"objective '{self.name}': robustness params {missing} are not in params")

    def params_for(self, variant: Optional[str]) -> dict[str, ParamSpace]:
        """The swept params under `variant` (None: the base params)."""
        params = dict(self.params)
        if variant is not None:
            if variant not in self.variants:
                raise ValueError(
                    f"objective '{self.name}': {self.variant_param}={variant!r} has no search space; "
                    f"valid values: {', '.join(sorted(self.variants))}"
                )
            params.update(self.variants[variant])
        return params


# beta (the KL-regularisation strength of every DPO-style objective, 1/nats).  The papers use 0.1
# (DPO, TDPO/Ra-DPO, DoRA, WDPO Emotion) and 0.01 (WDPO/KLDPO LLaMA runs; OBJECTIVES.md 4.4, 5.3).
BETA = ParamSpace(small=(0.1,), wide=(0.01, 0.05, 0.1, 0.2, 0.5), low=0.01, high=1.0, log=True)
