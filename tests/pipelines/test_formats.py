"""Formats, validation and tokenisation, row by row, without Ray (pipelines/data/formats.py).

The tiny word tokenizer's ids: <pad>=0 <unk>=1 <bos>=2 <eos>=3, then w0..w39 = 4..43, so "wK" is K+4.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.data.formats import (
    RowError, detect_format, iter_file_records, normalize_record, prepare_rows, prepared_schema, render_plain,
)

EOS = 3


def ids(text: str) -> list[int]:
    return [int(w[1:]) + 4 for w in text.split()]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def records_of(path) -> list[dict]:
    with open(path, "rb") as f:
        return [r for chunk in iter_file_records(f, str(path), path.suffix) for r in chunk]


def prepare(records: list, tokenizer, fmt="pairs", max_length=16, **kw) -> dict:
    batch = {"file": ["f.jsonl"] * len(records), "row": list(range(len(records))),
             "record": [r if isinstance(r, str) else json.dumps(r) for r in records],
             "read_error": [""] * len(records)}
    return prepare_rows(batch, input_format=fmt, tokenizer=tokenizer, max_length=max_length, **kw)


# --- reading files -------------------------------------------------------------------------------


def test_jsonl_rows_are_line_numbers_blank_lines_skipped_bad_lines_kept(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"a": 1}\n\n{broken\n\xff\xfe\n{"a": 2}')  # no final newline
    rows = records_of(path)
    assert [(r["row"], r["record"], bool(r["read_error"])) for r in rows] == [
        (0, '{"a": 1}', False), (2, "{broken", False), (3, "", True), (4, '{"a": 2}', False)]
    assert rows[2]["read_error"] == "not valid UTF-8 at byte 0"


def test_json_array_json_lines_and_broken_array(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"a": 1}, {"a": 2}]))
    (tmp_path / "l.json").write_text('{"a": 1}\n{"a": 2}\n')
    (tmp_path / "b.json").write_text('[{"a": 1},')
    (tmp_path / "o.json").write_text(json.dumps({"a": 1, "b": [1, 2]}, indent=2))  # one pretty-printed record
    assert [json.loads(r["record"]) for r in records_of(tmp_path / "a.json")] == [{"a": 1}, {"a": 2}]
    assert [r["row"] for r in records_of(tmp_path / "l.json")] == [0, 1]
    assert [(r["row"], json.loads(r["record"])) for r in records_of(tmp_path / "o.json")] == [(0, {"a": 1, "b": [1, 2]})]
    [broken] = records_of(tmp_path / "b.json")
    assert broken["row"] == 0 and broken["read_error"].startswith("not a valid JSON array")


def test_parquet_rows_keep_types_and_index(tmp_path):
    table = pa.table({"prompt": ["w1", "w2"], "scores": [[1.0, float("nan")], [0.5, 0.25]], "k": [1, None]})
    pq.write_table(table, tmp_path / "d.parquet")
    rows = records_of(tmp_path / "d.parquet")
    assert [r["row"] for r in rows] == [0, 1]
    first = json.loads(rows[0]["record"])
    assert first["prompt"] == "w1" and first["scores"][0] == 1.0 and first["scores"][1] != first["scores"][1]
    assert json.loads(rows[1]["record"]) == {"prompt": "w2", "scores": [0.5, 0.25], "k": None}


# --- the four formats ----------------------------------------------------------------------------


def test_detect_format():
    assert detect_format({"prompt": "a", "chosen": "b", "rejected": "c"}) == "pairs"
    assert detect_format({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "x"}) == "hh"
    assert detect_format({"chosen": [{"role": "user", "content": "a"}], "rejected": []}) == "chat"
    assert detect_format({"prompt": "a", "responses": ["b", "c"], "scores": [1, 0]}) == "listwise"
    assert detect_format({"text": "a"}) is None


def test_pairs_tokenised_with_eos_and_passthrough(tokenizer):
    out = prepare([{"prompt": "w1 w2", "chosen": "w3 w4", "rejected": "w5", "group": "g1", "source": "human",
                    "weight": 2, "calibration": 0.5, "reward_a_chosen": 1.5, "reward_a_rejected": -1, "id": 7}],
                  tokenizer)
    assert out["error_code"] == [""] and out["row_id"] == ["f.jsonl:row 0"]
    assert out["prompt_input_ids"] == [ids("w1 w2")]
    assert out["chosen_input_ids"] == [ids("w3 w4") + [EOS]] and out["rejected_input_ids"] == [ids("w5") + [EOS]]
    assert json.loads(out["extras"][0]) == {"group": "g1", "source": "human", "weight": 2.0, "calibration": 0.5,
                                            "reward_a_chosen": 1.5, "reward_a_rejected": -1.0}
    assert out["ignored"] == ["id"] and out["truncated"] == [False]
    assert pa.Table.from_pydict(out, schema=prepared_schema("pairs")).num_rows == 1


def test_hh_splits_at_the_last_assistant_turn():
    chosen = "\n\nHuman: w1\n\nAssistant: w2\n\nHuman: w3\n\nAssistant: w4 w5"
    rejected = "\n\nHuman: w1\n\nAssistant: w2\n\nHuman: w3\n\nAssistant: w6"
    row = normalize_record({"chosen": chosen, "rejected": rejected}, "hh")
    assert row["prompt"] == "\n\nHuman: w1\n\nAssistant: w2\n\nHuman: w3\n\nAssistant:"
    assert (row["chosen"], row["rejected"]) == (" w4 w5", " w6")


def test_hh_prompts_must_match():
    with pytest.raises(RowError) as err:
        normalize_record({"chosen": "\n\nHuman: w1\n\nAssistant: w2", "rejected": "\n\nHuman: w9\n\nAssistant: w3"},
                         "hh")
    assert (err.value.field, err.value.code) == ("rejected", "prompt_mismatch")


def test_chat_plain_rendering_extracts_the_shared_prompt():
    user = {"role": "user", "content": "w1"}
    row = normalize_record({"chosen": [user, {"role": "assistant", "content": "w2"}],
                            "rejected": [user, {"role": "assistant", "content": "w3"}]}, "chat")
    assert row["prompt"] == render_plain([user], True) == "user: w1\nassistant:"
    assert (row["chosen"], row["rejected"]) == (" w2", " w3")


def test_chat_uses_the_tokenizer_chat_template(tiny_model_dir):
    from pipelines.world.toy_models import build_word_tokenizer

    template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
                "{% if add_generation_prompt %}assistant {% endif %}")
    tok = build_word_tokenizer(["user", "assistant"] + [f"w{i}" for i in range(10)], chat_template=template)
    out = prepare([{"prompt": [{"role": "user", "content": "w1"}], "chosen": [{"role": "assistant", "content": "w2"}],
                    "rejected": [{"role": "assistant", "content": "w3"}]}], tok, fmt="chat")
    assert out["prompt"] == ["user w1 <eos> assistant "] and out["chosen"] == ["w2 <eos> "]
    w = tok.convert_tokens_to_ids
    # the template ends the turn with <eos> itself, so no second EOS is appended (TRL does the same)
    assert out["chosen_input_ids"] == [[w("w2"), w("<eos>")]]
    assert out["prompt_input_ids"] == [[w("user"), w("w1"), w("<eos>"), w("assistant")]]


def test_listwise_tokenised(tokenizer):
    out = prepare([{"prompt": "w1", "responses": ["w2 w3", "w4", "w5"], "scores": [0.5, 2, -1],
                    "calibration": [0.1, 0.2, 0.3], "reward_len": [2, 1, 1]}], tokenizer, fmt="listwise")
    assert out["error_code"] == [""]
    assert out["responses_input_ids"] == [[ids("w2 w3") + [EOS], ids("w4") + [EOS], ids("w5") + [EOS]]]
    assert out["scores"] == [[0.5, 2.0, -1.0]]
    assert json.loads(out["extras"][0]) == {"calibration": [0.1, 0.2, 0.3], "reward_len": [2.0, 1.0, 1.0]}


# --- truncation (TRL 1.16 keep_start over prompt + response) -------------------------------------


def test_truncation_keeps_the_start_and_is_counted(tokenizer):
    # max_length 4, prompt 2 tokens -> each response keeps 4 - 2 = 2 tokens; "w3 w4 w5"+EOS -> [w3, w4]
    out = prepare([{"prompt": "w1 w2", "chosen": "w3 w4 w5", "rejected": "w6"},
                   {"prompt": "w1 w2", "chosen": "w3", "rejected": "w6"},
                   {"prompt": "w1 w2", "chosen": "w3", "rejected": "w6 w7"}], tokenizer, max_length=4)
    assert out["chosen_input_ids"][0] == ids("w3 w4") and out["rejected_input_ids"][0] == ids("w6") + [EOS]
    # exactly max_length: "w6 w7"+EOS is 3 tokens > 2, so row 2 is truncated too (its EOS is cut)
    assert out["truncated"] == [True, False, True]
    assert out["rejected_input_ids"][2] == ids("w6 w7")


def test_prompt_too_long(tokenizer):
    out = prepare([{"prompt": "w1 w2 w3 w4", "chosen": "w5", "rejected": "w6"},
                   {"prompt": "w1 w2 w3", "chosen": "w5", "rejected": "w6"}], tokenizer, max_length=4)
    assert out["error_code"] == ["prompt_too_long", ""]
    assert out["error_reason"][0] == "4 tokens leave no room for a response within max_length 4"
    out = prepare([{"prompt": "w1 w2 w3", "chosen": "w5", "rejected": "w6"}], tokenizer, max_length=8,
                  max_prompt_length=2)
    assert out["error_reason"] == ["3 tokens, more than max_prompt_length 2"]


# --- every validation reason ---------------------------------------------------------------------

P = {"prompt": "w1", "chosen": "w2", "rejected": "w3"}
L = {"prompt": "w1", "responses": ["w2", "w3"], "scores": [1.0, 0.0]}


@pytest.mark.parametrize("record, fmt, field, code, reason", [
    ("{oops", "pairs", "record", "unparsable",
     "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("[1, 2]", "pairs", "record", "not_an_object", "expected a JSON object, got a list"),
    ({"prompt": "w1", "chosen": "w2"}, "pairs", "rejected", "missing", "missing"),
    ({**P, "prompt": None}, "pairs", "prompt", "null", "is null"),
    ({**P, "chosen": "  "}, "pairs", "chosen", "empty", "is empty"),
    ({**P, "rejected": ["w3"]}, "pairs", "rejected", "wrong_type", "expected a string, got a list"),
    ({**P, "rejected": "w2"}, "pairs", "rejected", "identical", "identical to chosen"),
    ({**P, "group": 1.5}, "pairs", "group", "wrong_type", "expected a string, got a number"),
    ({**P, "weight": -1}, "pairs", "weight", "out_of_range", "must be >= 0, got -1.0"),
    ({**P, "calibration": float("nan")}, "pairs", "calibration", "non_finite", "non-finite value nan"),
    ({**P, "reward_a_chosen": 1.0}, "pairs", "reward_a_rejected", "missing",
     "required because reward_a_chosen is present"),
    ({**P, "reward_a_chosen": 1.0, "reward_a_rejected": float("inf")}, "pairs", "reward_a_rejected", "non_finite",
     "non-finite value inf"),
    ({**L, "scores": [1.0]}, "listwise", "scores", "length_mismatch", "has 1 values but there are 2 responses"),
    ({**L, "scores": [1.0, float("nan")]}, "listwise", "scores", "non_finite", "non-finite value nan at index 1"),
    ({**L, "scores": [1.0, "x"]}, "listwise", "scores", "wrong_type", "expected numbers, got a string at index 1"),
    ({**L, "calibration": [0.1, 0.2, 0.3]}, "listwise", "calibration", "length_mismatch",
     "has 3 values but there are 2 responses"),
    ({**L, "responses": ["w2"], "scores": [1.0]}, "listwise", "responses", "too_few_responses",
     "needs at least 2 responses, got 1"),
    ({**L, "responses": ["w2", ""]}, "listwise", "responses[1]", "empty", "is empty"),
    ({"chosen": "\n\nHuman: w1 w2", "rejected": "\n\nHuman: w1\n\nAssistant: w3"}, "hh", "chosen",
     "no_assistant_turn", "no '\\n\\nAssistant:' turn to split the prompt at"),
    ({"chosen": [{"role": "user"}], "rejected": [{"role": "user", "content": "w1"}]}, "chat", "chosen[0].content",
     "missing", "missing"),
    ({"chosen": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}],
      "rejected": [{"role": "user", "content": "w1"}]}, "chat", "rejected", "empty", "no turns after the prompt"),
])
def test_validation_reason(tokenizer, record, fmt, field, code, reason):
    ok = json.dumps(L if fmt == "listwise" else P) if fmt in ("pairs", "listwise") else None
    records = [record] + ([ok] if ok else [])
    out = prepare(records, tokenizer, fmt=fmt)
    assert (out["error_field"][0], out["error_code"][0], out["error_reason"][0]) == (field, code, reason)
    assert out["prompt_input_ids"][0] == [] and out["row"][0] == 0
    if ok:  # one bad row does not spoil its batch
        assert out["error_code"][1] == "" and out["prompt_input_ids"][1] == ids("w1")


def test_read_error_becomes_an_unparsable_row(tokenizer):
    batch = {"file": ["f"], "row": [3], "record": [""], "read_error": ["not valid UTF-8 at byte 0"]}
    out = prepare_rows(batch, input_format="pairs", tokenizer=tokenizer, max_length=8)
    assert (out["error_field"], out["error_code"], out["error_reason"]) == (
        ["record"], ["unparsable"], ["not valid UTF-8 at byte 0"])


def test_each_format_from_files(tmp_path, tokenizer):
    """pairs from parquet, hh from jsonl, chat from a json array, listwise from jsonl: file -> rows."""
    pq.write_table(pa.table({"prompt": ["w1"], "chosen": ["w2"], "rejected": ["w3"]}), tmp_path / "p.parquet")
    (tmp_path / "h.jsonl").write_text(json.dumps({"chosen": "\n\nHuman: w1\n\nAssistant: w2",
                                                  "rejected": "\n\nHuman: w1\n\nAssistant: w3"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps([{"prompt": "w1", "chosen": [{"role": "assistant", "content": "w2"}],
                                                  "rejected": [{"role": "assistant", "content": "w3"}]}]))
    (tmp_path / "l.jsonl").write_text(json.dumps(L) + "\n")
    for name, fmt in (("p.parquet", "pairs"), ("h.jsonl", "hh"), ("c.json", "chat"), ("l.jsonl", "listwise")):
        rows = records_of(tmp_path / name)
        assert detect_format(json.loads(rows[0]["record"])) == fmt
        batch = {k: [r[k] for r in rows] for k in rows[0]}
        out = prepare_rows(batch, input_format=fmt, tokenizer=tokenizer, max_length=8)
        assert out["error_code"] == [""], (name, out["error_reason"])
        assert out["row_id"] == [f"{tmp_path / name}:row 0"]
        responses = out["responses_input_ids"][0] if fmt == "listwise" else [out["chosen_input_ids"][0]]
        assert responses[0][-1] == EOS and tokenizer.convert_ids_to_tokens(responses[0])[0] in ("w2", "<unk>")
