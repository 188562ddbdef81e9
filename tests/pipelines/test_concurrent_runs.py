"""Two commands at once on one machine (issue 12 item 3), typed as a user types them.

Two `robust-dpo train` with different --output, started together from one folder with relative
paths: each starts its own local Ray session and addresses it explicitly (ray_session.py,
`_own_api_server`), so both finish, with the same metrics (same config and seed: nothing crossed
between them), and no Ray process of either logged "Found multiple active Ray instances" (what
Ray Train's placement-group cleaner logged before).  A third command on the first one's --output,
while it runs, exits 2 naming the running process.  Each run reports 4 times with a checkpoint and keeps
only `train.keep_checkpoints=2` of them on disk (item 7).

The test process itself holds a Ray session (the shared fixture), so the children inherit its
RAY_API_SERVER_ADDRESS: each must replace it with its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipelines import ray_session
from pipelines.cli import LOCK_FILE


def _env() -> dict[str, str]:
    """This process's environment now (with the fixture session's RAY_API_SERVER_ADDRESS, which the
    children inherit and must replace), plus the repository on PYTHONPATH."""
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}


def _train_command(output: str, *keys: str) -> list[str]:
    """`robust-dpo train` on the copied model and data (relative paths, as a user types them)."""
    return [sys.executable, "-m", "pipelines", "train", "--output", output, "model.path=model", "data.path=data",
            "objective.name=dpo", *keys]


def _train(cwd: Path, output: str) -> subprocess.Popen:
    return subprocess.Popen(
        _train_command(output, "objective.beta=0.5", "train.lr=0.02", "train.batch_size=8", "train.micro_batch_size=8",
                       "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.seed=1"),
        cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env())


def test_a_session_port_is_never_one_ray_takes_by_default(monkeypatch):
    """The API-server port is the OS's choice, passed over when Ray would take it itself (52365, its
    dashboard agent's, once made `ray.init` fail in the kill drill)."""
    import ray._private.ray_constants as ray_constants

    assert {ray_constants.DEFAULT_PORT, ray_constants.DEFAULT_DASHBOARD_PORT,
            ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT} <= ray_session._RAY_PORTS
    offered = iter([ray_constants.DEFAULT_DASHBOARD_AGENT_LISTEN_PORT, ray_constants.DEFAULT_PORT, 15000, 40001])

    class Probe:  # socket.socket, handing out the ports above
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(ray_session.socket, "socket", Probe)
    assert ray_session._free_port() == 40001


@pytest.mark.ray
@pytest.mark.slow
def test_two_runs_with_different_outputs_both_finish_and_a_third_on_a_busy_output_exits_2(
        ray_session, tiny_model_dir, pairs_dataset, tmp_path):
    assert os.environ.get("RAY_API_SERVER_ADDRESS"), "the fixture's session should have set it (inherited below)"
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    shutil.copytree(pairs_dataset, tmp_path / "data")
    first, second = _train(tmp_path, "runs/a"), _train(tmp_path, "runs/b")
    deadline = time.monotonic() + 120
    while not (tmp_path / "runs/a" / LOCK_FILE).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    third = subprocess.run(_train_command("runs/a"), cwd=tmp_path, capture_output=True, text=True, timeout=120,
                           env=_env())  # on a's --output while a runs
    outputs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], "\n\n".join(outputs)
    assert third.returncode == 2, third.stdout + third.stderr
    assert f"is in use by `robust-dpo train` (pid {first.pid}" in third.stderr

    a, b = (pd.read_csv(tmp_path / "runs" / name / "metrics.csv") for name in "ab")
    pd.testing.assert_frame_equal(a.drop(columns=["tokens_per_s"]), b.drop(columns=["tokens_per_s"]))
    assert list(a["step"]) == [1, 2, 3, 4]  # four reports, each with a checkpoint; the last two kept (item 7)
    for name in "ab":
        kept = sorted(p.name for p in (tmp_path / "runs" / name / "checkpoints").glob("checkpoint_*") if p.is_dir())
        assert kept == ["checkpoint_000003", "checkpoint_000004"], kept
    sessions = [(tmp_path / "runs" / name / "logs" / "ray_session").resolve() for name in "ab"]
    assert sessions[0] != sessions[1], "each command starts its own local session"
    for session in sessions:
        for log in session.glob("*.err"):
            assert "multiple active Ray instances" not in log.read_text(errors="replace"), log
