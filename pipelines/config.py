"""Strict, typed configuration: one loader and one rule for every stage.

Every stage owns its frozen `<Thing>Config` dataclasses (a stage's whole config is `<Stage>Config`:
SynthConfig, DataConfig, ReferenceCacheConfig, TrainConfig, EvaluateConfig, TuneConfig, RunConfig).
`load(cls, path, overrides, flags=..., section=...)` builds any of them from, lowest first:

    dataclass defaults <- YAML `--config` <- `key.sub=value` overrides and command-line flags

One rule where a command-line flag (`--output`, `--checkpoint`, `--shift`, ...) meets a key: a flag
beats the YAML file, and a flag plus a `key=value` override of the same key is an error naming the
key (one command line saying two things is a mistake, not a precedence question).  A flag left out
(None) is no flag.  `section="evaluate"` also accepts the stage's keys under its own name
(`evaluate.beta=0.05` = `beta=0.05`), as `run` and YAML files spell them.

Checks live with the values: unknown keys and type mismatches are caught here, ranges and
cross-field rules in each dataclass's `__post_init__` (`check(self, ">= 1", "batch_size")` or
`raise FieldError(...)`), and `build` words them as one line naming the full key, e.g.
"config key 'train.batch_size' must be >= 1, got 0".  Stage `check_*` functions are left with the
checks that need I/O (manifests, model configs).  A dataclass whose keys depend on a value (the
objective's hyperparameters) builds itself with a `from_mapping(values)` classmethod; a dict field
made with `catch_all()` collects every key that is not a field (tune/run: the train-config values
shared by every trial).  `describe(cls)` lists every key with its type, default and the trailing
`# comment` of its field, for `--help`.

Why not pydantic (installed with Ray): its errors are multi-line lists that would need rewording
into these one-line messages anyway, its coercions are not the CLI's (`a,b` lists, YAML scalars),
and it would make a transitive dependency a direct one; the dataclasses stay (STYLE.md G6).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import inspect
import io
import json
import math
import operator
import textwrap
import tokenize
import types
import typing
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence, TypeVar

import yaml

from pipelines.errors import UserError, first_line
from pipelines.paths import write_text_atomic

T = TypeVar("T")
CATCH_ALL = "robust_dpo_catch_all"  # field metadata key of the catch_all() dict field


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED = _Required()  # describe()'s default of a key that has none


class FieldError(ValueError):
    """A value a dataclass rejects in `__post_init__`; `build` prefixes the field's full key.

    `FieldError("batch_size", "must be >= 1, got 0")` under the `train` section reads
    "config key 'train.batch_size' must be >= 1, got 0".
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field
        self.message = message


_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def _satisfies(value: Any, rule: str) -> bool:
    if rule[0] in "[(":  # an interval: [0, 1), (0, 1], ...
        low, high = (float(x) for x in rule[1:-1].split(","))
        return (value >= low if rule[0] == "[" else value > low) and (value <= high if rule[-1] == "]" else value < high)
    op, bound = rule.split()
    return _COMPARE[op](value, float(bound))


def check(cfg: Any, rule: str, *names: str) -> None:
    """Range check for `__post_init__`: FieldError ("must be >= 1, got 0", "must be in [0, 1), got 1.5")
    for the first field of `names` whose value breaks `rule` (">= 1", "> 0", "<= 1", "< 1", or an interval
    "[0, 1)" / "(0, 1]" / "[0, 1]"); a None value (an unset Optional) passes."""
    for name in names:
        value = getattr(cfg, name)
        if value is not None and not _satisfies(value, rule):
            raise FieldError(name, f"must be {'in ' if rule[0] in '[(' else ''}{rule}, got {value!r}")


def catch_all(schema: type | None = None) -> Any:
    """A dict field that collects every key of its mapping that is not a field (see the module
    docstring); `schema` is the config class those keys belong to (their paths are resolved by it)."""
    return dataclasses.field(default_factory=dict, metadata={CATCH_ALL: True, "schema": schema})


# [1] Building a dataclass strictly ----------------------------------------------------------------


def _type_name(tp: Any) -> str:
    """int, list[str], fp32|bf16 (a Literal), float|None (an Optional)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return "|".join("None" if a is type(None) else _type_name(a) for a in args)
    name = getattr(tp, "__name__", None) if origin is None else None  # list[str].__name__ is "list"
    return name or str(tp).replace("typing.", "")


class _Typed:
    """A `key=value` override that YAML reads as no string (a number, a boolean, a list, ...), with
    the text it was typed as.  A str key takes the text (`split=007` is "007", `entity=no` is "no",
    not 7 or False), a list key splits it (`group_alphas=0.5` is [0.5]), a Literal takes it when it
    is one of the choices (`use_gpu=true`), a number key reads it as Python does when it can
    (`batch_size=010` is 10, not YAML 1.1's octal 8); every other key takes the YAML value."""

    __slots__ = ("value", "text")

    def __init__(self, value: Any, text: str) -> None:
        self.value, self.text = value, text

    def __repr__(self) -> str:
        return repr(self.value)


def _untyped(value: Any) -> Any:
    """`value` with every `_Typed` replaced by its YAML value (for dict and Any keys)."""
    if isinstance(value, _Typed):
        return value.value
    if isinstance(value, Mapping):
        return {k: _untyped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untyped(v) for v in value]
    return value


def _from_text(value: _Typed, tp: Any) -> Any:
    """What a `_Typed` override is for annotation `tp` (see `_Typed`)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is str or (origin is typing.Literal and value.value not in args and value.text in args):
        return value.text
    if (origin in (list, tuple, Sequence) or tp in (list, tuple)) and not isinstance(value.value, list):
        return value.text
    if tp is int or tp is float:
        with contextlib.suppress(ValueError):
            return tp(value.text)
    return value.value


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently coerce) `value` against the annotation `tp`; raise UserError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, _Typed) and origin not in (typing.Union, types.UnionType):
        value = _from_text(value, tp)
    elif tp is Any or origin is dict or tp is dict:
        value = _untyped(value)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            with contextlib.suppress(UserError):
                return coerce(value, arg, key)
        raise UserError(f"config key '{key}': {value!r} is not a valid {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise UserError(f"config key '{key}': {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        _check_mapping(value, key)
        from_mapping = getattr(tp, "from_mapping", None)
        return from_mapping(_untyped(value)) if from_mapping else build(tp, value, prefix=key)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}': expected a list, got {value!r}")
        item_tp = args[0] if args else Any
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        _check_mapping(value, key)
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"config key '{key}': expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}': expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError, OverflowError):  # OverflowError: an int too large for a float
                number = float(value)
        if number is None or not math.isfinite(number):  # nan and inf are never a setting
            raise UserError(f"config key '{key}': expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key '{key}': expected a string, got {value!r}")
    return value


def _key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_mapping(value: Any, key: str) -> None:
    if not isinstance(value, Mapping):
        raise UserError(f"config key '{key}': expected a mapping, got {value!r}")


def _unknown_key(prefix: str, name: str, valid: Sequence[str]) -> UserError:
    under = f" under {prefix!r}" if prefix else ""
    return UserError(f"unknown config key {_key(prefix, name)!r}; valid keys{under}: {', '.join(valid)}")


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def build(cls: type[T], values: Mapping[str, Any] | None = None, prefix: str = "") -> T:
    """Build dataclass `cls` from a nested mapping; unknown keys, bad types and values rejected by
    `__post_init__` raise a one-line UserError naming the key (under `prefix`)."""
    if values is not None:
        _check_mapping(values, prefix or cls.__name__)
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    rest = next((name for name, f in fields.items() if f.metadata.get(CATCH_ALL)), None)
    unknown = sorted(set(values) - set(fields), key=str)  # str: YAML mapping keys need not be strings
    if unknown and rest is not None:
        extra = {name: values.pop(name) for name in unknown}
        _check_mapping(values.get(rest) or {}, _key(prefix, rest))
        values[rest] = deep_merge(values.get(rest) or {}, extra)
    elif unknown:
        raise _unknown_key(prefix, unknown[0], sorted(fields))
    schema = fields[rest].metadata.get("schema") if rest is not None else None
    if schema is not None and isinstance(values.get(rest), Mapping):
        valid = sorted(set(fields) - {rest} | {f.name for f in dataclasses.fields(schema)})
        values[rest] = _check_keys(schema, values[rest], prefix, valid)
    kwargs = {}
    for name, f in fields.items():
        key = _key(prefix, name)
        if name in values:
            kwargs[name] = coerce(values[name], hints[name], key)
        elif dataclasses.is_dataclass(hints.get(name)) and _required(f):
            kwargs[name] = coerce({}, hints[name], key)
        elif _required(f):
            raise UserError(f"config key '{key}' is required")
    try:
        return cls(**kwargs)
    except FieldError as exc:
        raise UserError(f"config key '{_key(prefix, exc.field)}' {exc.message}") from exc
    except (TypeError, ValueError) as exc:
        raise UserError(f"config {prefix or cls.__name__}: {exc}") from exc


def _check_keys(cls: type, values: Mapping[str, Any], prefix: str, valid: Sequence[str] | None = None) -> dict[str, Any]:
    """The keys of a catch-all of config class `cls`, checked and coerced one by one without building
    `cls`: an unknown key or a value of the wrong type fails here (tune's `--print-config` too), while
    required keys and `__post_init__` rules wait for the whole config (a trial's own keys complete
    it).  A `from_mapping` section is left to that build: its keys depend on its values."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for name, value in values.items():
        key = _key(prefix, name)
        if name not in names:
            raise _unknown_key(prefix, name, valid or sorted(names))
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            _check_mapping(value, key)
            out[name] = _untyped(value) if hasattr(tp, "from_mapping") else _check_keys(tp, value, key)
        else:
            out[name] = coerce(value, tp, key)
    return out


# [2] Sources: YAML, dot-list overrides, flags -------------------------------------------------------


def _plain(value: Any) -> bool:
    """Whether a YAML value is one a config can hold (and --print-config print): no dates, bytes or sets."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, list):
        return all(map(_plain, value))
    return isinstance(value, dict) and all(_plain(k) and not isinstance(k, list) for k in value) and all(
        map(_plain, value.values()))


def _override_value(raw: str) -> Any:
    """The value of one override: YAML, with its text kept where YAML reads no string (see `_Typed`)."""
    if raw == "":
        return ""
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
        return raw  # no YAML, or none Python holds (an int over 4300 digits, nesting past the recursion limit)
    if not _plain(value):
        return raw  # a date, !!binary, !!set, ...: no config value is one; the text as typed
    return value if value is None or isinstance(value, str) else _Typed(value, raw)


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """Turn ['a.b=1', 'c=x'] into {'a': {'b': 1}, 'c': 'x'}; values are parsed as YAML scalars, and a
    later override of a key wins over an earlier one."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        if "" in parts:
            raise UserError(f"override {item!r} has an empty key" + (f" part in {key!r}" if key else ""))
        if not key.isprintable() or any(ch.isspace() for ch in key):
            raise UserError(f"override {item!r}: the key {key!r} holds a space or an unprintable character")
        value = _override_value(raw)
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with an earlier override of '{part}'")
        node[parts[-1]] = value
    return tree


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `update` laid over it, mappings merged key by key."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file '{path}' is not valid YAML: {first_line(exc)}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping at the top level")
    return data


def _lift(tree: dict[str, Any], section: str | None) -> dict[str, Any]:
    """{section: {a: 1}, b: 2} -> {a: 1, b: 2}: a stage's keys may carry the stage's name (not both
    spellings of one key: which one was meant is not for the loader to guess)."""
    if section is None or not isinstance(tree.get(section), Mapping):
        return tree
    rest = dict(tree)
    inner = rest.pop(section)
    both = _overlap(inner, rest)
    if both is not None:
        raise UserError(f"config key {both!r} is given twice, as {section + '.' + both!r} and {both!r}")
    return deep_merge(inner, rest)


def _overlap(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> str | None:
    """The first dotted key both mappings set (a mapping in both is looked into), or None."""
    for k in a:
        if k in b:
            key = _key(prefix, str(k))
            if not (isinstance(a[k], Mapping) and isinstance(b[k], Mapping)):
                return key
            inner = _overlap(a[k], b[k], key)
            if inner is not None:
                return inner
    return None


def _is_set(tree: Mapping[str, Any], key: str) -> bool:
    head, _, tail = key.partition(".")
    if head not in tree:
        return False
    return not tail or (isinstance(tree[head], Mapping) and _is_set(tree[head], tail))


def collect(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    flags: Mapping[str, Any] | None = None,
    section: str | None = None,
) -> dict[str, Any]:
    """The merged mapping `load` builds: YAML at `path` <- `overrides` and `flags` ({dotted key: value};
    None is a flag not given), with `section` accepted as a prefix of the keys (see the module docstring)."""
    values = _lift(load_yaml(path), section) if path is not None else {}
    given = _lift(parse_overrides(overrides), section)
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if _is_set(given, key):
            raise UserError(f"config key '{key}' is set by its command-line flag; do not also override it")
        values = deep_merge(values, _nest(key, value))  # a flag beats the YAML file
    return deep_merge(values, given)


def _nest(key: str, value: Any) -> dict[str, Any]:
    head, _, tail = key.partition(".")
    return {head: _nest(tail, value) if tail else value}


def load(
    cls: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    flags: Mapping[str, Any] | None = None,
    section: str | None = None,
    strict_paths: bool = True,
) -> T:
    """Build `cls` strictly from its defaults <- YAML at `path` <- `overrides` and `flags` (see `collect`),
    with every path resolved against the current working directory (`pipelines.paths`; a missing
    input is an error unless `strict_paths=False`, for configs checked with placeholder paths)."""
    from pipelines.paths import resolve_config_paths

    cfg = build(cls, collect(path, overrides, flags=flags, section=section))
    return resolve_config_paths(cfg, strict=strict_paths)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML: what `dump` writes (the run's record of what it did) and `--print-config` prints."""
    return yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(cfg))), sort_keys=False)


def dump(cfg: Any, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, to_yaml(cfg))


# [3] Describing the keys (for --help) ----------------------------------------------------------------


class Key(NamedTuple):
    """One key of a config, as `describe` lists it."""

    key: str  # dotted key, e.g. "train.batch_size"
    type: str  # "int", "float", "fp32|bf16", "list[str]", ...
    default: Any  # the default value (a default_factory is called), or REQUIRED
    comment: str  # the field's trailing `# comment` in the source, "" when it has none


def _field_comments(cls: type) -> dict[str, str]:
    """{field: trailing comment} of the annotated assignments in `cls` and its dataclass bases."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        by_line = {tok.start[0]: tok.string.lstrip("#").strip()
                   for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
        for node in ast.parse(source).body[0].body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                comments[node.target.id] = by_line.get(node.end_lineno, "")
    return comments


def describe(cls: type, prefix: str = "") -> list[Key]:
    """Every key of config class `cls` (nested sections flattened to dotted keys), in field order.

    A `from_mapping` section (the objective) is listed by its own fields; its open-ended keys are
    the objective's to describe.
    """
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    out: list[Key] = []
    for f in dataclasses.fields(cls):
        key, tp = _key(prefix, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe(tp, key)
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        out.append(Key(key, _type_name(tp), default, comments.get(f.name, "")))
    return out
