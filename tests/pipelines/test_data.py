"""The data stage end to end: sources and splits, the CLI's exit-2 report, skip mode, outputs, sharding.

Pure parts run without Ray; the stage runs share the session `ray_session` (marked `ray`).
Tiny tokenizer ids: <pad>=0 <unk>=1 <bos>=2 <eos>=3, "wK" = K + 4.
"""

from __future__ import annotations

import argparse
import json
import threading

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import schema
from pipelines.cli import main
from pipelines.data import DataConfig, _fingerprint, build_config, prepare_data, resolve_source
from pipelines.errors import UserError

EOS = 3


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def world_like(root):
    """The embedded world's layout: DIR/data/{train,eval}.parquet with rewards, group, source, calibration."""
    (root / "data").mkdir(parents=True)
    for split, n in (("train", 10), ("eval", 4)):
        pq.write_table(pa.table({
            "prompt": [f"w{i % 5} w{i % 7}" for i in range(n)],
            "chosen": [f"w{10 + i % 9}" for i in range(n)],
            "rejected": [f"w{20 + i % 9} w1" for i in range(n)],
            "reward_a_chosen": [float(i) for i in range(n)], "reward_a_rejected": [0.5] * n,
            "reward_b_chosen": [1.0] * n, "reward_b_rejected": [2.0] * n,
            "group": ["g0", "g1"] * (n // 2), "source": ["target", "synthetic"] * (n // 2),
            "calibration": [0.25] * n,
        }), root / "data" / f"{split}.parquet")
    return root


# --- pure: sources, config -----------------------------------------------------------------------


def test_splits_by_file_name_else_everything_is_train(tmp_path):
    for name in ("train.jsonl", "test-00000-of-00001.jsonl", "validation.json"):
        (tmp_path / "a" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "a" / name).write_text("")
    src = resolve_source(str(tmp_path / "a"))
    assert {k: [src.display[p] for p in v] for k, v in src.splits.items()} == {
        "train": [f"{tmp_path}/a/train.jsonl"], "test": [f"{tmp_path}/a/test-00000-of-00001.jsonl"],
        "validation": [f"{tmp_path}/a/validation.json"]}
    (tmp_path / "a" / "extra.jsonl").write_text("")
    assert list(resolve_source(str(tmp_path / "a")).splits) == ["train"]
    world = world_like(tmp_path / "w")
    (world / "world.json").write_text("{}")  # the world's DIR holds world.json too; its data/ folder wins
    src = resolve_source(str(world))
    assert sorted(src.splits) == ["eval", "train"]
    assert src.display[src.splits["eval"][0]] == f"{tmp_path}/w/data/eval.parquet"


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="not found: not a local file or folder, nor a hub name"):
        resolve_source(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="unsupported file type '.csv'"):
        resolve_source(str(tmp_path / "x.csv"))
    with pytest.raises(UserError, match="holds no .jsonl/.json/.parquet/.arrow files"):
        resolve_source(str(tmp_path))


def test_cli_config_flags_and_overrides(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "d" and "t" exist here: paths resolve against the working directory
    (tmp_path / "d").mkdir()
    (tmp_path / "t").mkdir()
    args = argparse.Namespace(dataset="d", tokenizer="t", output="o",
                              shift=["label_flip:eps=0.1", "length:direction=longer"],
                              on_invalid="skip", format=None, overrides=["max_length=64", "data.seed=3"])
    cfg = build_config(args)
    assert (cfg.max_length, cfg.seed, cfg.on_invalid, cfg.format) == (64, 3, "skip", "auto")
    assert (cfg.dataset, cfg.tokenizer, cfg.output) == (str(tmp_path / "d"), str(tmp_path / "t"), str(tmp_path / "o"))
    assert cfg.shifts == ("label_flip:eps=0.1", "length:direction=longer")
    with pytest.raises(UserError, match="unknown config key 'max_len'"):
        build_config(argparse.Namespace(**{**vars(args), "overrides": ["max_len=3"]}))
    with pytest.raises(UserError, match="'eval_fraction' must be in"):
        build_config(argparse.Namespace(**{**vars(args), "overrides": ["eval_fraction=1.5"]}))
    with pytest.raises(UserError, match="config key 'dataset': path 'runs/missing.jsonl' does not exist"):
        (tmp_path / "runs").mkdir()
        build_config(argparse.Namespace(**{**vars(args), "dataset": "runs/missing.jsonl"}))


def test_fingerprint_covers_bytes_and_config(tmp_path, tiny_model_dir):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "w1", "chosen": "w2", "rejected": "w3"}])
    cfg = DataConfig(dataset=str(f), tokenizer=str(tiny_model_dir), output=str(tmp_path / "o"))
    src = resolve_source(str(f))
    fp = _fingerprint(src, src.splits, cfg)
    assert fp == _fingerprint(src, src.splits, cfg) and len(fp) == 64
    assert fp != _fingerprint(src, src.splits, DataConfig(**{**cfg.__dict__, "max_length": 64}))
    write_jsonl(f, [{"prompt": "w1", "chosen": "w2", "rejected": "w4"}])
    assert fp != _fingerprint(src, src.splits, cfg)


# --- the stage on Ray ----------------------------------------------------------------------------

BAD = [  # (row, expected "<field>: <reason>")
    ('{"prompt": "w1", "chosen": "w2"}', "rejected: missing"),
    ('{"prompt": null, "chosen": "w2", "rejected": "w3"}', "prompt: is null"),
    ('{"prompt": "w1", "chosen": "", "rejected": "w3"}', "chosen: is empty"),
    ('{"prompt": "w1", "chosen": 3, "rejected": "w3"}', "chosen: expected a string, got an integer"),
    ('{"prompt": "w1", "chosen": "w2", "rejected": "w2"}', "rejected: identical to chosen"),
    ('{"prompt": "w1", "chosen": "w2", "rejected": "w3", "weight": NaN}', "weight: non-finite value nan"),
    ("{not json", "record: not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ('{"prompt": "w1 w2 w3 w4 w5 w6 w7 w8", "chosen": "w2", "rejected": "w3"}',
     "prompt: 8 tokens leave no room for a response within max_length 8"),
]


@pytest.mark.ray
def test_cli_fails_with_exit_2_naming_the_first_20_bad_rows(ray_session, tiny_model_dir, tmp_path, capsys):
    good = json.dumps({"prompt": "w1", "chosen": "w2", "rejected": "w3"})
    rows = [good] + [BAD[i % len(BAD)][0] for i in range(23)] + [good]  # 23 bad rows at lines 1..23
    f = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    code = main(["data", "--dataset", str(f), "--tokenizer", str(tiny_model_dir), "--output", str(out), "max_length=8"])
    assert code == 2
    err = capsys.readouterr().err.splitlines()
    row_lines = [line for line in err if line.startswith(f"{f}:row ")]
    assert row_lines == [f"{f}:row {i + 1}: {BAD[i % len(BAD)][1]}" for i in range(20)]
    assert err[-1] == (f"robust-dpo: error: 23 invalid row(s) in '{f}' (all listed in {out}/rejected_rows.jsonl); "
                       "fix them or pass --on-invalid skip")
    stats = json.loads((out / schema.STATS_FILE).read_text())
    assert (stats["rows_in"], stats["rows_out"], stats["rows_rejected"]) == (25, 2, 23)
    assert stats["rejected_by_reason"]["missing"] == 3 and sum(stats["rejected_by_reason"].values()) == 23
    assert len((out / "rejected_rows.jsonl").read_text().splitlines()) == 23
    assert not (out / "train").exists() and not (out / schema.MANIFEST_FILE).exists()


@pytest.fixture(scope="module")
def skipped(ray_session, tiny_model_dir, tmp_path_factory):
    """The world-like folder plus one bad row per split, prepared with --on-invalid skip via the CLI."""
    root = world_like(tmp_path_factory.mktemp("src"))
    train = pq.read_table(root / "data" / "train.parquet").to_pylist()
    train[3]["rejected"] = train[3]["chosen"]
    pq.write_table(pa.Table.from_pylist(train), root / "data" / "train.parquet")
    ev = pq.read_table(root / "data" / "eval.parquet").to_pylist()
    ev[1]["reward_b_rejected"] = float("nan")
    pq.write_table(pa.Table.from_pylist(ev), root / "data" / "eval.parquet")
    out = tmp_path_factory.mktemp("out")
    code = main(["data", "--dataset", str(root), "--tokenizer", str(tiny_model_dir), "--output", str(out),
                 "--on-invalid", "skip", "max_length=3"])
    return root, out, code


@pytest.mark.ray
def test_skip_mode_writes_rejected_rows_stats_and_schema(skipped, tiny_model_dir):
    root, out, code = skipped
    assert code == 0
    rejected = [json.loads(line) for line in (out / "rejected_rows.jsonl").read_text().splitlines()]
    assert rejected == [
        {"file": f"{root}/data/eval.parquet", "row": 1, "field": "reward_b_rejected", "reason": "non-finite value nan"},
        {"file": f"{root}/data/train.parquet", "row": 3, "field": "rejected", "reason": "identical to chosen"},
    ]
    stats = json.loads((out / schema.STATS_FILE).read_text())
    assert (stats["rows_in"], stats["rows_out"], stats["rows_rejected"]) == (14, 12, 2)
    for s in [stats, *stats["splits"].values()]:
        assert s["rows_in"] == s["rows_out"] + s["rows_rejected"]
    # max_length 3, prompts of 2 tokens: a response keeps 1 token; every response has >= 2 with EOS
    assert stats["rows_truncated"] == 12 and stats["rows_written"] == {"eval": 3, "train": 9}
    manifest = schema.read_manifest(out)
    assert manifest["format"] == "pairs" and manifest["input_format"] == "pairs" and manifest["max_length"] == 3
    assert manifest["splits"] == {"eval": 3, "train": 9} and manifest["tokenizer"] == str(tiny_model_dir)
    assert len(manifest["fingerprint"]) == 64 and manifest["shifts"] == []
    table = pq.read_table(schema.split_dir(out, "train"))
    assert set(table.column_names) == {
        "row_id", "prompt", "chosen", "rejected", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
        "group", "source", "calibration", "reward_a_chosen", "reward_a_rejected", "reward_b_chosen",
        "reward_b_rejected"}
    first = table.slice(0, 1).to_pylist()[0]
    assert first["row_id"] == f"{root}/data/train.parquet:row 0"
    assert (first["prompt"], first["chosen"], first["rejected"]) == ("w0 w0", "w10", "w20 w1")
    assert (first["prompt_input_ids"], first["chosen_input_ids"], first["rejected_input_ids"]) == ([4, 4], [14], [24])
    passthrough = (first["group"], first["source"], first["calibration"], first["reward_a_chosen"])
    assert passthrough == ("g0", "target", 0.25, 0.0)


@pytest.mark.ray
def test_two_worker_streaming_split_sees_every_row_exactly_once(skipped):
    import ray

    _, out, _ = skipped
    # The written rows, as blocks in the object store (read tasks would only add worker start-up time);
    # 12 rows is even, so equal=True drops none.
    tables = [pq.read_table(schema.split_dir(out, name)) for name in ("train", "eval")]
    ds = ray.data.from_arrow(tables)
    shards = ds.streaming_split(2, equal=True)
    seen: list[list[str]] = [[], []]

    def consume(rank):  # the shards are consumed concurrently, as two Train workers would
        for batch in shards[rank].iter_batches(batch_size=3, batch_format="pyarrow"):
            seen[rank].extend(batch.column("row_id").to_pylist())

    threads = [threading.Thread(target=consume, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(timeout=120) for t in threads]
    assert len(seen[0]) == len(seen[1]) == 6
    expected = [rid for table in tables for rid in table.column("row_id").to_pylist()]
    assert sorted(seen[0] + seen[1]) == sorted(expected) and len(set(expected)) == 12


@pytest.mark.ray
def test_listwise_holdout_and_shift_on_train_only(ray_session, tiny_model_dir, tmp_path):
    rows = [{"prompt": f"w{i % 9}", "responses": ["w1", "w2 w3", "w4"], "scores": [0.0, 0.0, 0.0],
             "reward_a": [float(i), 1.0, 2.0], "reward_b": [0.0, 5.0, 1.0], "group": f"g{i % 2}"} for i in range(40)]
    f = write_jsonl(tmp_path / "l.jsonl", rows)
    cfg = DataConfig(dataset=str(f), tokenizer=str(tiny_model_dir), output=str(tmp_path / "o"), eval_fraction=0.25,
                     seed=7, shifts=("mixture:alpha=1",))
    result = prepare_data(cfg)
    from pipelines.data.shifts import row_uniforms

    ids = [f"{f}:row {i}" for i in range(40)]
    held = {rid for rid, u in zip(ids, row_uniforms(ids, 7, "eval_holdout")) if u < 0.25}
    train = pq.read_table(result.output / "train").to_pylist()
    ev = pq.read_table(result.output / "eval").to_pylist()
    assert {r["row_id"] for r in ev} == held and len(train) + len(ev) == 40 and result.splits["eval"] == len(held)
    assert all(r["scores"] == r["reward_a"] for r in train)  # alpha=1: scores become reward_a
    assert all(r["scores"] == [0.0, 0.0, 0.0] for r in ev)  # shift_splits defaults to train only
    assert train[0]["responses_input_ids"] == [[5, EOS], [6, 7, EOS], [8, EOS]]
    assert result.manifest["format"] == "listwise"
    assert result.manifest["shifts"] == ["mixture:alpha=1,form=convex,temperature=1,sample=false"]


def test_split_files_are_sorted_by_name_and_missing_or_empty_splits_are_named(tmp_path):
    for split, names in {"train": ("part-00002", "part-00000", "part-00001"), "eval": ()}.items():
        (tmp_path / split).mkdir()
        for name in names:  # created out of order: readers must not depend on listing order
            pq.write_table(pa.table({"row_id": [name]}), tmp_path / split / f"{name}.parquet")
    schema.write_manifest(tmp_path, format="pairs", tokenizer="tiny", max_length=8, splits={"train": 3, "eval": 0})
    files = schema.split_files(tmp_path, "train")
    assert [f.rsplit("/", 1)[1] for f in files] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    with pytest.raises(UserError, match="split 'eval' has no parquet files"):
        schema.split_files(tmp_path, "eval")
    with pytest.raises(UserError, match="no split 'test'; it has: eval, train"):
        schema.split_files(tmp_path, "test")


@pytest.mark.ray
def test_written_rows_keep_source_order_across_files_actors_and_resampling(ray_session, tiny_model_dir, tmp_path):
    """Two input files, two tokenizer actors, tiny batches and a Poisson resampling shift: the written
    split lists file 0's rows, then file 1's, each in row order, copies right after their original."""
    (tmp_path / "d").mkdir()
    for k in range(2):
        write_jsonl(tmp_path / "d" / f"train-{k}.jsonl",
                    [{"prompt": f"w{i % 7}", "chosen": "w1", "rejected": "w2", "group": f"g{i % 2}"}
                     for i in range(30)])
    cfg = DataConfig(dataset=str(tmp_path / "d"), tokenizer=str(tiny_model_dir), output=str(tmp_path / "o"),
                     batch_size=4, concurrency=2, shifts=("group_weights:g0=1.5,g1=0.5,sampling=poisson",))
    result = prepare_data(cfg)
    written = pq.read_table(result.output / "train").column("row_id").to_pylist()
    assert not any(c.startswith("_") for c in pq.read_table(result.output / "train").column_names)

    def address(rid):  # "train-K.jsonl:row I#C" -> (K, I, C)
        name, rest = rid.rsplit(":row ", 1)
        row, _, copy = rest.partition("#")
        return int(name[-7]), int(row), int(copy or 0)

    keys = [address(r) for r in written]
    assert keys == sorted(keys) and {k[0] for k in keys} == {0, 1}
    assert any(k[2] > 0 for k in keys) and result.splits["train"] == len(written)
