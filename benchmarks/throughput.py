"""Training throughput, ours vs TRL's DPOTrainer, side by side in one process (issues 6 and 11).

    python -m benchmarks.throughput --preset tiny --device cpu            # CPU smoke, ~1 min
    python -m benchmarks.throughput --preset small --device cpu --json    # issue 11's CPU run, <= 5 min
    python -m benchmarks.throughput --preset qwen0.5b --json              # one H100: the target run
    python -m benchmarks.throughput --preset llama1b --json --output $OUT/llama1b.json
    python -m benchmarks.throughput --preset qwen0.5b --phases "trl,ours:dpo;ours:dpo,ours:dpo:precomputed"

Both sides start from the same random-init weights (one seed, one state dict loaded into every
copy) and train on the same synthetic pairs (log-normal HH-like lengths, bench_setup.py), the same
global batch per optimizer step and the same precision (bf16 autocast over fp32 weights on GPU,
TRL's default; fp32 on CPU).  A run is a list of phases; a phase builds its contenders, then
alternates them step by step after `--warmup` untimed steps, then frees them.  Default phases:
TRL default vs our DPO, TRL without gradient checkpointing vs our DPO, then our DPO against each
of kldpo, dora, radpo1 and wdpo; for `small`, SMALL_PHASES (our levers beside TRL default, the
objectives beside TRL without gradient checkpointing).  Each phase's first contender is its
baseline ("vs base").  Our contenders: `ours:<objective>` is the train stage's step (packed rows,
the prompt shared, response-only head); `:plain`, `:head`, `:packed` add the levers one at a time.

Reported per contender: useful tokens/s (non-pad tokens of all 2B rows, prompt counted in both rows,
as TRL's num_tokens and our metrics count them, so sharing the prompt is credited as the saving it
is) over the timed steps, the median of the per-step rates (robust to a stalled step on a shared
machine; the headline ratios use it), median step time, MFU = model FLOPs / time / the bf16 matmul
peak measured here (FlopModel in bench_setup.py; n/a on CPU), and each contender's own peak memory
(bench_setup.Meter: CUDA's allocator counters on GPU, sampled RSS on CPU).
`--json` prints one JSON object as the last line (ours_tokens_per_s, trl_tokens_per_s,
trl_no_gc_tokens_per_s, ours_plain_tokens_per_s, levers, objectives, peak_memory_gib, targets, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

if __package__ in (None, ""):  # `python benchmarks/throughput.py` from the repo root works too
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from benchmarks import bench_contenders as bc  # noqa: E402
from benchmarks import bench_setup as bs  # noqa: E402

OBJECTIVES = ("kldpo", "dora", "radpo1", "wdpo")  # issue 6's robust objectives, each against our DPO
LEVERS = ("plain", "head", "packed")  # our DPO with the step's levers added one at a time (issue 11)
DEFAULT_PHASES = ";".join(["trl,ours:dpo", "trl_no_gc,ours:dpo"] + [f"ours:dpo,ours:{o}" for o in OBJECTIVES])
# The `small` preset (issue 11, CPU): TRL default against our DPO and its levers; then TRL without
# gradient checkpointing against our DPO and the four objectives.  Two phases, 11 contenders.
SMALL_PHASES = ";".join(["trl,ours:dpo," + ",".join(f"ours:dpo:{p}" for p in LEVERS),
                         "trl_no_gc,ours:dpo," + ",".join(f"ours:{o}" for o in OBJECTIVES)])
TRL_MISSING = "trl is not installed (pip install -e '.[bench]')"
# Targets, evaluated from the run (None where the run lacks the numbers): issue 6's on one H100, and
# issue 11's for the `small` preset on the CPU.  "peak_memory" targets are upper bounds.
TARGETS = {
    "ours_vs_trl": 2.0, "ours_vs_trl_no_gc": 1.3, "mfu_llama1b": 0.45, "kldpo_vs_dpo": 0.95,
    "dora_vs_dpo": 0.95, "radpo1_vs_dpo": 0.7, "wdpo_vs_dpo": 0.4, "ours_peak_memory_vs_trl": 1.0,
}
TARGETS_BY_PRESET = {
    "small": {"ours_vs_trl": 2.5, "ours_vs_trl_no_gc": 2.0, "kldpo_vs_dpo": 0.95, "dora_vs_dpo": 0.95,
              "radpo1_vs_dpo": 0.7, "wdpo_vs_dpo": 0.4, "ours_peak_memory_vs_trl_no_gc": 1.0},
}


def trl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def parse_phases(text: str) -> list[list[bc.ContenderSpec]]:
    phases = [[bc.parse_contender(c) for c in phase.split(",") if c.strip()] for phase in text.split(";")]
    phases = [p for p in phases if p]
    for phase in phases:
        if sum(s.side == "trl" for s in phase) > 1:
            raise ValueError("a phase may hold at most one TRL contender (TRL's train() drives the phase)")
    return phases


# [1] Running ------------------------------------------------------------------------------------------


def build_setup(args: argparse.Namespace) -> bc.BenchSetup:
    preset = bs.PRESETS[args.preset]
    device = torch.device(args.device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    batch = args.batch_size or preset.batch_size
    micro = args.micro_batch_size or min(preset.micro_batch_size, batch)
    if batch % micro:
        raise ValueError(f"--batch-size {batch} is not a multiple of --micro-batch-size {micro}")
    warmup = preset.warmup if args.warmup is None else args.warmup
    steps = args.steps or preset.steps
    tokenizer = bs.build_tokenizer(preset.model["vocab_size"])
    config = bs.build_model_config(preset, tokenizer)
    state = bs.build_base_state(config, seed=args.seed, device=device)
    pairs = bs.generate_pairs(preset, (warmup + steps) * batch, vocab_size=config.vocab_size,
                              eos_token_id=tokenizer.eos_token_id, seed=args.seed)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        flop_model = bs.flop_model_of(AutoModelForCausalLM.from_config(config))
    return bc.BenchSetup(preset=preset, device=device, precision=precision, batch_size=batch,
                         micro_batch_size=micro, warmup=warmup, steps=steps, seed=args.seed,
                         lr=args.lr or preset.lr, tokenizer=tokenizer,
                         config=config, state=state, pairs=pairs, flop_model=flop_model)


def build_contender(spec: bc.ContenderSpec, setup: bc.BenchSetup) -> bc.Contender:
    return (bc.TrlContender if spec.side == "trl" else bc.OursContender)(spec, setup)


def run_phase(specs: Sequence[bc.ContenderSpec], setup: bc.BenchSetup) -> list[bc.Contender]:
    """Build the phase's contenders, alternate their steps, free them; returns them (records kept)."""
    contenders = [build_contender(s, setup) for s in specs]
    trl = [c for c in contenders if isinstance(c, bc.TrlContender)]
    others = [c for c in contenders if not isinstance(c, bc.TrlContender)]

    def step_others(index: int) -> None:
        # Rotate the order each step so no contender always runs right after another.
        k = index % len(others) if others else 0
        for contender in others[k:] + others[:k]:
            contender.step(index)

    start = 0
    if trl:
        trl[0].run(step_others)
        start = trl[0].completed
    for index in range(start, setup.total_steps):
        step_others(index)
    for contender in contenders:
        contender.close()
    return contenders


# [2] Summaries -------------------------------------------------------------------------------------------


def summarize(contender: bc.Contender, setup: bc.BenchSetup, peak_tflops: Optional[float]) -> dict[str, Any]:
    timed = [r for r in contender.records if r.step >= setup.warmup]
    seconds = sum(r.seconds for r in timed)
    out: dict[str, Any] = {"contender": contender.spec.label, "timed_steps": len(timed), "error": contender.error}
    if timed and seconds > 0:
        ms = sorted(1e3 * r.seconds for r in timed)
        out.update(
            tokens_per_s=sum(r.tokens for r in timed) / seconds,
            tokens_per_s_median_step=sorted(r.tokens / r.seconds for r in timed)[len(timed) // 2],
            step_ms_median=ms[len(ms) // 2],
            step_ms_min=ms[0],
            mfu=sum(r.flops for r in timed) / seconds / (peak_tflops * 1e12) if peak_tflops else None,
            peak_memory_gib=max(r.peak_bytes for r in contender.records) / bs.GIB,
        )
    if "precompute_seconds" in contender.extra and out.get("tokens_per_s"):
        # One epoch over the benchmark's pairs, the precompute's cost spread over its tokens.
        per_token = contender.extra["precompute_seconds"] / int(setup.pairs.row_lengths(0, len(setup.pairs)).sum())
        out["tokens_per_s_one_epoch_with_precompute"] = 1.0 / (1.0 / out["tokens_per_s"] + per_token)
    out["early"] = {str(k): v for k, v in contender.early.items()}
    out["step_ms"] = [round(1e3 * r.seconds, 3) for r in contender.records]  # every step, warm-up included
    out.update(contender.extra)
    return out


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def headline(phases: list[list[dict]], preset: str) -> dict[str, Any]:
    """The issues' numbers, each ratio taken within one phase (same process, alternating steps).

    Rates are the median of the per-step rates (`tokens_per_s_median_step`: robust to a step
    stalled by another process on a shared machine); each contender's total-time rate stays in
    `phases`.
    """
    rate = "tokens_per_s_median_step"
    out: dict[str, Any] = {"rate": rate, "ours_tokens_per_s": None, "trl_tokens_per_s": None,
                           "trl_no_gc_tokens_per_s": None, "ours_plain_tokens_per_s": None}
    objectives: dict[str, dict] = {}
    levers: dict[str, dict] = {}
    for phase in phases:
        by = {s["contender"]: s for s in phase}
        ours = by.get("ours:dpo")
        if ours is None:
            continue
        for key in ("trl", "trl_no_gc"):
            if key in by and out[f"{key}_tokens_per_s"] is None:
                out[f"{key}_tokens_per_s"] = by[key].get(rate)
                out[f"ours_vs_{key}"] = ratio(ours.get(rate), by[key].get(rate))
                out[f"ours_peak_memory_vs_{key}"] = ratio(ours.get("peak_memory_gib"), by[key].get("peak_memory_gib"))
        if "trl" in by and out["ours_tokens_per_s"] is None:
            trl = by["trl"]
            out.update(
                ours_tokens_per_s=ours.get(rate), ours_mfu=ours.get("mfu"), trl_mfu=trl.get("mfu"),
                ours_peak_memory_gib=ours.get("peak_memory_gib"), trl_peak_memory_gib=trl.get("peak_memory_gib"),
                early_steps={"trl": trl["early"], "ours": ours["early"]},
            )
        plain = by.get("ours:dpo:plain")
        if plain is not None and not levers:  # the ladder plain -> head -> packed -> shared (= ours:dpo)
            out["ours_plain_tokens_per_s"] = plain.get(rate)
            for lever in LEVERS[1:] + ("fast",):
                summary = by.get("ours:dpo" if lever == "fast" else f"ours:dpo:{lever}")
                if summary is not None:
                    levers[lever] = {"tokens_per_s": summary.get(rate), "vs_plain": ratio(summary.get(rate), plain.get(rate)),
                                     "peak_memory_gib": summary.get("peak_memory_gib")}
        for label, summary in by.items():
            name = label[len("ours:"):] if label.startswith("ours:") else ""
            if name and ":" not in name and name != "dpo" and name not in objectives:
                objectives[name] = {k: summary.get(k) for k in ("mfu", "peak_memory_gib", "error")}
                objectives[name].update(tokens_per_s=summary.get(rate), vs_dpo=ratio(summary.get(rate), ours.get(rate)))
    if out["ours_tokens_per_s"] is None:  # no TRL phase: our DPO from the first phase that has it
        first = next((s for p in phases for s in p if s["contender"] == "ours:dpo"), {})
        out.update(ours_tokens_per_s=first.get(rate), ours_mfu=first.get("mfu"))
    out["objectives"] = objectives
    out["levers"] = levers
    out["peak_memory_gib"] = {s["contender"]: s.get("peak_memory_gib") for p in phases for s in p}
    measured = {
        "ours_vs_trl": out.get("ours_vs_trl"), "ours_vs_trl_no_gc": out.get("ours_vs_trl_no_gc"),
        "mfu_llama1b": out.get("ours_mfu") if preset == "llama1b" else None,
        **{f"{n}_vs_dpo": objectives.get(n, {}).get("vs_dpo") for n in OBJECTIVES},
        "ours_peak_memory_vs_trl": out.get("ours_peak_memory_vs_trl"),
        "ours_peak_memory_vs_trl_no_gc": out.get("ours_peak_memory_vs_trl_no_gc"),
    }

    def met(key: str, target: float, value: Optional[float]) -> Optional[bool]:
        if value is None:
            return None
        return value <= target if "peak_memory" in key else value >= target

    targets = TARGETS_BY_PRESET.get(preset, TARGETS)
    out["targets"] = {k: {"target": t, "measured": measured[k], "met": met(k, t, measured[k])} for k, t in targets.items()}
    return out


def format_table(phases: list[list[dict]], memory_kind: str) -> str:
    def f(value, spec):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)

    lines = [f"{'phase':<5} {'contender':<26} {'tokens/s':>10} {'median':>10} {'step ms':>9} {'MFU':>6} "
             f"{'peak GiB':>9} {'vs base':>8} {'loss@1':>10}  ({memory_kind})"]
    for i, phase in enumerate(phases, 1):
        base = phase[0].get("tokens_per_s")
        for s in phase:
            lines.append(
                f"{i:<5} {s['contender']:<26} {f(s.get('tokens_per_s'), ',.0f'):>10} "
                f"{f(s.get('tokens_per_s_median_step'), ',.0f'):>10} {f(s.get('step_ms_median'), '.1f'):>9} "
                f"{f(s.get('mfu'), '.1%'):>6} {f(s.get('peak_memory_gib'), '.2f'):>9} "
                f"{f(ratio(s.get('tokens_per_s'), base), '.2f'):>8} {f(s['early'].get('1', {}).get('loss'), '.6f'):>10}"
                + (f"  ERROR: {s['error']}" if s.get("error") else ""))
    return "\n".join(lines)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# [3] CLI ---------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(bs.PRESETS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--phases", default=None,
                        help="';'-separated phases of ','-separated contenders (default: SMALL_PHASES for "
                             f"--preset small, else {DEFAULT_PHASES})")
    parser.add_argument("--steps", type=int, default=0, help="timed optimizer steps per contender (0 = preset's)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: preset's)")
    parser.add_argument("--batch-size", type=int, default=0, help="global pairs per step (0 = preset's)")
    parser.add_argument("--micro-batch-size", type=int, default=0, help="pairs per forward (0 = preset's)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="auto = bf16 autocast on CUDA (TRL's default), fp32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.0, help="both sides' learning rate (0 = preset's)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="use this bf16 peak instead of measuring")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--output", default=None, help="also write the JSON object to this file")
    args = parser.parse_args(argv)
    if args.phases is None:
        args.phases = SMALL_PHASES if args.preset == "small" else DEFAULT_PHASES
    try:
        args.phase_specs = parse_phases(args.phases)
    except ValueError as exc:
        parser.error(str(exc))
    if args.steps < 0 or (args.warmup is not None and args.warmup < 0):
        parser.error("--steps and --warmup must be >= 0")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    phases = args.phase_specs
    skipped = None
    if not trl_available() and any(s.side == "trl" for p in phases for s in p):
        skipped = TRL_MISSING
        phases = [[s for s in p if s.side != "trl"] for p in phases]
        # Drop phases left holding our DPO alone (it runs in the objective phases anyway).
        phases = [p for p in phases if len(p) > 1 or (p and p[0].label != "ours:dpo")]
        phases = phases or [[bc.parse_contender("ours:dpo")]]
        print(f"[bench] TRL side skipped: {skipped}", file=sys.stderr)
    setup = build_setup(args)
    device = setup.device
    if args.peak_tflops:
        peak = {"max_tflops": args.peak_tflops, "source": "--peak-tflops"}
    else:
        peak = bs.measure_matmul_peak(device)
    peak_tflops = peak["max_tflops"] if peak else None
    data = bs.describe_pairs(setup.pairs, setup.batch_size)
    print(f"[bench] preset {setup.preset.name} on {device} ({setup.precision}); {setup.batch_size} pairs/step in "
          f"{setup.batch_size // setup.micro_batch_size} micro-batches; "
          f"warmup {setup.warmup} + {setup.steps} timed steps; "
          f"mean prompt {data['mean_prompt_tokens']:.0f} / response {data['mean_response_tokens']:.0f} tokens, "
          f"padding {data['padding_fraction']:.1%}; bf16 peak "
          + (f"{peak_tflops:.0f} TFLOP/s" if peak_tflops else "n/a"), file=sys.stderr, flush=True)
    results = []
    for i, specs in enumerate(phases, 1):
        t0 = time.perf_counter()
        contenders = run_phase(specs, setup)
        results.append([summarize(c, setup, peak_tflops) for c in contenders])
        print(f"[bench] phase {i}/{len(phases)} ({', '.join(s.label for s in specs)}) in "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    memory_kind = "GPU own peak" if device.type == "cuda" else "CPU own peak, from sampled RSS"
    print(format_table(results, memory_kind))
    report = {
        "preset": setup.preset.name, "device": str(device), "precision": setup.precision,
        "batch_size": setup.batch_size, "micro_batch_size": setup.micro_batch_size,
        "warmup": setup.warmup, "steps": setup.steps, "max_length": setup.preset.max_length, "lr": setup.lr,
        **headline(results, setup.preset.name),
        "trl_skipped": skipped, "peak_bf16": peak, "data": data, "memory_kind": memory_kind,
        "flop_model": vars(setup.flop_model), "environment": bs.describe_environment(device),
        "phases": results, "wall_seconds": time.perf_counter() - started,
    }
    text = json.dumps(_finite(report), sort_keys=False)
    if args.output:
        Path(args.output).write_text(text + "\n")
    if args.json:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
