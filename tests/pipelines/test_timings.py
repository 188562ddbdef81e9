"""pipelines/timings.py: phases add up, the file is written whole, the run report's table."""

from __future__ import annotations

import json
import time

import pytest

from pipelines import timings as timings_lib


def test_phases_accumulate_and_the_rest_is_unaccounted(tmp_path):
    t = timings_lib.Timings("train")
    with t.phase("steps"):
        time.sleep(0.02)
    with t.phase("steps"):
        time.sleep(0.02)
    t.add("data", 1.5)
    time.sleep(0.02)
    report = t.report()
    assert report["stage"] == "train" and set(report["phases"]) == {"steps", "data"}
    assert report["phases"]["steps"] == pytest.approx(0.04, abs=0.03) and report["phases"]["data"] == 1.5
    # total = phases + unaccounted (added 1.5 s that did not pass makes the rest negative)
    assert report["unaccounted_seconds"] == pytest.approx(
        report["total_seconds"] - report["phases"]["steps"] - 1.5, abs=2e-3)
    path = t.write(tmp_path / "out")
    assert path.name == "timings.json" and json.loads(path.read_text())["phases"]["data"] == 1.5
    assert [p.name for p in path.parent.iterdir()] == ["timings.json"]  # no temporary left behind
    assert timings_lib.read(tmp_path / "out")["stage"] == "train" and timings_lib.read(tmp_path) is None


def test_a_failing_phase_is_still_timed():
    t = timings_lib.Timings("x")
    with pytest.raises(ValueError), t.phase("boom"):
        raise ValueError("no")
    assert "boom" in t.report()["phases"]


def test_the_run_report_section_lists_the_chain_and_the_mean_trial():
    trial = lambda steps, sampling: {"stage": "trial", "total_seconds": steps + sampling + 1.0,  # noqa: E731
                                     "phases": {"worker steps": steps, "sampling and scoring": sampling}}
    run = {"stage": "run", "total_seconds": 100.0, "phases": {"world": 20.0, "sweep": 60.0},
           "children": {"sweep": {"stage": "tune", "total_seconds": 60.0, "phases": {},
                                  "children": {"a": trial(2.0, 4.0), "b": trial(4.0, 6.0)}}}}
    text = timings_lib.markdown(run)
    assert "| world | 20.0 |" in text and "| sweep | 60.0 |" in text
    assert "mean of 2" in text and "| worker steps | 3.0 |" in text and "| sampling and scoring | 5.0 |" in text
    assert "| total | 9.0 |" in text
    assert "One trial" not in timings_lib.markdown({**run, "children": {}})


def test_a_fit_splits_into_the_worker_phases_and_ray_trains_own_time():
    from pipelines.train import split_fit

    t = timings_lib.Timings("train")
    worker = {"phases": {"start": 2.0, "setup": 1.0, "steps": 3.0}, "created_at": 105.0, "reported_at": 111.5}
    split_fit(t, 100.0, 113.0, worker)
    phases = t.report()["phases"]
    assert phases["worker start"] == 2.0 and phases["worker steps"] == 3.0
    assert phases["Ray Train start-up (controller, worker group)"] == 5.0  # 105 - 100
    assert phases["Ray Train last report and teardown"] == 1.5  # 113 - 111.5
    assert phases["Ray Train reports, other"] == pytest.approx(13.0 - 6.0 - 5.0 - 1.5)
    bare = timings_lib.Timings("train")
    split_fit(bare, 0.0, 4.0, None)  # no checkpoint: the whole fit is Ray Train's
    assert bare.report()["phases"] == {"Ray Train reports, other": 4.0}
