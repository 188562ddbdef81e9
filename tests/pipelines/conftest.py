"""Fixtures for the pipeline tests: small tokenised datasets (built by tests/pipelines/train_datasets.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from train_datasets import write_listwise_dataset, write_pairs_dataset

@pytest.fixture(scope="session")
def pairs_dataset(tmp_path_factory) -> Path:
    """32 train pairs and 6 eval pairs, with a calibration column."""
    return write_pairs_dataset(tmp_path_factory.mktemp("pairs"), {"train": 32, "eval": 6})


@pytest.fixture(scope="session")
def listwise_dataset(tmp_path_factory) -> Path:
    """16 train lists of K=3 and 4 eval lists."""
    return write_listwise_dataset(tmp_path_factory.mktemp("lists"), {"train": 16, "eval": 4})
