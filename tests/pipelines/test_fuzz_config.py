"""Hostile input, fuzzed (issue 12 item 4, config): property-based tests of every stage's
`key=value` overrides with hypothesis, through the real entry point `pipelines.cli.main` with
`--print-config` (which resolves the whole config and returns before any Ray work).

Generated inputs, per stage of `cli.STAGES`: overrides of the stage's real keys (`config.describe`
of its CONFIG, plus the train keys of a catch-all `base`) with values of their types spelled in
several ways (leading zeros, `1.50`, `0x1F`, booleans as yes/On/FALSE, `a,b` lists, `null`), mixed
with hostile ones: unknown and empty keys, `key=`, `=value`, `a..b=1`, unicode keys, dotted keys
through a scalar (`train.lr.x=1`), wrong-typed values (text for numbers, nan, inf, 1e400, integers
too large for a float or for `int()`), broken and tagged YAML (`[1,2`, `!!python/object:os.system`,
`!!binary`, dates), flow mappings, duplicate keys, very long strings, NUL bytes and newlines.

Invariants:
    - `main` never raises: it returns 0 or 2;
    - exit 2 prints nothing on stdout and exactly one line on stderr, `robust-dpo: error: ...`,
      naming the key when one key is at fault (an unknown key is always exit 2 naming it);
    - exit 0 prints YAML that parses, with no key it does not know (nothing accepted unread), and
      every valid override of a known key holds its value, coerced to the key's type (never
      silently dropped or changed; the last of duplicate overrides wins);
    - the same command line gives the same output.

Each run: VALID_EXAMPLES (30) + HOSTILE_EXAMPLES (25) + UNKNOWN_EXAMPLES (10) hypothesis cases for
each of the 7 stages (455 cases, about 630 `main` calls with the hostile cases' determinism reruns),
with a fixed seed (derandomize) so a run is reproducible, plus 7 smoke and 6 flag-key tests and 50
pinned cases: about 45 s on this project's two-core machine (single-threaded CPU time).

Input classes that broke an invariant when these tests were written, each fixed in
pipelines/config.py or pipelines/paths.py and kept as a `test_pinned_*` test:
    - tracebacks: integers over 4300 digits and YAML nested past the recursion limit (YAML raised
      ValueError / RecursionError), integers too large for a float (OverflowError), YAML dates,
      !!binary and !!set values reaching --print-config's JSON (TypeError), mapping keys of mixed
      types (`train={1: a, b: 2}`: sorted() TypeError), a catch-all given a scalar (`base=5` plus a
      train key in tune), paths with a NUL byte (ValueError) or a name the file system refuses
      (OSError: File name too long);
    - silently accepted or changed: nan and inf for any float key (`train.lr=inf`, `beta=nan`), a
      str key holding YAML's reading of its text (`data.train_split=007` held "7", `1.50` "1.5",
      `1:30` "90"; `reference.cache_dir=0755` pointed at .../493), int keys reading a leading zero
      as octal (`train.batch_size=010` held 8), a key given with and without the stage's section
      name (`beta=0.3 evaluate.beta=0.2` held 0.3 whatever the order), tune's --print-config taking
      unknown and mistyped train keys (`tune foo=1`, `tune train.lr=x` exited 0);
    - not one line, or naming nothing: a newline in a key, an override or a path (two-line
      errors), an empty key part (`.seed=1` was "unknown config key ''");
    - valid values refused: `evaluate use_gpu=true` (YAML's True is not the choice "true"), a str
      key given `no`/`On` or a date, a list key given one number (`synth.group_alphas=0.5`).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import string
import types
import typing
from typing import Annotated, Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines import config as config_lib
from pipelines import paths as paths_lib
from pipelines.cli import STAGES, main

VALID_EXAMPLES = 30
HOSTILE_EXAMPLES = 25
UNKNOWN_EXAMPLES = 10
FUZZ = settings(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
ERROR = "robust-dpo: error: "
PLACEHOLDERS = ("model", "data", "ckpt")  # empty folders in the working directory: --print-config loads nothing

# What each stage needs on its command line before any override (paths relative to the work dir).
STAGE_FLAGS: dict[str, list[str]] = {
    "synth": ["--output", "out"],
    "data": ["--dataset", "data", "--tokenizer", "model", "--output", "out"],
    "reference": ["--data", "data", "--model", "model", "--output", "out"],
    "train": ["--output", "out"],
    "evaluate": ["--checkpoint", "ckpt", "--reference", "model", "--data", "data", "--output", "out"],
    "tune": ["--output", "out"],
    "run": ["--output", "out"],
}
STAGE_OVERRIDES = {"train": ["model.path=model", "data.path=data", "objective.name=dpo"]}  # train's required keys
FLAG_KEYS = {  # keys a required flag sets: an override of one is exit 2 naming it
    "data": {"dataset", "tokenizer", "output"},
    "reference": {"data", "model", "output"},
    "train": {"output"},
    "evaluate": {"checkpoints", "reference", "data", "output"},
    "tune": {"output"},
    "run": {"output"},
}
SECTIONS = {"data": "data", "evaluate": "evaluate"}  # `build_config(..., section=)`: `evaluate.beta` = `beta`
RUN_OWN = ("model", "data", "output", "evaluate.beta")  # keys `run` sets itself (exit 2 naming them)


# --- the stages' keys, from their config classes ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Leaf:
    key: str  # as typed on the command line
    printed: str  # where --print-config shows it
    tp: Any  # the annotation, Annotated path kinds included
    kind: str | None  # pipelines.paths kind


def _bare(tp: Any) -> Any:
    return typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp


def leaves(cls: type, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, annotation) of every leaf of config class `cls`, as `config.describe` walks it."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        key, tp = f"{prefix}{f.name}", hints[f.name]
        out += leaves(_bare(tp), key + ".") if dataclasses.is_dataclass(_bare(tp)) else [(key, tp)]
    return out


def stage_leaves(stage: str) -> list[Leaf]:
    cls = importlib.import_module(STAGES[stage][0]).CONFIG
    described = [k.key for k in config_lib.describe(cls)]
    own = leaves(cls)
    assert [k for k, _ in own] == described  # the keys `--help` lists are the keys tested here
    out = []
    for key, tp in own:
        field = next(f for f in dataclasses.fields(cls) if f.name == key.split(".")[0])
        schema = field.metadata.get("schema")
        if schema is None:
            out.append(Leaf(key, key, tp, paths_lib._kind_of(tp)))
        else:  # a catch-all: the schema's keys are typed at the top level and printed under it
            own_names = {f.name for f in dataclasses.fields(cls)}
            out += [Leaf(k, f"{key}.{k}", t, paths_lib._kind_of(t)) for k, t in leaves(schema)
                    if k.split(".")[0] not in own_names]  # the stage's own keys win
    return out


LEAVES = {stage: stage_leaves(stage) for stage in STAGES}
KNOWN = {stage: {leaf.key for leaf in LEAVES[stage]} | {leaf.printed for leaf in LEAVES[stage]} for stage in STAGES}


def known_prefixes(stage: str) -> set[str]:
    return {".".join(k.split(".")[:i]) for k in KNOWN[stage] for i in range(1, k.count(".") + 1)}


def open_prefixes(stage: str) -> tuple[str, ...]:
    """Keys under which any sub-key may be accepted: dict-typed keys, and the objective section
    (its hyperparameters depend on objective.name; tune checks them per trial, not at --print-config)."""
    opened = [leaf.key + "." for leaf in LEAVES[stage] if _bare(leaf.tp) is dict or typing.get_origin(_bare(leaf.tp)) is dict]
    return tuple(opened + ["objective."] if any(k.startswith("objective.") for k in KNOWN[stage]) else opened)


def is_known(stage: str, key: str) -> bool:
    section = SECTIONS.get(stage)
    if section and key.startswith(section + "."):
        key = key[len(section) + 1:]
    return key in KNOWN[stage] or key in known_prefixes(stage) or key.startswith(open_prefixes(stage))


# --- values ---------------------------------------------------------------------------------------

SKIP = object()  # a value whose printed form is not checked (only the exit behaviour)
TEXT = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)
NUMBER_LIKE = ["007", "010", "1.50", "1e3", "1e400", "0x1F", "0o17", "1_000", ".5", "+1", "-0", "1:30", "2024-01-01",
               "yes", "no", "on", "Off", "TRUE", "false", "3", "-1", "0.0", "nan", "inf"]
BOOLS = {"true": True, "false": False, "True": True, "FALSE": False, "yes": True, "No": False, "on": True,
         "OFF": False}
HOSTILE_VALUES = [
    "", " ", "\t", "nan", "NaN", ".nan", "inf", "-inf", ".inf", "-.Inf", "1e400", "1.0e+400", "-1.0e+400",
    "9" * 400, "9" * 5000, "-" + "9" * 400, "[1,2", "[1, 2]", "[]", "{}", "{a: 1}", "{a: 1", "{1: a, b: 2}",
    "!!python/object:os.system", "!!python/object/apply:os.system ['true']", "!!binary aGVsbG8=", "!!set {a}",
    "!!timestamp 2024-01-01", "2024-01-01", "2024-02-30", "2024-01-01 10:00:00", "!!float x", "!!int 0x",
    "!!str 5", "? a", "- a", "-", "&a x", "*a", "|\n x", ">", "%YAML", "@x", "`x", "'unterminated", '"a\\nb"',
    "a #c", "a: b", "a\x00b", "\x00", "a\nb", "a\rb", "x" * 20000, "[" * 1000, "{a: " * 600, "yes", "No", "oN",
    "1", "0", "2", "-1", "0x1F", "0o17", "0b101", "010", "1_000", "1:30", "~", "null", "NULL", "é", "\u2028",
    "\ud800".encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "a,b", ",", "a,,b", "=", "==",
]


def _path_value(kind: str):
    if kind == paths_lib.OUTPUT:
        return TEXT.map(lambda t: (t, lambda cwd: str((cwd / t).resolve())))
    return st.sampled_from(PLACEHOLDERS).map(lambda t: (t, lambda cwd: str((cwd / t).resolve())))


def valid_value(tp: Any, kind: str | None) -> st.SearchStrategy:
    """(text, expected) pairs for annotation `tp`: `expected` is the value --print-config must show
    after the override (a function of the working directory for paths), or SKIP."""
    tp = _bare(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if kind == paths_lib.REWARD:
        return st.just(("", ""))
    if kind is not None and tp is str:
        return _path_value(kind)
    if origin in (typing.Union, types.UnionType):
        inner = [valid_value(a, kind) for a in args if a is not type(None)]
        return st.one_of(*inner, st.just(("null", None)))
    if origin is typing.Literal:
        return st.sampled_from([(str(a), a) for a in args])
    if tp is bool:
        return st.sampled_from(sorted(BOOLS.items()))
    if tp is int:
        n = st.integers(0, 64) | st.integers(-10**6, 10**6) | st.integers(-10**30, 10**30)
        return st.one_of(n.map(lambda i: (str(i), i)),
                         n.filter(lambda i: i >= 0).map(lambda i: (f"0{i}", i)),  # a leading zero is not octal
                         st.integers(-2**53, 2**53).map(lambda i: (f"{i}.0", i)),
                         n.map(lambda i: (f"{i:_}", i)))
    if tp is float:
        x = st.floats(0, 1) | st.floats(allow_nan=False, allow_infinity=False)
        return st.one_of(x.map(lambda f: (repr(f), f)), x.map(lambda f: (f"{f:.4e}", float(f"{f:.4e}"))),
                         st.integers(-1000, 1000).map(lambda i: (str(i), float(i))),
                         st.sampled_from([("1.50", 1.5), ("0010", 10.0), (".5", 0.5), ("1e-3", 1e-3)]))
    if tp is str:
        return st.one_of(TEXT, st.sampled_from(NUMBER_LIKE), st.just("")).map(lambda t: (t, t))
    if origin in (list, tuple) or tp in (list, tuple):
        item_tp = args[0] if args else str
        if kind is not None:
            return st.just(("", SKIP))  # lists of paths: the flags' (evaluate --checkpoint)
        items = st.lists(valid_value(item_tp, kind), max_size=3)
        return items.map(lambda xs: (",".join(t for t, _ in xs),
                                     [e for t, e in xs] if all(t != "" for t, _ in xs) else SKIP))
    return st.just(("", SKIP))  # dict sections: hostile values only


def valid_leaves(stage: str) -> list[Leaf]:
    out = []
    for leaf in LEAVES[stage]:
        if stage in ("tune", "run") and leaf.key.startswith("objective."):
            continue  # per-objective hyperparameters; tune_spaces' own tests cover them
        if _bare(leaf.tp) is dict:
            continue
        if leaf.key in FLAG_KEYS.get(stage, ()) or (stage == "run" and leaf.key.startswith(RUN_OWN)):
            continue  # exit 2 by design: test_a_flag_key_or_a_key_run_sets_is_exit_2_naming_it
        out.append(leaf)
    return out


@st.composite
def valid_overrides(draw, stage: str):
    """[(override text, leaf, expected)] for 1-3 distinct keys, sometimes after an earlier override
    of the first key (the last wins)."""
    chosen = draw(st.lists(st.sampled_from(valid_leaves(stage)), min_size=1, max_size=3, unique_by=lambda l: l.key))
    out = []
    for leaf in chosen:
        text, expected = draw(valid_value(leaf.tp, leaf.kind))
        key = leaf.key
        if stage in SECTIONS and draw(st.booleans()):
            key = f"{SECTIONS[stage]}.{key}"
        out.append((f"{key}={text}", leaf, expected))
    if draw(st.booleans()):
        text, _ = draw(valid_value(chosen[0].tp, chosen[0].kind))
        out.insert(0, (f"{out[0][0].split('=', 1)[0]}={text}", None, SKIP))
    return out


def _key_text(stage: str):
    leaf_keys = sorted(KNOWN[stage])
    return st.one_of(
        st.sampled_from(leaf_keys),
        st.sampled_from(leaf_keys).map(lambda k: k + ".x"),  # through a scalar
        st.sampled_from(leaf_keys).map(lambda k: k.replace(".", "..", 1) if "." in k else "." + k),
        st.sampled_from(sorted(known_prefixes(stage)) or ["x"]),
        st.sampled_from(["", ".", "a..b", "a.", ".a", " ", "a b", "é", "ключ", "\u2028", "a\nb", "a\x00b", "\x1b[31m",
                         "base", "base.train.lr", "rest", "__class__", "0", "true", "null"]),
        st.text(min_size=1, max_size=8),
    )


@st.composite
def hostile_override(draw, stage: str):
    key = draw(_key_text(stage))
    value = draw(st.one_of(st.sampled_from(HOSTILE_VALUES), st.text(max_size=20), TEXT))
    shape = draw(st.sampled_from(["kv", "kv", "kv", "kv", "key=", "=value", "key", "value"]))
    item = {"kv": f"{key}={value}", "key=": f"{key}=", "=value": f"={value}", "key": key, "value": value}[shape]
    return item if not item.startswith("-") else "x" + item  # argparse owns words starting with '-'


# --- running the CLI ------------------------------------------------------------------------------


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    for name in PLACEHOLDERS:
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(capsys, stage: str, overrides: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    argv = [stage, *STAGE_FLAGS[stage], "--print-config", *STAGE_OVERRIDES.get(stage, []), *overrides]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def check_exit(code: int, out: str, err: str) -> Any:
    """The invariants every command line keeps; returns the printed config (exit 0) or the error."""
    assert code in (0, 2), (code, out, err)
    if code == 2:
        assert out == "", out
        assert err.startswith(ERROR) and err.endswith("\n") and err.count("\n") == 1, repr(err)
        return err[len(ERROR):-1]
    assert err == "", err
    printed = yaml.safe_load(out)
    assert isinstance(printed, dict), out
    return printed


def lookup(tree: dict, dotted: str) -> Any:
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node


def names_key(message: str, key: str, stage: str) -> bool:
    """Whether an error line names `key` (or a dotted prefix of it, e.g. 'model' of run's model.path,
    or its last part in a cross-field rule: "... micro_batch_size x num_workers")."""
    section = SECTIONS.get(stage)
    keys = [key] + ([key[len(section) + 1:]] if section and key.startswith(section + ".") else [])
    keys += [key[len("base."):]] if key.startswith("base.") else []  # tune's and run's catch-all, by name
    parts = [".".join(k.split(".")[:i]) for k in keys for i in range(1, k.count(".") + 2)]
    return any(f"'{p}'" in message or f"{p!r}" in message for p in parts) or key.split(".")[-1] in message


def same(printed: Any, expected: Any) -> bool:
    if isinstance(expected, float) and isinstance(printed, (int, float)):
        return printed == expected or (math.isnan(printed) and math.isnan(expected))
    if isinstance(expected, (list, tuple)):
        return isinstance(printed, list) and len(printed) == len(expected) and all(map(same, printed, expected))
    return type(printed) is type(expected) and printed == expected


# --- the properties -------------------------------------------------------------------------------


def test_every_stage_is_fuzzed():
    assert set(STAGE_FLAGS) == set(STAGES)


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_prints_its_config(stage, workdir, capsys):
    printed = check_exit(*run_cli(capsys, stage, []))
    assert isinstance(printed, dict)


@pytest.mark.parametrize("stage", list(STAGES))
def test_generated_valid_overrides_hold_their_value(stage, workdir, capsys):
    @settings(FUZZ, max_examples=VALID_EXAMPLES)
    @given(overrides=valid_overrides(stage))
    def prop(overrides):
        code, out, err = run_cli(capsys, stage, [text for text, _, _ in overrides])
        result = check_exit(code, out, err)
        if code == 2:
            assert any(names_key(result, text.split("=", 1)[0], stage) for text, _, _ in overrides), result
            return
        for text, leaf, expected in overrides:
            if leaf is None or expected is SKIP:
                continue
            want = expected(workdir) if callable(expected) else expected
            got = lookup(result, leaf.printed)
            assert same(got, want), (text, got, want)
        for text, leaf, _ in overrides:  # flag keys and run's own keys are never silently replaced
            key = text.split("=", 1)[0]
            key = key.split(".", 1)[1] if stage in SECTIONS and key.startswith(SECTIONS[stage] + ".") else key
            assert key not in FLAG_KEYS.get(stage, ()), (text, "accepted over its flag")
            assert not (stage == "run" and key.startswith(RUN_OWN)), (text, "accepted over run's own value")

    prop()


@pytest.mark.parametrize("stage", list(STAGES))
def test_generated_hostile_overrides_exit_0_or_2_with_one_line(stage, workdir, capsys):
    @settings(FUZZ, max_examples=HOSTILE_EXAMPLES)
    @given(overrides=st.lists(st.one_of(hostile_override(stage), valid_overrides(stage).map(lambda v: v[-1][0])),
                              min_size=1, max_size=4))
    def prop(overrides):
        first = run_cli(capsys, stage, overrides)
        result = check_exit(*first)
        assert run_cli(capsys, stage, overrides) == first  # the same input gives the same output
        if first[0] == 2:  # the line names the override or the key at fault
            assert any(repr(item) in result or names_key(result, item.split("=", 1)[0], stage)
                       for item in overrides), (overrides, result)
        else:
            for item in overrides:  # nothing was accepted unread
                key = item.split("=", 1)[0]
                assert "=" in item and is_known(stage, key), (item, "accepted")

    prop()


@st.composite
def unknown_key(draw, stage: str):
    names = st.text(st.characters(categories=("L", "N"), include_characters="_"), min_size=1, max_size=10)
    name = draw(names | st.sampled_from(["nope", "lrr", "bacth_size", "Output", "base_", "évaluer"]))
    sections = sorted({k.split(".")[0] for k in KNOWN[stage] if "." in k}
                      - {p[:-1] for p in open_prefixes(stage)} - {"objective"})
    prefix = draw(st.sampled_from([""] + [s + "." for s in sections]))
    key = prefix + name
    if is_known(stage, key) or (stage in SECTIONS and key in (SECTIONS[stage],)):
        key = prefix + name + "_x"
    return key


@pytest.mark.parametrize("stage", list(STAGES))
def test_generated_unknown_keys_exit_2_naming_them(stage, workdir, capsys):
    @settings(FUZZ, max_examples=UNKNOWN_EXAMPLES)
    @given(key=unknown_key(stage), value=st.sampled_from(["1", "x", "", "true", "[1]"]))
    def prop(key, value):
        code, out, err = run_cli(capsys, stage, [f"{key}={value}"])
        message = check_exit(code, out, err)
        assert code == 2, (key, "accepted")
        assert f"'{key}'" in message or f"{key!r}" in message, (key, message)

    prop()


@pytest.mark.parametrize("stage", [s for s in STAGES if FLAG_KEYS.get(s)])
def test_a_flag_key_or_a_key_run_sets_is_exit_2_naming_it(stage, workdir, capsys):
    for key in sorted(FLAG_KEYS[stage]) + (["model.path", "data.path", "evaluate.beta"] if stage == "run" else []):
        code, out, err = run_cli(capsys, stage, [f"{key}=model"])
        message = check_exit(code, out, err)
        assert code == 2 and names_key(message, key, stage), (key, message)


# --- pinned: each input class that broke an invariant when these tests were written ---------------


def expect_error(capsys, stage: str, overrides: list[str], *needles: str) -> str:
    code, out, err = run_cli(capsys, stage, overrides)
    message = check_exit(code, out, err)
    assert code == 2 and all(n in message for n in needles), (overrides, message)
    return message


def expect_config(capsys, stage: str, overrides: list[str]) -> dict:
    code, out, err = run_cli(capsys, stage, overrides)
    printed = check_exit(code, out, err)
    assert code == 0, (overrides, printed)
    return printed


def test_pinned_integer_over_4300_digits(workdir, capsys):
    """YAML's int() raised ValueError (a traceback); now the text stays text: an int key refuses it, a
    str key holds it."""
    expect_error(capsys, "synth", ["synth.seed=" + "9" * 5000], "'synth.seed'", "expected an integer")
    assert expect_config(capsys, "train", ["data.train_split=" + "9" * 5000])["data"]["train_split"] == "9" * 5000


def test_pinned_yaml_nested_past_the_recursion_limit(workdir, capsys):
    """yaml.safe_load raised RecursionError (a traceback); now the text stays text."""
    expect_error(capsys, "train", ["train.lr=" + "[" * 1000 + "]" * 1000], "'train.lr'", "expected a finite number")
    assert expect_config(capsys, "train", ["wandb.entity=" + "[" * 1000])["wandb"]["entity"] == "[" * 1000


def test_pinned_integer_too_large_for_a_float(workdir, capsys):
    """float(int) raised OverflowError (a traceback)."""
    expect_error(capsys, "train", ["train.lr=" + "9" * 400], "'train.lr'", "expected a finite number")


@pytest.mark.parametrize("stage, override", [
    ("train", "train.lr=.inf"), ("train", "train.max_grad_norm=inf"), ("train", "train.weight_decay=1e400"),
    ("evaluate", "beta=nan"), ("evaluate", "evaluate.beta=-.inf"), ("synth", "synth.ref_lr=1.0e+400"),
    ("run", "synth.filler_penalty=.NaN"),
])
def test_pinned_non_finite_number(workdir, capsys, stage, override):
    """nan and inf passed (`train.lr=inf` trained with an infinite step, `beta=nan` held nan)."""
    key = override.split("=")[0].removeprefix("evaluate.")
    expect_error(capsys, stage, [override], f"'{key}'", "expected a finite number")


@pytest.mark.parametrize("text", ["007", "1.50", "1_000", "0x1F", "-0", "1:30", "no", "On", "2024-01-01", "[a, b]"])
def test_pinned_str_key_keeps_the_text_as_typed(workdir, capsys, text):
    """A str key held YAML's reading of the text: `007` -> "7", `1.50` -> "1.5", `1:30` -> "90" (or
    refused it: `no` -> False, a date); a path key the same (`reference.cache_dir=0755` wrote to 493)."""
    printed = expect_config(capsys, "train", [f"data.train_split={text}", f"reference.cache_dir={text}"])
    assert printed["data"]["train_split"] == text
    assert printed["reference"]["cache_dir"] == str((workdir / text).resolve())


def test_pinned_int_key_reads_a_leading_zero_as_decimal(workdir, capsys):
    """YAML 1.1 read `010` as octal: `train.batch_size=010` held 8."""
    printed = expect_config(capsys, "train", ["train.batch_size=010", "train.micro_batch_size=02", "train.lr=01.5"])
    assert printed["train"]["batch_size"] == 10 and printed["train"]["micro_batch_size"] == 2
    assert printed["train"]["lr"] == 1.5
    assert expect_config(capsys, "train", ["train.seed=0x1F"])["train"]["seed"] == 31  # YAML's hex still reads


def test_pinned_list_key_given_one_number(workdir, capsys):
    """`synth.group_alphas=0.5` was "expected a list, got 0.5" while `0.5,0` worked."""
    printed = expect_config(capsys, "synth", ["synth.group_alphas=0.5", "synth.group_weights=1"])
    assert printed["synth"]["group_alphas"] == [0.5] and printed["synth"]["group_weights"] == [1.0]


@pytest.mark.parametrize("stage, override, key", [
    ("tune", "train.lr=!!binary aGVsbG8=", "train.lr"),
    ("tune", "search.overrides={dpo: {beta: [2024-01-01]}}", "search.overrides"),
    ("evaluate", "split=!!set {a}", None),
])
def test_pinned_yaml_dates_binary_and_sets(workdir, capsys, stage, override, key):
    """YAML-only values (a date, !!binary, !!set) reached --print-config's JSON (a TypeError traceback)
    or the config; now the text stays text, and a str key holds it."""
    if key is None:
        assert expect_config(capsys, stage, [override])["split"] == "!!set {a}"
    else:
        expect_error(capsys, stage, [override], f"'{key}'")
    assert expect_config(capsys, "tune", ["objective.beta=2024-01-01"])["base"]["objective"]["beta"] == "2024-01-01"


@pytest.mark.parametrize("text", ["true", "false", "auto"])
def test_pinned_evaluate_use_gpu_true(workdir, capsys, text):
    """`use_gpu=true`, the documented spelling, was "True is not one of ['auto', 'true', 'false']"."""
    assert expect_config(capsys, "evaluate", [f"use_gpu={text}"])["use_gpu"] == text


@pytest.mark.parametrize("stage, overrides, key", [
    ("evaluate", ["beta=0.3", "evaluate.beta=0.2"], "beta"),
    ("evaluate", ["evaluate.generation.seed=1", "generation.seed=2"], "generation.seed"),
    ("data", ["data.max_length=64", "max_length=32"], "max_length"),
])
def test_pinned_key_given_with_and_without_the_section_name(workdir, capsys, stage, overrides, key):
    """The plain spelling silently won whatever the order (`beta=0.3 evaluate.beta=0.2` held 0.3)."""
    expect_error(capsys, stage, overrides, f"config key '{key}' is given twice")
    printed = expect_config(capsys, stage, [overrides[0].replace("2", "9"), overrides[0]])  # one spelling: last wins
    assert lookup(printed, key.removeprefix("evaluate.")) == yaml.safe_load(overrides[0].split("=")[1])


@pytest.mark.parametrize("override, needle", [
    (".seed=1", "'.seed=1' has an empty key part"),
    ("synth..seed=1", "'synth..seed=1' has an empty key part"),
    ("synth.seed\n=1", "holds a space or an unprintable character"),
    ("a\u2028b=1", "holds a space or an unprintable character"),
    ("synth.seed =1", "holds a space"),
    ("bad\nitem", "'bad\\nitem' is not of the form key=value"),
])
def test_pinned_malformed_key(workdir, capsys, override, needle):
    """An empty key part was "unknown config key ''" (naming nothing); a newline in a key or an
    override printed a two-line error."""
    expect_error(capsys, "synth", [override], needle)


def test_pinned_mapping_keys_of_mixed_types(workdir, capsys):
    """`sorted()` of the unknown keys {1, 'b'} raised TypeError (a traceback)."""
    expect_error(capsys, "train", ["train={1: a, b: 2}"], "unknown config key 'train.1'")
    expect_error(capsys, "train", ["train={null: a, 2.5: b}"], "unknown config key 'train.")


def test_pinned_catch_all_given_a_scalar(workdir, capsys):
    """tune's `base=5` plus any train key merged into 5 (a TypeError traceback)."""
    expect_error(capsys, "tune", ["base=5", "train.lr=0.1"], "'base': expected a mapping")


@pytest.mark.parametrize("override, needle", [
    ("nope=1", "unknown config key 'nope'"), ("train.nope=1", "unknown config key 'train.nope'"),
    ("train.lr=x", "'train.lr': expected a finite number"), ("lora.r=1.5", "'lora.r': expected an integer"),
    ("base.train.lr=x", "'train.lr'"), ("model=m", "'model': expected a mapping"),
])
def test_pinned_tune_checks_its_train_keys(workdir, capsys, override, needle):
    """tune's --print-config took unknown and mistyped train keys (checked only when the sweep ran)."""
    expect_error(capsys, "tune", [override], needle)
    printed = expect_config(capsys, "tune", ["train.lr=1.50e-3", "lora.target_modules=q_proj", "objective.beta=0.2"])
    assert printed["base"] == {"train": {"lr": 0.0015}, "lora": {"target_modules": ["q_proj"]}, "objective": {"beta": 0.2}}


@pytest.mark.parametrize("value, needle", [
    ("a\x00b", "holds a NUL byte"), ('"a\\x00b"', "holds a NUL byte"),
    ("a" * 300 + "/b/c", "does not exist"), ("./" + "a" * 300, "does not exist"),
    ('"a\\nb"', "path 'a\\nb' does not exist"),
])
def test_pinned_unusable_path(workdir, capsys, value, needle):
    """A NUL byte (ValueError) or a name over the file system's limit (OSError) was a traceback; a
    newline in a path printed a two-line error."""
    expect_error(capsys, "train", [f"model.path={value}"], "'model.path'", needle)
    if "\\x00" not in value and "\x00" not in value:
        expect_error(capsys, "evaluate", [f"tokenizer={value}"], "'tokenizer'", needle)
