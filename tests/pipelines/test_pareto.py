"""Pareto front and hypervolume on hand-made points (reward up, KL down), with areas worked by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipelines.pareto import default_reference_point, front_steps, hypervolume, pareto_front, pareto_mask

# (reward, kl).  A and D are identical; B trades reward for KL; C, E, F are dominated by A
# (C strictly in both, E only in reward at equal KL, F only in KL at equal reward).
POINTS = {
    "A": (3.0, 1.0),
    "B": (2.0, 0.5),
    "C": (1.0, 2.0),
    "D": (3.0, 1.0),
    "E": (2.0, 1.0),
    "F": (3.0, 1.5),
}


def _frame() -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": k, "reward": r, "kl": kl} for k, (r, kl) in POINTS.items()])


def test_front_dominance_and_ties():
    mask = pareto_front(_frame(), "reward", "kl")
    assert mask.dtype == bool
    assert dict(zip(POINTS, mask.tolist())) == {"A": True, "B": True, "C": False, "D": True, "E": False, "F": False}


def test_front_nan_rows_are_off_and_do_not_dominate():
    df = pd.DataFrame({"reward": [1.0, np.nan, 5.0], "kl": [1.0, 0.0, np.nan]})
    assert pareto_front(df, "reward", "kl").tolist() == [True, False, False]


def test_front_missing_column_is_named():
    with pytest.raises(KeyError, match="column 'kl' not in the trials dataframe"):
        pareto_front(pd.DataFrame({"reward": [1.0]}), "reward", "kl")


def test_front_matches_brute_force_with_many_ties():
    rng = np.random.default_rng(0)
    pts = rng.integers(0, 4, size=(60, 2)).astype(float)  # small range: many exact ties
    expected = []
    for i, (ri, ki) in enumerate(pts):
        dominated = any(
            rj >= ri and kj <= ki and (rj > ri or kj < ki) for j, (rj, kj) in enumerate(pts) if j != i
        )
        expected.append(not dominated)
    assert pareto_mask(pts).tolist() == expected


def test_hypervolume_by_hand():
    """Front B=(2, .5), A=(3, 1), ref (0, 3).

    Rectangles to the reference: B spans rewards [0, 2] x KL [0.5, 3] = 2 x 2.5 = 5, A spans
    [0, 3] x [1, 3] = 3 x 2 = 6, overlap [0, 2] x [1, 3] = 4: union 5 + 6 - 4 = 7.  Dominated points
    (C, E, F) and copies (D) add nothing.
    """
    all_points = list(POINTS.values())
    assert hypervolume([POINTS["A"], POINTS["B"]], (0.0, 3.0)) == pytest.approx(7.0, abs=1e-12)
    assert hypervolume(all_points, (0.0, 3.0)) == pytest.approx(7.0, abs=1e-12)
    # Points not strictly better than the reference in both metrics add nothing.
    assert hypervolume(all_points + [(-1.0, 0.1), (5.0, 4.0)], (0.0, 3.0)) == pytest.approx(7.0, abs=1e-12)
    assert hypervolume([(1.0, 1.0)], (1.0, 2.0)) == 0.0
    assert hypervolume([], (0.0, 1.0)) == 0.0


def test_default_reference_point_and_its_hypervolume_by_hand():
    """Rewards span [1, 3] (range 2), KL spans [0.5, 2] (range 1.5); margin 0.1.

    ref = (1 - 0.2, 2 + 0.15) = (0.8, 2.15).  Strips: KL [0.5, 1] at best reward 2: 0.5 x 1.2 = 0.6;
    KL [1, 2.15] at best reward 3: 1.15 x 2.2 = 2.53.  Total 3.13.
    """
    pts = list(POINTS.values())
    ref = default_reference_point(pts)
    assert ref == pytest.approx((0.8, 2.15))
    assert hypervolume(pts) == pytest.approx(3.13)
    # One point: the margin falls back to 0.1 x max(|value|, 1).
    assert default_reference_point([(5.0, 0.2)]) == pytest.approx((4.5, 0.3))
    assert hypervolume([(5.0, 0.2)]) == pytest.approx(0.5 * 0.1)


def test_hypervolume_matches_unit_cell_count_on_integer_points():
    """On integer points the area equals the number of unit cells dominated by some point."""
    rng = np.random.default_rng(1)
    for _ in range(20):
        pts = rng.integers(0, 8, size=(rng.integers(1, 9), 2)).astype(float)
        ref = (-1.0, 9.0)
        cells = 0
        for r in range(-1, 8):  # cell [r, r+1] x [k, k+1]
            for k in range(0, 9):
                cells += any(r + 1 <= pr and k >= pk for pr, pk in pts)
        assert hypervolume(pts, ref) == pytest.approx(cells)


def test_front_steps_trace_the_dominated_region():
    xs, ys = front_steps(list(POINTS.values()), (0.0, 3.0))
    # (k1, r_ref) -> (k1, r1) -> (k2, r1) -> (k2, r2) [A then its copy D] -> (k_ref, r_n)
    assert xs.tolist() == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 3.0]
    assert ys.tolist() == [0.0, 0.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    area = np.sum(np.diff(xs) * (ys[:-1] - 0.0))  # right-continuous staircase: area under it
    assert area == pytest.approx(hypervolume(list(POINTS.values()), (0.0, 3.0)))
