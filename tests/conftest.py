"""Shared fixtures: seeds, one local Ray session per test run, a tiny saved model + tokenizer."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(autouse=True)
def _seed():
    import torch

    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray session shared by every Ray test (each start costs seconds on 2 cores)."""
    import ray

    from pipelines.ray_session import ensure_ray

    ensure_ray(num_cpus=8)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_run(ray_session, tmp_path_factory):
    """The output folder of one uninterrupted `robust-dpo run` with SMOKE_RUN_KEYS (the run smoke test
    checks it and its resume; the kill drill compares a killed run with it)."""
    from pipelines.cli import main
    from smoke_keys import SMOKE_RUN_KEYS

    out = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["run", "--output", str(out), *SMOKE_RUN_KEYS]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM and word tokenizer saved with save_pretrained (no download)."""
    from toy_checkpoints import save_tiny_model_and_tokenizer

    return save_tiny_model_and_tokenizer(tmp_path_factory.mktemp("tiny_model"), TINY_WORDS, seed=0)
