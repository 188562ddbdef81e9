"""README stays true: two Quickstart commands, CI runs the second, every objective is documented."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1]
    block = re.search(r"```[a-z]*\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.strip().splitlines() if line.strip()]


def test_quickstart_has_exactly_two_commands():
    first, second = quickstart_commands()
    assert "robust-dpo run" in first and "pip install" in first
    assert "pytest" in second and ".[test]" in second


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert quickstart_commands()[1] in ci.splitlines()


def test_every_objective_is_in_the_readme_table():
    from robust_objectives import OBJECTIVES

    rows = {m.group(1) for m in re.finditer(r"^\|\s*`([a-z0-9_]+)`[^|]*\|", README, re.M)}
    assert set(OBJECTIVES) <= rows, sorted(set(OBJECTIVES) - rows)


def test_every_stage_is_in_the_readme():
    from pipelines.cli import STAGES

    for stage in STAGES:
        assert f"robust-dpo {stage}" in README, stage
