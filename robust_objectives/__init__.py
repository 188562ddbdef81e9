"""Every objective of the four papers as a pure function of log-prob tensors (torch + stdlib only).

    from robust_objectives import OBJECTIVES, get_objective, PreferenceLogps
    out = get_objective("kldpo")(inputs, beta=0.1, tau=1.0)   # out.loss, out.losses, out.metrics

Call shape (the same for every name): fn(inputs, *, <hyperparameters>, gather=None) -> ObjectiveOutput.
`gather` is accepted by all objectives so the training stage can pass it uniformly; only the
BATCH_COUPLED ones use it (global_batch.py explains the contract). OBJECTIVES is the single list
of names: config validation, CLI help and the README table derive from it.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

from robust_objectives.distributional import dora, drdpo, kldpo
from robust_objectives.dpo import dpo, ipo
from robust_objectives.hyperparameters import RISK_MEASURES, check_hyperparameters
from robust_objectives.label_noise import cdpo, rdpo
from robust_objectives.listwise import dora_pl, dpo_pl
from robust_objectives.risk import radpo1, radpo2, tdpo1, tdpo2
from robust_objectives.types import GatherFn, ListwiseLogps, ObjectiveOutput, PreferenceLogps
from robust_objectives.wasserstein import wdpo

__all__ = [
    "BATCH_COUPLED",
    "GatherFn",
    "LISTWISE",
    "ListwiseLogps",
    "NEEDS_EMBEDDINGS",
    "OBJECTIVES",
    "ObjectiveOutput",
    "PreferenceLogps",
    "RISK_MEASURES",
    "TOKEN_LEVEL",
    "get_objective",
    "objective_hyperparameters",
    "validate_hyperparameters",
]

OBJECTIVES: dict[str, Callable[..., ObjectiveOutput]] = {
    "dpo": dpo,
    "ipo": ipo,
    "cdpo": cdpo,
    "rdpo": rdpo,
    "drdpo": drdpo,
    "kldpo": kldpo,
    "wdpo": wdpo,
    "tdpo1": tdpo1,
    "tdpo2": tdpo2,
    "radpo1": radpo1,
    "radpo2": radpo2,
    "dora": dora,
    "dpo_pl": dpo_pl,
    "dora_pl": dora_pl,
}

# Objectives whose per-example weights depend on other examples of the batch: the training stage
# must pass `gather` so their statistics are over the global batch, and gradient accumulation over
# micro-batches changes their meaning. wdpo is coupled only with penalty="sqrt" (mean g under the
# sqrt); with the default "pointwise" it ignores gather.
BATCH_COUPLED = frozenset({"drdpo", "kldpo", "dora", "dora_pl", "wdpo"})
# Objectives that need per-position full-vocabulary log-probs (policy and reference) and masks.
TOKEN_LEVEL = frozenset({"tdpo1", "tdpo2", "radpo1", "radpo2"})
# Objectives that take ListwiseLogps (B, K) instead of PreferenceLogps.
LISTWISE = frozenset({"dpo_pl", "dora_pl"})
# Objectives that need policy_input_embeddings kept in the graph (double backward).
NEEDS_EMBEDDINGS = frozenset({"wdpo"})


def get_objective(name: str) -> Callable[..., ObjectiveOutput]:
    """Returns the objective function registered under `name`.

    Raises:
        ValueError: naming the unknown objective and listing the sorted valid names.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def objective_hyperparameters(name: str) -> dict[str, Any]:
    """Keyword-only hyperparameters of an objective and their defaults (inputs and gather excluded).

    Example: objective_hyperparameters("kldpo") == {"beta": 0.1, "tau": 1.0, "normalize": False,
    "max_weight": 10.0}.
    """
    parameters = inspect.signature(get_objective(name)).parameters.values()
    return {
        p.name: p.default
        for p in parameters
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "gather"
    }


def validate_hyperparameters(name: str, hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """Checks a user's hyperparameters before training starts and fills in the defaults.

    Args:
        name: objective name.
        hyperparameters: a subset of objective_hyperparameters(name) with the user's values.

    Returns:
        All hyperparameters of the objective (defaults overridden by the given values).

    Raises:
        ValueError: unknown objective, unknown hyperparameter (listing the valid ones), or a value
            out of range (one line naming the objective, the hyperparameter and the range).
    """
    defaults = objective_hyperparameters(name)
    unknown = sorted(set(hyperparameters) - set(defaults))
    if unknown:
        raise ValueError(
            f"{name}: unknown hyperparameter(s) {', '.join(unknown)}; valid: {', '.join(sorted(defaults))}"
        )
    resolved = {**defaults, **hyperparameters}
    check_hyperparameters(name, resolved)
    return resolved
