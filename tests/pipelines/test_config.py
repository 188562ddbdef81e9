"""Strict config loading: defaults <- YAML <- key=value, unknown keys and bad types are errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from pipelines import config
from pipelines.errors import UserError


@dataclass(frozen=True, kw_only=True)
class Inner:
    lr: float = 1e-3  # learning rate
    steps: int = 10  # optimizer steps
    mode: Literal["a", "b"] = "a"
    names: list[str] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Outer:
    path: str  # required: no default
    inner: Inner = field(default_factory=Inner)
    flag: bool = False
    maybe: Optional[float] = None


def test_defaults_then_yaml_then_overrides(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("path: x\ninner:\n  lr: 0.5\n  steps: 3\n")
    cfg = config.load(Outer, yml, ["inner.steps=7", "flag=true", "inner.names=a,b"])
    assert cfg.path == "x"
    assert cfg.inner.lr == 0.5  # from YAML
    assert cfg.inner.steps == 7  # override beats YAML
    assert cfg.flag is True
    assert cfg.inner.names == ["a", "b"]
    assert cfg.inner.mode == "a"  # default kept


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["path=x", "inner.lrr=1"], "unknown config key 'inner.lrr'"),
        (["path=x", "nope=1"], "unknown config key 'nope'"),
        (["path=x", "inner.steps=abc"], "'inner.steps': expected an integer"),
        (["path=x", "inner.mode=c"], "'inner.mode'"),
        (["path=x", "flag=maybe"], "'flag': expected true/false"),
        (["inner.steps=1"], "'path' is required"),
        (["path"], "not of the form key=value"),
    ],
)
def test_strictness(overrides, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        config.load(Outer, None, overrides)


def test_optional_and_int_to_float():
    cfg = config.load(Outer, None, ["path=1", "maybe=2", "inner.lr=1"])
    assert cfg.path == "1" and cfg.maybe == 2.0 and isinstance(cfg.inner.lr, float)
    assert config.load(Outer, None, ["path=p", "maybe=null"]).maybe is None


def test_dump_round_trip(tmp_path):
    cfg = config.load(Outer, None, ["path=p", "inner.lr=0.25", "inner.names=[u, v]"])
    config.dump(cfg, tmp_path / "resolved.yaml")
    again = config.load(Outer, tmp_path / "resolved.yaml")
    assert again == cfg


def test_bad_yaml_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(UserError, match="does not exist"):
        config.load(Outer, missing)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="mapping at the top level"):
        config.load(Outer, bad)


# --- One loader, one rule: flags, sections, catch-all, ranges in __post_init__, describe ------------


@dataclass(frozen=True, kw_only=True)
class Ranged:
    steps: int = 10  # optimizer steps; >= 1
    fraction: float = 0.0  # share held out; [0, 1)
    lr: Optional[float] = None  # learning rate; > 0 when set

    def __post_init__(self):
        config.check(self, ">= 1", "steps")
        config.check(self, "[0, 1)", "fraction")
        config.check(self, "> 0", "lr")


@dataclass(frozen=True, kw_only=True)
class Stage:
    output: str  # run directory; required
    ranged: Ranged = field(default_factory=Ranged)
    names: list[str] = field(default_factory=list)  # shift specs, repeatable flag
    rest: dict = config.catch_all()  # every other key


def test_a_flag_beats_yaml_and_an_override_of_the_same_key_is_an_error(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("output: from_yaml\nnames: [y]\n")
    cfg = config.load(Stage, yml, ["ranged.steps=3"], flags={"output": "from_flag", "names": None})
    assert cfg.output == "from_flag" and cfg.names == ["y"] and cfg.ranged.steps == 3  # None = flag not given
    with pytest.raises(UserError, match="config key 'output' is set by its command-line flag"):
        config.load(Stage, None, ["output=x"], flags={"output": "y"})
    with pytest.raises(UserError, match="config key 'ranged.steps' is set by its command-line flag"):
        config.load(Stage, None, ["ranged.steps=2"], flags={"output": "y", "ranged.steps": 4})
    assert config.load(Stage, None, [], flags={"output": "y", "ranged.steps": 4}).ranged.steps == 4


def test_section_prefix_is_accepted_and_catch_all_collects_the_rest():
    cfg = config.load(Stage, None, ["stage.ranged.steps=2", "output=o", "train.lr=1", "model.path=m"],
                      section="stage")
    assert cfg.ranged.steps == 2 and cfg.rest == {"train": {"lr": 1}, "model": {"path": "m"}}
    assert config.load(Stage, None, ["output=o", "rest.a=1", "b=2"]).rest == {"a": 1, "b": 2}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ranged.steps=0"], "config key 'ranged.steps' must be >= 1, got 0"),
        (["ranged.fraction=1"], "config key 'ranged.fraction' must be in [0, 1), got 1.0"),
        (["ranged.lr=0"], "config key 'ranged.lr' must be > 0, got 0.0"),
        (["ranged=3"], "config key 'ranged': expected a mapping, got 3"),
    ],
)
def test_range_checks_in_post_init_name_the_full_key(overrides, message):
    with pytest.raises(UserError) as info:
        config.load(Stage, None, ["output=o", *overrides])
    assert str(info.value) == message
    assert config.load(Stage, None, ["output=o", "ranged.fraction=0.5", "ranged.lr=1e-3"]).ranged.lr == 1e-3


def test_describe_lists_every_key_with_type_default_and_comment():
    keys = {k.key: k for k in config.describe(Stage)}
    assert list(keys) == ["output", "ranged.steps", "ranged.fraction", "ranged.lr", "names", "rest"]
    assert keys["output"] == ("output", "str", config.REQUIRED, "run directory; required")
    assert keys["ranged.steps"] == ("ranged.steps", "int", 10, "optimizer steps; >= 1")
    assert keys["ranged.fraction"].comment == "share held out; [0, 1)"
    assert keys["names"].default == [] and keys["names"].type == "list[str]"
    assert [k.comment for k in config.describe(Inner)] == ["learning rate", "optimizer steps", "", ""]
    assert config.describe(Inner)[2].type == "a|b"


def test_describe_covers_every_stage_config_and_every_field_is_commented():
    from pipelines.data import DataConfig
    from pipelines.evaluate import EvaluateConfig
    from pipelines.reference import ReferenceCacheConfig
    from pipelines.run import RunConfig
    from pipelines.train.config import TrainConfig
    from pipelines.tune import TuneConfig
    from pipelines.world import SynthConfig

    for cls in (SynthConfig, DataConfig, ReferenceCacheConfig, TrainConfig, EvaluateConfig, TuneConfig, RunConfig):
        keys = config.describe(cls)
        assert keys and all(k.comment for k in keys), (cls, [k.key for k in keys if not k.comment])
    train = {k.key: k for k in config.describe(TrainConfig)}
    assert train["train.batch_size"].default == 8 and "global pairs" in train["train.batch_size"].comment
    assert train["model.path"].default is config.REQUIRED
    evaluate = {k.key for k in config.describe(EvaluateConfig)}
    assert {"checkpoints", "beta", "generation.samples_per_prompt"} <= evaluate


# --- Every stage loads through config.load (no Ray) ------------------------------------------------


def test_run_config_typos_fail_before_any_work():
    from pipelines.run import load_run_config

    cases = [
        (["evaluate.generation.nope=1"], "unknown config key 'evaluate.generation.nope'"),
        (["search.nope=1"], "unknown config key 'search.nope'"),
        (["train.nope=1"], "unknown config key 'train.nope'"),
        (["run.nope=1"], "unknown config key 'run.nope'"),
        (["synth.alpha_train=1.5"], "config key 'synth.alpha_train' must be in [0, 1], got 1.5"),
        (["evaluate.concurrency=0"], "config key 'evaluate.concurrency' must be >= 1, got 0"),
        (["trial_eval.num_prompts=0"], "config key 'trial_eval.num_prompts' must be >= 1, got 0"),
        (["train.batch_size=0"], "config key 'train.batch_size' must be >= 1, got 0"),
        (["objective.taux=1"], "has no hyperparameter 'taux'"),
        (["search.objectives=kldpo", "search.overrides={kldpo: {taux: [1]}}"], "no hyperparameter 'taux'"),
        (["model.path=m"], "config key 'model' is set by `robust-dpo run` itself"),
        (["output=elsewhere"], "config key 'output' is set by its command-line flag"),
        (["evaluate.beta=0.3"], "config key 'evaluate.beta' is set by `robust-dpo run` itself"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError) as info:
            load_run_config(None, overrides, "runs/x")
        assert message in str(info.value) and "\n" not in str(info.value), (overrides, str(info.value))


def test_run_config_nests_typed_sections_with_run_defaults():
    from pipelines.run import DEFAULT_TRAIN, load_run_config

    cfg = load_run_config(None, ["evaluate.generation.num_prompts=4", "synth.max_response_words=20",
                                 "train.max_steps=2", "search.objectives=[dpo,kldpo]"], "runs/x")
    assert cfg.evaluate.generation.num_prompts == 4 and cfg.evaluate.generation.samples_per_prompt == 4
    assert cfg.evaluate.generation.max_new_tokens == 21  # the world's longest response + EOS
    assert cfg.base["train"] == {**DEFAULT_TRAIN["train"], "max_steps": 2}
    assert cfg.search.objectives == ["dpo", "kldpo"] and cfg.synth.max_response_words == 20


def test_evaluate_and_data_flags_follow_the_one_rule(tmp_path, monkeypatch):
    import argparse

    from pipelines import data, evaluate

    monkeypatch.chdir(tmp_path)  # the paths below exist here; load resolves them against it
    for name in ("a", "r", "d", "t"):
        (tmp_path / name).mkdir()
    args = argparse.Namespace(checkpoint=["a"], reference="r", data="d", output="o", grid=None, reward=None,
                              overrides=["evaluate.beta=0.05", "generation.samples_per_prompt=8"])
    cfg = evaluate.build_config(args)
    assert (cfg.beta, cfg.generation.samples_per_prompt, cfg.checkpoints, cfg.grid) == (
        0.05, 8, [str(tmp_path / "a")], [])
    assert (cfg.reference, cfg.data, cfg.output) == (str(tmp_path / "r"), str(tmp_path / "d"), str(tmp_path / "o"))
    with pytest.raises(UserError, match="config key 'reference' is set by its command-line flag"):
        evaluate.build_config(argparse.Namespace(**{**vars(args), "overrides": ["reference=x"]}))
    with pytest.raises(UserError, match="config key 'generation.max_new_tokens' must be >= 1, got 0"):
        evaluate.build_config(argparse.Namespace(**{**vars(args), "overrides": ["generation.max_new_tokens=0"]}))
    args = argparse.Namespace(dataset="d", tokenizer="t", output="o", shift=None, on_invalid="skip", format=None,
                              overrides=["data.seed=3"])
    assert data.build_config(args).seed == 3
    with pytest.raises(UserError, match="config key 'on_invalid' is set by its command-line flag"):
        data.build_config(argparse.Namespace(**{**vars(args), "overrides": ["on_invalid=fail"]}))


def test_an_error_is_quoted_by_its_first_nonempty_line_or_its_type(tmp_path):
    from pipelines.errors import first_line

    assert first_line(ValueError("\n  first \nsecond")) == "first"
    assert first_line(RuntimeError()) == "RuntimeError"
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(UserError, match=r"^config file '.*bad\.yaml' is not valid YAML: while parsing a flow node$"):
        config.load_yaml(bad)
