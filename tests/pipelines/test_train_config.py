"""The train stage's strict config and its up-front input checks (unit tier, no Ray workers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import config
from pipelines.errors import UserError
from pipelines.train.config import TrainConfig, build_train_config, train_config_to_dict

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "pipelines" / "configs").glob("train_*.yaml"))
BASE = ["model.path=m", "data.path=d"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_train_config_loads_strictly(path):
    cfg = config.load(TrainConfig, path, strict_paths=False)
    assert build_train_config(train_config_to_dict(cfg)) == cfg


def test_shipped_configs_exist():
    assert len(CONFIGS) >= 3


def test_objective_hyperparameters_resolve_with_defaults_and_types():
    cfg = config.load(TrainConfig, None, BASE + ["objective.name=kldpo", "objective.tau=0.5"], strict_paths=False)
    assert cfg.objective.hyperparameters == {"beta": 0.1, "tau": 0.5, "normalize": False, "max_weight": 10.0}
    cfg = config.load(TrainConfig, None, BASE + ["objective.name=kldpo", "objective.max_weight=3"], strict_paths=False)
    assert cfg.objective.hyperparameters["max_weight"] == 3.0 and isinstance(cfg.objective.hyperparameters["max_weight"], float)
    flat = train_config_to_dict(cfg)["objective"]
    assert flat == {"name": "kldpo", "beta": 0.1, "tau": 1.0, "normalize": False, "max_weight": 3.0}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["objective.name=kldpo", "objective.rho=0.1"], "objective 'kldpo' has no hyperparameter 'rho'; valid: beta, max_weight, normalize, tau"),
        (["objective.name=dpoo"], "unknown objective 'dpoo'; valid names: cdpo, dora"),
        (["objective.beta=0.1"], "'objective.name' is required"),
        (["objective.name=rdpo", "objective.label_smoothing=0.7"], "label_smoothing must be in [0, 0.5)"),
        (["objective.name=dpo", "train.bacth_size=8"], "unknown config key 'train.bacth_size'"),
        (["objective.name=dpo", "train.batch_size=10", "train.micro_batch_size=4"], "not a multiple of"),
        (["objective.name=dpo", "train.num_workers=0"], "'train.num_workers' must be >= 1"),
        (["objective.name=dpo", "train.precision=fp16"], "'train.precision': 'fp16' is not one of"),
        (["objective.name=tdpo1", "reference.mode=precomputed"], "use reference.mode=live"),
        (["objective.name=wdpo", "train.strategy=fsdp"], "use train.strategy=ddp"),
        (["objective.name=wdpo", "model.attn_implementation=sdpa"], "has no double backward"),
    ],
)
def test_bad_config_is_one_line_user_error(overrides, message):
    with pytest.raises(UserError) as info:
        config.load(TrainConfig, None, BASE + overrides, strict_paths=False)
    assert message in str(info.value) and "\n" not in str(info.value)


def _cli(args, capsys):
    from pipelines.cli import main

    capsys.readouterr()
    code = main(["train", *args])
    # Ray forwards its own actors' logs ("(PlacementGroupCleaner pid=...)") to this process's
    # stderr when an earlier test in the session ran Ray; those lines are not ours.
    lines = capsys.readouterr().err.strip().splitlines()
    return code, [line for line in lines if not line.startswith(("\x1b[", "("))]


def test_cli_rejects_bad_inputs_before_any_worker(tmp_path, tiny_model_dir, pairs_dataset, listwise_dataset, capsys):
    out = tmp_path / "run"
    good = [f"model.path={tiny_model_dir}", f"data.path={pairs_dataset}", "objective.name=dpo"]
    cases = [
        ([f"model.path={tiny_model_dir}", f"data.path={tmp_path}", "objective.name=dpo"], "is not a dataset written by `robust-dpo data`"),
        ([f"model.path={tmp_path / 'nope'}", f"data.path={pairs_dataset}", "objective.name=dpo"],
         "config key 'model.path': path"),
        ([f"model.path={tiny_model_dir}", f"data.path={pairs_dataset}", "objective.name=dpo_pl"], "is listwise but dataset"),
        ([f"model.path={tiny_model_dir}", f"data.path={listwise_dataset}", "objective.name=dpo"], "takes pairs but dataset"),
        (good + ["data.eval_split=test"], "has no split 'test'; it has: eval, train"),
        (good + ["train.batch_size=64", "train.micro_batch_size=8"], "has 32 rows, fewer than train.batch_size=64"),
        (good + ["objective.gamma=1"], "has no hyperparameter 'gamma'"),
    ]
    for args, message in cases:
        code, err = _cli(["--output", str(out), *args], capsys)
        assert code == 2 and len(err) == 1 and message in err[0], (args, err)
        assert not (out / "checkpoints").exists()


def test_dora_needs_a_calibration_column(tmp_path, tiny_model_dir, capsys):
    from train_datasets import write_pairs_dataset

    data = write_pairs_dataset(tmp_path / "nocal", {"train": 8}, calibration=False)
    code, err = _cli(["--output", str(tmp_path / "run"), f"model.path={tiny_model_dir}", f"data.path={data}",
                      "objective.name=dora"], capsys)
    assert code == 2 and "needs a 'calibration' column" in err[0]


def test_rerun_into_a_different_run_is_refused(tmp_path, tiny_model_dir, pairs_dataset):
    from pipelines.train import _check_resumable, write_config

    cfg = config.load(TrainConfig, None, [f"model.path={tiny_model_dir}", f"data.path={pairs_dataset}",
                                   "objective.name=dpo", f"output={tmp_path}"])
    write_config(cfg, tmp_path / "config.yaml")
    (tmp_path / "checkpoints").mkdir()
    longer = config.load(TrainConfig, None, [f"model.path={tiny_model_dir}", f"data.path={pairs_dataset}",
                                      "objective.name=dpo", "train.max_steps=99", f"output={tmp_path}"])
    _check_resumable(longer, tmp_path)  # run length may change on resume
    other = config.load(TrainConfig, None, [f"model.path={tiny_model_dir}", f"data.path={pairs_dataset}",
                                     "objective.name=dpo", "objective.beta=0.2", f"output={tmp_path}"])
    with pytest.raises(UserError, match=r"objective.beta=0.1, but this run has objective.beta=0.2"):
        _check_resumable(other, tmp_path)


def test_split_global_batch_gives_each_micro_step_one_contiguous_block():
    from pipelines.train.batches import split_global_batch

    rows = {"x": list(range(8))}
    assert [b["x"] for b in split_global_batch(rows, rank=0, world_size=2, micro_batch_size=2)] == [[0, 1], [4, 5]]
    assert [b["x"] for b in split_global_batch(rows, rank=1, world_size=2, micro_batch_size=2)] == [[2, 3], [6, 7]]
    assert [b["x"] for b in split_global_batch(rows, rank=0, world_size=1, micro_batch_size=8)] == [list(range(8))]


def test_learning_rate_schedule():
    import torch

    from pipelines.train.loop import build_schedule

    cfg = config.load(TrainConfig, None, BASE + ["objective.name=dpo", "train.warmup_steps=2", "train.lr_schedule=linear",
                                          "train.lr=1.0"], strict_paths=False)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_schedule(optimizer, cfg, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warmup (s+1)/2 for s < 2, then 1 - (s-2)/4
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.batch_size=0"], "config key 'train.batch_size' must be >= 1, got 0"),
        (["train.lr=0"], "config key 'train.lr' must be > 0, got 0.0"),
        (["train.weight_decay=-0.1"], "config key 'train.weight_decay' must be >= 0, got -0.1"),
        (["lora.r=-1"], "config key 'lora.r' must be >= 0, got -1"),
        (["reference.concurrency=0"], "config key 'reference.concurrency' must be >= 1, got 0"),
        (["data.shuffle_buffer=-1"], "config key 'data.shuffle_buffer' must be >= 0, got -1"),
    ],
)
def test_range_errors_name_the_full_key(overrides, message):
    with pytest.raises(UserError) as info:
        config.load(TrainConfig, None, BASE + ["objective.name=dpo", *overrides], strict_paths=False)
    assert str(info.value) == message


def test_output_flag_meets_output_override(tmp_path):
    cfg = config.load(TrainConfig, None, BASE + ["objective.name=dpo"], flags={"output": str(tmp_path)}, strict_paths=False)
    assert cfg.output == str(tmp_path)
    with pytest.raises(UserError, match="config key 'output' is set by its command-line flag"):
        config.load(TrainConfig, None, BASE + ["objective.name=dpo", "output=x"], flags={"output": str(tmp_path)}, strict_paths=False)
