"""Two commands on one --output: the second exits 2 naming the first; a killed run's lock is stale."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from pipelines.cli import LOCK_FILE, main, output_lock
from pipelines.errors import UserError


def test_a_second_command_on_the_same_output_is_refused_and_the_lock_is_released(tmp_path):
    with output_lock(str(tmp_path), "train"):
        owner = json.loads((tmp_path / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(UserError, match=rf"is in use by `robust-dpo train` \(pid {os.getpid()}"):
            with output_lock(str(tmp_path), "tune"):
                pass
    assert not (tmp_path / LOCK_FILE).exists()
    with output_lock(str(tmp_path), "tune"):  # free again
        pass


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                  "stage": "run"}))
    with output_lock(str(tmp_path), "run"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_the_cli_exits_2_while_another_command_holds_the_output(tmp_path, capsys):
    with output_lock(str(tmp_path), "run"):
        code = main(["synth", "--output", str(tmp_path), "synth.n_train=8"])
    assert code == 2 and "is in use by `robust-dpo run`" in capsys.readouterr().err
