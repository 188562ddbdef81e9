"""Preference-data formats, row by row (pure, no Ray): read file records, detect, normalise, validate, tokenise.

Four input formats normalise into two row shapes (pipelines/schema.py):

    pairs     {"prompt": "w1 w2", "chosen": "w3", "rejected": "w4"}                       -> pairs
    hh        {"chosen": "\\n\\nHuman: w1\\n\\nAssistant: w3",
               "rejected": "\\n\\nHuman: w1\\n\\nAssistant: w4"}                          -> pairs
    chat      {"chosen": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w3"}],
               "rejected": [... same user turn ..., {"role": "assistant", "content": "w4"}]}  -> pairs
    listwise  {"prompt": "w1", "responses": ["w3", "w4", "w5"], "scores": [2.0, 1.0, 0.5]}  -> listwise

Files are read record by record with a 0-based row index per file (`iter_file_records`), so every
problem, an unparsable line included, is reported as `<file>:row <index>: <field>: <message>` and
counted under its `code` (ERROR_CODES).  Optional columns (group, source, weight, calibration,
calibration_oracle, p_target_chosen/p_target_rejected (p_target listwise), reward_<name>..., flipped)
are type-checked and passed through; other keys are ignored and listed in data_stats.json.
`prepare_rows` is the data stage's whole `map_batches` transform: one output row per input row.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Sequence

from pipelines import schema
from pipelines.errors import first_line
from pipelines.schema import P_TARGET_LIST, P_TARGET_PAIR

INPUT_FORMATS = ("pairs", "hh", "chat", "listwise")
# The HH split point (Bai et al. 2022, Anthropic HH-RLHF): the prompt is everything through the LAST
# assistant marker, so multi-turn dialogues keep their history in the prompt.
HH_MARKER = "\n\nAssistant:"
# Why each row can be rejected; data_stats.json counts rows per code.
ERROR_CODES = (
    "unparsable", "not_an_object", "missing", "null", "empty", "wrong_type", "invalid_text", "identical",
    "length_mismatch", "too_few_responses", "non_finite", "out_of_range", "no_assistant_turn",
    "prompt_mismatch", "prompt_too_long",
)
STRING_PASSTHROUGH = ("group", "source")

Render = Callable[[Sequence[Mapping[str, str]], bool], str]


class RowError(Exception):
    """One bad row: `field` names the column (or `record` for the whole line), `code` its ERROR_CODE."""

    def __init__(self, field: str, code: str, message: str):
        assert code in ERROR_CODES, code
        super().__init__(f"{field}: {message}")
        self.field, self.code, self.message = field, code, message


def parse_record(text: str) -> dict[str, Any]:
    """One JSON record as a dict; RowError('record', unparsable|not_an_object) otherwise."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError, ValueError) as exc:
        msg = getattr(exc, "msg", None) or ("too deeply nested" if isinstance(exc, RecursionError) else str(exc))
        col = getattr(exc, "colno", None)
        where = f" at column {col}" if col else ""
        raise RowError("record", "unparsable", f"not valid JSON ({msg}{where})") from None
    if not isinstance(value, dict):
        raise RowError("record", "not_an_object", f"expected a JSON object, got {_type(value)}")
    return value


def detect_format(record: Mapping[str, Any]) -> str | None:
    """Guess the input format of one parsed record; None when it fits none of them."""
    if "responses" in record:
        return "listwise"
    chosen = record.get("chosen")
    if isinstance(chosen, list):
        return "chat"
    if isinstance(record.get("prompt"), str) and "chosen" in record:
        return "pairs"
    if isinstance(chosen, str) and HH_MARKER in chosen:
        return "hh"
    return None


def output_format(input_format: str) -> str:
    """The row shape an input format normalises to: 'listwise' or 'pairs'."""
    return "listwise" if input_format == "listwise" else "pairs"


def render_plain(messages: Sequence[Mapping[str, str]], add_generation_prompt: bool) -> str:
    """Chat rendering without a chat template: `role: content` lines; the generation prompt appends
    "\\nassistant:" so the completion continues it (prompt "user: w1\\nassistant:", completion " w3")."""
    text = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
    return text + ("\nassistant:" if add_generation_prompt else "")


def normalize_record(record: Mapping[str, Any], input_format: str, render: Render = render_plain) -> dict[str, Any]:
    """{"prompt", "chosen", "rejected" | "responses", "scores", "extras": validated optional columns}
    of one parsed record, or a RowError for its first problem.  `render(messages, add_generation_prompt)`
    renders chat rows."""
    if input_format == "pairs":
        row = {name: _text(record, name) for name in schema.PAIR_TEXT_COLUMNS}
    elif input_format == "hh":
        row = _split_hh(_text(record, "chosen"), _text(record, "rejected"))
    elif input_format == "chat":
        row = _render_chat(record, render)
    elif input_format == "listwise":
        row = _listwise(record)
    else:
        raise ValueError(f"unknown input format {input_format!r}")
    if "responses" not in row and row["chosen"] == row["rejected"]:
        raise RowError("rejected", "identical", "identical to chosen")
    row["extras"] = _extras(record, len(row["responses"]) if "responses" in row else None)
    return row


def ignored_keys(record: Mapping[str, Any], input_format: str) -> list[str]:
    """Keys of `record` that are neither inputs of `input_format` nor pass-through columns."""
    used = schema.LIST_TEXT_COLUMNS if input_format == "listwise" else schema.PAIR_TEXT_COLUMNS
    known = {*used, *STRING_PASSTHROUGH, "weight", "flipped", *schema.CALIBRATION_COLUMNS, *P_TARGET_PAIR,
             P_TARGET_LIST}
    return sorted(k for k in record if k not in known and not k.startswith("reward_"))


# --- the formats -------------------------------------------------------------------------------


def _split_hh(chosen: str, rejected: str) -> dict[str, str]:
    parts = []
    for field, dialogue in (("chosen", chosen), ("rejected", rejected)):
        cut = dialogue.rfind(HH_MARKER)
        if cut < 0:
            raise RowError(field, "no_assistant_turn", f"no {HH_MARKER!r} turn to split the prompt at")
        cut += len(HH_MARKER)
        if not dialogue[cut:].strip():
            raise RowError(field, "empty", "the last assistant turn is empty")
        parts.append((dialogue[:cut], dialogue[cut:]))
    (prompt, chosen_reply), (rejected_prompt, rejected_reply) = parts
    if prompt != rejected_prompt:
        raise RowError("rejected", "prompt_mismatch",
                       "its dialogue before the last assistant turn differs from chosen's")
    return {"prompt": prompt, "chosen": chosen_reply, "rejected": rejected_reply}


def _render_chat(record: Mapping[str, Any], render: Render) -> dict[str, str]:
    chosen = _messages(record, "chosen")
    rejected = _messages(record, "rejected")
    if record.get("prompt") is not None:
        prompt = ([{"role": "user", "content": record["prompt"]}] if isinstance(record["prompt"], str)
                  else _messages(record, "prompt"))
    else:
        # No explicit prompt: the longest common prefix of turns is the prompt (as TRL's
        # `extract_prompt` does), so only the diverging turns are scored as responses.
        k = 0
        while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
            k += 1
        if k == 0:
            raise RowError("prompt", "missing", "no prompt and chosen/rejected share no first turn")
        prompt, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    for field, tail in (("chosen", chosen), ("rejected", rejected)):
        if not tail:
            raise RowError(field, "empty", "no turns after the prompt")
    prompt_text = render(prompt, True)
    full = [render(list(prompt) + list(chosen), False), render(list(prompt) + list(rejected), False)]
    # The completion starts where the rendered prompt and prompt+completion diverge (TRL 1.16
    # `common_prefix_length` does the same on token ids), so a template that renders the prompt
    # alone differently still yields a prompt that is a true prefix of both sequences.
    cut = min(len(os.path.commonprefix([prompt_text, text])) for text in full)
    row = {"prompt": prompt_text[:cut], "chosen": full[0][cut:], "rejected": full[1][cut:]}
    if not row["prompt"].strip():
        raise RowError("prompt", "empty", "renders to empty text")
    return row


def _listwise(record: Mapping[str, Any]) -> dict[str, Any]:
    prompt = _text(record, "prompt")
    responses = _list(record, "responses")
    if len(responses) < 2:
        raise RowError("responses", "too_few_responses", f"needs at least 2 responses, got {len(responses)}")
    for i, r in enumerate(responses):
        _check_text(f"responses[{i}]", r)
    scores = _numbers(record, "scores", len(responses))
    return {"prompt": prompt, "responses": list(responses), "scores": scores}


def _extras(record: Mapping[str, Any], n_responses: int | None) -> dict[str, Any]:
    """Validated optional columns; None values count as absent.  `n_responses` is None for pair rows,
    whose numeric columns hold one number, else the length of each listwise numeric column."""
    def number(key: str) -> float | list[float]:
        return _number(record[key], key) if n_responses is None else _numbers(record, key, n_responses)

    out: dict[str, Any] = {}
    for key in STRING_PASSTHROUGH:
        value = record.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise RowError(key, "wrong_type", f"expected a string, got {_type(value)}")
        out[key] = str(value)
    if record.get("weight") is not None:
        weight = _number(record["weight"], "weight")
        if weight < 0:
            raise RowError("weight", "out_of_range", f"must be >= 0, got {weight!r}")
        out["weight"] = weight
    if record.get("flipped") is not None:
        if not isinstance(record["flipped"], bool):
            raise RowError("flipped", "wrong_type", f"expected true/false, got {_type(record['flipped'])}")
        out["flipped"] = record["flipped"]
    for key in schema.CALIBRATION_COLUMNS:  # DoRA's h~: the classifier's, and the oracle's where the data has it
        if record.get(key) is not None:
            out[key] = number(key)
    # P(target | response), from which a source_mixture shift recomputes h~ for the new mix
    for key in (P_TARGET_PAIR if n_responses is None else (P_TARGET_LIST,)):
        if record.get(key) is not None:
            out[key] = number(key)
            if not all(0.0 <= v <= 1.0 for v in (out[key] if n_responses is not None else [out[key]])):
                raise RowError(key, "out_of_range", f"must be in [0, 1], got {record[key]!r}")
    if n_responses is None and (record.get(P_TARGET_PAIR[0]) is None) != (record.get(P_TARGET_PAIR[1]) is None):
        present, missing = P_TARGET_PAIR if record.get(P_TARGET_PAIR[0]) is not None else P_TARGET_PAIR[::-1]
        raise RowError(missing, "missing", f"required because {present} is present")
    for key in sorted(k for k in record if k.startswith("reward_") and record[k] is not None):
        if n_responses is None:
            for own, other in (("_chosen", "_rejected"), ("_rejected", "_chosen")):
                if key.endswith(own) and record.get(key[: -len(own)] + other) is None:
                    raise RowError(key[: -len(own)] + other, "missing", f"required because {key} is present")
            if not key.endswith(("_chosen", "_rejected")):
                raise RowError(key, "wrong_type", "pair rows carry reward_<name>_chosen and reward_<name>_rejected")
        out[key] = number(key)
    return out


# --- field checks --------------------------------------------------------------------------------


def _get(record: Mapping[str, Any], field: str) -> Any:
    if field not in record:
        raise RowError(field, "missing", "missing")
    if record[field] is None:
        raise RowError(field, "null", "is null")
    return record[field]


def _text(record: Mapping[str, Any], field: str) -> str:
    return _check_text(field, _get(record, field))


def _check_text(field: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RowError(field, "wrong_type" if value is not None else "null",
                       f"expected a string, got {_type(value)}" if value is not None else "is null")
    if not value.strip():
        raise RowError(field, "empty", "is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate (JSON "\ud800"): no tokenizer can encode it
        raise RowError(field, "invalid_text", f"not valid Unicode text (lone surrogate at character {exc.start})") from None
    return value


def _list(record: Mapping[str, Any], field: str) -> list:
    value = _get(record, field)
    if not isinstance(value, (list, tuple)):
        raise RowError(field, "wrong_type", f"expected a list, got {_type(value)}")
    return list(value)


def _messages(record: Mapping[str, Any], field: str) -> list[dict[str, str]]:
    messages = _list(record, field)
    if not messages:
        raise RowError(field, "empty", "is an empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise RowError(f"{field}[{i}]", "wrong_type", f"expected a {{role, content}} object, got {_type(m)}")
        for key in ("role", "content"):
            if key not in m:
                raise RowError(f"{field}[{i}].{key}", "missing", "missing")
            _check_text(f"{field}[{i}].{key}", m[key])
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _number(value: Any, field: str, index: int | None = None) -> float:
    """A finite number (an integer too large for a float is not finite); `index`: its place in a list."""
    at = "" if index is None else f" at index {index}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "a number" if index is None else "numbers"
        raise RowError(field, "wrong_type", f"expected {what}, got {_type(value)}{at}")
    try:
        finite = math.isfinite(value)
    except OverflowError:
        finite = False
    if not finite:
        text = repr(value)
        short = text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"
        raise RowError(field, "non_finite", f"non-finite value {short}{at}")
    return float(value)


def _numbers(record: Mapping[str, Any], field: str, length: int) -> list[float]:
    values = _list(record, field)
    if len(values) != length:
        raise RowError(field, "length_mismatch", f"has {len(values)} values but there are {length} responses")
    return [_number(v, field, i) for i, v in enumerate(values)]


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


# --- files -> records ----------------------------------------------------------------------------

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")  # .arrow: `datasets` save_to_disk shards (Arrow IPC streams)
RECORDS_PER_CHUNK = 2048
JSON_WHITESPACE = " \t\r\n"  # RFC 8259 insignificant whitespace


def iter_file_records(stream: BinaryIO, file: str, suffix: str) -> Iterator[list[dict[str, Any]]]:
    """Yield chunks of `{file, row, record, read_error}` dicts, one per row of one file, in file order.

    `row` is 0-based in file order.  A .json file holding one JSON document is an array of records
    (row = array index) or a single record; any other .json file, and every .jsonl file, is JSON
    lines and `row` is the line number, so `row 3` is the 4th line: blank lines are not rows (they
    are skipped, not counted in rows_in) but keep the numbering.  `record` is the row's JSON text:
    parquet rows and JSON-array elements are re-encoded as JSON, so every source reaches validation
    in one shape and a column whose type varies per row (possible in JSON) cannot break an Arrow
    block.  `read_error` is non-empty when the row could not be read (invalid UTF-8, a broken array).
    """
    if suffix in (".parquet", ".arrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        row = 0
        data = pa.BufferReader(stream.read())
        try:  # an Arrow IPC stream's (a save_to_disk shard's) batches may be large: sliced too
            batches = (pq.ParquetFile(data).iter_batches(batch_size=RECORDS_PER_CHUNK) if suffix == ".parquet"
                       else pa.ipc.open_stream(data))
            for batch in batches:
                for start in range(0, batch.num_rows, RECORDS_PER_CHUNK):
                    records = batch.slice(start, RECORDS_PER_CHUNK).to_pylist()
                    yield [_record(file, row + i, json.dumps(r, default=_json_default)) for i, r in enumerate(records)]
                    row += len(records)
        except (pa.ArrowException, OSError) as exc:  # truncated, empty or not a parquet/arrow file at all
            yield [_record(file, row, "", f"cannot read the {suffix[1:]} file after {row} row(s) ({first_line(exc)})")]
        return
    if suffix == ".json":
        data = stream.read()
        try:  # one JSON document: an array of records, or a single record
            doc = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            if data.lstrip()[:1] == b"[":
                where = f" at line {exc.lineno} column {exc.colno}" if hasattr(exc, "lineno") else ""
                yield [_record(file, 0, "", f"not a valid JSON array ({getattr(exc, 'msg', exc)}{where})")]
                return
            doc = None  # not one document: JSON lines, read below
        if doc is not None:
            items = doc if isinstance(doc, list) else [doc]
            for start in range(0, len(items), RECORDS_PER_CHUNK):
                part = items[start: start + RECORDS_PER_CHUNK]
                yield [_record(file, start + i, json.dumps(r)) for i, r in enumerate(part)]
            return
        stream = io.BytesIO(data)
    chunk: list[dict[str, Any]] = []
    for index, raw in enumerate(_lines(stream)):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            chunk.append(_record(file, index, "", f"not valid UTF-8 at byte {exc.start}"))
            continue
        if not line.strip(JSON_WHITESPACE):  # only what JSON itself skips; U+00A0 etc. make an unparsable row
            continue
        chunk.append(_record(file, index, line))
        if len(chunk) >= RECORDS_PER_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _lines(stream: BinaryIO) -> Iterator[bytes]:
    """Lines of a binary stream without their end-of-line bytes, read 1 MiB at a time."""
    rest = b""
    while True:
        block = stream.read(1 << 20)
        if not block:
            break
        parts = (rest + block).split(b"\n")
        rest = parts.pop()
        for part in parts:
            yield part.rstrip(b"\r")
    if rest:
        yield rest.rstrip(b"\r")


def _json_default(value: Any) -> Any:
    """Columnar values JSON has no type for: bytes become {"$binary": hex} (so a binary column is a
    wrong_type, never text), dates and decimals their string."""
    if isinstance(value, (bytes, bytearray)):
        return {"$binary": bytes(value).hex()}
    return str(value)


def _record(file: str, row: int, record: str, read_error: str = "") -> dict[str, Any]:
    return {"file": file, "row": row, "record": record, "read_error": read_error}


# --- records -> validated, tokenised rows (the map_batches transform) ----------------------------


def output_columns(fmt: str) -> tuple[str, ...]:
    """The text + token columns of an output row shape (pipelines/schema.py)."""
    if fmt == "listwise":
        return schema.LIST_TEXT_COLUMNS + schema.LIST_TOKEN_COLUMNS
    return schema.PAIR_TEXT_COLUMNS + schema.PAIR_TOKEN_COLUMNS


def prepared_schema(fmt: str):
    """Arrow schema of `prepare_rows` output: provenance, error, truncation, extras + output columns."""
    import pyarrow as pa

    ids = pa.list_(pa.int32())
    lists = {"responses": pa.list_(pa.string()), "scores": pa.list_(pa.float64()), "responses_input_ids": pa.list_(ids)}
    cols = [("file", pa.string()), ("row", pa.int64()), ("row_id", pa.string()), ("error_field", pa.string()),
            ("error_code", pa.string()), ("error_reason", pa.string()), ("truncated", pa.bool_()),
            ("extras", pa.string()), ("ignored", pa.string())]
    return pa.schema(cols + [(name, lists.get(name, ids if name.endswith("_ids") else pa.string()))
                             for name in output_columns(fmt)])


def prepare_rows(
    batch: Mapping[str, Sequence[Any]],
    *,
    input_format: str,
    tokenizer: Any,
    max_length: int,
    max_prompt_length: int | None = None,
) -> dict[str, list[Any]]:
    """Parse, normalise, validate and tokenise a batch of raw records; one output row per input row.

    Tokenisation: the prompt with the tokenizer's special tokens (e.g. BOS), each response
    separately without them, as the DPO reference's `tokenize_batch_element` does, so no text is
    glued across the prompt/response boundary; EOS is appended to each response (not for chat
    templates, which end turns themselves, as TRL 1.16 does).  Truncation follows TRL 1.16's
    `DataCollatorForPreference` with `truncation_mode="keep_start"` (its default): prompt + response is
    cut to its first `max_length` tokens, i.e. the response keeps `max_length - len(prompt)` tokens.
    A prompt that leaves no room for a response (TRL drops these rows silently) is rejected here as
    `prompt_too_long`, as is one longer than `max_prompt_length` (None: max_length - 1).

    `batch` has the columns of `iter_file_records`' dicts; the result those of
    `prepared_schema(output_format(input_format))`, a rejected row with a non-empty `error_code` and
    empty text/token columns.
    """
    fmt = output_format(input_format)
    use_template = input_format == "chat" and bool(getattr(tokenizer, "chat_template", None))
    render = (lambda msgs, gen: tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)) \
        if use_template else render_plain
    out: dict[str, list[Any]] = {name: [] for name in prepared_schema(fmt).names}
    rows: list[dict[str, Any] | RowError] = []
    for i in range(len(batch["record"])):
        try:
            if batch["read_error"][i]:
                raise RowError("record", "unparsable", batch["read_error"][i])
            record = parse_record(batch["record"][i])
            row = normalize_record(record, input_format, render)
            row["ignored"] = ",".join(ignored_keys(record, input_format))
            rows.append(row)
        except RowError as err:
            rows.append(err)
    _tokenize(rows, tokenizer, fmt, add_special_tokens=not use_template, append_eos=not use_template)
    prompt_limit = max_prompt_length if max_prompt_length is not None else max_length - 1
    for i, row in enumerate(rows):
        if not isinstance(row, RowError):
            row = _truncate(row, fmt, max_length, prompt_limit, max_prompt_length is not None)
        if isinstance(row, RowError):
            row = {"error_field": row.field, "error_code": row.code, "error_reason": row.message, "truncated": False,
                   "extras": {}, "ignored": "", **{name: _empty(name) for name in output_columns(fmt)}}
        file, index = batch["file"][i], int(batch["row"][i])
        values = {"error_field": "", "error_code": "", "error_reason": "", **row, "file": file, "row": index,
                  "row_id": f"{file}:row {index}", "extras": json.dumps(row["extras"])}
        for name, column in out.items():
            column.append(values[name])
    return out


def _tokenize(rows: list, tokenizer: Any, fmt: str, *, add_special_tokens: bool, append_eos: bool) -> None:
    """Add token ids to the valid rows in place, with one tokenizer call per text kind."""
    valid = [r for r in rows if not isinstance(r, RowError)]
    if not valid:
        return
    prompts = tokenizer([r["prompt"] for r in valid], add_special_tokens=add_special_tokens)["input_ids"]
    keys = ("responses",) if fmt == "listwise" else ("chosen", "rejected")
    texts = [t for r in valid for k in keys for t in (r[k] if k == "responses" else [r[k]])]
    replies = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    for row, prompt_ids in zip(valid, prompts):
        row["prompt_input_ids"] = list(prompt_ids)
        for key in keys:
            count = len(row["responses"]) if key == "responses" else 1
            ids = [list(next(replies)) for _ in range(count)]
            if append_eos and eos is not None:
                ids = [x if x[-1:] == [eos] else x + [eos] for x in ids]
            row[f"{key}_input_ids"] = ids if key == "responses" else ids[0]


def _truncate(row: dict, fmt: str, max_length: int, prompt_limit: int, explicit: bool) -> dict | RowError:
    n_prompt = len(row["prompt_input_ids"])
    if n_prompt > prompt_limit:
        why = (f"{n_prompt} tokens, more than max_prompt_length {prompt_limit}" if explicit else
               f"{n_prompt} tokens leave no room for a response within max_length {max_length}")
        return RowError("prompt", "prompt_too_long", why)
    keep = max_length - n_prompt
    keys = ("responses_input_ids",) if fmt == "listwise" else ("chosen_input_ids", "rejected_input_ids")
    truncated = False
    for key in keys:
        seqs = row[key] if fmt == "listwise" else [row[key]]
        truncated |= any(len(s) > keep for s in seqs)
        cut = [s[:keep] for s in seqs]
        row[key] = cut if fmt == "listwise" else cut[0]
    row["truncated"] = truncated
    return row


def _empty(name: str) -> Any:
    return [] if name.endswith(("_ids", "responses", "scores")) else ""
