"""Collation: rows of token ids -> one micro-batch, in one of three layouts.

B pairs give N = 2B scored rows (chosen rows 0..B-1, then rejected rows B..2B-1; OBJECTIVES.md
section 1); B lists of K responses give N = B*K rows (row b*K + k).  Row n is `prompt + response`;
its log-prob sums its response tokens.  The layouts lay the rows out differently for the forward
but give the same log-probs (tests/pipelines/test_packing.py: 1e-5 relative to "padded"):

- "padded": N right-padded rows (N, L), a 2D attention mask, `labels` with -100 on prompt and
  padding (the plain path; every position of every row is computed).
- "packed": each row a segment; segments are packed first-fit-decreasing into R rows (R, W) of the
  longest segment's width W (only row tails are padding); position ids restart per segment and
  attention is block-diagonal causal (a 4D mask built on the device by
  `model.packed_attention_mask` from `segment_ids` / `branch_ids`).  `token_flat` / `token_rows` /
  `token_cols` place each real position in the padded layout, so wdpo still gets per-row input
  embeddings.
- "shared": one segment per pair (or list): the prompt once, then each response, which attends to
  the prompt and itself, never a sibling, with position ids continuing from the prompt's end, so it
  sees exactly what it sees in its own row.  The prompt's forward is paid once per pair, not twice.

Every layout also carries the response-only head's addresses: `score_index` (M,) the flat positions
(into input_ids.reshape(-1)) whose hidden state predicts a scored token, `score_targets` (M,) that
token, `score_rows` (M,) its row n, `score_cols` (M,) its index within the response.  In "shared"
the last prompt position appears once per response.  A response's first token is scored only when
the prompt is non-empty (nothing predicts position 0), as in the padded path's shifted labels.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from robust_objectives.logps import IGNORE_INDEX

LAYOUTS = ("padded", "packed", "shared")
SCORE_KEYS = ("score_index", "score_targets", "score_rows", "score_cols")


def _as_ids(value: Any) -> list[int]:
    return [int(t) for t in value]


def _long(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _float_columns(rows: Mapping[str, Any], *names: str) -> dict[str, torch.Tensor]:
    """The columns of `names` present in `rows`, as float32 tensors ((B,) or (B, K))."""
    return {name: torch.as_tensor(np.stack([np.asarray(v, dtype=np.float64) for v in rows[name]]), dtype=torch.float32)
            for name in names if name in rows}


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


def _score(scores: list, row: int, response: list[int], first_source: int, next_source: int) -> None:
    """Append the response-only head's addresses (source, target, row, col) of `response`: its token j
    is predicted at flat position first_source (j = 0; -1 = nothing predicts it) or next_source + j - 1."""
    for j, token in enumerate(response):
        source = first_source if j == 0 else next_source + j - 1
        if source >= 0:
            scores.append((source, token, row, j))


class _Segment:
    """One packed unit laid out alone: a scored row (packed) or a pair / list (shared)."""

    def __init__(self, owner: int = -1) -> None:
        self.owner = owner  # packed: the scored row every token belongs to
        self.ids: list[int] = []
        self.positions: list[int] = []
        self.branches: list[int] = []
        self.scored: list[tuple[int, list[int], int, int]] = []  # _score's (row, response, first, next), local

    def put(self, tokens: list[int], first_position: int, branch: int) -> int:
        start = len(self.ids)
        self.ids.extend(tokens)
        self.positions.extend(range(first_position, first_position + len(tokens)))
        self.branches.extend([branch] * len(tokens))
        return start


def _pack(segments: list[_Segment], pad_token_id: int, scores: list) -> dict[str, Any]:
    """First-fit-decreasing of the segments into R rows of the longest segment's length W, so a
    row's attention is never longer than its longest sequence (one row for everything would make
    attention quadratic in the micro-batch's tokens).  Tails are padded: a padding position is its
    own segment (it sees only itself) and nothing reads it."""
    width = max(len(segment.ids) for segment in segments)
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(segments)), key=lambda i: -len(segments[i].ids)):
        size = len(segments[index].ids)
        slot = next((r for r, free in enumerate(room) if free >= size), len(rows))
        if slot == len(rows):
            rows.append([])
            room.append(width)
        rows[slot].append(index)
        room[slot] -= size
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    segment_ids = -1 - torch.arange(shape[0] * width, dtype=torch.long).view(shape)  # padding: alone
    branch_ids = torch.zeros(shape, dtype=torch.long)
    token_flat, token_rows, token_cols = [], [], []
    for r, members in enumerate(rows):
        offset = 0
        for index in sorted(members):  # segments in input order within a row
            segment = segments[index]
            end = offset + len(segment.ids)
            input_ids[r, offset:end] = _long(segment.ids)
            position_ids[r, offset:end] = _long(segment.positions)
            segment_ids[r, offset:end] = index
            branch_ids[r, offset:end] = _long(segment.branches)
            base = r * width + offset
            for row, response, first, following in segment.scored:
                _score(scores, row, response, base + first if first >= 0 else -1, base + following)
            if segment.owner >= 0:
                token_flat.extend(range(base, base + len(segment.ids)))
                token_rows.extend([segment.owner] * len(segment.ids))
                token_cols.extend(segment.positions)
            offset = end
    real = sum(len(segment.ids) for segment in segments)
    out: dict[str, Any] = {"input_ids": input_ids, "position_ids": position_ids, "segment_ids": segment_ids,
                           "branch_ids": branch_ids, "num_positions": input_ids.numel(),
                           "num_padding": input_ids.numel() - real}
    if token_rows:  # packed: where each row's tokens sit, for per-row input embeddings (wdpo)
        out.update(token_flat=_long(token_flat), token_rows=_long(token_rows), token_cols=_long(token_cols))
    return out


def _assemble(groups: list[tuple[list[int], list[list[int]]]], row_of, pad_token_id: int,
              layout: str, response_head: bool) -> dict[str, Any]:
    """groups: (prompt, responses) per pair / list; row_of(g, k): the scored row of response k of group g."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    n_rows = sum(len(responses) for _, responses in groups)
    order = sorted(((row_of(g, k), g, k) for g, (_, rs) in enumerate(groups) for k in range(len(rs))))
    scores: list[tuple[int, int, int, int]] = []
    # Useful tokens as an unshared forward counts them (the prompt in every row), for tokens/s.
    num_tokens = sum(len(groups[g][0]) + len(groups[g][1][k]) for _, g, k in order)
    batch: dict[str, Any] = {"layout": layout, "num_rows": n_rows, "num_tokens": num_tokens}
    if layout == "padded":
        batch.update(pad_rows([(groups[g][0] + groups[g][1][k], len(groups[g][0])) for _, g, k in order], pad_token_id))
        width = batch["input_ids"].shape[1]
        for row, g, k in order:
            prompt, response = groups[g][0], groups[g][1][k]
            start = row * width + len(prompt)
            _score(scores, row, response, start - 1 if prompt else -1, start)
        batch["num_positions"] = batch["input_ids"].numel()
        batch["num_padding"] = batch["num_positions"] - num_tokens  # positions beyond the rows' own tokens
    else:
        segments = []
        if layout == "packed":  # every scored row its own segment, causal within it
            for row, g, k in order:
                prompt, response = groups[g][0], groups[g][1][k]
                segment = _Segment(owner=row)
                segment.put(prompt + response, 0, 0)
                segment.scored.append((row, response, len(prompt) - 1, len(prompt)))
                segments.append(segment)
        else:  # shared: the prompt once (branch 0), response k on branch k + 1 after it
            for g, (prompt, responses) in enumerate(groups):
                segment = _Segment()
                segment.put(prompt, 0, 0)
                for k, response in enumerate(responses):
                    start = segment.put(response, len(prompt), k + 1)
                    segment.scored.append((row_of(g, k), response, len(prompt) - 1, start))
                segments.append(segment)
        batch.update(_pack(segments, pad_token_id, scores))
        response_head = True  # packed rows have no full-logits path
    columns = _long(scores).reshape(-1, len(SCORE_KEYS)).T.contiguous()
    batch["lengths"] = torch.bincount(columns[2], minlength=n_rows)
    if response_head:
        batch.update(zip(SCORE_KEYS, columns))
    return batch


def collate_pairs(rows: Mapping[str, Sequence[Any]], pad_token_id: int, *, layout: str = "padded",
                  response_head: bool = False) -> dict[str, Any]:
    """B preference pairs -> one micro-batch of 2B scored rows (chosen rows, then rejected rows).

    `rows`: the dataset contract's columns (pipelines/schema.py), each of length B: prompt_input_ids,
    chosen_input_ids, rejected_input_ids (id lists), optionally calibration / reference_chosen_logps
    / reference_rejected_logps.  `pad_token_id` fills padding (masked out; any valid id works).
    `response_head` adds the response-only head's addresses (always so for packed layouts); without
    them a padded batch takes the full-logits path.

    Returns the layout's tensors (padded: input_ids, attention_mask, labels (2B, L)), lengths (2B,)
    scored tokens per row, chosen_lengths / rejected_lengths (B,) response token counts, num_pairs B,
    num_tokens / num_positions / num_padding, and the optional float columns as (B,) tensors.
    """
    prompts = [_as_ids(p) for p in rows["prompt_input_ids"]]
    chosen = [_as_ids(c) for c in rows["chosen_input_ids"]]
    rejected = [_as_ids(r) for r in rows["rejected_input_ids"]]
    b = len(prompts)
    groups = [(p, [c, r]) for p, c, r in zip(prompts, chosen, rejected)]
    batch = _assemble(groups, lambda g, k: k * b + g, pad_token_id, layout, response_head)
    batch.update(num_pairs=b, chosen_lengths=_long([len(c) for c in chosen]),
                 rejected_lengths=_long([len(r) for r in rejected]),
                 **_float_columns(rows, "calibration", "reference_chosen_logps", "reference_rejected_logps"))
    return batch


def collate_lists(rows: Mapping[str, Sequence[Any]], pad_token_id: int, *, layout: str = "padded",
                  response_head: bool = False) -> dict[str, Any]:
    """B prompts x K scored responses -> B*K scored rows (row b*K + k); "shared" puts each prompt once.

    `rows`: prompt_input_ids (B lists), responses_input_ids (B lists of K id lists), scores (B lists
    of K), optionally calibration and reference_logps (B lists of K); the rest as in collate_pairs.
    Returns the layout's tensors (padded: input_ids, attention_mask, labels (B*K, L)), scores (B, K),
    num_pairs B, list_size K, and calibration / reference_logps (B, K) when present.  ValueError on
    lists of different sizes in one batch (the (B, K) objectives need one K).
    """
    prompts = [_as_ids(p) for p in rows["prompt_input_ids"]]
    responses = [[_as_ids(r) for r in group] for group in rows["responses_input_ids"]]
    sizes = {len(group) for group in responses}
    if len(sizes) != 1:
        raise ValueError(f"listwise batch mixes list sizes {sorted(sizes)}; every row needs the same K")
    k_size = sizes.pop()
    batch = _assemble(list(zip(prompts, responses)), lambda g, k: g * k_size + k, pad_token_id, layout,
                      response_head)
    batch.update({"num_pairs": len(prompts), "list_size": k_size, "scores": None,
                  **_float_columns(rows, "scores", "calibration", "reference_logps")})
    return batch


def count_tokens(batch: Mapping[str, Any]) -> tuple[int, int, int]:
    """(useful tokens as an unshared forward counts them, positions computed, padding among them)."""
    return int(batch["num_tokens"]), int(batch["num_positions"]), int(batch["num_padding"])
