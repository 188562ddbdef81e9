"""logps.py against a naive per-element gather, masking, dtypes, and the chunked path against the plain one."""

from __future__ import annotations

import math

import pytest
import torch

from robust_objectives.logps import (
    IGNORE_INDEX,
    chunked_token_logps,
    compute_sequence_logps,
    compute_token_logps,
    compute_vocab_logps,
)


def make_batch(n=3, t=6, v=11, dtype=torch.float64, seed=50):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, t, v, generator=g, dtype=dtype)).requires_grad_()
    labels = torch.randint(v, (n, t), generator=g)
    labels[:, :2] = IGNORE_INDEX  # prompt
    labels[0, -2:] = IGNORE_INDEX  # right padding
    return logits, labels


def naive_token_logps(logits, labels):
    """Position t predicts labels[t + 1]: log(exp(z_y) / sum exp(z)) one element at a time."""
    n, t, _ = logits.shape
    out = torch.zeros(n, t - 1, dtype=torch.float64)
    for i in range(n):
        for j in range(t - 1):
            label = int(labels[i, j + 1])
            if label != IGNORE_INDEX:
                row = logits[i, j].double()
                out[i, j] = row[label] - math.log(float(torch.exp(row - row.max()).sum())) - row.max()
    return out


def test_token_and_sequence_logps_match_naive_gather_with_masking():
    logits, labels = make_batch()
    token_logps, mask = compute_token_logps(logits, labels)
    assert torch.equal(mask, labels[:, 1:] != IGNORE_INDEX)
    assert torch.allclose(token_logps, naive_token_logps(logits.detach(), labels), atol=1e-12)
    assert torch.all(token_logps[~mask] == 0)
    sequence_logps, lengths = compute_sequence_logps(logits, labels)
    assert torch.allclose(sequence_logps, token_logps.sum(-1), atol=1e-12)
    assert lengths.tolist() == [2, 4, 4]


def test_masked_positions_get_no_gradient_and_the_prompt_does_not_count():
    logits, labels = make_batch()
    sequence_logps, _ = compute_sequence_logps(logits, labels)
    sequence_logps.sum().backward()
    scored_sources = torch.zeros(labels.shape, dtype=torch.bool)
    scored_sources[:, :-1] = labels[:, 1:] != IGNORE_INDEX  # logits at t score labels at t + 1
    assert torch.all(logits.grad[~scored_sources] == 0)
    assert torch.all(logits.grad[scored_sources].abs().sum(-1) > 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_logits_give_fp32_log_probs(dtype):
    logits, labels = make_batch(dtype=torch.float32)
    low = logits.detach().to(dtype)
    token_logps, _ = compute_token_logps(low, labels)
    vocab_logps, gathered, _ = compute_vocab_logps(low, labels)
    assert token_logps.dtype == torch.float32 and vocab_logps.dtype == torch.float32
    # Exactly the fp32 computation on the rounded logits (the log-softmax itself is not rounded).
    expected, _ = compute_token_logps(low.float(), labels)
    assert torch.equal(token_logps, expected)
    assert torch.allclose(gathered, token_logps, atol=1e-6)


def test_vocab_logps_are_a_log_softmax_consistent_with_token_logps():
    logits, labels = make_batch()
    vocab_logps, token_logps, mask = compute_vocab_logps(logits, labels)
    assert vocab_logps.shape == (3, 5, 11)
    assert torch.allclose(vocab_logps.exp().sum(-1), torch.ones(3, 5, dtype=torch.float64), atol=1e-12)
    expected, expected_mask = compute_token_logps(logits, labels)
    assert torch.equal(mask, expected_mask) and torch.allclose(token_logps, expected, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_path_equals_plain_path_in_values_and_gradients(chunk_size, with_bias):
    g = torch.Generator().manual_seed(51)
    hidden = torch.randn(3, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(13, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    _, labels = make_batch(v=13)

    plain, plain_mask = compute_token_logps(torch.nn.functional.linear(hidden, weight, bias), labels)
    chunked, mask = chunked_token_logps(hidden, weight, labels, chunk_size, bias=bias)
    assert torch.equal(mask, plain_mask)
    assert torch.allclose(chunked, plain, atol=1e-12)
    leaves = [hidden, weight] + ([bias] if with_bias else [])
    probe = torch.randn(plain.shape, generator=g, dtype=torch.float64)
    plain_grads = torch.autograd.grad((plain * probe).sum(), leaves)
    chunked_grads = torch.autograd.grad((chunked * probe).sum(), leaves)
    for a, b in zip(plain_grads, chunked_grads):
        assert torch.allclose(a, b, atol=1e-12)


def test_chunked_path_supports_double_backward_for_wdpo():
    """The gradient of ||d logp / d hidden||^2 w.r.t. the head is the same through both paths."""
    g = torch.Generator().manual_seed(52)
    hidden = torch.randn(2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    _, labels = make_batch(n=2, t=5, v=9)
    results = []
    for chunked in (False, True):
        if chunked:
            token_logps, _ = chunked_token_logps(hidden, weight, labels, 2)
        else:
            token_logps, _ = compute_token_logps(hidden @ weight.T, labels)
        (grad_hidden,) = torch.autograd.grad(token_logps.sum(), hidden, create_graph=True)
        results.append(torch.autograd.grad(grad_hidden.pow(2).sum(), weight)[0])
    assert torch.allclose(results[0], results[1], atol=1e-12)


def test_chunked_path_in_bf16_matches_plain_fp32_softmax_of_bf16_logits():
    g = torch.Generator().manual_seed(53)
    hidden = torch.randn(2, 7, 8, generator=g).to(torch.bfloat16)
    weight = torch.randn(50, 8, generator=g).to(torch.bfloat16)
    _, labels = make_batch(n=2, t=7, v=50)
    chunked, _ = chunked_token_logps(hidden, weight, labels, 4)
    plain, _ = compute_token_logps(hidden @ weight.T, labels)
    assert chunked.dtype == torch.float32
    assert torch.allclose(chunked, plain, atol=1e-5)


def test_chunked_path_rejects_a_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_logps(torch.zeros(1, 2, 3), torch.zeros(4, 3), torch.zeros(1, 2, dtype=torch.long), 0)
