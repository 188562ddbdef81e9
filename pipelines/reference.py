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
class ReferenceStageConfig:
    data: str  # a dataset written by `robust-dpo data`; required
    model: str  # the reference model (HF path); required
    output: str = ""  # cache root; "" = $ROBUST_DPO_CACHE or ~/.cache/robust-dpo/reference
    batch_size: int = 16  # pairs (or lists) per forward in an actor
    concurrency: int = 1  # actors in the map_batches pool
    use_gpu: bool = False  # one GPU per actor
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast; log-probs are fp32 either way
    attn_implementation: str = "sdpa"  # attention kernel of the reference forward


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


def cache_path(cfg: ReferenceStageConfig) -> Path:
    root = Path(cfg.output) if cfg.output else default_cache_root()
    key = f"{dataset_fingerprint(cfg.data)[:16]}-{model_fingerprint(cfg.model)[:16]}-{cfg.precision}"
    if cfg.attn_implementation != "sdpa":
        key += f"-{cfg.attn_implementation}"
    return root.resolve() / key


# [2] The map_batches actor -------------------------------------------------------------------------


class ReferenceLogpsPredictor:
    """Callable class for `map_batches`: one reference model per actor, reused for every batch."""

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
        """Args: frame: pandas batch of the dataset contract.  Returns: it plus reference columns."""
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
        frame = frame.copy()
        if self.listwise:
            frame[schema.REFERENCE_LIST_COLUMN] = lists
        else:
            frame[schema.REFERENCE_PAIR_COLUMNS[0]] = chosen
            frame[schema.REFERENCE_PAIR_COLUMNS[1]] = rejected
        return frame


# [3] The stage ---------------------------------------------------------------------------------------


def compute_reference_dataset(cfg: ReferenceStageConfig) -> Path:
    """Write (or reuse) the cached dataset with reference columns; return its directory."""
    import ray
    import ray.data
    from ray.data.expressions import col

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
    context = ray.data.DataContext.get_current()
    previous, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    splits = sorted(manifest["splits"])
    files = {split: {str(f.resolve()) for f in schema.split_dir(cfg.data, split).rglob("*.parquet")} for split in splits}
    try:
        # [1] every split in one read, so one actor pool loads the model once for all of them
        ds = ray.data.read_parquet(str(Path(cfg.data).resolve()), include_paths=True, file_extensions=["parquet"])
        ds = ds.map_batches(
            ReferenceLogpsPredictor,
            fn_constructor_kwargs=dict(model_path=cfg.model, listwise=listwise, batch_size=cfg.batch_size,
                                       precision=cfg.precision, attn=cfg.attn_implementation),
            batch_size=max(cfg.batch_size, 64),
            batch_format="pandas",
            concurrency=cfg.concurrency,
            num_gpus=1 if cfg.use_gpu else 0,
            num_cpus=1,
        ).materialize()
        read_paths = ds.unique("path")
        for split in splits:  # [2] back into split folders, rows in their original order
            members = [p for p in read_paths if _local(p) in files[split]]
            part = ds.filter(expr=col("path").is_in(members)).drop_columns(["path"])
            part.write_parquet(str(staging / split))
    finally:
        context.execution_options.preserve_order = previous
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


def _local(path: str) -> str:
    return str(Path(path.removeprefix("file://")).resolve())


def precompute_reference(train_cfg: Any, info: Any) -> Path:
    """The train stage's entry (reference.mode=precomputed): same model, precision and attention."""
    from pipelines import train_config as tc

    cfg = ReferenceStageConfig(
        data=str(train_cfg.data.path), model=train_cfg.model.path, output=train_cfg.reference.cache_dir,
        batch_size=train_cfg.reference.batch_size, concurrency=train_cfg.reference.concurrency,
        use_gpu=train_cfg.train.use_gpu, precision=train_cfg.train.precision,
        attn_implementation=tc.attention_implementation(train_cfg),
    )
    return compute_reference_dataset(cfg)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="dataset written by `robust-dpo data`")
    parser.add_argument("--model", required=True, help="reference model path (HF from_pretrained)")
    parser.add_argument("--output", default="", help="cache root (default $ROBUST_DPO_CACHE or ~/.cache/robust-dpo/reference)")
    parser.add_argument("overrides", nargs="*", help="key=value: batch_size, concurrency, use_gpu, precision")


def main(args: argparse.Namespace) -> int:
    overrides = [*args.overrides, f"data={args.data}", f"model={args.model}", f"output={args.output}"]
    cfg = config_lib.load(ReferenceStageConfig, None, overrides)
    schema.read_manifest(cfg.data)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(cfg.model)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"--model: cannot load a model config from '{cfg.model}' ({type(exc).__name__})") from None
    print(compute_reference_dataset(cfg))
    return 0
