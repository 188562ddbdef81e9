"""Policy and reference models, batch collation, and the one concatenated forward per micro-batch.

A micro-batch of B pairs becomes 2B right-padded rows `prompt + response` (chosen rows 0..B-1, then
rejected rows B..2B-1; OBJECTIVES.md section 1) with labels -100 on prompt and padding; a listwise
micro-batch of B prompts x K responses becomes B*K rows (row b*K + k).  One forward gives every
row's summed response log-prob through `robust_objectives.logps` (the only logits -> log-prob
code), plus, only when the objective needs them, per-position vocabulary log-probs (TDPO, Ra-DPO)
or the input-embedding tensor kept in the graph (WDPO's double backward).

With LoRA (peft) the reference is the same module with its adapters disabled
(`with model.disable_adapter()` under no_grad): no second copy of the weights.

Every stage loads models here (`load_causal_lm`, which also merges a PEFT adapter dir; the config
probe `load_model_config`; the device `pick_device`), and the reference and evaluate stages compute
pair and list log-probs with one actor, `PairLogps`, over the same collation and forward as training.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow as pa
import torch

from pipelines import schema
from pipelines.errors import UserError
from robust_objectives import ListwiseLogps, PreferenceLogps
from robust_objectives import logps as logps_lib

IGNORE_INDEX = logps_lib.IGNORE_INDEX
ADAPTER_CONFIG = "adapter_config.json"  # marks a PEFT adapter dir


# [1] Collation: rows of token ids -> one padded batch ------------------------------------------


def _as_ids(value: Any) -> list[int]:
    return [int(t) for t in value]


def pad_rows(sequences: Sequence[tuple[list[int], int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `(ids, prompt_length)` rows into input_ids / attention_mask / labels of shape (N, L)."""
    length = max(len(ids) for ids, _ in sequences)
    n = len(sequences)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(sequences):
        tokens = torch.tensor(ids, dtype=torch.long)
        input_ids[row, : len(ids)] = tokens
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_length : len(ids)] = tokens[prompt_length:]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _optional_float(rows: Mapping[str, Any], name: str) -> Optional[torch.Tensor]:
    if name not in rows:
        return None
    return torch.as_tensor(np.stack([np.asarray(v, dtype=np.float64) for v in rows[name]]), dtype=torch.float32)


def collate_pairs(rows: Mapping[str, Sequence[Any]], pad_token_id: int) -> dict[str, Any]:
    """Concatenate B preference pairs into one 2B-row batch (chosen rows, then rejected rows).

    Args:
        rows: columns of the dataset contract (pipelines/schema.py): prompt_input_ids,
            chosen_input_ids, rejected_input_ids (each a length-B sequence of id lists), and
            optionally calibration / reference_chosen_logps / reference_rejected_logps (B,).
        pad_token_id: id written at padding positions (masked out; any valid id works).

    Returns:
        dict with input_ids, attention_mask, labels (2B, L) (labels -100 on prompt and padding),
        chosen_lengths / rejected_lengths (B,) response token counts, num_pairs B, and the optional
        float columns as (B,) tensors.
    """
    prompts = [_as_ids(p) for p in rows["prompt_input_ids"]]
    chosen = [_as_ids(c) for c in rows["chosen_input_ids"]]
    rejected = [_as_ids(r) for r in rows["rejected_input_ids"]]
    sequences = [(p + c, len(p)) for p, c in zip(prompts, chosen)]
    sequences += [(p + r, len(p)) for p, r in zip(prompts, rejected)]
    batch: dict[str, Any] = pad_rows(sequences, pad_token_id)
    batch["num_pairs"] = len(prompts)
    batch["chosen_lengths"] = torch.tensor([len(c) for c in chosen], dtype=torch.long)
    batch["rejected_lengths"] = torch.tensor([len(r) for r in rejected], dtype=torch.long)
    for name in ("calibration", "reference_chosen_logps", "reference_rejected_logps"):
        value = _optional_float(rows, name)
        if value is not None:
            batch[name] = value
    return batch


def collate_lists(rows: Mapping[str, Sequence[Any]], pad_token_id: int) -> dict[str, Any]:
    """Flatten B prompts x K scored responses into B*K rows (row b*K + k).

    Args:
        rows: prompt_input_ids (B lists), responses_input_ids (B lists of K id lists), scores
            (B lists of K), optionally calibration and reference_logps (B lists of K).
        pad_token_id: id written at padding positions.

    Returns:
        dict with input_ids, attention_mask, labels (B*K, L), scores (B, K), num_pairs B,
        list_size K, and calibration / reference_logps (B, K) when present.

    Raises:
        ValueError: lists of different sizes in one batch (the (B, K) objectives need one K).
    """
    prompts = [_as_ids(p) for p in rows["prompt_input_ids"]]
    responses = [[_as_ids(r) for r in group] for group in rows["responses_input_ids"]]
    sizes = {len(group) for group in responses}
    if len(sizes) != 1:
        raise ValueError(f"listwise batch mixes list sizes {sorted(sizes)}; every row needs the same K")
    sequences = [(p + r, len(p)) for p, group in zip(prompts, responses) for r in group]
    batch: dict[str, Any] = pad_rows(sequences, pad_token_id)
    batch["num_pairs"] = len(prompts)
    batch["list_size"] = sizes.pop()
    batch["scores"] = _optional_float(rows, "scores")
    for name in ("calibration", "reference_logps"):
        value = _optional_float(rows, name)
        if value is not None:
            batch[name] = value
    return batch


def count_tokens(batch: Mapping[str, Any]) -> tuple[int, int]:
    """(non-padding tokens, padded positions) of a collated batch."""
    mask = batch["attention_mask"]
    return int(mask.sum()), int(mask.numel())


# [2] Models ------------------------------------------------------------------------------------


def pick_device(use_gpu: bool) -> torch.device:
    """The device a stage's actor computes on: CUDA when asked for and present, else the CPU."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def _adapter_base(path: str) -> str | None:
    """The base model a PEFT adapter dir was trained from, or None when `path` is not one."""
    adapter = Path(path) / ADAPTER_CONFIG
    if not adapter.is_file():
        return None
    return json.loads(adapter.read_text()).get("base_model_name_or_path") or None


def load_model_config(path: str, what: str):
    """The `AutoConfig` of a model dir, hub name or PEFT adapter dir (its base model's config), without
    loading weights: the cheap check every stage runs before Ray starts.

    Args:
        path: what `load_causal_lm` (or from_pretrained) would load.
        what: how the user named it, leading the error message (a flag or a config key).

    Raises:
        UserError: `<what>: cannot load a model config from '<path>' (<first line of the cause>)`.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(_adapter_base(path) or path)
    except Exception as exc:  # noqa: BLE001 - any load failure (missing, malformed, unknown type) is the path's
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what}: cannot load a model config from '{path}' ({first})") from exc


def load_causal_lm(path: str, *, attn_implementation: str = "sdpa", device: torch.device | str = "cpu"):
    """A causal LM in fp32 on `device` (bf16 is autocast, not storage): a model dir or hub name, or a
    PEFT adapter dir merged into its base model (what a LoRA run without merging leaves behind)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load, per worker or actor, is noise in the run's log
    kwargs = dict(dtype=torch.float32, attn_implementation=attn_implementation)
    if _adapter_base(path) is not None:
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, **kwargs).merge_and_unload()
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model.to(device)


def add_lora(model, *, r: int, alpha: float, dropout: float, target_modules: Sequence[str], seed: int):
    """Wrap `model` with peft LoRA adapters; only the adapters train.

    The adapter init (LoRA's A matrices are random) is seeded so every worker, and a rerun with any
    number of workers, starts from the same weights.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules) or None,
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def pad_token_id_of(model) -> int:
    config = model.config
    for value in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


# [3] The forward: rows -> log-probs -------------------------------------------------------------


@dataclass(frozen=True)
class RowLogps:
    """Log-probs of the N rows of one collated batch under one model.

    Attributes:
        logps: (N,) summed response log-probs, fp32.
        lengths: (N,) response token counts.
        vocab_logps: (N, T, V) per-position log-softmax over the response span, or None.
        mask: (N, T) True at response positions (aligned with vocab_logps), or None.
        embeddings: (N, L, d) input embeddings the logits were computed from (graph kept), or None.
    """

    logps: torch.Tensor
    lengths: torch.Tensor
    vocab_logps: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    embeddings: Optional[torch.Tensor] = None


def autocast_context(device_type: str, precision: str):
    """bf16 autocast (fp32 master weights) or nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compute_row_logps(
    model,
    batch: Mapping[str, Any],
    *,
    vocab: bool = False,
    embeddings: bool = False,
    precision: str = "fp32",
) -> RowLogps:
    """One forward of all rows of `batch`; log-probs via robust_objectives.logps in fp32.

    Args:
        model: a causal LM (possibly peft-wrapped), already on the batch's device.
        batch: collate_pairs / collate_lists output moved to the model's device.
        vocab: also return per-position vocabulary log-probs over the response span.
        embeddings: feed `inputs_embeds = model.get_input_embeddings()(input_ids)` and return it;
            if the embedding layer is frozen (LoRA) the tensor is made a leaf requiring grad, so
            d loss / d embeddings still exists (WDPO).
        precision: "fp32" or "bf16" (autocast).

    Returns:
        RowLogps of the N = 2B (or B*K) rows.
    """
    input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
    embeds = None
    with autocast_context(input_ids.device.type, precision):
        if embeddings:
            embeds = model.get_input_embeddings()(input_ids)
            if not embeds.requires_grad:
                embeds = embeds.detach().requires_grad_(True)
            kwargs["inputs_embeds"] = embeds
        else:
            kwargs["input_ids"] = input_ids
        logits = model(**kwargs).logits  # (N, L, V)
    if not vocab:
        logps, lengths = logps_lib.compute_sequence_logps(logits, labels)
        return RowLogps(logps=logps, lengths=lengths, embeddings=embeds)
    vocab_logps, token_logps, mask = logps_lib.compute_vocab_logps(logits, labels)
    # Keep only the response span: columns before the earliest response position are all masked.
    first = int(mask.any(dim=0).nonzero()[0]) if bool(mask.any()) else 0
    return RowLogps(
        logps=token_logps.sum(dim=-1),
        lengths=mask.sum(dim=-1),
        vocab_logps=vocab_logps[:, first:],
        mask=mask[:, first:],
        embeddings=embeds,
    )


def compute_reference_row_logps(
    policy, reference, batch: Mapping[str, Any], *, vocab: bool = False, precision: str = "fp32"
) -> RowLogps:
    """Reference log-probs under no_grad: a frozen copy, or the policy with LoRA adapters disabled."""
    with torch.no_grad():
        if reference is not None:
            return compute_row_logps(reference, batch, vocab=vocab, precision=precision)
        if not is_peft_model(policy):
            raise ValueError("a live reference needs either a reference model or a LoRA policy")
        with policy.disable_adapter():
            return compute_row_logps(policy, batch, vocab=vocab, precision=precision)


# [4] Objective inputs -----------------------------------------------------------------------------


def build_preference_logps(batch: Mapping[str, Any], policy: RowLogps, reference: RowLogps | None) -> PreferenceLogps:
    """Split the 2B rows into the chosen / rejected fields of PreferenceLogps.

    The reference comes from `reference` (live) or from the batch's precomputed columns.
    """
    b = batch["num_pairs"]
    if reference is not None:
        reference_chosen, reference_rejected = reference.logps[:b], reference.logps[b:]
    else:
        reference_chosen = batch["reference_chosen_logps"].to(policy.logps)
        reference_rejected = batch["reference_rejected_logps"].to(policy.logps)
    fields: dict[str, Any] = dict(
        policy_chosen_logps=policy.logps[:b],
        policy_rejected_logps=policy.logps[b:],
        reference_chosen_logps=reference_chosen.detach(),
        reference_rejected_logps=reference_rejected.detach(),
        chosen_lengths=batch["chosen_lengths"],
        rejected_lengths=batch["rejected_lengths"],
        calibration=batch.get("calibration"),
        policy_input_embeddings=policy.embeddings,
    )
    if policy.vocab_logps is not None:
        assert reference is not None and reference.vocab_logps is not None
        fields.update(
            policy_chosen_vocab_logps=policy.vocab_logps[:b],
            policy_rejected_vocab_logps=policy.vocab_logps[b:],
            reference_chosen_vocab_logps=reference.vocab_logps[:b].detach(),
            reference_rejected_vocab_logps=reference.vocab_logps[b:].detach(),
            chosen_mask=policy.mask[:b],
            rejected_mask=policy.mask[b:],
        )
    return PreferenceLogps(**fields)


def build_listwise_logps(batch: Mapping[str, Any], policy: RowLogps, reference: RowLogps | None) -> ListwiseLogps:
    """Reshape B*K row log-probs into the (B, K) fields of ListwiseLogps."""
    b, k = batch["num_pairs"], batch["list_size"]
    if reference is not None:
        reference_logps = reference.logps.reshape(b, k)
    else:
        reference_logps = batch["reference_logps"].to(policy.logps)
    return ListwiseLogps(
        policy_logps=policy.logps.reshape(b, k),
        reference_logps=reference_logps.detach(),
        scores=batch["scores"],
        calibration=batch.get("calibration"),
    )


def move_batch(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Tensors to `device`; ints stay."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# [5] The pair log-prob actor of the reference and evaluate stages -------------------------------


class PairLogps:
    """`map_batches` callable class: summed response log-probs of every row under one or more models.

    Pairs get `<prefix>_chosen_logps` / `<prefix>_rejected_logps` (float64), lists `<prefix>_logps`
    (one float64 per response), per (prefix, model path): the reference stage's prefix "reference"
    gives the schema's reference columns; evaluate holds the reference and several checkpoints in one
    actor, so its pairs stream through one pool instead of one per model (an actor start costs
    seconds).  Each `batch_size` pairs (or lists) are collated once (collate_pairs / collate_lists)
    and take one concatenated forward per model (compute_row_logps, fp32 log-probs under `precision`).
    """

    def __init__(self, *, models: Sequence[tuple[str, str]], listwise: bool = False, batch_size: int = 16,
                 precision: str = "fp32", attn_implementation: str = "sdpa", use_gpu: bool = False,
                 keep: Optional[Sequence[str]] = None) -> None:
        """Args:
            models: (column prefix, model path) pairs; the first model's pad id pads every batch.
            listwise: rows are lists (prompt_input_ids, responses_input_ids) instead of pairs.
            batch_size: pairs (or lists) per forward.
            precision: "fp32" or "bf16" (autocast).
            attn_implementation: attention kernel the models are loaded with.
            use_gpu: compute on CUDA when the actor has a GPU.
            keep: input columns returned with the log-prob columns; None = every input column.
        """
        self.device = pick_device(use_gpu)
        self.models = []
        for prefix, path in models:
            model = load_causal_lm(path, attn_implementation=attn_implementation, device=self.device).eval()
            self.models.append((prefix, model.requires_grad_(False)))
        self.pad = pad_token_id_of(self.models[0][1])
        self.listwise, self.batch_size, self.precision = listwise, batch_size, precision
        self.keep = None if keep is None else list(keep)

    def __call__(self, table: pa.Table) -> pa.Table:
        """Args: table: pyarrow batch with the token columns (schema.PAIR_TOKEN_COLUMNS or
        LIST_TOKEN_COLUMNS).  Returns: the `keep` columns plus the log-prob columns, row for row."""
        token_columns = schema.LIST_TOKEN_COLUMNS if self.listwise else schema.PAIR_TOKEN_COLUMNS
        rows = {c: table.column(c).to_pylist() for c in token_columns}
        values: dict[str, list] = {}
        for start in range(0, table.num_rows, self.batch_size):
            chunk = {c: v[start: start + self.batch_size] for c, v in rows.items()}
            collate = collate_lists if self.listwise else collate_pairs
            batch = move_batch(collate(chunk, self.pad), self.device)
            for prefix, model in self.models:
                with torch.no_grad():
                    logps = compute_row_logps(model, batch, precision=self.precision).logps.double().cpu()
                b = batch["num_pairs"]
                if self.listwise:
                    values.setdefault(f"{prefix}_logps", []).extend(logps.reshape(b, batch["list_size"]).tolist())
                else:
                    values.setdefault(f"{prefix}_chosen_logps", []).extend(logps[:b].tolist())
                    values.setdefault(f"{prefix}_rejected_logps", []).extend(logps[b:].tolist())
        out = table if self.keep is None else table.select(self.keep)
        kind = pa.list_(pa.float64()) if self.listwise else pa.float64()
        for name in self.columns():
            out = out.append_column(name, pa.array(values.get(name, []), type=kind))
        return out

    def columns(self) -> list[str]:
        """The log-prob columns this actor adds, in order."""
        sides = ("",) if self.listwise else ("_chosen", "_rejected")
        return [f"{prefix}{side}_logps" for prefix, _ in self.models for side in sides]
