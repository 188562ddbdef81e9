"""Packed rows, one shared prompt per pair, and the response-only head give the plain path's numbers.

The plain path is padded rows with the full (N, L, V) logits (`train.packing=false`).  The fast path
(`pipelines.train.config.batch_layout`: shared prompt + response-only head, or padded rows + the
head for wdpo) must give the same log-probs (fp32, rel. 1e-5), and for every objective the same
training trajectory: same losses and gradient norms (rel. 1e-5) and parameters (abs. 2e-6) after
3 SGD steps, for full fine-tuning with a live reference copy, for LoRA (reference = adapters off)
and with a precomputed reference.  Unit tier: a tiny saved Llama, CPU, no Ray.
"""

from __future__ import annotations

import pytest
import torch

from pipelines import collate as collate_lib
from pipelines import model as model_lib

PAD = 0
RTOL = 1e-5
PARAM_ATOL = 2e-6
STEPS = 3


def _rows():
    """Two pairs by hand: prompt [5, 6] / chosen [7, 3] / rejected [8, 9, 3]; prompt [10] / [11, 3] / [3]."""
    return {"prompt_input_ids": [[5, 6], [10]], "chosen_input_ids": [[7, 3], [11, 3]],
            "rejected_input_ids": [[8, 9, 3], [3]]}


def test_shared_layout_by_hand():
    rows = _rows()
    for side, extra in (("prompt_input_ids", [12]), ("chosen_input_ids", [3]), ("rejected_input_ids", [13])):
        rows[side] = rows[side] + [extra]
    batch = collate_lib.collate_pairs(rows, PAD, layout="shared")
    # Segments: pair 0 = 5 6 | 7 3 | 8 9 3 (7 tokens), pair 1 = 10 | 11 3 | 3 (4), pair 2 = 12 | 3 | 13 (3).
    # Rows of the longest segment's width 7, first fit decreasing: [pair 0], [pair 1, pair 2].
    assert batch["input_ids"].tolist() == [[5, 6, 7, 3, 8, 9, 3], [10, 11, 3, 3, 12, 3, 13]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 2, 1, 0, 1, 1]]
    assert batch["segment_ids"].tolist() == [[0] * 7, [1, 1, 1, 1, 2, 2, 2]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 2, 0, 1, 2]]
    # Rows 0..2 chosen, 3..5 rejected; flat position = row * 7 + column.  The last prompt token
    # (flat 1, 7, 11) predicts both responses' first tokens.
    assert batch["score_index"].tolist() == [1, 2, 1, 4, 5, 7, 8, 7, 11, 11]
    assert batch["score_targets"].tolist() == [7, 3, 8, 9, 3, 11, 3, 3, 3, 13]
    assert batch["score_rows"].tolist() == [0, 0, 3, 3, 3, 1, 1, 4, 2, 5]
    assert batch["score_cols"].tolist() == [0, 1, 0, 1, 2, 0, 1, 0, 0, 0]
    assert batch["lengths"].tolist() == [2, 2, 1, 3, 1, 1]
    # Useful tokens as an unshared forward counts them (each prompt twice); 14 computed, no padding.
    assert collate_lib.count_tokens(batch) == (9 + 5 + 4, 14, 0)


def test_packed_and_padded_layouts_by_hand():
    packed = collate_lib.collate_pairs(_rows(), PAD, layout="packed")
    # Rows 5 6 7 3 | 10 11 3 | 5 6 8 9 3 | 10 3 into width 5: [rejected 0], [chosen 0], [chosen 1, rejected 1].
    assert packed["input_ids"].tolist() == [[5, 6, 8, 9, 3], [5, 6, 7, 3, PAD], [10, 11, 3, 10, 3]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert packed["segment_ids"][1, 4] < 0 and packed["segment_ids"][2].tolist() == [1, 1, 1, 3, 3]
    assert packed["score_index"].tolist() == [1, 2, 3, 6, 7, 10, 11, 13]
    assert packed["score_rows"].tolist() == [2, 2, 2, 0, 0, 1, 1, 3]
    assert packed["token_rows"].tolist() == [2] * 5 + [0] * 4 + [1] * 3 + [3] * 2
    assert packed["token_flat"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14]
    assert collate_lib.count_tokens(packed) == (14, 15, 1)
    padded = collate_lib.collate_pairs(_rows(), PAD, response_head=True)
    # Width 5: row n's token t is flat n * 5 + t.
    assert padded["score_index"].tolist() == [1, 2, 5, 6, 11, 12, 13, 15]
    assert collate_lib.count_tokens(padded) == (14, 20, 6)
    assert "score_index" not in collate_lib.collate_pairs(_rows(), PAD)  # the plain path


def test_shared_mask_by_hand():
    batch = collate_lib.collate_pairs({"prompt_input_ids": [[5, 6]], "chosen_input_ids": [[7]],
                                       "rejected_input_ids": [[8, 9]]}, PAD, layout="shared")
    mask = model_lib.packed_attention_mask(batch, "sdpa", torch.float32)
    assert mask.shape == (1, 1, 5, 5)
    mask = mask[0, 0].int().tolist()
    # tokens: p p c r r -- the responses see the prompt and themselves, never each other.
    assert mask == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [1, 1, 1, 0, 0],
                    [1, 1, 0, 1, 0],
                    [1, 1, 0, 1, 1]]
    additive = model_lib.packed_attention_mask(batch, "eager", torch.float32)[0, 0]
    assert bool((additive == 0).eq(torch.tensor(mask, dtype=torch.bool)).all())
    with pytest.raises(ValueError, match="train.packing=false"):
        model_lib.packed_attention_mask(batch, "flash_attention_2", torch.float32)


def test_shared_lists_put_each_prompt_once():
    rows = {"prompt_input_ids": [[5], [6, 7]], "responses_input_ids": [[[8, 3], [9, 3]], [[3], [10, 11, 3]]],
            "scores": [[1.0, 0.0], [0.0, 2.0]]}
    batch = collate_lib.collate_lists(rows, PAD, layout="shared")
    assert batch["input_ids"].tolist() == [[6, 7, 3, 10, 11, 3], [5, 8, 3, 9, 3, PAD]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0]]
    assert batch["lengths"].tolist() == [2, 2, 1, 3]  # row b*K + k


def _random_rows(seed: int, pairs: int, listwise: bool = False, max_length: int = 0):
    """Random pairs (or lists of 3) over the tiny model's words, prompts 1..7 and responses 1..6
    tokens; with max_length, the last row is cut to exactly max_length tokens as the data stage cuts."""
    g = torch.Generator().manual_seed(seed)

    def ids(low, high):
        return torch.randint(4, 44, (int(torch.randint(low, high + 1, (1,), generator=g)),), generator=g).tolist()

    prompts = [ids(1, 7) for _ in range(pairs)]
    if listwise:
        lists = [[ids(1, 6) for _ in range(3)] for _ in range(pairs)]
        return {"prompt_input_ids": prompts, "responses_input_ids": lists,
                "scores": [torch.rand(3, generator=g).tolist() for _ in range(pairs)]}
    rows = {"prompt_input_ids": prompts, "chosen_input_ids": [ids(1, 6) for _ in range(pairs)],
            "rejected_input_ids": [ids(1, 6) for _ in range(pairs)]}
    if max_length:
        rows["prompt_input_ids"][-1] = ids(max_length - 2, max_length - 2)
        for side in ("chosen_input_ids", "rejected_input_ids"):
            rows[side][-1] = ids(8, 8)[: max_length - len(rows["prompt_input_ids"][-1])]
    return rows


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny(request, tiny_model_dir):
    return model_lib.load_causal_lm(str(tiny_model_dir), attn_implementation=request.param).eval()


@pytest.mark.parametrize("listwise", [False, True])
@pytest.mark.parametrize("layout", ["padded", "packed", "shared"])
def test_every_layout_gives_the_plain_log_probs(tiny, layout, listwise):
    rows = _random_rows(7, 5, listwise=listwise, max_length=0 if listwise else 12)
    collate = collate_lib.collate_lists if listwise else collate_lib.collate_pairs
    with torch.no_grad():
        plain = model_lib.compute_row_logps(tiny, collate(rows, PAD))
        plain_vocab = model_lib.compute_row_logps(tiny, collate(rows, PAD), vocab=True)
        fast = model_lib.compute_row_logps(tiny, collate(rows, PAD, layout=layout, response_head=True))
        fast_vocab = model_lib.compute_row_logps(tiny, collate(rows, PAD, layout=layout, response_head=True), vocab=True)
    assert model_lib.head_is_plain(tiny)
    torch.testing.assert_close(fast.logps, plain.logps, rtol=RTOL, atol=0)
    torch.testing.assert_close(fast_vocab.logps, plain.logps, rtol=RTOL, atol=0)
    assert fast.lengths.tolist() == plain.lengths.tolist()
    # The distributions at the response positions, in response order, are the plain path's.
    for n in range(plain.logps.shape[0]):
        ours = fast_vocab.vocab_logps[n][fast_vocab.mask[n]]
        theirs = plain_vocab.vocab_logps[n][plain_vocab.mask[n]]
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=1e-6)


def test_the_model_own_head_is_used_when_logits_are_post_processed(tmp_path):
    """Gemma2 soft-caps its logits after the head: the probe says so, and the response-only path
    goes through the model's forward with logits_to_keep, still equal to the plain path."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                          pad_token_id=0)
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    model = model_lib.load_causal_lm(str(tmp_path), attn_implementation="eager").eval()  # Gemma2 has no sdpa
    assert not model_lib.head_is_plain(model)
    rows = _random_rows(3, 4)
    with torch.no_grad():
        plain = model_lib.compute_row_logps(model, collate_lib.collate_pairs(rows, PAD))
        for layout in ("padded", "shared"):
            fast = model_lib.compute_row_logps(model, collate_lib.collate_pairs(rows, PAD, layout=layout, response_head=True))
            torch.testing.assert_close(fast.logps, plain.logps, rtol=RTOL, atol=0)


def test_wdpo_embeddings_keep_separate_rows_and_the_same_gradient(tiny_model_dir):
    """wdpo's layouts (packed rows, or padded + the response-only head): the embeddings are the
    (2B, L, d) rows, and d sum(logps) / d embeddings equals the plain path's, row by row."""
    model = model_lib.load_causal_lm(str(tiny_model_dir), attn_implementation="eager").eval()
    rows = _random_rows(5, 3)
    longest = max(len(p) + len(r) for p, c, rj in zip(*rows.values()) for r in (c, rj))
    grads = []
    for layout, head in (("padded", False), ("padded", True), ("packed", True)):
        batch = collate_lib.collate_pairs(rows, PAD, layout=layout, response_head=head)
        out = model_lib.compute_row_logps(model, batch, embeddings=True)
        assert out.embeddings.shape[:2] == (6, longest)
        grads.append(torch.autograd.grad(out.logps.sum(), out.embeddings)[0])
    assert float(grads[0].abs().max()) > 0
    for grad in grads[1:]:
        torch.testing.assert_close(grad, grads[0], rtol=RTOL, atol=1e-6)  # gradients of order 1


# A whole (short) training run per objective: fast path vs plain path -------------------------------


def _train(model_dir: str, name: str, *, fast: bool, lora: bool = False, precomputed: bool = False,
           checkpointing: bool = False):
    """3 SGD steps of `name` on fixed random batches of 8; returns (losses and grad norms, parameters)."""
    import robust_objectives as ro

    from pipelines.train.step import StepContext, train_step

    spec = ro.get_spec(name)
    attn = "eager" if spec.needs_embeddings else "sdpa"
    policy = model_lib.load_causal_lm(model_dir, attn_implementation=attn).train()
    generator = torch.Generator().manual_seed(1234)  # off the reference (see test_train_invariance._perturb)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    reference = None
    if checkpointing:  # as pipelines.train.loop.build_worker_models does for train.gradient_checkpointing
        model_lib.enable_activation_checkpointing(policy)
        assert all(layer.gradient_checkpointing for layer in policy.model.layers)
    if lora:
        policy = model_lib.add_lora(policy, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], seed=0)
    elif not precomputed:
        reference = model_lib.load_causal_lm(model_dir, attn_implementation=attn).eval().requires_grad_(False)
    hyperparameters = ro.objective_hyperparameters(name)
    hyperparameters.update({k: v for k, v in {"beta": 1.0, "rho": 0.1}.items() if k in hyperparameters})
    ctx = StepContext(objective=spec.fn, hyperparameters=hyperparameters, listwise=spec.listwise,
                      needs_vocab=spec.token_level, needs_embeddings=spec.needs_embeddings,
                      batch_coupled=spec.batch_coupled, live_reference=not precomputed)
    layout = ("packed" if spec.needs_embeddings else "shared") if fast else "padded"
    collate = collate_lib.collate_lists if spec.listwise else collate_lib.collate_pairs
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    history = []
    for step in range(STEPS):
        rows = _random_rows(100 + step, 8, listwise=spec.listwise, max_length=0 if spec.listwise else 12)
        if spec.needs_calibration:  # one per pair, or one per response of a list
            rows["calibration"] = (torch.rand((8, 3) if spec.listwise else 8, generator=generator) + 0.5).tolist()
        if precomputed:
            rows["reference_chosen_logps"] = (-10 * torch.rand(8, generator=generator)).tolist()
            rows["reference_rejected_logps"] = (-10 * torch.rand(8, generator=generator)).tolist()
        micro = [collate(rows, PAD, layout=layout, response_head=fast)]
        metrics = train_step(policy, reference, optimizer, scheduler, micro, ctx, step)
        history += [metrics["loss"], metrics["grad_norm"]]
    return history, {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


def _assert_same(fast, plain, what: str) -> None:
    assert fast[0] == pytest.approx(plain[0], rel=RTOL), f"{what}: {fast[0]} vs {plain[0]}"
    worst = max(float((fast[1][n] - plain[1][n]).abs().max()) for n in plain[1])
    assert worst <= PARAM_ATOL, f"{what}: parameters differ by {worst:.3g}"


def _objectives():
    import robust_objectives as ro

    return sorted(ro.OBJECTIVES)


@pytest.mark.parametrize("name", _objectives())
def test_every_objective_trains_the_same_on_the_fast_path(tiny_model_dir, name):
    model_dir = str(tiny_model_dir)
    _assert_same(_train(model_dir, name, fast=True), _train(model_dir, name, fast=False), f"{name} full")


@pytest.mark.parametrize("name", ["dpo", "kldpo", "tdpo2", "radpo1", "wdpo", "dora_pl"])
def test_lora_trains_the_same_on_the_fast_path(tiny_model_dir, name):
    model_dir = str(tiny_model_dir)
    _assert_same(_train(model_dir, name, fast=True, lora=True), _train(model_dir, name, fast=False, lora=True),
                 f"{name} lora")


@pytest.mark.parametrize("name", ["dpo", "kldpo", "dora"])
def test_precomputed_reference_trains_the_same_on_the_fast_path(tiny_model_dir, name):
    model_dir = str(tiny_model_dir)
    _assert_same(_train(model_dir, name, fast=True, precomputed=True),
                 _train(model_dir, name, fast=False, precomputed=True), f"{name} precomputed")


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_trains_the_same(tiny_model_dir, lora):
    model_dir = str(tiny_model_dir)
    _assert_same(_train(model_dir, "dpo", fast=True, lora=lora, checkpointing=True),
                 _train(model_dir, "dpo", fast=True, lora=lora), f"checkpointing lora={lora}")


def test_packing_and_checkpointing_are_checked_against_the_kernel_and_the_objective():
    from pipelines.errors import UserError
    from pipelines.train.config import batch_layout, build_train_config

    def cfg(name, **train):
        return build_train_config({"model": {"path": "m"}, "data": {"path": "d"}, "objective": {"name": name},
                                   "train": train})

    assert batch_layout(cfg("dpo")) == ("shared", True)
    assert batch_layout(cfg("wdpo")) == ("packed", True)
    assert batch_layout(cfg("dpo", packing=False)) == ("padded", False)
    with pytest.raises(UserError, match="gradient checkpointing"):
        cfg("wdpo", gradient_checkpointing=True)
    with pytest.raises(UserError, match="train.packing=false"):
        build_train_config({"model": {"path": "m", "attn_implementation": "flash_attention_2"}, "data": {"path": "d"},
                            "objective": {"name": "dpo"}})
