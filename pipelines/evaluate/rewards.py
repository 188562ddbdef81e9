"""Rewards for generative evaluation: a built-in world reward, an HF reward model, or `module:function`.

A reward maps (prompts, responses) texts to scores (ARCHITECTURE.md "Rewards and models").  Specs:

    world:DIR                the world's training reward: the convex mixture at its alpha_train
    world:DIR:NAME           one known reward of the world at DIR (r1, r2, r3, verbosity, length)
    hf:PATH  (or a dir)      an HF sequence-classification model with one output (the reward head);
                             text = the tokenizer's chat template of (user prompt, assistant response)
                             when it has one, else "prompt response"
    package.module:function  any importable function (prompts, responses) -> sequence of floats

Under the `mixture` shift, level alpha scores the same samples with the world's mixture
`alpha r1 + (1 - alpha) r2` (WDPO paper section 7.1), which needs a world reward.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from pipelines import model as model_lib
from pipelines.errors import UserError

_FUNCTION = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
HF_BATCH_SIZE = 32  # texts per reward-model forward


@dataclass(frozen=True)
class RewardSpec:
    kind: str  # "world", "hf" or "function"
    target: str  # the world dir, the model path, or "module:function"
    name: str = ""  # the world reward name; "" = the world's training mixture


def parse_reward_spec(spec: str) -> RewardSpec:
    """Parse a reward spec string (see module docstring); UserError naming the accepted forms."""
    spec = spec.strip()
    if spec.startswith("world:"):
        rest = spec[len("world:"):]
        directory, _, name = rest.partition(":") if not Path(rest).is_dir() else (rest, "", "")
        if not directory:
            raise UserError(f"reward '{spec}': expected world:DIR or world:DIR:NAME")
        return RewardSpec("world", directory, name)
    if spec.startswith("hf:"):
        return RewardSpec("hf", spec[len("hf:"):])
    if Path(spec).is_dir():
        return RewardSpec("hf", spec)
    if _FUNCTION.match(spec):
        return RewardSpec("function", spec)
    raise UserError(f"reward '{spec}' is not world:DIR[:NAME], hf:PATH (or an existing model dir), nor module:function")


class RewardFunction:
    """A loaded reward: `score(prompts, responses) -> (N,) float64`.  Construct once per actor (HF
    models and worlds load here); `world` is the loaded world of a world reward, else None."""

    def __init__(self, spec: str, device: str = "cpu"):
        self.spec = parse_reward_spec(spec)
        self.device = device
        self.world = None
        self._fn: Optional[Callable] = None
        if self.spec.kind == "world":
            from pipelines.world.functions import load_world

            self.world = load_world(self.spec.target)
            if self.spec.name and self.spec.name not in self.world.reward_names:
                raise UserError(f"reward '{spec}': the world has no reward '{self.spec.name}'; valid: "
                                f"{', '.join(self.world.reward_names)}")
        elif self.spec.kind == "hf":
            self._load_hf(self.spec.target)
        else:
            module_name, _, attr = self.spec.target.partition(":")
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise UserError(f"reward '{spec}': cannot import module '{module_name}' ({exc})") from None
            fn = getattr(module, attr, None)
            if not callable(fn):
                raise UserError(f"reward '{spec}': module '{module_name}' has no function '{attr}'")
            self._fn = fn

    def _load_hf(self, path: str) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        config = model_lib.load_model_config(path, "reward hf")
        if config.num_labels != 1:
            raise UserError(f"reward 'hf:{path}': a reward model has one output, this one has {config.num_labels}")
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval().to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _score_hf(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        import torch

        if getattr(self.tokenizer, "chat_template", None):
            texts = [self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False)
                for p, r in zip(prompts, responses)]
        else:
            texts = [f"{p} {r}" for p, r in zip(prompts, responses)]
        scores = []
        with torch.no_grad():
            for start in range(0, len(texts), HF_BATCH_SIZE):
                enc = self.tokenizer(texts[start: start + HF_BATCH_SIZE], return_tensors="pt", padding=True,
                                     truncation=True).to(self.device)
                scores.append(self.model(**enc).logits[:, 0].float().cpu().numpy())
        return np.concatenate(scores) if scores else np.zeros(0)

    def score(self, prompts: Sequence[str], responses: Sequence[str], alpha: Optional[float] = None,
              form: str = "convex", components: Optional[tuple[Optional[str], Optional[str]]] = None) -> np.ndarray:
        """(N,) float64 rewards of N (prompt, response) texts.

        With `alpha` (world rewards only), the world's mixture at alpha of `components` (r1, r2;
        None = the world's mixture components) instead of the configured reward: "convex" form
        alpha r1 + (1 - alpha) r2, "geometric" r1^alpha r2^(1 - alpha).
        """
        prompts, responses = list(prompts), list(responses)
        if alpha is not None:
            if self.world is None:
                raise UserError(f"reward '{self.spec.kind}:{self.spec.target}' cannot score the mixture shift: the "
                                "mixture alpha r1 + (1 - alpha) r2 is the world's; pass --reward world:DIR")
            values = self.world.mixture_reward(float(alpha), prompts, responses, form, components=components)
        elif self.world is not None and self.spec.name:
            values = self.world.reward(self.spec.name, prompts, responses)
        elif self.world is not None:  # the training mixture, at the alpha the world's labels come from
            config = self.world.spec.get("config", {})
            if "alpha_train" not in config:
                raise UserError("world.json has no config.alpha_train; name a reward: world:DIR:NAME")
            values = self.world.mixture_reward(float(config["alpha_train"]), prompts, responses)
        elif self._fn is not None:
            values = self._fn(prompts, responses)
        else:
            values = self._score_hf(prompts, responses)
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if values.shape != (len(prompts),):
            raise UserError(f"reward '{self.spec.target}' returned {values.shape[0]} scores for {len(prompts)} "
                            "responses")
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise UserError(f"reward '{self.spec.target}' returned a non-finite score ({values[bad[0]]}) for response "
                            f"{bad[0]}: {json.dumps(responses[bad[0]])[:80]}")
        return values


def word_count(prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
    """An example `module:function` reward (`pipelines.evaluate.rewards:word_count`): words per response."""
    return [float(len(r.split())) for r in responses]
