"""The registry: names, hyperparameters and defaults exactly as issue 2's table, and clear errors."""

from __future__ import annotations

import pytest
import torch

import robust_objectives
from robust_objectives import (
    BATCH_COUPLED,
    LISTWISE,
    NEEDS_CALIBRATION,
    NEEDS_EMBEDDINGS,
    OBJECTIVES,
    SPECS,
    TOKEN_LEVEL,
    UnknownHyperparameterError,
    UnknownObjectiveError,
    get_objective,
    objective_hyperparameters,
    validate_hyperparameters,
)

# Issue 2's table, transcribed: name -> hyperparameters and defaults.
TABLE = {
    "dpo": {"beta": 0.1},
    "ipo": {"beta": 0.1},
    "cdpo": {"beta": 0.1, "label_smoothing": 0.1},
    "rdpo": {"beta": 0.1, "label_smoothing": 0.1},
    "drdpo": {"beta": 0.1, "beta_prime": 1.0},
    "kldpo": {"beta": 0.1, "tau": 1.0, "normalize": False, "max_weight": 10.0},
    "wdpo": {"beta": 0.1, "rho": 0.01, "penalty": "pointwise"},
    "tdpo1": {"beta": 0.1},
    "tdpo2": {"beta": 0.1, "alpha": 0.5},
    "radpo1": {"beta": 0.1, "mu": 0.95, "risk": "cvar"},
    "radpo2": {"beta": 0.1, "alpha": 0.5, "mu": 0.95, "risk": "cvar"},
    "dora": {"beta": 0.1, "lam": 1.0},
    "dpo_pl": {"beta": 0.1},
    "dora_pl": {"beta": 0.1, "lam": 1.0},
}


def test_names_hyperparameters_and_defaults_match_the_table():
    assert set(OBJECTIVES) == set(TABLE)
    for name, expected in TABLE.items():
        assert objective_hyperparameters(name) == expected, name
        assert validate_hyperparameters(name, {}) == expected


def test_capability_sets_are_subsets_of_the_registry():
    for subset in (BATCH_COUPLED, TOKEN_LEVEL, LISTWISE, NEEDS_EMBEDDINGS, NEEDS_CALIBRATION):
        assert subset <= set(OBJECTIVES)
    assert LISTWISE == {"dpo_pl", "dora_pl"} and NEEDS_EMBEDDINGS == {"wdpo"}
    assert TOKEN_LEVEL == {"tdpo1", "tdpo2", "radpo1", "radpo2"}
    assert {"drdpo", "kldpo", "dora", "dora_pl"} <= BATCH_COUPLED
    assert NEEDS_CALIBRATION == {"dora", "dora_pl"}
    assert list(OBJECTIVES) == list(SPECS) and all(OBJECTIVES[n] is SPECS[n].fn for n in SPECS)


def test_needs_calibration_matches_what_the_objective_reads():
    """The table's flag agrees with the objective: without calibration it fails naming the field."""
    import dataclasses

    from objective_inputs import make_inputs

    for name in OBJECTIVES:
        inputs, _ = make_inputs(name)
        if not hasattr(inputs, "calibration") or inputs.calibration is None:
            continue
        stripped = dataclasses.replace(inputs, calibration=None)
        if name in NEEDS_CALIBRATION:
            with pytest.raises(ValueError, match="calibration"):
                get_objective(name)(stripped)
        else:
            get_objective(name)(stripped)


def test_only_coupled_objectives_take_gather_and_exports_are_public():
    import inspect

    for name, fn in OBJECTIVES.items():
        parameters = inspect.signature(fn).parameters
        if name in BATCH_COUPLED:
            gather = parameters["gather"]
            assert gather.default is None and gather.kind is inspect.Parameter.KEYWORD_ONLY, name
        else:
            assert "gather" not in parameters, name
        assert fn.__doc__ and "Args:" in fn.__doc__ and "Returns:" in fn.__doc__, name
        assert ("**Batch-coupled" in fn.__doc__) == (name in BATCH_COUPLED), name  # flagged (STYLE.md G9)
    for symbol in ("PreferenceLogps", "ListwiseLogps", "ObjectiveOutput"):
        assert hasattr(robust_objectives, symbol)


def test_unknown_objective_lists_the_sorted_names():
    with pytest.raises(ValueError) as error:
        get_objective("dpo2")
    assert "'dpo2'" in str(error.value) and ", ".join(sorted(OBJECTIVES)) in str(error.value)
    assert isinstance(error.value, UnknownObjectiveError)
    assert error.value.name == "dpo2" and error.value.valid == tuple(sorted(OBJECTIVES))
    with pytest.raises(UnknownObjectiveError):
        validate_hyperparameters("dpo2", {})


def test_unknown_hyperparameter_carries_the_names_for_callers():
    with pytest.raises(UnknownHyperparameterError) as error:
        validate_hyperparameters("kldpo", {"tua": 1.0, "rho": 0.1})
    assert (error.value.objective, error.value.unknown) == ("kldpo", ("rho", "tua"))
    assert error.value.valid == ("beta", "max_weight", "normalize", "tau")
    # Names only: a search space's values are not checked (a list is not a number).
    assert validate_hyperparameters("kldpo", {"tau": [0.5, 1.0]}, check_values=False)["tau"] == [0.5, 1.0]
    with pytest.raises(UnknownHyperparameterError):
        validate_hyperparameters("kldpo", {"tua": [0.5]}, check_values=False)


@pytest.mark.parametrize(
    "name, hyper, message",
    [
        ("rdpo", {"label_smoothing": 0.5}, r"rdpo: label_smoothing must be in \[0, 0.5\)"),
        ("rdpo", {"label_smoothing": -0.1}, r"rdpo: label_smoothing"),
        ("cdpo", {"label_smoothing": 0.7}, r"cdpo: label_smoothing must be in \[0, 0.5\]"),
        ("kldpo", {"tau": 0.0}, "kldpo: tau must be > 0"),
        ("kldpo", {"normalize": "yes"}, "kldpo: normalize must be true or false"),
        ("kldpo", {"max_weight": float("inf")}, "kldpo: max_weight must be finite"),
        ("drdpo", {"beta_prime": -1.0}, "drdpo: beta_prime must be > 0"),
        ("dpo", {"beta": 0}, "dpo: beta must be > 0"),
        ("dpo", {"beta": True}, "dpo: beta must be a number"),
        ("dora", {"lam": 0.0}, "dora: lam must be > 0"),
        ("wdpo", {"rho": -0.1}, "wdpo: rho must be >= 0"),
        ("wdpo", {"penalty": "l2"}, r"wdpo: penalty must be one of \['pointwise', 'sqrt'\]"),
        ("radpo1", {"mu": 0.0}, r"radpo1: mu \(CVaR level, risk='cvar'\) must be in \(0, 1\]"),
        ("radpo1", {"mu": 1.5}, r"must be in \(0, 1\]"),
        ("radpo2", {"mu": 1.5, "risk": "cvar_official"}, r"risk='cvar_official'\) must be in \(0, 1\]"),
        ("radpo2", {"mu": 0.0, "risk": "erm"}, r"radpo2: mu \(entropic risk coefficient\) must be > 0"),
        ("radpo1", {"risk": "var"}, r"radpo1: risk must be one of \['cvar', 'cvar_official', 'erm'\]"),
        ("tdpo2", {"alpha": -1.0}, "tdpo2: alpha must be >= 0"),
        ("dpo", {"tau": 1.0}, "dpo: unknown hyperparameter.*tau; valid: beta"),
    ],
)
def test_bad_hyperparameters_fail_with_one_clear_line(name, hyper, message):
    with pytest.raises(ValueError, match=message) as error:
        validate_hyperparameters(name, hyper)
    assert "\n" not in str(error.value)


def test_objectives_validate_on_call_too():
    from objective_inputs import make_inputs

    inputs, _ = make_inputs("rdpo")
    with pytest.raises(ValueError, match="rdpo: label_smoothing"):
        get_objective("rdpo")(inputs, label_smoothing=0.5)
    assert validate_hyperparameters("radpo1", {"risk": "erm", "mu": 5}) == {"beta": 0.1, "mu": 5, "risk": "erm"}


def test_wrong_container_or_missing_fields_are_named():
    from objective_inputs import make_inputs

    pairs, _ = make_inputs("dpo")
    lists, _ = make_inputs("dpo_pl")
    with pytest.raises(TypeError, match="dpo_pl takes ListwiseLogps, got PreferenceLogps"):
        get_objective("dpo_pl")(pairs)
    with pytest.raises(TypeError, match="kldpo takes PreferenceLogps, got ListwiseLogps"):
        get_objective("kldpo")(lists)
    import dataclasses

    with pytest.raises(ValueError, match="ipo needs inputs.chosen_lengths"):
        get_objective("ipo")(dataclasses.replace(pairs, chosen_lengths=None))
    with pytest.raises(ValueError, match="radpo1 needs inputs.rejected_mask"):
        get_objective("radpo1")(dataclasses.replace(pairs, rejected_mask=None))
    with pytest.raises(ValueError, match="dora needs inputs.calibration"):
        get_objective("dora")(dataclasses.replace(pairs, calibration=None))
    with pytest.raises(ValueError, match="dora_pl needs inputs.calibration"):
        get_objective("dora_pl")(dataclasses.replace(lists, calibration=None))
    bad = torch.tensor([1.0, -0.5, 2.0, 1.0], dtype=torch.float64)
    with pytest.raises(ValueError, match="dora: inputs.calibration must be finite and >= 0"):
        get_objective("dora")(dataclasses.replace(pairs, calibration=bad))
    with pytest.raises(ValueError, match="dora_pl: inputs.calibration must be finite"):
        get_objective("dora_pl")(dataclasses.replace(lists, calibration=lists.calibration * float("nan")))
