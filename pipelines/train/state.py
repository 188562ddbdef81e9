"""Checkpoint contents of the train stage: what a restart needs to continue bit-for-bit.

A checkpoint directory holds
    trainable.pt      the trainable parameters (all weights for full fine-tuning, the LoRA adapters
                      otherwise), full (unsharded) tensors
    optimizer.pt      optimizer state (full, unsharded) and LR-scheduler state
    final_model/      only in the last checkpoint: an HF model dir (LoRA merged) + tokenizer
    train_state.json  {"step": optimizer steps done, "history": [metrics rows reported so far],
                      "files": {path: size in bytes of every other file}}, written last
A checkpoint is complete only when its train_state.json lists every other file at its size: a copy
into storage cut short (a killed driver, a lost node) is never taken for the latest checkpoint
(`find_latest_checkpoint` passes it over and the run resumes from the one before).
The data position is the step (the data order is a pure function of seed, epoch and step) and the
RNG is reseeded per micro-step from (seed, step, rank), so neither needs saving.  The metrics
history rides in every checkpoint because Ray Train V2 keeps only the metrics attached to kept
checkpoints: the driver writes DIR/metrics.csv from the latest checkpoint's history, which survives
worker restarts and driver reruns alike.

Both .pt files are read with `torch.load(weights_only=True)`: tensors, numbers, strings, lists and
dicts only, so a checkpoint cannot run code when it is loaded (`_loadable_scheduler_state` refuses
anything else at save time rather than at resume).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import torch

TRAINABLE_FILE = "trainable.pt"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
FINAL_MODEL_DIR = "final_model"


def _is_sharded(model) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the trainable parameters (a collective under FSDP: every rank calls it)."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v for k, v in full.items() if k in trainable}
    return {n: p.detach().to("cpu", copy=True) for n, p in trainable.items()}


def optimizer_state_dict(model, optimizer) -> dict[str, Any]:
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, optimizer, options=options)
    return optimizer.state_dict()


def _copy_weights(model, weights: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def _loadable_scheduler_state(scheduler) -> dict[str, Any]:
    """scheduler.state_dict() with only what `weights_only=True` loads back.

    LambdaLR keeps the __dict__ of callable-object schedules and None for plain functions (ours:
    build_schedule's closure, rebuilt from the config on resume). A callable object with state
    would be pickled as arbitrary objects, which a weights_only load refuses; fail when writing.
    """
    state = scheduler.state_dict()
    for entry in state.get("lr_lambdas", []):
        if entry is not None:
            raise TypeError(
                f"LR schedule {type(scheduler).__name__} carries callable-object state {entry!r}; "
                "checkpoints hold only tensors and plain values (build the schedule from a function)"
            )
    return state


def _load_plain(path: Path) -> Any:
    """torch.load with weights_only=True: tensors and plain containers, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise RuntimeError(
            f"checkpoint file {path} holds objects other than tensors and plain values; it is not "
            "unpickled (weights_only=True), so a checkpoint cannot run code when it is loaded"
        ) from error


def save_checkpoint(directory: Path, model, optimizer, scheduler, *, step: int, history: list[dict],
                    rank: int, timings: dict | None = None, final_model=None) -> None:
    """Write the checkpoint files (rank 0 writes; under FSDP every rank joins the gathers), then
    `final_model(directory / FINAL_MODEL_DIR)` when given, then train_state.json with the file list."""
    weights = trainable_state_dict(model)
    optim = optimizer_state_dict(model, optimizer)
    if rank != 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(weights, directory / TRAINABLE_FILE)
    torch.save({"optimizer": optim, "scheduler": _loadable_scheduler_state(scheduler)}, directory / OPTIMIZER_FILE)
    if final_model is not None:
        final_model(directory / FINAL_MODEL_DIR)
    files = {str(p.relative_to(directory)): p.stat().st_size
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != STATE_FILE}
    (directory / STATE_FILE).write_text(json.dumps({"step": step, "history": history, "timings": timings or {},
                                                    "files": files}))


def read_train_state(directory: str | Path) -> dict[str, Any]:
    """{"step": int, "history": [...]} of a checkpoint directory."""
    return json.loads((Path(directory) / STATE_FILE).read_text())


def load_checkpoint(directory: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimizer and scheduler on this rank; return the train state."""
    weights = _load_plain(directory / TRAINABLE_FILE)
    saved = _load_plain(directory / OPTIMIZER_FILE)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != trainable:
        missing = sorted(trainable - set(weights))[:3]
        raise RuntimeError(f"checkpoint {directory} does not match the model's trainable parameters (e.g. {missing})")
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(model, weights, options=options)
        set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=options)
    else:
        _copy_weights(model, weights)
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return read_train_state(directory)


def save_final_model(directory: Path, model, *, model_path: str, lora: bool, weights: dict | None = None) -> Path:
    """Write an HF model dir loadable with from_pretrained: LoRA merged into the base, + tokenizer.

    Under FSDP pass `weights` (the gathered full trainable state): a fresh CPU copy is then built from
    `model_path` (also the tokenizer's source) and loaded with them.
    """
    from transformers import AutoTokenizer

    from pipelines import model as model_lib

    directory.mkdir(parents=True, exist_ok=True)
    if weights is not None:  # sharded: rebuild a full copy on CPU and load the gathered weights
        attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
        fresh = model_lib.load_causal_lm(model_path, attn_implementation=attn)
        if lora:
            from peft import get_peft_model

            fresh = get_peft_model(fresh, model.peft_config["default"])
        _copy_weights(fresh, weights)
        model = fresh
    if lora:
        model = model.merge_and_unload()
    model.save_pretrained(directory)
    try:
        AutoTokenizer.from_pretrained(model_path).save_pretrained(directory)
    except (OSError, ValueError):
        pass  # a model path without a tokenizer: the model dir is still complete
    return directory


def find_latest_checkpoint(root: Path) -> Path | None:
    """The complete checkpoint_* folder under `root` with the most steps done (driver side, no Ray); a
    checkpoint written before train_state.json listed its files counts as complete."""
    best, best_step = None, -1
    for state in root.glob("checkpoint_*/" + STATE_FILE):
        try:
            saved = read_train_state(state.parent)
            step = saved["step"]
        except (OSError, ValueError, KeyError):
            continue
        files = [(state.parent / name, size) for name, size in saved.get("files", {}).items()]
        if step > best_step and all(path.is_file() and path.stat().st_size == size for path, size in files):
            best, best_step = state.parent, step
    return best
