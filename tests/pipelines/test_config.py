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
