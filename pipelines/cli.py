"""`robust-dpo <stage> ...`: one subcommand per pipeline stage.

Each stage module exposes `add_arguments(parser)` and `main(args) -> int`.  Modules are imported
only when their subcommand runs, so `robust-dpo --help` stays fast and works before Ray or
transformers are imported.  Bad input raises `UserError`, printed as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pipelines.errors import UserError

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
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == stage:
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = next((a for a in argv if not a.startswith("-")), None)
    if stage is not None and stage not in STAGES:
        print(
            f"robust-dpo: error: unknown stage '{stage}'; valid stages: {', '.join(STAGES)}",
            file=sys.stderr,
        )
        return 2
    try:
        parser = build_parser(stage)
        args = parser.parse_args(argv)
        if args.stage is None:
            parser.print_help()
            return 0
        module = importlib.import_module(STAGES[args.stage][0])
        return int(module.main(args) or 0)
    except UserError as exc:
        print(f"robust-dpo: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("robust-dpo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
