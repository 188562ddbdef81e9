"""Ancestral sampling with the exact per-token KL to a reference, and the `map_batches` callable of
`robust-dpo evaluate` that runs it inside Ray Data actors (the eval pairs' log-probs come from
`pipelines.model.PairLogps`, the reference stage's actor).

KL(policy || reference) of the sequence distribution (OBJECTIVES.md 7.1) is estimated on samples
y ~ policy(. | x) by the Rao-Blackwellised estimator

    KL_hat(x, y) = sum_t KL( policy(. | s_t) || reference(. | s_t) ),   s_t = [x, y_<t],

the exact per-token KL over the vocabulary summed along the sampled sequence (positions up to and
including EOS, or max_new_tokens).  Its expectation equals the sequence KL exactly (chain rule of
KL over the truncated process), and its variance is at most that of the plain Monte-Carlo estimator
sum_t [log policy(y_t | s_t) - log reference(y_t | s_t)], which is returned too (`kl_mc`).

Sampling is temperature 1, no top-k/top-p: each token is drawn by inverse CDF from one uniform that
depends only on (seed, prompt index, sample index, position), so a row's sample does not depend on
how rows are batched, and every checkpoint sees the same uniforms (common random numbers make
checkpoint-to-checkpoint differences less noisy).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from pipelines import model as model_lib


def sample_uniforms(seed: int, prompt_indices: Sequence[int], sample_indices: Sequence[int], steps: int) -> np.ndarray:
    """(N, steps) uniforms in [0, 1), one stream per (seed, prompt index, sample index)."""
    return np.stack([
        np.random.default_rng([seed, int(p), int(s)]).random(steps)
        for p, s in zip(prompt_indices, sample_indices)
    ]) if len(prompt_indices) else np.zeros((0, steps))


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists: (N, L) ids and (N, L) attention mask (1 on tokens)."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token to condition on")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def exact_token_kl(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> torch.Tensor:
    """KL(p || q) in nats over the last axis of (..., V) log-softmaxes: sum_v p_v (log p_v - log q_v),
    with 0 * log 0 := 0 (inf where q_v = 0 < p_v)."""
    p = policy_logps.exp()
    terms = torch.where(p > 0, p * (policy_logps - reference_logps), torch.zeros_like(p))
    return terms.sum(dim=-1)


def _step(model, ids, mask, positions, cache):
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    return torch.log_softmax(out.logits[:, -1].float(), dim=-1), out.past_key_values


@torch.no_grad()
def sample_with_kl(policy, reference, prompts: Sequence[Sequence[int]], uniforms: np.ndarray, *,
                   eos_token_id: int | None, pad_token_id: int) -> dict[str, np.ndarray]:
    """Sample one response per prompt row (N token-id lists; repeat a prompt for several samples)
    from the policy and score its KL to the reference (causal LMs over one vocabulary) on the way.

    Both models run step by step on the same prefixes (with KV caches), so each step's two
    next-token distributions give the exact per-token KL at the state actually visited.

    Args:
        uniforms: (N, max_new_tokens) uniforms from `sample_uniforms`; its width is the length cap.
        eos_token_id: stops a row once sampled (counted as a response token); None = never stop.
        pad_token_id: filler for left padding and finished rows (masked out of every sum).

    Returns:
        response_ids: (N,) object array of int64 arrays (EOS included when sampled).
        kl: (N,) float64 Rao-Blackwellised sum of exact per-token KL(policy || reference).
        kl_mc: (N,) float64 sum of log policy(y_t) - log reference(y_t) over sampled tokens.
        policy_logps: (N,) float64 sum of log policy(y_t) (the sample's log-probability).
        length: (N,) int64 response tokens.
    """
    device = next(policy.parameters()).device
    n, steps = uniforms.shape
    ids, mask = left_pad(prompts, pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logp, cache_p = _step(policy, ids, mask, positions, None)
    logq, cache_q = _step(reference, ids, mask, positions, None)
    next_pos = positions[:, -1:] + 1
    u = torch.as_tensor(uniforms, dtype=torch.float64, device=device)
    alive = torch.ones(n, dtype=torch.bool, device=device)
    kl = torch.zeros(n, dtype=torch.float64, device=device)
    kl_mc = torch.zeros_like(kl)
    seq_logp = torch.zeros_like(kl)
    length = torch.zeros(n, dtype=torch.long, device=device)
    tokens = torch.full((n, steps), pad_token_id, dtype=torch.long, device=device)
    for t in range(steps):
        cdf = logp.double().exp().cumsum(-1)
        # Inverse CDF: the first v with cdf_v > u * total (total ~ 1; scaling keeps it exact).
        tok = torch.searchsorted(cdf, (u[:, t] * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
        tok = tok.clamp(max=cdf.shape[-1] - 1)
        lp, lq = logp.gather(-1, tok[:, None]).squeeze(-1), logq.gather(-1, tok[:, None]).squeeze(-1)
        zero = torch.zeros_like(kl)
        kl += torch.where(alive, exact_token_kl(logp, logq).double(), zero)
        kl_mc += torch.where(alive, (lp - lq).double(), zero)
        seq_logp += torch.where(alive, lp.double(), zero)
        length += alive.long()
        tok = torch.where(alive, tok, torch.full_like(tok, pad_token_id))
        tokens[:, t] = tok
        if eos_token_id is not None:
            alive &= tok != eos_token_id
        if t == steps - 1 or not alive.any():
            break
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
        logp, cache_p = _step(policy, tok[:, None], mask, next_pos, cache_p)
        logq, cache_q = _step(reference, tok[:, None], mask, next_pos, cache_q)
        next_pos = next_pos + 1
    lengths = length.cpu().numpy()
    token_rows = tokens.cpu().numpy()
    responses = np.empty(n, dtype=object)
    for i in range(n):
        responses[i] = token_rows[i, : lengths[i]].astype(np.int64)
    return {
        "response_ids": responses,
        "kl": kl.cpu().numpy(),
        "kl_mc": kl_mc.cpu().numpy(),
        "policy_logps": seq_logp.cpu().numpy(),
        "length": lengths.astype(np.int64),
    }


# [2] The Ray Data callable ---------------------------------------------------------------------


class SampleResponses:
    """map_batches actor: one sample per row from the row's policy, with its exact KL to the reference.

    Rows carry `model_index` (into `policies`), `prompt_index`, `sample_index`, `prompt` and
    `prompt_input_ids`; every policy of the chunk is loaded once per actor.  With a `reward`, each
    sample also gets one column per entry of `reward_keys`: None = the configured reward, else the
    `RewardFunction.score` keywords (alpha, form, components) of the world's mixture at alpha.
    """

    def __init__(self, *, policies: list[str], reference_path: str, tokenizer_path: str, max_new_tokens: int,
                 seed: int, use_gpu: bool, reward: str = "", reward_keys: Optional[dict] = None):
        from transformers import AutoTokenizer

        self.device = model_lib.pick_device(use_gpu)
        self.policies = [model_lib.load_causal_lm(path, device=self.device).eval() for path in policies]
        self.reference = model_lib.load_causal_lm(reference_path, device=self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.pad = model_lib.pad_token_id_of(self.reference)
        self.eos = self.tokenizer.eos_token_id
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.reward, self.reward_keys = None, dict(reward_keys or {})
        if reward:
            from pipelines.evaluate.rewards import RewardFunction

            self.reward = RewardFunction(reward, device=self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["prompt_index"])
        out = {"response": np.empty(n, dtype=object), **{k: np.zeros(n) for k in ("kl", "kl_mc", "policy_logps")},
               "length": np.zeros(n, dtype=np.int64)}
        for model_index in np.unique(batch["model_index"]):
            rows = np.flatnonzero(batch["model_index"] == model_index)
            uniforms = sample_uniforms(self.seed, batch["prompt_index"][rows], batch["sample_index"][rows],
                                       self.max_new_tokens)
            prompts = [list(map(int, batch["prompt_input_ids"][i])) for i in rows]
            sampled = sample_with_kl(self.policies[int(model_index)], self.reference, prompts, uniforms,
                                     eos_token_id=self.eos, pad_token_id=self.pad)
            for key in ("kl", "kl_mc", "policy_logps", "length"):
                out[key][rows] = sampled[key]
            for i, ids in zip(rows, sampled["response_ids"]):
                out["response"][i] = self.tokenizer.decode([int(t) for t in ids if t != self.eos],
                                                           skip_special_tokens=True)
        if self.reward is not None:
            prompts, responses = list(batch["prompt"]), list(out["response"])
            for column, mixture in self.reward_keys.items():
                out[column] = self.reward.score(prompts, responses, **(mixture or {}))
        return {k: batch[k] for k in ("model_index", "prompt_index", "sample_index", "prompt")} | out
