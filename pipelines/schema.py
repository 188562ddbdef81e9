"""The on-disk contract between stages: raw preference columns, tokenised columns, the manifest.

`robust-dpo data --output DIR` writes a *tokenised dataset*:

    DIR/manifest.json          kind/version, format, tokenizer, max_length, splits, fingerprint
    DIR/data_stats.json        rows_in, rows_out, rows_rejected, rows_truncated (+ per reason)
    DIR/<split>/*.parquet      one folder per split ("train", "eval", ...)

Pair rows (format "pairs") carry the text columns `prompt`, `chosen`, `rejected`, the token columns
`prompt_input_ids`, `chosen_input_ids`, `rejected_input_ids` (responses end with EOS), `row_id`
("<file>:row <index>" provenance), and optional pass-through columns:
    group (str), source (str), weight (float), calibration (float: DoRA's h~ from a source classifier),
    calibration_oracle (float: h~ from the exact source densities, where the data knows them),
    p_target_chosen / p_target_rejected (float in [0, 1]: P(target source | response), from which a
    source_mixture shift recomputes `calibration` for the new mix),
    reward_<name>_chosen / reward_<name>_rejected (float: a known reward's score of each response),
    flipped (bool: set by the label_flip shift).
Listwise rows (format "listwise") carry `prompt`, `responses` (list[str]), `scores` (list[float]),
`prompt_input_ids`, `responses_input_ids` (list[list[int]]), and optionally `calibration`, `calibration_oracle`,
`p_target` (list[float], one per response), `group`, `source`, `weight`, `reward_<name>` (list[float]).
The reference stage adds `reference_chosen_logps` / `reference_rejected_logps` (float), or
`reference_logps` (list[float]) for listwise rows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipelines.errors import UserError
from pipelines.paths import write_text_atomic

MANIFEST_FILE = "manifest.json"
STATS_FILE = "data_stats.json"
DATASET_KIND = "robust-dpo-dataset"
DATASET_VERSION = 1

PAIR_TEXT_COLUMNS = ("prompt", "chosen", "rejected")
PAIR_TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
LIST_TEXT_COLUMNS = ("prompt", "responses", "scores")
LIST_TOKEN_COLUMNS = ("prompt_input_ids", "responses_input_ids")
CALIBRATION_COLUMNS = ("calibration", "calibration_oracle")  # DoRA's h~ (objective.calibration picks one)
P_TARGET_PAIR = ("p_target_chosen", "p_target_rejected")  # P(target source | response), pair rows
P_TARGET_LIST = "p_target"  # the same, one per response, listwise rows
REFERENCE_PAIR_COLUMNS = ("reference_chosen_logps", "reference_rejected_logps")
REFERENCE_LIST_COLUMN = "reference_logps"


def write_manifest(directory: str | Path, *, format: str, tokenizer: str, max_length: int, splits: Any,
                   **fields: Any) -> Path:
    """Write DIR/manifest.json: kind, version, the required keys and any other `fields`."""
    path = Path(directory) / MANIFEST_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    body = dict(kind=DATASET_KIND, version=DATASET_VERSION, format=format, tokenizer=tokenizer,
                max_length=max_length, splits=splits, **fields)
    write_text_atomic(path, json.dumps(body, indent=2, sort_keys=True))
    return path


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and check DIR/manifest.json; a UserError if DIR is not a dataset from `robust-dpo data`."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.exists():
        raise UserError(f"dataset '{directory}' does not exist")
    if not path.is_file():
        raise UserError(f"'{directory}' is not a dataset written by `robust-dpo data` (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if manifest.get("kind") != DATASET_KIND:
        raise UserError(f"{path}: kind is {manifest.get('kind')!r}, expected {DATASET_KIND!r}")
    if manifest.get("version") != DATASET_VERSION:
        raise UserError(f"{path}: version {manifest.get('version')!r} is not supported")
    return manifest


def split_dir(directory: str | Path, split: str) -> Path:
    """The parquet folder of `split`; a UserError naming the available splits if absent."""
    splits = read_manifest(directory)["splits"]
    if split not in splits:
        raise UserError(f"dataset '{directory}' has no split '{split}'; it has: {', '.join(sorted(splits))}")
    return Path(directory) / split


def split_files(directory: str | Path, split: str) -> list[str]:
    """The parquet files of `split`, sorted by name.

    Readers take this list rather than the folder: a folder is listed in the filesystem's own order
    (hash order on some), so rows would come back in a machine-dependent order."""
    files = sorted(str(f.resolve()) for f in split_dir(directory, split).rglob("*.parquet"))
    if not files:
        raise UserError(f"dataset '{directory}' split '{split}' has no parquet files")
    return files
