"""The README's "The pipeline" block runs exactly as a user pastes it: relative paths, a fresh directory.

Each command of the block (backslash continuations joined, comments kept: bash drops them) runs with
bash in a new temporary working directory, in order; every one must exit 0 and leave its outputs.
Every other shell block of the README is either run here or marked as an illustration
(`<!-- illustration -->` on the line above it).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
ILLUSTRATION = "<!-- illustration -->"
RUN_BY_TESTS = ("## Quickstart", "## The pipeline")  # sections whose blocks tests run


def pipeline_commands() -> list[str]:
    section = README.split("## The pipeline", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_every_readme_shell_block_is_run_or_marked_as_an_illustration():
    unmarked = []
    for match in re.finditer(r"```bash\n", README):
        before = README[: match.start()]
        heading = before[before.rfind("\n## "):].splitlines()[1] if "\n## " in before else ""
        previous_line = before.rstrip("\n").splitlines()[-1] if before.strip() else ""
        if heading in RUN_BY_TESTS or previous_line.strip() == ILLUSTRATION:
            continue
        unmarked.append(README[: match.start()].count("\n") + 1)
    assert not unmarked, f"README shell blocks at lines {unmarked} are neither run by a test nor marked {ILLUSTRATION}"


def test_the_pipeline_block_names_every_stage_once_in_data_flow_order():
    stages = [c.split()[1] for c in pipeline_commands()]
    assert stages == ["synth", "data", "reference", "train", "evaluate", "tune", "run"]


@pytest.mark.slow
def test_the_pipeline_block_runs_verbatim_from_a_fresh_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROBUST_DPO_", "RAY_ADDRESS"))}
    env["ROBUST_DPO_CACHE"] = str(tmp_path / "cache")  # the reference cache's default root, off $HOME
    for command in pipeline_commands():
        done = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900)
        assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        printed = (done.stdout + done.stderr).splitlines()
        assert not [line for line in printed if " INFO " in line], command  # Ray's INFO lines go to logs/
        if command.startswith("robust-dpo run"):
            assert len(printed) <= 60, "\n".join(printed)  # a console a person can read
            assert any("done: " in line and "report.md" in line for line in printed), printed
    runs = tmp_path / "runs"
    assert (runs / "w" / "world.json").is_file() and (runs / "d" / "manifest.json").is_file()
    metrics = pd.read_csv(runs / "t" / "metrics.csv")
    assert len(metrics) and metrics["loss"].notna().all()
    assert (runs / "t" / "final_model" / "config.json").is_file()
    evaluation = pd.read_csv(runs / "e" / "evaluation.csv")
    assert sorted(evaluation["level"]) == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    trials = pd.read_csv(runs / "s" / "trials.csv")
    assert sorted(trials["objective"]) == ["dpo", "kldpo", "wdpo"]
    report = [p for p in runs.glob("*/report.md")]
    assert report and "which objective holds up" in report[0].read_text().lower()
