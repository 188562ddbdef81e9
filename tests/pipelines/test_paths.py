"""Paths resolve against the shell's working directory; Hub ids and URIs stay; missing local paths fail."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from pipelines.errors import UserError
from pipelines.paths import (
    INPUT, MODEL, OUTPUT, InputPath, ModelPath, OutputPath, RewardSpec, resolve_config_paths, resolve_path,
)


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "runs" / "w" / "reference_model").mkdir(parents=True)
    (tmp_path / "prefs.jsonl").write_text("{}\n")
    return tmp_path


def test_relative_paths_resolve_against_the_given_directory(tree):
    assert resolve_path("runs/w/reference_model", MODEL, "model.path", tree) == str(tree / "runs/w/reference_model")
    assert resolve_path("./prefs.jsonl", INPUT, "dataset", tree) == str(tree / "prefs.jsonl")
    assert resolve_path("runs/new", OUTPUT, "output", tree) == str(tree / "runs/new")  # need not exist


def test_hub_ids_and_uris_stay_as_typed(tree):
    assert resolve_path("Qwen/Qwen2.5-0.5B", MODEL, "model.path", tree) == "Qwen/Qwen2.5-0.5B"
    assert resolve_path("s3://bucket/data", INPUT, "data.path", tree) == "s3://bucket/data"
    assert resolve_path("", INPUT, "data.path", tree) == ""


@pytest.mark.parametrize("value", ["runs/x", "./x", "x/", "runs/w/missing", "../nope/model"])
def test_a_missing_local_looking_path_names_the_key(tree, value):
    with pytest.raises(UserError, match=r"config key 'model.path': path '.*' does not exist"):
        resolve_path(value, MODEL, "model.path", tree)


def test_a_missing_input_is_an_error_even_when_it_looks_like_a_hub_id(tree):
    with pytest.raises(UserError, match="config key 'data.path'"):
        resolve_path("owner/name", INPUT, "data.path", tree)


@dataclass(frozen=True, kw_only=True)
class _Section:
    path: ModelPath
    steps: int = 3


@dataclass(frozen=True, kw_only=True)
class _Config:
    model: _Section
    output: OutputPath = ""
    checkpoints: list[InputPath] = field(default_factory=list)
    reward: RewardSpec = ""
    note: str = "runs/x"  # not a path: untouched


def test_config_walk_resolves_nested_lists_names_and_reward_specs(tree):
    cfg = _Config(model=_Section(path="runs/w/reference_model"), output="out",
                  checkpoints=["dpo=runs/w/reference_model", "runs/w"], reward="world:runs/w:r1")
    got = resolve_config_paths(cfg, tree)
    assert got.model.path == str(tree / "runs/w/reference_model") and got.model.steps == 3
    assert got.output == str(tree / "out")
    assert got.checkpoints == [f"dpo={tree / 'runs/w/reference_model'}", str(tree / "runs/w")]
    assert got.reward == f"world:{tree / 'runs/w'}:r1" and got.note == "runs/x"
    assert resolve_config_paths(got, tree / "runs") == got  # absolute paths are fixed points
    assert resolve_config_paths(_Config(model=_Section(path="org/model"), reward="pkg.mod:fn"), tree).reward == "pkg.mod:fn"


def test_progress_pickles_without_its_stream_and_prints_bounded_plain_lines():
    import io
    import pickle

    from pipelines.console import Progress

    stream = io.StringIO()  # not a terminal: plain lines, at most one per min_interval, plus the last
    progress = Progress("tune", "trials", 3, min_interval=3600, stream=stream)
    for _ in range(3):
        progress.update(1, postfix="dpo step 2")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "1/3" in lines[0] and "3/3" in lines[1] and lines[1].endswith("| dpo step 2")
    copy = pickle.loads(pickle.dumps(progress))
    assert (copy.stage, copy.label, copy.total) == ("tune", "trials", 3)


def test_a_run_typed_with_relative_paths_resumes_with_absolute_ones(tmp_path, monkeypatch, tiny_model_dir):
    """The resume check compares resolved configs: `runs/t` then `/abs/runs/t` is the same run."""
    import shutil

    from pipelines import config
    from pipelines.train.config import TrainConfig, train_config_to_dict

    shutil.copytree(tiny_model_dir, tmp_path / "runs" / "w" / "reference_model")
    (tmp_path / "runs" / "d").mkdir()
    monkeypatch.chdir(tmp_path)
    relative = config.load(TrainConfig, None, ["model.path=runs/w/reference_model", "data.path=runs/d",
                                               "objective.name=dpo"], flags={"output": "runs/t"})
    absolute = config.load(TrainConfig, None, [f"model.path={tmp_path}/runs/w/reference_model",
                                               f"data.path={tmp_path}/runs/d", "objective.name=dpo"],
                           flags={"output": str(tmp_path / "runs" / "t")})
    assert train_config_to_dict(relative) == train_config_to_dict(absolute)
    assert relative.model.path == str(tmp_path / "runs" / "w" / "reference_model")
