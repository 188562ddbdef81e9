"""Stage 3 (reference, optional): precompute reference log-probs as dataset columns, cached on disk.

    robust-dpo reference --data runs/world/tok --model runs/world/model            # -> cache path
    robust-dpo reference --data tok --model Qwen/Qwen2.5-0.5B --output /shared/refcache \\
        use_gpu=true concurrency=4 batch_size=32 precision=bf16
    # train uses it with reference.mode=precomputed (and runs this stage itself when needed)

A Ray Data `map_batches` stage with a callable class and an actor pool (`concurrency`, one GPU per
actor with use_gpu) loads the reference model once per actor and adds `reference_chosen_logps` /
`reference_rejected_logps` (pairs) or `reference_logps` (listwise: one per response) to every
split.  The result is itself a robust-dpo dataset at CACHE/<dataset fp>-<model fp>-<precision>,
so a second run with the same data and model reuses it.  Token-level objectives (TDPO, Ra-DPO)
need the reference's full-vocabulary distribution at every position, which is not stored here:
they train with reference.mode=live.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipelines import config as config_lib
from pipelines import schema
from pipelines.errors import UserError

REFERENCE_INFO = "reference.json"
HASH_CHUNK = 1 << 22


@dataclass(frozen=True, kw_only=True)
class ReferenceCacheConfig:
    """The whole reference stage: which data and model, and where and how to build the cache."""

    data: str  # a dataset written by `robust-dpo data`; required; --data
    model: str  # the reference model (HF path); required; --model
    output: str = ""  # cache root; "" = $ROBUST_DPO_CACHE or ~/.cache/robust-dpo/reference; --output
    batch_size: int = 16  # pairs (or lists) per forward in an actor; >= 1
    concurrency: int = 1  # actors in the map_batches pool; >= 1
    use_gpu: bool = False  # one GPU per actor
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast; log-probs are fp32 either way
    attn_implementation: str = "sdpa"  # attention kernel of the reference forward

    def __post_init__(self):
        config_lib.check(self, ">= 1", "batch_size", "concurrency")


# [1] Fingerprints and cache location -------------------------------------------------------------


def default_cache_root() -> Path:
    return Path(os.environ.get("ROBUST_DPO_CACHE") or Path.home() / ".cache" / "robust-dpo" / "reference")


def dataset_fingerprint(path: str | Path) -> str:
    """The data stage's manifest fingerprint, plus the names and sizes of the split files."""
    manifest = schema.read_manifest(path)
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode())
    for split in sorted(manifest["splits"]):
        for f in sorted((Path(path) / split).rglob("*.parquet")):
            digest.update(f"{split}/{f.name}:{f.stat().st_size}".encode())
    return digest.hexdigest()


def model_fingerprint(path: str | Path) -> str:
    """sha256 over config.json and every weight file's bytes (local dirs) or the name (hub ids)."""
    path = Path(path)
    digest = hashlib.sha256()
    if not path.is_dir():
        digest.update(str(path).encode())
        return digest.hexdigest()
    files = [path / "config.json"] + sorted(
        f for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file()
    )
    for f in files:
        if not f.is_file():
            continue
        digest.update(f.name.encode())
        with open(f, "rb") as handle:
            for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
                digest.update(chunk)
    return digest.hexdigest()


def cache_path(cfg: ReferenceCacheConfig) -> Path:
    root = Path(cfg.output) if cfg.output else default_cache_root()
    key = f"{dataset_fingerprint(cfg.data)[:16]}-{model_fingerprint(cfg.model)[:16]}-{cfg.precision}"
    if cfg.attn_implementation != "sdpa":
        key += f"-{cfg.attn_implementation}"
    return root.resolve() / key


# [2] The read and the map_batches actor -----------------------------------------------------------

POSITION_COLUMNS = ("file_index", "position")  # where a row sits: index into the file list, row in file


def _positioned_parquet_datasource():
    # Built lazily so `robust-dpo reference --help` does not import Ray; cloudpickle ships the class.
    from ray.data.datasource import FileBasedDatasource

    class PositionedParquet(FileBasedDatasource):
        """The token columns of parquet files plus each row's (file_index, position).

        Ray Data does not promise row order through an actor pool or a write (the reference stage
        once came back with rows swapped under load), so every row carries its own address and the
        stage puts values back by address instead of trusting the order they arrive in."""

        def __init__(self, paths: list[str], *, columns: list[str], **kwargs):
            super().__init__(paths, **kwargs)
            self._index = {_local(p): i for i, p in enumerate(paths)}
            self._columns = columns

        def _read_stream(self, f, path: str):
            import pyarrow as pa
            import pyarrow.parquet as pq

            index, offset = self._index[_local(path)], 0
            for batch in pq.ParquetFile(pa.BufferReader(f.read())).iter_batches(columns=self._columns):
                n = batch.num_rows
                yield pa.Table.from_batches([batch]).append_column(
                    POSITION_COLUMNS[0], pa.array([index] * n, pa.int64())
                ).append_column(POSITION_COLUMNS[1], pa.array(range(offset, offset + n), pa.int64()))
                offset += n

    return PositionedParquet


class ReferenceLogpsPredictor:
    """Callable class for `map_batches`: one reference model per actor, reused for every batch.
    Returns only the row addresses and the reference columns (the token ids stay where they are)."""

    def __init__(self, model_path: str, listwise: bool, batch_size: int, precision: str, attn: str) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        from pipelines import model as model_lib

        hf_logging.disable_progress_bar()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model_lib.load_causal_lm(model_path, attn_implementation=attn, device=self.device).eval()
        self.model.requires_grad_(False)
        self.pad = model_lib.pad_token_id_of(self.model)
        self.listwise, self.batch_size, self.precision = listwise, batch_size, precision

    def __call__(self, frame):
        """Args: frame: pandas batch of token columns + POSITION_COLUMNS.
        Returns: POSITION_COLUMNS + the reference columns."""
        import torch

        from pipelines import model as model_lib

        collate = model_lib.collate_lists if self.listwise else model_lib.collate_pairs
        columns = schema.LIST_TOKEN_COLUMNS if self.listwise else schema.PAIR_TOKEN_COLUMNS
        rows = {c: list(frame[c]) for c in columns}
        chosen, rejected, lists = [], [], []
        for start in range(0, len(frame), self.batch_size):
            chunk = {c: v[start : start + self.batch_size] for c, v in rows.items()}
            batch = model_lib.move_batch(collate(chunk, self.pad), self.device)
            with torch.no_grad():
                logps = model_lib.compute_row_logps(self.model, batch, precision=self.precision).logps.double().cpu()
            b = batch["num_pairs"]
            if self.listwise:
                lists += [row.tolist() for row in logps.reshape(b, batch["list_size"])]
            else:
                chosen += logps[:b].tolist()
                rejected += logps[b:].tolist()
        out = frame[list(POSITION_COLUMNS)].copy()
        if self.listwise:
            out[schema.REFERENCE_LIST_COLUMN] = lists
        else:
            out[schema.REFERENCE_PAIR_COLUMNS[0]] = chosen
            out[schema.REFERENCE_PAIR_COLUMNS[1]] = rejected
        return out


# [3] The stage ---------------------------------------------------------------------------------------


def compute_reference_dataset(cfg: ReferenceCacheConfig) -> Path:
    """Write (or reuse) the cached dataset with reference columns; return its directory.

    Every source file becomes a file of the same name with the reference columns appended, rows in
    the source order, so the cache reads exactly like its source."""
    import pyarrow.parquet as pq
    import ray.data

    from pipelines.ray_session import ensure_ray

    manifest = schema.read_manifest(cfg.data)
    target = cache_path(cfg)
    if (target / REFERENCE_INFO).is_file():
        print(f"[reference] reusing cached reference log-probs at {target}", flush=True)
        return target
    ensure_ray()
    listwise = manifest.get("format") == "listwise"
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    splits = sorted(manifest["splits"])
    files = [(split, f) for split in splits for f in schema.split_files(cfg.data, split)]
    token_columns = list(schema.LIST_TOKEN_COLUMNS if listwise else schema.PAIR_TOKEN_COLUMNS)
    # [1] every split in one read, so one actor pool loads the model once for all of them
    ds = ray.data.read_datasource(_positioned_parquet_datasource()([f for _, f in files], columns=token_columns))
    ds = ds.map_batches(
        ReferenceLogpsPredictor,
        fn_constructor_kwargs=dict(model_path=cfg.model, listwise=listwise, batch_size=cfg.batch_size,
                                   precision=cfg.precision, attn=cfg.attn_implementation),
        batch_size=max(cfg.batch_size, 64),
        batch_format="pandas",
        concurrency=cfg.concurrency,
        num_gpus=1 if cfg.use_gpu else 0,
        num_cpus=1,
    )
    # [2] values back to their rows, file by file (a few floats per row travel to the driver)
    reference = _collect_by_file(ds, len(files))
    roots = {split: schema.split_dir(cfg.data, split).resolve() for split in splits}
    for index, (split, source) in enumerate(files):
        relative = Path(source).relative_to(roots[split])
        table = _with_reference_columns(source, reference.get(index), listwise)
        (staging / split / relative).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, staging / split / relative)
    for split in splits:
        (staging / split).mkdir(parents=True, exist_ok=True)  # an empty split keeps its folder
    fields = {k: v for k, v in manifest.items() if k not in ("kind", "version")}
    fields["reference"] = {"model": cfg.model, "precision": cfg.precision, "source": str(Path(cfg.data).resolve())}
    fields["fingerprint"] = target.name
    schema.write_manifest(staging, **fields)
    stats = Path(cfg.data) / schema.STATS_FILE
    if stats.is_file():
        shutil.copy(stats, staging / schema.STATS_FILE)
    (staging / REFERENCE_INFO).write_text(json.dumps({"dataset": str(cfg.data), "model": cfg.model}, indent=2))
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a concurrent run finished first; keep its copy
        shutil.rmtree(staging)
    else:
        staging.rename(target)
    print(f"[reference] wrote reference log-probs to {target}", flush=True)
    return target


def _collect_by_file(ds, num_files: int) -> dict[int, "Any"]:
    """file_index -> a pandas frame of that file's reference values, sorted by position."""
    import pandas as pd

    parts: dict[int, list] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        for index, part in batch.groupby(POSITION_COLUMNS[0], sort=False):
            parts.setdefault(int(index), []).append(part)
    unknown = sorted(set(parts) - set(range(num_files)))
    if unknown:
        raise RuntimeError(f"reference stage: rows came back from unknown files {unknown}")
    return {i: pd.concat(p, ignore_index=True).sort_values(POSITION_COLUMNS[1], ignore_index=True)
            for i, p in parts.items()}


def _with_reference_columns(source: str, values, listwise: bool):
    """The source file's table with the reference columns appended; every row must have exactly
    one value (a missing or duplicated row is an error, never a silent misalignment)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(source)
    positions = [] if values is None else values[POSITION_COLUMNS[1]].tolist()
    if positions != list(range(table.num_rows)):
        raise RuntimeError(f"reference stage: {source} has {table.num_rows} rows but {len(positions)} reference "
                           "values came back for it (missing or repeated rows)")
    if table.num_rows == 0:
        values = {c: [] for c in _reference_columns(listwise)}
    kind = pa.list_(pa.float64()) if listwise else pa.float64()
    for column in _reference_columns(listwise):
        table = table.append_column(column, pa.array(list(values[column]), type=kind))
    return table


def _reference_columns(listwise: bool) -> tuple[str, ...]:
    return (schema.REFERENCE_LIST_COLUMN,) if listwise else tuple(schema.REFERENCE_PAIR_COLUMNS)


def _local(path: str) -> str:
    return str(Path(path.removeprefix("file://")).resolve())


def precompute_reference(train_cfg: Any, info: Any) -> Path:
    """The train stage's entry (reference.mode=precomputed): same model, precision and attention."""
    from pipelines.train import config as tc

    cfg = ReferenceCacheConfig(
        data=str(train_cfg.data.path), model=train_cfg.model.path, output=train_cfg.reference.cache_dir,
        batch_size=train_cfg.reference.batch_size, concurrency=train_cfg.reference.concurrency,
        use_gpu=train_cfg.train.use_gpu, precision=train_cfg.train.precision,
        attn_implementation=tc.attention_implementation(train_cfg),
    )
    return compute_reference_dataset(cfg)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset written by `robust-dpo data`")
    parser.add_argument("--model", required=True, help="reference model path (HF from_pretrained)")
    parser.add_argument("--output", default=None, help="cache root (default $ROBUST_DPO_CACHE or ~/.cache/robust-dpo/reference)")
    parser.add_argument("overrides", nargs="*", help="key=value: batch_size, concurrency, use_gpu, precision")


def main(args: argparse.Namespace) -> int:
    flags = {"data": args.data, "model": args.model, "output": args.output}
    cfg = config_lib.load(ReferenceCacheConfig, None, args.overrides, flags=flags)
    schema.read_manifest(cfg.data)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(cfg.model)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--model: cannot load a model config from '{cfg.model}' ({type(exc).__name__})") from None
    print(compute_reference_dataset(cfg))
    return 0
