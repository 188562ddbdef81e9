"""The reward-vs-KL Pareto front of a sweep and its hypervolume: pure functions, no I/O.

Each trial is a point (reward, kl): evaluation reward to maximise, KL(policy || reference) to
minimise (the reward-KL frontier of DPO section 6.1 / OBJECTIVES.md section 7.1).  Ray Tune's
`ResultGrid.get_best_result` handles one metric only (RAY_NOTES.md 5.3), so the front is computed
here from the results dataframe.

Dominance: a dominates b when reward_a >= reward_b and kl_a <= kl_b with at least one strict.
Identical points do not dominate each other, so a tie on the front keeps all its copies.

Hypervolume (2-D, exact): the area of the region {(r, k): r_ref <= r <= r_i, k_i <= k <= k_ref for
some point i}, i.e. the union of the rectangles each point spans to the reference point
(r_ref, k_ref), a point worse than every trial in both metrics.  Units: reward x nats.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

# Default margin of the reference point, as a fraction of each metric's range over the trials:
# without a margin the worst trial in either metric would add zero area.
REFERENCE_MARGIN = 0.1


def _as_points(points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) as (reward, kl), got {arr.shape}")
    return arr


def pareto_mask(points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Which points are not dominated (reward up, KL down).

    Args:
        points: (N, 2) array of (reward, kl).  Rows with a NaN are never on the front and never
            dominate (a failed trial has no metrics).

    Returns:
        (N,) bool mask, True on the front.
    """
    arr = _as_points(points)
    finite = np.isfinite(arr).all(axis=1)
    reward, kl = arr[:, 0], arr[:, 1]
    # (N, N) pairwise: dominates[j, i] is True when point j dominates point i.  O(N^2) memory is
    # fine for sweeps (hundreds of trials).
    ge = reward[:, None] >= reward[None, :]
    le = kl[:, None] <= kl[None, :]
    strict = (reward[:, None] > reward[None, :]) | (kl[:, None] < kl[None, :])
    dominates = ge & le & strict & finite[:, None] & finite[None, :]
    return finite & ~dominates.any(axis=0)


def pareto_front(df: pd.DataFrame, reward_col: str = "reward", kl_col: str = "kl") -> np.ndarray:
    """The Pareto mask of a trials dataframe (reward maximised, KL minimised).

    Args:
        df: one row per trial.
        reward_col: column to maximise.
        kl_col: column to minimise.

    Returns:
        (len(df),) bool numpy mask aligned with df's rows.
    """
    for col in (reward_col, kl_col):
        if col not in df.columns:
            raise KeyError(f"column '{col}' not in the trials dataframe (columns: {', '.join(map(str, df.columns))})")
    return pareto_mask(df[[reward_col, kl_col]].to_numpy(dtype=np.float64))


def default_reference_point(
    points: np.ndarray | Sequence[Sequence[float]], margin: float = REFERENCE_MARGIN
) -> tuple[float, float]:
    """The reference point used when none is given: (min reward - m_r, max KL + m_k).

    m = margin x the metric's range over the finite points, or margin x max(|value|, 1) when every
    point has the same value (so the area is never zero by construction).

    Args:
        points: (N, 2) array of (reward, kl), N >= 1 finite rows.
        margin: fraction of the range added beyond the worst point, >= 0.

    Returns:
        (reward_ref, kl_ref).
    """
    arr = _as_points(points)
    arr = arr[np.isfinite(arr).all(axis=1)]
    if len(arr) == 0:
        raise ValueError("no finite (reward, kl) point to place a reference point")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")

    def pad(values: np.ndarray) -> float:
        span = float(values.max() - values.min())
        return margin * (span if span > 0 else max(abs(float(values.max())), 1.0))

    return float(arr[:, 0].min() - pad(arr[:, 0])), float(arr[:, 1].max() + pad(arr[:, 1]))


def hypervolume(
    points: np.ndarray | Sequence[Sequence[float]], ref_point: tuple[float, float] | None = None
) -> float:
    """Exact 2-D hypervolume of (reward up, KL down) points against `ref_point`.

    Sweep in increasing KL: between consecutive distinct KL values k_j < k_{j+1} (the last one
    followed by k_ref), the dominated region spans rewards from r_ref to the best reward among
    points with kl <= k_j.  Points not strictly better than the reference in both metrics add
    nothing; dominated points add nothing either (they lie inside the front's region).

    Args:
        points: (N, 2) array of (reward, kl); NaN rows are ignored.
        ref_point: (reward_ref, kl_ref); default `default_reference_point(points)`.

    Returns:
        The area, >= 0 (reward units x KL units).
    """
    arr = _as_points(points)
    arr = arr[np.isfinite(arr).all(axis=1)]
    if len(arr) == 0:
        return 0.0
    r_ref, k_ref = default_reference_point(arr) if ref_point is None else map(float, ref_point)
    arr = arr[(arr[:, 0] > r_ref) & (arr[:, 1] < k_ref)]
    if len(arr) == 0:
        return 0.0
    order = np.argsort(arr[:, 1], kind="stable")
    kl, reward = arr[order, 1], arr[order, 0]
    best = np.maximum.accumulate(reward)  # best reward among points with kl <= kl[j]
    next_kl = np.append(kl[1:], k_ref)
    # Equal KL values give zero-width strips; the last copy carries the running maximum.
    return float(np.sum((next_kl - kl) * (best - r_ref)))


def front_steps(
    points: np.ndarray | Sequence[Sequence[float]], ref_point: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """The front's staircase for plotting: the upper boundary of the dominated region.

    With front points sorted by KL (k_1 <= ... <= k_n, rewards then increasing), the path is
    (k_1, r_ref) -> (k_1, r_1) -> (k_2, r_1) -> (k_2, r_2) -> ... -> (k_n, r_n) -> (k_ref, r_n);
    the area under it and above r_ref, left of k_ref, is the hypervolume.

    Returns:
        (kl, reward) arrays of the path's vertices; empty when no point is finite.
    """
    arr = _as_points(points)
    arr = arr[pareto_mask(arr)]
    if len(arr) == 0:
        return np.array([]), np.array([])
    arr = arr[np.lexsort((arr[:, 0], arr[:, 1]))]  # by KL, then reward
    r_ref, k_ref = ref_point
    xs, ys = [arr[0, 1]], [r_ref]
    for reward, kl in arr:
        xs += [kl, kl]
        ys += [ys[-1], reward]
    xs.append(max(k_ref, xs[-1]))
    ys.append(ys[-1])
    return np.asarray(xs), np.asarray(ys)
