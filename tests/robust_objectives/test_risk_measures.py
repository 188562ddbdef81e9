"""Risk measures against naive transcriptions of OBJECTIVES.md 3.3, the quantile against torch.quantile,
chunking, and the 2^24-element case that torch.quantile refuses."""

from __future__ import annotations

import pytest
import torch

import robust_objectives.risk_measures as risk_measures
from robust_objectives.risk_measures import (
    compute_linear_quantile,
    compute_position_divergence,
    compute_sequence_divergence,
)


def random_logps(rows, vocab, seed, dtype=torch.float64, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(rows, vocab, generator=g, dtype=dtype), -1)


def naive_official(reference, policy, mu):
    """Steps 1-5 of OBJECTIVES.md 3.3 with torch.quantile, one half at a time."""
    d, p = reference - policy, reference.exp()
    half = d.shape[-1] // 2
    total = torch.zeros(d.shape[0], dtype=d.dtype)
    for part in (slice(0, half), slice(half, None)):
        q = torch.quantile(d[:, part], 1 - mu, dim=-1, keepdim=True)
        total += (p[:, part] * d[:, part] * (d[:, part] > q)).sum(-1)
    return total


def naive_cvar(reference, policy, mu):
    """Walk d in descending order taking p-mass until mu (the boundary entry fractionally), / mu."""
    out = []
    for ref_row, pol_row in zip(reference.tolist(), policy.tolist()):
        entries = sorted(((r - q, torch.tensor(r).exp().item()) for r, q in zip(ref_row, pol_row)), reverse=True)
        left, total = mu, 0.0
        for d, p in entries:
            take = min(p, max(left, 0.0))
            total += take * d
            left -= take
        out.append(total / mu)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1001])
@pytest.mark.parametrize("q", [0.0, 0.05, 1 - 0.97, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_quantile_is_identical_to_torch_quantile(n, q, dtype):
    values = torch.randn(7, n, dtype=dtype)
    assert torch.equal(compute_linear_quantile(values, q), torch.quantile(values, q, dim=-1))


@pytest.mark.parametrize("mu", [0.05, 0.5, 0.95, 1.0])
def test_measures_match_naive_transcriptions(mu):
    reference, policy = random_logps(5, 13, seed=40), random_logps(5, 13, seed=41)
    official = compute_position_divergence(reference, policy, measure="cvar_official", mu=mu)
    assert torch.allclose(official, naive_official(reference, policy, mu), atol=1e-12)
    cvar = compute_position_divergence(reference, policy, measure="cvar", mu=mu)
    assert torch.allclose(cvar, naive_cvar(reference, policy, mu), atol=1e-10)
    erm = compute_position_divergence(reference, policy, measure="erm", mu=mu)
    p, d = reference.exp(), reference - policy
    assert torch.allclose(erm, torch.log((p * torch.exp(mu * d)).sum(-1)) / mu, atol=1e-12)


def test_chunked_weights_equal_unchunked(monkeypatch):
    reference, policy = random_logps(9, 17, seed=42), random_logps(9, 17, seed=43)
    measures = ("cvar", "cvar_official")
    whole = {m: compute_position_divergence(reference, policy, measure=m, mu=0.7) for m in measures}
    monkeypatch.setattr(risk_measures, "_CHUNK_ELEMENTS", 20)  # one or two rows per chunk
    for measure, expected in whole.items():
        assert torch.equal(compute_position_divergence(reference, policy, measure=measure, mu=0.7), expected)


def test_sequence_divergence_sums_response_positions_only():
    """Masked positions may hold NaN (padding garbage): they are never read, and carry no gradient."""
    reference = random_logps(2 * 3, 5, seed=44).view(2, 3, 5)
    policy = random_logps(2 * 3, 5, seed=45).view(2, 3, 5).requires_grad_()
    mask = torch.tensor([[True, False, True], [False, True, True]])
    garbage_reference = reference.masked_fill(~mask[..., None], float("nan"))
    total, kl = compute_sequence_divergence(policy, garbage_reference, mask, measure="kl")
    assert torch.equal(kl, total.detach())
    per_position = compute_position_divergence(reference.view(6, 5), policy.view(6, 5), measure="kl").view(2, 3)
    assert torch.allclose(total, (per_position * mask).sum(-1), atol=1e-12)
    total.sum().backward()
    assert torch.all(policy.grad[~mask] == 0) and torch.isfinite(policy.grad).all()


def test_quantile_mask_and_tail_masses_carry_no_gradient():
    """grad phi w.r.t. log pi_theta = -(mask weights): -p [d > q] (official) and -m/mu (paper CVaR)."""
    reference = random_logps(3, 8, seed=46)
    policy = random_logps(3, 8, seed=47).requires_grad_()
    d, p = (reference - policy).detach(), reference.exp()
    official = compute_position_divergence(reference, policy, measure="cvar_official", mu=0.6)
    (grad,) = torch.autograd.grad(official.sum(), policy)
    keep = torch.cat([d[:, :4] > torch.quantile(d[:, :4], 0.4, dim=-1, keepdim=True),
                      d[:, 4:] > torch.quantile(d[:, 4:], 0.4, dim=-1, keepdim=True)], dim=-1)
    assert torch.allclose(grad, -(p * keep), atol=1e-12)


def test_more_than_2_pow_24_elements_per_vocabulary_half():
    """(rows, V/2) = (130, 2^17): 17.0M > 2^24 = 16.8M elements per half in float32, the size at which
    torch.quantile refuses a whole tensor (pytorch/pytorch#64947); our path runs and matches it row-wise."""
    rows, vocab = 130, 1 << 18
    g = torch.Generator().manual_seed(48)
    reference = torch.log_softmax(torch.randn(rows, vocab, generator=g), -1)
    policy = torch.log_softmax(torch.randn(rows, vocab, generator=g), -1)
    half = (reference - policy)[:, vocab // 2:]
    assert half.numel() > 1 << 24
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(half, 0.05)
    assert torch.equal(compute_linear_quantile(half, 0.05)[:8], torch.quantile(half[:8], 0.05, dim=-1))
    del half
    phi = compute_position_divergence(reference, policy, measure="cvar_official", mu=0.95)
    assert phi.shape == (rows,) and torch.isfinite(phi).all()
    assert torch.allclose(phi[:3], naive_official(reference[:3], policy[:3], 0.95).float(), rtol=1e-5)


def test_one_row_longer_than_2_pow_24():
    """torch.quantile refuses even dim=-1 here. The row is the permutation k -> 7919 k mod n of
    0, 1, ..., n - 1 (7919 is a prime not dividing n; integers are exact in float32 below 2^24), so
    its order statistics are known: the k-th smallest is k."""
    n = (1 << 24) + 10
    values = ((torch.arange(n) * 7919) % n).float().unsqueeze(0)
    assert values[0, :3].tolist() == [0.0, 7919.0, 15838.0]
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(values, 0.05, dim=-1)
    rank = torch.tensor(0.05, dtype=torch.float32) * (n - 1)
    expected = torch.lerp(rank.floor(), rank.ceil(), rank - rank.floor())
    assert torch.equal(compute_linear_quantile(values, 0.05), expected.reshape(1))
    assert compute_linear_quantile(values, 0.0).item() == 0.0


@pytest.mark.parametrize("measure", ["kl", "cvar", "cvar_official", "erm"])
def test_rows_without_response_positions_and_odd_vocabularies(measure):
    """An all-padding row has D = 0; an odd V splits into halves of V // 2 and V - V // 2 entries."""
    reference = random_logps(2 * 3, 9, seed=54).view(2, 3, 9)
    policy = random_logps(2 * 3, 9, seed=55).view(2, 3, 9)
    mask = torch.tensor([[False, False, False], [True, True, False]])
    divergence, _ = compute_sequence_divergence(policy, reference, mask, measure=measure, mu=0.7)
    assert divergence[0] == 0
    expected = compute_position_divergence(reference[1, :2], policy[1, :2], measure=measure, mu=0.7).sum()
    assert torch.allclose(divergence[1], expected, atol=1e-12)
    if measure == "cvar_official":
        assert torch.allclose(expected, naive_official(reference[1, :2], policy[1, :2], 0.7).sum(), atol=1e-12)
    empty, _ = compute_sequence_divergence(policy, reference, torch.zeros(2, 3, dtype=torch.bool), measure=measure)
    assert torch.equal(empty, torch.zeros(2, dtype=torch.float64))
