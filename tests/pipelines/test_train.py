"""Ray Train smoke, resume, fault injection and worker-count invariance (CPU, tiny model).

Each TorchTrainer.fit costs ~20-30 s on 2 cores, so this module runs four fits in all, sharing
one Ray session, all on kldpo (batch-coupled) with LoRA, 4 steps of 8 pairs, reports at steps 2, 4:
  A   2 workers, uninterrupted (the smoke run);
  B   2 workers, ROBUST_DPO_FAIL_AT_STEP=3, max_failures=1: rank 0 raises once after step 3 and
      Ray restarts the workers from the step-2 checkpoint;
  C   1 worker, micro-batch 4 x 2 accumulation micro-steps, stopped at max_steps=2 and rerun to
      max_steps=4 into the same --output (driver-level resume: a new fit restores weights,
      optimizer, scheduler and skips the 2 global batches already used);
  D   as A on the plain path (train.packing=false: padded rows, full-vocabulary logits).
B must equal A exactly (same arithmetic) and C must equal A to fp32 summation order (rel. 1e-5):
no pair skipped or seen twice, and the coupled statistic is global for 1 or 2 workers.  D must
equal A to rel. 1e-5 (the packed, prompt-shared, response-only path is exact).
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from pipelines import config
from pipelines.train import FAIL_ENV, TrainConfig, train

pytestmark = pytest.mark.ray

REQUIRED_COLUMNS = ("step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                    "logps/chosen", "logps/rejected", "tokens_per_s", "padding_fraction", "lr", "grad_norm",
                    "kldpo/weight_max", "eval/loss", "eval/accuracy", "eval/rewards/accuracies")


def _config(model_dir, data_dir, output, *extra):
    return config.load(TrainConfig, None, [
        f"model.path={model_dir}", f"data.path={data_dir}", f"output={output}",
        "objective.name=kldpo", "objective.tau=0.1", "objective.beta=0.5",
        "lora.r=4", "lora.alpha=8", "lora.target_modules=[q_proj,v_proj]",
        "train.lr=0.02", "train.batch_size=8", "train.micro_batch_size=4", "train.max_steps=4",
        "train.checkpoint_every=2", "train.num_workers=2", "train.seed=3", *extra,
    ])


@pytest.fixture(scope="module")
def run_a(ray_session, tiny_model_dir, pairs_dataset, tmp_path_factory):
    return train(_config(tiny_model_dir, pairs_dataset, tmp_path_factory.mktemp("train_runs") / "a"))


@pytest.fixture(scope="module")
def runs_bc(ray_session, tiny_model_dir, pairs_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_runs_bc")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAIL_ENV, "3")
        faulted = train(_config(tiny_model_dir, pairs_dataset, root / "b", "train.max_failures=1"))
    first = train(_config(tiny_model_dir, pairs_dataset, root / "c", "train.num_workers=1", "train.max_steps=2"))
    resumed = train(_config(tiny_model_dir, pairs_dataset, root / "c", "train.num_workers=1"))
    return faulted, first, resumed


def test_smoke_two_workers_writes_metrics_checkpoints_and_a_loadable_model(run_a, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_a
    frame = pd.read_csv(result.output_dir / "metrics.csv")
    assert list(frame["step"]) == [2, 4]
    for column in REQUIRED_COLUMNS:
        assert column in frame.columns and frame[column].notna().all(), column
    assert (frame["eval/pairs"] == 6).all() and (frame["pairs"] == 8).all()
    # Packed rows (the default, train.packing=true): padding only at the packed rows' tails, each
    # prompt once, so fewer positions are computed than the useful tokens an unshared forward counts.
    assert frame["padding_fraction"].between(0, 1).all() and (frame["positions"] < frame["tokens"]).all()
    assert (frame["tokens_per_s"] > 0).all() and (frame["lr"] == 0.02).all()
    # Implicit rewards are beta * (policy - reference) log-ratios; margins = chosen - rejected.
    assert frame["rewards/margins"].to_numpy() == pytest.approx(
        (frame["rewards/chosen"] - frame["rewards/rejected"]).to_numpy(), abs=1e-6)
    checkpoints = sorted(p.name for p in (result.output_dir / "checkpoints").glob("checkpoint_*") if p.is_dir())
    assert checkpoints == ["checkpoint_000002", "checkpoint_000004"]
    assert (result.output_dir / "config.yaml").is_file()
    timings = json.loads((result.output_dir / "timings.json").read_text())
    assert {"validate", "data", "worker start", "worker setup", "worker data", "worker steps", "worker evaluation",
            "worker checkpoints", "Ray Train start-up (controller, worker group)", "outputs"} <= set(timings["phases"])
    assert timings["phases"]["worker steps"] > 0
    # The final model is an HF dir with the LoRA update merged: loads without peft and differs from the base.
    trained = AutoModelForCausalLM.from_pretrained(result.final_model_path)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    AutoTokenizer.from_pretrained(result.final_model_path)
    trained_q = trained.model.layers[0].self_attn.q_proj.weight.detach()
    assert float((trained_q - base.model.layers[0].self_attn.q_proj.weight).abs().max()) > 1e-4
    assert torch.equal(trained.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert result.metrics["step"] == 4 and math.isfinite(result.metrics["loss"])


def test_rerun_of_a_finished_run_does_nothing(run_a, tiny_model_dir, pairs_dataset, capsys):
    result = train(_config(tiny_model_dir, pairs_dataset, run_a.output_dir))
    assert "already complete" in capsys.readouterr().out
    assert result.metrics == run_a.metrics


@pytest.mark.slow
def test_worker_restart_and_driver_resume_match_an_uninterrupted_run(run_a, runs_bc):
    """No pair skipped or seen twice: every report of B (restarted after an injected failure) and C
    (one worker, resumed by a second fit) equals the uninterrupted two-worker run A."""
    faulted, first, resumed = runs_bc
    a, b, c = (pd.read_csv(r.output_dir / "metrics.csv") for r in (run_a, faulted, resumed))
    assert first.metrics["step"] == 2 and first.metrics["loss"] == c["loss"].iloc[0]
    assert (faulted.output_dir / ".fault_injected_at_step_3").is_file()
    for column in ("loss", "grad_norm", "rewards/margins", "eval/loss"):
        assert b[column].tolist() == a[column].tolist(), column  # same workers: bit-identical
        assert c[column].to_numpy() == pytest.approx(a[column].to_numpy(), rel=1e-5, abs=1e-7), column
    assert a["loss"].iloc[0] != pytest.approx(a["loss"].iloc[1], rel=1e-3)  # training moved the loss


@pytest.mark.slow
def test_the_plain_padded_path_trains_the_same_run(run_a, ray_session, tiny_model_dir, pairs_dataset, tmp_path):
    plain = train(_config(tiny_model_dir, pairs_dataset, tmp_path / "d", "train.packing=false"))
    a, d = (pd.read_csv(r.output_dir / "metrics.csv") for r in (run_a, plain))
    for column in ("loss", "grad_norm", "logps/chosen", "eval/loss", "kldpo/weight_max"):
        assert d[column].to_numpy() == pytest.approx(a[column].to_numpy(), rel=1e-5, abs=1e-7), column
    # Margins are beta x differences of summed fp32 log-probs (|log p| about 20): their rounding is
    # absolute, about 1e-6 x 20 x beta, not relative to the small margin itself.
    assert d["rewards/margins"].to_numpy() == pytest.approx(a["rewards/margins"].to_numpy(), abs=1e-5)
    assert d["tokens"].tolist() == a["tokens"].tolist()  # the same useful tokens
    assert ((d["padding_fraction"] > a["padding_fraction"]) & (d["padding_fraction"] < 1)).all()
    assert (d["positions"] > a["positions"]).all()
