"""`robust-dpo <stage> ...`: one subcommand per pipeline stage.

Each stage module exposes `add_arguments(parser)`, `CONFIG` (its config class), `build_config(args)`
and `main(args) -> int`.  Modules are imported only when their subcommand runs, so `robust-dpo
--help` stays fast.  Every stage also takes
- `--print-config`: print the resolved config (paths resolved, defaults filled in) as YAML and exit 0,
  without starting Ray;
- `--verbose`: Ray's own log lines (Data progress, Tune tables, worker output) on the console too;
  by default they go to `<output>/logs/ray.log` and the console holds the stage's own lines;
and `robust-dpo <stage> --help` lists every key with its type, default and meaning, generated from
the config dataclasses.

Exit codes: 0 the work is done; 1 part of the work failed (a trial, a worker: the error and where its
full log is are printed); 2 bad input (`UserError`: one line naming what is wrong and where).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from pipelines import console
from pipelines.errors import UserError

LOG_DIR_ENV = "ROBUST_DPO_LOG_DIR"  # where ensure_ray sends Ray's own log lines

# name -> (module, one-line help).  The single list of subcommands.
STAGES: dict[str, tuple[str, str]] = {
    "synth": ("pipelines.world", "generate the embedded known-reward world (tokenizer, model, data)"),
    "data": ("pipelines.data", "ingest, validate, shift and tokenise a preference dataset with Ray Data"),
    "reference": ("pipelines.reference", "precompute reference log-probs as dataset columns (cached)"),
    "train": ("pipelines.train", "train one objective with Ray Train's TorchTrainer"),
    "evaluate": ("pipelines.evaluate", "batch-evaluate checkpoints under a grid of simulated shifts"),
    "tune": ("pipelines.tune", "search robustness radius and beta with Ray Tune; Pareto report"),
    "run": ("pipelines.run", "the whole chain on the embedded default world"),
}


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="robust-dpo",
        description="Preference optimisation that stays good under distribution shift, on Ray.",
    )
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, (module, help_text) in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == stage:
            stage_module = importlib.import_module(module)
            stage_module.add_arguments(p)
            p.add_argument("--print-config", action="store_true",
                           help="print the resolved config as YAML and exit (starts nothing)")
            p.add_argument("--verbose", action="store_true",
                           help="Ray's own log lines on the console too (always in OUTPUT/logs/ray.log)")
            p.epilog = keys_help(stage_module.CONFIG)
    return parser


def keys_help(cls) -> str:
    """The `key=value` keys of a stage's config: key, type, default and meaning, one per line."""
    from pipelines import config as config_lib

    rows = config_lib.describe(cls)
    lines = ["keys (key=value, or the same nesting in --config YAML):"]
    width = min(40, max(len(r.key) for r in rows))
    for r in rows:
        default = "required" if r.default is config_lib.REQUIRED else f"default {r.default!r}"
        lines.append(f"  {r.key:<{width}}  {r.type}, {default}" + (f": {r.comment}" if r.comment else ""))
    for field in dataclasses.fields(cls):
        schema = field.metadata.get("schema")
        if schema is not None:
            lines.append(f"  every other key: a {schema.__name__} key shared by every trial (see `robust-dpo train --help`)")
    if any(r.key.startswith("objective.") for r in rows):
        lines.append(objectives_help())
    return "\n".join(lines)


def objectives_help() -> str:
    import robust_objectives

    lines = ["objective.<hyperparameter> by objective.name (defaults):"]
    for name in robust_objectives.OBJECTIVES:
        params = ", ".join(f"{k}={v!r}" for k, v in robust_objectives.objective_hyperparameters(name).items())
        lines.append(f"  {name}: {params}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, own_terminal: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in argv if not a.startswith("-")), None)
    if stage is not None and stage not in STAGES:
        print(f"robust-dpo: error: unknown stage '{stage}'; valid stages: {', '.join(STAGES)}", file=console.err())
        return 2
    try:
        parser = build_parser(stage)
        args = parser.parse_args(argv)
        if args.stage is None:
            parser.print_help()
            return 0
        module = importlib.import_module(STAGES[args.stage][0])
        if args.verbose:
            os.environ[console.VERBOSE_ENV] = "1"
        console.restart_clock()
        console.quiet_libraries()
        if args.print_config:
            return print_config(module.build_config(args))
        output = getattr(args, "output", None)
        log_dir = Path(output).resolve() / "logs" if output else Path(tempfile.gettempdir()) / "robust-dpo-logs"
        os.environ[LOG_DIR_ENV] = str(log_dir)
        if own_terminal:
            console.own_terminal(log_dir)
        if output and args.stage in LOCKED_STAGES:
            module.build_config(args)  # bad input fails (exit 2) before the lock creates --output
            with output_lock(output, args.stage):
                return int(module.main(args) or 0)
        return int(module.main(args) or 0)
    except UserError as exc:
        print(f"robust-dpo: error: {exc}", file=console.err())
        return exc.exit_code
    except KeyboardInterrupt:
        print("robust-dpo: interrupted", file=console.err())
        return 130


LOCK_FILE = ".robust-dpo.lock"
LOCKED_STAGES = ("synth", "data", "train", "evaluate", "tune", "run")  # `reference --output` is a shared cache


@contextlib.contextmanager
def output_lock(output: str, stage: str):
    """One command at a time per --output: a second one exits 2 naming the running process.

    The lock file holds the owner's pid and host; a lock whose process is gone (a killed run) is
    stale and taken over, so a killed run never blocks its own resume."""
    directory = Path(output).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "stage": stage, "started": time.time()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                owner = {}
            if owner.get("host") == me["host"] and not _alive(int(owner.get("pid", 0))):
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            raise UserError(f"--output '{directory}' is in use by `robust-dpo {owner.get('stage', '?')}` "
                            f"(pid {owner.get('pid', '?')} on {owner.get('host', '?')}); wait for it or use "
                            f"another --output (a stale lock is {path})") from None
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def entry() -> int:
    """The `robust-dpo` console script: `main` with the terminal kept for the stage's own lines."""
    return main(own_terminal=True)


def print_config(cfg) -> int:
    from pipelines import config as config_lib

    print(config_lib.to_yaml(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
