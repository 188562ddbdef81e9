"""Per-position divergences of pi_theta from pi_ref and their sum over response positions.

At one position s_t, with p = pi_ref(.|s_t) and d_v = log pi_ref(v|s_t) - log pi_theta(v|s_t)
(OBJECTIVES.md section 3):
  "kl":            phi = sum_v p_v d_v = KL(pi_ref || pi_theta)                    (TDPO)
  "cvar":          (1/mu) sum_v m_v d_v, m the p-mass of d's upper tail of total mu, the boundary
                   entry taken fractionally (Ra-DPO's CVaR, App. A.1 of https://arxiv.org/abs/2505.20359)
  "cvar_official": sum over the vocabulary halves [0, V//2), [V//2, V) of sum_v p_v d_v [d_v > q],
                   q the unweighted (1 - mu)-quantile of d in that half, linear interpolation;
                   no 1/mu (the authors' code, OBJECTIVES.md 3.3)
  "erm":           (1/mu) log sum_v p_v exp(mu d_v), the Renyi divergence of order 1 + mu
The tail masses and the quantile mask are piecewise constant in theta and carry no gradient; the
gradient flows through d only (OBJECTIVES.md 3.6 item 4).
"""

from __future__ import annotations

import torch

from robust_objectives.dpo import to_compute_dtype
from robust_objectives.types import Tensor

MEASURES = ("kl", "cvar", "cvar_official", "erm")
# Rows per chunk are chosen so that each sort/select touches about this many elements: it bounds
# the temporary memory of a 150k vocabulary and keeps torch.quantile's 2^24 limit irrelevant.
_CHUNK_ELEMENTS = 1 << 22


def _chunks(rows: int, width: int):
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return ((start, min(start + step, rows)) for start in range(0, rows, step))


def compute_linear_quantile(values: Tensor, q: float) -> Tensor:
    """torch.quantile(values, q, dim=-1) with 'linear' interpolation, for any number of elements.

    torch.quantile refuses inputs over 2^24 elements (pytorch/pytorch#64947: the whole tensor in
    older releases, the reduced dimension in torch 2.13). This selects the two order statistics with
    torch.kthvalue row-chunk by row-chunk and interpolates exactly as torch.quantile does
    (rank = q (n - 1) in the input dtype, then lerp), so results are bitwise identical.

    Args:
        values: (M, n) rows, n >= 1.
        q: quantile level in [0, 1].

    Returns:
        (M,) per-row quantiles.
    """
    rows, n = values.shape
    rank = torch.tensor(q, dtype=values.dtype) * (n - 1)
    below, above = int(rank.floor()), int(rank.ceil())
    weight = (rank - rank.floor()).to(values.device)
    out = values.new_empty(rows)
    for start, stop in _chunks(rows, n):
        chunk = values[start:stop]
        low = torch.kthvalue(chunk, below + 1, dim=-1).values
        high = low if above == below else torch.kthvalue(chunk, above + 1, dim=-1).values
        out[start:stop] = torch.lerp(low, high, weight)
    return out


@torch.no_grad()
def _cvar_masses(probs: Tensor, log_ratios: Tensor, mu: float) -> Tensor:
    """(M, V) m_v / mu: p-mass of each entry inside the upper mu-tail of d, divided by mu."""
    masses = torch.empty_like(probs)
    for start, stop in _chunks(*probs.shape):
        order = torch.argsort(log_ratios[start:stop], dim=-1, descending=True)
        sorted_probs = probs[start:stop].gather(-1, order).double()
        # Mass taken from an entry: what is left of mu after the entries above it, at most p_v.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        taken = (mu - mass_before).clamp(min=0.0).minimum(sorted_probs) / mu
        masses[start:stop] = torch.zeros_like(probs[start:stop]).scatter_(-1, order, taken.to(probs.dtype))
    return masses


@torch.no_grad()
def _official_masses(probs: Tensor, log_ratios: Tensor, mu: float) -> Tensor:
    """(M, V) p_v [d_v > q_half(v)] of the split-vocabulary official form."""
    vocab = log_ratios.shape[-1]
    if vocab < 2:
        raise ValueError("risk='cvar_official' needs a vocabulary of at least 2 (it splits it in halves)")
    masses = torch.empty_like(probs)
    for low, high in ((0, vocab // 2), (vocab // 2, vocab)):
        half = log_ratios[:, low:high]
        threshold = compute_linear_quantile(half, 1.0 - mu)
        masses[:, low:high] = torch.where(half > threshold[:, None], probs[:, low:high], 0.0)
    return masses


def _divergence_terms(reference_logps: Tensor, policy_logps: Tensor, measure: str, mu: float):
    """(phi with grad, KL detached) at M positions, sharing the log-softmax and the log-ratios."""
    if measure not in MEASURES:
        raise ValueError(f"unknown divergence measure {measure!r}; valid: {sorted(MEASURES)}")
    # log_softmax, never softmax().log(): underflowing probabilities would give 0 * -inf = NaN.
    reference = torch.log_softmax(to_compute_dtype(reference_logps.detach()), dim=-1)
    policy = to_compute_dtype(policy_logps)
    log_ratios = reference - policy
    probs = reference.exp()
    with torch.no_grad():
        kl = (probs * log_ratios).sum(dim=-1)
    if measure == "erm":
        # (1/mu) log sum_v exp(log p_v + mu d_v) = (1/mu) logsumexp((1 + mu) log p - mu log pi_theta)
        return torch.logsumexp((1.0 + mu) * reference - mu * policy, dim=-1) / mu, kl
    if measure == "kl":
        masses = probs
    elif measure == "cvar":
        masses = _cvar_masses(probs, log_ratios.detach(), mu)
    else:
        masses = _official_masses(probs, log_ratios.detach(), mu)
    return (masses * log_ratios).sum(dim=-1), kl


def compute_position_divergence(
    reference_logps: Tensor, policy_logps: Tensor, *, measure: str, mu: float = 1.0
) -> Tensor:
    """phi at each position for one of MEASURES (module docstring).

    Args:
        reference_logps: (M, V) log pi_ref at M positions (renormalised here in fp32, no grad).
        policy_logps: (M, V) log pi_theta (log-softmax) at the same positions, with grad.
        measure: "kl", "cvar", "cvar_official" or "erm".
        mu: CVaR level in (0, 1] or entropic coefficient > 0 (unused for "kl").

    Returns:
        (M,) phi, fp32 or wider.
    """
    return _divergence_terms(reference_logps, policy_logps, measure, mu)[0]


def compute_sequence_divergence(
    policy_vocab_logps: Tensor,
    reference_vocab_logps: Tensor,
    mask: Tensor,
    *,
    measure: str,
    mu: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Sequential divergence D[b] = sum_t mask[b, t] phi[b, t] (D_SeqKL or D_SeqRR of Ra-DPO Thm 3.6).

    Only response positions are evaluated; masked positions may hold anything.

    Args:
        policy_vocab_logps: (B, T, V) policy log-softmax, with grad.
        reference_vocab_logps: (B, T, V) reference log-softmax.
        mask: (B, T) 1 (or True) at response positions.
        measure: "kl", "cvar", "cvar_official" or "erm".
        mu: the measure's parameter.

    Returns:
        divergence: (B,) sequential divergences, with grad.
        kl: (B,) sequential KL(pi_ref || pi_theta), detached (for logging; equals divergence for "kl").
    """
    if policy_vocab_logps.shape != reference_vocab_logps.shape or policy_vocab_logps.shape[:2] != mask.shape:
        raise ValueError(
            f"vocab log-prob shapes {tuple(policy_vocab_logps.shape)} / {tuple(reference_vocab_logps.shape)}"
            f" do not match mask shape {tuple(mask.shape)} as (B, T, V) / (B, T)"
        )
    selected = mask.bool()
    phi, kl = _divergence_terms(reference_vocab_logps[selected], policy_vocab_logps[selected], measure, mu)
    rows = selected.nonzero()[:, 0]
    zeros = phi.new_zeros(mask.shape[0])
    return zeros.index_add(0, rows, phi), zeros.index_add(0, rows, kl)
