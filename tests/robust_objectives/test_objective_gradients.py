"""Gradients against float64 finite differences (torch.autograd.gradcheck) through a tiny 1-layer policy,
and against the stated closed forms where the objective detaches something on purpose."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from objective_inputs import build_list_inputs, build_pair_inputs, make_heads, make_list_data, make_pair_data

from robust_objectives import get_objective

# (objective, hyperparameters) whose gradient is the derivative of the loss value.
DIFFERENTIABLE = [
    ("dpo", {}),
    ("ipo", {}),
    ("cdpo", {"label_smoothing": 0.2}),
    ("rdpo", {"label_smoothing": 0.2}),
    ("drdpo", {"beta_prime": 0.3}),
    ("dora", {"lam": 0.5}),
    ("wdpo", {"rho": 0.5}),
    ("wdpo", {"rho": 0.5, "penalty": "sqrt"}),
    ("tdpo1", {}),
    ("radpo1", {"mu": 0.6, "risk": "cvar"}),
    ("radpo1", {"mu": 0.8, "risk": "cvar_official"}),
    ("radpo1", {"mu": 3.0, "risk": "erm"}),
]


@pytest.mark.parametrize("name, hyper", DIFFERENTIABLE, ids=lambda v: str(v))
def test_gradient_matches_finite_differences(name, hyper):
    data = make_pair_data(3, seed=11)
    _, reference_head = make_heads(seed=12)

    def loss(policy_head):
        inputs, _ = build_pair_inputs(data, policy_head, reference_head)
        return get_objective(name)(inputs, beta=0.5, **hyper).loss

    policy_head, _ = make_heads(seed=12)
    assert torch.autograd.gradcheck(loss, (policy_head,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["dpo_pl", "dora_pl"])
def test_listwise_gradient_matches_finite_differences(name):
    data = make_list_data(3, k=4, seed=13)
    base, _ = build_list_inputs(data)

    def loss(policy_logps):
        return get_objective(name)(dataclasses.replace(base, policy_logps=policy_logps), beta=0.5).loss

    policy = data.policy_logps.clone().requires_grad_()
    assert torch.autograd.gradcheck(loss, (policy,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("normalize", [False, True])
def test_kldpo_gradient_is_the_detached_weighted_mean(normalize):
    """grad L = mean_i w_i grad l_i with w fixed at its current value (the official stop-gradient);
    tau = 0.02 makes the max_weight = 10 cap bind for the hardest pair in the un-normalised mode."""
    data = make_pair_data(4, seed=14)
    policy_head, reference_head = make_heads(seed=15)
    inputs, _ = build_pair_inputs(data, policy_head, reference_head)
    out = get_objective("kldpo")(inputs, beta=0.5, tau=0.02, normalize=normalize)
    (grad,) = torch.autograd.grad(out.loss, policy_head)

    inputs, _ = build_pair_inputs(data, policy_head, reference_head)
    losses = get_objective("dpo")(inputs, beta=0.5).losses  # detached l_i
    pair_losses = -torch.nn.functional.logsigmoid(
        0.5 * ((inputs.policy_chosen_logps - inputs.reference_chosen_logps)
               - (inputs.policy_rejected_logps - inputs.reference_rejected_logps)))
    if normalize:
        weights = 4 * torch.softmax(losses / 0.02, 0)
    else:
        weights = torch.exp((losses - losses.mean()) / 0.02).clamp(max=10.0)
        assert weights.max() == 10.0
    (expected,) = torch.autograd.grad((weights * pair_losses).mean(), policy_head)
    assert torch.allclose(grad, expected, atol=1e-12)
    assert torch.allclose(out.loss, (weights * losses).mean(), atol=1e-12)


@pytest.mark.parametrize("name, hyper", [("tdpo2", {"alpha": 0.7}), ("radpo2", {"alpha": 0.7, "mu": 0.6}),
                                         ("radpo2", {"alpha": 0.7, "mu": 2.0, "risk": "erm"})])
def test_variant_two_stops_the_gradient_of_the_chosen_divergence(name, hyper):
    """The gradient equals d/dW of the loss with y_w's vocab log-probs frozen at the current W0
    (so D_w is a constant) and everything else live; that function is itself checked by gradcheck."""
    data = make_pair_data(3, seed=16)
    frozen_head, reference_head = make_heads(seed=17)
    frozen_inputs, _ = build_pair_inputs(data, frozen_head.detach(), reference_head)

    def loss_with_frozen_chosen_divergence(policy_head):
        inputs, _ = build_pair_inputs(data, policy_head, reference_head)
        inputs = dataclasses.replace(inputs, policy_chosen_vocab_logps=frozen_inputs.policy_chosen_vocab_logps)
        return get_objective(name)(inputs, beta=0.5, **hyper).loss

    inputs, _ = build_pair_inputs(data, frozen_head, reference_head)
    (grad,) = torch.autograd.grad(get_objective(name)(inputs, beta=0.5, **hyper).loss, frozen_head)
    head = frozen_head.detach().clone().requires_grad_()
    (expected,) = torch.autograd.grad(loss_with_frozen_chosen_divergence(head), head)
    assert torch.allclose(grad, expected, atol=1e-12)
    assert torch.autograd.gradcheck(loss_with_frozen_chosen_divergence, (head,), eps=1e-6, atol=1e-7)
    # And the stop-gradient matters: variant 1 (no stop) gives a different gradient.
    variant_one = {"tdpo2": "tdpo1", "radpo2": "radpo1"}[name]
    inputs, _ = build_pair_inputs(data, frozen_head, reference_head)
    one_hyper = {k: v for k, v in hyper.items() if k != "alpha"}
    (grad_one,) = torch.autograd.grad(get_objective(variant_one)(inputs, beta=0.5, **one_hyper).loss, frozen_head)
    assert not torch.allclose(grad, grad_one, atol=1e-6)
