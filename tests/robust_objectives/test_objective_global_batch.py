"""Two shards of 4 with an all-gather give the loss and (worker-averaged) gradients of one batch of 8.

The two "workers" run in one process. A first pass records what each shard hands to `gather`; the
second pass gives shard r a fake all-gather that returns the rank-ordered concatenation of both
shards' detached values (checking that slot r is what shard r passed in). Gradients are taken
w.r.t. the full-batch tensor each shard is sliced from and averaged over the two shards, as DDP
averages parameter gradients.
"""

from __future__ import annotations

import pytest
import torch
from objective_inputs import make_list_data

from robust_objectives import ListwiseLogps, PreferenceLogps, get_objective

CASES = [
    ("drdpo", {"beta_prime": 0.3}),
    ("kldpo", {"tau": 0.2}),
    ("kldpo", {"tau": 0.05}),  # the max_weight cap binds
    ("kldpo", {"tau": 0.2, "normalize": True}),
    ("dora", {"lam": 0.5}),
    ("dora_pl", {"lam": 0.5}),
    ("wdpo", {"rho": 0.5, "penalty": "sqrt"}),
]


def full_batch(name, batch=8):
    """(full-batch leaf, function from a row slice of that leaf to the shard's inputs)."""
    g = torch.Generator().manual_seed(30)
    if name == "dora_pl":
        data = make_list_data(batch, k=3, seed=31)
        leaf = data.policy_logps.clone().requires_grad_()

        def shard(rows):
            return ListwiseLogps(leaf[rows], data.reference_logps[rows], data.scores[rows], data.calibration[rows])

        return leaf, shard
    # Columns of the leaf: policy chosen and rejected log-probs; WDPO's embeddings feed them.
    embeddings = torch.randn(2, batch, 3, generator=g, dtype=torch.float64)
    weights = torch.randn(2, 3, generator=g, dtype=torch.float64)
    references = torch.randn(2, batch, generator=g, dtype=torch.float64)
    calibration = 0.5 + torch.rand(batch, generator=g, dtype=torch.float64)
    leaf = weights.clone().requires_grad_()

    def shard(rows):
        # Each worker's own input embeddings (2B, d): chosen rows, then rejected rows.
        flat = embeddings[:, rows].reshape(-1, 3).detach().requires_grad_()
        local = flat.view(2, -1, 3)
        logps = torch.tanh(local) @ torch.ones(3, dtype=torch.float64) + (local * leaf[:, None]).sum(-1)
        return PreferenceLogps(
            logps[0], logps[1], references[0, rows], references[1, rows],
            calibration=calibration[rows], policy_input_embeddings=flat,
        )

    return leaf, shard


@pytest.mark.parametrize("name, hyper", CASES, ids=lambda v: str(v))
def test_two_shards_of_four_equal_one_batch_of_eight(name, hyper):
    objective = get_objective(name)
    leaf, shard = full_batch(name)
    full = objective(shard(slice(0, 8)), **hyper)
    if name == "wdpo":
        assert full.metrics["wdpo/grad_norm_sq"] > 0  # the embeddings really feed the log-probs
    (full_grad,) = torch.autograd.grad(full.loss, leaf)

    shards = [slice(0, 4), slice(4, 8)]
    recorded = []
    for rows in shards:
        objective(shard(rows), gather=lambda x: recorded.append(x.clone()) or x, **hyper)

    def fake_gather(rank):
        def gather(values):
            assert not values.requires_grad
            assert torch.equal(values, recorded[rank])
            return torch.cat(recorded)

        return gather

    grads, losses = [], []
    for rank, rows in enumerate(shards):
        out = objective(shard(rows), gather=fake_gather(rank), **hyper)
        losses.append(out.loss)
        grads.append(torch.autograd.grad(out.loss, leaf)[0])
        for key in out.metrics:
            if key.startswith(name + "/"):  # the objective's own statistics are global too
                assert torch.allclose(out.metrics[key], full.metrics[key], atol=1e-12), key
    for loss in losses:  # (a) every worker reports the global loss
        assert torch.allclose(loss, full.loss, atol=1e-12)
    # (b) the worker average of the gradients is the global gradient
    assert torch.allclose((grads[0] + grads[1]) / 2, full_grad, atol=1e-12)
    # and sharding without the gather would not have matched (the test can fail)
    local = [objective(shard(rows), **hyper) for rows in shards]
    local_grad = sum(torch.autograd.grad(out.loss, leaf)[0] for out in local) / 2
    assert not torch.allclose(local_grad, full_grad, atol=1e-6)


def test_gather_with_unequal_shards_is_rejected():
    leaf, shard = full_batch("drdpo")
    with pytest.raises(ValueError, match="equal shards"):
        get_objective("drdpo")(shard(slice(0, 4)), gather=lambda x: torch.cat([x, x[:2]]))


def test_non_coupled_objectives_take_no_gather_and_pointwise_wdpo_ignores_it():
    leaf, shard = full_batch("dpo")
    inputs = shard(slice(0, 4))
    with pytest.raises(TypeError, match="gather"):
        get_objective("dpo")(inputs, gather=lambda x: pytest.fail("dpo must not gather"))
    plain = get_objective("wdpo")(inputs)
    gathered = get_objective("wdpo")(inputs, gather=lambda x: pytest.fail("pointwise wdpo must not gather"))
    assert torch.equal(plain.loss, gathered.loss)
