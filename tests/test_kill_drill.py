"""Kill anywhere (issue 12 item 2): `robust-dpo run` SIGKILLed at seeded moments, rerun, and its final
CSVs equal to an uninterrupted run's.  benchmarks/kill_drill.py runs every kill point (world, data,
training, checkpoint, evaluation, report; ~7 min); here two of them in one chain, against the run
smoke test's uninterrupted run of the same command."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from smoke_keys import SMOKE_RUN_KEYS

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a repo folder, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import kill_drill  # noqa: E402


def _write_run(folder: Path, reward: float, objective: str = "dpo") -> Path:
    """The CSVs `compare` reads, one row each: a number, a timing column, a path inside the folder."""
    for name in kill_drill.COMPARED:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("trial_id,objective,reward,train_seconds,final_model\n"
                                   f"t1,{objective},{reward},{reward * 100},{folder.resolve()}/t1/final_model\n")
    return folder


def test_compare_leaves_out_timings_and_the_run_folder_and_catches_any_other_difference(tmp_path):
    base = _write_run(tmp_path / "a", 0.5)
    same = _write_run(tmp_path / "b", 0.5)
    (same / "pareto.csv").write_text((same / "pareto.csv").read_text().replace("50.0", "51.5"))  # a timing
    assert kill_drill.compare(base, same) == {name: 0.0 for name in kill_drill.COMPARED}
    assert kill_drill.compare(base, _write_run(tmp_path / "c", 0.75))["robustness.csv"] == 0.25
    with pytest.raises(AssertionError):
        kill_drill.compare(base, _write_run(tmp_path / "d", 0.5, objective="kldpo"))


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_killed_at_a_checkpoint_and_in_evaluation_ends_as_if_never_killed(smoke_run, tmp_path):
    chain = kill_drill.run_chain(tmp_path / "killed", ["checkpoint", "evaluation"], seed=1,
                                 command=["run", *SMOKE_RUN_KEYS])
    log = (tmp_path / "killed.log").read_text()
    assert [event["killed"] for event in chain["events"]] == [True, True], (chain, log[-3000:])
    assert chain["final_exit"] == 0, log[-3000:]
    differences = kill_drill.compare(smoke_run, tmp_path / "killed")
    assert sorted(differences) == sorted(kill_drill.COMPARED) and not any(differences.values()), differences
