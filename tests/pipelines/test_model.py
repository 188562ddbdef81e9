"""Collation, the concatenated forward, WDPO's double backward and LoRA's adapter-disabled reference.

Unit tier: a tiny saved Llama (tests/conftest.py::tiny_model_dir), CPU, seconds.
"""

from __future__ import annotations

import pytest
import torch

from pipelines import collate as collate_lib
from pipelines import model as model_lib

PAD = 0


def _rows():
    """Two pairs by hand: prompt [5, 6] / chosen [7, 3] / rejected [8, 9, 3]; prompt [10] / [11, 3] / [3]."""
    return {
        "prompt_input_ids": [[5, 6], [10]],
        "chosen_input_ids": [[7, 3], [11, 3]],
        "rejected_input_ids": [[8, 9, 3], [3]],
        "calibration": [1.5, 0.5],
    }


def test_collate_pairs_concatenates_chosen_then_rejected_with_masked_labels():
    batch = collate_lib.collate_pairs(_rows(), PAD)
    x = -100
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3, 0], [10, 11, 3, 0, 0], [5, 6, 8, 9, 3], [10, 3, 0, 0, 0]]
    assert batch["labels"].tolist() == [[x, x, 7, 3, x], [x, 11, 3, x, x], [x, x, 8, 9, 3], [x, 3, x, x, x]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch["chosen_lengths"].tolist() == [2, 2] and batch["rejected_lengths"].tolist() == [3, 1]
    assert batch["num_pairs"] == 2 and batch["calibration"].tolist() == [1.5, 0.5]
    assert collate_lib.count_tokens(batch) == (4 + 3 + 5 + 2, 20, 6)


def test_collate_lists_flattens_row_major_and_rejects_mixed_sizes():
    rows = {"prompt_input_ids": [[5], [6, 7]], "responses_input_ids": [[[8, 3], [9, 3]], [[3], [10, 11, 3]]],
            "scores": [[1.0, 0.0], [0.0, 2.0]]}
    batch = collate_lib.collate_lists(rows, PAD)
    assert batch["input_ids"].tolist() == [[5, 8, 3, 0, 0], [5, 9, 3, 0, 0], [6, 7, 3, 0, 0], [6, 7, 10, 11, 3]]
    assert (batch["num_pairs"], batch["list_size"]) == (2, 2)
    assert batch["scores"].tolist() == [[1.0, 0.0], [0.0, 2.0]]
    rows["responses_input_ids"][1] = [[3]]
    with pytest.raises(ValueError, match="same K"):
        collate_lib.collate_lists(rows, PAD)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    return model_lib.load_causal_lm(str(tiny_model_dir), attn_implementation="eager").eval()


def _naive_logps(model, prompt, response):
    """sum_t log softmax(logits[t-1])[y_t] from an unpadded single-sequence forward."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logprobs[len(prompt) + i - 1, tok]) for i, tok in enumerate(response))


def test_row_logps_equal_unpadded_single_sequence_sums(tiny_model):
    rows = _rows()
    batch = collate_lib.collate_pairs(rows, PAD)
    with torch.no_grad():
        out = model_lib.compute_row_logps(tiny_model, batch)
    expected = [_naive_logps(tiny_model, p, c) for p, c in zip(rows["prompt_input_ids"], rows["chosen_input_ids"])]
    expected += [_naive_logps(tiny_model, p, r) for p, r in zip(rows["prompt_input_ids"], rows["rejected_input_ids"])]
    assert out.logps.dtype == torch.float32
    assert out.logps.tolist() == pytest.approx(expected, abs=1e-5)
    assert out.lengths.tolist() == [2, 2, 3, 1]


def test_vocab_path_gives_same_logps_and_normalised_response_span(tiny_model):
    batch = collate_lib.collate_pairs(_rows(), PAD)
    with torch.no_grad():
        plain = model_lib.compute_row_logps(tiny_model, batch)
        full = model_lib.compute_row_logps(tiny_model, batch, vocab=True)
    assert torch.allclose(full.logps, plain.logps, atol=1e-6)
    # The span starts at the earliest response position (prompt [10] -> shifted column 0) and the
    # mask marks exactly the labelled positions.
    assert full.mask.tolist() == (batch["labels"][:, 1:] != -100).tolist()
    assert torch.allclose(full.vocab_logps.exp().sum(-1), torch.ones(full.mask.shape), atol=1e-5)
    targets = batch["labels"][:, 1:].clamp(min=0)
    picked = full.vocab_logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * full.mask
    assert torch.allclose(picked.sum(-1), plain.logps, atol=1e-5)


def test_embedding_path_matches_ids_and_supports_exact_double_backward(tiny_model_dir):
    """WDPO's penalty P(theta) = ||d L / d e||^2 differentiated with the eager attention path: the
    autograd directional derivative <grad P, v> equals a central finite difference.
    SDPA's fused CPU kernel has no double backward, which is why wdpo loads eager attention."""
    model = model_lib.load_causal_lm(str(tiny_model_dir), attn_implementation="eager").double().eval()
    batch = collate_lib.collate_pairs(_rows(), PAD)
    with torch.no_grad():
        by_ids = model_lib.compute_row_logps(model, batch).logps

    def penalty(create_graph: bool):
        out = model_lib.compute_row_logps(model, batch, embeddings=True)
        (grad,) = torch.autograd.grad(out.logps.sum(), out.embeddings, create_graph=create_graph)
        return out, grad.pow(2).sum()

    out, value = penalty(create_graph=True)
    assert torch.allclose(out.logps, by_ids.double(), atol=1e-10)
    weight = model.model.layers[0].self_attn.q_proj.weight
    (analytic,) = torch.autograd.grad(value, weight)
    direction = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0), dtype=weight.dtype)
    # Llama computes RMSNorm and rotary tables in fp32 even in a float64 model, so the difference
    # quotient is noisy below h ~ 1e-4; at h = 1e-3 it agrees with autograd to ~5e-4 (measured).
    h = 1e-3
    with torch.no_grad():
        weight.add_(h * direction)
    plus = penalty(create_graph=False)[1].detach()
    with torch.no_grad():
        weight.sub_(2 * h * direction)
    minus = penalty(create_graph=False)[1].detach()
    with torch.no_grad():
        weight.add_(h * direction)
    numeric = float((plus - minus) / (2 * h))
    assert float((analytic * direction).sum()) == pytest.approx(numeric, rel=3e-3)
    assert abs(numeric) > 1e-3


def test_wdpo_gets_eager_attention_by_default():
    from pipelines.train.config import attention_implementation, build_train_config

    cfg = build_train_config({"model": {"path": "m"}, "data": {"path": "d"}, "objective": {"name": "wdpo"}})
    assert attention_implementation(cfg) == "eager"
    cfg = build_train_config({"model": {"path": "m"}, "data": {"path": "d"}, "objective": {"name": "dpo"}})
    assert attention_implementation(cfg) == "sdpa"


def test_lora_reference_is_the_adapter_disabled_base(tiny_model_dir):
    """LoRA: the reference is the same module with adapters off (no copy).  After two steps the base
    weights are unchanged and the adapters moved; the step-0 loss equals the loss computed with a
    separate frozen full copy of the base as the reference."""
    import robust_objectives as ro

    from pipelines.train.step import StepContext, compute_objective, train_step

    path = str(tiny_model_dir)
    base = model_lib.load_causal_lm(path, attn_implementation="sdpa").eval().requires_grad_(False)
    policy = model_lib.add_lora(model_lib.load_causal_lm(path, attn_implementation="sdpa"), r=4, alpha=8.0,
                                dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0).train()
    ctx = StepContext(objective=ro.get_objective("dpo"), hyperparameters={"beta": 0.5}, listwise=False,
                      needs_vocab=False, needs_embeddings=False, batch_coupled=False, live_reference=True)
    batch = collate_lib.collate_pairs(_rows(), PAD)
    # Move the adapters off zero first, so "policy == reference" is not what makes the losses agree.
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_reference = model_lib.compute_row_logps(base, batch)
        expected, _ = compute_objective(policy, batch, full_reference, ctx, None)
    trainable = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    first = train_step(policy, None, optimizer, scheduler, [batch], ctx, 0)
    train_step(policy, None, optimizer, scheduler, [batch], ctx, 1)
    assert first["loss"] == pytest.approx(float(expected.loss), rel=1e-6)
    assert abs(first["loss"] - 0.6931471805599453) > 1e-4  # the adapters really changed the policy
    base_weights = dict(base.named_parameters())
    for name, p in policy.named_parameters():
        if not p.requires_grad:
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            assert torch.equal(p, base_weights[key]), name
    assert max(float((p - trainable[n]).abs().max()) for n, p in policy.named_parameters() if n in trainable) > 1e-3
    with policy.disable_adapter(), torch.no_grad():
        assert torch.allclose(model_lib.compute_row_logps(policy, batch).logps, full_reference.logps, atol=1e-6)


def test_load_causal_lm_merges_a_peft_adapter_dir_and_configs_fail_in_one_format(tiny_model_dir, tmp_path):
    """An adapter dir loads as its base with the adapters merged (same logits as the live peft
    model); its config is the base's; every config failure reads `<what>: cannot load ... from`."""
    from pipelines.errors import UserError

    path = str(tiny_model_dir)
    policy = model_lib.add_lora(model_lib.load_causal_lm(path), r=4, alpha=8.0, dropout=0.0,
                                target_modules=["q_proj", "v_proj"], seed=0).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    policy.save_pretrained(tmp_path / "adapter")
    merged = model_lib.load_causal_lm(str(tmp_path / "adapter")).eval()
    assert not model_lib.is_peft_model(merged)
    batch = collate_lib.collate_pairs(_rows(), PAD)
    with torch.no_grad():
        live = model_lib.compute_row_logps(policy, batch).logps
        base = model_lib.compute_row_logps(model_lib.load_causal_lm(path).eval(), batch).logps
        assert torch.allclose(model_lib.compute_row_logps(merged, batch).logps, live, atol=1e-5)
    assert float((live - base).abs().max()) > 1e-3  # the adapters matter, so the merge is what agrees
    config = model_lib.load_model_config(str(tmp_path / "adapter"), "--checkpoint a")
    assert config.vocab_size == model_lib.load_model_config(path, "--reference").vocab_size
    with pytest.raises(UserError, match=rf"^--reference: cannot load a model config from '{tmp_path / 'nope'}' \("):
        model_lib.load_model_config(str(tmp_path / "nope"), "--reference")
    assert model_lib.pick_device(False) == torch.device("cpu")


def test_pair_logps_actor_adds_float64_columns_per_model_with_one_forward_per_chunk(tiny_model_dir, tiny_model):
    """The actor of the reference and evaluate stages: per model, the columns equal compute_row_logps
    of collate_pairs on the whole batch, whatever the chunking; `keep` selects the passed-through
    columns; lists get one value per response."""
    import pyarrow as pa

    rows = _rows()
    table = pa.table({**{k: rows[k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")},
                      "row_id": ["a", "b"]})
    actor = model_lib.PairLogps(models=[("ref", str(tiny_model_dir)), ("ckpt0", str(tiny_model_dir))], batch_size=1)
    out = actor(table)
    assert out.column_names == [*table.column_names, "ref_chosen_logps", "ref_rejected_logps",
                                "ckpt0_chosen_logps", "ckpt0_rejected_logps"]
    assert out.schema.field("ref_chosen_logps").type == pa.float64()
    with torch.no_grad():
        expected = model_lib.compute_row_logps(tiny_model, collate_lib.collate_pairs(rows, PAD)).logps.double()
    for prefix in ("ref", "ckpt0"):
        assert out.column(f"{prefix}_chosen_logps").to_pylist() == pytest.approx(expected[:2].tolist(), abs=1e-5)
        assert out.column(f"{prefix}_rejected_logps").to_pylist() == pytest.approx(expected[2:].tolist(), abs=1e-5)
    assert actor(table.slice(0, 0)).num_rows == 0

    lists = {"prompt_input_ids": [[5], [6, 7]], "responses_input_ids": [[[8, 3], [9, 3]], [[3], [10, 11, 3]]],
             "_row": [0, 1]}
    listwise = model_lib.PairLogps(models=[("reference", str(tiny_model_dir))], listwise=True, keep=["_row"])
    out = listwise(pa.table(lists))
    assert out.column_names == ["_row", "reference_logps"]
    with torch.no_grad():
        expected = model_lib.compute_row_logps(tiny_model, collate_lib.collate_lists(lists, PAD)).logps.reshape(2, 2)
    assert out.column("reference_logps").to_pylist() == [pytest.approx(r, abs=1e-5) for r in expected.tolist()]
