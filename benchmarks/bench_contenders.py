"""The two sides of the throughput benchmark: TRL's DPOTrainer and our worker's training step.

Ours is `pipelines.train.step.train_step` fed exactly as `pipelines.train.loop.train_fn_per_worker`
feeds it on one worker: the typed TrainConfig, the same StepContext, the worker's AdamW, the
worker's LR schedule, `split_global_batch` -> `collate_pairs` -> `move_batch` per micro-batch.
Only Ray Data's iterator is replaced by in-memory rows of the same (numpy) batch format.

TRL is `trl.DPOTrainer.train()` with its defaults.  It drives the phase: a TrainerCallback closes
TRL's step s at `on_step_end`, runs the other contenders' step s, and reopens TRL's timer, so the
two sides alternate step by step in one process on the same global batch.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Callable, Optional

import numpy as np
import torch

from benchmarks import bench_setup as bs

IN_MEMORY = "<benchmark: in-memory model and data>"  # placeholder paths; nothing is read from them
# Metrics compared between the sides at steps 0 and 1.  Step 0: policy = reference, so the loss is
# log 2 on both sides whatever the data; the log-probs check data, model and log-prob code.  Step 1:
# the margins (and loss) depend on step 0's gradients and AdamW update (same lr on both sides).
EARLY_KEYS = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins")
EARLY_STEPS = (0, 1)


# [1] What is run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContenderSpec:
    """One side of a phase: `trl`, `trl_no_gc`, `trl[_no_gc]_precomputed`, `ours:<objective>[:precomputed]`."""

    side: str  # "trl" | "ours"
    objective: str = "dpo"
    gradient_checkpointing: bool = True  # TRL only (TRL's default is on)
    reference: str = "live"  # "live" | "precomputed"
    path: str = "fast"  # ours only: a key of OUR_PATHS

    @property
    def label(self) -> str:
        precomputed = self.reference == "precomputed"
        if self.side == "trl":
            return ("trl" if self.gradient_checkpointing else "trl_no_gc") + ("_precomputed" if precomputed else "")
        return (f"ours:{self.objective}" + (":precomputed" if precomputed else "")
                + (f":{self.path}" if self.path != "fast" else ""))


# Our step's levers, one at a time (issue 11): (layout, response-only head) of pipelines/collate.py.
# "fast" is what the train stage runs (pipelines.train.config.batch_layout: the prompt shared, or
# packed unshared rows for wdpo); "plain" is train.packing=false.
OUR_PATHS = {"plain": ("padded", False), "head": ("padded", True), "packed": ("packed", True), "fast": None}


def parse_contender(text: str) -> ContenderSpec:
    """Raises ValueError naming the bad spec and the accepted forms."""
    text = text.strip()
    forms = ("trl, trl_no_gc, trl_precomputed, trl_no_gc_precomputed, "
             "ours:<objective>[:precomputed][:plain|:head|:packed]")
    if text.startswith("trl"):
        table = {"trl": (True, "live"), "trl_no_gc": (False, "live"), "trl_precomputed": (True, "precomputed"),
                 "trl_no_gc_precomputed": (False, "precomputed")}
        if text not in table:
            raise ValueError(f"unknown contender {text!r}; expected one of {forms}")
        gc_on, reference = table[text]
        return ContenderSpec(side="trl", gradient_checkpointing=gc_on, reference=reference)
    parts = text.split(":")
    options = parts[2:]
    paths = [o for o in options if o in OUR_PATHS and o != "fast"]
    if (parts[0] != "ours" or len(parts) < 2 or len(paths) > 1 or options.count("precomputed") > 1
            or len(options) != len(paths) + options.count("precomputed")):
        raise ValueError(f"unknown contender {text!r}; expected one of {forms}")
    import robust_objectives as ro

    if parts[1] not in ro.OBJECTIVES or parts[1] in ro.LISTWISE:
        pairwise = sorted(set(ro.OBJECTIVES) - set(ro.LISTWISE))
        raise ValueError(f"contender {text!r}: objective must be a pairwise one of {', '.join(pairwise)}")
    path = paths[0] if paths else "fast"
    spec = ContenderSpec(side="ours", objective=parts[1], path=path,
                         reference="precomputed" if "precomputed" in options else "live")
    from pipelines.errors import UserError
    from pipelines.train.config import build_train_config

    try:  # the train stage's own checks (e.g. token-level objectives need a live reference)
        build_train_config({"model": {"path": IN_MEMORY}, "data": {"path": IN_MEMORY},
                            "objective": {"name": spec.objective}, "reference": {"mode": spec.reference}})
    except UserError as exc:
        raise ValueError(f"contender {text!r}: {exc}") from None
    return spec


@dataclass
class BenchSetup:
    """Everything the contenders share: preset, device, step layout, tokenizer, initial weights, data."""

    preset: bs.Preset
    device: torch.device
    precision: str  # "fp32" | "bf16" (bf16 = fp32 weights + bf16 autocast, on both sides)
    batch_size: int
    micro_batch_size: int
    warmup: int
    steps: int
    seed: int
    lr: float
    tokenizer: Any
    config: Any  # transformers PretrainedConfig
    state: dict
    pairs: bs.PreferencePairs
    flop_model: bs.FlopModel

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    def instantiate(self, attn_implementation: str):
        return bs.instantiate_model(self.config, self.state, device=self.device,
                                    attn_implementation=attn_implementation)

    def step_rows(self, index: int) -> tuple[int, int]:
        return index * self.batch_size, (index + 1) * self.batch_size

    def step_lengths(self, index: int) -> np.ndarray:
        return self.pairs.row_lengths(*self.step_rows(index))


@dataclass
class StepRecord:
    step: int
    seconds: float
    tokens: int  # non-pad tokens of the step's 2B rows
    flops: float  # model FLOPs (FlopModel.step_flops)
    peak_bytes: int


@dataclass
class Contender:
    spec: ContenderSpec
    setup: BenchSetup
    records: list[StepRecord] = field(default_factory=list)
    early: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> STEP0_KEYS, steps 0 and 1
    extra: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None

    def __post_init__(self) -> None:
        self.meter = bs.Meter(self.setup.device)

    def record(self, index: int, seconds: float, peak: int) -> None:
        lengths = self.setup.step_lengths(index)
        flops = self.setup.flop_model.step_flops(lengths, live_reference=self.spec.reference == "live")
        self.records.append(StepRecord(index, seconds, int(lengths.sum()), flops, peak))

    def fail(self, message: str) -> None:
        self.error = message
        self.close()

    def close(self) -> None:
        self.release()

    def release(self) -> None:
        gc.collect()
        if self.setup.device.type == "cuda":
            torch.cuda.empty_cache()


# [2] Ours: the worker's step ---------------------------------------------------------------------------


def build_ours_config(spec: ContenderSpec, setup: BenchSetup):
    """The TrainConfig a user would write for this run (validated like the CLI's)."""
    from pipelines.train.config import build_train_config

    return build_train_config({
        "model": {"path": IN_MEMORY},
        "data": {"path": IN_MEMORY},
        "objective": {"name": spec.objective},
        "train": {"batch_size": setup.batch_size, "micro_batch_size": setup.micro_batch_size,
                  "precision": setup.precision, "use_gpu": setup.device.type == "cuda", "seed": setup.seed,
                  "max_steps": setup.total_steps, "lr": setup.lr, "packing": spec.path != "plain"},
        "reference": {"mode": spec.reference},
    })


def build_step_context(cfg, *, rank: int = 0, world_size: int = 1):
    """StepContext exactly as `train_fn_per_worker` builds it."""
    from pipelines.train.loop import build_step_context as build

    return build(cfg, rank=rank, world_size=world_size)


def precompute_reference_columns(model, pairs: bs.PreferencePairs, cfg, device, pad: int) -> dict[str, np.ndarray]:
    """The reference stage's columns, computed as its actor (model.PairLogps) does (batches of
    reference.batch_size pairs, the prompt shared, compute_row_logps under no_grad, float64)."""
    from pipelines import model as model_lib

    from pipelines.collate import collate_pairs

    chosen, rejected = [], []
    for start in range(0, len(pairs), cfg.reference.batch_size):
        rows = pairs.rows(start, min(start + cfg.reference.batch_size, len(pairs)))
        batch = model_lib.move_batch(collate_pairs(rows, pad, layout="shared", response_head=True), device)
        with torch.no_grad():
            logps = model_lib.compute_row_logps(model, batch, precision=cfg.train.precision).logps.double().cpu()
        b = batch["num_pairs"]
        chosen += logps[:b].tolist()
        rejected += logps[b:].tolist()
    return {"reference_chosen_logps": np.asarray(chosen), "reference_rejected_logps": np.asarray(rejected)}


class OursContender(Contender):
    """Policy, reference, AdamW and schedule as the worker builds them; `step` = one train_step."""

    def __init__(self, spec: ContenderSpec, setup: BenchSetup) -> None:
        super().__init__(spec, setup)
        from pipelines import model as model_lib
        from pipelines.train import loop as train_lib
        from pipelines.train import config as tc

        self.cfg = cfg = build_ours_config(spec, setup)
        attn = tc.attention_implementation(cfg)
        self.extra["attn_implementation"] = attn
        self.policy = setup.instantiate(attn)
        self.policy.train()
        self.reference = setup.instantiate(attn).eval() if cfg.reference.mode == "live" else None
        if self.reference is not None:
            self.reference.requires_grad_(False)
        self.pad = model_lib.pad_token_id_of(self.policy)
        self.layout = OUR_PATHS[spec.path] or tc.batch_layout(cfg)
        self.extra["layout"] = "{} + {}".format(self.layout[0], "response-only head" if self.layout[1] else "full logits")
        self.columns: dict[str, np.ndarray] = {}
        if cfg.reference.mode == "precomputed":
            reference = setup.instantiate(attn).eval()
            self.meter.begin()
            self.columns = precompute_reference_columns(reference, setup.pairs, cfg, setup.device, self.pad)
            seconds, _ = self.meter.end()
            total = int(setup.pairs.row_lengths(0, len(setup.pairs)).sum())
            self.extra.update(precompute_seconds=seconds, precompute_tokens_per_s=total / seconds)
            del reference
            self.release()
        trainable = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = train_lib.build_optimizer(cfg, trainable)
        self.scheduler = train_lib.build_schedule(self.optimizer, cfg, setup.total_steps)
        self.ctx = build_step_context(cfg)

    def resident_bytes(self) -> int:
        tensors = chain(self.policy.parameters(), (p.grad for p in self.policy.parameters()), self.policy.buffers(),
                        (t for s in self.optimizer.state.values() for t in s.values()),
                        self.reference.parameters() if self.reference is not None else (),
                        self.reference.buffers() if self.reference is not None else ())
        return bs.storage_bytes(tensors)

    def step(self, index: int) -> None:
        if self.error is not None:
            return
        from pipelines import model as model_lib
        from pipelines.collate import collate_pairs
        from pipelines.train import loop as train_lib
        from pipelines.train import step as step_lib

        start, stop = self.setup.step_rows(index)
        rows = self.setup.pairs.rows(start, stop)
        rows.update({k: v[start:stop].copy() for k, v in self.columns.items()})
        self.meter.begin(self.resident_bytes())
        try:
            layout, head = self.layout
            micro = [model_lib.move_batch(collate_pairs(r, self.pad, layout=layout, response_head=head),
                                          self.setup.device)
                     for r in train_lib.split_global_batch(rows, rank=0, world_size=1,
                                                            micro_batch_size=self.cfg.train.micro_batch_size)]
            metrics = step_lib.train_step(self.policy, self.reference, self.optimizer, self.scheduler, micro,
                                          self.ctx, index)
        except torch.OutOfMemoryError as exc:
            self.fail(f"out of memory at step {index}: {str(exc).splitlines()[0]}")
            return
        seconds, peak = self.meter.end()
        # Outside the timed region: drop the gradients now rather than at the next train_step's
        # zero_grad(set_to_none=True), so they do not sit in memory through the other contenders'
        # steps (TRL frees its own after each step).  The next step's work is unchanged.
        self.optimizer.zero_grad(set_to_none=True)
        self.record(index, seconds, peak)
        if index in EARLY_STEPS:
            self.early[index] = {k: float(metrics[k]) for k in EARLY_KEYS}

    def close(self) -> None:
        for name in ("policy", "reference", "optimizer", "scheduler"):
            if hasattr(self, name):
                delattr(self, name)
        self.release()


# [3] TRL: DPOTrainer.train() with its defaults -------------------------------------------------------


def _recording_trainer_class():
    from torch.utils.data import SequentialSampler
    from trl import DPOTrainer

    class RecordingDPOTrainer(DPOTrainer):
        """DPOTrainer plus two benchmark-only changes that leave a step's work as it is: rows are
        drawn in dataset order (so TRL's step s trains on the same pairs as our step s), and each
        micro-batch's loss is kept, detached, for the steps-0-and-1 comparison."""

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            self.__dict__.setdefault("benchmark_losses", []).append((out[0] if return_outputs else out).detach())
            return out

    return RecordingDPOTrainer


def check_trl_tokenisation(dataset, pairs: bs.PreferencePairs) -> None:
    """TRL tokenised our strings back to exactly our ids (else the two sides train on different data)."""
    for name, ours in (("prompt_ids", pairs.prompts), ("chosen_ids", pairs.chosen), ("rejected_ids", pairs.rejected)):
        theirs = dataset[name]
        if len(theirs) != len(ours):
            raise RuntimeError(f"TRL kept {len(theirs)} of {len(ours)} pairs (column {name})")
        for i, (a, b) in enumerate(zip(theirs, ours)):
            if list(a) != b.tolist():
                raise RuntimeError(f"TRL tokenised pair {i} {name} differently from the benchmark's ids")


class TrlContender(Contender):
    """A DPOTrainer over the same pairs (strings that tokenise to our ids) and the same weights."""

    def __init__(self, spec: ContenderSpec, setup: BenchSetup) -> None:
        super().__init__(spec, setup)
        import datasets
        from transformers import PrinterCallback, ProgressCallback
        from trl import DPOConfig

        datasets.disable_progress_bars()
        self.output_dir = tempfile.mkdtemp(prefix="bench_trl_")
        precomputed = spec.reference == "precomputed"
        args = DPOConfig(
            output_dir=self.output_dir, max_steps=setup.total_steps,
            per_device_train_batch_size=setup.micro_batch_size,
            gradient_accumulation_steps=setup.batch_size // setup.micro_batch_size,
            max_length=setup.preset.max_length, gradient_checkpointing=spec.gradient_checkpointing,
            precompute_ref_log_probs=precomputed, bf16=setup.precision == "bf16",
            use_cpu=setup.device.type == "cpu", seed=setup.seed, learning_rate=setup.lr,
            # Off for the benchmark only: no checkpoints on disk, no trackers, no progress bar.
            report_to="none", save_strategy="no", disable_tqdm=True,
        )
        # With precompute TRL takes the reference log-probs from the policy before training and keeps
        # no reference model (its memory-saving mode); otherwise it gets its own frozen copy.
        policy = setup.instantiate("sdpa")
        reference = None if precomputed else setup.instantiate("sdpa")
        self.meter.begin()
        self.trainer = _recording_trainer_class()(
            model=policy, ref_model=reference, args=args,
            train_dataset=datasets.Dataset.from_dict(setup.pairs.texts(setup.tokenizer)),
            processing_class=setup.tokenizer,
        )
        self.extra["setup_seconds"] = self.meter.end()[0]  # tokenisation (+ reference precompute)
        check_trl_tokenisation(self.trainer.train_dataset, setup.pairs)
        for callback in (PrinterCallback, ProgressCallback):
            self.trainer.remove_callback(callback)
        self.completed = 0

    def resident_bytes(self) -> int:
        trainer = self.trainer
        optimizer = getattr(trainer, "optimizer", None)
        state = getattr(optimizer, "optimizer", optimizer).state if optimizer is not None else {}
        models = [m for m in (trainer.model, trainer.ref_model) if m is not None]
        tensors = chain(*(chain(m.parameters(), (p.grad for p in m.parameters()), m.buffers()) for m in models),
                        (t for s in state.values() for t in s.values() if isinstance(t, torch.Tensor)))
        return bs.storage_bytes(tensors)

    def run(self, between_steps: Callable[[int], None]) -> None:
        """trainer.train(); after each of TRL's optimizer steps s, `between_steps(s)` runs the others."""
        from transformers import TrainerCallback

        owner = self

        class Alternate(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                owner.meter.begin(owner.resident_bytes())

            def on_step_end(self, args, state, control, **kwargs):
                owner.finish_step(state.global_step - 1)
                between_steps(state.global_step - 1)
                owner.meter.begin(owner.resident_bytes())

        self.trainer.add_callback(Alternate())
        try:
            self.trainer.train()
        except torch.OutOfMemoryError as exc:
            self.fail(f"out of memory at step {self.completed}: {str(exc).splitlines()[0]}")
            return
        counted = sum(int(self.setup.step_lengths(s).sum()) for s in range(self.setup.total_steps))
        if self.trainer._total_train_tokens != counted:  # TRL's own count of attention_mask ones
            raise RuntimeError(f"TRL trained on {self.trainer._total_train_tokens} tokens, expected {counted}")

    def finish_step(self, index: int) -> None:
        seconds, peak = self.meter.end()
        self.record(index, seconds, peak)
        self.completed = index + 1
        if index in EARLY_STEPS:
            # One entry per micro-batch (TRL logs every logging_steps=10 steps, after which
            # _metrics is cleared; steps 0 and 1 are still there).  Equal micro-batch sizes, so
            # their mean is the step's pair-weighted mean, as our MetricSums computes it.
            a = self.setup.batch_size // self.setup.micro_batch_size
            window = slice(index * a, (index + 1) * a)
            losses = self.trainer.benchmark_losses[window]
            metrics = self.trainer._metrics["train"]
            self.early[index] = {"loss": float(torch.stack(losses).float().mean())}
            for key in EARLY_KEYS[1:]:
                values = metrics.get(key, [])[window]
                if len(values) == a:
                    self.early[index][key] = float(np.mean(values))

    def close(self) -> None:
        if hasattr(self, "trainer"):
            self.trainer.accelerator.free_memory()
            del self.trainer
        shutil.rmtree(self.output_dir, ignore_errors=True)
        self.release()
