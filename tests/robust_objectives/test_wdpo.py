"""WDPO's embedding-gradient penalty on a tiny model whose embeddings feed a linear log-prob head.

(The gradient of the whole WDPO loss, double backward included, is checked against finite
differences in test_objective_gradients.py.)
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from objective_inputs import build_pair_inputs, make_heads, make_pair_data

from robust_objectives import PreferenceLogps, get_objective


def pair_losses_from_embeddings(embeddings, data, policy_head, reference, beta):
    """l_i with the policy fed a given (2B, T, d) embedding tensor (for finite differences); the
    reference log-probs stay those of `reference` (the reference model has its own embeddings)."""
    batch = data.chosen_embeddings.shape[0]
    moved = dataclasses.replace(data, chosen_embeddings=embeddings[:batch], rejected_embeddings=embeddings[batch:])
    inputs, _ = build_pair_inputs(moved, policy_head, policy_head.detach())
    inputs = dataclasses.replace(inputs, reference_chosen_logps=reference.reference_chosen_logps,
                                 reference_rejected_logps=reference.reference_rejected_logps)
    return get_objective("dpo")(inputs, beta=beta).losses


def test_penalty_is_the_squared_embedding_gradient_by_central_differences():
    """g_i = sum over rows i and B + i, positions and dims of (dl_i/de)^2, with each derivative
    taken by a central difference (h = 1e-6) of l_i in float64."""
    data = make_pair_data(2, seed=20)
    policy_head, reference_head = make_heads(seed=21)
    inputs, embeddings = build_pair_inputs(data, policy_head, reference_head)
    out = get_objective("wdpo")(inputs, beta=0.5, rho=1.0)
    penalties = out.losses - get_objective("dpo")(inputs, beta=0.5).losses  # rho = 1

    base = embeddings.detach()
    expected = torch.zeros(2, dtype=torch.float64)
    step = 1e-6
    with torch.no_grad():
        for index in range(base.numel()):
            plus, minus = base.clone().view(-1), base.clone().view(-1)
            plus[index] += step
            minus[index] -= step
            derivative = (
                pair_losses_from_embeddings(plus.view_as(base), data, policy_head, inputs, 0.5)
                - pair_losses_from_embeddings(minus.view_as(base), data, policy_head, inputs, 0.5)
            ) / (2 * step)
            expected += derivative**2
    assert torch.allclose(penalties, expected, rtol=1e-6, atol=1e-10)
    assert (expected > 0).all()


def test_no_gradient_reaching_the_embeddings_raises_instead_of_a_zero_penalty():
    """rho > 0 and embeddings cut from the losses' graph: the penalty cannot be computed (it is not
    0), so wdpo raises instead of silently becoming DPO. Three ways the graph is cut: log-probs that
    never used the embeddings, log-probs computed from a detached copy, and an embedding tensor taken
    (sliced) after the forward, with grad or under torch.no_grad()."""
    embeddings = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    chosen = torch.randn(2, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(2, dtype=torch.float64, requires_grad=True)
    refs = torch.randn(2, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    unrelated = PreferenceLogps(chosen, rejected, *refs, policy_input_embeddings=embeddings)
    data = make_pair_data(2, seed=26)
    policy_head, reference_head = make_heads(seed=27)
    inputs, leaf = build_pair_inputs(data, policy_head, reference_head)
    detached_copy = leaf.detach().clone().requires_grad_()
    sliced_after = leaf[:, :]  # requires grad, but the log-probs were computed from `leaf`, not from it
    with torch.no_grad():
        sliced_without_grad = leaf[:, :]
    for penalty in ("pointwise", "sqrt"):
        for embeddings_in in (detached_copy, sliced_after, sliced_without_grad, None):
            cut = unrelated if embeddings_in is None else dataclasses.replace(
                inputs, policy_input_embeddings=embeddings_in)
            with pytest.raises(ValueError, match="no gradient reaches policy_input_embeddings"):
                get_objective("wdpo")(cut, rho=3.0, penalty=penalty)
        out = get_objective("wdpo")(inputs, rho=3.0, penalty=penalty)  # the uncut graph: a real penalty
        assert out.metrics["wdpo/grad_norm_sq"] > 0


@pytest.mark.parametrize("penalty", ["pointwise", "sqrt"])
def test_rho_zero_needs_no_embeddings(penalty):
    """rho = 0 is DPO: without embeddings the loss and gradient are DPO's and no penalty is computed."""
    data = make_pair_data(3, seed=28)
    policy_head, reference_head = make_heads(seed=29)
    inputs, _ = build_pair_inputs(data, policy_head, reference_head)
    bare = dataclasses.replace(inputs, policy_input_embeddings=None)
    out = get_objective("wdpo")(bare, rho=0.0, penalty=penalty)
    dpo = get_objective("dpo")(bare)
    assert torch.allclose(out.loss, dpo.loss, atol=1e-15) and out.metrics["wdpo/penalty"] == 0
    assert "wdpo/grad_norm_sq" not in out.metrics
    (grad,) = torch.autograd.grad(out.loss, policy_head, retain_graph=True)
    (dpo_grad,) = torch.autograd.grad(dpo.loss, policy_head)
    assert torch.allclose(grad, dpo_grad, atol=1e-15)
    with pytest.raises(ValueError, match="policy_input_embeddings, which is None"):
        get_objective("wdpo")(bare, rho=1e-3, penalty=penalty)


def test_evaluation_under_no_grad_gives_the_same_value_without_a_graph():
    """The forward is recorded (as at evaluation with enable_grad for the policy pass); the objective
    itself runs under no_grad, so the penalty uses create_graph=False and nothing is differentiable."""
    data = make_pair_data(3, seed=22)
    policy_head, reference_head = make_heads(seed=23)
    train_out = get_objective("wdpo")(build_pair_inputs(data, policy_head, reference_head)[0], rho=0.7)
    inputs, _ = build_pair_inputs(data, policy_head, reference_head)
    with torch.no_grad():
        eval_out = get_objective("wdpo")(inputs, rho=0.7)
    assert not eval_out.loss.requires_grad
    assert torch.allclose(eval_out.loss, train_out.loss.detach(), atol=1e-14)


def test_inputs_it_cannot_use_are_rejected_clearly():
    data = make_pair_data(2, seed=24)
    policy_head, reference_head = make_heads(seed=25)
    inputs, embeddings = build_pair_inputs(data, policy_head, reference_head)
    with pytest.raises(ValueError, match="policy_input_embeddings, which is None"):
        get_objective("wdpo")(dataclasses.replace(inputs, policy_input_embeddings=None))
    with pytest.raises(ValueError, match="requires_grad"):
        get_objective("wdpo")(dataclasses.replace(inputs, policy_input_embeddings=embeddings.detach()))
    with pytest.raises(ValueError, match="expected 2B = 4"):
        get_objective("wdpo")(dataclasses.replace(inputs, policy_input_embeddings=embeddings[:3]))
    with torch.no_grad():
        recorded_without_grad, _ = build_pair_inputs(data, policy_head, reference_head)
        with pytest.raises(ValueError, match="carry no graph"):
            get_objective("wdpo")(dataclasses.replace(recorded_without_grad, policy_input_embeddings=embeddings))
