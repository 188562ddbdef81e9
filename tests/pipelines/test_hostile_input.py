"""Nothing executes that should not (issue 12 item 6).

Checkpoints load with `torch.load(weights_only=True)` and refuse pickled code; no model, tokenizer or
config load passes `trust_remote_code`; dataset strings that look like pickles, YAML tags or Python
code stay strings through `robust-dpo data` and run nothing.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import types
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.cli import main
from pipelines.train import state as train_state
from pipelines.train.loop import build_schedule

ROOT = Path(__file__).resolve().parents[2]


# --- checkpoints ---------------------------------------------------------------------------------


def trained(seed: int, steps: int):
    """A tiny model, AdamW and the train stage's LambdaLR schedule after `steps` optimizer steps."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].bias.zero_()  # frozen (as a LoRA base is): not part of the checkpoint, equal in every copy
    model[1].bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    cfg = types.SimpleNamespace(train=types.SimpleNamespace(warmup_steps=2, lr_schedule="cosine"))
    scheduler = build_schedule(optimizer, cfg, total_steps=10)
    for _ in range(steps):
        model(torch.randn(5, 3)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_checkpoints_round_trip_through_weights_only_loads(tmp_path):
    model, optimizer, scheduler = trained(seed=0, steps=3)
    train_state.save_checkpoint(tmp_path, model, optimizer, scheduler, step=3, history=[{"loss": 1.0}], rank=0,
                                timings={"stage": "worker", "phases": {"steps": 0.5}})
    for name in (train_state.TRAINABLE_FILE, train_state.OPTIMIZER_FILE):  # plain tensors and values only
        torch.load(tmp_path / name, map_location="cpu", weights_only=True)
    fresh, fresh_optimizer, fresh_scheduler = trained(seed=1, steps=0)
    state = train_state.load_checkpoint(tmp_path, fresh, fresh_optimizer, fresh_scheduler)
    files = {name: (tmp_path / name).stat().st_size for name in (train_state.OPTIMIZER_FILE, train_state.TRAINABLE_FILE)}
    assert state == {"step": 3, "history": [{"loss": 1.0}], "timings": {"stage": "worker", "phases": {"steps": 0.5}},
                     "files": files}
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    assert fresh_scheduler.last_epoch == 3 and fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    # The restored run continues exactly as the original (same Adam moments, same schedule).
    for m, opt, sch in ((model, optimizer, scheduler), (fresh, fresh_optimizer, fresh_scheduler)):
        torch.manual_seed(7)
        m(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
        sch.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): what a hostile optimizer.pt could do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("target", [train_state.OPTIMIZER_FILE, train_state.TRAINABLE_FILE])
def test_a_checkpoint_holding_code_is_refused_and_nothing_runs(tmp_path, target):
    model, optimizer, scheduler = trained(seed=0, steps=1)
    train_state.save_checkpoint(tmp_path, model, optimizer, scheduler, step=1, history=[], rank=0)
    marker = tmp_path / "PWNED"
    saved = torch.load(tmp_path / target, map_location="cpu", weights_only=True)
    saved["payload"] = _RunsCode(marker)
    torch.save(saved, tmp_path / target)
    with pytest.raises(RuntimeError, match="not unpickled") as info:
        train_state.load_checkpoint(tmp_path, *trained(seed=1, steps=0))
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()
    pickle.loads(pickle.dumps(_RunsCode(marker)))  # control: a plain unpickle does run it
    assert marker.is_dir()


def test_a_schedule_with_callable_object_state_is_refused_when_saving(tmp_path):
    class Factor:
        def __init__(self):
            self.scale = 0.5

        def __call__(self, step):
            return self.scale

    model, optimizer, _ = trained(seed=0, steps=0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, Factor())
    with pytest.raises(TypeError, match="callable-object state"):
        train_state.save_checkpoint(tmp_path, model, optimizer, scheduler, step=0, history=[], rank=0)


# --- trust_remote_code -----------------------------------------------------------------------------


def test_nothing_passes_trust_remote_code():
    """No call in the package, its configs or the benchmarks passes trust_remote_code (transformers'
    default keeps it off), and no key turns it on: a hub repo's Python files are never run."""
    offenders = []
    for folder in ("pipelines", "robust_objectives", "benchmarks", "tune_spaces"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".yaml", ".yml", ".json", ".toml") and "trust_remote_code" in path.read_text():
                offenders.append(f"{path.relative_to(ROOT)}: mentions trust_remote_code")
            if path.suffix != ".py":
                continue
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    for keyword in node.keywords:
                        constant = isinstance(keyword.value, ast.Constant) and keyword.value.value is False
                        if keyword.arg == "trust_remote_code" and not constant:
                            offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: trust_remote_code")
                        if keyword.arg is None:  # **kwargs: its dict literal, if any, must not hold the key
                            if isinstance(keyword.value, ast.Dict) and any(
                                    isinstance(k, ast.Constant) and k.value == "trust_remote_code"
                                    for k in keyword.value.keys):
                                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: **{{trust_remote_code}}")
                if isinstance(node, ast.Constant) and node.value == "trust_remote_code":
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: 'trust_remote_code' string")
    assert not offenders, offenders


# --- hostile strings through the data stage ------------------------------------------------------

PICKLE_TEXT = pickle.dumps(_RunsCode(Path("PWNED_PICKLE")), protocol=4).decode("latin-1")  # b"\x80\x04..." as text
HOSTILE = [
    PICKLE_TEXT,
    "!!python/object/apply:os.system ['echo hacked > PWNED_YAML']",
    "__import__('os').system('touch PWNED_PY')",
    "{{ cycler.__init__.__globals__.os.popen('touch PWNED_JINJA').read() }}",
    "b'\\x80\\x04\\x95'",
]


@pytest.mark.ray
def test_strings_that_look_like_code_stay_strings_through_the_data_stage(ray_session, tiny_model_dir, tmp_path,
                                                                      monkeypatch):
    """Every hostile string, as prompt, chosen, rejected, group and source, in a .jsonl, a .json and a
    .parquet file of one folder: the stage exits 0 and the output parquet holds the same strings,
    character for character (so byte-identical in UTF-8); no PWNED file appears in the working folder."""
    monkeypatch.chdir(tmp_path)
    rows = []
    for i, text in enumerate(HOSTILE):
        other = HOSTILE[(i + 1) % len(HOSTILE)]
        rows.append({"prompt": text, "chosen": text + " w1", "rejected": other, "group": text, "source": other,
                     "note": text})
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (src / "b.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), src / "c.parquet")
    out = tmp_path / "out"
    code = main(["data", "--dataset", str(src), "--tokenizer", str(tiny_model_dir), "--output", str(out),
                 "max_length=4096"])
    assert code == 0
    written = pq.read_table(out / "train").to_pylist()
    assert len(written) == 3 * len(rows)
    for k, row in enumerate(written):
        expected = rows[k % len(rows)]
        for column in ("prompt", "chosen", "rejected", "group", "source"):
            assert row[column] == expected[column], (k, column)
            assert row[column].encode("utf-8") == expected[column].encode("utf-8")
    assert written[0]["prompt"].startswith("\x80\x04")
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
