"""Search spaces as data, one module per objective family, validated against the objective registry.

    from tune_spaces import build_param_space, ROBUSTNESS_PARAM
    build_param_space("kldpo")                 # {"objective": {"name": "kldpo", "beta": 0.1, "tau": 0.5}}
    build_param_space("kldpo", wide=True)      # paper grids: tune.grid_search over beta and tau
    build_param_space("kldpo", grid=False)     # tune.loguniform domains for Optuna / random search
    build_param_space("radpo2", overrides={"risk": "erm", "mu": [5, 9]})

The returned dict mirrors the train config (`objective.name`, `objective.beta`, `objective.<param>`),
so a trial's config is the train config's `objective` section.  Every hyperparameter named here or
in `overrides` must be one the registry's objective accepts
(`robust_objectives.objective_hyperparameters(name)`); a typo is a ValueError naming the valid keys.
This package may import `ray.tune` (for its primitives) but never `pipelines` (STYLE.md G4).
"""

from __future__ import annotations

import itertools
from typing import Any, Iterable, Mapping, Optional

from tune_spaces import baselines, distributional, risk
from tune_spaces.space import ObjectiveSpace, ParamSpace

SPACES: dict[str, ObjectiveSpace] = {**baselines.SPACES, **distributional.SPACES, **risk.SPACES}

# The hyperparameter that sets each objective's robustness (radius, temperature, risk level, noise
# rate), or None where the objective has none (beta is then the only knob).  Ra-DPO2's second one,
# alpha, is in ROBUSTNESS_PARAMS.
ROBUSTNESS_PARAM: dict[str, Optional[str]] = {
    name: (space.robustness[0] if space.robustness else None) for name, space in SPACES.items()
}
ROBUSTNESS_PARAMS: dict[str, tuple[str, ...]] = {name: space.robustness for name, space in SPACES.items()}


def get_space(objective: str) -> ObjectiveSpace:
    """The `ObjectiveSpace` of `objective`; a ValueError listing the valid names if unknown.

    The name is checked by the registry (`robust_objectives.get_objective`); this re-words it.
    """
    from robust_objectives import UnknownObjectiveError, get_objective

    try:
        get_objective(objective)
    except UnknownObjectiveError as error:
        raise ValueError(f"unknown objective '{error.name}'; valid objectives: {', '.join(error.valid)}") from error
    return SPACES[objective]


def registry_hyperparameters(objective: str) -> set[str]:
    """The hyperparameter names the registry's `objective` accepts (beta included)."""
    from robust_objectives import objective_hyperparameters

    return set(objective_hyperparameters(objective))


def validate_keys(objective: str, keys: Iterable[str], where: str = "overrides") -> None:
    """Raise ValueError if any of `keys` is not a hyperparameter of the registry's `objective`.

    The registry checks the names (`robust_objectives.validate_hyperparameters`, values left alone:
    here they are grids and domains); this re-words its error with `where`.
    """
    from robust_objectives import UnknownHyperparameterError, validate_hyperparameters

    try:
        validate_hyperparameters(objective, dict.fromkeys(keys), check_values=False)
    except UnknownHyperparameterError as error:
        raise ValueError(
            f"{where}: objective '{objective}' has no hyperparameter '{error.unknown[0]}'; "
            f"valid keys: {', '.join(error.valid)}"
        ) from error


def input_keys(objective: str) -> tuple[str, ...]:
    """Keys of an objective section that choose an input rather than a hyperparameter: `calibration`
    (which column is DoRA's h~: calibration, calibration_oracle, or one) for objectives that read one."""
    from robust_objectives import get_spec

    return ("calibration",) if get_spec(objective).needs_calibration else ()


def _resolve(
    objective: str, overrides: Optional[Mapping[str, Any]]
) -> tuple[ObjectiveSpace, dict[str, ParamSpace], dict[str, Any]]:
    """Check `objective` and `overrides` against the registry; pick the variant's params."""
    space = get_space(objective)
    overrides = dict(overrides or {})
    if "name" in overrides:
        raise ValueError("overrides: 'name' is the objective itself; pass it as `objective`")
    validate_keys(objective, space.params, where=f"tune_spaces.{space.family}")
    validate_keys(objective, [k for k in overrides if k not in input_keys(objective)])
    variant = space.default_variant
    if space.variant_param is not None and space.variant_param in overrides:
        variant = overrides[space.variant_param]
        if not isinstance(variant, str):
            raise ValueError(
                f"overrides: '{space.variant_param}' of objective '{objective}' changes the scale of "
                f"the other parameters, so sweep one value at a time (got {variant!r})"
            )
    return space, space.params_for(variant), overrides


def _override_value(value: Any, *, grid: bool) -> Any:
    """A user override: a list/tuple is swept (grid: grid_search; search: choice), a scalar is fixed."""
    from ray import tune

    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("overrides: an empty list sweeps nothing")
        values = list(value)
        if len(values) == 1:
            return values[0]
        return tune.grid_search(values) if grid else tune.choice(values)
    return value  # a scalar, or a ray.tune Domain passed through as is


def _is_domain(value: Any) -> bool:
    from ray.tune.search.sample import Domain

    return isinstance(value, Domain)


def _param_value(param: ParamSpace, *, grid: bool, wide: bool) -> Any:
    from ray import tune

    if grid:
        values = list(param.wide if wide else param.small)
        return values[0] if len(values) == 1 else tune.grid_search(values)
    return tune.loguniform(param.low, param.high) if param.log else tune.uniform(param.low, param.high)


def build_param_space(
    objective: str,
    *,
    grid: bool = True,
    wide: bool = False,
    overrides: Optional[Mapping[str, Any]] = None,
) -> dict[str, Any]:
    """The Ray Tune `param_space` of one objective, mirroring the train config's `objective` section.

    Args:
        objective: a registry name (`dpo`, `kldpo`, `radpo2`, ...).
        grid: True: `tune.grid_search` over the grid values (single values become constants);
            False: `tune.uniform` / `tune.loguniform` domains for Optuna or random search.
        wide: with `grid=True`, use the wide grids for real use instead of the small default.
        overrides: hyperparameter -> value.  A scalar fixes it, a list sweeps it (grid_search or
            choice), a `ray.tune` domain is used as is.  Keys must be registry hyperparameters of
            `objective`; setting Ra-DPO's `risk` or WDPO's `penalty` switches the space of the
            parameter whose scale it changes.

    Returns:
        `{"objective": {"name": objective, "beta": ..., <robustness param>: ..., ...}}`.

    Raises:
        ValueError: unknown objective or hyperparameter (naming the valid ones).
    """
    space, params, overrides = _resolve(objective, overrides)
    section: dict[str, Any] = {"name": objective}
    for key, param in params.items():
        section[key] = _param_value(param, grid=grid, wide=wide)
    for key, value in overrides.items():
        section[key] = _override_value(value, grid=grid)
    return {"objective": section}


def list_grid_points(
    objective: str, *, wide: bool = False, overrides: Optional[Mapping[str, Any]] = None
) -> list[dict[str, Any]]:
    """Every point of the objective's grid as an explicit `objective` section, in a fixed order.

    The product is taken over the swept parameters in the space's order (beta first), each in the
    order of its grid; overrides given as lists are swept too, scalars fixed.  A list of variants
    (Ra-DPO's `risk: [cvar, erm]`) concatenates each variant's grid.  Ray Tune domains in
    `overrides` are rejected here (an explicit grid has no random part).
    """
    space = get_space(objective)
    variants = (overrides or {}).get(space.variant_param) if space.variant_param else None
    if isinstance(variants, (list, tuple)):  # several variants: each one's own grid, in the order given
        return [point for variant in variants for point in list_grid_points(
            objective, wide=wide, overrides={**overrides, space.variant_param: variant})]
    space, params, overrides = _resolve(objective, overrides)
    axes: dict[str, list[Any]] = {k: list(p.wide if wide else p.small) for k, p in params.items()}
    for key, value in overrides.items():
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("overrides: an empty list sweeps nothing")
            axes[key] = list(value)
        elif _is_domain(value):
            raise ValueError(f"overrides: '{key}' is a random domain; a grid needs explicit values")
        else:
            axes[key] = [value]
    keys = list(axes)
    return [{"name": objective, **dict(zip(keys, combo))} for combo in itertools.product(*axes.values())]


def build_sweep_space(
    objectives: Iterable[str],
    *,
    wide: bool = False,
    overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> dict[str, Any]:
    """One grid over several objectives: `{"objective": tune.grid_search([section, ...])}`.

    A product of per-objective grids would be wrong here (each objective has its own parameters),
    so the sections are listed explicitly (`list_grid_points`), objective by objective.

    Args:
        objectives: registry names, swept in this order.
        wide: use the wide grids.
        overrides: objective name -> that objective's overrides (see `build_param_space`).
    """
    from ray import tune

    objectives = list(objectives)
    overrides = dict(overrides or {})
    stray = sorted(set(overrides) - set(objectives))
    if stray:
        raise ValueError(f"overrides given for '{stray[0]}', which is not among the swept objectives")
    if not objectives:
        raise ValueError("no objectives to sweep")
    sections: list[dict[str, Any]] = []
    for name in objectives:
        sections.extend(list_grid_points(name, wide=wide, overrides=overrides.get(name)))
    return {"objective": tune.grid_search(sections)}


__all__ = [
    "ObjectiveSpace",
    "ParamSpace",
    "ROBUSTNESS_PARAM",
    "ROBUSTNESS_PARAMS",
    "SPACES",
    "build_param_space",
    "build_sweep_space",
    "get_space",
    "list_grid_points",
    "registry_hyperparameters",
    "validate_keys",
]
