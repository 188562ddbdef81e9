"""Stage 1 (data): ingest a preference dataset with Ray Data, validate every row, shift, tokenise, write.

    robust-dpo data --dataset runs/world/data --tokenizer runs/world/tokenizer --output runs/world/tok
    robust-dpo data --dataset my.jsonl --tokenizer Qwen/Qwen2.5-0.5B --output out \\
        --shift label_flip:eps=0.1 --on-invalid skip max_length=1024 eval_fraction=0.05
    # on a cluster: the same command under `ray job submit -- ...` (RAY_ADDRESS is honoured).

SRC is a local .jsonl/.json/.parquet file, a folder of them (files named train*/eval*/test*/
validation* become those splits; its `data/` subfolder is used instead when that holds data files),
or a hub dataset name `owner/name` (read through HfFileSystem, never in tests).  Writes
`OUT/manifest.json`, `OUT/data_stats.json`, `OUT/rejected_rows.jsonl` (when rows were rejected) and
`OUT/<split>/*.parquet` per pipelines/schema.py.  Rows are never dropped silently: rows_in ==
rows_out + rows_rejected, and invalid rows fail the stage (exit 2) unless `--on-invalid skip`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipelines import console
from pipelines import config as config_lib
from pipelines.console import say
from pipelines import row_order, schema
from pipelines.errors import UserError, first_line
from pipelines.ray_session import actor_pool, ensure_ray, preserve_order
from pipelines.data.formats import (
    FILE_SUFFIXES, INPUT_FORMATS, RowError, detect_format, iter_file_records, output_columns, output_format,
    parse_record, prepare_rows, prepared_schema,
)
from pipelines.paths import DatasetPath, ModelPath, OutputPath, atomic_path, write_text_atomic

MAX_ERROR_LINES = 20
ROWS_PER_FILE = 50_000  # rows per written parquet file
# A folder's files become splits named by the first word of their stem (train-00000-of-00001.parquet
# -> train), when every file is so named; otherwise everything is "train".
SPLIT_WORDS = ("train", "eval", "test", "validation")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Everything `robust-dpo data` needs; overrides as `key=value` or `data.key=value`."""

    dataset: DatasetPath  # SRC: a .jsonl/.json/.parquet file, a folder of them, a `datasets` save_to_disk folder, or a hub name owner/name
    tokenizer: ModelPath  # path or hub name for AutoTokenizer.from_pretrained
    output: OutputPath  # output folder (created; its split folders are replaced)
    format: Literal["auto", "pairs", "hh", "chat", "listwise"] = "auto"  # input format; auto = detect
    on_invalid: Literal["fail", "skip"] = "fail"  # fail: exit 2 naming bad rows; skip: drop + list them
    shifts: tuple[str, ...] = ()  # shift specs applied in order (pipelines/data/shifts.py grammar)
    shift_splits: tuple[str, ...] = ("train",)  # splits the shifts apply to; eval stays clean by default
    max_length: int = 512  # tokens, prompt + response (TRL keep_start truncation); 8..131072
    max_prompt_length: int | None = None  # tokens; longer prompts are rejected; None = max_length - 1
    eval_fraction: float = 0.0  # [0, 1): seeded hash holdout of a single-split source into "eval"
    seed: int = 0  # seeds the holdout and every shift
    split: str | None = None  # keep only this split (e.g. "train"); None = every split found
    concurrency: int = 2  # tokenizer actors in the map_batches pool; 1..#CPUs
    batch_size: int = 256  # rows per map_batches call; 16..4096

    def __post_init__(self):
        config_lib.check(self, ">= 2", "max_length")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise config_lib.FieldError("max_prompt_length", f"must be in [1, max_length = {self.max_length}), "
                                        f"got {self.max_prompt_length}")
        config_lib.check(self, "[0, 1)", "eval_fraction")
        config_lib.check(self, ">= 1", "concurrency", "batch_size")


@dataclass(frozen=True)
class DataResult:
    """What `prepare_data` wrote."""

    output: Path  # the dataset folder (read it with pipelines.schema.read_manifest / split_dir)
    manifest: dict[str, Any]  # the manifest.json body
    stats: dict[str, Any]  # the data_stats.json body
    rejected_rows: Path | None = None  # OUT/rejected_rows.jsonl when any row was rejected
    splits: dict[str, int] = field(default_factory=dict)  # rows written per split


def prepare_data(cfg: DataConfig) -> DataResult:
    """Read, validate, tokenise, shift and write a preference dataset (see module docstring).  A UserError
    for a bad source/config/shift spec, or for invalid rows with `on_invalid="fail"` (after printing up
    to MAX_ERROR_LINES `<file>:row <index>: <field>: <reason>` lines to stderr)."""
    from pipelines.data import shifts as shift_lib
    from pipelines.timings import Timings

    parsed_shifts = [shift_lib.parse_shift(s) for s in cfg.shifts]  # bad specs fail before Ray starts
    source = resolve_source(cfg.dataset)  # [1] files per split
    splits = dict(source.splits)
    if cfg.split is not None:
        if cfg.split not in splits:
            raise UserError(f"dataset '{cfg.dataset}' has no split '{cfg.split}'; it has: {', '.join(sorted(splits))}")
        splits = {cfg.split: splits[cfg.split]}
    if cfg.eval_fraction > 0 and set(splits) != {"train"}:
        raise UserError(f"eval_fraction={cfg.eval_fraction} needs a single 'train' split; '{cfg.dataset}' has "
                        f"{', '.join(sorted(splits))}")
    names = set(splits) | ({"eval"} if cfg.eval_fraction > 0 else set())
    if parsed_shifts and not set(cfg.shift_splits) & names:
        raise UserError(f"shift_splits={list(cfg.shift_splits)} names none of the splits: {', '.join(sorted(names))}")
    _load_tokenizer(cfg.tokenizer)  # fail fast, on the driver, with one line
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    for stale in (schema.MANIFEST_FILE, "rejected_rows.jsonl"):  # a failed rerun must not look like a dataset
        (out / stale).unlink(missing_ok=True)

    timings = Timings("data")
    with timings.phase("Ray session"):
        ensure_ray()
    with preserve_order():
        with timings.phase("read, validate, tokenise"):
            read_file = functools.partial(_read_records, display=source.display)  # [2] (file, row, record)
            raw = {name: row_order.read_addressed(files, read_file, filesystem=source.filesystem)
                   for name, files in splits.items()}
            input_format = cfg.format if cfg.format != "auto" else _detect(raw, cfg.dataset)
            fmt = output_format(input_format)
            prepared = _per_split(raw, lambda ds, _: ds.map_batches(  # [3] normalise + validate + tokenise, once
                PrepareRows, batch_format="pyarrow", batch_size=cfg.batch_size, **actor_pool(cfg.concurrency),
                fn_constructor_kwargs=dict(tokenizer_path=cfg.tokenizer, input_format=input_format,
                                           max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length),
            ).materialize())
        with timings.phase("counts and errors"):
            summary = _per_split(prepared, lambda ds, _: _summarize(ds))  # [4] counts and errors
        stats = _stats(summary, input_format, fmt)
        rejected_path = _write_rejected(out, prepared) if stats["rows_rejected"] else None
        _write_json(out / schema.STATS_FILE, stats)
        if stats["rows_rejected"] and cfg.on_invalid == "fail":
            _print_first_errors(prepared)
            raise UserError(f"{stats['rows_rejected']} invalid row(s) in '{cfg.dataset}' (all listed in "
                            f"{rejected_path}); fix them or pass --on-invalid skip")
        extra_columns = _merge_extra_columns(summary, fmt)
        valid = {name: ds.map_batches(_finalize_batch, batch_format="pyarrow", batch_size=cfg.batch_size,
                                      fn_kwargs={"extra_columns": extra_columns, "fmt": fmt})
                 for name, ds in prepared.items()}
        if cfg.eval_fraction > 0:  # [5] seeded holdout
            valid = _hold_out(valid["train"], cfg.eval_fraction, cfg.seed)
        for name in valid:  # [6] shifts, in order, on the chosen splits
            if name in cfg.shift_splits and parsed_shifts:
                valid[name] = shift_lib.apply_shifts(valid[name], parsed_shifts, seed=cfg.seed)
        with timings.phase("shift and write"):
            written = _per_split(valid, lambda ds, name: _write_split(ds, out / name))  # [7] write
    stats["rows_written"] = written
    _write_json(out / schema.STATS_FILE, stats)
    timings.write(out)
    schema.write_manifest(out, format=fmt, input_format=input_format, tokenizer=cfg.tokenizer,
                          max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length, splits=written,
                          source=cfg.dataset, shifts=[s.text for s in parsed_shifts],
                          shift_splits=list(cfg.shift_splits), fingerprint=_fingerprint(source, splits, cfg),
                          seed=cfg.seed)
    return DataResult(output=out, manifest=schema.read_manifest(out), stats=stats,
                      rejected_rows=rejected_path, splits=written)


def _per_split(datasets: dict, fn) -> dict:
    """fn(dataset, split name) for every split, the splits' Ray Data executions run side by side
    (one thread each): a small split's actor start and task scheduling then overlap the other's
    instead of adding to it.  Results in the splits' order."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, len(datasets))) as pool:
        futures = {name: pool.submit(fn, ds, name) for name, ds in datasets.items()}
        return {name: future.result() for name, future in futures.items()}


# --- source: which files, which splits ----------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """The files of a dataset source, grouped by split."""

    splits: dict[str, list[str]]  # split -> file paths as the filesystem names them
    display: dict[str, str]  # file path -> the name error lines and row_id use
    filesystem: Any = None  # None: local files; an fsspec HfFileSystem for hub datasets


def resolve_source(dataset: str) -> Source:
    """Local file, local folder (its `data/` subfolder if that holds data files), or hub `owner/name`."""
    path = Path(dataset)
    if path.is_file():
        if path.suffix.lower() not in FILE_SUFFIXES:
            raise UserError(f"dataset '{dataset}': unsupported file type '{path.suffix}'; "
                            f"expected one of {', '.join(FILE_SUFFIXES)}")
        return Source({"train": [os.path.abspath(path)]}, {os.path.abspath(path): dataset})
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        return _resolve_saved_to_disk(path, dataset)
    if path.is_dir():
        shown, files = dataset, _data_files(path)
        if (path / "data").is_dir() and (sub := _data_files(path / "data")):  # the world's DIR, or a hub-style repo
            shown, files = os.path.join(dataset, "data"), sub
        if not files:
            raise UserError(f"dataset folder '{dataset}' holds no {'/'.join(FILE_SUFFIXES)} files")
        display = {os.path.abspath(f): os.path.join(shown, f.name) for f in files}
        return Source(_group_by_split(list(display)), display)
    hub_like = dataset.count("/") == 1 and not dataset.startswith((".", "/")) and not dataset.endswith(FILE_SUFFIXES)
    if dataset.startswith("hf://") or hub_like:
        return _resolve_hub(dataset)
    raise UserError(f"dataset '{dataset}' not found: not a local file or folder, nor a hub name owner/name")


def _resolve_saved_to_disk(path: Path, dataset: str) -> Source:
    """A folder written by `datasets.Dataset.save_to_disk` (one split, `train`) or
    `DatasetDict.save_to_disk` (a subfolder per split, listed in dataset_dict.json): its Arrow shards
    in the order its state.json lists them (`datasets`' own order)."""
    if (path / "dataset_dict.json").is_file():
        names = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        folders = {name: path / name for name in names}
    else:
        folders = {"train": path}
    splits, display = {}, {}
    for name, folder in folders.items():
        state = json.loads((folder / "state.json").read_text())
        files = [folder / f["filename"] for f in state.get("_data_files", [])]
        if not files:
            raise UserError(f"dataset folder '{dataset}': split '{name}' lists no data files in state.json")
        splits[name] = [os.path.abspath(f) for f in files]
        display |= {os.path.abspath(f): os.path.join(dataset, os.path.relpath(f, path)) for f in files}
    return Source(splits, display)


def _data_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in FILE_SUFFIXES)


def _split_word(path: str) -> str | None:
    """'train' for .../train-00000-of-00001.parquet or .../train/0000.parquet, else None."""
    p = Path(path)
    for name in (p.stem, p.parent.name):
        word = re.split(r"[^A-Za-z]+", name.lower())[0]
        if word in SPLIT_WORDS:
            return word
    return None


def _group_by_split(paths: list[str]) -> dict[str, list[str]]:
    words = {p: _split_word(p) for p in paths}
    if any(w is None for w in words.values()):
        return {"train": sorted(paths)}
    splits: dict[str, list[str]] = {}
    for p in sorted(paths):
        splits.setdefault(words[p], []).append(p)
    return splits


def _resolve_hub(dataset: str) -> Source:
    """A hub dataset's data files through HfFileSystem, the route Ray's docs recommend over
    `from_huggingface` (RAY_NOTES 5.2); datasets without jsonl/json/parquet files are read from
    the hub's automatic parquet conversion (`refs/convert/parquet`).  Not exercised in tests."""
    from huggingface_hub import HfFileSystem

    repo = dataset.removeprefix("hf://").removeprefix("datasets/").strip("/")
    fs = HfFileSystem()
    for root in (f"datasets/{repo}", f"datasets/{repo}@refs%2Fconvert%2Fparquet"):
        try:
            files = sorted(f for f in fs.find(root) if f.lower().endswith(FILE_SUFFIXES))
        except Exception as exc:  # network, auth, not found: one line for the user
            raise UserError(f"cannot list hub dataset '{repo}': {first_line(exc)}") from None
        if files:
            return Source(_group_by_split(files), {f: f"hf://{f}" for f in files}, filesystem=fs)
    raise UserError(f"hub dataset '{repo}' has no {'/'.join(FILE_SUFFIXES)} files")


def _read_records(stream, path: str, *, display: dict[str, str]):
    """`read_file` for row_order.read_addressed: formats.iter_file_records' `{file, row, record,
    read_error}` rows, `file` being the display name."""
    import pyarrow as pa

    raw_schema = pa.schema([("file", pa.string()), ("row", pa.int64()), ("record", pa.string()),
                            ("read_error", pa.string())])
    for chunk in iter_file_records(stream, display.get(path, path), Path(path).suffix.lower()):
        yield pa.Table.from_pylist(chunk, schema=raw_schema)


class PrepareRows:
    """The map_batches actor: loads the tokenizer once, then runs `formats.prepare_rows` per batch
    (one output row per input row, so each row keeps its address columns)."""

    def __init__(self, *, tokenizer_path: str, input_format: str, max_length: int, max_prompt_length: int | None):
        self.tokenizer = _load_tokenizer(tokenizer_path)
        self.kwargs = dict(input_format=input_format, max_length=max_length, max_prompt_length=max_prompt_length)
        self.schema = prepared_schema(output_format(input_format))

    def __call__(self, table):
        import pyarrow as pa

        out = pa.Table.from_pydict(prepare_rows(table.to_pydict(), tokenizer=self.tokenizer, **self.kwargs),
                                   schema=self.schema)
        for name in row_order.ADDRESS_COLUMNS:
            out = out.append_column(name, table.column(name))
        return out


# --- steps ---------------------------------------------------------------------------------------


def _detect(raw: dict, dataset: str) -> str:
    """The input format from the first parseable records (a whole dataset has one format)."""
    for ds in raw.values():
        for row in ds.limit(50).take_all():
            if row["read_error"]:
                continue
            try:
                record = parse_record(row["record"])
            except RowError:
                continue
            found = detect_format(record)
            if found is not None:
                return found
            raise UserError(
                f"{row['file']}:row {row['row']}: cannot tell the format from keys {sorted(record)}; expected "
                "prompt/chosen/rejected, HH dialogues, chat message lists or prompt/responses/scores "
                f"(force one with --format {{{','.join(INPUT_FORMATS)}}})"
            )
    return "pairs"  # nothing parseable: every row is rejected below and named


def _summarize(ds) -> dict[str, Any]:
    """{codes: {error_code: rows} ("" = valid), truncated: rows, extras / ignored: sorted key names seen}
    of a split: Ray Data's own aggregates over one cheap per-row projection."""
    from ray.data.aggregate import Sum, Unique, ValueCounter

    found = ds.map_batches(_summary_columns, batch_format="pyarrow").aggregate(
        ValueCounter(on="error_code", alias_name="codes"), Sum(on="truncated", alias_name="truncated"),
        Unique(on="extras", encode_lists=True, alias_name="extras"),
        Unique(on="ignored", encode_lists=True, alias_name="ignored")) or {}  # None: a split with no rows
    codes = found.get("codes") or {"values": [], "counts": []}
    return {"codes": {code: int(n) for code, n in zip(codes["values"], codes["counts"])},
            "extras": sorted(found.get("extras") or []), "ignored": sorted(found.get("ignored") or []),
            "truncated": int(found.get("truncated") or 0)}


def _summary_columns(table):
    """Per row: error_code, truncated, and the key names of its `extras` JSON and `ignored` list."""
    import pyarrow as pa

    keys = pa.list_(pa.string())
    return pa.table({
        "error_code": table.column("error_code"),
        "truncated": table.column("truncated"),
        "extras": pa.array([list(json.loads(text)) for text in table.column("extras").to_pylist()], keys),
        "ignored": pa.array([s.split(",") if s else [] for s in table.column("ignored").to_pylist()], keys),
    })


def _stats(summary: dict[str, dict], input_format: str, fmt: str) -> dict[str, Any]:
    per_split, by_reason = {}, Counter()
    for name, s in summary.items():
        rows_in, rows_out = sum(s["codes"].values()), s["codes"].get("", 0)
        per_split[name] = {"rows_in": rows_in, "rows_out": rows_out, "rows_rejected": rows_in - rows_out,
                           "rows_truncated": s["truncated"]}
        by_reason.update({code: n for code, n in s["codes"].items() if code})
    total = {k: sum(p[k] for p in per_split.values())
             for k in ("rows_in", "rows_out", "rows_rejected", "rows_truncated")}
    ignored = sorted({k for s in summary.values() for k in s["ignored"]})
    return {**total, "rejected_by_reason": dict(sorted(by_reason.items())), "splits": per_split,
            "input_format": input_format, "format": fmt, "ignored_columns": ignored}


def _errors(ds):
    """The rejected rows of a prepared split, in file order (the executor preserves order)."""
    import pyarrow.compute as pc

    columns = ["file", "row", "error_field", "error_reason"]
    return ds.map_batches(lambda t: t.filter(pc.not_equal(t["error_code"], "")).select(columns), batch_format="pyarrow")


def _print_first_errors(prepared: dict) -> None:
    rows = []
    for ds in prepared.values():
        if len(rows) < MAX_ERROR_LINES:
            rows += _errors(ds).take(MAX_ERROR_LINES - len(rows))
    for row in rows:
        print(f"{row['file']}:row {row['row']}: {row['error_field']}: {row['error_reason']}", file=console.err())


def _write_rejected(out: Path, prepared: dict) -> Path:
    path = out / "rejected_rows.jsonl"
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for ds in prepared.values():
            for row in _errors(ds).iter_rows():
                f.write(json.dumps({"file": row["file"], "row": int(row["row"]), "field": row["error_field"],
                                    "reason": row["error_reason"]}) + "\n")
    return path


def _merge_extra_columns(summary: dict[str, dict], fmt: str) -> dict[str, str]:
    """Arrow type names for the optional columns any split carries (a column missing in a row is null)."""
    fixed = {"group": "string", "source": "string", "flipped": "bool", "weight": "double"}
    names = sorted({k for s in summary.values() for k in s["extras"]})
    # calibration, p_target, reward_*: one float per pair, or one per response when listwise
    return {name: fixed.get(name, "list<double>" if fmt == "listwise" else "double") for name in names}


def _finalize_batch(table, *, extra_columns: dict[str, str], fmt: str):
    """Keep valid rows; expand the validated `extras` JSON into typed pass-through columns; keep each
    row's address (row_order.ADDRESS_COLUMNS) for the write."""
    import pyarrow as pa
    import pyarrow.compute as pc

    table = table.filter(pc.equal(table["error_code"], ""))
    extras = [json.loads(t) for t in table.column("extras").to_pylist()]
    types = {"string": pa.string(), "bool": pa.bool_(), "double": pa.float64(), "list<double>": pa.list_(pa.float64())}
    columns = {name: table.column(name) for name in ["row_id", *output_columns(fmt)]}
    for name, kind in extra_columns.items():
        columns[name] = pa.array([e.get(name) for e in extras], type=types[kind])
    for name in row_order.ADDRESS_COLUMNS:
        columns[name] = table.column(name)
    return pa.table(columns)


def _hold_out(ds, fraction: float, seed: int) -> dict:
    from pipelines.data.shifts import row_uniforms

    def pick(table, *, held: bool):
        import numpy as np

        u = row_uniforms(table.column("row_id").to_pylist(), seed, "eval_holdout")
        return table.filter(np.asarray(u < fraction) == held)

    return {"train": ds.map_batches(pick, batch_format="pyarrow", fn_kwargs={"held": False}),
            "eval": ds.map_batches(pick, batch_format="pyarrow", fn_kwargs={"held": True})}


def _write_split(ds, directory: Path) -> int:
    """Write the split's rows in source order (file, row, then row_id for resampled copies: the train
    stage's step order, row_order.py) as part-NNNNN.parquet files of at most ROWS_PER_FILE rows; return
    the number of rows."""
    if directory.exists():
        shutil.rmtree(directory)  # a rerun replaces the split instead of mixing old and new files
    directory.mkdir(parents=True)  # an empty split still gets its folder
    return row_order.write_in_source_order(ds, directory, rows_per_file=ROWS_PER_FILE, tie_break=("row_id",))


def _fingerprint(source: Source, splits: dict[str, list[str]], cfg: DataConfig) -> str:
    """sha256 over the input files' bytes, the tokenizer files and the resolved config."""
    h = hashlib.sha256()
    for name in sorted(splits):
        for path in splits[name]:
            h.update(f"{name}\0{source.display[path]}\0".encode())
            with (source.filesystem.open(path, "rb") if source.filesystem is not None else open(path, "rb")) as f:
                while block := f.read(1 << 20):
                    h.update(block)
    tok = Path(cfg.tokenizer)
    if tok.is_dir():
        for p in sorted(tok.iterdir()):
            if p.is_file() and ("token" in p.name or p.suffix in (".model", ".txt", ".jinja")):
                h.update(p.name.encode() + b"\0" + p.read_bytes())
    keys = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("output", "concurrency", "batch_size")}
    h.update(json.dumps(keys, sort_keys=True, default=list).encode())
    return h.hexdigest()


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer '{path}': {first_line(exc)}") from None


def _write_json(path: Path, body: dict) -> None:
    write_text_atomic(path, json.dumps(body, indent=2, sort_keys=True))


# --- CLI -----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, metavar="SRC",
                        help="a .jsonl/.json/.parquet file, a folder of them, a `datasets` save_to_disk folder, "
                             "or a hub dataset owner/name")
    parser.add_argument("--tokenizer", required=True, metavar="PATH", help="tokenizer path or hub name")
    parser.add_argument("--output", required=True, metavar="DIR", help="output dataset folder")
    parser.add_argument("--shift", action="append", default=None, metavar="SPEC",
                        help="a shift spec, e.g. label_flip:eps=0.2 (repeatable; applied in order)")
    parser.add_argument("--on-invalid", choices=("fail", "skip"), default=None,
                        help="fail (default): exit 2 naming the bad rows; skip: drop them, list in rejected_rows.jsonl")
    parser.add_argument("--format", choices=("auto", *INPUT_FORMATS), default=None, help="input format (default auto)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="DataConfig keys, e.g. max_length=1024 eval_fraction=0.05 seed=1 (or data.max_length=...)")


CONFIG = DataConfig  # the keys `--help` lists


def build_config(args: argparse.Namespace) -> DataConfig:
    """The flags and the `key=value` overrides (a flag and an override of one key is an error)."""
    flags = {"dataset": args.dataset, "tokenizer": args.tokenizer, "output": args.output, "shifts": args.shift,
             "on_invalid": args.on_invalid, "format": args.format}
    return config_lib.load(DataConfig, None, args.overrides or [], flags=flags, section="data")


def main(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    result = prepare_data(cfg)
    s = result.stats
    say("data", f"{s['rows_in']} rows in, {s['rows_out']} out, {s['rows_rejected']} rejected, "
                f"{s['rows_truncated']} truncated; wrote {result.splits} to {result.output}")
    if s["ignored_columns"]:
        say("data", f"columns not in the schema were not carried: {', '.join(s['ignored_columns'])}")
    return 0
