"""One hand-worked example per objective: the numbers are derived in each test's docstring."""

from __future__ import annotations

import math

import pytest
import torch

from robust_objectives import ListwiseLogps, PreferenceLogps, get_objective

LOG2 = math.log(2.0)
LOG43 = math.log(4.0 / 3.0)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def pairs(margins, **fields):
    """Pairs with policy_chosen = h_i and everything else 0, so h_i is the DPO margin."""
    chosen = torch.tensor(margins, dtype=torch.float64, requires_grad=True)
    rejected = torch.zeros(len(margins), dtype=torch.float64, requires_grad=True)
    zeros = torch.zeros(len(margins), dtype=torch.float64)
    inputs = PreferenceLogps(chosen, rejected, zeros, zeros, **fields)
    return inputs, chosen, rejected


def close(actual, expected, tol=1e-12):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual, expected, atol=tol, rtol=tol), (actual, expected)


def test_dpo_at_reference_is_log2_and_at_log3_is_log4_over_3():
    """h = 0: l = -log s(0) = log 2, dl/dpc = -beta/2. beta = 1, h = log 3: s(log 3) = 3/4 so
    l = log(4/3) and dl/dpc = -s(-log 3) = -1/4; the batch loss is the mean (log 2 + log 4/3)/2."""
    inputs, chosen, rejected = pairs([0.0, math.log(3.0)])
    out = get_objective("dpo")(inputs, beta=1.0)
    close(out.losses, [LOG2, LOG43])
    close(out.loss, (LOG2 + LOG43) / 2)
    out.loss.backward()
    close(chosen.grad, [-0.5 / 2, -0.25 / 2])  # the mean divides by B = 2
    close(rejected.grad, [0.5 / 2, 0.25 / 2])
    close(out.metrics["rewards/accuracy_delta"], 0.5)  # h = 0 is not a strict win


def test_ipo_per_token_average():
    """Delta_w = 2 over 4 tokens, Delta_l = -1 over 2: hbar = 0.5 + 0.5 = 1. beta = 0.25: target
    1/(2 beta) = 2, l = (1 - 2)^2 = 1, dl/dpc = 2 (1 - 2) / 4 = -1/2, dl/dpr = -2 (1 - 2) / 2 = 1."""
    chosen = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-1.0], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    inputs = PreferenceLogps(chosen, rejected, zero, zero, chosen_lengths=torch.tensor([4]),
                             rejected_lengths=torch.tensor([2]))
    out = get_objective("ipo")(inputs, beta=0.25)
    close(out.loss, 1.0)
    out.loss.backward()
    close(chosen.grad, [-0.5])
    close(rejected.grad, [1.0])


def test_cdpo_and_rdpo_at_log3():
    """beta = 1, h = log 3: log s(h) = log 3/4, log s(-h) = log 1/4. eps = 0.1:
    cDPO = 0.9 log(4/3) + 0.1 log 4; rDPO = (0.9 log(4/3) - 0.1 log 4) / 0.8."""
    inputs, _, _ = pairs([math.log(3.0)])
    close(get_objective("cdpo")(inputs, beta=1.0, label_smoothing=0.1).loss, 0.9 * LOG43 + 0.1 * math.log(4))
    close(get_objective("rdpo")(inputs, beta=1.0, label_smoothing=0.1).loss,
          (0.9 * LOG43 - 0.1 * math.log(4)) / 0.8)


def test_drdpo_two_pairs():
    """l = (log 2, log 4/3), beta' = 1: L = -log((1/2 + 3/4)/2) = log(8/5); weights softmax(-l) =
    (1/2, 3/4)/(5/4) = (2/5, 3/5); dL/dpc = (2/5 (-1/2), 3/5 (-1/4)) = (-1/5, -3/20)."""
    inputs, chosen, _ = pairs([0.0, math.log(3.0)])
    out = get_objective("drdpo")(inputs, beta=1.0, beta_prime=1.0)
    close(out.loss, math.log(8 / 5))
    close(out.losses, [LOG2, LOG43])
    out.loss.backward()
    close(chosen.grad, [-1 / 5, -3 / 20])
    close(out.metrics["drdpo/weight_max"], 2 * 3 / 5)


def test_kldpo_two_pairs_both_modes():
    """tau = 1, l = (log 2, log 4/3), m = mean l: w = exp(l - m) = (sqrt(3/2), sqrt(2/3)),
    L = (sqrt(3/2) log 2 + sqrt(2/3) log 4/3)/2, dL/dpc = (w_1 (-1/2), w_2 (-1/4))/2.
    max_weight = 1.1 caps w_1 at 1.1. normalize: w = 2 (2, 4/3)/(10/3) = (6/5, 4/5),
    L = 3/5 log 2 + 2/5 log 4/3."""
    w = [math.sqrt(1.5), math.sqrt(2 / 3)]
    inputs, chosen, _ = pairs([0.0, math.log(3.0)])
    out = get_objective("kldpo")(inputs, beta=1.0, tau=1.0)
    close(out.loss, (w[0] * LOG2 + w[1] * LOG43) / 2)
    out.loss.backward()
    close(chosen.grad, [w[0] * -0.5 / 2, w[1] * -0.25 / 2])
    close(out.metrics["kldpo/weight_max"], w[0])

    capped = get_objective("kldpo")(pairs([0.0, math.log(3.0)])[0], beta=1.0, tau=1.0, max_weight=1.1)
    close(capped.loss, (1.1 * LOG2 + w[1] * LOG43) / 2)

    inputs, chosen, _ = pairs([0.0, math.log(3.0)])
    out = get_objective("kldpo")(inputs, beta=1.0, tau=1.0, normalize=True)
    close(out.loss, 0.6 * LOG2 + 0.4 * LOG43)
    out.loss.backward()
    close(chosen.grad, [1.2 * -0.5 / 2, 0.8 * -0.25 / 2])


def test_dora_two_pairs():
    """lam = 1, c = (2, 1), l = (log 2, log 4/3): L = log((e^{2 log 2} + e^{log 4/3})/2) = log(8/3);
    softmax(c l) = (4, 4/3)/(16/3) = (3/4, 1/4), dL/dl = c softmax = (3/2, 1/4),
    dL/dpc = (3/2 (-1/2), 1/4 (-1/4)) = (-3/4, -1/16)."""
    inputs, chosen, _ = pairs([0.0, math.log(3.0)], calibration=torch.tensor([2.0, 1.0], dtype=torch.float64))
    out = get_objective("dora")(inputs, beta=1.0, lam=1.0)
    close(out.loss, math.log(8 / 3))
    out.loss.backward()
    close(chosen.grad, [-3 / 4, -1 / 16])
    close(out.metrics["dora/weight_max"], 2 * 3 / 4)


def test_wdpo_linear_embedding_model():
    """chosen logp = <a, e_w>, rejected logp = <b, e_l>, references chosen so h = 0, beta = 1:
    dl/de_w = -(1/2) a, dl/de_l = (1/2) b, g = (|a|^2 + |b|^2)/4. a = (1, 2), b = (2, 0): g = 9/4.
    pointwise: log 2 + rho 9/4; sqrt (one pair): log 2 + rho sqrt(9/4) = log 2 + 1.5 rho."""
    a = torch.tensor([1.0, 2.0], dtype=torch.float64)
    b = torch.tensor([2.0, 0.0], dtype=torch.float64)
    for penalty, expected in (("pointwise", LOG2 + 0.1 * 9 / 4), ("sqrt", LOG2 + 0.1 * 1.5)):
        embeddings = torch.tensor([[[0.3, -0.2]], [[0.5, 0.7]]], dtype=torch.float64, requires_grad=True)
        chosen = (embeddings[0, 0] * a).sum().reshape(1)
        rejected = (embeddings[1, 0] * b).sum().reshape(1)
        inputs = PreferenceLogps(chosen, rejected, chosen.detach(), rejected.detach(),
                                 policy_input_embeddings=embeddings)
        out = get_objective("wdpo")(inputs, beta=1.0, rho=0.1, penalty=penalty)
        close(out.loss, expected)
        close(out.metrics["wdpo/grad_norm_sq"], 9 / 4)


def token_inputs(policy_chosen_probs, reference_probs, **kwargs):
    """One pair, T = 2 positions of which only the first is a response position (the second holds
    garbage that must be ignored); y_l's policy equals the reference, and h = 0."""
    ref = torch.tensor(reference_probs, dtype=torch.float64).log()
    pol = torch.tensor(policy_chosen_probs, dtype=torch.float64).log()
    garbage = torch.full_like(ref, float("nan"))
    policy_chosen = torch.stack([pol, garbage])[None].requires_grad_()
    reference = torch.stack([ref, garbage])[None]
    mask = torch.tensor([[True, False]])
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    inputs = PreferenceLogps(zero, zero, zero.detach(), zero.detach(),
                             policy_chosen_vocab_logps=policy_chosen, policy_rejected_vocab_logps=reference,
                             reference_chosen_vocab_logps=reference, reference_rejected_vocab_logps=reference,
                             chosen_mask=mask, rejected_mask=mask, **kwargs)
    return inputs, policy_chosen


def test_tdpo_two_token_vocabulary():
    """pi_ref = (1/2, 1/2), pi_theta(y_w) = (3/4, 1/4), pi_theta(y_l) = pi_ref, h = 0:
    D_w = (1/2) log(2/3) + (1/2) log 2 = (1/2) log(4/3), D_l = 0, so
    tdpo1: l = -log s(beta D_w); tdpo2 with alpha = 0.5: l = -log s(beta alpha D_w), and its gradient
    w.r.t. the chosen vocab log-probs is 0 because D_w is detached (h does not depend on them here)."""
    kl = 0.5 * LOG43
    inputs, policy_chosen = token_inputs([0.75, 0.25], [0.5, 0.5])
    out = get_objective("tdpo1")(inputs, beta=2.0)
    close(out.loss, -math.log(sigmoid(2.0 * kl)))
    close(out.metrics["seq_kl/chosen"], kl)
    out.loss.backward()
    # dl/dD_w = -beta s(-beta D_w); dD_w/d log pi_theta(v) = -pi_ref(v) = -1/2.
    expected = -2.0 * sigmoid(-2.0 * kl) * -0.5
    close(policy_chosen.grad[0, 0], [expected, expected])
    inputs, policy_chosen = token_inputs([0.75, 0.25], [0.5, 0.5])
    out = get_objective("tdpo2")(inputs, beta=2.0, alpha=0.5)
    close(out.loss, -math.log(sigmoid(2.0 * 0.5 * kl)))
    out.loss.backward()
    assert policy_chosen.grad is None or torch.all(policy_chosen.grad == 0)


@pytest.mark.parametrize(
    "risk, mu, expected",
    [
        # pi_ref = (.4, .3, .2, .1), pi_theta = (.1, .2, .3, .4): d = log(4, 3/2, 2/3, 1/4), already
        # in descending order. Upper tail of p-mass 0.5: all of entry 1 (0.4) and 0.1 of entry 2.
        ("cvar", 0.5, (0.4 * math.log(4) + 0.1 * math.log(1.5)) / 0.5),
        ("cvar", 1.0, 0.4 * math.log(4) + 0.3 * math.log(1.5) + 0.2 * math.log(2 / 3) + 0.1 * math.log(0.25)),
        # Renyi order 2: log sum p^2 / q = log(.16/.1 + .09/.2 + .04/.3 + .01/.4).
        ("erm", 1.0, math.log(0.16 / 0.1 + 0.09 / 0.2 + 0.04 / 0.3 + 0.01 / 0.4)),
        # Halves {0, 1} and {2, 3}: each has 2 entries, the 0.5-quantile is their midpoint, and only
        # the larger d of each half is kept: 0.4 log 4 + 0.2 log(2/3); no 1/mu.
        ("cvar_official", 0.5, 0.4 * math.log(4) + 0.2 * math.log(2 / 3)),
    ],
)
def test_radpo1_risk_measures_hand_computed(risk, mu, expected):
    """radpo1 with D_l = 0 and h = 0 is -log s(beta D_w); D_w is the risk measure at one position."""
    inputs, _ = token_inputs([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1])
    out = get_objective("radpo1")(inputs, beta=1.0, mu=mu, risk=risk)
    close(out.metrics["risk_ratio/chosen"], expected)
    close(out.loss, -math.log(sigmoid(expected)))


def test_cvar_official_eight_entries():
    """p = (.1,.1,.1,.1,.15,.15,.15,.15), q = (.2,.1,.05,.15,.1,.15,.05,.2). Half 1: d = log(1/2, 1, 2,
    2/3); sorted log(1/2) < log(2/3) < 0 < log 2; mu = 0.5 -> rank 1.5 -> q between log(2/3) and 0,
    keep d = 0 and log 2. Half 2: d = log(3/2, 1, 3, 3/4) -> keep log(3/2) and log 3.
    phi = .1 * 0 + .1 log 2 + .15 log 1.5 + .15 log 3."""
    inputs, _ = token_inputs([0.2, 0.1, 0.05, 0.15, 0.1, 0.15, 0.05, 0.2],
                             [0.1, 0.1, 0.1, 0.1, 0.15, 0.15, 0.15, 0.15])
    out = get_objective("radpo2")(inputs, beta=1.0, alpha=1.0, mu=0.5, risk="cvar_official")
    close(out.metrics["risk_ratio/chosen"], 0.1 * LOG2 + 0.15 * math.log(1.5) + 0.15 * math.log(3))


def test_dpo_pl_three_responses():
    """beta = 1, ranked rewards s = (log 3, 0, 0): l = -(1/3)[(log 3 - log 5) + (0 - log 2) + 0]
    = (1/3) log(10/3). The scores put the top response last in the input, to exercise the sort."""
    policy = torch.tensor([[0.0, 0.0, math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    inputs = ListwiseLogps(policy, torch.zeros(1, 3, dtype=torch.float64),
                           scores=torch.tensor([[0.2, 0.1, 0.9]]))
    out = get_objective("dpo_pl")(inputs, beta=1.0)
    close(out.loss, math.log(10 / 3) / 3)
    close(out.metrics["rewards/margins"], math.log(3.0))


def test_dora_pl_two_lists():
    """K = 2, beta = 1, lam = 1: rewards (0, 0) and (log 3, 0) give l = ((1/2) log 2, (1/2) log 4/3);
    cbar = (2, 2): L = log((e^{log 2} + e^{log 4/3})/2) = log(5/3)."""
    policy = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64, requires_grad=True)
    inputs = ListwiseLogps(policy, torch.zeros(2, 2, dtype=torch.float64),
                           scores=torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
                           calibration=torch.tensor([[1.5, 2.5], [2.0, 2.0]], dtype=torch.float64))
    out = get_objective("dora_pl")(inputs, beta=1.0, lam=1.0)
    close(out.losses, [LOG2 / 2, LOG43 / 2])
    close(out.loss, math.log(5 / 3))
