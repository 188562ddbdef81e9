"""Teacher-forced scoring of given responses, for checking the sampler and the evaluate stage.

Test-only: the stages score pairs with `pipelines.model.PairLogps` and sample with
`pipelines.evaluate.generation.sample_with_kl`; these helpers score arbitrary (prompt, response)
rows one padded batch at a time, through the same collation (`model.pad_rows`).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from pipelines import collate as collate_lib
from pipelines import model as model_lib
from pipelines.evaluate.generation import exact_token_kl


def _batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int, device):
    rows = [(list(p) + list(r), len(p)) for p, r in zip(prompts, responses)]
    return model_lib.move_batch(collate_lib.pad_rows(rows, pad_token_id), device)


@torch.no_grad()
def response_logps(model, prompts, responses, pad_token_id: int) -> np.ndarray:
    """(N,) float64 summed log model(response | prompt), teacher-forced, fp32 log-softmax."""
    batch = _batch(prompts, responses, pad_token_id, next(model.parameters()).device)
    return model_lib.compute_row_logps(model, batch).logps.double().cpu().numpy()


@torch.no_grad()
def teacher_forced_kl(policy, reference, prompts, responses, pad_token_id: int) -> np.ndarray:
    """(N,) sum over response positions of the exact KL(policy || reference), teacher-forced.

    The same quantity `sample_with_kl` accumulates while sampling, computed from full forwards.
    """
    batch = _batch(prompts, responses, pad_token_id, next(policy.parameters()).device)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logp = torch.log_softmax(policy(**inputs).logits[:, :-1].float(), -1)
    logq = torch.log_softmax(reference(**inputs).logits[:, :-1].float(), -1)
    scored = batch["labels"][:, 1:] != model_lib.IGNORE_INDEX
    return (exact_token_kl(logp, logq) * scored).sum(-1).double().cpu().numpy()
