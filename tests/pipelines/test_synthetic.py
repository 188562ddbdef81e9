"""The embedded world: determinism, rewards recomputed by hand from world.json, labels, files, CLI."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines import cli
from pipelines.config import load
from pipelines.errors import UserError
from pipelines.world import SynthConfig, WorldConfig, draw_world_spec, generate_world, load_world, rng_for
from pipelines.world.functions import World
from pipelines.world.pairs import PAIR_COLUMNS, build_pairs, fit_source_classifier

TINY = [
    "synth.n_train=64",
    "synth.n_eval=16",
    "synth.n_topic_words=4",
    "synth.n_content_words=16",
    "synth.n_filler_words=4",
    "synth.n_style_words=2",
    "synth.n_classifier=40",
    "synth.ref_steps=40",
    "synth.ref_batch_size=16",
    "synth.ref_hidden_size=32",
    "synth.ref_heads=2",
    "synth.ref_layers=1",
    "synth.label_noise=0.25",
]


def tiny_config(*extra: str) -> SynthConfig:
    return load(SynthConfig, None, [*TINY, *extra])


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    """One tiny world written through the CLI (also the CLI's happy path)."""
    out = tmp_path_factory.mktemp("world") / "w"
    assert cli.main(["synth", "--output", str(out), *TINY]) == 0
    return out


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "timings.json"
    }


def pairs_world(**overrides) -> tuple[World, WorldConfig]:
    """A default-vocabulary world without the reference model (cheap), for statistics over many pairs."""
    cfg = WorldConfig(**overrides)
    spec = draw_world_spec(cfg)
    spec["classifier"] = fit_source_classifier(World(spec), cfg, rng_for(cfg.seed, "classifier"))
    return World(json.loads(json.dumps(spec))), cfg


# ---- files, CLI ---------------------------------------------------------------------------------
def test_cli_writes_every_artefact_with_the_documented_columns(world_dir):
    for rel in (
        "world.json",
        "config.yaml",
        "timings.json",
        "data/train.parquet",
        "data/eval.parquet",
        "tokenizer/tokenizer.json",
        "reference_model/config.json",
        "reference_model/model.safetensors",
        "reference_model/tokenizer.json",
    ):
        assert (world_dir / rel).is_file(), rel
    spec = json.loads((world_dir / "world.json").read_text())
    train = pd.read_parquet(world_dir / "data/train.parquet")
    evals = pd.read_parquet(world_dir / "data/eval.parquet")
    assert tuple(train.columns) == PAIR_COLUMNS == tuple(evals.columns)
    assert (len(train), len(evals)) == (64, 16)
    assert (train.chosen != train.rejected).all() and (train.chosen.str.len() > 0).all()
    assert set(train.source) <= {"target", "synthetic"} and set(train.group) <= {"g0", "g1"}
    assert train.source.eq("target").sum() == round(spec["config"]["target_fraction"] * 64)  # exact share
    assert spec["config"]["alpha_train"] == 0.1 and spec["mixture"]["rewards"] == ["r1", "r2"]
    assert set(spec["rewards"]) == {"r1", "r2", "r3", "verbosity", "length"}


def test_cli_reuses_same_settings_and_rejects_bad_input(world_dir, capsys):
    assert cli.main(["synth", "--output", str(world_dir), *TINY]) == 0
    assert "reusing" in capsys.readouterr().out
    assert cli.main(["synth", "--output", str(world_dir), *TINY, "synth.seed=5"]) == 2
    assert "different settings" in capsys.readouterr().err
    assert cli.main(["synth", "--output", str(world_dir / "x"), "synth.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("robust-dpo: error: unknown config key 'synth.bogus'") and err.count("\n") == 1
    assert cli.main(["synth", "--output", str(world_dir / "x"), "synth.alpha_train=1.5"]) == 2
    assert "'synth.alpha_train' must be in [0, 1]" in capsys.readouterr().err
    assert cli.main(["synth", "--output", str(world_dir / "x"), "synth.group_alphas=[1.0]"]) == 2
    assert not (world_dir / "x").exists()


def test_same_seed_same_bytes_other_seed_differs(world_dir, tmp_path):
    again = generate_world(tiny_config(), tmp_path / "again", log=lambda *_: None).root
    reference = file_hashes(world_dir)
    assert file_hashes(again) == reference and len(reference) >= 12
    other = file_hashes(
        generate_world(tiny_config("synth.seed=1"), tmp_path / "other", log=lambda *_: None).root
    )
    for rel in ("world.json", "data/train.parquet", "data/eval.parquet", "reference_model/model.safetensors"):
        assert other[rel] != reference[rel], rel
    assert other["tokenizer/tokenizer.json"] == reference["tokenizer/tokenizer.json"]  # same vocabulary


# ---- rewards, recomputed by hand from world.json ---------------------------------------------------
def hand_reward(spec: dict, name: str, prompt: str, response: str) -> float:
    """world.json's formulas, read literally, one text at a time."""
    vocab = spec["vocabulary"]
    index = {w: i for i, w in enumerate(vocab["words"])}
    topics, content = set(vocab["topic_words"]), set(vocab["content_words"])
    response_words = vocab["content_words"] + vocab["filler_words"]
    words = response.split()
    if name == "verbosity":
        return sum(w in vocab["filler_words"] for w in words) / max(len(words), 1)
    if name == "length":
        m = spec["config"]["max_response_words"]
        return min(len(words), m) / m
    r = spec["rewards"][name]
    z = r["bias"] + sum(r["unigram_weights"][j] * words.count(w) for j, w in enumerate(response_words))
    seq = [prompt.split()[-1]] + words
    buckets = {
        (index[a] * spec["features"]["hash_multiplier"] + index[b]) % spec["features"]["n_buckets"]
        for a, b in itertools.pairwise(seq)
        if (a in topics or a in content) and b in content
    }
    z += sum(r["bigram_weights"][j] for j in buckets)
    return 1.0 / (1.0 + math.exp(-z))


def test_rewards_score_text_as_world_json_says(world_dir):
    world = load_world(world_dir)
    spec = json.loads((world_dir / "world.json").read_text())
    train = pd.read_parquet(world_dir / "data/train.parquet")
    v = spec["vocabulary"]
    c, f, t = v["content_words"], v["filler_words"], v["topic_words"]
    prompts = list(train.prompt[:20]) + [t[0], f"{t[1]} {t[0]}", t[2], t[3], t[0]]
    responses = list(train.chosen[:20]) + [
        f"{c[3]} {c[3]} {f[0]} {c[5]} {c[3]} {c[5]}",  # repeated unigrams, a repeated bigram, filler break
        f"{c[1]} unknownword {c[2]} {t[1]} {c[4]}",  # unknown and topic words break bigrams, count in length
        "",
        f"{f[1]} {f[2]}",
        " ".join([c[0]] * 20),  # empty; filler only; longer than max_response_words
    ]
    for name in ("r1", "r2", "r3", "verbosity", "length"):
        got = world.reward(name, prompts, responses)
        want = [hand_reward(spec, name, p, r) for p, r in zip(prompts, responses)]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(got[:20], train[f"reward_{name}_chosen"][:20], rtol=1e-12, err_msg=name)
    r1, r2 = world.reward("r1", prompts, responses), world.reward("r2", prompts, responses)
    np.testing.assert_allclose(world.mixture_reward(0.3, prompts, responses), 0.3 * r1 + 0.7 * r2, rtol=1e-12)
    np.testing.assert_allclose(
        world.mixture_reward(0.3, prompts, responses, form="geometric"), r1**0.3 * r2**0.7, rtol=1e-12
    )
    per_row = np.linspace(0, 1, len(prompts))
    np.testing.assert_allclose(
        world.mixture_reward(per_row, prompts, responses), per_row * r1 + (1 - per_row) * r2
    )
    with pytest.raises(UserError, match=r"alpha must be in \[0, 1\]"):
        world.mixture_reward(1.2, prompts, responses)
    with pytest.raises(UserError, match="valid rewards: r1, r2, r3, verbosity, length"):
        world.reward("anger", prompts, responses)
    with pytest.raises(UserError, match="valid forms"):
        world.mixture_reward(0.5, prompts, responses, form="harmonic")


def test_r1_r2_conflict_is_built_in_and_visible_in_the_labels():
    world, cfg = pairs_world()
    u1, u2 = (
        np.r_[
            world.spec["rewards"][k]["unigram_weights"][: cfg.n_content_words],
            world.spec["rewards"][k]["bigram_weights"],
        ]
        for k in ("r1", "r2")
    )
    assert u1 @ u2 / np.linalg.norm(u1) / np.linalg.norm(u2) == pytest.approx(-0.6, abs=1e-5)
    cols = build_pairs(world, cfg, 2000, cfg.target_fraction, rng_for(0, "train"), split="train")
    # Labels at alpha_train = 0.1 favour r2, so the preferred response lowers r1: DPO on them must.
    assert np.mean(cols["reward_r2_chosen"] - cols["reward_r2_rejected"]) > 0.1
    assert np.mean(cols["reward_r1_chosen"] - cols["reward_r1_rejected"]) < -0.05
    r1 = np.r_[cols["reward_r1_chosen"], cols["reward_r1_rejected"]]
    r2 = np.r_[cols["reward_r2_chosen"], cols["reward_r2_rejected"]]
    assert np.corrcoef(r1, r2)[0, 1] < -0.4


# ---- labels ------------------------------------------------------------------------------------
def labelling_margin(df: pd.DataFrame, judge_bias: float) -> np.ndarray:
    """s(chosen) - s(rejected) with s = alpha*r1 + (1-alpha)*r2 + judge_bias*verbosity*[synthetic]."""

    def s(side):
        return (
            df.alpha * df[f"reward_r1_{side}"]
            + (1 - df.alpha) * df[f"reward_r2_{side}"]
            + judge_bias * (df.source == "synthetic") * df[f"reward_verbosity_{side}"]
        )

    return (s("chosen") - s("rejected")).to_numpy()


def test_label_composition_matches_noise_rate_exactly(world_dir):
    train = pd.read_parquet(world_dir / "data/train.parquet")
    evals = pd.read_parquet(world_dir / "data/eval.parquet")
    judge_bias = json.loads((world_dir / "world.json").read_text())["config"]["judge_bias"]
    assert judge_bias > 0  # the default judge is biased, so the check below covers the judge term
    agree = labelling_margin(train, judge_bias) > 0
    assert agree.mean() == 1 - round(0.25 * 64) / 64  # exactly round(label_noise * n) flips
    assert (agree == ~train.flipped.to_numpy()).all()  # the flipped rows are exactly the disagreeing ones
    assert (labelling_margin(evals, judge_bias=0.0) > 0).all() and not evals.flipped.any()  # clean eval


def test_bradley_terry_labels_follow_sigmoid_of_margin():
    world, cfg = pairs_world(bt_temperature=0.1, judge_bias=0.0, target_fraction=1.0)
    df = pd.DataFrame(build_pairs(world, cfg, 3000, 1.0, rng_for(0, "train"), split="train"))
    margin = labelling_margin(df, 0.0)
    expected = 1.0 / (1.0 + np.exp(-np.abs(margin) / 0.1))  # P(label agrees with s ordering)
    agree = (margin > 0).mean()
    assert abs(agree - expected.mean()) < 4 * math.sqrt(0.25 / 3000)
    assert 0.6 < agree < 0.95  # the sampling really is random, and informative


def test_group_labels_use_each_groups_alpha():
    world, cfg = pairs_world(group_labels=True, target_fraction=1.0)
    df = pd.DataFrame(build_pairs(world, cfg, 400, 1.0, rng_for(0, "train"), split="train"))
    assert set(zip(df.group, df.alpha)) == {("g0", 1.0), ("g1", 0.0)}
    assert (labelling_margin(df, 0.0) > 0).all()
    assert (world.group_of(df.prompt) == df.group).all()


# ---- generators, classifier, calibration ---------------------------------------------------------
def test_generator_density_is_normalised_and_matches_the_sampler():
    cfg = WorldConfig(
        n_topic_words=2,
        n_content_words=3,
        n_filler_words=1,
        n_style_words=1,
        max_response_words=2,
        max_prompt_words=2,
    )
    world = World(draw_world_spec(cfg))
    resp_words = world.spec["vocabulary"]["content_words"] + world.spec["vocabulary"]["filler_words"]
    every = [" ".join(s) for n in (1, 2) for s in itertools.product(resp_words, repeat=n)]  # 4 + 16
    for source in ("target", "synthetic"):
        logp = world.log_prob(source, ["t01 t00"] * len(every), every)
        assert np.exp(logp).sum() == pytest.approx(1.0, abs=1e-12)
        draws = world.sample(source, ["t01 t00"] * 40000, np.random.default_rng(0))
        freq = np.array([draws.count(y) for y in every]) / len(draws)
        assert np.abs(freq - np.exp(logp)).max() < 0.01
    assert world.log_prob("target", ["t00"], ["c00 c00 c00"])[0] == -np.inf  # longer than the maximum


def test_classifier_and_calibration_columns_follow_their_formulas(world_dir):
    world = load_world(world_dir)
    spec = world.spec
    train = pd.read_parquet(world_dir / "data/train.parquet")
    clf = spec["classifier"]
    y = train.chosen[0].split()
    feats = [y.count(w) for w in spec["vocabulary"]["words"]] + [
        len(y) / spec["config"]["max_response_words"]
    ]
    z = (np.dot(clf["weights"], feats) + clf["bias"]) / clf["temperature"]
    assert train.p_target_chosen[0] == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-12)
    a = spec["config"]["target_fraction"]

    def h(p):  # OBJECTIVES.md 6.2, with p clipped to [1e-6, 1 - 1e-6] (gotcha 6.5.3)
        p = np.clip(p, 1e-6, 1 - 1e-6)
        return 1.0 / (a + (1 - a) * (1 - p) / p)

    np.testing.assert_allclose(
        train.calibration, 0.5 * (h(train.p_target_chosen) + h(train.p_target_rejected)), rtol=1e-12
    )
    assert world.calibration(np.array([0.5, 1.0]), target_fraction=0.25) == pytest.approx(
        [1.0, 4.0], rel=1e-5
    )
    assert 0 <= clf["heldout_accuracy"] <= 1 and clf["n_test"] > 0


def test_classifier_separates_sources_on_the_default_vocabulary():
    world, _ = pairs_world(n_classifier=512)
    clf = world.spec["classifier"]
    assert clf["heldout_accuracy"] > 0.8 and clf["heldout_ece"] < 0.1
    assert clf["heldout_accuracy"] <= clf["heldout_bayes_accuracy"] + 0.03  # no better than the density ratio


# ---- tokenizer and reference model --------------------------------------------------------------
def test_tokenizer_and_reference_model_load_and_beat_uniform(world_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.world.pairs import encode_sequences

    world = load_world(world_dir)
    tok = AutoTokenizer.from_pretrained(world_dir / "tokenizer")
    assert AutoTokenizer.from_pretrained(world_dir / "reference_model").get_vocab() == tok.get_vocab()
    assert tok("t01 c03 f00").input_ids == [4 + world.word_index[w] for w in ("t01", "c03", "f00")]
    assert tok.apply_chat_template([{"role": "user", "content": "t01 t00"}], tokenize=False) == "t01 t00"
    model = AutoModelForCausalLM.from_pretrained(world_dir / "reference_model").eval()
    rng = np.random.default_rng(123)
    prompts, _ = world.sample_prompts(256, rng)
    responses = world.sample("synthetic", prompts, rng)
    ids, mask, labels = (
        torch.from_numpy(a)
        for a in encode_sequences(world, prompts, responses, tok.eos_token_id, tok.pad_token_id)
    )
    with torch.no_grad():
        nll = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    uniform = math.log(len(tok))
    stats = world.spec["reference_model"]
    assert nll < uniform - 0.5
    assert stats["nll_per_token"] < stats["uniform_nll_per_token"] - 0.5
    assert stats["generator_nll_per_token"] < stats["nll_per_token"]  # the true generator is the floor
