"""Stage 3 (reference, optional): precompute reference log-probs as dataset columns, cached on disk.

    robust-dpo reference --data runs/world/tok --model runs/world/model            # -> cache path
    robust-dpo reference --data tok --model Qwen/Qwen2.5-0.5B --output /shared/refcache \\
        use_gpu=true concurrency=4 batch_size=32 precision=bf16
    # train uses it with reference.mode=precomputed (and runs this stage itself when needed)

A Ray Data `map_batches` stage whose actor pool (`concurrency`, one GPU per actor with use_gpu)
loads the reference once per actor (`model.PairLogps`, shared with evaluate) and adds
`reference_chosen_logps` / `reference_rejected_logps` (pairs) or `reference_logps` (listwise: one
per response) to every split; rows carry their (file, row) address through the pool and their
values are put back by it (pipelines/row_order.py).  The result is itself a robust-dpo dataset at
CACHE/<dataset fp>-<model fp>-<precision>, reused by a second run with the same data and model.
Token-level objectives (TDPO, Ra-DPO) need the reference's full-vocabulary distribution at every
position, which is not stored here: they train with reference.mode=live.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import console
from pipelines.console import say
from pipelines import config as config_lib
from pipelines import model as model_lib
from pipelines import row_order, schema
from pipelines.ray_session import actor_pool, ensure_ray
from pipelines.paths import InputPath, ModelPath, OutputPath

REFERENCE_INFO = "reference.json"
HASH_CHUNK = 1 << 22


@dataclass(frozen=True, kw_only=True)
class ReferenceCacheConfig:
    """The whole reference stage: which data and model, and where and how to build the cache."""

    data: InputPath  # a dataset written by `robust-dpo data`; required; --data
    model: ModelPath  # the reference model (HF path); required; --model
    output: OutputPath = ""  # cache root; "" = $ROBUST_DPO_CACHE or ~/.cache/robust-dpo/reference; --output
    batch_size: int = 16  # pairs (or lists) per forward in an actor; >= 1
    concurrency: int = 1  # actors in the map_batches pool; >= 1
    use_gpu: bool = False  # one GPU per actor
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast; log-probs are fp32 either way
    attn_implementation: str = "sdpa"  # attention kernel of the reference forward

    def __post_init__(self):
        config_lib.check(self, ">= 1", "batch_size", "concurrency")


# [1] Fingerprints and cache location -------------------------------------------------------------


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
    if not path.is_dir():
        return hashlib.sha256(str(path).encode()).hexdigest()
    digest = hashlib.sha256()
    weights = sorted(f for f in path.iterdir() if f.suffix in (".safetensors", ".bin", ".pt") and f.is_file())
    for f in [path / "config.json", *weights]:
        if f.is_file():
            digest.update(f.name.encode())
            with open(f, "rb") as handle:
                for chunk in iter(lambda: handle.read(HASH_CHUNK), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def cache_path(cfg: ReferenceCacheConfig) -> Path:
    root = Path(cfg.output or os.environ.get("ROBUST_DPO_CACHE") or Path.home() / ".cache" / "robust-dpo" / "reference")
    key = f"{dataset_fingerprint(cfg.data)[:16]}-{model_fingerprint(cfg.model)[:16]}-{cfg.precision}"
    if cfg.attn_implementation != "sdpa":
        key += f"-{cfg.attn_implementation}"
    return root.resolve() / key


# [2] The stage ---------------------------------------------------------------------------------------


def compute_reference_dataset(cfg: ReferenceCacheConfig) -> Path:
    """Write (or reuse) the cached dataset with reference columns; return its directory.

    Every source file becomes a file of the same name with the reference columns appended, rows in
    the source order, so the cache reads exactly like its source."""
    from pipelines.timings import Timings

    timings = Timings("reference")
    manifest = schema.read_manifest(cfg.data)
    target = cache_path(cfg)
    if (target / REFERENCE_INFO).is_file():
        say("reference", f"reusing cached reference log-probs at {target}")
        return target
    with timings.phase("Ray session"):
        ensure_ray()
    listwise = manifest.get("format") == "listwise"
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    splits = sorted(manifest["splits"])
    files = [(split, f) for split in splits for f in schema.split_files(cfg.data, split)]
    token_columns = list(schema.LIST_TOKEN_COLUMNS if listwise else schema.PAIR_TOKEN_COLUMNS)
    # [1] every split in one read, each row with its (file, row) address, so one actor pool loads
    # the model once for all of them
    ds = row_order.read_addressed([f for _, f in files],
                                  functools.partial(row_order.read_parquet_columns, columns=token_columns))
    ds = ds.map_batches(
        model_lib.PairLogps,
        fn_constructor_kwargs=dict(models=[("reference", cfg.model)], listwise=listwise, batch_size=cfg.batch_size,
                                   precision=cfg.precision, attn_implementation=cfg.attn_implementation,
                                   use_gpu=cfg.use_gpu, keep=row_order.ADDRESS_COLUMNS),
        batch_size=max(cfg.batch_size, 64), batch_format="pyarrow", **actor_pool(cfg.concurrency, gpu=cfg.use_gpu))
    # [2] values back on their rows by address, file by file (a few floats per row reach the driver)
    kind = pa.list_(pa.float64()) if listwise else pa.float64()
    columns = {c: kind for c in ([schema.REFERENCE_LIST_COLUMN] if listwise else schema.REFERENCE_PAIR_COLUMNS)}
    roots = {split: schema.split_dir(cfg.data, split).resolve() for split in splits}
    try:
        with timings.phase("log-probs and write (streamed together)"):
            for (split, source), values in zip(files, row_order.rows_by_file(ds, len(files))):
                table = row_order.put_back(pq.read_table(source), values, columns=columns, source=source,
                                           what="reference values")
                relative = Path(source).relative_to(roots[split])
                (staging / split / relative).parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, staging / split / relative)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
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
    timings.write(staging)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a concurrent run finished first; keep its copy
        shutil.rmtree(staging)
    else:
        staging.rename(target)
    say("reference", f"wrote reference log-probs to {target}")
    return target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset written by `robust-dpo data`")
    parser.add_argument("--model", required=True, help="reference model path (HF from_pretrained)")
    parser.add_argument("--output", default=None, help="cache root (default $ROBUST_DPO_CACHE or ~/.cache/robust-dpo/reference)")
    parser.add_argument("overrides", nargs="*", help="key=value: batch_size, concurrency, use_gpu, precision")


CONFIG = ReferenceCacheConfig  # the keys `--help` lists


def build_config(args: argparse.Namespace) -> ReferenceCacheConfig:
    flags = {"data": args.data, "model": args.model, "output": args.output}
    return config_lib.load(ReferenceCacheConfig, None, args.overrides, flags=flags)


def main(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    schema.read_manifest(cfg.data)
    model_lib.load_model_config(cfg.model, "--model")
    print(compute_reference_dataset(cfg), file=console.out(), flush=True)
    return 0
