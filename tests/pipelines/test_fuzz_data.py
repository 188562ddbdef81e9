"""Hostile input, fuzzed (issue 12 item 4, data files): property-based tests of the data stage's parsing
and validation with hypothesis.

Generated malformed inputs: JSON lines, JSON documents and parquet files with truncation, invalid
UTF-8, a BOM, CRLF line ends, blank lines, long strings, nested and wrong-typed values, NaN and
inf, duplicate keys, empty files, and folders mixing the three formats.

Invariants:
    - never an exception: every problem is a rejected row (or, end to end, exit 2 with one line);
    - every rejected row is named: file, row, field, a known error code and a reason;
    - rows_in == rows_out + rows_rejected, and rows_in is the number of rows the file holds (an
      independent count from the bytes: non-blank lines, array elements, parquet rows): nothing is
      dropped silently;
    - the same input gives the same output (and the same output whatever the batch size, as Ray
      re-batches freely); valid rows keep their strings exactly.

The bulk runs in-process against the pure per-file functions the stage runs in its Ray tasks
(`formats.iter_file_records`, the read's Arrow conversion, `formats.prepare_rows` and the actor's
Arrow conversion): FILE_EXAMPLES (300) + RECORD_EXAMPLES (300) hypothesis cases per run, with a
fixed seed (derandomize) so a run is reproducible, plus 10 hand-written hostile files
(test_each_hostile_shape_once). A few END_TO_END_EXAMPLES (6) generated folders,
plus one rerun for determinism, go through `pipelines.cli.main(["data", ...])` in one Ray-marked test.

Seven input classes broke an invariant when these tests were written (a .json nested past the
recursion limit, truncated or empty parquet, integer literals over 4300 digits, integers too large
for a float, lone surrogates, lines of non-JSON Unicode whitespace, binary parquet columns); the data
stage now rejects each as a named row, and each keeps its own test below (`test_pinned_*`).
"""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, Phase, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from pipelines import schema
from pipelines.cli import main
from pipelines.data.formats import (
    ERROR_CODES,
    INPUT_FORMATS,
    RowError,
    detect_format,
    iter_file_records,
    output_format,
    parse_record,
    prepare_rows,
    prepared_schema,
)

FILE_EXAMPLES = 300
RECORD_EXAMPLES = 300
END_TO_END_EXAMPLES = 6
RAW_SCHEMA = pa.schema([("file", pa.string()), ("row", pa.int64()), ("record", pa.string()),
                        ("read_error", pa.string())])  # pipelines/data/__init__.py's read schema
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
JSON_WHITESPACE = b" \t\r\n"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- the stage's per-file path, in-process -------------------------------------------------------


def read_file(data: bytes, name: str) -> list[dict]:
    """iter_file_records + the datasource's Arrow conversion (what a Ray read task does with a file)."""
    suffix = name[name.rfind("."):]
    rows = []
    for chunk in iter_file_records(io.BytesIO(data), name, suffix):
        rows.extend(pa.Table.from_pylist(chunk, schema=RAW_SCHEMA).to_pylist())
    return rows


def prepare(records: list[dict], tokenizer, input_format: str, *, batch_size: int | None = None,
            max_length: int = 24) -> list[dict]:
    """prepare_rows per batch + the actor's Arrow conversion (what the map_batches pool does)."""
    out = []
    size = batch_size or max(len(records), 1)
    for start in range(0, len(records), size):
        part = records[start:start + size]
        batch = {key: [r[key] for r in part] for key in RAW_SCHEMA.names}
        columns = prepare_rows(batch, input_format=input_format, tokenizer=tokenizer, max_length=max_length)
        out.extend(pa.Table.from_pydict(columns, schema=prepared_schema(output_format(input_format))).to_pylist())
    return out


def jsonl_row_count(data: bytes) -> int:
    """Rows of JSON lines, counted from the bytes: lines (split at LF, CRs at the end dropped) that are
    not empty or JSON whitespace only; a line that is not UTF-8 is a row too."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return sum(1 for line in lines if line.rstrip(b"\r").strip(JSON_WHITESPACE))


def row_count(data: bytes, name: str) -> int:
    """The rows a file holds, per the README: a .json document is an array (its elements), one record,
    or, when it is not one document, JSON lines (a broken array is one unparsable row)."""
    if name.endswith(".parquet"):
        try:
            return pq.ParquetFile(pa.BufferReader(data)).metadata.num_rows
        except pa.ArrowException:
            return 1  # an unreadable file is one named, unparsable row
    if name.endswith(".json"):
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return 1 if data.lstrip()[:1] == b"[" else jsonl_row_count(data)
        return len(doc) if isinstance(doc, list) else 1
    return jsonl_row_count(data)


def detect(records: list[dict]) -> str:
    """The stage's `auto` format: that of the first parseable record (pipelines/data _detect), else pairs."""
    for record in records:
        try:
            found = detect_format(parse_record(record["record"])) if not record["read_error"] else None
        except RowError:
            continue
        return found or "pairs"  # the stage exits 2 on an unrecognisable first record; validate as pairs
    return "pairs"


def check_invariants(files: dict[str, bytes], tokenizer, input_format: str, batch_size: int) -> list[dict]:
    """Every invariant of the module docstring for one folder of files; returns the prepared rows."""
    prepared = []
    requested = input_format
    for name, data in files.items():
        records = read_file(data, name)
        input_format = detect(records) if requested == "auto" else requested
        assert len(records) == row_count(data, name), name  # nothing dropped by the read
        rows = [r["row"] for r in records]
        assert rows == sorted(set(rows)) and all(r >= 0 for r in rows), rows
        out = prepare(records, tokenizer, input_format)
        assert len(out) == len(records)  # rows_in == rows_out + rows_rejected, per file
        for record, row in zip(records, out):
            assert (row["file"], row["row"], row["row_id"]) == (name, record["row"], f"{name}:row {record['row']}")
            if row["error_code"]:
                assert row["error_code"] in ERROR_CODES and row["error_field"] and row["error_reason"], row
            else:
                assert not record["read_error"] and row["prompt"] and row["prompt_input_ids"]
                if input_format == "pairs":  # strings pass through exactly
                    source = json.loads(record["record"])
                    assert (row["prompt"], row["chosen"], row["rejected"]) == (
                        source["prompt"], source["chosen"], source["rejected"])
        assert prepare(records, tokenizer, input_format) == out  # the same input, the same output
        assert prepare(records, tokenizer, input_format, batch_size=batch_size) == out  # any batching
        prepared.extend(out)
    for row in prepared if currently_in_test_context() else []:  # --hypothesis-show-statistics
        event(f"row: {row['error_code'] or 'valid'}")
    return prepared


# --- generators ----------------------------------------------------------------------------------

WORDS = st.lists(st.sampled_from([f"w{i}" for i in range(40)] + ["", " ", "\n", "\t", "\u00e9", "\U0001f600"]),
                 min_size=1, max_size=6).map(" ".join)
# Text without lone surrogates (pinned below: they crash the tokenizer).
TEXT = st.one_of(WORDS, st.text(st.characters(exclude_categories=("Cs",)), max_size=30),
                 st.integers(0, 3000).map(lambda n: "w1 " * n))  # long strings: truncation, prompt_too_long
NUMBER = st.one_of(st.integers(-(2**53), 2**53), st.floats(allow_nan=True, allow_infinity=True))
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(TEXT, inner, max_size=4)), max_leaves=12)
FIELDS = ["prompt", "chosen", "rejected", "responses", "scores", "weight", "calibration", "group", "source",
          "flipped", "reward_a_chosen", "reward_a_rejected", "reward_b", "extra"]
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", ""]), "content": TEXT}),
                    max_size=3)


@st.composite
def good_row(draw, kind: str):
    """A row of input format `kind` that may be valid (its texts can still be empty or too long),
    with valid optional columns."""
    if kind == "hh":
        prompt = "\n\nHuman: " + draw(TEXT) + "\n\nAssistant:"
        row = {"chosen": prompt + draw(TEXT), "rejected": prompt + draw(TEXT)}
    elif kind == "chat":
        row = {"chosen": draw(MESSAGES), "rejected": draw(MESSAGES)}
    elif kind == "listwise":
        n = draw(st.integers(0, 4))
        row = {"prompt": draw(TEXT), "responses": draw(st.lists(TEXT, min_size=n, max_size=n)),
               "scores": draw(st.lists(NUMBER, min_size=n, max_size=n))}
    else:
        row = {"prompt": draw(TEXT), "chosen": draw(TEXT), "rejected": draw(TEXT)}
    n = len(row.get("responses", ()))
    optional = {
        "group": TEXT, "source": TEXT, "weight": st.floats(0, 10), "flipped": st.booleans(), "extra": VALUE,
        "calibration": st.lists(st.floats(0, 2), min_size=n, max_size=n) if kind == "listwise" else st.floats(0, 2),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True)):
        row[key] = draw(optional[key])
    if draw(st.booleans()):
        if kind == "listwise":
            row["reward_a"] = draw(st.lists(st.floats(-1, 1), min_size=n, max_size=n))
        else:
            row["reward_a_chosen"], row["reward_a_rejected"] = draw(st.floats(-1, 1)), draw(st.floats(-1, 1))
    return row


@st.composite
def records(draw):
    """A JSON value: a row of some input format, the same with fields replaced by anything or
    deleted, or anything at all."""
    kind = draw(st.sampled_from(["good", "good", "mutated", "any"]))
    if kind == "any":
        return draw(VALUE)
    row = draw(good_row(draw(st.sampled_from(INPUT_FORMATS))))
    if kind == "mutated":
        for key in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3)):
            row[key] = draw(st.one_of(VALUE, NUMBER, TEXT, st.lists(NUMBER, max_size=4)))
        for key in draw(st.lists(st.sampled_from(sorted(row)), max_size=2)):
            row.pop(key, None)
    return row


def dump(record, *, ascii_only: bool, duplicate: str | None) -> bytes:
    text = json.dumps(record, ensure_ascii=ascii_only)  # NaN / Infinity tokens for non-finite floats
    if duplicate is not None and text.startswith("{"):  # a duplicate key: JSON keeps the last one
        text = "{" + json.dumps(duplicate) + ": \"first\"" + ("," if text != "{}" else "") + text[1:]
    return text.encode("utf-8")


def python_only_blank(line: bytes) -> bool:
    """A line str.strip() calls blank but JSON does not (pinned below: it is skipped without a row)."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return not text.strip() and bool(line.strip(JSON_WHITESPACE))


GARBAGE_LINE = st.one_of(st.binary(max_size=20), st.text(st.characters(exclude_categories=("Cs",)), max_size=20)
                         .map(lambda s: s.encode("utf-8"))).filter(lambda b: b"\n" not in b
                                                                   and not python_only_blank(b))


@st.composite
def jsonl_file(draw):
    lines = []
    for record in draw(st.lists(records(), max_size=8)):
        kind = draw(st.sampled_from(["record", "record", "record", "garbage", "blank"]))
        if kind == "record":
            duplicate = draw(st.one_of(st.none(), st.sampled_from(FIELDS)))
            lines.append(dump(record, ascii_only=draw(st.booleans()), duplicate=duplicate))
        elif kind == "garbage":
            lines.append(draw(GARBAGE_LINE))
        else:
            lines.append(draw(st.sampled_from([b"", b" ", b"\t", b"\r"])))
    end = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = end.join(lines) + draw(st.sampled_from([b"", end]))
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data  # a UTF-8 BOM: row 0 is then rejected as unparsable, not skipped
    if data and draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]  # truncated anywhere, mid-character included
    return data


@st.composite
def json_file(draw):
    doc = draw(st.one_of(st.lists(records(), max_size=6), records()))
    indent = draw(st.sampled_from([None, 1]))
    text = json.dumps(doc, indent=indent, ensure_ascii=draw(st.booleans()))
    if indent is not None and draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    data = text.encode("utf-8")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    if data and draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return data


COLUMN_TYPES = {
    "string": (pa.string(), st.one_of(st.none(), TEXT)),
    "int": (pa.int64(), st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))),
    "float": (pa.float64(), st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True))),
    "bool": (pa.bool_(), st.one_of(st.none(), st.booleans())),
    "floats": (pa.list_(pa.float64()), st.one_of(st.none(), st.lists(st.floats(), max_size=3))),
    "strings": (pa.list_(pa.string()), st.one_of(st.none(), st.lists(TEXT, max_size=3))),
    "struct": (pa.struct([("role", pa.string()), ("content", pa.string())]),
               st.one_of(st.none(), st.fixed_dictionaries({"role": TEXT, "content": TEXT}))),
}


@st.composite
def parquet_file(draw):
    """A valid parquet file whose columns have any of COLUMN_TYPES (binary columns are pinned below)."""
    n = draw(st.integers(0, 6))
    names = draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=6))
    columns = {}
    for name in names:
        kind = draw(st.sampled_from(["string"] * 3 + sorted(COLUMN_TYPES)))
        arrow_type, values = COLUMN_TYPES[kind]
        columns[name] = pa.array(draw(st.lists(values, min_size=n, max_size=n)), type=arrow_type)
    table = pa.table(columns) if columns else pa.table({"x": pa.array([None] * n, pa.null())})
    sink = io.BytesIO()
    pq.write_table(table, sink, row_group_size=draw(st.integers(1, 4)))
    return sink.getvalue()


def no_python_only_blank_line(data: bytes) -> bool:
    return not any(python_only_blank(line.rstrip(b"\r")) for line in data.split(b"\n"))


FILE = st.one_of(jsonl_file().filter(no_python_only_blank_line).map(lambda b: ("jsonl", b)),
                 json_file().filter(no_python_only_blank_line).map(lambda b: ("json", b)),
                 parquet_file().map(lambda b: ("parquet", b)))


@st.composite
def folders(draw, max_files=4):
    """{file name: bytes}: one to max_files files of mixed formats, empty files included."""
    files = {}
    for i, (suffix, data) in enumerate(draw(st.lists(FILE, min_size=1, max_size=max_files))):
        if suffix != "parquet" and draw(st.integers(0, 9)) == 0:
            data = b""  # an empty file (an empty parquet file is pinned below)
        files[f"part{i}.{suffix}"] = data
    return files


# --- the properties, in-process ------------------------------------------------------------------


@settings(FUZZ, max_examples=FILE_EXAMPLES)
@given(files=folders(), input_format=st.sampled_from(("auto", *INPUT_FORMATS)), batch_size=st.integers(1, 5))
def test_generated_files_keep_every_invariant(tokenizer, files, input_format, batch_size):
    """FILE_EXAMPLES (300) generated folders of .jsonl/.json/.parquet files, each read and prepared
    under one of the four input formats or the detected one, and at a random batch size."""
    check_invariants(files, tokenizer, input_format, batch_size)


@settings(FUZZ, max_examples=RECORD_EXAMPLES)
@given(rows=st.lists(records(), min_size=1, max_size=12), input_format=st.sampled_from(("auto", *INPUT_FORMATS)),
       batch_size=st.integers(1, 5))
def test_generated_records_keep_every_invariant(tokenizer, rows, input_format, batch_size):
    """RECORD_EXAMPLES (300) cases of well-formed JSON lines carrying generated records (good rows,
    rows with fields replaced by any JSON value, arbitrary values): validation never raises."""
    data = b"\n".join(json.dumps(r).encode() for r in rows) + b"\n"
    prepared = check_invariants({"f.jsonl": data}, tokenizer, input_format, batch_size)
    assert len(prepared) == len(rows)


def test_each_hostile_shape_once(tokenizer):
    """The generator's corner cases, pinned so they run even if hypothesis' choices drift."""
    good = json.dumps({"prompt": "w1", "chosen": "w2", "rejected": "w3"}).encode()
    files = {
        "bom.jsonl": b"\xef\xbb\xbf" + good + b"\r\n" + good + b"\r\n",
        "crlf.json": json.dumps([{"prompt": "w1", "chosen": "w2", "rejected": "w3"}] * 2, indent=1)
        .replace("\n", "\r\n").encode(),
        "bad_utf8.jsonl": good + b"\n\xff\xfe\n" + good[:10],
        "nan.jsonl": b'{"prompt": "w1", "chosen": "w2", "rejected": "w3", "weight": NaN}\n'
                     b'{"prompt": "w1", "chosen": "w2", "rejected": "w3", "weight": -Infinity}\n',
        "duplicate.jsonl": b'{"prompt": 5, "prompt": "w1", "chosen": "w2", "rejected": "w3"}\n',
        "empty.jsonl": b"", "empty.json": b"", "broken.json": b'[{"prompt": "w1"', "deep.jsonl": b"[" * 5000 + b"\n",
        "huge.jsonl": json.dumps({"prompt": "w1 " * 50_000, "chosen": "w2", "rejected": "w3"}).encode(),
    }
    prepared = check_invariants(files, tokenizer, "pairs", batch_size=2)
    codes = [(r["file"], r["row"], r["error_code"]) for r in prepared if r["error_code"]]
    assert codes == [("bom.jsonl", 0, "unparsable"), ("bad_utf8.jsonl", 1, "unparsable"),
                     ("bad_utf8.jsonl", 2, "unparsable"), ("nan.jsonl", 0, "non_finite"),
                     ("nan.jsonl", 1, "non_finite"), ("broken.json", 0, "unparsable"),
                     ("deep.jsonl", 0, "unparsable"), ("huge.jsonl", 0, "prompt_too_long")]
    assert sum(not r["error_code"] for r in prepared) == 1 + 2 + 1 + 1  # bom row 1, crlf, bad_utf8 row 0, dup


# --- inputs that break an invariant today (not fixed here: pipelines/data is another helper's) ----


def pin(files: dict[str, bytes], tokenizer, input_format="pairs"):
    check_invariants(files, tokenizer, input_format, batch_size=1)


def test_pinned_deeply_nested_json_document(tokenizer):
    pin({"deep.json": b"[" * 100_000}, tokenizer)


@pytest.mark.parametrize("cut", ["empty", "half"])
def test_pinned_truncated_parquet(tokenizer, cut):
    sink = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["w1"], "chosen": ["w2"], "rejected": ["w3"]}), sink)
    data = sink.getvalue()
    pin({"t.parquet": b"" if cut == "empty" else data[: len(data) // 2]}, tokenizer)


def test_pinned_integer_with_too_many_digits(tokenizer):
    pin({"f.jsonl": b'{"prompt": "w1", "chosen": "w2", "rejected": "w3", "weight": 1' + b"0" * 5000 + b"}\n"},
        tokenizer)


@pytest.mark.parametrize("line", [
    b'{"prompt": "w1", "chosen": "w2", "rejected": "w3", "weight": 1' + b"0" * 400 + b"}",
    b'{"prompt": "w1", "responses": ["w2", "w3"], "scores": [1' + b"0" * 400 + b", 0]}",
], ids=["weight", "scores"])
def test_pinned_integer_too_large_for_a_float(tokenizer, line):
    pin({"f.jsonl": line + b"\n"}, tokenizer, "listwise" if b"responses" in line else "pairs")


def test_pinned_lone_surrogate(tokenizer):
    pin({"f.jsonl": b'{"prompt": "w1 \\ud800", "chosen": "w2", "rejected": "w3"}\n'}, tokenizer)


@pytest.mark.parametrize("line", ["\u00a0", "\u2028", "\x0b", "\x1c"], ids=["nbsp", "u2028", "vt", "fs"])
def test_pinned_unicode_blank_line(tokenizer, line):
    pin({"f.jsonl": ("{}\n" + line + "\n").encode("utf-8")}, tokenizer)


def test_pinned_binary_parquet_column(tokenizer):
    sink = io.BytesIO()
    pq.write_table(pa.table({"prompt": pa.array([b"\x80\x04"], pa.binary()), "chosen": ["w2"], "rejected": ["w3"]}),
                   sink)
    out = prepare(read_file(sink.getvalue(), "b.parquet"), tokenizer, "pairs")
    assert out[0]["error_code"] == "wrong_type", out[0]["prompt"]


# --- end to end: a few generated folders through `robust-dpo data` --------------------------------


@pytest.mark.ray
def test_generated_folders_through_the_cli(ray_session, tiny_model_dir, tmp_path_factory, capsys):
    """END_TO_END_EXAMPLES (6) generated folders mixing .jsonl/.json/.parquet, some with
    `--on-invalid skip`: exit 0 or 2 and no exception; data_stats.json has rows_in == rows_out +
    rows_rejected with rows_in the files' own row count; rejected_rows.jsonl names every rejected row
    (file, row, field, reason); the written rows are the valid ones of the in-process path, in file
    order. The folder with the most rows is run a second time and gives byte-identical outputs."""
    examples = []

    @settings(FUZZ, max_examples=END_TO_END_EXAMPLES, phases=[Phase.generate])
    @given(files=folders(max_files=3), skip=st.booleans())
    def collect(files, skip):
        examples.append((files, skip))

    collect()
    assert 4 <= len(examples) <= END_TO_END_EXAMPLES
    tokenizer = _tokenizer(tiny_model_dir)
    outputs = []
    for index, (files, skip) in enumerate(examples):
        src = tmp_path_factory.mktemp(f"fuzz{index}")
        for name, data in files.items():
            (src / name).write_bytes(data)
        args = [str(src), "--tokenizer", str(tiny_model_dir), "--format", "pairs", "max_length=24",
                *(["--on-invalid", "skip"] if skip else [])]
        out = src.parent / f"{src.name}_out"
        code = run_stage(out, *args)
        err = capsys.readouterr().err
        assert code in (0, 2), err
        stats = json.loads((out / schema.STATS_FILE).read_text())
        expected_in = sum(row_count(data, name) for name, data in files.items())
        assert stats["rows_in"] == expected_in == stats["rows_out"] + stats["rows_rejected"], (stats, files)
        rejected = ([json.loads(line) for line in (out / "rejected_rows.jsonl").read_text().splitlines()]
                    if stats["rows_rejected"] else [])
        assert len(rejected) == stats["rows_rejected"]
        for entry in rejected:
            assert set(entry) == {"file", "row", "field", "reason"} and entry["field"] and entry["reason"]
            assert entry["file"].startswith(str(src)) and entry["row"] >= 0
        outputs.append((stats["rows_in"], args, out, code))
        if stats["rows_rejected"] and not skip:
            assert code == 2 and "invalid row(s)" in err.splitlines()[-1]
            continue
        assert code == 0
        in_process = [row for name, data in files.items()
                      for row in prepare(read_file(data, str(src / name)), tokenizer, "pairs") if not row["error_code"]]
        assert [(r["row_id"], r["prompt"], r["chosen"], r["rejected"]) for r in written_rows(out)] == [
            (r["row_id"], r["prompt"], r["chosen"], r["rejected"]) for r in in_process]
    _, args, out, code = max(outputs, key=lambda o: o[0])  # rerun the folder with the most rows
    again = out.parent / f"{out.name}_again"
    assert run_stage(again, *args) == code
    assert output_files(again) == output_files(out)


def run_stage(out, src, *args) -> int:
    return main(["data", "--dataset", src, "--output", str(out), *args])


def written_rows(out) -> list[dict]:
    return [row for path in sorted((out / "train").glob("*.parquet")) for row in pq.read_table(path).to_pylist()]


def output_files(out) -> dict[str, bytes]:
    """The stage's outputs except the manifest (whose only run-specific field is none, but it names
    paths) and timings.json (wall-clock: the one file that differs between equal runs)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in (schema.MANIFEST_FILE, "timings.json")}


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


@pytest.mark.ray
def test_pinned_truncated_parquet_through_the_cli(ray_session, tiny_model_dir, tmp_path, capsys):
    sink = io.BytesIO()
    pq.write_table(pa.table({"prompt": ["w1"], "chosen": ["w2"], "rejected": ["w3"]}), sink)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text(json.dumps({"prompt": "w1", "chosen": "w2", "rejected": "w3"}) + "\n")
    (tmp_path / "src" / "b.parquet").write_bytes(sink.getvalue()[:20])
    code = run_stage(tmp_path / "out", str(tmp_path / "src"), "--tokenizer", str(tiny_model_dir))
    assert code == 2 and "b.parquet" in capsys.readouterr().err
