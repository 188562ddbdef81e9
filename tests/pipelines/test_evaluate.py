"""`robust-dpo evaluate`: metrics by hand, reward specs, and a tiny end-to-end run on Ray Data."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from pipelines import schema
from pipelines.cli import main as cli_main
from pipelines.errors import UserError
from pipelines.evaluate import (
    RESULT_COLUMNS,
    EvaluateConfig,
    GenerationConfig,
    build_grid,
    evaluate,
    pair_metrics,
    parse_checkpoints,
    weighted_prompt_metrics,
)
from pipelines.evaluate.rewards import RewardFunction, parse_reward_spec


def test_pair_metrics_by_hand():
    """h = Delta_w - Delta_l = (1, -1, 0): accuracy 1/3, ties 1/3, margin 0, and with beta = 1
    loss = (log(1 + e^-1) + log(1 + e) + log 2) / 3."""
    m = pair_metrics(np.array([1.0, 0.0, 2.0]), np.array([0.0, 1.0, 2.0]), np.zeros(3), np.zeros(3), beta=1.0)
    assert m["pair_accuracy"] == pytest.approx(1 / 3) and m["pair_ties"] == pytest.approx(1 / 3)
    assert m["margin"] == 0.0 and m["n_pairs"] == 3
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.e) + math.log(2)) / 3
    assert m["dpo_loss"] == pytest.approx(expected)
    # The reference subtracts per response: policy 3 vs 1 with reference 3 vs 0 is a *negative* margin.
    m = pair_metrics(np.array([3.0]), np.array([1.0]), np.array([3.0]), np.array([0.0]), beta=0.1)
    assert m["pair_accuracy"] == 0.0 and m["margin"] == -1.0
    assert math.isnan(pair_metrics(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), 0.1)["pair_accuracy"])


def test_weighted_prompt_metrics_by_hand():
    """Rows a, a, b, c (c never sampled): reward = (2 * 1.0 + 3.0) / 3."""
    per_prompt = pd.DataFrame({"reward": [1.0, 3.0]}, index=["a", "b"])
    out = weighted_prompt_metrics(["a", "a", "b", "c"], per_prompt, ["reward"])
    assert out == {"n_prompts": 2, "reward": pytest.approx(5.0 / 3.0)}
    assert math.isnan(weighted_prompt_metrics(["c"], per_prompt, ["reward"])["reward"])


def test_checkpoint_names_and_grid(tmp_path):
    (tmp_path / "trial_7" / "final_model").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    assert parse_checkpoints([str(tmp_path / "trial_7" / "final_model"), f"ref={tmp_path / 'b'}"]) == [
        ("trial_7", str(tmp_path / "trial_7" / "final_model")), ("ref", str(tmp_path / "b"))]
    with pytest.raises(UserError, match="share the trial id 'b'"):
        parse_checkpoints([str(tmp_path / "b"), f"b={tmp_path / 'b'}"])
    with pytest.raises(UserError, match="is not a directory"):
        parse_checkpoints([str(tmp_path / "nope")])
    grid = build_grid(["mixture:alpha=0:1:3", "label_flip:eps=0.2"], ("r1", "r2"))
    assert [(n, lv) for n, lv, _ in grid] == [("mixture", 0.0), ("mixture", 0.5), ("mixture", 1.0), ("label_flip", 0.2)]
    assert all("r1=r1" in text and "r2=r2" in text for n, _, text in grid if n == "mixture")
    assert build_grid([], None) == [("none", 0.0, "")]


def test_reward_specs(tmp_path, tiny_model_dir):
    assert parse_reward_spec("world:some/dir:r3") == parse_reward_spec("world:some/dir:r3")
    assert parse_reward_spec("world:some/dir:r3").name == "r3"
    assert parse_reward_spec("pkg.mod:fn").kind == "function"
    assert parse_reward_spec(str(tiny_model_dir)).kind == "hf"
    with pytest.raises(UserError, match="is not world:DIR"):
        parse_reward_spec("nonsense here")
    fn = RewardFunction("pipelines.evaluate.rewards:word_count")
    assert fn.score(["p", "q"], ["a b c", ""]).tolist() == [3.0, 0.0]
    with pytest.raises(UserError, match="cannot score the mixture shift"):
        fn.score(["p"], ["a"], alpha=0.5)
    with pytest.raises(UserError, match="has no function 'nope'"):
        RewardFunction("pipelines.evaluate.rewards:nope")


def test_hf_reward_model(tmp_path, tiny_model_dir):
    """An HF sequence-classification model with one output is a reward; two outputs are refused."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for labels in (1, 2):
        config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, num_labels=labels,
                             pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        LlamaForSequenceClassification(config).save_pretrained(tmp_path / f"rm{labels}")
        tok.save_pretrained(tmp_path / f"rm{labels}")
    rm = RewardFunction(f"hf:{tmp_path / 'rm1'}")
    scores = rm.score(["w1 w2", "w3"], ["w4", "w5 w6 w7"])
    assert scores.shape == (2,) and np.isfinite(scores).all() and scores[0] != scores[1]
    # Scores do not depend on batch padding.
    assert rm.score(["w1 w2"], ["w4"])[0] == pytest.approx(scores[0], abs=1e-5)
    with pytest.raises(UserError, match="one output, this one has 2"):
        RewardFunction(f"hf:{tmp_path / 'rm2'}")


# --- end to end on a tiny world -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A small drawn world (world.json only), a tiny Llama over its words (reference), a perturbed
    copy (policy), and a tokenised eval split of 24 pairs carrying r1/r2 reward columns."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.world import WorldConfig, draw_world_spec
    from toy_checkpoints import save_tiny_model_and_tokenizer
    from pipelines.world.functions import World

    root = tmp_path_factory.mktemp("eval_world")
    spec = draw_world_spec(WorldConfig(seed=3, n_topic_words=4, n_content_words=8, n_filler_words=2,
                                       n_style_words=2, max_response_words=5))
    (root / "world.json").write_text(json.dumps(spec))
    world = World(spec)
    reference = save_tiny_model_and_tokenizer(root / "reference", world.words, seed=0)
    policy = AutoModelForCausalLM.from_pretrained(reference)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    policy.save_pretrained(root / "policy")
    tok = AutoTokenizer.from_pretrained(reference)
    tok.save_pretrained(root / "policy")

    rng = np.random.default_rng(0)
    prompts, groups = world.sample_prompts(40, rng)
    ya, yb = world.sample("synthetic", prompts, rng), world.sample("synthetic", prompts, rng)
    keep = [i for i in range(40) if ya[i] != yb[i]][:24]
    rows = {"prompt": [prompts[i] for i in keep], "chosen": [ya[i] for i in keep], "rejected": [yb[i] for i in keep]}
    rows["group"] = [groups[i] for i in keep]
    rows["source"] = ["target" if i % 2 == 0 else "synthetic" for i in range(len(keep))]
    rows["row_id"] = [f"eval.parquet:row {i}" for i in range(len(keep))]
    for side in ("chosen", "rejected"):
        for name in ("r1", "r2"):
            rows[f"reward_{name}_{side}"] = world.reward(name, rows["prompt"], rows[side]).tolist()
    rows["prompt_input_ids"] = [tok(p)["input_ids"] for p in rows["prompt"]]
    for side in ("chosen", "rejected"):
        rows[f"{side}_input_ids"] = [tok(r)["input_ids"] + [tok.eos_token_id] for r in rows[side]]
    data = root / "data"
    (data / "eval").mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(data / "eval" / "part-0.parquet", index=False)
    schema.write_manifest(data, format="pairs", tokenizer=str(reference), max_length=64, splits=["eval"])
    return {"root": root, "world": world, "reference": str(reference), "policy": str(root / "policy"),
            "data": str(data), "rows": pd.DataFrame(rows)}


@pytest.mark.ray
def test_evaluate_tiny_checkpoint_matches_direct_computation(ray_session, tiny_world, tmp_path):
    from teacher_forcing import response_logps
    from transformers import AutoModelForCausalLM

    w = tiny_world
    cfg = EvaluateConfig(
        checkpoints=[f"pol={w['policy']}", f"ref={w['reference']}"], reference=w["reference"], data=w["data"],
        output=str(tmp_path / "eval"), grid=["mixture:alpha=0:1:3", "label_flip:eps=0:1:2", "source_mixture:target=0:1:2"],
        reward=f"world:{w['root']}", beta=0.5, batch_size=8,
        generation=GenerationConfig(num_prompts=5, samples_per_prompt=3, max_new_tokens=6, batch_size=8),
    )
    result = evaluate(cfg)
    assert list(result.columns) == list(RESULT_COLUMNS) and len(result) == 2 * 7
    on_disk = pd.read_csv(tmp_path / "eval" / "evaluation.csv")
    assert on_disk[["trial_id", "shift", "level"]].values.tolist() == result[["trial_id", "shift", "level"]].values.tolist()

    # Direct: log-probs pair by pair, labels relabelled by the mixture formula by hand.
    rows = w["rows"]
    pad = 0
    logps = {}
    for name, path in (("pol", w["policy"]), ("ref", w["reference"])):
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        logps[name] = {side: np.array([response_logps(model, [p], [r], pad)[0] for p, r in
                                       zip(rows["prompt_input_ids"], rows[f"{side}_input_ids"])])
                       for side in ("chosen", "rejected")}
    h = (logps["pol"]["chosen"] - logps["ref"]["chosen"]) - (logps["pol"]["rejected"] - logps["ref"]["rejected"])
    assert np.min(np.abs(h)) > 1e-4  # no pair sits on the decision boundary
    pol = result[result["trial_id"] == "pol"].set_index(["shift", "level"])
    for alpha in (0.0, 0.5, 1.0):
        rc = alpha * rows["reward_r1_chosen"] + (1 - alpha) * rows["reward_r2_chosen"]
        rr = alpha * rows["reward_r1_rejected"] + (1 - alpha) * rows["reward_r2_rejected"]
        h_level = np.where(rr > rc, -h, h)
        got = pol.loc[("mixture", alpha)]
        assert got["pair_accuracy"] == pytest.approx(np.mean(h_level > 0), abs=1e-12)
        assert got["margin"] == pytest.approx(np.mean(h_level), abs=1e-4)
        assert got["dpo_loss"] == pytest.approx(np.mean(np.logaddexp(0, -0.5 * h_level)), abs=1e-4)
    # eps = 0 keeps every label, eps = 1 flips every one.
    assert pol.loc[("label_flip", 0.0), "pair_accuracy"] == pytest.approx(np.mean(h > 0), abs=1e-12)
    assert pol.loc[("label_flip", 1.0), "pair_accuracy"] == pytest.approx(np.mean(h < 0), abs=1e-12)
    # source_mixture target=1 (thin sampling) keeps exactly the target-source rows, target=0 the others.
    is_target = (rows["source"] == "target").to_numpy()
    for level, keep in ((1.0, is_target), (0.0, ~is_target)):
        got = pol.loc[("source_mixture", level)]
        assert got["n_pairs"] == keep.sum() and got["pair_accuracy"] == pytest.approx(np.mean(h[keep] > 0), abs=1e-12)

    # Generative: rewards of the saved samples, recomputed with the world's formulas.
    samples = pd.read_parquet(tmp_path / "eval" / "samples.parquet")
    mine = samples[samples["trial_id"] == "pol"]
    assert len(mine) == 5 * 3 and (mine["kl"] > 0).all()
    world = w["world"]
    counts = rows["prompt"].value_counts()
    sampled = [p for p in counts.index if p in set(mine["prompt"])]
    for alpha in (0.0, 0.5, 1.0):
        r = alpha * world.reward("r1", list(mine["prompt"]), list(mine["response"])) + (1 - alpha) * world.reward(
            "r2", list(mine["prompt"]), list(mine["response"]))
        per_prompt = pd.Series(r, index=mine["prompt"].values).groupby(level=0).mean()
        expected = sum(counts[p] * per_prompt[p] for p in sampled) / sum(counts[p] for p in sampled)
        assert pol.loc[("mixture", alpha), "reward"] == pytest.approx(expected, abs=1e-9)
    rewards = pol.loc["mixture", "reward"].to_numpy()
    assert len(set(np.round(rewards, 12))) == 3  # the mixture moves the reward ...
    assert pol.loc[("label_flip", 0.0), "reward"] == pol.loc[("label_flip", 1.0), "reward"]  # ... label flips do not
    alpha_train = world.spec["config"]["alpha_train"]  # `world:DIR` = the training mixture
    base = alpha_train * world.reward("r1", list(mine["prompt"]), list(mine["response"])) + (1 - alpha_train) * \
        world.reward("r2", list(mine["prompt"]), list(mine["response"]))
    per_prompt = pd.Series(base, index=mine["prompt"].values).groupby(level=0).mean()
    expected = sum(counts[p] * per_prompt[p] for p in sampled) / sum(counts[p] for p in sampled)
    assert pol.loc[("label_flip", 0.0), "reward"] == pytest.approx(expected, abs=1e-9)

    # The reference evaluated as a policy: KL exactly 0, every pair a tie.
    ref = result[result["trial_id"] == "ref"]
    assert (ref["kl"] == 0).all() and (ref["kl_mc"] == 0).all()
    assert (ref["pair_ties"] == 1).all() and (ref["pair_accuracy"] == 0).all()
    assert ref["dpo_loss"].to_numpy() == pytest.approx(np.full(7, math.log(2)))


def test_cli_bad_input_is_one_line(tmp_path, capsys, tiny_model_dir):
    code = cli_main(["evaluate", "--checkpoint", str(tmp_path / "missing"), "--reference", str(tiny_model_dir),
                     "--data", str(tmp_path), "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "checkpoint" in err[0] and "missing" in err[0]
    code = cli_main(["evaluate", "--checkpoint", str(tiny_model_dir), "--reference", str(tiny_model_dir),
                     "--data", str(tmp_path), "--output", str(tmp_path / "o"), "generation.samples=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "generation.samples" in err[0]
