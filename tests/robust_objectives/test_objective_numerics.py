"""No NaN or inf anywhere for logits of +-1e4, with float32 and bfloat16 models, for every objective."""

from __future__ import annotations

import pytest
import torch

from robust_objectives import LISTWISE, OBJECTIVES, ListwiseLogps, PreferenceLogps, get_objective
from robust_objectives.logps import compute_vocab_logps

# Small hyperparameters make every exponent as large as it gets (tau, beta', lam in the denominator).
EXTREME = {
    "kldpo": {"tau": 0.01},
    "drdpo": {"beta_prime": 0.01},
    "dora": {"lam": 0.01},
    "dora_pl": {"lam": 0.01},
    "wdpo": {"rho": 1.0},
    "radpo1": {"risk": "erm", "mu": 9.0},
}


def extreme_inputs(name, dtype, batch=4, seq=5, vocab=16, dim=3):
    """Logits = 1e4 * (random signs) + a small embedding-dependent part, in `dtype`; the objective's
    tensors are cast to `dtype` too (the bf16 case feeds bf16 log-probs to the objective)."""
    g = torch.Generator().manual_seed(60)
    signs = torch.where(torch.rand(2 * batch, seq, vocab, generator=g) > 0.5, 1e4, -1e4)
    embeddings = torch.randn(2 * batch, seq, dim, generator=g).to(dtype).requires_grad_()
    head = torch.randn(dim, vocab, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(vocab, (2 * batch, seq), generator=g)
    labels[:, :2] = -100
    policy_logits = (signs + embeddings.float() @ head.float()).to(dtype)
    reference_logits = (-signs).to(dtype)  # maximally different reference: log-ratios of ~2e4 per token
    policy_vocab, policy_tokens, mask = compute_vocab_logps(policy_logits, labels)
    with torch.no_grad():
        reference_vocab, reference_tokens, _ = compute_vocab_logps(reference_logits, labels)
    policy_seq = policy_tokens.sum(-1).to(dtype)
    reference_seq = reference_tokens.sum(-1).to(dtype)
    if name in LISTWISE:
        scores = torch.randn(2, 2 * batch // 2, generator=g)
        return ListwiseLogps(policy_seq.view(2, -1), reference_seq.view(2, -1), scores,
                             calibration=torch.full((2, batch), 4.0)), (embeddings, head)
    inputs = PreferenceLogps(
        policy_seq[:batch], policy_seq[batch:], reference_seq[:batch], reference_seq[batch:],
        chosen_lengths=mask[:batch].sum(-1), rejected_lengths=mask[batch:].sum(-1),
        policy_chosen_vocab_logps=policy_vocab[:batch].to(dtype),
        policy_rejected_vocab_logps=policy_vocab[batch:].to(dtype),
        reference_chosen_vocab_logps=reference_vocab[:batch].to(dtype),
        reference_rejected_vocab_logps=reference_vocab[batch:].to(dtype),
        chosen_mask=mask[:batch], rejected_mask=mask[batch:],
        calibration=torch.full((batch,), 4.0), policy_input_embeddings=embeddings,
    )
    return inputs, (embeddings, head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_extreme_logits_stay_finite(name, dtype):
    inputs, leaves = extreme_inputs(name, dtype)
    out = get_objective(name)(inputs, **EXTREME.get(name, {}))
    assert out.loss.dtype == torch.float32
    assert torch.isfinite(out.loss) and torch.isfinite(out.losses).all()
    assert all(torch.isfinite(v) for v in out.metrics.values()), out.metrics
    grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("risk", ["cvar", "cvar_official", "erm"])
def test_risk_measures_with_underflowing_reference_probabilities(risk):
    """Reference log-probs of -2e4 underflow to p = 0; log_softmax (never softmax().log()) keeps
    0 * d finite, so Ra-DPO stays finite for each risk measure."""
    inputs, leaves = extreme_inputs("radpo1", torch.float32)
    out = get_objective("radpo2")(inputs, mu=0.9, risk=risk)
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.loss, leaves))
