"""Every objective of the four papers as a pure function of log-prob tensors (torch + stdlib only).

    from robust_objectives import OBJECTIVES, get_objective, PreferenceLogps
    out = get_objective("kldpo")(inputs, beta=0.1, tau=1.0)   # out.loss, out.losses, out.metrics

Call shape: fn(inputs, *, <hyperparameters>) -> ObjectiveOutput; the BATCH_COUPLED objectives also
take `gather=None` (global_batch.py explains the contract), and only they are passed it. SPECS is
the single table of objectives: name -> function and what it needs (token-level distributions,
input embeddings, calibration, lists) and whether it couples the batch. OBJECTIVES and the
capability sets below derive from it; config validation, CLI help and the README table from those.
Every objective's `metrics` carry the TRL-compatible rewards/chosen, rewards/rejected,
rewards/margins and rewards/accuracies at its own implicit reward, plus rewards/accuracy_delta;
they are the only definition of those numbers (listwise: chosen and rejected are the top- and
bottom-scored responses, ranked by `rank_by_scores`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from robust_objectives.distributional import dora, drdpo, kldpo
from robust_objectives.dpo import dpo, ipo
from robust_objectives.hyperparameters import RISK_MEASURES, check_hyperparameters
from robust_objectives.label_noise import cdpo, rdpo
from robust_objectives.listwise import dora_pl, dpo_pl, rank_by_scores
from robust_objectives.risk import radpo1, radpo2, tdpo1, tdpo2
from robust_objectives.types import GatherFn, ListwiseLogps, ObjectiveOutput, PreferenceLogps
from robust_objectives.wasserstein import wdpo

__all__ = [
    "BATCH_COUPLED",
    "GatherFn",
    "LISTWISE",
    "ListwiseLogps",
    "NEEDS_CALIBRATION",
    "NEEDS_EMBEDDINGS",
    "OBJECTIVES",
    "ObjectiveOutput",
    "ObjectiveSpec",
    "PreferenceLogps",
    "RISK_MEASURES",
    "SPECS",
    "TOKEN_LEVEL",
    "UnknownHyperparameterError",
    "UnknownObjectiveError",
    "get_objective",
    "get_spec",
    "objective_hyperparameters",
    "rank_by_scores",
    "validate_hyperparameters",
]


@dataclass(frozen=True)
class ObjectiveSpec:
    """One objective and what the training stage must give it.

    Attributes:
        fn: the objective function.
        listwise: takes ListwiseLogps (B, K) instead of PreferenceLogps.
        token_level: needs per-position full-vocabulary log-probs (policy and reference) and masks.
        needs_embeddings: needs policy_input_embeddings kept in the graph (double backward).
        needs_calibration: needs DoRA's calibration values h~ (a `calibration` dataset column).
        batch_coupled: per-example weights depend on other examples of the batch; the function
            takes `gather`, the training stage passes it so the statistics are over the global
            batch, and gradient accumulation over micro-batches changes their meaning.
    """

    fn: Callable[..., ObjectiveOutput]
    listwise: bool = False
    token_level: bool = False
    needs_embeddings: bool = False
    needs_calibration: bool = False
    batch_coupled: bool = False


# wdpo is coupled only with penalty="sqrt" (mean g under the sqrt); with the default "pointwise"
# it ignores gather.
SPECS: dict[str, ObjectiveSpec] = {
    "dpo": ObjectiveSpec(dpo),
    "ipo": ObjectiveSpec(ipo),
    "cdpo": ObjectiveSpec(cdpo),
    "rdpo": ObjectiveSpec(rdpo),
    "drdpo": ObjectiveSpec(drdpo, batch_coupled=True),
    "kldpo": ObjectiveSpec(kldpo, batch_coupled=True),
    "wdpo": ObjectiveSpec(wdpo, needs_embeddings=True, batch_coupled=True),
    "tdpo1": ObjectiveSpec(tdpo1, token_level=True),
    "tdpo2": ObjectiveSpec(tdpo2, token_level=True),
    "radpo1": ObjectiveSpec(radpo1, token_level=True),
    "radpo2": ObjectiveSpec(radpo2, token_level=True),
    "dora": ObjectiveSpec(dora, needs_calibration=True, batch_coupled=True),
    "dpo_pl": ObjectiveSpec(dpo_pl, listwise=True),
    "dora_pl": ObjectiveSpec(dora_pl, listwise=True, needs_calibration=True, batch_coupled=True),
}

OBJECTIVES: dict[str, Callable[..., ObjectiveOutput]] = {name: spec.fn for name, spec in SPECS.items()}
BATCH_COUPLED = frozenset(name for name, spec in SPECS.items() if spec.batch_coupled)
TOKEN_LEVEL = frozenset(name for name, spec in SPECS.items() if spec.token_level)
LISTWISE = frozenset(name for name, spec in SPECS.items() if spec.listwise)
NEEDS_EMBEDDINGS = frozenset(name for name, spec in SPECS.items() if spec.needs_embeddings)
NEEDS_CALIBRATION = frozenset(name for name, spec in SPECS.items() if spec.needs_calibration)


class UnknownObjectiveError(ValueError):
    """A name that is not in SPECS; callers may re-word it from `.name` and `.valid` (sorted)."""

    def __init__(self, name: object, valid: Iterable[str]) -> None:
        self.name, self.valid = name, tuple(sorted(valid))
        super().__init__(f"unknown objective {name!r}; valid: {', '.join(self.valid)}")


class UnknownHyperparameterError(ValueError):
    """Keys an objective does not take; callers may re-word it from `.objective`, `.unknown` and
    `.valid` (both sorted)."""

    def __init__(self, objective: str, unknown: Iterable[str], valid: Iterable[str]) -> None:
        self.objective, self.unknown, self.valid = objective, tuple(sorted(unknown)), tuple(sorted(valid))
        super().__init__(
            f"{objective}: unknown hyperparameter(s) {', '.join(self.unknown)}; valid: {', '.join(self.valid)}"
        )


def get_spec(name: str) -> ObjectiveSpec:
    """The SPECS entry of `name`.

    Raises:
        UnknownObjectiveError (a ValueError): naming the unknown objective and listing the sorted
            valid names. This is the only place an objective name is checked.
    """
    if name not in SPECS:
        raise UnknownObjectiveError(name, SPECS)
    return SPECS[name]


def get_objective(name: str) -> Callable[..., ObjectiveOutput]:
    """Returns the objective function registered under `name` (UnknownObjectiveError if none)."""
    return get_spec(name).fn


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


def validate_hyperparameters(
    name: str, hyperparameters: Mapping[str, Any], *, check_values: bool = True
) -> dict[str, Any]:
    """Checks a user's hyperparameters before training starts and fills in the defaults.

    Args:
        name: objective name.
        hyperparameters: a subset of objective_hyperparameters(name) with the user's values.
        check_values: False checks the names only (a search space's values are domains or lists).

    Returns:
        All hyperparameters of the objective (defaults overridden by the given values).

    Raises:
        UnknownObjectiveError: unknown objective (from get_spec).
        UnknownHyperparameterError: a key the objective does not take (listing the valid ones);
            this is the only place hyperparameter names are checked.
        ValueError: a value out of range (one line naming the objective, the hyperparameter and
            the range).
    """
    defaults = objective_hyperparameters(name)
    unknown = set(hyperparameters) - set(defaults)
    if unknown:
        raise UnknownHyperparameterError(name, unknown, defaults)
    resolved = {**defaults, **hyperparameters}
    if check_values:
        check_hyperparameters(name, resolved)
    return resolved
