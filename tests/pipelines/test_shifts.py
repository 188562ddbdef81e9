"""Shift specs and the seeded per-batch transforms (pipelines/data/shifts.py), mostly without Ray."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from pipelines.errors import UserError
from pipelines.data.shifts import (
    apply_shifts, expand_grid, flip_labels, group_rates, length_tilt, mixture_reward, parse_shift,
    relabel_by_mixture, resample_by_key, resample_by_length, response_lengths, row_uniforms, sample_counts,
)


def pairs(n: int, seed: int = 0, groups=("a", "b"), probs=(0.6, 0.4)) -> pa.Table:
    """n pair rows with two known positive rewards, a group, a source and token columns."""
    rng = np.random.default_rng(seed)
    return pa.table({
        "row_id": [f"f.jsonl:row {i}" for i in range(n)],
        "prompt": ["w1"] * n,
        "chosen": [" ".join(["w2"] * int(k)) for k in rng.integers(1, 9, n)],
        "rejected": ["w3"] * n,
        "chosen_input_ids": [[6, i] for i in range(n)],
        "rejected_input_ids": [[7, -i - 1] for i in range(n)],  # sign tells a swapped row
        "group": rng.choice(groups, n, p=probs).tolist(),
        "source": rng.choice(["human", "target", "synthetic"], n, p=[0.1, 0.1, 0.8]).tolist(),
        "reward_a_chosen": rng.uniform(0.1, 2, n), "reward_a_rejected": rng.uniform(0.1, 2, n),
        "reward_b_chosen": rng.uniform(0.1, 2, n), "reward_b_rejected": rng.uniform(0.1, 2, n),
    })


def binomial_ok(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(k / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


# --- specs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, message", [
    ("label_flip:epsilon=0.2",
     "shift 'label_flip:epsilon=0.2': unknown key 'epsilon'; valid keys for label_flip: eps, seed"),
    ("flip:eps=0.2", "unknown shift 'flip'; valid shifts: mixture, group_weights, label_flip, source_mixture, length"),
    ("label_flip", "shift 'label_flip': key 'eps' is required"),
    ("label_flip:eps=1.5", "eps must be in [0, 1], got 1.5"),
    ("mixture:alpha=0.5,form=arith", "form must be one of convex, geometric, got 'arith'"),
    ("mixture:alpha=0.5,r1=a", "give both r1 and r2, or neither"),
    ("mixture:alpha=x", "alpha must be a number, got 'x'"),
    ("length:direction=up", "direction must be one of longer, shorter"),
    ("group_weights:a=-1,b=1", "group weights must be >= 0"),
    ("label_flip:eps=0:1:3", "only valid in an evaluation grid"),
])
def test_bad_specs_name_the_spec_and_valid_keys(spec, message):
    with pytest.raises(UserError, match=None) as err:
        parse_shift(spec)
    assert message in str(err.value)


def test_parse_fills_defaults_and_canonical_text():
    spec = parse_shift("mixture:alpha=0.3,sample=true")
    assert spec.params == {"alpha": 0.3, "form": "convex", "r1": None, "r2": None, "temperature": 1.0,
                           "sample": True, "seed": None}
    assert spec.text == "mixture:alpha=0.3,form=convex,temperature=1,sample=true"
    assert parse_shift("group_weights:young=2,old=1").params == {"young": 2.0, "old": 1.0, "sampling": "thin",
                                                                 "seed": None}


def test_expand_grid():
    grid = expand_grid("mixture:alpha=0:1:11,form=geometric")
    assert [g[1] for g in grid] == [i / 10 for i in range(11)]
    assert grid[3] == ("mixture", 0.3, "mixture:alpha=0.3,form=geometric,temperature=1,sample=false")
    assert expand_grid("label_flip:eps=0.2") == [("label_flip", 0.2, "label_flip:eps=0.2")]
    assert [g[1] for g in expand_grid("group_weights:a=0:1:3,b=1")] == [0.0, 0.5, 1.0]
    with pytest.raises(UserError, match="at most one key"):
        expand_grid("mixture:alpha=0:1:3,temperature=1:2:2")


# --- label flips ---------------------------------------------------------------------------------


def test_label_flip_rate_and_swapped_columns():
    table = pairs(5000)
    out = flip_labels(table, eps=0.2, seed=1)
    flipped = np.array(out.column("flipped").to_pylist())
    assert binomial_ok(int(flipped.sum()), 5000, 0.2)
    t, o = table.to_pydict(), out.to_pydict()
    for i in range(5000):
        a, b = ("rejected", "chosen") if flipped[i] else ("chosen", "rejected")
        assert o["chosen"][i] == t[a][i] and o["rejected"][i] == t[b][i]
        assert o["chosen_input_ids"][i] == t[f"{a}_input_ids"][i]
        assert o["reward_a_chosen"][i] == t[f"reward_a_{a}"][i] and o["reward_b_rejected"][i] == t[f"reward_b_{b}"][i]
        assert o["group"][i] == t["group"][i]
    # flipping the flipped data again with the same seed restores it, and `flipped` XORs back to False
    back = flip_labels(out, eps=0.2, seed=1)
    assert back.column("chosen").equals(table.column("chosen")) and not any(back.column("flipped").to_pylist())


def test_determinism_by_seed_and_batch_independence():
    table = pairs(400)
    a, b = flip_labels(table, eps=0.5, seed=3), flip_labels(table, eps=0.5, seed=3)
    assert a.equals(b)
    assert not a.column("flipped").equals(flip_labels(table, eps=0.5, seed=4).column("flipped"))
    halves = pa.concat_tables([flip_labels(table.slice(0, 150), eps=0.5, seed=3),
                               flip_labels(table.slice(150), eps=0.5, seed=3)])
    assert halves.equals(a)
    u = row_uniforms(["x", "y"], 0, "t")
    assert np.all((0 <= u) & (u < 1)) and u[0] != u[1] and np.array_equal(u, row_uniforms(["x", "y"], 0, "t"))


# --- reward mixtures -----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["convex", "geometric"])
def test_mixture_relabelling_agrees_with_the_formula_row_by_row(form):
    table, alpha = pairs(500), 0.3
    out = relabel_by_mixture(table, alpha=alpha, form=form, r1="a", r2="b", temperature=1.0, sample=False, seed=0)
    t, o = table.to_pydict(), out.to_pydict()
    for i in range(500):
        def r(side):
            a, b = t[f"reward_a_{side}"][i], t[f"reward_b_{side}"][i]
            return alpha * a + (1 - alpha) * b if form == "convex" else a**alpha * b ** (1 - alpha)
        swap = r("rejected") > r("chosen")
        assert o["chosen"][i] == t["rejected" if swap else "chosen"][i]
        assert o["reward_a_chosen"][i] == t["reward_a_rejected" if swap else "reward_a_chosen"][i]
        got = (alpha * o["reward_a_chosen"][i] + (1 - alpha) * o["reward_b_chosen"][i] if form == "convex"
               else o["reward_a_chosen"][i] ** alpha * o["reward_b_chosen"][i] ** (1 - alpha))
        assert got >= r("rejected") and got >= r("chosen") - 1e-12
    assert not any(o["flipped"])  # deterministic labels never go against r(alpha)


def test_mixture_endpoints_and_bradley_terry_sampling():
    table = pairs(4000)
    at1 = relabel_by_mixture(table, alpha=1.0, form="convex", r1="a", r2="b", temperature=1, sample=False, seed=0)
    chosen, rejected = at1.column("reward_a_chosen").to_pylist(), at1.column("reward_a_rejected").to_pylist()
    assert all(c >= r for c, r in zip(chosen, rejected))  # alpha = 1: the chosen response wins under r1
    assert np.allclose(mixture_reward(np.array([4.0]), np.array([1.0]), 0.5, "geometric"), [2.0])
    # BT: P(swap) = sigmoid((rr - rc) / T); the empirical swap rate matches its mean within tolerance
    t, temp = table.to_pydict(), 0.5
    rc = np.array(t["reward_a_chosen"]) * 0.5 + np.array(t["reward_b_chosen"]) * 0.5
    rr = np.array(t["reward_a_rejected"]) * 0.5 + np.array(t["reward_b_rejected"]) * 0.5
    p_swap = 1 / (1 + np.exp(-(rr - rc) / temp))
    out = relabel_by_mixture(table, alpha=0.5, form="convex", r1="a", r2="b", temperature=temp, sample=True, seed=2)
    swapped = np.array(out.column("chosen_input_ids").to_pylist())[:, 1] < 0
    assert abs(swapped.mean() - p_swap.mean()) < 4 * math.sqrt((p_swap * (1 - p_swap)).sum()) / 4000
    assert out.column("flipped").to_pylist() == np.where(swapped, rc > rr, rr > rc).tolist()


def test_listwise_mixture_rescores():
    table = pa.table({"row_id": ["r0", "r1"], "prompt": ["w1", "w1"], "responses": [["w2", "w3"], ["w4", "w5", "w6"]],
                      "scores": [[0.0, 0.0], [0.0, 0.0, 0.0]],
                      "reward_a": [[1.0, 2.0], [3.0, 0.0, 1.0]], "reward_b": [[0.0, 4.0], [1.0, 1.0, 1.0]]})
    out = relabel_by_mixture(table, alpha=0.25, form="convex", r1="a", r2="b", temperature=1, sample=False, seed=0)
    # 0.25 r_a + 0.75 r_b per response
    assert out.column("scores").to_pylist() == [[0.25, 3.5], [1.5, 0.75, 1.0]]


# --- resampling ----------------------------------------------------------------------------------


def test_group_rates_closed_form():
    # q = (0.6, 0.4), p = (0.25, 0.75): p/q = (5/12, 15/8); thin divides by the max 15/8
    rates = group_rates({"a": 60, "b": 40, "c": 5}, {"a": 1, "b": 3}, "thin")
    assert rates == pytest.approx({"a": (5 / 12) / (15 / 8), "b": 1.0})
    assert group_rates({"a": 60, "b": 40}, {"a": 1, "b": 3}, "poisson") == pytest.approx({"a": 5 / 12, "b": 15 / 8})
    with pytest.raises(UserError, match="cannot reach a 0.5 share of 'z'"):
        group_rates({"a": 10}, {"a": 1, "z": 1}, "thin")


@pytest.mark.parametrize("sampling", ["thin", "poisson"])
def test_group_weights_hit_their_targets(sampling):
    table = pairs(6000, groups=("a", "b", "c"), probs=(0.6, 0.3, 0.1))
    counts = {g: table.column("group").to_pylist().count(g) for g in "abc"}
    rates = group_rates(counts, {"a": 1, "b": 1}, sampling)
    out = resample_by_key(table, column="group", rates=rates, key_map=None, sampling=sampling, seed=0, tag="g")
    kept = out.column("group").to_pylist()
    assert "c" not in kept and binomial_ok(kept.count("a"), len(kept), 0.5)
    ids = out.column("row_id").to_pylist()
    assert len(set(ids)) == len(ids)  # poisson copies are renamed <row_id>#k
    if sampling == "thin":
        assert len(kept) <= len(table)
    else:  # rates p_g / q_g keep the expected size at N (group c, weight 0, is dropped); Var = N
        assert abs(len(kept) - len(table)) < 4 * math.sqrt(len(table))


def test_source_mixture_target_share():
    table = pairs(6000)
    key_map = {"human": "target", "target": "target"}
    counts = {"target": 0, "other": 0}
    for s in table.column("source").to_pylist():
        counts["target" if s in key_map else "other"] += 1
    rates = group_rates(counts, {"target": 0.5, "other": 0.5}, "poisson")
    out = resample_by_key(table, column="source", rates=rates, key_map=key_map, sampling="poisson", seed=0, tag="s")
    share = np.mean([s in key_map for s in out.column("source").to_pylist()])
    # target rows are ~20% before, 50% after; with Poisson counts sd(share) ~ 0.5 sqrt(2N * 0.5) / N
    assert abs(share - 0.5) < 4 * 0.5 * math.sqrt(out.num_rows) / out.num_rows


def test_poisson_counts_match_the_distribution():
    u = np.random.default_rng(0).uniform(size=200_000)
    counts = sample_counts(np.full_like(u, 1.5), u, "poisson")
    assert abs(counts.mean() - 1.5) < 0.02 and abs(counts.var() - 1.5) < 0.03
    assert abs(np.mean(counts == 0) - math.exp(-1.5)) < 0.005


@pytest.mark.parametrize("direction", ["longer", "shorter"])
def test_length_shift_matches_the_exponential_tilt(direction):
    table = pairs(8000)
    lengths = response_lengths(table)
    tilt = length_tilt(lengths, direction=direction, strength=1.0, sampling="thin")
    w = np.exp(tilt["slope"] * (lengths - tilt["mean"]))
    expected_mean = float((lengths * w).sum() / w.sum())  # the tilted distribution's mean length
    out = resample_by_length(table, **tilt, sampling="thin", seed=0, tag="len")
    got = response_lengths(out).mean()
    assert (got > lengths.mean()) == (direction == "longer")
    assert abs(got - expected_mean) < 4 * lengths.std() / math.sqrt(out.num_rows)


# --- on a Ray Dataset ----------------------------------------------------------------------------


@pytest.mark.ray
def test_apply_shifts_on_ray_equals_the_pure_functions(ray_session):
    import ray

    table = pairs(600)
    ds = ray.data.from_arrow(table).repartition(4)
    out = apply_shifts(ds, ["group_weights:a=1,b=1,sampling=poisson", "label_flip:eps=0.2"], seed=5)
    got = pa.concat_tables(ray.get(out.to_arrow_refs())).sort_by("row_id")
    counts = {g: table.column("group").to_pylist().count(g) for g in "ab"}
    rates = group_rates(counts, {"a": 1, "b": 1}, "poisson")
    want = resample_by_key(table, column="group", rates=rates, key_map=None, sampling="poisson", seed=5,
                           tag="0:group_weights")
    want = flip_labels(want, eps=0.2, seed=5, tag="1:label_flip").sort_by("row_id")
    assert got.equals(want)
    with pytest.raises(UserError, match="needs reward columns for r1/r2; the data has rewards: a, b"):
        apply_shifts(ds, ["mixture:alpha=0.5,r1=a,r2=zz"])
    with pytest.raises(UserError, match="form=geometric needs positive rewards"):
        apply_shifts(ray.data.from_arrow(table.set_column(8, "reward_a_chosen", pa.array([-1.0] * 600))),
                     ["mixture:alpha=0.5,form=geometric"])


def test_default_mixture_rewards():
    from pipelines.data.shifts import default_mixture_rewards

    assert default_mixture_rewards(["length", "r1", "r2", "r3", "verbosity"]) == ("r1", "r2")  # the world's names
    assert default_mixture_rewards(["safety", "help"]) == ("help", "safety")
    assert default_mixture_rewards(["only"]) == ("only", None)


def test_row_uniforms_do_not_depend_on_where_the_data_lives():
    from pipelines.data.shifts import row_uniforms

    here = row_uniforms(["/a/run1/world/data/train.parquet:row 3", "x/eval.parquet:row 0#2"], seed=1, tag="t")
    there = row_uniforms(["/elsewhere/train.parquet:row 3", "eval.parquet:row 0#2"], seed=1, tag="t")
    assert here.tolist() == there.tolist()
    other_row = row_uniforms(["/elsewhere/train.parquet:row 4"], seed=1, tag="t")
    assert other_row[0] != here[0]


@pytest.mark.ray
def test_counting_passes_are_ray_aggregates_with_the_old_results(ray_session):
    """count_keys counts a null key as "" (and maps sources through TARGET_SOURCES); min_value
    flattens list columns, skips nulls, and is inf on no rows."""
    import ray

    from pipelines.data.shifts import count_keys, min_value

    table = pa.table({"group": ["a", None, "b", "a", None, "a"], "source": ["human", "x", "target", "y", "x", "z"],
                      "r": [1.5, None, 0.25, 2.0, 3.0, 1.0], "l": [[2.0, -1.0], [], [0.5], [None], [4.0], [1.0]]})
    ds = ray.data.from_arrow([table.slice(0, 2), table.slice(2, 3), table.slice(5)])
    assert count_keys(ds, "group", None) == {"a": 3, "": 2, "b": 1}
    assert count_keys(ds, "source", {"target": "target", "human": "target"}) == {"target": 2, "other": 4}
    assert min_value(ds, ["r"]) == 0.25 and min_value(ds, ["r", "l"]) == -1.0
    assert min_value(ds.filter(lambda r: False), ["r", "l"]) == float("inf")
