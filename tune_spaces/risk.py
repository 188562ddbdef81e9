"""Search spaces of the token-level objectives: TDPO1/2 and Ra-DPO1/2 (Zhang et al., NeurIPS 2025).

- `alpha` (TDPO2 / Ra-DPO2, Eq. 19 of arXiv 2505.20359; OBJECTIVES.md 3.2): weight of the
  stop-gradient sequential-KL (or risk-ratio) difference; paper grid {0.3, 0.5, 0.7, 0.9}.
- `mu` (Ra-DPO): its meaning depends on `risk` (OBJECTIVES.md 3.3, issue 2):
  "cvar" and "cvar_official": the tail mass / confidence level in (0, 1] (mu = 1 gives TDPO for
  "cvar"); paper grid {0.95, 0.97, 0.98, 0.99}.  "erm": the entropic risk coefficient mu > 0 of a
  Renyi divergence of order 1 + mu (mu -> 0 gives TDPO); paper grid {5, 7, 9}.
"""

from __future__ import annotations

from tune_spaces.space import BETA, ObjectiveSpace, ParamSpace

ALPHA = ParamSpace(small=(0.5,), wide=(0.3, 0.5, 0.7, 0.9), low=0.1, high=1.0)

MU_CVAR = ParamSpace(small=(0.95,), wide=(0.9, 0.95, 0.97, 0.98, 0.99), low=0.8, high=1.0)
MU_ERM = ParamSpace(small=(5.0,), wide=(1.0, 3.0, 5.0, 7.0, 9.0), low=0.5, high=10.0, log=True)

_RISK_VARIANTS = {"cvar": {"mu": MU_CVAR}, "cvar_official": {"mu": MU_CVAR}, "erm": {"mu": MU_ERM}}

SPACES: dict[str, ObjectiveSpace] = {
    "tdpo1": ObjectiveSpace(name="tdpo1", family="risk", robustness=(), params={"beta": BETA}),
    "tdpo2": ObjectiveSpace(
        name="tdpo2", family="risk", robustness=("alpha",), params={"beta": BETA, "alpha": ALPHA}
    ),
    "radpo1": ObjectiveSpace(
        name="radpo1",
        family="risk",
        robustness=("mu",),
        params={"beta": BETA, "mu": MU_CVAR},
        variant_param="risk",
        default_variant="cvar",
        variants=_RISK_VARIANTS,
    ),
    "radpo2": ObjectiveSpace(
        name="radpo2",
        family="risk",
        robustness=("mu", "alpha"),
        params={"beta": BETA, "mu": MU_CVAR, "alpha": ALPHA},
        variant_param="risk",
        default_variant="cvar",
        variants=_RISK_VARIANTS,
    ),
}
