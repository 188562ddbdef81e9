"""Properties every objective in OBJECTIVES must have, parametrised over the registry."""

from __future__ import annotations

import pytest
import torch
from objective_inputs import (
    build_list_inputs,
    build_pair_inputs,
    make_heads,
    make_inputs,
    make_list_data,
    make_pair_data,
)

from robust_objectives import BATCH_COUPLED, LISTWISE, OBJECTIVES, get_objective

# Hyperparameters under which a BATCH_COUPLED objective actually couples the batch.
COUPLING = {"wdpo": {"penalty": "sqrt"}}


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_shapes_finiteness_and_metrics(name):
    inputs, _ = make_inputs(name, batch=4)
    out = get_objective(name)(inputs)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert out.losses.shape == (4,) and torch.isfinite(out.losses).all()
    assert not out.losses.requires_grad
    assert "rewards/accuracy_delta" in out.metrics and "rewards/margins" in out.metrics
    for key, value in out.metrics.items():
        assert value.dim() == 0 and not value.requires_grad and torch.isfinite(value), key
    out.loss.backward()


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_gradient_raises_chosen_and_lowers_rejected_at_reference(name):
    """At policy == reference a descent step must raise log pi(y_w) and lower log pi(y_l)."""
    if name in LISTWISE:
        data = make_list_data(4, at_reference=True)
        inputs, policy = build_list_inputs(data)
        get_objective(name)(inputs).loss.backward()
        order = torch.argsort(data.scores, dim=-1, descending=True)
        grads = policy.grad.gather(-1, order)
        assert (grads[:, 0] < 0).all() and (grads[:, -1] > 0).all()
        return
    inputs, _ = make_inputs(name, batch=4, at_reference=True)
    get_objective(name)(inputs).loss.backward()
    assert (inputs.policy_chosen_logps.grad < 0).all(), inputs.policy_chosen_logps.grad
    assert (inputs.policy_rejected_logps.grad > 0).all(), inputs.policy_rejected_logps.grad


def _inputs_for(name, index=None, batch=4):
    if name in LISTWISE:
        data = make_list_data(batch, seed=3)
        return build_list_inputs(data if index is None else data.select(index))[0]
    data = make_pair_data(batch, seed=3)
    heads = make_heads(seed=4)
    return build_pair_inputs(data if index is None else data.select(index), *heads)[0]


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_batch_permutation_permutes_losses_and_keeps_loss(name):
    """Holds for every objective: coupling through the batch is symmetric in its members."""
    hyper = COUPLING.get(name, {})
    perm = torch.tensor([2, 0, 3, 1])
    base = get_objective(name)(_inputs_for(name), **hyper)
    permuted = get_objective(name)(_inputs_for(name, perm), **hyper)
    assert torch.allclose(permuted.losses, base.losses[perm], atol=1e-12)
    assert torch.allclose(permuted.loss, base.loss, atol=1e-12)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_batch_coupling_matches_the_flag(name):
    """Non-coupled: each pair's loss is what it is alone and the batch loss is their mean.
    BATCH_COUPLED: the batch loss is not the mean of the single-pair losses."""
    hyper = COUPLING.get(name, {})
    full = get_objective(name)(_inputs_for(name), **hyper)
    singles = [get_objective(name)(_inputs_for(name, torch.tensor([i])), **hyper) for i in range(4)]
    single_losses = torch.stack([s.loss for s in singles])
    if name in BATCH_COUPLED:
        assert not torch.allclose(full.loss, single_losses.mean(), atol=1e-6)
    else:
        assert torch.allclose(full.losses, torch.cat([s.losses for s in singles]), atol=1e-12)
        assert torch.allclose(full.loss, full.losses.mean(), atol=1e-12)
        assert torch.allclose(full.loss, single_losses.mean(), atol=1e-12)
