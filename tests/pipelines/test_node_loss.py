"""A lost node (issue 12 item 1), train and tune: see node_loss.py, run here in its own process (its
multi-node cluster cannot share the suite's Ray session)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
HERE = Path(__file__).resolve().parent


def test_a_run_and_a_trial_that_lose_a_node_finish_as_if_uninterrupted(tmp_path):
    done = subprocess.run([sys.executable, str(HERE / "node_loss.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=1200, env={**os.environ, "PYTHONPATH": str(HERE.parents[1])})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    train, tune = result["train"], result["tune"]
    assert train["events"][0]["removed_at_seconds"] >= 0 and train["events"][1]["replacement_added"], train
    # The lost run's checkpoints come from two worker groups (the restart resumed after the old group's
    # checkpoints instead of redoing them), the plain run's from one; every metric equal.
    assert train["worker_starts"] == [1, 2], train
    assert train["steps"] == [8, 8] and train["metrics_equal"], train
    assert tune["events"][1]["replacement_added"] and tune["finished"] == [2, 2] and tune["failed"] == [0, 0], tune
    assert sorted(tune["worker_starts"].values()) == [1, 2], tune  # one trial resumed, the other untouched
    assert tune["trials_equal"] and tune["pareto_equal"], tune
