"""`robust-dpo synth`: generate the embedded known-reward world (tokenizer, reference model, pairs).

    robust-dpo synth --output worlds/default                       # defaults: ~20 s on 2 CPU cores
    robust-dpo synth --output /tmp/w synth.seed=3 synth.label_noise=0.2 synth.n_train=256

Writes DIR/world.json (every parameter: the file defines the world; pipelines/world/functions.py reads it),
DIR/tokenizer/, DIR/reference_model/ (LlamaForCausalLM + tokenizer, `from_pretrained`-loadable),
DIR/data/{train,eval}.parquet (pairs with per-reward scores, group, source, DoRA calibration),
DIR/config.yaml and DIR/timings.json (wall-clock; the only file that differs between equal runs).
Same seed -> same bytes for everything else on the same software stack.

The design adapts OBJECTIVES.md section 8 to words: training labels come from the reward mixture
r(alpha_train) = alpha*r1 + (1-alpha)*r2 with r2 in conflict with r1 (E1, the WDPO paper's shift);
pairs come from a concise "target" source or from the verbose "synthetic" source the reference
model was trained on, whose judge also likes verbosity (E3, DoRA's mixture response shift); and
an exact fraction of training labels can be flipped (E4).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipelines.console import say
from pipelines.config import FieldError, check, dump, load
from pipelines.errors import UserError
from pipelines.paths import write_text_atomic
from pipelines.world.functions import (
    WORLD_FILE,
    WORLD_KIND,
    WORLD_VERSION,
    World,
    WorldPaths,
    _round,
    load_world,
    world_paths,
)
from pipelines.world.pairs import (
    PAIR_COLUMNS,
    build_pairs,
    fit_source_classifier,
    split_stats,
    train_reference_model,
    write_parquet,
)

__all__ = ["SynthConfig", "World", "WorldConfig", "WorldPaths", "generate_world", "load_world"]

CHAT_TEMPLATE = (  # contents joined by spaces: renders a chat prompt to the same text as format (a)
    "{% for message in messages %}{{ message['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
)
# Independent RNG streams, one per purpose (SeedSequence([seed, i])): adding one never shifts others.
STREAMS = ("params", "reward_scale", "train", "eval", "classifier", "reference_data", "reference_init")


# ---- the text world.json carries next to the numbers (the formulas pipelines/world/functions.py implements) ----
GENERATOR_FORMULA = (
    "x = 1..max_prompt_words distinct topic words of one group; y_1 ~ softmax(L[x_last] + B_x + s), then after "
    "each word y_i (i < max_response_words) stop with prob stop_prob, else y_{i+1} ~ softmax(L[y_i] + B_x + s); "
    "L = transition_logits[prev word index], B_x = mean of topic_bias over the prompt's topic words, "
    "s = the source's word_bias; columns index response words = content_words + filler_words"
)
FEATURE_REWARD_FORMULA = (
    "r(x, y) = sigmoid(sum_j unigram_weights[j] * count of (content_words + filler_words)[j] in y + "
    "sum_j bigram_weights[j] * 1[some adjacent (a, b) in [last prompt word] + y, a a topic or content word, "
    "b a content word, has (index(a) * hash_multiplier + index(b)) mod n_buckets == j] + bias)"
)
GROUP_SEMANTICS = (
    "a group is a population of users: its prompts use its topic words, and alpha is the mixture its users "
    "want; training labels use alpha_train for every group unless group_labels is true"
)
SOURCE_DESCRIPTIONS = {
    "target": "Q_0, human-like: concise (stop_prob 0.2), avoids filler, favours style_words; labelled by the "
    "golden r(alpha)",
    "synthetic": "Q_1, the reference model's training text: verbose (stop_prob 0.08), filler-heavy; in the "
    "training split labelled by a judge biased toward verbosity, s = r(alpha) + judge_bias * verbosity",
    "pairs": "both responses of a pair come from the pair's source; train has round(target_fraction * n_train) "
    "target pairs, eval round(eval_target_fraction * n_eval)",
}
CALIBRATION_DESCRIPTION = {
    "formula": "h(y) = 1 / (alpha + a * (1 - p) / p), p = P(target | y) clipped to [1e-6, 1 - 1e-6], "
    "alpha = target_fraction (training mix), a = 1 - alpha (OBJECTIVES.md 6.2)",
    "pair_value": "calibration = mean of h over the pair's two responses (DoRA's per-list mean)",
    "oracle": "calibration_oracle uses p = Q_0 / (Q_0 + Q_1) from the exact generator densities",
}
LABEL_DESCRIPTION = {
    "train": "s(y) = r(alpha)(x, y) [+ judge_bias * verbosity(y) when source == synthetic]; alpha = alpha_train "
    "(or the row's group alpha when group_labels); chosen = argmax s (bt_temperature 0) or BT-sampled with "
    "P(a > b) = sigmoid((s(a) - s(b)) / bt_temperature); then exactly round(label_noise * n_train) rows, "
    "drawn uniformly, are swapped (flipped = true)",
    "eval": "chosen = argmax r(alpha)(x, y) with the same alpha rule; no judge bias, no BT sampling, no noise",
    "ties": "pairs with equal texts or equal labelling scores are redrawn",
    "why_deterministic": "argmax labels make the shift effect visible with ~1k pairs and keep label noise an "
    "exact, separately controlled rate (E4); on the default eval pairs BT at T = 1 would flip 44% of "
    "labels by itself (T = 0.1: 17%)",
}


@dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """The `synth.*` keys: everything that defines one world."""

    seed: int = 0  # master seed; same seed -> same bytes
    alpha_train: float = 0.1  # in [0, 1]: training labels come from alpha*r1 + (1-alpha)*r2 (WDPO alpha_o)
    label_noise: float = 0.0  # in [0, 1]: exact fraction of training labels flipped after labelling
    bt_temperature: float = 0.0  # >= 0: 0 = deterministic labels (argmax); T > 0 = Bradley-Terry sigma(dr/T)
    judge_bias: float = 2.0  # >= 0: the synthetic judge's score is r(alpha) + judge_bias * verbosity
    target_fraction: float = 0.5  # in [0, 1]: share of training pairs from the target (human) source
    eval_target_fraction: float = 0.5  # in [0, 1]: share of eval pairs from the target source
    group_alphas: tuple[float, ...] = (1.0, 0.0)  # mixture alpha each user group wants (g0, g1, ...)
    group_weights: tuple[float, ...] = (0.5, 0.5)  # > 0: relative share of prompts from each group
    group_labels: bool = False  # true: label each row at its group's alpha instead of alpha_train
    n_train: int = 1024  # >= 2 training pairs
    n_eval: int = 256  # >= 2 eval pairs (clean golden labels)
    n_topic_words: int = 16  # >= number of groups: prompt words, split evenly among groups
    n_content_words: int = 64  # >= 2: response words that carry reward
    n_filler_words: int = 12  # >= 1: content-free response words (the verbosity artefact)
    n_style_words: int = 8  # content words the target source favours
    max_prompt_words: int = 4  # >= 1 words per prompt
    max_response_words: int = 12  # >= 2 words per response
    reward_logit_std: float = 1.5  # > 0: std of the content part of each r_k's logit on synthetic text
    filler_penalty: float = 0.0  # >= 0: logit cost per filler word in r1, r2, r3 (people dislike filler)
    n_classifier: int = 1024  # >= 20 responses per source for the stage-1 classifier (60/20/20 split)
    ref_hidden_size: int = 64  # reference LlamaForCausalLM width
    ref_layers: int = 2  # reference depth
    ref_heads: int = 4  # attention heads (divides ref_hidden_size)
    ref_steps: int = 800  # Adam steps of maximum likelihood (fresh generator samples each step)
    ref_batch_size: int = 64  # sequences per step
    ref_lr: float = 5e-3  # peak learning rate (linear warm-up 10%, cosine to 10%)

    def __post_init__(self):
        def need(ok: bool, key: str, message: str):
            if not ok:
                raise FieldError(key, message)

        n_groups = len(self.group_alphas)
        check(self, "[0, 1]", "alpha_train", "label_noise", "target_fraction", "eval_target_fraction")
        check(self, ">= 0", "bt_temperature", "judge_bias", "filler_penalty")
        need(n_groups >= 1, "group_alphas", "needs at least one group")
        need(len(self.group_weights) == n_groups, "group_weights",
             f"has {len(self.group_weights)} entries but group_alphas has {n_groups}")
        need(all(0 <= a <= 1 for a in self.group_alphas), "group_alphas", "must lie in [0, 1]")
        need(all(w > 0 for w in self.group_weights), "group_weights", "must be > 0")
        check(self, ">= 2", "n_train", "n_eval", "n_content_words", "max_response_words")
        need(self.n_topic_words >= n_groups, "n_topic_words", f"must be >= the number of groups ({n_groups})")
        check(self, ">= 1", "n_filler_words", "max_prompt_words", "ref_steps", "ref_batch_size")
        need(0 <= self.n_style_words <= self.n_content_words, "n_style_words",
             f"must be in [0, n_content_words = {self.n_content_words}], got {self.n_style_words}")
        check(self, "> 0", "reward_logit_std", "ref_lr")
        check(self, ">= 20", "n_classifier")
        need(self.ref_hidden_size % self.ref_heads == 0, "ref_heads", "must divide ref_hidden_size")


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """Config of the `synth` stage; the `run` stage nests the same `synth` section."""

    synth: WorldConfig = field(default_factory=WorldConfig)


def rng_for(seed: int, stream: str) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, STREAMS.index(stream)])))


def draw_world_spec(cfg: WorldConfig) -> dict:
    """The world.json dictionary drawn from cfg.seed, without the classifier, reference and stats sections."""
    rng = rng_for(cfg.seed, "params")
    topics = [f"t{i:02d}" for i in range(cfg.n_topic_words)]
    content = [f"c{i:02d}" for i in range(cfg.n_content_words)]
    filler = [f"f{i:02d}" for i in range(cfg.n_filler_words)]
    words = topics + content + filler
    n_resp = len(content) + len(filler)
    style = sorted(int(i) for i in rng.permutation(len(content))[: cfg.n_style_words])
    # Generators: first-order Markov chains, logits = transition[prev] + mean topic bias + source bias.
    transition = rng.normal(0.0, 1.5, size=(len(words), n_resp))
    topic_bias = rng.normal(0.0, 1.0, size=(len(topics), n_resp))
    is_filler = np.r_[np.zeros(len(content)), np.ones(len(filler))]
    is_style = np.zeros(n_resp)
    is_style[style] = 1.0
    sources = {
        # Q_0, "human": concise, avoids filler, favours the style words (OBJECTIVES.md 8.3).
        "target": {"stop_prob": 0.2, "word_bias": _round(-2.0 * is_filler + 1.5 * is_style)},
        # Q_1, "synthetic": the reference model's own text, a verbose chain (long, filler-heavy).
        "synthetic": {"stop_prob": 0.08, "word_bias": _round(1.5 * is_filler)},
    }
    n_buckets, mult = 32, 37
    dim = cfg.n_content_words + n_buckets
    w1 = rng.normal(size=dim)
    w_perp = rng.normal(size=dim)
    w_perp -= (w_perp @ w1) / (w1 @ w1) * w1
    w_perp *= np.linalg.norm(w1) / np.linalg.norm(w_perp)
    raw = {"r1": w1, "r2": -0.6 * w1 + 0.8 * w_perp, "r3": rng.normal(size=dim)}  # cos(w1, w2) = -0.6
    per_group = np.array_split(np.arange(len(topics)), len(cfg.group_alphas))
    groups = {
        f"g{g}": {"alpha": float(alpha), "weight": float(weight), "topic_words": [topics[i] for i in idx]}
        for g, (alpha, weight, idx) in enumerate(zip(cfg.group_alphas, cfg.group_weights, per_group))
    }
    spec = {
        "kind": WORLD_KIND,
        "version": WORLD_VERSION,
        "config": asdict(cfg),
        "vocabulary": {
            "words": words,
            "topic_words": topics,
            "content_words": content,
            "filler_words": filler,
            "style_words": [content[i] for i in style],
            "tokenizer_id": "4 + index in words (after <pad> <unk> <bos> <eos>)",
        },
        "generator": {
            "formula": GENERATOR_FORMULA,
            "transition_logits": _round(transition),
            "topic_bias": _round(topic_bias),
            "sources": sources,
        },
        "features": {"n_buckets": n_buckets, "hash_multiplier": mult},
        "rewards": {},
        "reward_order": list(raw),
        "mixture": {
            "rewards": ["r1", "r2"],
            "alpha_train": cfg.alpha_train,
            "convex": "r(alpha) = alpha * r1 + (1 - alpha) * r2",
            "geometric": "r(alpha) = r1^alpha * r2^(1 - alpha)",
        },
        "groups": groups,
        "group_semantics": GROUP_SEMANTICS,
        "sources": SOURCE_DESCRIPTIONS,
        "calibration": CALIBRATION_DESCRIPTION,
        "seeds": {
            "seed": cfg.seed,
            "streams": {name: f"numpy PCG64(SeedSequence([seed, {i}]))" for i, name in enumerate(STREAMS)},
            "torch": "reference init: torch.manual_seed(draw of stream reference_init); training single-threaded",
        },
    }
    # Scale each weight vector so its logit has std reward_logit_std on synthetic (reference) text and
    # centre it there: rewards spread over (0, 1) instead of hugging 0.5 (BT labels stay informative).
    # The filler penalty is added after scaling and is included in the centring.
    world = World({**spec, "rewards": {k: _feature_reward(np.zeros(dim), 0.0, cfg) for k in raw}})
    srng = rng_for(cfg.seed, "reward_scale")
    prompts, _ = world.sample_prompts(4096, srng)
    counts, buckets = world.features(prompts, world.sample("synthetic", prompts, srng))
    n_c = cfg.n_content_words
    phi = np.concatenate([counts[:, :n_c], buckets], axis=1)
    n_filler = counts[:, n_c:].sum(axis=1)
    for k, w in raw.items():
        z = phi @ w
        scale = cfg.reward_logit_std / z.std()
        centre = (z * scale - cfg.filler_penalty * n_filler).mean()
        spec["rewards"][k] = _feature_reward(w * scale, -centre, cfg)
    spec["rewards"]["verbosity"] = {
        "kind": "filler_fraction",
        "formula": "verbosity(y) = #filler words in y / max(#words in y, 1)",
        "role": "the synthetic judge's artefact (each filler word costs filler_penalty in r1, r2, r3)",
    }
    spec["rewards"]["length"] = {
        "kind": "length",
        "formula": "length(y) = min(#words in y, max_response_words) / max_response_words",
    }
    spec["reward_order"] = list(spec["rewards"])
    return json.loads(json.dumps(spec))  # the stored numbers, exactly


def _feature_reward(w: np.ndarray, bias: float, cfg: WorldConfig) -> dict:
    return {
        "kind": "feature_sigmoid",
        "formula": FEATURE_REWARD_FORMULA,
        "unigram_weights": _round(np.r_[w[: cfg.n_content_words], np.full(cfg.n_filler_words, -cfg.filler_penalty)]),
        "bigram_weights": _round(w[cfg.n_content_words :]),
        "bias": _round(bias),
    }


def generate_world(cfg: SynthConfig | WorldConfig, output_dir: str | Path, log=print) -> WorldPaths:
    """Generate the world of `cfg` into `output_dir` (overwriting its files); `log` prints one line per step."""
    from pipelines.timings import Timings
    from pipelines.world.toy_models import build_word_tokenizer

    wc = cfg.synth if isinstance(cfg, SynthConfig) else cfg
    paths = world_paths(output_dir)
    paths.train.parent.mkdir(parents=True, exist_ok=True)
    timings = Timings("synth")

    # [1] Parameters: vocabulary, generators, rewards, groups.
    with timings.phase("world parameters"):
        spec = draw_world_spec(wc)
        world = World(spec)
    log(f"[1/5] world drawn: {len(world.words)} words, rewards {', '.join(world.reward_names)}")

    # [2] Stage-1 source classifier (DoRA, OBJECTIVES.md 6.2): target vs synthetic responses.
    with timings.phase("source classifier"):
        spec["classifier"] = fit_source_classifier(world, wc, rng_for(wc.seed, "classifier"))  # world.spec is spec
    log(
        f"[2/5] source classifier: held-out accuracy {spec['classifier']['heldout_accuracy']:.3f}, "
        f"ECE {spec['classifier']['heldout_ece']:.3f}"
    )

    # [3] Preference pairs: train labelled by alpha_train (+ judge bias, BT, noise); eval clean.
    with timings.phase("pairs"):
        train = build_pairs(world, wc, wc.n_train, wc.target_fraction, rng_for(wc.seed, "train"), split="train")
        evals = build_pairs(world, wc, wc.n_eval, wc.eval_target_fraction, rng_for(wc.seed, "eval"), split="eval")
        write_parquet(train, paths.train)
        write_parquet(evals, paths.eval)
        spec["stats"] = {"train": split_stats(world, train, wc), "eval": split_stats(world, evals, wc)}
        spec["labels"] = LABEL_DESCRIPTION
    log(f"[3/5] pairs: {len(train['prompt'])} train, {len(evals['prompt'])} eval -> {paths.train.parent}")

    # [4] Tokenizer (word level, chat template) and [5] the reference model trained by ML on Q_synthetic.
    with timings.phase("tokenizer and reference model"):
        tokenizer = build_word_tokenizer(world.words, chat_template=CHAT_TEMPLATE)
        if tokenizer.convert_tokens_to_ids(world.words[0]) != 4:
            raise AssertionError("tokenizer ids must be 4 + world word index")
        tokenizer.save_pretrained(paths.tokenizer)
        log(f"[4/5] tokenizer: {len(tokenizer)} tokens -> {paths.tokenizer}")
        model, ref_stats = train_reference_model(
            world, wc, tokenizer, rng_for(wc.seed, "reference_data"), rng_for(wc.seed, "reference_init"), log=log
        )
        model.save_pretrained(paths.reference_model)
        tokenizer.save_pretrained(paths.reference_model)
        spec["reference_model"] = ref_stats
    log(
        f"[5/5] reference model: NLL/token {ref_stats['nll_per_token']:.3f} (generator "
        f"{ref_stats['generator_nll_per_token']:.3f}, uniform {ref_stats['uniform_nll_per_token']:.3f}) "
        f"-> {paths.reference_model}"
    )

    stored = ("tokenizer", "reference_model", "train", "eval")
    spec["files"] = {k: getattr(paths, k).relative_to(paths.root).as_posix() for k in stored}
    spec["files"]["columns"] = list(PAIR_COLUMNS)
    dump(SynthConfig(synth=wc), paths.config)
    timings.write(paths.root)
    write_text_atomic(paths.world_json, json.dumps(spec, indent=1, sort_keys=True) + "\n")  # last: the world is whole
    log(f"world written to {paths.root} in {timings.report()['total_seconds']:.1f} s")
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", required=True, help="world directory to write")
    parser.add_argument("--config", default=None, help="optional YAML with a `synth:` section")
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if DIR already holds a world with the same settings"
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. synth.seed=3 synth.label_noise=0.2")


def world_matches(output_dir: str | Path, wc: WorldConfig) -> bool | None:
    """None when `output_dir` holds no world; else whether its world.json was made with `wc`."""
    existing = Path(output_dir) / WORLD_FILE
    if not existing.is_file():
        return None
    try:
        old = json.loads(existing.read_text()).get("config")
    except json.JSONDecodeError:
        return False
    return old == json.loads(json.dumps(asdict(wc)))


CONFIG = SynthConfig  # the keys `--help` lists


def build_config(args: argparse.Namespace) -> SynthConfig:
    return load(SynthConfig, args.config, args.overrides)


def main(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    out = Path(args.output)
    matches = world_matches(out, cfg.synth)
    if matches is not None and not args.force:
        if matches:
            say("synth", f"world already generated in {out} with the same settings; reusing it (--force regenerates)")
            return 0
        raise UserError(f"'{out}' holds a world generated with different settings; use --force or another --output")
    generate_world(cfg, out, log=lambda message: say("synth", message.strip()))
    return 0
