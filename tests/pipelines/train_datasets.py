"""Small tokenised datasets written in the data-stage contract (helpers for the train tests).

A plain module, not conftest.py: spawned worker processes import it by name, and `conftest`
would resolve to tests/conftest.py there.

The datasets are built directly (manifest via schema.write_manifest + parquet split folders), so
train/reference tests do not depend on the data stage; token ids are drawn from the tiny model's
word range (ids 4..43 = w0..w39; 3 = <eos> ends every response, as the contract says).
"""

from __future__ import annotations

from pathlib import Path

EOS = 3
FIRST_WORD, LAST_WORD = 4, 43


def _ids(rng, low: int, high: int, eos: bool = False) -> list[int]:
    ids = [int(t) for t in rng.integers(FIRST_WORD, LAST_WORD + 1, size=int(rng.integers(low, high + 1)))]
    return ids + [EOS] if eos else ids


def make_pair_columns(rows: int, seed: int = 0, calibration: bool = True) -> dict[str, list]:
    """Columns of `rows` synthetic pairs: prompts of 2..6 words, responses of 1..5 words + <eos>."""
    import numpy as np

    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {c: [] for c in ("prompt", "chosen", "rejected", "row_id", "prompt_input_ids",
                                                  "chosen_input_ids", "rejected_input_ids")}
    for i in range(rows):
        prompt, chosen, rejected = _ids(rng, 2, 6), _ids(rng, 1, 5, True), _ids(rng, 1, 5, True)
        columns["prompt_input_ids"].append(prompt)
        columns["chosen_input_ids"].append(chosen)
        columns["rejected_input_ids"].append(rejected)
        columns["prompt"].append(" ".join(f"w{t - FIRST_WORD}" for t in prompt))
        columns["chosen"].append(" ".join(f"w{t - FIRST_WORD}" for t in chosen[:-1]))
        columns["rejected"].append(" ".join(f"w{t - FIRST_WORD}" for t in rejected[:-1]))
        columns["row_id"].append(f"synthetic.jsonl:row {i}")
    if calibration:
        columns["calibration"] = [float(x) for x in rng.uniform(0.2, 2.0, size=rows)]
    return columns


def make_list_columns(rows: int, k: int = 3, seed: int = 0) -> dict[str, list]:
    """Columns of `rows` synthetic lists of K responses with distinct scores and calibrations."""
    import numpy as np

    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {c: [] for c in ("prompt", "responses", "scores", "calibration", "row_id",
                                                  "prompt_input_ids", "responses_input_ids")}
    for i in range(rows):
        prompt = _ids(rng, 2, 5)
        responses = [_ids(rng, 1, 4, True) for _ in range(k)]
        columns["prompt_input_ids"].append(prompt)
        columns["responses_input_ids"].append(responses)
        columns["prompt"].append(" ".join(f"w{t - FIRST_WORD}" for t in prompt))
        columns["responses"].append([" ".join(f"w{t - FIRST_WORD}" for t in r[:-1]) for r in responses])
        columns["scores"].append([float(s) for s in rng.permutation(k)])
        columns["calibration"].append([float(c) for c in rng.uniform(0.2, 2.0, size=k)])
        columns["row_id"].append(f"lists.jsonl:row {i}")
    return columns


def _write_splits(directory: Path, tables: dict, fmt: str, fingerprint: str) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import schema

    for split, columns in tables.items():
        table = pa.table(columns)
        (directory / split).mkdir(parents=True, exist_ok=True)
        half = table.num_rows // 2  # two files per split, so readers see more than one block
        pq.write_table(table.slice(0, half), directory / split / "part-00000.parquet")
        pq.write_table(table.slice(half), directory / split / "part-00001.parquet")
    splits = {split: len(columns["row_id"]) for split, columns in tables.items()}
    schema.write_manifest(directory, format=fmt, tokenizer="tiny", max_length=64, splits=splits,
                          fingerprint=fingerprint)
    return directory


def write_pairs_dataset(directory: Path, splits: dict[str, int], seed: int = 0, calibration: bool = True) -> Path:
    """A 'pairs' dataset in the data-stage contract: {split: rows}."""
    tables = {s: make_pair_columns(n, seed + i, calibration) for i, (s, n) in enumerate(sorted(splits.items()))}
    return _write_splits(directory, tables, "pairs", f"pairs-{seed}-{sorted(splits.items())}")


def write_listwise_dataset(directory: Path, splits: dict[str, int], k: int = 3, seed: int = 0) -> Path:
    """A 'listwise' dataset in the data-stage contract: K responses per prompt."""
    tables = {s: make_list_columns(n, k, seed + i) for i, (s, n) in enumerate(sorted(splits.items()))}
    return _write_splits(directory, tables, "listwise", f"lists-{seed}-{sorted(splits.items())}")
