"""Kill anywhere (issue 12 item 2): SIGKILL `robust-dpo run` at seeded moments of every stage, rerun
the same command each time, and check that the final CSVs equal an uninterrupted run's.

    python -m benchmarks.kill_drill --workdir runs/drill --seed 0          # every kill point, ~6 min (105 s + 229 s measured)
    python -m benchmarks.kill_drill --workdir runs/drill --points training,evaluation

One chain: the command is started; when the kill point's trigger appears in the run folder (a file
the stage writes while it works: the world's pairs before world.json, a data split's parts before
the manifest, a trial's checkpoint, the evaluation folder before evaluation.csv, the report's first
file) the drill waits a seeded delay and SIGKILLs the command's whole process group (driver, Ray's
daemons, workers: what a closed laptop or a job timeout does); then it reruns the same command for
the next kill point, and finally runs it to the end.  The uninterrupted baseline runs the same command
in another folder.  Compared: sweep/trials.csv, evaluation/evaluation.csv, pareto.csv and
robustness.csv, with timing columns left out and the run folder's path made relative; numbers must
be equal (max. abs. difference printed).  A kill point whose trigger did not fire in its cycle (the
stage finished first) is reported as missed, never as survived.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# A small world and short training: one full run is ~100 s on 2 cores.
COMMAND = ["run", "synth.n_train=128", "synth.n_eval=32", "synth.ref_steps=100", "search.objectives=dpo,kldpo",
           "train.epochs=1", "train.batch_size=32", "train.micro_batch_size=32", "train.checkpoint_every=1",
           "evaluate.generation.num_prompts=8"]
COMPARED = ("sweep/trials.csv", "evaluation/evaluation.csv", "pareto.csv", "robustness.csv")
TIME_COLUMNS = ("seconds", "tokens_per_s", "time", "duration")


def _checkpoints(run: Path) -> set[str]:
    """The trials' checkpoint folders (checkpoint_NNNNNN; not Ray's checkpoint_manager_snapshot.json)."""
    return {str(p) for p in run.glob("sweep/trials/*/checkpoints/checkpoint_*")
            if p.name.removeprefix("checkpoint_").isdigit()}


@dataclass(frozen=True)
class KillPoint:
    name: str
    fired: Callable[[Path, set], bool]  # (run folder, checkpoints present when the cycle started)
    max_delay: float  # seconds after the trigger, drawn uniformly from [0, max_delay]


POINTS = {p.name: p for p in (
    KillPoint("world", lambda r, _: (r / "world/data/train.parquet").exists() and not (r / "world/world.json").exists(), 2.0),
    KillPoint("data", lambda r, _: any((r / "data").glob("*/part-*.parquet")) and not (r / "data/manifest.json").exists(), 0.3),
    KillPoint("training", lambda r, _: any((r / "sweep/trials").glob("*/checkpoints")), 4.0),
    KillPoint("checkpoint", lambda r, before: bool(_checkpoints(r) - before), 0.0),
    KillPoint("evaluation", lambda r, _: (r / "evaluation").is_dir() and not (r / "evaluation/evaluation.csv").exists(), 8.0),
    KillPoint("report", lambda r, _: (r / "pareto.csv").exists() and not (r / "report.md").exists(), 0.0),
)}


def _start(run: Path, log, command=COMMAND) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipelines", *command[:1], "--output", str(run), *command[1:]],
                            cwd=run.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def run_chain(run: Path, points: list[str], seed: int, command=COMMAND, log=print, timeout: float = 900) -> dict:
    """`command --output run`, killed at each of `points` in turn (one cycle each), then run to the
    end; returns what happened (its output goes to run's sibling `<name>.log`)."""
    rng = random.Random(seed)
    run.parent.mkdir(parents=True, exist_ok=True)
    events = []
    with run.with_name(run.name + ".log").open("w") as out:
        for name in points:
            point = POINTS[name]
            before = _checkpoints(run)
            started = time.monotonic()
            process = _start(run, out, command)
            while process.poll() is None and not point.fired(run, before) and time.monotonic() - started < timeout:
                time.sleep(0.01)
            delay = 0.0
            if process.poll() is None:  # triggered: wait the seeded delay
                delay = rng.uniform(0, point.max_delay)
                time.sleep(delay)
            if process.poll() is not None:
                events.append({"point": name, "killed": False, "exit": process.returncode})
                log(f"[drill] {name}: the command ended before its kill (exit {process.returncode}): missed")
                continue
            at = time.monotonic() - started
            _kill_group(process)
            steps = sorted(int(Path(p).name.split("_")[-1]) for p in _checkpoints(run))
            events.append({"point": name, "killed": True, "at_seconds": round(at, 2), "delay": round(delay, 2),
                           "checkpoint_steps_on_disk": steps})
            log(f"[drill] {name}: SIGKILL at {at:.1f} s of its cycle (trigger + {delay:.2f} s); "
                f"trial checkpoints on disk at steps {steps}")
        started = time.monotonic()
        final = _start(run, out, command)
        code = final.wait(timeout=timeout)
    log(f"[drill] final rerun: exit {code} in {time.monotonic() - started:.1f} s")
    return {"events": events, "final_exit": code}


def run_baseline(run: Path, command=COMMAND, timeout: float = 900) -> int:
    with run.with_name(run.name + ".log").open("w") as out:
        return _start(run, out, command).wait(timeout=timeout)


def compare(baseline: Path, killed: Path) -> dict[str, float]:
    """Max. abs. difference per compared CSV of two run folders (0.0: equal); raises AssertionError on
    any other difference (columns, rows, text, missing values)."""
    import numpy as np
    import pandas as pd

    out = {}
    for name in COMPARED:
        frames = []
        for side in (baseline, killed):
            frame = pd.read_csv(side / name)
            frame = frame.drop(columns=[c for c in frame.columns if any(t in c for t in TIME_COLUMNS)])
            text = frame.select_dtypes(exclude="number").columns
            frame[text] = frame[text].astype(str)
            for column in text:
                frame[column] = frame[column].str.replace(str(side.resolve()), "RUN", regex=False)
            frames.append(frame)
        first, second = frames
        assert list(first.columns) == list(second.columns), f"{name}: columns differ"
        assert first.shape == second.shape, f"{name}: {first.shape} rows x columns vs {second.shape}"
        numbers = first.select_dtypes("number").columns
        pd.testing.assert_frame_equal(first.drop(columns=numbers), second.drop(columns=numbers))
        a, b = first[numbers].to_numpy(float), second[numbers].to_numpy(float)
        assert (np.isnan(a) == np.isnan(b)).all(), f"{name}: missing values differ"
        out[name] = float(np.nanmax(np.abs(a - b), initial=0.0))
    return out


def _gcs_servers() -> int:
    found = subprocess.run(["pgrep", "-f", "gcs_server"], capture_output=True, text=True)
    return len(found.stdout.split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="an empty folder (both runs go in it)")
    parser.add_argument("--seed", type=int, default=0, help="draws the delay after each trigger")
    parser.add_argument("--points", default=",".join(POINTS), help=f"kill points, in order: {', '.join(POINTS)}")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    points = [p for p in args.points.split(",") if p]
    unknown = [p for p in points if p not in POINTS]
    if unknown:
        parser.error(f"unknown kill point(s) {unknown}; valid: {', '.join(POINTS)}")
    servers = _gcs_servers()
    started = time.monotonic()
    baseline = run_baseline(workdir / "baseline")
    baseline_seconds = time.monotonic() - started
    print(f"[drill] baseline: exit {baseline} in {baseline_seconds:.1f} s")
    started = time.monotonic()
    chain = run_chain(workdir / "killed", points, args.seed)
    chain_seconds = time.monotonic() - started
    differences = compare(workdir / "baseline", workdir / "killed") if baseline == 0 and chain["final_exit"] == 0 else {}
    left = _gcs_servers() - servers
    summary = {"seed": args.seed, "baseline_exit": baseline, "baseline_seconds": round(baseline_seconds, 1),
               "chain_seconds": round(chain_seconds, 1), **chain, "max_abs_difference": differences,
               "ray_sessions_left_running": left}
    print(json.dumps(summary, indent=2))
    survived = sum(e["killed"] for e in chain["events"])
    equal = bool(differences) and not any(differences.values())  # empty: a run failed, nothing compared
    print(f"[drill] {survived} kill(s) survived of {len(points)} point(s); final CSVs "
          f"{'equal' if equal else 'DIFFER'} to the uninterrupted run's")
    return 0 if equal and survived == len(points) and left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
