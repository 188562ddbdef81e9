"""Policy and reference models and the one forward per micro-batch: rows -> summed log-probs.

A collated micro-batch (pipelines/collate.py: 2B rows of pairs or B*K rows of lists, padded or
packed with each prompt once) takes one forward per model.  With the response-only head's addresses
in the batch, only the hidden states that predict a response token are projected to the vocabulary
(chunked; `head_is_plain` checks the head is a plain projection, else the model's own
`logits_to_keep` path is used); without them the full (N, L, V) logits go through
`robust_objectives.logps` (the plain path).  Log-probs are fp32 either way, plus, only when the
objective needs them, per-position vocabulary log-probs (TDPO, Ra-DPO) or the input-embedding rows
kept in the graph (WDPO's double backward).

With LoRA (peft) the reference is the same module with its adapters disabled
(`with model.disable_adapter()` under no_grad): no second copy of the weights.

Every stage loads models here (`load_causal_lm` also merges a PEFT adapter dir), and the reference
and evaluate stages compute log-probs with one actor, `PairLogps`, over the same collation and
forward as training.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pyarrow as pa
import torch

from pipelines import schema
from pipelines.errors import UserError, first_line
from robust_objectives import ListwiseLogps, PreferenceLogps
from robust_objectives import logps as logps_lib
from pipelines.collate import collate_lists, collate_pairs

IGNORE_INDEX = logps_lib.IGNORE_INDEX


# [2] Models ------------------------------------------------------------------------------------


def pick_device(use_gpu: bool) -> torch.device:
    """The device a stage's actor computes on: CUDA when asked for and present, else the CPU."""
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")


def _adapter_base(path: str) -> str | None:
    """The base model a PEFT adapter dir was trained from, or None when `path` is not one."""
    adapter = Path(path) / "adapter_config.json"
    if not adapter.is_file():
        return None
    return json.loads(adapter.read_text()).get("base_model_name_or_path") or None


def load_model_config(path: str, what: str):
    """The `AutoConfig` of what `load_causal_lm` would load (an adapter dir: its base's), without the
    weights: the cheap check every stage runs before Ray starts.  `what` (how the user named it: a
    flag or a config key) leads the UserError."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(_adapter_base(path) or path)
    except Exception as exc:  # noqa: BLE001 - any load failure (missing, malformed, unknown type) is the path's
        raise UserError(f"{what}: cannot load a model config from '{path}' ({first_line(exc)})") from exc


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

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules) or None,
                        task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def enable_activation_checkpointing(model) -> None:
    """HF's layer-wise activation (gradient) checkpointing, non-reentrant (works with frozen inputs,
    LoRA and the packed layouts' 4D mask); transformers < 5 names it gradient_checkpointing_enable."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
    """Log-probs of the N rows of one collated batch under one model."""

    logps: torch.Tensor  # (N,) summed response log-probs, fp32
    lengths: torch.Tensor  # (N,) response token counts
    vocab_logps: Optional[torch.Tensor] = None  # (N, T, V) per-position log-softmax over the response span
    mask: Optional[torch.Tensor] = None  # (N, T) True at response positions (aligned with vocab_logps)
    embeddings: Optional[torch.Tensor] = None  # (N, L, d) input embeddings of the logits (graph kept)


HEAD_CHUNK_ELEMENTS = 2**26  # logits per response-head chunk (256 MiB fp32); more positions are checkpointed chunk by chunk
PACKED_ATTENTION = ("sdpa", "eager")  # kernels that take the packed layouts' 4D mask


def packed_attention_mask(batch: Mapping[str, Any], attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The (R, 1, W, W) mask of a packed / shared batch (pipelines/collate.py): in each packed row,
    query i sees key j iff both are in one segment, j <= i, and j is on the prompt (branch 0) or on
    i's own branch.

    sdpa takes it as bool (True = attend); eager adds it to the scores (0 or the dtype's minimum).
    """
    if attn_implementation not in PACKED_ATTENTION:
        raise ValueError(f"packed layouts need attention {' or '.join(PACKED_ATTENTION)} (a 4D mask), "
                         f"not {attn_implementation!r}; use the padded layout (train.packing=false)")
    segment, branch = batch["segment_ids"], batch["branch_ids"]
    index = torch.arange(segment.shape[-1], device=segment.device)
    allowed = ((segment[:, :, None] == segment[:, None, :]) & (index[None, None, :] <= index[None, :, None])
               & ((branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])))[:, None]
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def head_is_plain(model) -> bool:
    """Whether logits are exactly `get_output_embeddings()(get_decoder()(...).last_hidden_state)`.

    Decided once per model by a 4-token probe in eval mode (no softcapping, logit scaling or other
    post-processing after the head).  FSDP-sharded models answer False without a probe: their root
    parameters are gathered only by the root module's forward.  When False the response-only head
    goes through the model's own forward with `logits_to_keep` (exact for every model, unchunked).
    """
    if "_plain_head" in model.__dict__:
        return model.__dict__["_plain_head"]
    from torch.distributed.fsdp import FSDPModule

    plain = False
    if not isinstance(model, FSDPModule):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                ids = torch.arange(1, 5, device=model.device)[None] % model.get_input_embeddings().num_embeddings
                full = model(input_ids=ids, use_cache=False).logits
                hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
                mine = model.get_output_embeddings()(hidden)
            plain = mine.shape == full.shape and bool(torch.allclose(mine, full, rtol=1e-5, atol=1e-6))
        finally:
            model.train(was_training)
    model.__dict__["_plain_head"] = plain
    return plain


def compute_row_logps(model, batch: Mapping[str, Any], *, vocab: bool = False, embeddings: bool = False,
                      precision: str = "fp32") -> RowLogps:
    """One forward of the N = 2B (or B*K) rows of `batch` (collated, on the model's device).

    Batches with the response-only head's addresses (every packed batch, and padded ones collated
    with response_head=True) project only the hidden states that predict a response token; the
    others compute the full (N, L, V) logits (the plain path).  Both give the same fp32 log-probs.

    Args:
        vocab: also return per-position vocabulary log-probs over the response span.
        embeddings: feed `inputs_embeds = model.get_input_embeddings()(input_ids)` and return it
            as (N, L, d) rows (a packed batch's rows are gathered into its packed rows, so d loss /
            d rows is per row); if the embedding layer is frozen (LoRA) the tensor is made a leaf
            requiring grad, so d loss / d embeddings still exists (WDPO).
        precision: "fp32" or "bf16" (autocast).
    """
    input_ids = batch["input_ids"]
    kwargs: dict[str, Any] = {"use_cache": False}
    if batch.get("layout", "padded") == "padded":
        kwargs["attention_mask"] = batch["attention_mask"]
    else:
        kwargs["attention_mask"] = packed_attention_mask(batch, model.config._attn_implementation, model.dtype)
        kwargs["position_ids"] = batch["position_ids"]
    embeds = None
    index, targets = batch.get("score_index"), batch.get("score_targets")
    plain_head = index is not None and head_is_plain(model)
    bf16 = precision == "bf16"  # autocast over fp32 master weights
    with torch.autocast(input_ids.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
        if embeddings:
            embeds = model.get_input_embeddings()(input_ids)
            packed_rows = "token_rows" in batch  # the objective gets (N, L, d) rows, the model their packing
            if packed_rows:
                flat, rows_at, cols_at = batch["token_flat"], batch["token_rows"], batch["token_cols"]
                width = embeds.shape[-1]
                shape = (batch["num_rows"], int(cols_at.max()) + 1, width)
                embeds = embeds.new_zeros(shape).index_put((rows_at, cols_at), embeds.reshape(-1, width)[flat])
            if not embeds.requires_grad:
                embeds = embeds.detach().requires_grad_(True)
            kwargs["inputs_embeds"] = embeds
            if packed_rows:
                packed = embeds.new_zeros(input_ids.numel(), width).index_put((flat,), embeds[rows_at, cols_at])
                kwargs["inputs_embeds"] = packed.view(*input_ids.shape, width)
        else:
            kwargs["input_ids"] = input_ids
        if index is None:
            logits = model(**kwargs).logits  # (N, L, V)
        elif plain_head:
            hidden = model.get_decoder()(**kwargs).last_hidden_state
            scored = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)  # (M, d)
            head = model.get_output_embeddings()
            if vocab:
                logits = head(scored)
            else:
                chunk = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
                token_logps = logps_lib.projected_label_logps(scored, head, targets, chunk)
        else:  # the model's own head at the scored positions: a (rows, L) mask, row-major = sorted
            unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
            keep = torch.zeros(input_ids.numel(), dtype=torch.bool, device=index.device)
            keep = keep.index_fill(0, unique, True).view(input_ids.shape)
            logits = model(**kwargs, logits_to_keep=keep).logits.reshape(unique.shape[0], -1)[inverse]
            if not vocab:
                token_logps = logps_lib.label_logps(logits, targets)
    if index is None:
        return _full_logits_row_logps(logits, batch["labels"], vocab, embeds)
    rows, n = batch["score_rows"], batch["num_rows"]
    vocab_logps = mask = None
    if vocab:
        scored_vocab = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        token_logps = scored_vocab.gather(-1, targets[:, None]).squeeze(-1)
        cols = batch["score_cols"]
        span = int(cols.max()) + 1 if cols.numel() else 1
        vocab_logps = scored_vocab.new_zeros(n, span, scored_vocab.shape[-1]).index_put((rows, cols), scored_vocab)
        mask = torch.zeros(n, span, dtype=torch.bool, device=rows.device)
        mask[rows, cols] = True
    logps = token_logps.new_zeros(n).index_add(0, rows, token_logps)
    return RowLogps(logps=logps, lengths=batch["lengths"], vocab_logps=vocab_logps, mask=mask, embeddings=embeds)


def _full_logits_row_logps(logits: torch.Tensor, labels: torch.Tensor, vocab: bool, embeds) -> RowLogps:
    """The plain path: (N, L, V) logits of every position -> summed response log-probs."""
    if not vocab:
        logps, lengths = logps_lib.compute_sequence_logps(logits, labels)
        return RowLogps(logps=logps, lengths=lengths, embeddings=embeds)
    vocab_logps, token_logps, mask = logps_lib.compute_vocab_logps(logits, labels)
    # Keep only the response span: columns before the earliest response position are all masked.
    first = int(mask.any(dim=0).nonzero()[0]) if bool(mask.any()) else 0
    return RowLogps(logps=token_logps.sum(dim=-1), lengths=mask.sum(dim=-1), vocab_logps=vocab_logps[:, first:],
                    mask=mask[:, first:], embeddings=embeds)


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
        policy_chosen_logps=policy.logps[:b], policy_rejected_logps=policy.logps[b:],
        reference_chosen_logps=reference_chosen.detach(), reference_rejected_logps=reference_rejected.detach(),
        chosen_lengths=batch["chosen_lengths"], rejected_lengths=batch["rejected_lengths"],
        calibration=batch.get("calibration"), policy_input_embeddings=policy.embeddings)
    if policy.vocab_logps is not None:
        assert reference is not None and reference.vocab_logps is not None
        fields.update(
            policy_chosen_vocab_logps=policy.vocab_logps[:b], policy_rejected_vocab_logps=policy.vocab_logps[b:],
            reference_chosen_vocab_logps=reference.vocab_logps[:b].detach(),
            reference_rejected_vocab_logps=reference.vocab_logps[b:].detach(),
            chosen_mask=policy.mask[:b], rejected_mask=policy.mask[b:])
    return PreferenceLogps(**fields)


def build_listwise_logps(batch: Mapping[str, Any], policy: RowLogps, reference: RowLogps | None) -> ListwiseLogps:
    """Reshape B*K row log-probs into the (B, K) fields of ListwiseLogps."""
    b, k = batch["num_pairs"], batch["list_size"]
    if reference is not None:
        reference_logps = reference.logps.reshape(b, k)
    else:
        reference_logps = batch["reference_logps"].to(policy.logps)
    return ListwiseLogps(policy_logps=policy.logps.reshape(b, k), reference_logps=reference_logps.detach(),
                         scores=batch["scores"], calibration=batch.get("calibration"))


def move_batch(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Tensors to `device`; ints stay."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# [5] The pair log-prob actor of the reference and evaluate stages -------------------------------


class PairLogps:
    """`map_batches` callable class: summed response log-probs of every row under one or more models.

    `models` are (column prefix, model path) pairs: pairs get `<prefix>_chosen_logps` /
    `<prefix>_rejected_logps` (float64), lists `<prefix>_logps` (one float64 per response); the
    first model's pad id pads every batch.  The reference stage's prefix "reference" gives the
    schema's reference columns; evaluate holds the reference and several checkpoints in one actor, so
    its pairs stream through one pool instead of one per model (an actor start costs seconds).  Each
    `batch_size` pairs (or lists) are collated once and take one packed forward per model, the prompt
    once (compute_row_logps, fp32 log-probs under `precision`).  The output keeps the input columns
    named by `keep` (None = all), row for row.
    """

    def __init__(self, *, models: Sequence[tuple[str, str]], listwise: bool = False, batch_size: int = 16,
                 precision: str = "fp32", attn_implementation: str = "sdpa", use_gpu: bool = False,
                 keep: Optional[Sequence[str]] = None) -> None:
        self.device = pick_device(use_gpu)
        self.models = [(prefix, load_causal_lm(path, attn_implementation=attn_implementation, device=self.device)
                        .eval().requires_grad_(False)) for prefix, path in models]
        self.pad = pad_token_id_of(self.models[0][1])
        # Each prompt once, response positions only (pipelines/collate.py); the kernels that take no
        # 4D mask get padded rows, still with the response-only head.
        self.layout = "shared" if attn_implementation in PACKED_ATTENTION else "padded"
        self.listwise, self.batch_size, self.precision = listwise, batch_size, precision
        self.keep = None if keep is None else list(keep)

    def __call__(self, table: pa.Table) -> pa.Table:
        token_columns = schema.LIST_TOKEN_COLUMNS if self.listwise else schema.PAIR_TOKEN_COLUMNS
        collate = collate_lists if self.listwise else collate_pairs
        sides = ("",) if self.listwise else ("_chosen", "_rejected")
        values: dict[str, list] = {f"{prefix}{side}_logps": [] for prefix, _ in self.models for side in sides}
        rows = {c: table.column(c).to_pylist() for c in token_columns}
        for start in range(0, table.num_rows, self.batch_size):
            chunk = {c: v[start: start + self.batch_size] for c, v in rows.items()}
            batch = move_batch(collate(chunk, self.pad, layout=self.layout, response_head=True), self.device)
            for prefix, model in self.models:
                with torch.no_grad():
                    logps = compute_row_logps(model, batch, precision=self.precision).logps.double().cpu()
                if self.listwise:
                    parts = [logps.reshape(batch["num_pairs"], batch["list_size"]).tolist()]
                else:  # the chosen rows, then the rejected rows
                    parts = logps.reshape(2, -1).tolist()
                for side, part in zip(sides, parts):
                    values[f"{prefix}{side}_logps"].extend(part)
        out = table if self.keep is None else table.select(self.keep)
        kind = pa.list_(pa.float64()) if self.listwise else pa.float64()
        for name, column in values.items():
            out = out.append_column(name, pa.array(column, type=kind))
        return out
