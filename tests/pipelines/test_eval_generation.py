"""Sampling with exact per-token KL: checked against the exact sequence KL of an enumerable model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipelines import collate as collate_lib
from pipelines.evaluate.generation import exact_token_kl, left_pad, sample_uniforms, sample_with_kl
from pipelines.world.toy_models import build_tiny_causal_lm
from teacher_forcing import response_logps, teacher_forced_kl

VOCAB, EOS, PAD, MAX_NEW = 4, 3, 0, 3


@pytest.fixture(scope="module")
def models():
    """A tiny Llama over 4 tokens (reference) and a perturbed copy (policy)."""
    reference = build_tiny_causal_lm(VOCAB, hidden_size=16, num_layers=1, num_heads=2, seed=1,
                                     pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    policy = build_tiny_causal_lm(VOCAB, hidden_size=16, num_layers=1, num_heads=2, seed=1,
                                  pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.6 * torch.randn(p.shape, generator=gen))
    return policy, reference


def _all_responses() -> list[tuple[int, ...]]:
    """Every response the sampler can produce: stops at EOS (kept) or after MAX_NEW tokens."""
    out = []
    for length in range(1, MAX_NEW + 1):
        for body in itertools.product([v for v in range(VOCAB) if v != EOS], repeat=length - 1):
            out.append((*body, EOS))
    out += [seq for seq in itertools.product(range(VOCAB), repeat=MAX_NEW) if EOS not in seq]
    return out


def _exact(policy, reference, prompt):
    responses = _all_responses()
    prompts = [prompt] * len(responses)
    logp = response_logps(policy, prompts, responses, PAD)
    logq = response_logps(reference, prompts, responses, PAD)
    return responses, logp, logq


@pytest.mark.parametrize("prompt", [[1, 2], [2]])
def test_rao_blackwellised_kl_matches_exact_sequence_kl(models, prompt):
    policy, reference = models
    responses, logp, logq = _exact(policy, reference, prompt)
    assert np.exp(logp).sum() == pytest.approx(1.0, abs=1e-6)  # the enumeration covers the support
    exact_kl = float(np.sum(np.exp(logp) * (logp - logq)))
    assert exact_kl > 0.05  # the perturbation makes the test meaningful
    # Identity: E_p[sum_t KL_t] = KL exactly (chain rule), checked by enumeration, no sampling noise.
    rb = teacher_forced_kl(policy, reference, [prompt] * len(responses), responses, PAD)
    assert float(np.sum(np.exp(logp) * rb)) == pytest.approx(exact_kl, rel=1e-5)

    n = 4000
    uniforms = sample_uniforms(0, [0] * n, range(n), MAX_NEW)
    out = sample_with_kl(policy, reference, [prompt] * n, uniforms, eos_token_id=EOS, pad_token_id=PAD)
    mean, se = out["kl"].mean(), out["kl"].std(ddof=1) / np.sqrt(n)
    assert abs(mean - exact_kl) < 4 * se, (mean, exact_kl, se)
    mc_mean, mc_se = out["kl_mc"].mean(), out["kl_mc"].std(ddof=1) / np.sqrt(n)
    assert abs(mc_mean - exact_kl) < 4 * mc_se
    assert se < mc_se  # Rao-Blackwellisation reduces the variance here

    # The sampler draws from the policy: every sequence's frequency within 5 binomial sigmas.
    index = {r: i for i, r in enumerate(responses)}
    counts = np.zeros(len(responses))
    for r in out["response_ids"]:
        counts[index[tuple(int(t) for t in r)]] += 1
    p = np.exp(logp)
    assert np.all(np.abs(counts / n - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1.0 / n)


def test_sampler_values_equal_teacher_forced_ones_with_ragged_prompts(models):
    policy, reference = models
    prompts = [[1], [2, 1, 2], [1, 2]] * 4
    uniforms = sample_uniforms(3, range(len(prompts)), [0] * len(prompts), MAX_NEW)
    out = sample_with_kl(policy, reference, prompts, uniforms, eos_token_id=EOS, pad_token_id=PAD)
    responses = list(out["response_ids"])
    assert [len(r) for r in responses] == out["length"].tolist()
    assert all((r[:-1] != EOS).all() and (len(r) == MAX_NEW or r[-1] == EOS) for r in responses)
    np.testing.assert_allclose(out["kl"], teacher_forced_kl(policy, reference, prompts, responses, PAD), atol=1e-5)
    np.testing.assert_allclose(out["policy_logps"], response_logps(policy, prompts, responses, PAD), atol=1e-5)
    # Batch-independent: a row sampled alone gets the same response from the same uniforms.
    alone = sample_with_kl(policy, reference, [prompts[1]], uniforms[1:2], eos_token_id=EOS, pad_token_id=PAD)
    assert alone["response_ids"][0].tolist() == responses[1].tolist()


def test_exact_token_kl_closed_form():
    """p = (1/2, 1/2, 0), q = (1/4, 1/4, 1/2): KL = 2 * 1/2 * log 2 = log 2; 0 log 0 = 0."""
    p = torch.log(torch.tensor([0.5, 0.5, 0.0]))
    q = torch.log(torch.tensor([0.25, 0.25, 0.5]))
    assert exact_token_kl(p, q).item() == pytest.approx(np.log(2.0))
    assert exact_token_kl(q, q).item() == pytest.approx(0.0, abs=1e-7)


def test_collate_labels_only_the_response():
    batch = collate_lib.pad_rows([([5, 6, 8, 3], 2), ([7, 9, 9, 3], 1)], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 8, 3], [7, 9, 9, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 8, 3], [-100, 9, 9, 3]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[]], pad_token_id=0)
