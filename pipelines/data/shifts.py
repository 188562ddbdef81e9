"""Simulated preference shifts: seeded, composable Ray Data transforms, each parsed from a spec string.

    mixture:alpha=A[,form=convex|geometric][,r1=NAME,r2=NAME][,temperature=T][,sample=true|false]
        (default r1/r2: rewards named r1 and r2, else the first two reward names in sorted order)
    group_weights:G1=w1,G2=w2[,sampling=thin|poisson]
    label_flip:eps=E
    source_mixture:target=A[,sampling=thin|poisson]   (recomputes DoRA's `calibration` from p_target_*)
    length:direction=longer|shorter[,strength=S][,sampling=thin|poisson]
    (every spec also takes seed=N; grid form for evaluation: mixture:alpha=0:1:11 -> 11 specs)

`robust-dpo data --shift SPEC` (repeatable) applies them in order; `expand_grid` builds the
evaluation grid.  Each transform is a pure function of a pyarrow batch (the `map_batches` batch
format, so list columns keep their types) plus a seed.  Randomness is per row: a row's uniform is a
hash of (seed, shift position, row_id), so the result does not depend on batching or worker count,
and the same seed gives the same rows.

Resampling shifts (group_weights, source_mixture, length) first count the data once (group counts
or lengths, a small pass), then keep each row with a per-row rate in `map_batches`:
`sampling=thin` (default) keeps a row with probability rate <= 1 (Bernoulli, no duplicates; the
dataset shrinks), `sampling=poisson` keeps Poisson(rate) copies (expected size unchanged;
copies get row_id `<row_id>#<k>`).  Target proportions then hold in expectation, within binomial
(thin) or Poisson (poisson) tolerance.
"""

from __future__ import annotations

import hashlib
import os
import math
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import numpy as np

from pipelines import config as config_lib
from pipelines.errors import UserError
from pipelines.schema import P_TARGET_LIST, P_TARGET_PAIR

TARGET_SOURCES = ("target", "human")  # source_mixture: these sources are "target", all others "other"
SAMPLING = ("thin", "poisson")
RESERVED_KEYS = ("seed", "sampling")  # group_weights: every other key is a group name

# name -> {key: (type, default)}; a default of `...` means required.
SHIFT_KEYS: dict[str, dict[str, tuple[Any, Any]]] = {
    "mixture": {"alpha": (float, ...), "form": (("convex", "geometric"), "convex"), "r1": (str, None),
                "r2": (str, None), "temperature": (float, 1.0), "sample": (bool, False), "seed": (int, None)},
    "group_weights": {"sampling": (SAMPLING, "thin"), "seed": (int, None)},  # + GROUP=weight keys
    "label_flip": {"eps": (float, ...), "seed": (int, None)},
    "source_mixture": {"target": (float, ...), "sampling": (SAMPLING, "thin"), "seed": (int, None)},
    "length": {"direction": (("longer", "shorter"), ...), "strength": (float, 1.0),
               "sampling": (SAMPLING, "thin"), "seed": (int, None)},
}
LEVEL_KEY = {"mixture": "alpha", "label_flip": "eps", "source_mixture": "target", "length": "strength"}
RANGES = {"mixture": {"alpha": "[0, 1]", "temperature": "> 0"}, "label_flip": {"eps": "[0, 1]"},
          "source_mixture": {"target": "[0, 1]"}, "length": {"strength": ">= 0"}}  # config_lib.check rules


@dataclass(frozen=True)
class ShiftSpec:
    """One parsed shift: `name`, typed `params` (defaults filled in) and the canonical `text`."""

    name: str
    params: dict[str, Any] = field(hash=False)
    text: str = ""


# --- specs ---------------------------------------------------------------------------------------


def parse_shift(spec: str | ShiftSpec) -> ShiftSpec:
    """Parse `name:key=value,...` into a ShiftSpec; a UserError naming the spec and the valid keys."""
    if isinstance(spec, ShiftSpec):
        return spec
    name, pairs = _split_spec(spec)
    keys = SHIFT_KEYS[name]
    params: dict[str, Any] = {}
    for key, raw in pairs:
        if _is_grid(raw):
            raise UserError(f"shift '{spec}': grid value '{key}={raw}' is only valid in an evaluation grid")
        if key in keys:
            params[key] = _convert(spec, key, raw, keys[key][0])
        elif name == "group_weights":
            params[key] = _convert(spec, key, raw, float)
        else:
            raise UserError(f"shift '{spec}': unknown key '{key}'; valid keys for {name}: {', '.join(keys)}")
    for key, (_, default) in keys.items():
        if key not in params:
            if default is ...:
                raise UserError(f"shift '{spec}': key '{key}' is required; valid keys for {name}: {', '.join(keys)}")
            params[key] = default
    _check_ranges(spec, name, params)
    order = [k for k in params if k not in keys] + list(keys)  # canonical: groups, then the declared keys
    params = {k: params[k] for k in order}
    text = f"{name}:" + ",".join(f"{k}={_fmt(v)}" for k, v in params.items() if v is not None)
    return ShiftSpec(name, params, text)


def expand_grid(spec: str) -> list[tuple[str, float | None, str]]:
    """[(shift_name, level, spec_text)] for one grid key `key=start:stop:num` (inclusive linspace):
    `mixture:alpha=0:1:3` -> [("mixture", 0.0, "mixture:alpha=0,..."), ("mixture", 0.5, ...), ...].
    A spec without a grid gives one entry, level = its main parameter (alpha, eps, target, strength) or None.
    """
    name, pairs = _split_spec(spec)
    grid = [(i, k, v) for i, (k, v) in enumerate(pairs) if _is_grid(v)]
    if len(grid) > 1:
        raise UserError(f"shift grid '{spec}': at most one key may be a grid start:stop:num")
    if not grid:
        parsed = parse_shift(spec)
        level = parsed.params.get(LEVEL_KEY.get(name, ""))
        return [(name, float(level) if isinstance(level, (int, float)) else None, parsed.text)]
    index, key, raw = grid[0]
    start, stop, num = raw.split(":")
    try:
        values = np.linspace(float(start), float(stop), int(num))
    except ValueError:
        raise UserError(f"shift grid '{spec}': '{key}={raw}' must be start:stop:num with numbers") from None
    out = []
    for value in values:
        value = round(float(value), 12)
        items = [(k, _fmt(value) if i == index else v) for i, (k, v) in enumerate(pairs)]
        parsed = parse_shift(f"{name}:" + ",".join(f"{k}={v}" for k, v in items))
        out.append((name, value, parsed.text))
    return out


def _split_spec(spec: str) -> tuple[str, list[tuple[str, str]]]:
    name, _, rest = spec.strip().partition(":")
    if name not in SHIFT_KEYS:
        raise UserError(f"shift '{spec}': unknown shift '{name}'; valid shifts: {', '.join(SHIFT_KEYS)}")
    pairs = []
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            valid = ", ".join(SHIFT_KEYS[name]) if name != "group_weights" else "GROUP=weight, sampling, seed"
            raise UserError(f"shift '{spec}': '{item}' is not key=value; valid keys for {name}: {valid}")
        pairs.append((key.strip(), value.strip()))
    return name, pairs


def _is_grid(raw: str) -> bool:
    return raw.count(":") == 2


def _convert(spec: str, key: str, raw: str, tp: Any) -> Any:
    if isinstance(tp, tuple):
        if raw not in tp:
            raise UserError(f"shift '{spec}': {key} must be one of {', '.join(tp)}, got '{raw}'")
        return raw
    if tp is bool:
        if raw.lower() not in ("true", "false", "1", "0"):
            raise UserError(f"shift '{spec}': {key} must be true or false, got '{raw}'")
        return raw.lower() in ("true", "1")
    try:
        value = tp(raw)
    except ValueError:
        kind = "an integer" if tp is int else "a number"
        raise UserError(f"shift '{spec}': {key} must be {kind}, got '{raw}'") from None
    if tp is float and not math.isfinite(value):
        raise UserError(f"shift '{spec}': {key} must be finite, got '{raw}'")
    return value


def _check_ranges(spec: str, name: str, p: dict[str, Any]) -> None:
    try:
        for key, rule in RANGES.get(name, {}).items():
            config_lib.check(SimpleNamespace(**{key: p[key]}), rule, key)
    except config_lib.FieldError as exc:  # e.g. "eps must be in [0, 1], got 1.5"
        raise UserError(f"shift '{spec}': {exc}") from None
    if name == "mixture" and (p["r1"] is None) != (p["r2"] is None):
        raise UserError(f"shift '{spec}': give both r1 and r2, or neither")
    if name == "group_weights":
        weights = group_targets(p)
        if not weights:
            raise UserError(f"shift '{spec}': name at least one group, e.g. group_weights:a=0.7,b=0.3")
        if not (all(w >= 0 for w in weights.values()) and sum(weights.values()) > 0):
            raise UserError(f"shift '{spec}': group weights must be >= 0 with a positive sum")


def group_targets(params: Mapping[str, Any]) -> dict[str, float]:
    """The GROUP=weight entries of group_weights params, as given (not yet normalised)."""
    return {k: v for k, v in params.items() if k not in RESERVED_KEYS}


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value).removesuffix(".0") if value.is_integer() else repr(value)
    return str(value)


# --- pure per-batch transforms (pyarrow.Table -> pyarrow.Table) ---------------------------------


def row_uniforms(row_ids: Sequence[str], seed: int, tag: str) -> np.ndarray:
    """(B,) uniforms in [0, 1), one per row, from blake2b(seed, tag, row_id): batching-independent.

    Only the file *name* part of the row_id is hashed ("/any/dir/train.parquet:row 5" ->
    "train.parquet:row 5"), so the same data and seed give the same shift wherever the data lives.
    """
    out = np.empty(len(row_ids), dtype=np.float64)
    prefix = f"{seed}\0{tag}\0".encode()
    for i, rid in enumerate(row_ids):
        digest = hashlib.blake2b(prefix + os.path.basename(str(rid)).encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "little") / 2.0**64
    return out


def swap_pairs(table, mask: np.ndarray):
    """Swap every `*chosen*` column with its `*rejected*` partner where `mask` (B,) is True."""
    import pyarrow as pa
    import pyarrow.compute as pc

    mask_arr = pa.array(np.asarray(mask, dtype=bool))
    columns = {name: table.column(name) for name in table.column_names}
    for name in table.column_names:
        partner = name.replace("chosen", "rejected")
        if "chosen" in name and partner in columns:
            c, r = table.column(name), table.column(partner)
            columns[name], columns[partner] = pc.if_else(mask_arr, r, c), pc.if_else(mask_arr, c, r)
    return pa.table(columns, schema=table.schema)


def flip_labels(table, *, eps: float, seed: int, tag: str = "label_flip"):
    """Swap chosen/rejected with probability eps per row (symmetric label noise, as rDPO assumes).
    `flipped` becomes (previous flipped, null: False) XOR (flipped now): whether the label disagrees
    with the source's."""
    import pyarrow as pa
    import pyarrow.compute as pc

    flip = row_uniforms(table.column("row_id").to_pylist(), seed, tag) < eps
    table = swap_pairs(table, flip)
    if "flipped" in table.column_names:
        flip ^= pc.fill_null(table.column("flipped").cast(pa.bool_()), False).to_numpy(zero_copy_only=False)
        table = table.drop_columns(["flipped"])
    return table.append_column("flipped", pa.array(flip))


def mixture_reward(r1: np.ndarray, r2: np.ndarray, alpha: float, form: str) -> np.ndarray:
    """r(alpha) = alpha r1 + (1 - alpha) r2 (convex) or r1^alpha r2^(1 - alpha) (geometric, r > 0)."""
    if form == "convex":
        return alpha * r1 + (1.0 - alpha) * r2
    if np.any(r1 <= 0) or np.any(r2 <= 0):
        raise UserError("mixture form=geometric needs positive rewards; use form=convex")
    return np.exp(alpha * np.log(r1) + (1.0 - alpha) * np.log(r2))


def relabel_by_mixture(table, *, alpha: float, form: str, r1: str, r2: str, temperature: float,
                       sample: bool, seed: int, tag: str = "mixture"):
    """Relabel by the mixture reward of rewards `r1`, `r2` (the WDPO paper's alpha-mixture).

    Pairs: with rc, rr the mixture rewards of chosen and rejected, deterministic mode swaps the pair
    when rr > rc (ties keep the label); `sample=true` draws the label from Bradley-Terry,
    P(chosen stays preferred) = sigmoid((rc - rr) / temperature).  `flipped` becomes "the label goes
    against r(alpha)'s order".  Listwise rows: `scores` become each response's mixture reward.
    """
    import pyarrow as pa

    if "responses" in table.column_names:
        flat = {n: _flat(table.column(f"reward_{n}")) for n in (r1, r2)}
        values = mixture_reward(flat[r1][1], flat[r2][1], alpha, form)
        scores = pa.ListArray.from_arrays(flat[r1][0], pa.array(values, type=pa.float64()))
        return table.set_column(table.column_names.index("scores"), "scores", scores)
    col = lambda name: np.asarray(table.column(name).to_pylist(), dtype=np.float64)  # noqa: E731
    rc = mixture_reward(col(f"reward_{r1}_chosen"), col(f"reward_{r2}_chosen"), alpha, form)
    rr = mixture_reward(col(f"reward_{r1}_rejected"), col(f"reward_{r2}_rejected"), alpha, form)
    if sample:
        keep = 1.0 / (1.0 + np.exp(-(rc - rr) / temperature))
        swap = row_uniforms(table.column("row_id").to_pylist(), seed, tag) >= keep
    else:
        swap = rr > rc
    table = swap_pairs(table, swap)
    against = np.where(swap, rc > rr, rr > rc)  # never when deterministic; the Bradley-Terry draws that did
    if "flipped" in table.column_names:
        table = table.drop_columns(["flipped"])
    return table.append_column("flipped", pa.array(against))


def default_mixture_rewards(names: Sequence[str]) -> tuple[str | None, str | None]:
    """r1/r2 when the spec names none: rewards called "r1" and "r2" if present (the embedded world's
    and the WDPO paper's names), else the first two reward names in sorted order."""
    if "r1" in names and "r2" in names:
        return "r1", "r2"
    first = sorted(names) + [None, None]
    return first[0], first[1]


def _flat(column):
    arr = column.combine_chunks()
    return arr.offsets, np.asarray(arr.flatten().to_pylist(), dtype=np.float64)


def sample_counts(rates: np.ndarray, uniforms: np.ndarray, sampling: str) -> np.ndarray:
    """Copies per row: Bernoulli(rate) for thin, Poisson(rate) by inverse CDF for poisson."""
    if sampling == "thin":
        return (uniforms < rates).astype(np.int64)
    counts = np.zeros(len(rates), dtype=np.int64)
    pmf = np.exp(-rates)
    cdf = pmf.copy()
    active = uniforms >= cdf
    k = 0
    while active.any() and k < 1000:
        k += 1
        counts[active] += 1
        pmf = pmf * rates / k
        cdf = cdf + pmf
        active = active & (uniforms >= cdf)
    return counts


def resample_rows(table, rates: np.ndarray, *, sampling: str, seed: int, tag: str):
    """Keep each row `sample_counts` times; copies after the first get row_id `<row_id>#<k>`."""
    import pyarrow as pa

    row_ids = table.column("row_id").to_pylist()
    counts = sample_counts(np.asarray(rates, dtype=np.float64), row_uniforms(row_ids, seed, tag), sampling)
    index = np.repeat(np.arange(len(row_ids)), counts)
    out = table.take(pa.array(index, type=pa.int64()))
    if sampling == "poisson" and len(index):
        copy = np.arange(len(index)) - np.repeat(np.cumsum(counts) - counts, counts)
        ids = [rid if k == 0 else f"{rid}#{k}" for rid, k in zip(out.column("row_id").to_pylist(), copy)]
        out = out.set_column(out.column_names.index("row_id"), "row_id", pa.array(ids, type=pa.string()))
    return out


def group_rates(counts: Mapping[str, int], targets: Mapping[str, float], sampling: str) -> dict[str, float]:
    """Per-group keep rates that turn proportions q_g = n_g / N into targets p_g = w_g / sum(w).

    poisson: rate_g = p_g / q_g, so the expected count of g is N p_g and the expected size is N.
    thin: rate_g = (p_g / q_g) / max_h (p_h / q_h) <= 1; kept counts are N q_g rate_g, proportional
    to p_g.  Groups not in `targets` get rate 0 (dropped).
    """
    total = sum(counts.values())
    weight_sum = sum(targets.values())
    ratio = {}
    for group, weight in targets.items():
        if weight > 0 and counts.get(group, 0) == 0:
            raise UserError(f"cannot reach a {weight / weight_sum:.3g} share of '{group}': the data has no "
                            f"such rows (found: {', '.join(sorted(map(str, counts))) or 'none'})")
        if counts.get(group, 0):
            ratio[group] = (weight / weight_sum) / (counts[group] / total)
    top = max(ratio.values())
    return {g: (r / top if sampling == "thin" else r) for g, r in ratio.items()}


def resample_by_key(table, *, column: str, rates: Mapping[str, float], key_map: Mapping[str, str] | None,
                    sampling: str, seed: int, tag: str):
    """resample_rows with rate `rates[key]` per row, key = the column value (mapped through key_map)."""
    row_rates = np.array([rates.get(_key(v, key_map), 0.0) for v in table.column(column).to_pylist()])
    return resample_rows(table, row_rates, sampling=sampling, seed=seed, tag=tag)


P_CLIP = 1e-6  # DoRA gotcha 3 (OBJECTIVES.md 6.5): clip p before (1 - p) / p


def dora_calibration(p_target, target_fraction: float) -> np.ndarray:
    """DoRA's h~ = 1 / (alpha + (1 - alpha) (1 - p) / p) for P(target | response) = p and the target
    source's share alpha of the data (OBJECTIVES.md 6.2, the official code's formula); in [0, 1/alpha]."""
    alpha = float(target_fraction)
    p = np.clip(np.asarray(p_target, dtype=float), P_CLIP, 1.0 - P_CLIP)
    return 1.0 / (alpha + (1.0 - alpha) * (1.0 - p) / p)


def resample_sources(table, *, target: float, recalibrate: bool, **kwargs):
    """source_mixture: resample rows by source (`resample_by_key`); with P(target | response) columns,
    recompute `calibration` for the new mix (h~ at alpha = target; a pair's value is the mean of its
    responses', a list keeps one per response), since the classifier's h~ depends on the mix."""
    import pyarrow as pa

    table = resample_by_key(table, **kwargs)
    if not recalibrate:
        return table
    if P_TARGET_LIST in table.column_names:  # listwise: one value per response
        lists = table.column(P_TARGET_LIST).to_pylist()
        column = pa.array([list(dora_calibration(v, target)) for v in lists], type=pa.list_(pa.float64()))
    else:
        chosen = dora_calibration(table.column(P_TARGET_PAIR[0]).to_numpy(zero_copy_only=False), target)
        rejected = dora_calibration(table.column(P_TARGET_PAIR[1]).to_numpy(zero_copy_only=False), target)
        column = pa.array(0.5 * (chosen + rejected), type=pa.float64())
    if "calibration" in table.column_names:
        return table.set_column(table.column_names.index("calibration"), "calibration", column)
    return table.append_column("calibration", column)


def _key(value: Any, key_map: Mapping[str, str] | None) -> str:
    if key_map is None:
        return "" if value is None else str(value)
    return "target" if value in TARGET_SOURCES else "other"


def response_lengths(table) -> np.ndarray:
    """(B,) whitespace word count of the chosen response (listwise: of the highest-scored one)."""
    if "responses" in table.column_names:
        best = [r[int(np.argmax(s))] for r, s in zip(table.column("responses").to_pylist(),
                                                     table.column("scores").to_pylist())]
    else:
        best = table.column("chosen").to_pylist()
    return np.array([len(t.split()) for t in best], dtype=np.float64)


def length_tilt(lengths: np.ndarray, *, direction: str, strength: float, sampling: str) -> dict[str, float]:
    """Constants of the exponential tilt w = exp(sign * strength * z), z = (len - mean) / std.

    For roughly normal lengths the tilted mean length moves by `strength` standard deviations
    (longer: up, shorter: down).  thin divides w by its maximum, poisson by its mean (size kept).
    """
    mean, std = (float(lengths.mean()), float(lengths.std())) if len(lengths) else (0.0, 0.0)
    slope = (strength if direction == "longer" else -strength) / (std if std > 0 else 1.0)
    w = np.exp(slope * (lengths - mean)) if len(lengths) else np.ones(1)
    return {"mean": mean, "slope": slope, "norm": float(w.max() if sampling == "thin" else w.mean())}


def resample_by_length(table, *, mean: float, slope: float, norm: float, sampling: str, seed: int, tag: str):
    rates = np.exp(slope * (response_lengths(table) - mean)) / norm
    return resample_rows(table, rates, sampling=sampling, seed=seed, tag=tag)


# --- on a Ray Dataset ----------------------------------------------------------------------------


def apply_shifts(ds, specs: Sequence[str | ShiftSpec], *, seed: int = 0):
    """Apply shift specs in order to a Ray Dataset of schema rows (pipelines/schema.py).

    Each shift is a `map_batches` over pyarrow batches; resampling shifts first run one small
    counting pass.  The i-th shift's randomness is keyed by (seed or its own seed=, i, name).
    """
    for position, spec in enumerate(map(parse_shift, specs)):
        own_seed = spec.params.get("seed")
        fn, kwargs = _plan(ds, spec, seed if own_seed is None else own_seed, f"{position}:{spec.name}")
        ds = ds.map_batches(fn, batch_format="pyarrow", fn_kwargs=kwargs)
    return ds


def _plan(ds, spec: ShiftSpec, seed: int, tag: str):
    """The shift's per-batch transform and its kwargs, after any counting pass it needs."""
    p, names = spec.params, ds.schema().names
    listwise = "responses" in names
    if spec.name == "label_flip":
        if listwise:
            raise UserError(f"shift '{spec.text}': label_flip needs pair rows (chosen/rejected), not listwise")
        return flip_labels, {"eps": p["eps"], "seed": seed, "tag": tag}
    if spec.name == "mixture":
        suffix = "" if listwise else "_chosen"
        rewards = sorted(n[len("reward_"): len(n) - len(suffix)] for n in names
                         if n.startswith("reward_") and n.endswith(suffix))
        r1, r2 = (p["r1"], p["r2"]) if p["r1"] is not None else default_mixture_rewards(rewards)
        if r1 is None or r2 is None or r1 not in rewards or r2 not in rewards:
            raise UserError(f"shift '{spec.text}': needs reward columns for r1/r2; the data has rewards: "
                            f"{', '.join(rewards) or 'none'}")
        if listwise and p["sample"]:
            raise UserError(f"shift '{spec.text}': sample=true (Bradley-Terry) is for pair rows only")
        if p["form"] == "geometric":  # checked here: an error inside a Ray worker reaches users as a traceback
            columns = [f"reward_{r}{s}" for r in (r1, r2) for s in (("",) if listwise else ("_chosen", "_rejected"))]
            low = min_value(ds, columns)
            if low <= 0:
                raise UserError(f"shift '{spec.text}': form=geometric needs positive rewards, found {low!r}; "
                                "use form=convex")
        return relabel_by_mixture, {"alpha": p["alpha"], "form": p["form"], "r1": r1, "r2": r2,
                                    "temperature": p["temperature"], "sample": p["sample"], "seed": seed, "tag": tag}
    common = {"sampling": p["sampling"], "seed": seed, "tag": tag}
    if spec.name == "length":
        lengths = np.concatenate([b["n"] for b in ds.map_batches(
            lambda t: {"n": response_lengths(t)}, batch_format="pyarrow").iter_batches(batch_format="numpy")] or [[]])
        tilt = length_tilt(np.asarray(lengths, dtype=np.float64), direction=p["direction"],
                           strength=p["strength"], sampling=p["sampling"])
        return resample_by_length, {**tilt, **common}
    column = "group" if spec.name == "group_weights" else "source"
    if column not in names:
        raise UserError(f"shift '{spec.text}': the data has no '{column}' column")
    key_map = None if spec.name == "group_weights" else dict.fromkeys(TARGET_SOURCES, "target")
    counts = count_keys(ds, column, key_map)
    targets = group_targets(p) if spec.name == "group_weights" else {"target": p["target"], "other": 1 - p["target"]}
    rates = group_rates(counts, targets, p["sampling"])
    if spec.name == "source_mixture":
        recalibrate = P_TARGET_LIST in names or set(P_TARGET_PAIR) <= set(names)
        return resample_sources, {"column": column, "rates": rates, "key_map": key_map, "target": p["target"],
                                  "recalibrate": recalibrate, **common}
    return resample_by_key, {"column": column, "rates": rates, "key_map": key_map, **common}


def count_keys(ds, column: str, key_map: Mapping[str, str] | None) -> dict[str, int]:
    """Rows per key of `column` over the whole dataset (Ray Data's ValueCounter, then `_key`)."""
    from ray.data.aggregate import ValueCounter

    found = (ds.aggregate(ValueCounter(on=column, alias_name="counts")) or {}).get("counts") or {
        "values": [], "counts": []}  # aggregate gives None for a dataset with no rows
    counts = Counter()
    for value, n in zip(found["values"], found["counts"]):  # null is a value here (key "")
        counts[_key(value, key_map)] += int(n)
    return dict(counts)


def min_value(ds, columns: list[str]) -> float:
    """The smallest non-null value over numeric (or list-of-numeric) `columns` (inf when none):
    every value as one row of a `value` column, then Ray Data's Dataset.min."""
    values = ds.select_columns(columns).map_batches(_values, batch_format="pyarrow", fn_kwargs={"columns": columns})
    low = values.min("value")
    return math.inf if low is None else low


def _values(table, *, columns: list[str]):
    """The values of `columns` (list columns flattened) as one float64 column `value`."""
    import pyarrow as pa
    import pyarrow.types as pat

    parts = [table.column(name).combine_chunks() for name in columns]
    return pa.table({"value": pa.concat_arrays([(c.flatten() if pat.is_list(c.type) else c).cast(pa.float64())
                                                for c in parts])})
