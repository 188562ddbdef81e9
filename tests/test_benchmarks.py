"""benchmarks/throughput.py (issue 6): the CPU smoke run's JSON, TRL and ours computing the same DPO
numbers on the same batch, and the benchmark's own arithmetic (FLOPs, data, targets) by hand."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a repo folder, not an installed package
    sys.path.insert(0, str(ROOT))

HAS_TRL = importlib.util.find_spec("trl") is not None
NO_TRL = "trl is not installed (the bench extra: pip install -e '.[bench]')"
OBJECTIVES = ("kldpo", "dora", "radpo1", "wdpo")
# TRL default vs our DPO on the same batches, then our DPO and the four objectives in one phase.
PHASES = "trl,ours:dpo;ours:dpo," + ",".join(f"ours:{o}" for o in OBJECTIVES)


@pytest.fixture(scope="module")
def tiny_report():
    """One `--preset tiny --device cpu --json` run: 1 warm-up step + 1 timed step per contender."""
    command = [sys.executable, "-m", "benchmarks.throughput", "--preset", "tiny", "--device", "cpu",
               "--warmup", "1", "--steps", "1", "--phases", PHASES, "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_tiny_cpu_run_reports_every_contender(tiny_report):
    r = tiny_report
    assert r["preset"] == "tiny" and r["device"] == "cpu" and r["precision"] == "fp32"
    assert r["ours_tokens_per_s"] > 0
    assert r["ours_mfu"] is None and r["peak_bf16"] is None  # no bf16 peak to measure on CPU
    if HAS_TRL:
        assert r["trl_tokens_per_s"] > 0 and r["trl_skipped"] is None
        assert r["ours_vs_trl"] == pytest.approx(r["ours_tokens_per_s"] / r["trl_tokens_per_s"])
    else:
        assert r["trl_tokens_per_s"] is None and "trl is not installed" in r["trl_skipped"]
    for name in OBJECTIVES:
        entry = r["objectives"][name]
        assert entry["error"] is None and entry["tokens_per_s"] > 0 and entry["vs_dpo"] > 0, name
    for phase in r["phases"]:
        for s in phase:
            assert s["timed_steps"] == 1 and len(s["step_ms"]) == 2 and s["peak_memory_gib"] > 0, s["contender"]
    assert 0.0 < r["data"]["padding_fraction"] < 1.0 and r["data"]["max_row_tokens"] <= r["max_length"]
    assert set(r["targets"]) >= {"ours_vs_trl", "kldpo_vs_dpo", "wdpo_vs_dpo"}


@pytest.mark.slow
def test_trl_and_ours_compute_the_same_dpo_numbers(tiny_report):
    """Same weights, same batch.  Step 0: the policy is the reference, so both losses are log 2
    (whatever the data), and the summed log-probs agree (same tokens, same model, same log-prob
    math).  Step 1: the implicit rewards beta (log pi - log pi_ref) are nonzero and agree, so step
    0's gradients and AdamW updates (lr 1e-2 on both sides) agree too."""
    if not HAS_TRL:
        pytest.skip(NO_TRL)
    trl, ours = tiny_report["early_steps"]["trl"], tiny_report["early_steps"]["ours"]
    for side in (trl, ours):
        assert side["0"]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
        assert side["0"]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    for key in ("logps/chosen", "logps/rejected"):
        for step in ("0", "1"):
            assert trl[step][key] == pytest.approx(ours[step][key], rel=1e-5), (step, key)
    assert abs(ours["1"]["rewards/margins"]) > 1e-3  # the update moved the policy measurably
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        # fp32 rounding of a summed log-prob of ~100 tokens is ~1e-5, times beta = 0.1.
        assert trl["1"][key] == pytest.approx(ours["1"][key], rel=1e-3, abs=1e-5), key
    assert trl["1"]["loss"] == pytest.approx(ours["1"]["loss"], rel=1e-5)
    assert trl["1"]["loss"] != pytest.approx(math.log(2.0), abs=1e-4)


# Fast, in-process checks of the benchmark's arithmetic ------------------------------------------------


def test_flop_model_matches_the_closed_form_worked_by_hand():
    from benchmarks.bench_setup import FlopModel

    model = FlopModel(body=10, head=6, layers=2, attention_width=4)
    # rows of 1 and 3 tokens: linear 2 (10 + 6) (1 + 3) = 128; causal attention
    # 2 layers x 2 x A x L (L + 1) = 2 * 2 * 4 * (1 * 2 + 3 * 4) = 224.
    assert model.forward_flops([1, 3]) == 352.0
    assert model.step_flops([1, 3], live_reference=True) == 4 * 352.0  # policy fwd+bwd + reference fwd
    assert model.step_flops([1, 3], live_reference=False) == 3 * 352.0


def test_flop_model_counts_the_linear_weights_of_a_real_model():
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.bench_setup import flop_model_of

    d, inner, layers, heads, kv, vocab = 32, 48, 3, 4, 2, 50
    config = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=d, intermediate_size=inner,
                                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                                  tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    hd = d // heads
    per_layer = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * inner  # q, k+v, o, gate/up/down
    fm = flop_model_of(model)
    assert (fm.body, fm.head, fm.layers, fm.attention_width) == (layers * per_layer, vocab * d, layers, heads * hd)


def test_synthetic_pairs_respect_the_limits_and_round_trip_through_the_tokenizer():
    from benchmarks import bench_setup as bs

    preset = bs.PRESETS["tiny"]
    tokenizer = bs.build_tokenizer(preset.model["vocab_size"])
    pairs = bs.generate_pairs(preset, 64, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, seed=3)
    assert len(tokenizer) == preset.model["vocab_size"]
    for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected):
        assert preset.prompt.low <= len(p) <= preset.max_length // 2
        assert len(p) + max(len(c), len(r)) <= preset.max_length
        assert c[-1] == r[-1] == tokenizer.eos_token_id and min(p.min(), c[:-1].min(), r[:-1].min()) >= bs.SPECIALS
    texts = pairs.texts(tokenizer)
    for i in range(len(pairs)):  # what TRL does: tokenize(prompt) and tokenize(prompt + response)
        full = tokenizer(texts["prompt"][i] + texts["chosen"][i])["input_ids"]
        assert full == pairs.prompts[i].tolist() + pairs.chosen[i].tolist()
    lengths = pairs.row_lengths(0, 8)
    assert lengths.tolist() == [len(p) + len(c) for p, c in zip(pairs.prompts[:8], pairs.chosen[:8])] + [
        len(p) + len(r) for p, r in zip(pairs.prompts[:8], pairs.rejected[:8])]
    stats = bs.describe_pairs(pairs, 8)
    expected_padding = 1 - sum(pairs.row_lengths(s * 8, s * 8 + 8).sum() for s in range(8)) / sum(
        16 * pairs.row_lengths(s * 8, s * 8 + 8).max() for s in range(8))
    assert stats["padding_fraction"] == pytest.approx(expected_padding)


def test_contender_specs_and_phase_errors():
    from benchmarks import bench_contenders as bc
    from benchmarks.throughput import parse_phases

    for text in ("trl", "trl_no_gc", "trl_precomputed", "ours:dpo", "ours:wdpo:precomputed", "ours:dpo:plain",
                 "ours:dpo:precomputed:packed", "ours:wdpo:head"):
        assert bc.parse_contender(text).label == text
    assert bc.parse_contender("ours:dpo:packed").path == "packed"
    assert bc.parse_contender("ours:dpo").path == "fast"
    for bad in ("ours:dpo:plain:head", "ours:dpo:fast", "ours:dpo:precomputed:precomputed", "ours:dpo:quick"):
        with pytest.raises(ValueError, match="unknown contender"):
            bc.parse_contender(bad)
    assert bc.parse_contender("ours:wdpo:packed").path == "packed"
    with pytest.raises(ValueError, match="token-level"):
        bc.parse_contender("ours:radpo1:precomputed")  # the train stage's own rule
    with pytest.raises(ValueError, match="pairwise"):
        bc.parse_contender("ours:dpo_pl")
    with pytest.raises(ValueError, match="at most one TRL"):
        parse_phases("trl,trl_no_gc")


def test_headline_takes_ratios_within_a_phase_and_judges_the_targets():
    from benchmarks.throughput import headline

    def s(label, tps, mem=1.0):  # the headline reads the median-of-steps rate
        return {"contender": label, "tokens_per_s_median_step": tps, "tokens_per_s": -1.0, "mfu": None,
                "peak_memory_gib": mem, "error": None, "early": {}}

    phases = [[s("trl", 100.0, 10.0), s("ours:dpo", 250.0, 12.0)],
              [s("trl_no_gc", 200.0), s("ours:dpo", 240.0)],
              [s("ours:dpo", 300.0), s("ours:kldpo", 290.0)],
              [s("ours:dpo", 400.0), s("ours:wdpo", 100.0)]]
    h = headline(phases, "qwen0.5b")
    assert (h["ours_tokens_per_s"], h["trl_tokens_per_s"], h["trl_no_gc_tokens_per_s"]) == (250.0, 100.0, 200.0)
    assert h["ours_vs_trl"] == 2.5 and h["ours_vs_trl_no_gc"] == 1.2
    assert h["objectives"]["kldpo"]["vs_dpo"] == pytest.approx(290 / 300)
    assert h["objectives"]["wdpo"]["vs_dpo"] == 0.25
    t = h["targets"]
    assert t["ours_vs_trl"]["met"] is True and t["ours_vs_trl_no_gc"]["met"] is False
    assert t["kldpo_vs_dpo"]["met"] is True and t["wdpo_vs_dpo"]["met"] is False
    memory = t["ours_peak_memory_vs_trl"]
    assert memory["measured"] == pytest.approx(1.2) and memory["met"] is False  # 12 GiB vs TRL's 10
    assert t["mfu_llama1b"]["measured"] is None and t["dora_vs_dpo"]["met"] is None
    assert np.isfinite(h["ours_vs_trl"])


def test_headline_of_the_small_preset_reads_the_levers_and_issue_11_targets():
    from benchmarks.throughput import headline

    def s(label, tps, mem=1.0):
        return {"contender": label, "tokens_per_s_median_step": tps, "mfu": None, "peak_memory_gib": mem,
                "error": None, "early": {}}

    phases = [[s("trl", 100.0, 3.0), s("ours:dpo", 260.0), s("ours:dpo:plain", 100.0), s("ours:dpo:head", 130.0),
               s("ours:dpo:packed", 200.0)],
              [s("trl_no_gc", 125.0, 2.0), s("ours:dpo", 250.0, 1.5), s("ours:kldpo", 240.0),
               s("ours:radpo1", 170.0), s("ours:wdpo", 90.0), s("ours:dora", 249.0)]]
    h = headline(phases, "small")
    assert h["ours_plain_tokens_per_s"] == 100.0 and h["ours_tokens_per_s"] == 260.0
    assert {k: v["vs_plain"] for k, v in h["levers"].items()} == {"head": 1.3, "packed": 2.0, "fast": 2.6}
    t = h["targets"]
    assert set(t) == {"ours_vs_trl", "ours_vs_trl_no_gc", "kldpo_vs_dpo", "dora_vs_dpo", "radpo1_vs_dpo",
                      "wdpo_vs_dpo", "ours_peak_memory_vs_trl_no_gc"}
    assert t["ours_vs_trl"] == {"target": 2.5, "measured": 2.6, "met": True}
    assert t["ours_vs_trl_no_gc"] == {"target": 2.0, "measured": 2.0, "met": True}  # 250 / 125, same phase
    assert t["ours_peak_memory_vs_trl_no_gc"]["measured"] == 0.75 and t["ours_peak_memory_vs_trl_no_gc"]["met"]
    assert t["wdpo_vs_dpo"]["measured"] == pytest.approx(0.36) and t["wdpo_vs_dpo"]["met"] is False
    assert h["peak_memory_gib"]["trl_no_gc"] == 2.0


@pytest.mark.gpu
@pytest.mark.slow
def test_qwen_preset_on_cuda_measures_mfu_and_agrees_with_trl():
    """GPU smoke of a target preset (skipped without CUDA or TRL): bf16, 1 warm-up + 2 timed steps.
    bf16 autocast on both sides, with different LM-head kernels (TRL's chunked head vs our full
    logits), so the log-probs are compared at 1% rather than fp32 precision."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if not HAS_TRL:
        pytest.skip(NO_TRL)
    command = [sys.executable, "-m", "benchmarks.throughput", "--preset", "qwen0.5b", "--warmup", "1",
               "--steps", "2", "--phases", "trl,ours:dpo", "--json"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    assert r["precision"] == "bf16" and r["peak_bf16"]["max_tflops"] > 50
    assert 0 < r["ours_mfu"] < 1 and 0 < r["trl_mfu"] < 1 and r["ours_peak_memory_gib"] > 0
    trl, ours = r["early_steps"]["trl"]["0"], r["early_steps"]["ours"]["0"]
    for side in (trl, ours):
        assert side["loss"] == pytest.approx(math.log(2.0), abs=1e-3)  # policy = reference at step 0
    for key in ("logps/chosen", "logps/rejected"):
        assert trl[key] == pytest.approx(ours[key], rel=1e-2), key
