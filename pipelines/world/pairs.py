"""What `robust-dpo synth` builds from a drawn world: labelled pairs, the DoRA source classifier, the
reference model, and the parquet files.  The world's functions themselves live in pipelines/world/functions.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipelines.world.functions import World, _round, _sigmoid

REWARD_COLUMNS_OF = ("r1", "r2", "r3", "verbosity", "length")
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "group", "source")
PAIR_COLUMNS = (
    *TEXT_COLUMNS, "alpha", "flipped", "calibration", "calibration_oracle", "p_target_chosen", "p_target_rejected",
    *(f"reward_{k}_{side}" for k in REWARD_COLUMNS_OF for side in ("chosen", "rejected")),
)
_TIE = 1e-12  # labelling-score gap below which a pair is redrawn (no pair without a strict preference)


def labelling_scores(world: World, prompts, responses, alpha: np.ndarray, sources, judge_bias: float) -> np.ndarray:
    """(N,) s(y) = alpha*r1 + (1-alpha)*r2 [+ judge_bias * verbosity(y) for synthetic rows]: the judge term is
    OBJECTIVES.md 8.3's biased proxy (the synthetic source's judge likes verbosity)."""
    bias = judge_bias * (np.asarray(sources) == "synthetic") * world.reward("verbosity", prompts, responses)
    return world.mixture_reward(alpha, prompts, responses) + bias


def build_pairs(world: World, cfg, n: int, target_fraction: float, rng: np.random.Generator, split: str) -> dict:
    """Draw n labelled pairs, {column of PAIR_COLUMNS: n values}; both responses of a pair share source and prompt.

    Train labels: argmax (or BT-sampled) labelling score with judge bias on synthetic rows, then exact
    label-noise flips.  Eval labels: argmax of the golden mixture, no bias, no noise.
    """
    is_train = split == "train"
    n_target = round(target_fraction * n)
    sources = np.array(["target"] * n_target + ["synthetic"] * (n - n_target), dtype=object)[rng.permutation(n)]
    prompts, groups = (np.array(v, dtype=object) for v in world.sample_prompts(n, rng))
    if cfg.group_labels:
        alpha = np.array([world.spec["groups"][g]["alpha"] for g in groups], dtype=float)
    else:
        alpha = np.full(n, float(cfg.alpha_train))
    judge = cfg.judge_bias if is_train else 0.0
    ya = np.empty(n, dtype=object)
    yb = np.empty(n, dtype=object)
    todo = np.arange(n)
    for _ in range(1000):
        for src in ("target", "synthetic"):
            rows = todo[sources[todo] == src]
            if len(rows):
                ya[rows] = world.sample(src, list(prompts[rows]), rng)
                yb[rows] = world.sample(src, list(prompts[rows]), rng)
        sa = labelling_scores(world, prompts, ya, alpha, sources, judge)
        sb = labelling_scores(world, prompts, yb, alpha, sources, judge)
        todo = np.flatnonzero((ya == yb) | (np.abs(sa - sb) <= _TIE))
        if len(todo) == 0:
            break
    else:
        raise RuntimeError(f"could not draw {len(todo)} distinct pairs; the world is too small")
    if is_train and cfg.bt_temperature > 0:
        a_wins = rng.random(n) < _sigmoid((sa - sb) / cfg.bt_temperature)  # Bradley-Terry
    else:
        a_wins = sa > sb
    flipped = np.zeros(n, dtype=bool)
    if is_train:
        flipped[rng.permutation(n)[: round(cfg.label_noise * n)]] = True
        a_wins ^= flipped
    chosen = np.where(a_wins, ya, yb)
    rejected = np.where(a_wins, yb, ya)
    cols = {c: list(v) for c, v in zip(TEXT_COLUMNS, (prompts, chosen, rejected, groups, sources))}
    cols.update(alpha=alpha, flipped=flipped)
    p_c, p_r = world.p_target(chosen), world.p_target(rejected)
    # DoRA's per-list calibration is the mean of its responses' h~ (OBJECTIVES.md 6.3).
    cols["calibration"] = 0.5 * (world.calibration(p_c) + world.calibration(p_r))
    oracle_c, oracle_r = world.p_target_oracle(prompts, chosen), world.p_target_oracle(prompts, rejected)
    cols["calibration_oracle"] = 0.5 * (world.calibration(oracle_c) + world.calibration(oracle_r))
    cols["p_target_chosen"], cols["p_target_rejected"] = p_c, p_r
    for k in REWARD_COLUMNS_OF:
        cols[f"reward_{k}_chosen"] = world.reward(k, prompts, chosen)
        cols[f"reward_{k}_rejected"] = world.reward(k, prompts, rejected)
    return {c: cols[c] for c in PAIR_COLUMNS}


def write_parquet(cols: dict, path: Path) -> None:
    """One parquet file with fixed writer settings (same columns -> same bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({c: pa.array(v, pa.string()) if c in TEXT_COLUMNS else np.asarray(v) for c, v in cols.items()})
    pq.write_table(
        table,
        path,
        compression="zstd",
        compression_level=3,
        version="2.6",
        use_dictionary=False,
        write_statistics=True,
        row_group_size=1 << 20,
    )


def split_stats(world: World, cols: dict, cfg) -> dict:
    """Summary numbers of one split for world.json (label agreement, reward means, r1-r2 correlation)."""
    src = np.asarray(cols["source"])
    prompts = list(cols["prompt"]) * 2
    responses = list(cols["chosen"]) + list(cols["rejected"])
    gold_c = world.mixture_reward(cfg.alpha_train, cols["prompt"], cols["chosen"])
    gold_r = world.mixture_reward(cfg.alpha_train, cols["prompt"], cols["rejected"])
    agree = gold_c > gold_r
    r1 = world.reward("r1", prompts, responses)
    r2 = world.reward("r2", prompts, responses)
    length, verbosity = world.reward("length", prompts, responses), world.reward("verbosity", prompts, responses)

    def mean(values, rows, scale=1.0):
        return float(values[rows].mean() * scale) if rows.any() else None

    by_src = {}
    for s in ("target", "synthetic"):
        m = src == s
        both = np.r_[m, m]
        by_src[s] = {
            "n": int(m.sum()),
            "agree_with_r_alpha_train": mean(agree, m),
            "mean_length_words": mean(length, both, world.max_response_words),
            "mean_verbosity": mean(verbosity, both),
            "mean_calibration": mean(np.asarray(cols["calibration"]), m),
        }
    out = {
        "n": len(src),
        "n_flipped": int(np.asarray(cols["flipped"]).sum()),
        "groups": {g: int((np.asarray(cols["group"]) == g).sum()) for g in world.groups},
        "agree_with_r_alpha_train": float(agree.mean()),
        "by_source": by_src,
        "corr_r1_r2": float(np.corrcoef(r1, r2)[0, 1]),
        "mean_reward_chosen": {k: float(np.mean(cols[f"reward_{k}_chosen"])) for k in REWARD_COLUMNS_OF},
        "mean_reward_rejected": {k: float(np.mean(cols[f"reward_{k}_rejected"])) for k in REWARD_COLUMNS_OF},
    }
    return _round(out)


def fit_source_classifier(world: World, cfg, rng: np.random.Generator) -> dict:
    """DoRA stage 1: L2 logistic regression, target (1) vs synthetic (0), on `World.classifier_features`.

    Fitted by Newton's method on 60% of 2 x n_classifier fresh responses, temperature-scaled on 20%
    (grid over T, min log loss), scored on the last 20% (accuracy, 10-bin ECE, log loss, and the
    Bayes accuracy of the exact density ratio on the same responses).
    """
    n = cfg.n_classifier
    prompts, _ = world.sample_prompts(2 * n, rng)
    responses = world.sample("target", prompts[:n], rng) + world.sample("synthetic", prompts[n:], rng)
    y = np.r_[np.ones(n), np.zeros(n)]
    x = world.classifier_features(responses)
    order = rng.permutation(2 * n)
    fit, cal, test = np.split(order, [int(0.6 * 2 * n), int(0.8 * 2 * n)])
    l2 = 1e-2
    xb = np.c_[x, np.ones(len(x))]
    w = np.zeros(xb.shape[1])
    reg = np.r_[np.full(x.shape[1], l2), 1e-8]  # the bias is not penalised
    for _ in range(50):  # Newton / IRLS on mean log loss + l2/2 |w|^2
        p = _sigmoid(xb[fit] @ w)
        grad = xb[fit].T @ (p - y[fit]) / len(fit) + reg * w
        hess = (xb[fit].T * (p * (1 - p))) @ xb[fit] / len(fit) + np.diag(reg)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    weights, bias = _round(w[:-1]), _round(w[-1])
    z = x @ np.asarray(weights) + bias

    def log_loss(p, t):
        p = np.clip(p, 1e-12, 1 - 1e-12)
        return float(-np.mean(t * np.log(p) + (1 - t) * np.log(1 - p)))

    grid = np.exp(np.linspace(math.log(0.2), math.log(5.0), 161))
    temperature = _round(grid[int(np.argmin([log_loss(_sigmoid(z[cal] / T), y[cal]) for T in grid]))])
    p_test = _sigmoid(z[test] / temperature)
    bins = np.minimum((p_test * 10).astype(int), 9)
    ece = sum(
        abs(y[test][bins == b].mean() - p_test[bins == b].mean()) * (bins == b).mean()
        for b in range(10)
        if (bins == b).any()
    )
    p_oracle = world.p_target_oracle([prompts[i] for i in test], [responses[i] for i in test])
    return _round({
        "model": "logistic regression, L2 (l2 on mean log loss), Newton; temperature scaling on a held-out split",
        "features": "counts of every world word in the response, then #words / max_response_words",
        "formula": "p(target | y) = sigmoid((weights . features(y) + bias) / temperature)",
        "weights": weights,
        "bias": bias,
        "temperature": temperature,
        "l2": l2,
        "n_fit": len(fit),
        "n_calibration": len(cal),
        "n_test": len(test),
        "heldout_accuracy": np.mean((p_test > 0.5) == (y[test] == 1)),
        "heldout_ece": ece,
        "heldout_log_loss": log_loss(p_test, y[test]),
        "heldout_bayes_accuracy": np.mean((p_oracle > 0.5) == (y[test] == 1)),
    })


def encode_sequences(world: World, prompts, responses, eos_id: int, pad_id: int):
    """(N, T) int64 input_ids, attention_mask and labels (-100 outside the response) of prompt + response + EOS,
    right-padded to T = max_prompt_words + max_response_words + 1; token id = 4 + world word index."""
    max_len = int(world.spec["config"]["max_prompt_words"]) + world.max_response_words + 1
    ids = np.full((len(prompts), max_len), pad_id, dtype=np.int64)
    labels = np.full_like(ids, -100)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        pw = [world.word_index[w] + 4 for w in p.split()]
        rw = [world.word_index[w] + 4 for w in r.split()] + [eos_id]
        ids[i, : len(pw) + len(rw)] = pw + rw
        labels[i, len(pw) : len(pw) + len(rw)] = rw
    return ids, (ids != pad_id).astype(np.int64), labels


def train_reference_model(world: World, cfg, tokenizer, data_rng, init_rng, log: Callable = print):
    """Maximum likelihood on the synthetic generator's text (response tokens + EOS), single-threaded
    and deterministic; fresh samples every step.  Returns (model in eval mode, stats for world.json)."""
    import torch

    from pipelines.world.toy_models import build_tiny_causal_lm

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)  # bit-identical weights: one thread fixes the reduction order
    torch.use_deterministic_algorithms(True)
    try:
        model = build_tiny_causal_lm(
            len(tokenizer),
            hidden_size=cfg.ref_hidden_size,
            num_layers=cfg.ref_layers,
            num_heads=cfg.ref_heads,
            seed=int(init_rng.integers(2**31)),
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        n_seq = cfg.ref_steps * cfg.ref_batch_size
        prompts, _ = world.sample_prompts(n_seq + 1024, data_rng)
        responses = world.sample("synthetic", prompts, data_rng)
        encoded = encode_sequences(world, prompts, responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
        ids, mask, labels = (torch.from_numpy(a) for a in encoded)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.ref_lr, betas=(0.9, 0.98), weight_decay=0.0)
        warm = max(1, cfg.ref_steps // 10)

        def lr_at(step):  # linear warm-up, cosine decay to 10% of the peak
            if step < warm:
                return (step + 1) / warm
            return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.ref_steps - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
        model.train()
        for step in range(cfg.ref_steps):
            sl = slice(step * cfg.ref_batch_size, (step + 1) * cfg.ref_batch_size)
            loss = model(input_ids=ids[sl], attention_mask=mask[sl], labels=labels[sl]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if (step + 1) % max(1, cfg.ref_steps // 4) == 0:
                log(f"      reference step {step + 1}/{cfg.ref_steps}: loss {loss.item():.3f}")
        model.eval()
        held = slice(n_seq, n_seq + 1024)
        with torch.no_grad():
            logits = model(input_ids=ids[held], attention_mask=mask[held]).logits[:, :-1].float()
        tgt = labels[held][:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
        n_tok = int((tgt != -100).sum())
        nll = float(-(logp * (tgt != -100)).sum() / n_tok)
        gen_nll = float(-world.log_prob("synthetic", prompts[held], responses[held]).sum() / n_tok)
        stats = {
            "architecture": "LlamaForCausalLM",
            "hidden_size": cfg.ref_hidden_size,
            "layers": cfg.ref_layers,
            "heads": cfg.ref_heads,
            "parameters": int(sum(p.numel() for p in model.parameters())),
            "trained_on": "synthetic source (prompt + response + EOS; loss on response and EOS tokens)",
            "steps": cfg.ref_steps,
            "batch_size": cfg.ref_batch_size,
            "lr": cfg.ref_lr,
            "optimizer": "AdamW betas (0.9, 0.98), wd 0, clip 1.0, warm-up 10% then cosine to 10%",
            "heldout_sequences": 1024,
            "nll_per_token": _round(nll),
            "generator_nll_per_token": _round(gen_nll),
            "uniform_nll_per_token": _round(math.log(len(tokenizer))),
        }
        return model, stats
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
