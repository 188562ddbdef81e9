"""A folder written by `datasets` save_to_disk is a dataset source: splits kept, every row carried."""

from __future__ import annotations

import pandas as pd
import pytest

from pipelines.data import resolve_source


def _rows(n, start=0):
    return {"prompt": [f"w{i % 7}" for i in range(start, start + n)],
            "chosen": [f"w{(i + 1) % 9} w2" for i in range(start, start + n)],
            "rejected": [f"w{(i + 3) % 11}" for i in range(start, start + n)]}


def test_save_to_disk_folders_resolve_to_their_arrow_shards_by_split(tmp_path):
    import datasets

    datasets.Dataset.from_dict(_rows(5)).save_to_disk(tmp_path / "one")
    source = resolve_source(str(tmp_path / "one"))
    assert list(source.splits) == ["train"] and source.splits["train"][0].endswith(".arrow")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(_rows(6)),
                          "test": datasets.Dataset.from_dict(_rows(3, 100))}).save_to_disk(tmp_path / "dict")
    source = resolve_source(str(tmp_path / "dict"))
    assert sorted(source.splits) == ["test", "train"]


@pytest.mark.ray
def test_a_save_to_disk_dataset_prepares_and_trains(ray_session, tmp_path, tiny_model_dir):
    import datasets

    from pipelines import config as config_lib
    from pipelines.data import DataConfig, prepare_data
    from pipelines.train import train
    from pipelines.train.config import TrainConfig

    rows = _rows(16)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "eval": datasets.Dataset.from_dict(_rows(4, 50))}).save_to_disk(tmp_path / "hf")
    result = prepare_data(DataConfig(dataset=str(tmp_path / "hf"), tokenizer=str(tiny_model_dir),
                                     output=str(tmp_path / "tok")))
    assert result.stats["rows_in"] == 20 and result.stats["rows_rejected"] == 0
    written = pd.read_parquet(tmp_path / "tok" / "train")
    assert list(written["prompt"]) == rows["prompt"] and list(written["chosen"]) == rows["chosen"]  # source order
    cfg = config_lib.load(TrainConfig, None, [f"model.path={tiny_model_dir}", f"data.path={tmp_path / 'tok'}",
                                              "objective.name=dpo", "train.max_steps=2", "train.batch_size=4",
                                              "train.checkpoint_every=2"], flags={"output": str(tmp_path / "run")})
    metrics = train(cfg).metrics
    assert metrics["step"] == 2 and metrics["loss"] > 0
