"""Search spaces of the distributionally robust objectives: KLDPO, WDPO, DoRA (pairwise and PL).

- KLDPO `tau` (Xu et al. 2025, arXiv 2502.01930, section 5): temperature of the KL-DRO tilt, in loss
  units; small tau is an aggressive tilt towards high-loss pairs, tau -> inf gives DPO.  Paper grids:
  Emotion {0.5, 0.75, 1}, ArmoRM {1, 5}, LLaMA {0.005 .. 0.1} (OBJECTIVES.md 5.3).
- WDPO `rho` (same paper, section 4): the Wasserstein radius weighting the embedding-gradient
  penalty.  The "pointwise" form (mean of l_i + rho g_i) and the "sqrt" form (Alg. 1,
  mean l + rho sqrt(mean g)) have rho scales that are not comparable (OBJECTIVES.md 4.4), so each
  `penalty` variant has its own range.
- DoRA `lam` (Zhu et al. 2025, arXiv 2504.05831, section 6.3): the KL-DRO temperature over the
  calibrated losses; lam -> inf with calibration 1 gives DPO; the authors use 1.0.
"""

from __future__ import annotations

from tune_spaces.space import BETA, ObjectiveSpace, ParamSpace

TAU = ParamSpace(small=(0.5,), wide=(0.1, 0.5, 1.0, 5.0), low=0.01, high=10.0, log=True)

# Pointwise form: the official README's 0.01 and the ArmoRM grid {0.005, 0.01}.
RHO_POINTWISE = ParamSpace(small=(0.01,), wide=(0.001, 0.005, 0.01, 0.05, 0.1), low=1e-4, high=1.0, log=True)
# sqrt form (Alg. 1): the Emotion grid rho_o in {50, 75, 100}.
RHO_SQRT = ParamSpace(small=(50.0,), wide=(25.0, 50.0, 75.0, 100.0), low=1.0, high=200.0, log=True)

LAM = ParamSpace(small=(1.0,), wide=(0.25, 0.5, 1.0, 2.0, 5.0), low=0.1, high=10.0, log=True)

SPACES: dict[str, ObjectiveSpace] = {
    "kldpo": ObjectiveSpace(
        name="kldpo", family="distributional", robustness=("tau",), params={"beta": BETA, "tau": TAU}
    ),
    "wdpo": ObjectiveSpace(
        name="wdpo",
        family="distributional",
        robustness=("rho",),
        params={"beta": BETA, "rho": RHO_POINTWISE},
        variant_param="penalty",
        default_variant="pointwise",
        variants={"pointwise": {"rho": RHO_POINTWISE}, "sqrt": {"rho": RHO_SQRT}},
    ),
    "dora": ObjectiveSpace(
        name="dora", family="distributional", robustness=("lam",), params={"beta": BETA, "lam": LAM}
    ),
    "dora_pl": ObjectiveSpace(
        name="dora_pl", family="distributional", robustness=("lam",), params={"beta": BETA, "lam": LAM}
    ),
}
