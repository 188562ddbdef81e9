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

Ties (OBJECTIVES.md 3.6 item 8). At policy == reference (the first step, a fresh LoRA) every d_v is
0 up to rounding, so a plain sort or `d > q` would let rounding pick the tail, and the first gradient
would differ from TDPO's by a few percent. CVaR's value is the same for any split of tied entries;
its gradient is not. Rule: entries whose d lies within the row's rounding tolerance
tol = TIE_ULPS * eps * max(1, max_v |log p_v|, max_v |log pi_theta(v)|) (eps of the fp32-or-wider
compute dtype; the log-probs' magnitudes bound the rounding of d = log p - log pi_theta) of the
threshold are ties, and
  "cvar":          entries above the tail's boundary value by more than tol are taken whole, and the
                   tied entries share the remaining mass in proportion to p (the permutation-invariant
                   choice). With d == 0 all entries tie, m = mu p, phi = KL and its gradient is the
                   KL's (TDPO's) for every mu.
  "cvar_official": an entry is kept only when d_v > q + tol (the authors' strict `d > q`, with
                   rounding ties excluded). With d == 0 nothing is kept, phi = 0 and its gradient is 0,
                   as TDPO's KL gradient with respect to the policy's logits is at pi_theta = pi_ref
                   (with respect to the log-probs themselves it is -p, which the official form drops).
Away from ties (no entry within tol of the threshold) both give exactly the untied definitions above.
"""
from __future__ import annotations

import torch

from robust_objectives.dpo import to_compute_dtype
from robust_objectives.types import Tensor

MEASURES = ("kl", "cvar", "cvar_official", "erm")
# Rows per chunk are chosen so that each sort/select touches about this many elements: it bounds
# the temporary memory of a 150k vocabulary and keeps torch.quantile's 2^24 limit irrelevant.
_CHUNK_ELEMENTS = 1 << 22
# Half-width of the tie band in units of eps * (the row's largest |log-prob|). Recomputing a
# log-softmax moves d by under 1 such unit (measured 0.05-0.8 for V = 7..50k, fp32 and fp64), and a
# tie compares two such values; 16 leaves a wide margin while the band stays ~1e-5 wide in fp32.
TIE_ULPS = 16


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
def _cvar_masses(probs: Tensor, log_ratios: Tensor, mu: float, tolerance: Tensor) -> Tensor:
    """(M, V) m_v / mu: p-mass of each entry inside the upper mu-tail of d, divided by mu.

    Entries within tolerance (M,) of the boundary entry's d share the boundary mass in proportion to
    p (module docstring, ties); with no such ties this is the plain fractional boundary entry.
    """
    masses = torch.empty_like(probs)
    for start, stop in _chunks(*probs.shape):
        sorted_ratios, order = torch.sort(log_ratios[start:stop], dim=-1, descending=True)
        sorted_probs = probs[start:stop].gather(-1, order).double()
        cumulative = sorted_probs.cumsum(dim=-1)
        mass_before = cumulative - sorted_probs
        # The boundary entry: the first whose cumulative mass reaches mu (the last one if rounding
        # leaves the total just under mu = 1). Its d is the tail's threshold (the VaR).
        boundary = (cumulative < mu).sum(dim=-1, keepdim=True).clamp(max=probs.shape[-1] - 1)
        threshold = sorted_ratios.gather(-1, boundary)
        band = tolerance[start:stop, None].to(sorted_ratios.dtype)
        above = sorted_ratios > threshold + band
        tied = (sorted_ratios - threshold).abs() <= band
        # The tied entries sit right after the `above` ones in the sort: what is left of mu after
        # those is shared among them in proportion to p.
        remaining = mu - mass_before.gather(-1, above.sum(dim=-1, keepdim=True))
        tied_mass = (sorted_probs * tied).sum(dim=-1, keepdim=True)
        share = torch.where(tied_mass > 0, remaining / tied_mass.clamp(min=torch.finfo(tied_mass.dtype).tiny), 0.0)
        taken = torch.where(above, sorted_probs, torch.where(tied, sorted_probs * share, 0.0)) / mu
        masses[start:stop] = torch.zeros_like(probs[start:stop]).scatter_(-1, order, taken.to(probs.dtype))
    return masses


@torch.no_grad()
def _official_masses(probs: Tensor, log_ratios: Tensor, mu: float, tolerance: Tensor) -> Tensor:
    """(M, V) p_v [d_v > q_half(v) + tolerance] of the split-vocabulary official form (ties excluded)."""
    vocab = log_ratios.shape[-1]
    if vocab < 2:
        raise ValueError("risk='cvar_official' needs a vocabulary of at least 2 (it splits it in halves)")
    masses = torch.empty_like(probs)
    for low, high in ((0, vocab // 2), (vocab // 2, vocab)):
        half = log_ratios[:, low:high]
        threshold = compute_linear_quantile(half, 1.0 - mu)
        keep = half > threshold[:, None] + tolerance[:, None].to(half.dtype)
        masses[:, low:high] = torch.where(keep, probs[:, low:high], 0.0)
    return masses


@torch.no_grad()
def _tie_tolerance(reference: Tensor, policy: Tensor) -> Tensor:
    """(M,) TIE_ULPS * eps * max(1, largest finite |log-prob| of either row): d's rounding bound."""
    scale = torch.maximum(
        reference.abs().nan_to_num(nan=0.0, posinf=0.0).amax(dim=-1),
        policy.abs().nan_to_num(nan=0.0, posinf=0.0).amax(dim=-1),
    )
    return TIE_ULPS * torch.finfo(reference.dtype).eps * scale.clamp(min=1.0)


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
    else:
        tolerance = _tie_tolerance(reference, policy.detach())
        if measure == "cvar":
            masses = _cvar_masses(probs, log_ratios.detach(), mu, tolerance)
        else:
            masses = _official_masses(probs, log_ratios.detach(), mu, tolerance)
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
