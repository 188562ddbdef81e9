"""Documented reductions and identities: each robust variant collapses to its base at the stated limit.

Large-temperature limits use 1e6, not larger: lam (logsumexp(l / lam) - log N) = mean l + O(var l / lam),
while its fp64 cancellation error grows like 1e-16 lam.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from objective_inputs import build_list_inputs, make_inputs, make_list_data

from robust_objectives import ListwiseLogps, PreferenceLogps, get_objective
from robust_objectives.risk_measures import compute_position_divergence


def run(name, seed=0, batch=4, at_reference=False, **hyper):
    """Loss and gradient w.r.t. the tiny model's leaf (policy head or listwise logps)."""
    inputs, _ = make_inputs(name, batch=batch, seed=seed, at_reference=at_reference)
    out = get_objective(name)(inputs, **hyper)
    leaf = inputs.policy_logps if name in ("dpo_pl", "dora_pl") else inputs.policy_chosen_logps
    (grad,) = torch.autograd.grad(out.loss, leaf)
    return out, grad


def assert_same(a, b, tol=1e-10):
    out_a, grad_a = a
    out_b, grad_b = b
    assert torch.allclose(out_a.loss, out_b.loss, atol=tol, rtol=tol), (out_a.loss, out_b.loss)
    assert torch.allclose(grad_a, grad_b, atol=tol, rtol=tol), (grad_a, grad_b)


@pytest.mark.parametrize("name", ["cdpo", "rdpo"])
def test_label_smoothing_zero_is_dpo(name):
    assert_same(run(name, label_smoothing=0.0), run("dpo"))


@pytest.mark.parametrize("normalize", [False, True])
def test_kldpo_large_tau_is_dpo(normalize):
    assert_same(run("kldpo", tau=1e9, normalize=normalize), run("dpo"), tol=1e-8)


def test_drdpo_large_beta_prime_is_dpo():
    assert_same(run("drdpo", beta_prime=1e6), run("dpo"), tol=1e-7)


def test_wdpo_rho_zero_is_dpo():
    assert_same(run("wdpo", rho=0.0), run("dpo"))
    assert_same(run("wdpo", rho=0.0, penalty="sqrt"), run("dpo"))


def test_dora_unit_calibration_large_lambda_is_dpo():
    inputs, _ = make_inputs("dora")
    ones = PreferenceLogps(**{**inputs.__dict__, "calibration": torch.ones(4, dtype=torch.float64)})
    dora = get_objective("dora")(ones, lam=1e6)
    (grad_dora,) = torch.autograd.grad(dora.loss, ones.policy_chosen_logps)
    assert_same((dora, grad_dora), run("dpo"), tol=1e-7)


def test_dora_at_batch_one_is_calibration_times_loss():
    """N = 1: lam (log exp(c l / lam) - log 1) = c l exactly, for every lam."""
    for lam in (0.1, 1.0, 7.0):
        inputs, _ = make_inputs("dora", batch=1)
        out = get_objective("dora")(inputs, lam=lam)
        (grad,) = torch.autograd.grad(out.loss, inputs.policy_chosen_logps)
        dpo_inputs, _ = make_inputs("dpo", batch=1)
        dpo = get_objective("dpo")(dpo_inputs)
        (dpo_grad,) = torch.autograd.grad(dpo.loss, dpo_inputs.policy_chosen_logps)
        c = inputs.calibration
        assert torch.allclose(out.loss, c * dpo.loss, atol=1e-12)
        assert torch.allclose(grad, c * dpo_grad, atol=1e-12)


def test_dora_pl_unit_calibration_large_lambda_is_dpo_pl_and_batch_one_is_scaled():
    data = make_list_data(4)
    inputs, policy = build_list_inputs(data)
    ones = dataclasses.replace(inputs, calibration=torch.ones_like(data.calibration))
    dora = get_objective("dora_pl")(ones, lam=1e6)
    assert_same((dora, torch.autograd.grad(dora.loss, policy)[0]), run("dpo_pl"), tol=1e-7)
    single, _ = build_list_inputs(data.select(slice(0, 1)))
    expected = single.calibration.mean() * get_objective("dpo_pl")(single).loss
    assert torch.allclose(get_objective("dora_pl")(single, lam=0.3).loss, expected, atol=1e-12)


def test_dpo_pl_with_two_responses_is_half_dpo():
    """K = 2: -(1/2)[s_1 - log(e^s_1 + e^s_2) + 0] = (1/2)(-log s(s_1 - s_2))."""
    chosen, rejected = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    ref_c, ref_r = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    pairs = PreferenceLogps(chosen, rejected, ref_c, ref_r)
    # Rejected first in the list, so the score sort has to put chosen on top.
    lists = ListwiseLogps(torch.stack([rejected, chosen], 1), torch.stack([ref_r, ref_c], 1),
                          scores=torch.tensor([[0.0, 1.0]] * 5))
    expected = get_objective("dpo")(pairs).losses / 2
    assert torch.allclose(get_objective("dpo_pl")(lists).losses, expected, atol=1e-12)


@pytest.mark.parametrize("name", ["tdpo2", "radpo2"])
def test_alpha_zero_is_dpo(name):
    assert_same(run(name, alpha=0.0), run("dpo"), tol=1e-12)


@pytest.mark.parametrize("variant", [("radpo1", "tdpo1", {}), ("radpo2", "tdpo2", {"alpha": 0.7})])
def test_cvar_at_mu_one_is_tdpo(variant):
    radpo, tdpo, extra = variant
    assert_same(run(radpo, mu=1.0, risk="cvar", **extra), run(tdpo, **extra), tol=1e-9)


@pytest.mark.parametrize("variant", [("radpo1", "tdpo1", {}), ("radpo2", "tdpo2", {"alpha": 0.7})])
def test_entropic_risk_small_mu_is_tdpo(variant):
    radpo, tdpo, extra = variant
    assert_same(run(radpo, mu=1e-7, risk="erm", **extra), run(tdpo, **extra), tol=1e-6)


@pytest.mark.parametrize("risk", ["kl", "cvar", "cvar_official", "erm"])
def test_divergences_vanish_at_the_reference(risk):
    """d = 0 everywhere, so every measure is 0, and so is TDPO's/Ra-DPO's penalty."""
    logps = torch.log_softmax(torch.randn(6, 11, dtype=torch.float64), -1)
    divergence = compute_position_divergence(logps, logps, measure=risk, mu=0.9)
    assert torch.allclose(divergence, torch.zeros(6, dtype=torch.float64), atol=1e-12)


def random_position_pair(rows=6, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    reference = torch.log_softmax(2 * torch.randn(rows, vocab, generator=g, dtype=torch.float64), -1)
    policy = torch.log_softmax(2 * torch.randn(rows, vocab, generator=g, dtype=torch.float64), -1)
    return reference, policy


def test_kl_is_non_negative_and_official_cvar_at_mu_one_drops_the_argmins():
    """mu = 1: the 0-quantile of each half is its minimum, and d > min drops exactly the argmin."""
    reference, policy = random_position_pair()
    kl = compute_position_divergence(reference, policy, measure="kl")
    assert (kl >= 0).all()
    d, p = reference - policy, reference.exp()
    argmin_terms = sum(
        (p[:, lo:hi] * d[:, lo:hi]).gather(-1, d[:, lo:hi].argmin(-1, keepdim=True)).squeeze(-1)
        for lo, hi in ((0, 5), (5, 11))
    )
    official = compute_position_divergence(reference, policy, measure="cvar_official", mu=1.0)
    assert torch.allclose(official, kl - argmin_terms, atol=1e-12)


def test_entropic_risk_is_monotone_in_mu_and_above_kl():
    reference, policy = random_position_pair(seed=1)
    kl = compute_position_divergence(reference, policy, measure="kl")
    values = [compute_position_divergence(reference, policy, measure="erm", mu=mu) for mu in (0.01, 0.5, 1, 5, 9)]
    assert (values[0] >= kl - 1e-12).all()
    for smaller, larger in zip(values, values[1:]):
        assert (larger > smaller).all()


def test_paper_cvar_is_monotone_decreasing_in_mu_down_to_kl():
    """The mean of the upper mu-tail shrinks as the tail widens; at mu = 1 it is the mean (KL)."""
    reference, policy = random_position_pair(seed=2)
    levels = (0.05, 0.3, 0.7, 1.0)
    values = [compute_position_divergence(reference, policy, measure="cvar", mu=mu) for mu in levels]
    for narrow, wide in zip(values, values[1:]):
        assert (wide <= narrow + 1e-12).all()
    assert torch.allclose(values[-1], compute_position_divergence(reference, policy, measure="kl"), atol=1e-12)


@pytest.mark.parametrize("eps", [0.1, 0.3, 0.45])
def test_rdpo_expectation_under_known_flips_is_the_clean_loss(eps):
    """E over a flip with probability eps (exact, two outcomes) of rDPO = -log s(beta h)."""
    h = torch.linspace(-3, 3, 7, dtype=torch.float64)
    zeros = torch.zeros_like(h)
    clean = PreferenceLogps(h, zeros, zeros, zeros)
    flipped = PreferenceLogps(zeros, h, zeros, zeros)  # y_w and y_l swapped: margin -h
    rdpo = get_objective("rdpo")
    expectation = (1 - eps) * rdpo(clean, beta=0.5, label_smoothing=eps).losses + eps * rdpo(
        flipped, beta=0.5, label_smoothing=eps
    ).losses
    assert torch.allclose(expectation, get_objective("dpo")(clean, beta=0.5).losses, atol=1e-12)


def test_kldpo_normalized_gradient_is_that_of_tau_log_mean_exp():
    """Detached weights N softmax(l/tau): grad = sum softmax_i grad l_i = grad[tau log mean exp(l/tau)]."""
    tau = 0.3
    inputs, _ = make_inputs("kldpo", seed=5)
    out = get_objective("kldpo")(inputs, tau=tau, normalize=True)
    (grad,) = torch.autograd.grad(out.loss, inputs.policy_chosen_logps)
    inputs2, _ = make_inputs("dpo", seed=5)
    h = (inputs2.policy_chosen_logps - inputs2.reference_chosen_logps) - (
        inputs2.policy_rejected_logps - inputs2.reference_rejected_logps
    )
    pair_losses = -torch.nn.functional.logsigmoid(0.1 * h)
    dual = tau * (torch.logsumexp(pair_losses / tau, 0) - math.log(4))
    (expected,) = torch.autograd.grad(dual, inputs2.policy_chosen_logps)
    assert torch.allclose(grad, expected, atol=1e-12)


def test_logsumexp_forms_equal_naive_forms_where_finite():
    """Dr.DPO and DoRA against the papers' code forms -b' log mean exp(-l/b') and lam log mean exp(c l/lam)."""
    inputs, _ = make_inputs("dora", seed=6)
    pair_losses = get_objective("dpo")(inputs).losses
    c = inputs.calibration
    naive_drdpo = -0.7 * torch.log(torch.mean(torch.exp(-pair_losses / 0.7)))
    naive_dora = 0.4 * torch.log(torch.mean(torch.exp(c * pair_losses / 0.4)))
    assert torch.allclose(get_objective("drdpo")(inputs, beta_prime=0.7).loss, naive_drdpo, atol=1e-12)
    assert torch.allclose(get_objective("dora")(inputs, lam=0.4).loss, naive_dora, atol=1e-12)
