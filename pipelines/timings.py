"""Where a stage's wall-clock goes: named phases, written as `<output>/timings.json`.

    timings = Timings("train")
    with timings.phase("data"):
        ...
    timings.write(output_dir)      # {"stage", "total_seconds", "phases": {name: seconds}, ...}

Phases are wall seconds of the code inside the `with` (summed when a phase repeats); what no phase
covers is `unaccounted_seconds`, so overhead is a number, not a guess.  Stages that run others
nest their reports (`children`): `run` holds the world's, the data's, the sweep's (one per trial,
each with the train stage's phases and the worker's own) and the evaluation's.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipelines.paths import write_text_atomic

FILE = "timings.json"


class Timings:
    """Wall seconds per named phase of one stage."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.started = time.perf_counter()
        self.phases: dict[str, float] = {}
        self.children: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + float(seconds)

    def child(self, name: str, report: Mapping[str, Any] | None) -> None:
        """Nest another stage's report (e.g. a trial's) under `name`; None is skipped."""
        if report:
            self.children[name] = dict(report)

    def report(self) -> dict[str, Any]:
        total = time.perf_counter() - self.started
        out: dict[str, Any] = {"stage": self.stage, "total_seconds": round(total, 3),
                               "phases": {k: round(v, 3) for k, v in self.phases.items()},
                               "unaccounted_seconds": round(total - sum(self.phases.values()), 3)}
        if self.children:
            out["children"] = self.children
        return out

    def write(self, directory: str | Path) -> Path:
        """`directory/timings.json`, written to a temporary name and renamed (never half-written)."""
        path = Path(directory) / FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self.report(), indent=2) + "\n")
        return path


def read(directory: str | Path) -> dict[str, Any] | None:
    """A stage's timings.json, or None when it has none."""
    path = Path(directory) / FILE
    return json.loads(path.read_text()) if path.is_file() else None


def markdown(run_report: Mapping[str, Any]) -> str:
    """The run report's section: the chain's phases, then one trial's phases averaged over trials."""
    lines = ["## Where the time went", "", f"Wall seconds of this invocation of `robust-dpo run` "
             f"({run_report['total_seconds']:.0f} s; a resumed run counts only what it redid); "
             "timings.json in each stage's folder has the detail.", "", "| phase | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in run_report["phases"].items()]
    trials = list((run_report.get("children", {}).get("sweep", {}).get("children") or {}).values())
    if trials:
        names = list(dict.fromkeys(name for t in trials for name in t["phases"]))
        lines += ["", f"One trial, mean of {len(trials)} (trials run concurrently, so these overlap):", "",
                  "| trial phase | seconds |", "|---|---:|"]
        lines += [f"| {name} | {sum(t['phases'].get(name, 0.0) for t in trials) / len(trials):.1f} |" for name in names]
        lines.append(f"| total | {sum(t['total_seconds'] for t in trials) / len(trials):.1f} |")
    return "\n".join(lines) + "\n"
