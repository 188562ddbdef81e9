"""Risk measures against naive transcriptions of OBJECTIVES.md 3.3, the quantile against torch.quantile,
chunking, the 2^24-element case that torch.quantile refuses, and the tie rule at policy == reference."""

from __future__ import annotations

import math

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


# Ties (risk_measures module docstring, OBJECTIVES.md 3.6 item 8).


def head_gradient(name, vocab, dtype, **hyper):
    """Loss and gradient w.r.t. the tiny model's policy head at policy == reference."""
    from objective_inputs import build_pair_inputs, make_heads, make_pair_data

    from robust_objectives import get_objective

    data = make_pair_data(4, vocab=vocab, dtype=dtype, seed=3)
    policy_head, reference_head = make_heads(vocab, seed=5, at_reference=True, dtype=dtype)
    inputs, _ = build_pair_inputs(data, policy_head, reference_head)
    out = get_objective(name)(inputs, **hyper)
    (grad,) = torch.autograd.grad(out.loss, policy_head)
    return out.loss.detach(), grad


@pytest.mark.parametrize("risk", ["cvar", "cvar_official"])
@pytest.mark.parametrize("variant", [("radpo1", "tdpo1", {}), ("radpo2", "tdpo2", {"alpha": 0.5})])
@pytest.mark.parametrize("dtype, vocab", [(torch.float64, 7), (torch.float64, 1000), (torch.float32, 7),
                                          (torch.float32, 1000)])
@pytest.mark.parametrize("mu", [0.5, 0.95])
def test_at_reference_radpo_first_step_equals_tdpo(risk, variant, dtype, vocab, mu, monkeypatch):
    """At pi_theta == pi_ref, d is 0 up to rounding: Ra-DPO's loss and first gradient (w.r.t. the
    policy's parameters) equal TDPO's. "cvar": the tie rule gives m = mu p, so D_SeqRR = D_SeqKL with
    the KL's gradient. "cvar_official": nothing is kept, D_SeqRR = 0 with zero gradient, as the KL's
    gradient w.r.t. the logits is pi - p = 0 there. Without the rule (TIE_ULPS = 0) rounding picks the
    tail and radpo1's gradient differs from tdpo1's by percents, so this test can fail."""
    radpo, tdpo, extra = variant
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    loss, grad = head_gradient(radpo, vocab, dtype, mu=mu, risk=risk, **extra)
    base_loss, base_grad = head_gradient(tdpo, vocab, dtype, **extra)
    scale = base_grad.abs().max()
    assert scale > 0
    assert torch.allclose(loss, base_loss, rtol=tol, atol=tol)
    assert (grad - base_grad).abs().max() <= tol * scale
    monkeypatch.setattr(risk_measures, "TIE_ULPS", 0)
    _, untied = head_gradient(radpo, vocab, dtype, mu=mu, risk=risk, **extra)
    if radpo == "radpo1":  # radpo2's rejected term alone may happen to round to TDPO's split
        assert (untied - base_grad).abs().max() > 1e-4 * scale


def test_cvar_tied_entries_share_the_boundary_mass_in_proportion_to_p():
    """pi_ref = (.4, .3, .2, .1), pi_theta = (.1, .15, .1, .65): d = (log 4, log 2, log 2, log(2/13)),
    entries 2 and 3 tied (to rounding) at the boundary of the mu = 0.5 tail. Entry 1 is taken whole
    (0.4); the remaining 0.1 is split 0.3 : 0.2, so m = (.4, .06, .04, 0) and the gradient w.r.t.
    log pi_theta is -m / mu, whatever order the sort put the tied pair in. Without the rule, one of them
    would get the whole 0.1 (gradient -(.8, .2, 0, 0) or -(.8, 0, .2, 0))."""
    reference = torch.tensor([[0.4, 0.3, 0.2, 0.1]], dtype=torch.float64).log()
    policy = torch.tensor([[0.1, 0.15, 0.1, 0.65]], dtype=torch.float64).log().requires_grad_()
    phi = compute_position_divergence(reference, policy, measure="cvar", mu=0.5)
    assert torch.allclose(phi, torch.tensor([(0.4 * math.log(4) + 0.1 * math.log(2)) / 0.5], dtype=torch.float64))
    (grad,) = torch.autograd.grad(phi.sum(), policy)
    assert torch.allclose(grad, -torch.tensor([[0.8, 0.12, 0.08, 0.0]], dtype=torch.float64), atol=1e-12)
    for permutation in ([1, 2, 0, 3], [2, 1, 3, 0]):  # the split does not depend on the vocabulary order
        permuted = policy.detach()[:, permutation].requires_grad_()
        (grad_permuted,) = torch.autograd.grad(
            compute_position_divergence(reference[:, permutation], permuted, measure="cvar", mu=0.5).sum(), permuted)
        assert torch.allclose(grad_permuted, grad[:, permutation], atol=1e-12)


@pytest.mark.parametrize("mu", [0.3, 0.95, 1.0])
def test_position_divergences_at_reference(mu):
    """At pi_theta == pi_ref (the reference renormalised as the objectives do, so d is rounding only):
    cvar = KL = 0 with gradient -p w.r.t. log pi_theta (the KL's); cvar_official = 0 with gradient 0."""
    reference = random_logps(6, 50, seed=60, dtype=torch.float32)
    policy = reference.clone().requires_grad_()
    p = reference.exp()
    for measure, expected in (("kl", -p), ("cvar", -p), ("cvar_official", torch.zeros_like(p))):
        phi = compute_position_divergence(reference, policy, measure=measure, mu=mu)
        assert phi.abs().max() < 1e-6
        (grad,) = torch.autograd.grad(phi.sum(), policy)
        assert torch.allclose(grad, expected, atol=1e-6), measure
