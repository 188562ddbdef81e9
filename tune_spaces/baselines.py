"""Search spaces of the baselines: DPO, IPO, cDPO, rDPO, Dr.DPO (and listwise DPO-PL).

Grids follow the papers (OBJECTIVES.md section 2): `label_smoothing` is the assumed flip rate eps
of cDPO/rDPO (rDPO's loss divides by 1 - 2 eps, so eps must stay below 0.5; Chowdhury et al. 2024,
arXiv 2403.00409, Eq. 6); Dr.DPO's `beta_prime` is the temperature of its log-mean-exp over the
batch (Wu et al. 2025, arXiv 2407.07880, Eq. 9), beta' -> inf gives DPO, small beta' down-weights
high-loss (likely flipped) pairs.
"""

from __future__ import annotations

from tune_spaces.space import BETA, ObjectiveSpace, ParamSpace

# eps in [0, 0.5): the assumed label-flip rate.  0.1 is TRL's / the default.
LABEL_SMOOTHING = ParamSpace(small=(0.1,), wide=(0.05, 0.1, 0.2, 0.3, 0.4), low=0.0, high=0.45)

# beta' > 0 in loss units (a per-pair DPO loss is ~0.69 at initialisation); paper grid {0.5, 1, 2}.
BETA_PRIME = ParamSpace(small=(1.0,), wide=(0.25, 0.5, 1.0, 2.0, 4.0), low=0.1, high=10.0, log=True)

SPACES: dict[str, ObjectiveSpace] = {
    "dpo": ObjectiveSpace(name="dpo", family="baselines", robustness=(), params={"beta": BETA}),
    # IPO's beta is its regulariser (target margin 1/(2 beta)); TRL's per-token form.
    "ipo": ObjectiveSpace(name="ipo", family="baselines", robustness=(), params={"beta": BETA}),
    "cdpo": ObjectiveSpace(
        name="cdpo",
        family="baselines",
        robustness=("label_smoothing",),
        params={"beta": BETA, "label_smoothing": LABEL_SMOOTHING},
    ),
    "rdpo": ObjectiveSpace(
        name="rdpo",
        family="baselines",
        robustness=("label_smoothing",),
        params={"beta": BETA, "label_smoothing": LABEL_SMOOTHING},
    ),
    "drdpo": ObjectiveSpace(
        name="drdpo",
        family="baselines",
        robustness=("beta_prime",),
        params={"beta": BETA, "beta_prime": BETA_PRIME},
    ),
    # Listwise Plackett-Luce DPO: the non-robust baseline of DoRA-PL (needs listwise data).
    "dpo_pl": ObjectiveSpace(name="dpo_pl", family="baselines", robustness=(), params={"beta": BETA}),
}
