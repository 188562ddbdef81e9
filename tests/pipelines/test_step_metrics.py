"""Metrics live once: the step's rewards/* are the objective's, evaluation's pair metrics are the
dpo objective's, and the step's capability flags are the registry table's (unit tier, no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import robust_objectives as ro
from pipelines.evaluate import pair_metrics
from pipelines.train.config import build_train_config
from pipelines.train.loop import build_step_context
from pipelines.train.step import StepContext, summarize_micro_batch

STEP_KEYS = {"loss", "logps/chosen", "logps/rejected"}


def _context(name: str, **hyperparameters) -> StepContext:
    spec = ro.get_spec(name)
    return StepContext(objective=spec.fn, hyperparameters=hyperparameters, listwise=spec.listwise,
                       needs_vocab=spec.token_level, needs_embeddings=spec.needs_embeddings,
                       batch_coupled=spec.batch_coupled, live_reference=True)


def _pairs() -> ro.PreferenceLogps:
    g = torch.Generator().manual_seed(5)
    logps = -10 * torch.rand(4, 4, generator=g)
    return ro.PreferenceLogps(*logps, calibration=torch.tensor([0.5, 1.0, 1.5, 2.0]))


@pytest.mark.parametrize("name, hyper", [("dpo", {"beta": 0.5}), ("cdpo", {"beta": 2.0}), ("kldpo", {"tau": 0.3}),
                                         ("dora", {"beta": 0.2})])
def test_pair_step_metrics_are_the_objectives_plus_loss_and_logps(name, hyper):
    inputs = _pairs()
    out = ro.get_objective(name)(inputs, **hyper)
    metrics = summarize_micro_batch(out, inputs, _context(name, **hyper))
    assert set(metrics) == set(out.metrics) | STEP_KEYS
    assert not any(key.startswith("objective/") for key in metrics)
    for key, value in out.metrics.items():
        assert metrics[key] == float(value), key
    assert metrics["loss"] == float(out.loss)
    assert metrics["logps/chosen"] == pytest.approx(float(inputs.policy_chosen_logps.mean()))
    assert metrics["logps/rejected"] == pytest.approx(float(inputs.policy_rejected_logps.mean()))
    # beta is the objective's, not a step default of 1.0
    beta = hyper.get("beta", 0.1)
    chosen = inputs.policy_chosen_logps - inputs.reference_chosen_logps
    assert metrics["rewards/chosen"] == pytest.approx(float(beta * chosen.mean()), rel=1e-6)


def test_listwise_chosen_is_the_top_scored_response_in_rewards_and_logps():
    """One list of 3, scores put response 1 on top and response 0 at the bottom.  The objective's
    rewards/accuracies is the share of score-ordered response pairs its rewards agree with, not the
    top-vs-bottom comparison: in the second list that one agrees (1 of 1) but the middle pair not."""
    policy = torch.tensor([[-3.0, -1.0, -2.5]])
    reference = torch.tensor([[-2.0, -2.0, -2.0]])
    scores = torch.tensor([[0.0, 2.0, 1.0]])
    inputs = ro.ListwiseLogps(policy, reference, scores)
    out = ro.get_objective("dpo_pl")(inputs, beta=1.0)
    metrics = summarize_micro_batch(out, inputs, _context("dpo_pl", beta=1.0))
    assert metrics["logps/chosen"] == -1.0 and metrics["logps/rejected"] == -3.0
    assert metrics["rewards/chosen"] == pytest.approx(1.0) and metrics["rewards/rejected"] == pytest.approx(-1.0)
    # reward order: response 1 (1.0) > 2 (-0.5) > 0 (-1.0); score order 1 > 2 > 0: all 3 pairs agree.
    assert metrics["rewards/accuracies"] == pytest.approx(1.0)
    ranked = ro.rank_by_scores(policy, scores)
    assert ranked.tolist() == [[-1.0, -2.5, -3.0]]
    inputs = ro.ListwiseLogps(torch.tensor([[-3.0, -1.0, -0.5]]), reference, scores)  # reward: 2 above 1
    out = ro.get_objective("dpo_pl")(inputs, beta=1.0)
    metrics = summarize_micro_batch(out, inputs, _context("dpo_pl", beta=1.0))
    assert metrics["rewards/accuracies"] == pytest.approx(2 / 3)


def test_ranking_ties_keep_input_order():
    values = torch.tensor([[10.0, 20.0, 30.0, 40.0]])
    assert ro.rank_by_scores(values, torch.tensor([[1.0, 2.0, 2.0, 0.0]])).tolist() == [[20.0, 30.0, 10.0, 40.0]]


def test_pair_metrics_are_the_dpo_objectives_numbers():
    rng = np.random.default_rng(0)
    policy_chosen, policy_rejected, reference_chosen, reference_rejected = -10 * rng.random((4, 50))
    m = pair_metrics(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.3)
    inputs = ro.PreferenceLogps(*(torch.tensor(a) for a in (policy_chosen, policy_rejected, reference_chosen,
                                                            reference_rejected)))
    out = ro.get_objective("dpo")(inputs, beta=0.3)
    assert m["dpo_loss"] == float(out.loss)
    assert m["pair_accuracy"] == float(out.metrics["rewards/accuracy_delta"])
    assert m["margin"] == pytest.approx(float(out.metrics["rewards/margins"]) / 0.3)
    assert m["n_pairs"] == 50 and m["pair_ties"] == 0.0


@pytest.mark.parametrize("name", sorted(ro.SPECS))
def test_step_context_flags_come_from_the_capability_table(name):
    cfg = build_train_config({"model": {"path": "m"}, "data": {"path": "d"}, "objective": {"name": name}})
    ctx = build_step_context(cfg)
    spec = ro.SPECS[name]
    assert ctx.objective is spec.fn
    flags = (ctx.listwise, ctx.needs_vocab, ctx.needs_embeddings, ctx.batch_coupled)
    assert flags == (spec.listwise, spec.token_level, spec.needs_embeddings, spec.batch_coupled)
    assert not hasattr(ctx, "beta")
