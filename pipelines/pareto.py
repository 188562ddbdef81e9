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


def _as_points(points: np.ndarray | Sequence[Sequence[float]], finite: bool = False) -> np.ndarray:
    """(N, 2) float64 (reward, kl) rows; only the rows without a NaN or inf when `finite`."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) as (reward, kl), got {arr.shape}")
    return arr[np.isfinite(arr).all(axis=1)] if finite else arr


def pareto_mask(points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """(N,) bool mask of the (reward, kl) points not dominated (reward up, KL down).  Rows with a NaN are
    never on the front and never dominate (a failed trial has no metrics)."""
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
    """The Pareto mask of a trials dataframe (one row per trial), aligned with its rows."""
    for col in (reward_col, kl_col):
        if col not in df.columns:
            raise KeyError(f"column '{col}' not in the trials dataframe (columns: {', '.join(map(str, df.columns))})")
    return pareto_mask(df[[reward_col, kl_col]].to_numpy(dtype=np.float64))


def default_reference_point(points: np.ndarray | Sequence[Sequence[float]]) -> tuple[float, float]:
    """The reference point used when none is given: (min reward - m_r, max KL + m_k) over the finite points.

    m = 0.1 x the metric's range, or 0.1 x max(|value|, 1) when every point has the same value: without
    a margin the worst trial in either metric would add zero area.
    """
    arr = _as_points(points, finite=True)
    if len(arr) == 0:
        raise ValueError("no finite (reward, kl) point to place a reference point")

    def pad(values: np.ndarray) -> float:
        span = float(values.max() - values.min())
        return 0.1 * (span if span > 0 else max(abs(float(values.max())), 1.0))

    return float(arr[:, 0].min() - pad(arr[:, 0])), float(arr[:, 1].max() + pad(arr[:, 1]))


def hypervolume(
    points: np.ndarray | Sequence[Sequence[float]], ref_point: tuple[float, float] | None = None
) -> float:
    """Exact 2-D hypervolume of (reward up, KL down) points against `ref_point`.

    Sweep in increasing KL: between consecutive distinct KL values k_j < k_{j+1} (the last one
    followed by k_ref), the dominated region spans rewards from r_ref to the best reward among
    points with kl <= k_j.  Points not strictly better than the reference in both metrics add
    nothing; dominated points add nothing either (they lie inside the front's region).  NaN rows are
    ignored; `ref_point` defaults to `default_reference_point(points)`.
    """
    arr = _as_points(points, finite=True)
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
    the area under it and above r_ref, left of k_ref, is the hypervolume.  Returns the vertices' (kl, reward)
    arrays, empty when no point is finite.
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
