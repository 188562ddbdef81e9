"""The CLI: help works without heavy imports; unknown stages and bad input exit 2 with one line."""

from __future__ import annotations

import subprocess
import sys

from pipelines.cli import STAGES, main


def test_help_lists_every_stage_without_importing_ray():
    code = (
        "import sys; from pipelines.cli import build_parser; build_parser().format_help();"
        "print('ray' in sys.modules, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
    text = subprocess.run(
        [sys.executable, "-m", "pipelines", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for stage in STAGES:
        assert stage in text


def test_unknown_stage_exits_2(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown stage 'trian'" in err[0] and "train" in err[0]


def test_console_script_installed():
    out = subprocess.run(["robust-dpo", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: robust-dpo" in out.stdout
