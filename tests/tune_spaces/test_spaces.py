"""Search spaces: complete over the registry, validated against it, and sampled into valid configs."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
from ray import tune
from ray.tune.search.sample import Domain
from ray.tune.search.variant_generator import generate_variants

import robust_objectives
import tune_spaces
from tune_spaces import (
    ROBUSTNESS_PARAM,
    ROBUSTNESS_PARAMS,
    SPACES,
    build_param_space,
    build_sweep_space,
    list_grid_points,
)


def _resolved(space: dict) -> list[dict]:
    """Every variant Tune would run for `space` (grid expanded, domains sampled once)."""
    return [spec for _, spec in generate_variants(space)]


def test_every_registry_objective_has_a_space_and_nothing_else():
    assert set(SPACES) == set(robust_objectives.OBJECTIVES)


def test_robustness_parameters_are_the_papers():
    expected = {
        "kldpo": "tau", "wdpo": "rho", "radpo1": "mu", "radpo2": "mu", "drdpo": "beta_prime",
        "rdpo": "label_smoothing", "cdpo": "label_smoothing", "dora": "lam", "dora_pl": "lam",
        "tdpo2": "alpha", "dpo": None, "ipo": None, "tdpo1": None, "dpo_pl": None,
    }
    assert ROBUSTNESS_PARAM == expected
    assert ROBUSTNESS_PARAMS["radpo2"] == ("mu", "alpha")


@pytest.mark.parametrize("name", sorted(SPACES))
def test_space_keys_are_registry_hyperparameters_and_defaults_valid(name):
    valid = set(robust_objectives.objective_hyperparameters(name))
    space = SPACES[name]
    assert "beta" in space.params and set(space.params) <= valid
    for variant in [None, *space.variants]:
        for key, param in space.params_for(variant).items():
            assert key in valid
            # every grid value lies inside the random-search domain, so grids and Optuna agree
            for value in (*param.small, *param.wide):
                assert param.low <= value <= param.high, (name, key, value)
    if space.variant_param is not None:
        assert robust_objectives.objective_hyperparameters(name)[space.variant_param] == space.default_variant


@pytest.mark.parametrize("name", sorted(SPACES))
@pytest.mark.parametrize("mode", ["small", "wide", "search"])
def test_every_space_samples_into_a_valid_train_objective_section(name, mode):
    """Each resolved trial config is accepted by the registry's range checks and the train config."""
    from pipelines.train.config import resolve_objective_config

    space = build_param_space(name, grid=mode != "search", wide=mode == "wide")
    variants = _resolved(space)
    small = SPACES[name].params_for(SPACES[name].default_variant)
    expected = math.prod(len(p.wide if mode == "wide" else p.small) for p in small.values())
    assert len(variants) == (1 if mode == "search" else expected)
    for spec in variants:
        section = spec["objective"]
        assert section["name"] == name
        hyper = {k: v for k, v in section.items() if k != "name"}
        defaults = dict(robust_objectives.objective_hyperparameters(name))
        robust_objectives.validate_hyperparameters(name, {**defaults, **hyper})
        resolved = resolve_objective_config(section)
        assert resolved.name == name and all(resolved.hyperparameters[k] == v for k, v in hyper.items())


def test_small_grid_is_one_trial_per_objective_and_wide_is_a_grid():
    assert build_param_space("kldpo") == {"objective": {"name": "kldpo", "beta": 0.1, "tau": 0.5}}
    wide = build_param_space("kldpo", wide=True)["objective"]
    assert wide["tau"] == tune.grid_search([0.1, 0.5, 1.0, 5.0])
    assert wide["beta"] == tune.grid_search([0.01, 0.05, 0.1, 0.2, 0.5])
    search = build_param_space("kldpo", grid=False)["objective"]
    assert isinstance(search["tau"], Domain) and isinstance(search["beta"], Domain)
    for _ in range(50):
        assert 0.01 <= search["tau"].sample() <= 10.0
    assert isinstance(build_param_space("cdpo", grid=False)["objective"]["label_smoothing"], Domain)


def test_typos_are_value_errors_naming_the_valid_keys():
    with pytest.raises(ValueError, match=r"unknown objective 'kldp'; valid objectives: .*kldpo"):
        build_param_space("kldp")
    with pytest.raises(ValueError, match=r"no hyperparameter 'tua'; valid keys: .*tau"):
        build_param_space("kldpo", overrides={"tua": 1.0})
    with pytest.raises(ValueError, match=r"objective 'dpo' has no hyperparameter 'tau'; valid keys: beta"):
        build_param_space("dpo", overrides={"tau": 1.0})
    with pytest.raises(ValueError, match="not among the swept objectives"):
        build_sweep_space(["dpo"], overrides={"kldpo": {"tau": 1.0}})


def test_overrides_fix_sweep_or_pass_domains_through():
    space = build_param_space("kldpo", overrides={"tau": [0.5, 2.0], "beta": 0.05, "normalize": True})
    assert space["objective"] == {
        "name": "kldpo", "beta": 0.05, "tau": tune.grid_search([0.5, 2.0]), "normalize": True
    }
    search = build_param_space("kldpo", grid=False, overrides={"tau": [0.5, 2.0]})["objective"]
    assert isinstance(search["tau"], Domain) and {search["tau"].sample() for _ in range(40)} == {0.5, 2.0}
    domain = tune.uniform(0.2, 0.3)
    assert build_param_space("kldpo", overrides={"tau": domain})["objective"]["tau"] is domain


def test_variant_switches_the_scale_of_the_parameter_it_governs():
    erm = build_param_space("radpo2", wide=True, overrides={"risk": "erm"})["objective"]
    assert erm["risk"] == "erm" and erm["mu"] == tune.grid_search([1.0, 3.0, 5.0, 7.0, 9.0])
    cvar = build_param_space("radpo2", wide=True)["objective"]
    assert "risk" not in cvar and max(cvar["mu"]["grid_search"]) <= 1.0
    sqrt = build_param_space("wdpo", overrides={"penalty": "sqrt"})["objective"]
    assert sqrt["rho"] == 50.0
    with pytest.raises(ValueError, match="sweep one value at a time"):
        build_param_space("radpo1", overrides={"risk": ["cvar", "erm"]})
    with pytest.raises(ValueError, match="risk='nope' has no search space; valid values: cvar, cvar_official, erm"):
        build_param_space("radpo1", overrides={"risk": "nope"})


def test_grid_points_and_sweep_list_every_combination_in_order():
    points = list_grid_points("radpo2", overrides={"mu": [0.9, 0.99], "alpha": [0.3, 0.7]})
    assert points == [
        {"name": "radpo2", "beta": 0.1, "mu": 0.9, "alpha": 0.3},
        {"name": "radpo2", "beta": 0.1, "mu": 0.9, "alpha": 0.7},
        {"name": "radpo2", "beta": 0.1, "mu": 0.99, "alpha": 0.3},
        {"name": "radpo2", "beta": 0.1, "mu": 0.99, "alpha": 0.7},
    ]
    sweep = build_sweep_space(["dpo", "kldpo"], overrides={"kldpo": {"tau": [0.5, 1.0]}})
    sections = [spec["objective"] for spec in _resolved(sweep)]
    assert sections == [
        {"name": "dpo", "beta": 0.1},
        {"name": "kldpo", "beta": 0.1, "tau": 0.5},
        {"name": "kldpo", "beta": 0.1, "tau": 1.0},
    ]
    with pytest.raises(ValueError, match="random domain"):
        list_grid_points("kldpo", overrides={"tau": tune.uniform(0.1, 1.0)})


def test_tune_spaces_never_imports_pipelines():
    """STYLE.md G4: tune_spaces is a leaf library (ray.tune allowed, pipelines never)."""
    root = Path(tune_spaces.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "pipelines" or n.startswith("pipelines.") for n in names), path
    code = "import sys, tune_spaces; tune_spaces.build_param_space('dpo'); print('pipelines' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
