"""Paths a user types mean what they mean in the shell they were typed in.

Ray workers run in another working directory, so every path a user gives (a flag, a `key=value`,
a YAML value) is resolved against the invoking shell's working directory on the driver, before any
worker starts, and the resolved value is what the written config holds and what a resume compares.

A config field says what kind of path it holds through its annotation:

    output: OutputPath = ""        # resolved; need not exist
    path: InputPath                # must exist locally (or be a URI)
    path: ModelPath                # a local path when one of that name exists, else a Hub id
    reward: RewardSpec = ""        # `world:DIR[:NAME]`, `hf:PATH`, `module:function`

Rules: URIs (`s3://`, `gs://`, `hf://`, ...) stay as they are; "" means unset and stays "";
a Hub id (`owner/name`) is taken as such only when no local path of that name exists and it does
not look local.  A missing path that looks local (`./x`, `../x`, `/x`, `~/x`, `x/`, `runs/x` whose
first folder `runs` exists here, or more than one `/`) is an error naming the key (exit 2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Iterator

from pipelines.errors import UserError


class PathKind(str):
    """Marker carried by `Annotated[str, PathKind(...)]`."""


INPUT, OUTPUT, MODEL, DATASET, REWARD = (PathKind(k) for k in ("input", "output", "model", "dataset", "reward"))
InputPath = Annotated[str, INPUT]  # an existing local file or folder, or a URI
OutputPath = Annotated[str, OUTPUT]  # a folder that may not exist yet
ModelPath = Annotated[str, MODEL]  # a local model/tokenizer folder, or a Hub repo id
DatasetPath = Annotated[str, DATASET]  # a local dataset file/folder, or a Hub dataset id
RewardSpec = Annotated[str, REWARD]  # world:DIR[:NAME] | hf:PATH | module:function

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def looks_local(value: str, cwd: Path) -> bool:
    """Whether a path that does not exist was meant as a local path rather than a Hub id."""
    if value.startswith(("./", "../", "/", "~", ".\\")) or value.endswith(("/", os.sep)) or value in (".", ".."):
        return True
    if not _HUB_ID.match(value):
        return True  # no slash, or several: `runs/a/b` is no Hub id
    first = cwd / value.split("/", 1)[0]
    return _exists(first) and first.is_dir()


def resolve_path(value: str, kind: str, key: str, cwd: str | Path | None = None, strict: bool = True) -> str:
    """The value of config key `key` resolved against `cwd` (default: the current directory).

    Raises:
        UserError (with `strict`): an input that does not exist, or a model/dataset path that looks
            local and does not exist (the message names the key).  Without `strict` such a path is
            only made absolute (configs built for a check, with placeholder paths).
    """
    if not value or _URI.match(value):
        return value
    if "\x00" in value:  # no file system takes one (os calls raise ValueError)
        raise UserError(f"config key '{key}': path {value!r} holds a NUL byte")
    cwd = Path(cwd or os.getcwd())
    given = Path(value).expanduser()
    path = (given if given.is_absolute() else cwd / given).resolve()
    if kind == OUTPUT:
        return str(path)
    if _exists(path):
        return str(path)
    if kind in (MODEL, DATASET) and not looks_local(value, cwd):
        return value  # a Hub id
    if not strict:
        return str(path)
    raise UserError(f"config key '{key}': path {value!r} does not exist (resolved against {cwd})")


def _exists(path: Path) -> bool:
    """`path.exists()`, False for a name the file system refuses (too long, ...) instead of OSError."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def resolve_reward(value: str, key: str, cwd: str | Path | None = None, strict: bool = True) -> str:
    """`world:DIR[:NAME]` and `hf:PATH` get their path resolved; `module:function` stays."""
    if value.startswith("world:"):
        directory, _, name = value[len("world:"):].partition(":")
        return "world:" + resolve_path(directory, INPUT, key, cwd, strict) + (f":{name}" if name else "")
    if value.startswith("hf:"):
        return "hf:" + resolve_path(value[len("hf:"):], MODEL, key, cwd, strict)
    return value


def resolve_config_paths(cfg: Any, cwd: str | Path | None = None, prefix: str = "", strict: bool = True) -> Any:
    """A copy of dataclass `cfg` with every path-annotated field resolved (nested sections too).

    List fields of a path kind resolve each item; an item `NAME=PATH` keeps its name."""
    if not dataclasses.is_dataclass(cfg):
        return cfg
    hints = typing.get_type_hints(type(cfg), include_extras=True)
    changes = {}
    for field in dataclasses.fields(cfg):
        key = f"{prefix}.{field.name}" if prefix else field.name
        value = getattr(cfg, field.name)
        kind = _kind_of(hints.get(field.name))
        if dataclasses.is_dataclass(value):
            new = resolve_config_paths(value, cwd, key, strict)
        elif isinstance(value, dict) and field.metadata.get("schema") is not None:
            new = resolve_mapping(value, field.metadata["schema"], cwd, prefix, strict)  # a catch_all section
        elif kind is None:
            continue
        elif isinstance(value, list):
            new = [_resolve_one(v, kind, f"{key}[{i}]", cwd, strict) for i, v in enumerate(value)]
        elif isinstance(value, str):
            new = _resolve_one(value, kind, key, cwd, strict)
        else:
            continue
        if new != value:
            changes[field.name] = new
    return dataclasses.replace(cfg, **changes) if changes else cfg


def resolve_mapping(values: dict, cls: type, cwd: str | Path | None = None, prefix: str = "",
                    strict: bool = True) -> dict:
    """A copy of the raw mapping `values` of config class `cls` with its path keys resolved."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = dict(values)
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints.get(name)
        inner = typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp
        if isinstance(value, dict) and dataclasses.is_dataclass(inner):
            out[name] = resolve_mapping(value, inner, cwd, key, strict)
        elif isinstance(value, str) and _kind_of(tp) is not None:
            out[name] = _resolve_one(value, _kind_of(tp), key, cwd, strict)
    return out


def _resolve_one(value: str, kind: str, key: str, cwd, strict: bool) -> str:
    if kind == REWARD:
        return resolve_reward(value, key, cwd, strict)
    name, eq, path = value.partition("=")
    if eq and kind == INPUT and "/" not in name and not _exists(Path(value)):
        return f"{name}={resolve_path(path, kind, key, cwd, strict)}"  # evaluate's --checkpoint NAME=PATH
    return resolve_path(value, kind, key, cwd, strict)


def _kind_of(tp: Any) -> PathKind | None:
    """The PathKind of `Annotated[str, kind]`, `Annotated[str, kind] | None` or `list[Annotated[...]]`."""
    if tp is None:
        return None
    if typing.get_origin(tp) is Annotated:
        return next((m for m in tp.__metadata__ if isinstance(m, PathKind)), None)
    return next(filter(None, map(_kind_of, typing.get_args(tp))), None)


# --- Writing: a file is whole or absent -----------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary name beside `path` (same suffix, so writers that go by it still do) that is
    renamed onto `path` when the block ends without error: a reader, or a resume after a kill,
    sees the old file or the new one, never a part of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
