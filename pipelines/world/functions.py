"""The embedded world's known functions: rewards, generators and the source classifier, from world.json.

`robust-dpo synth` (pipelines/world/__init__.py) draws the parameters once and writes them to
`DIR/world.json`; everything here reads them back from that file, so the file *is* the definition
(the tests recompute rewards by hand from it).  Texts are whitespace-separated words:

    prompt   = 1..max_prompt_words distinct topic words of one group          "t03 t01"
    response = 1..max_response_words content (c..) and filler (f..) words      "c12 f02 c40"

Rewards (OBJECTIVES.md section 8.1, adapted to words):
    r_k(x, y) = sigmoid( u_k . counts(y) + v_k . buckets(x, y) + b_k ),   k in {r1, r2, r3}
      counts(y)     counts of each response word (content then filler words) in y; every filler
                    word has weight -filler_penalty in all three (people dislike filler; topic and
                    unknown words have no weight);
      buckets(x, y) 0/1 indicator per hashed bigram bucket over adjacent pairs (a, b) of
                    [last prompt word] + y with a a topic or content word and b a content word,
                    bucket(a, b) = (index(a) * hash_multiplier + index(b)) mod n_buckets,
                    index = position in world.json `vocabulary.words`.
    On the content and bucket coordinates r2's weights are -0.6 * r1's + 0.8 * an orthogonal vector
    (cosine -0.6, the WDPO paper's "anger vs fear" conflict); r3 is independent (an unseen objective).
    verbosity(y) = #filler words / #words;   length(y) = min(#words, max_response_words) / max_response_words.
Mixtures of r1 and r2 (WDPO paper section 7.1): convex a*r1 + (1-a)*r2, geometric r1^a * r2^(1-a).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.data.shifts import dora_calibration, mixture_reward
from pipelines.errors import UserError

WORLD_FILE = "world.json"
WORLD_KIND = "robust-dpo-world"
WORLD_VERSION = 1
MIXTURE_FORMS = ("convex", "geometric")
_PAD, _UNKNOWN = -1, -2  # token codes in the id matrices below


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _round(x):
    """6 significant digits, through dicts and arrays (ints, strings and None pass): world.json stays small
    and the stored numbers are the ones used."""
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if x is None or isinstance(x, (int, str)):
        return x
    a = np.asarray(x, dtype=float)
    return float(f"{float(a):.6g}") if a.ndim == 0 else [_round(row) for row in a]


@dataclass(frozen=True)
class WorldPaths:
    """Where `generate_world` wrote each artefact (all under `root`)."""

    root: Path
    world_json: Path
    tokenizer: Path
    reference_model: Path
    train: Path
    eval: Path
    config: Path


def world_paths(root: str | Path) -> WorldPaths:
    root = Path(root)
    return WorldPaths(
        root=root,
        world_json=root / WORLD_FILE,
        tokenizer=root / "tokenizer",
        reference_model=root / "reference_model",
        train=root / "data" / "train.parquet",
        eval=root / "data" / "eval.parquet",
        config=root / "config.yaml",
    )


class World:
    """The known functions of one generated world, built from its parsed world.json."""

    def __init__(self, spec: dict):
        self.spec = spec
        vocab = spec["vocabulary"]
        self.words: list[str] = list(vocab["words"])
        self.word_index = {w: i for i, w in enumerate(self.words)}
        self.n_topics = len(vocab["topic_words"])
        self.n_content = len(vocab["content_words"])
        self.max_response_words = int(spec["config"]["max_response_words"])
        self.reward_names: tuple[str, ...] = tuple(spec["reward_order"])  # world.json keys are sorted
        self._feature_weights = {
            k: (np.asarray(r["unigram_weights"]), np.asarray(r["bigram_weights"]), float(r["bias"]))
            for k, r in spec["rewards"].items()
            if r["kind"] == "feature_sigmoid"
        }
        gen = spec["generator"]
        self._transition = np.asarray(gen["transition_logits"])  # (n_words, n_response_words)
        self._topic_bias = np.asarray(gen["topic_bias"])  # (n_topics, n_response_words)
        self.groups = tuple(spec["groups"])
        self._topic_group = {w: g for g, v in spec["groups"].items() for w in v["topic_words"]}

    # ---- text -> ids ---------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(N, L) int64 world word indices of whitespace tokens (-2: a word outside the vocabulary, -1: padding)
        and (N,) int64 number of tokens (unknown words included)."""
        rows = [str(t).split() for t in texts]
        n_words = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        ids = np.full((len(rows), max(1, int(n_words.max(initial=0)))), _PAD, dtype=np.int64)
        get = self.word_index.get
        for i, r in enumerate(rows):
            ids[i, : len(r)] = [get(w, _UNKNOWN) for w in r]
        return ids, n_words

    def _bag(self, ids: np.ndarray) -> np.ndarray:
        """(N, n_words) float counts of each world word in the rows of `ids` (unknown words not counted)."""
        known = ids >= 0
        rows = np.broadcast_to(np.arange(len(ids))[:, None], ids.shape)
        bag = np.zeros((len(ids), len(self.words)))
        np.add.at(bag, (rows[known], ids[known]), 1.0)
        return bag

    def _check(self, prompts: Sequence[str], responses: Sequence[str]) -> None:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")

    # ---- rewards -------------------------------------------------------------------------------
    def features(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Reward features: (N, n_content + n_filler) response-word counts (content, then filler) and
        (N, n_buckets) 0/1 presence of each hashed bigram bucket (see module docstring)."""
        self._check(prompts, responses)
        ids, _ = self.encode(responses)
        last = self.encode([(str(p).split() or [""])[-1] for p in prompts])[0][:, 0]  # < 0: none or unknown
        lo, hi = self.n_topics, self.n_topics + self.n_content  # words = topics + content + filler
        seq = np.concatenate([last[:, None], ids], axis=1)  # [x_last] + y
        a, b = seq[:, :-1], seq[:, 1:]
        valid = (a >= 0) & (a < hi) & (b >= lo) & (b < hi)  # a topic/content, b content
        feats = self.spec["features"]
        bucket = (a * int(feats["hash_multiplier"]) + b) % int(feats["n_buckets"])
        buckets = np.zeros((len(ids), int(feats["n_buckets"])))
        buckets[np.nonzero(valid)[0], bucket[valid]] = 1.0
        return self._bag(ids)[:, lo:], buckets

    def reward(self, name: str, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """(N,) float64 reward `name` (one of `reward_names`) of each (prompt, response), in [0, 1]."""
        if name not in self.reward_names:
            raise UserError(f"unknown world reward '{name}'; valid rewards: {', '.join(self.reward_names)}")
        if name in self._feature_weights:
            u, v, bias = self._feature_weights[name]
            counts, buckets = self.features(prompts, responses)
            return _sigmoid(counts @ u + buckets @ v + bias)
        self._check(prompts, responses)
        ids, n_words = self.encode(responses)
        if name == "verbosity":
            return self._bag(ids)[:, self.n_topics + self.n_content :].sum(axis=1) / np.maximum(n_words, 1)
        if name == "length":
            return np.minimum(n_words, self.max_response_words) / self.max_response_words
        raise AssertionError(f"reward kind of '{name}' is not implemented")

    def mixture_reward(self, alpha: float | np.ndarray, prompts: Sequence[str], responses: Sequence[str],
                       form: str = "convex", components: tuple[str | None, str | None] | None = None) -> np.ndarray:
        """r(alpha) of the WDPO paper: convex alpha*r1 + (1-alpha)*r2 or geometric r1^alpha * r2^(1-alpha).

        `alpha` is a scalar or (N,) per-row alphas (e.g. each prompt's group alpha); `components` names
        the two rewards to mix (None: the world's mixture components).  Returns (N,) float64.
        """
        if form not in MIXTURE_FORMS:
            raise UserError(f"unknown mixture form '{form}'; valid forms: {', '.join(MIXTURE_FORMS)}")
        alpha = np.asarray(alpha, dtype=float)
        if not np.all((alpha >= 0.0) & (alpha <= 1.0)):
            raise UserError(f"mixture alpha must be in [0, 1], got {alpha}")
        first, second = components if components and components[0] else self.spec["mixture"]["rewards"]
        r1, r2 = self.reward(first, prompts, responses), self.reward(second, prompts, responses)
        return mixture_reward(r1, r2, alpha, form)

    # ---- groups --------------------------------------------------------------------------------
    def group_of(self, prompts: Sequence[str]) -> np.ndarray:
        """(N,) group name of each prompt, from its first topic word ('' if none is a topic word)."""
        return np.array([self._topic_group.get((str(p).split() or [""])[0], "") for p in prompts], dtype=object)

    # ---- generators (exact densities; sampling) --------------------------------------------------
    def _prompt_bias(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        ids, n = self.encode(prompts)
        if (ids == _UNKNOWN).any() or (ids >= self.n_topics).any() or (n == 0).any():
            raise ValueError("generator prompts must be 1+ topic words of this world")
        mask = ids >= 0
        bias = (self._topic_bias[np.where(mask, ids, 0)] * mask[..., None]).sum(1) / n[:, None]
        return bias, ids[np.arange(len(n)), n - 1]

    def _step_logits(self, source: str, prev: np.ndarray, prompt_bias: np.ndarray) -> np.ndarray:
        word_bias = np.asarray(self.spec["generator"]["sources"][source]["word_bias"])
        return self._transition[prev] + prompt_bias + word_bias

    def log_prob(self, source: str, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """(N,) exact log Q_source(y | x) of the known generator (world.json `generator.formula`);
        -inf where y is impossible (outside the response vocabulary, empty, or too long)."""
        self._check(prompts, responses)
        stop = float(self.spec["generator"]["sources"][source]["stop_prob"])
        bias, prev = self._prompt_bias(prompts)
        ids, n_words = self.encode(responses)
        out = np.zeros(len(n_words))
        ok = (n_words >= 1) & (n_words <= self.max_response_words)
        for t in range(ids.shape[1]):
            tok = ids[:, t]
            live = tok != _PAD
            resp = tok - self.n_topics
            valid = (resp >= 0) & (tok < len(self.words))
            ok &= ~live | valid
            logp = _log_softmax(self._step_logits(source, prev, bias))
            out += np.where(live & valid, logp[np.arange(len(tok)), np.clip(resp, 0, None)], 0.0)
            prev = np.where(live & valid, tok, prev)
        out += (n_words - 1).clip(0) * math.log1p(-stop)
        out += np.where(n_words < self.max_response_words, math.log(stop), 0.0)
        return np.where(ok, out, -np.inf)

    def sample(self, source: str, prompts: Sequence[str], rng: np.random.Generator) -> list[str]:
        """Draw one response per prompt from the generator of `source` (vectorised over prompts)."""
        stop = float(self.spec["generator"]["sources"][source]["stop_prob"])
        bias, prev = self._prompt_bias(prompts)
        n = len(prev)
        out = np.full((n, self.max_response_words), _PAD, dtype=np.int64)
        alive = np.ones(n, dtype=bool)
        for t in range(self.max_response_words):
            if t > 0:
                alive &= rng.random(n) >= stop
            probs = np.exp(_log_softmax(self._step_logits(source, prev, bias)))
            cdf = np.cumsum(probs, axis=1)
            pick = (cdf < rng.random(n)[:, None] * cdf[:, -1:]).sum(axis=1)
            tok = pick + self.n_topics
            out[:, t] = np.where(alive, tok, _PAD)
            prev = np.where(alive, tok, prev)
        return [" ".join(self.words[i] for i in row if i >= 0) for row in out]

    def sample_prompts(self, n: int, rng: np.random.Generator) -> tuple[list[str], list[str]]:
        """Draw n prompts and their group names: group ~ group weights, length ~ U{1..max_prompt_words},
        distinct topic words."""
        names = list(self.groups)
        weights = np.array([self.spec["groups"][g]["weight"] for g in names], dtype=float)
        group_idx = rng.choice(len(names), size=n, p=weights / weights.sum())
        max_len = int(self.spec["config"]["max_prompt_words"])
        prompts = []
        for g in group_idx:
            topics = self.spec["groups"][names[g]]["topic_words"]
            k = int(rng.integers(1, min(max_len, len(topics)) + 1))
            prompts.append(" ".join(topics[j] for j in rng.permutation(len(topics))[:k]))
        return prompts, [names[g] for g in group_idx]

    # ---- DoRA stage 1: source classifier and calibration value ---------------------------------
    def classifier_features(self, responses: Sequence[str]) -> np.ndarray:
        """(N, n_words + 1): bag of words of the response (every world word) and #words / max_response_words."""
        ids, n_words = self.encode(responses)
        return np.c_[self._bag(ids), n_words / self.max_response_words]

    def p_target(self, responses: Sequence[str]) -> np.ndarray:
        """(N,) calibrated P(source = target | response) of the stage-1 logistic classifier."""
        clf = self.spec["classifier"]
        z = self.classifier_features(responses) @ np.asarray(clf["weights"]) + float(clf["bias"])
        return _sigmoid(z / float(clf["temperature"]))

    def calibration(self, p_target: np.ndarray, target_fraction: float | None = None) -> np.ndarray:
        """DoRA's h~ = 1 / (alpha + (1 - alpha) (1 - p) / p) in [0, 1/alpha] (OBJECTIVES.md 6.2); alpha is the
        target source's share of the training mixture (default: the world's training `target_fraction`)."""
        alpha = float(self.spec["config"]["target_fraction"] if target_fraction is None else target_fraction)
        return dora_calibration(p_target, alpha)

    def p_target_oracle(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """(N,) exact Q0 / (Q0 + Q1) from the known generators (equal priors), for the oracle h~."""
        diff = self.log_prob("target", prompts, responses) - self.log_prob("synthetic", prompts, responses)
        return _sigmoid(np.nan_to_num(diff, nan=0.0, posinf=50.0, neginf=-50.0))


def load_world(directory: str | Path) -> World:
    """Load a world written by `robust-dpo synth --output DIR` (reads DIR/world.json)."""
    path = Path(directory) / WORLD_FILE
    if not path.is_file():
        raise UserError(f"'{directory}' is not a world written by `robust-dpo synth` (no {WORLD_FILE})")
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if spec.get("kind") != WORLD_KIND or spec.get("version") != WORLD_VERSION:
        raise UserError(f"{path}: not a {WORLD_KIND} v{WORLD_VERSION} file")
    return World(spec)
