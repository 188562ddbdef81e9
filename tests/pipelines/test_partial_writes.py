"""No partially written file is ever read as complete (issue 12 item 2, the unit half; the kill drill
is benchmarks/kill_drill.py and tests/test_kill_drill.py).

Outputs are written to a temporary name and renamed (`paths.atomic_path`), markers last (world.json,
manifest.json, trial_result.json, a checkpoint's train_state.json), and a checkpoint lists its files
with their sizes so one whose copy into storage was cut short is passed over on resume.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipelines.paths import atomic_path, write_text_atomic
from pipelines.train import state as train_state


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "pareto.csv"
    write_text_atomic(path, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            assert tmp.parent == path.parent and tmp.suffix == ".csv" and tmp != path
            tmp.write_text("half a ne")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pareto.csv"]
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n" and sorted(p.name for p in tmp_path.iterdir()) == ["pareto.csv"]


def _save(directory, step, *, final: bool = False):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()

    def final_model(folder):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 64)

    train_state.save_checkpoint(directory, model, optimizer, scheduler, step=step, history=[{"step": step}], rank=0,
                                final_model=final_model if final else None)


def test_a_checkpoint_lists_its_files_last_and_a_cut_copy_is_passed_over(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root / "checkpoint_000002", 2)
    _save(root / "checkpoint_000004", 4, final=True)
    state = train_state.read_train_state(root / "checkpoint_000004")
    assert sorted(state["files"]) == ["final_model/model.safetensors", "optimizer.pt", "trainable.pt"]
    assert state["files"]["final_model/model.safetensors"] == 64
    assert train_state.find_latest_checkpoint(root) == root / "checkpoint_000004"

    latest = root / "checkpoint_000004" / "optimizer.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])  # the copy into storage was cut short
    assert train_state.find_latest_checkpoint(root) == root / "checkpoint_000002"
    latest.write_bytes(data)
    os.remove(root / "checkpoint_000004" / "final_model" / "model.safetensors")  # a file not copied at all
    assert train_state.find_latest_checkpoint(root) == root / "checkpoint_000002"
    (root / "checkpoint_000006").mkdir()
    (root / "checkpoint_000006" / train_state.STATE_FILE).write_text('{"step": 6, "hist')  # a torn state file
    assert train_state.find_latest_checkpoint(root) == root / "checkpoint_000002"


def test_a_checkpoint_from_before_the_file_list_still_counts(tmp_path):
    _save(tmp_path / "checkpoint_000003", 3)
    path = tmp_path / "checkpoint_000003" / train_state.STATE_FILE
    state = json.loads(path.read_text())
    del state["files"]
    path.write_text(json.dumps(state))
    assert train_state.find_latest_checkpoint(tmp_path) == tmp_path / "checkpoint_000003"


def test_a_world_is_whole_only_once_world_json_is_written(tmp_path, monkeypatch):
    """generate_world writes world.json last: a generation killed before it leaves no world (None),
    so a rerun regenerates instead of refusing a half-made world as "made with other keys"."""
    from pipelines import world as world_lib

    wc = world_lib.WorldConfig(n_train=16, n_eval=8, ref_steps=2)
    written = []
    real = world_lib.write_text_atomic

    def record(path, text):
        written.append(sorted(p.name for p in path.parent.iterdir()))
        real(path, text)

    monkeypatch.setattr(world_lib, "write_text_atomic", record)
    world_lib.generate_world(wc, tmp_path, log=lambda m: None)
    assert {"config.yaml", "timings.json", "data", "tokenizer", "reference_model"} <= set(written[0])
    assert "world.json" not in written[0]
    (tmp_path / "world.json").unlink()
    assert world_lib.world_matches(tmp_path, wc) is None
    assert world_lib.world_matches(tmp_path.parent / "nothing", wc) is None
