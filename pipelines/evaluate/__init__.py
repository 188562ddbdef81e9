"""`robust-dpo evaluate`: batch-evaluate policy checkpoints under a grid of simulated shifts, on Ray Data.

    robust-dpo evaluate --checkpoint runs/x/train/final_model --reference runs/world/reference_model \\
        --data runs/world/tok --output runs/x/eval --reward world:runs/world \\
        --grid mixture:alpha=0:1:11 --grid label_flip:eps=0:0.4:5 generation.samples_per_prompt=8
    # on a cluster: the same command under `ray job submit -- ...`; use_gpu=auto puts actors on GPUs

Per checkpoint (a policy dir loadable by from_pretrained, or a PEFT adapter dir) and per shift level:
- implicit metrics on the tokenised eval split: Delta = policy minus reference summed response
  log-prob; pair_accuracy = fraction of pairs with Delta_chosen > Delta_rejected under the level's
  labels (ties: pair_ties), margin = mean(Delta_chosen - Delta_rejected) in nats, dpo_loss =
  mean -log sigmoid(beta * margin_i) (OBJECTIVES.md 7.3).  The shift is `pipelines.data.shifts`
  applied to rows that already carry the log-probs: relabelling swaps every *chosen*/*rejected*
  column pair, so the log-probs follow the labels.
- generative metrics: `generation.samples_per_prompt` ancestral samples (temperature 1) for the
  first `generation.num_prompts` distinct eval prompts, scored once with the exact per-token
  KL(policy || reference) summed along each sample (`kl`; the plain Monte-Carlo `kl_mc` too,
  OBJECTIVES.md 7.1) and with the configured reward.  The level's `reward` and `kl` average the
  per-prompt means over the level's rows (so resampling shifts reweight prompts); under the mixture
  shift, level alpha scores the same samples with alpha r1 + (1 - alpha) r2.
- validation prompts: `generation.validation_fraction` of the sampled prompts (a fixed split by the
  hash of the prompt text) are held out of `reward`, `kl` into `val_reward`, `val_kl`, so a sweep
  can select on one and report the other.

Outputs in --output: evaluation.csv (one row per checkpoint x shift level), samples.parquet (every
sample with its KL and rewards), evaluate_config.yaml.  `evaluate(cfg)` returns the same dataframe.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from pipelines import console
from pipelines import config as config_lib
from pipelines import model as model_lib
from pipelines import schema
from pipelines.console import say
from pipelines.data import shifts
from pipelines.errors import UserError
from pipelines.evaluate.generation import SampleResponses
from pipelines.ray_session import actor_pool
from pipelines.paths import InputPath, ModelPath, OutputPath, RewardSpec, atomic_path
from robust_objectives import PreferenceLogps
from robust_objectives.dpo import compute_log_ratios, compute_pair_losses, summarize_rewards

RESULT_COLUMNS = (
    "trial_id", "checkpoint", "shift", "level", "spec", "reward", "kl", "kl_mc", "pair_accuracy",
    "pair_ties", "margin", "dpo_loss", "n_pairs", "n_prompts", "n_samples", "val_reward", "val_kl", "val_n_prompts",
)


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    enabled: bool = True  # sample from each checkpoint and score reward and KL; false = implicit metrics only
    num_prompts: int = 64  # distinct eval prompts sampled (the first ones in row order); 0 = every prompt
    samples_per_prompt: int = 4  # ancestral samples per prompt at temperature 1; >= 1
    max_new_tokens: int = 32  # response cap in tokens (EOS counts when sampled); >= 1
    batch_size: int = 64  # sequences per sampling forward
    seed: int = 0  # sampling seed; a sample's uniforms depend only on (seed, prompt, sample index)
    validation_fraction: float = 0.0  # share of the sampled prompts set aside for selection (val_reward, val_kl); reward/kl use the rest

    def __post_init__(self):
        config_lib.check(self, ">= 1", "samples_per_prompt", "max_new_tokens", "batch_size")
        config_lib.check(self, ">= 0", "num_prompts")
        config_lib.check(self, "[0, 1)", "validation_fraction")


@dataclass(frozen=True, kw_only=True)
class EvaluateOptionsConfig:
    """The `key=value` options of `robust-dpo evaluate`; `run` nests them as its `evaluate:` section."""

    split: str = "eval"  # split of `data` to evaluate on
    tokenizer: ModelPath = ""  # decodes samples for the reward; "" = the dataset's tokenizer, else the reference's
    beta: float = 0.1  # beta of the held-out DPO loss, 1/nats (use the trained beta to compare losses)
    max_pairs: int = 0  # eval pairs used (the first ones in file order); 0 = all
    batch_size: int = 32  # pairs per forward in the log-prob actors
    concurrency: int = 1  # actors per pass (each holds one GPU when GPUs are used); >= 1
    models_per_actor: int = 8  # models one actor loads at once (reference + policies); lower it for large models
    use_gpu: Literal["auto", "true", "false"] = "auto"  # auto = GPU actors when the Ray cluster has GPUs
    shift_seed: int = 0  # seed of the shifts' randomness (label flips, resampling)
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self):
        config_lib.check(self, ">= 1", "batch_size", "concurrency", "models_per_actor")
        config_lib.check(self, ">= 0", "max_pairs")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(EvaluateOptionsConfig):
    """The whole evaluate stage: the inputs its command-line flags name, plus the options."""

    checkpoints: list[InputPath]  # required: policy dirs, "PATH" or "NAME=PATH" (NAME becomes trial_id); --checkpoint
    reference: ModelPath  # required: reference model dir (from_pretrained); --reference
    data: InputPath  # required: a pairs dataset written by `robust-dpo data` (DIR with manifest.json); --data
    output: OutputPath  # required: output folder; --output
    grid: list[str] = field(default_factory=list)  # shift specs or grids (mixture:alpha=0:1:11); empty = unshifted only; --grid
    reward: RewardSpec = ""  # world:DIR[:NAME] | hf:PATH | module:function; "" = no reward (KL and pair metrics only); --reward

    def __post_init__(self):
        super().__post_init__()
        if not self.checkpoints:
            raise config_lib.FieldError("checkpoints", "is empty: evaluate needs at least one --checkpoint")

    @classmethod
    def from_options(cls, options: EvaluateOptionsConfig, **inputs: Any) -> "EvaluateConfig":
        """The options of `options` with the inputs (checkpoints, reference, data, output, grid, reward)."""
        values = {f.name: getattr(options, f.name) for f in dataclasses.fields(EvaluateOptionsConfig)}
        return config_lib.build(cls, {**values, **inputs})


# [1] Checkpoints, models, specs -----------------------------------------------------------------


def parse_checkpoints(items: Sequence[str]) -> list[tuple[str, str]]:
    """["NAME=PATH" or "PATH", ...] -> [(trial_id, path)]; PATH/final_model is named after PATH."""
    out = []
    for item in items:
        name, eq, path = item.partition("=")
        if not eq:
            path = item
            p = Path(item.rstrip("/"))
            name = p.parent.name if p.name == "final_model" else p.name
        if not Path(path).is_dir():
            raise UserError(f"checkpoint '{path}' is not a directory")
        out.append((name, path))
    dup = [n for n, c in collections.Counter(n for n, _ in out).items() if c > 1]
    if dup:
        raise UserError(f"two checkpoints share the trial id '{dup[0]}'; name them with --checkpoint NAME=PATH")
    return out


def build_grid(specs: Sequence[str], world_components: Optional[tuple[str, str]]) -> list[tuple[str, float, str]]:
    """Expand shift specs/grids to [(shift, level, spec)]; no spec = the unshifted split.

    With a world reward, a mixture spec without r1/r2 gets the world's mixture components, so the
    relabelled pairs and the scored samples use the same alpha r1 + (1 - alpha) r2.
    """
    if not specs:
        return [("none", 0.0, "")]
    levels = []
    for spec in specs:
        if spec.strip().startswith("mixture") and world_components and "r1=" not in spec:
            spec = f"{spec},r1={world_components[0]},r2={world_components[1]}"
        for name, level, text in shifts.expand_grid(spec):
            levels.append((name, float("nan") if level is None else float(level), text))
    return levels


def _chunks(items: list, size: int) -> list[list]:
    return [items[i: i + size] for i in range(0, len(items), size)]


# [2] Metrics: pure functions ---------------------------------------------------------------------


def pair_metrics(policy_chosen: np.ndarray, policy_rejected: np.ndarray, reference_chosen: np.ndarray,
                 reference_rejected: np.ndarray, beta: float) -> dict[str, float]:
    """Implicit metrics of N pairs under their current labels (inputs: (N,) summed log-probs), in
    float64 with the pieces of robust_objectives' `dpo` (log-ratios, per-pair loss,
    rewards/accuracy_delta), not a second definition: pair_accuracy = mean 1[Delta_w > Delta_l],
    pair_ties = mean 1[Delta_w == Delta_l], margin = mean(Delta_w - Delta_l) in nats, dpo_loss =
    mean -log sigmoid(beta (Delta_w - Delta_l)), n_pairs.  NaN metrics (n_pairs 0) when N = 0."""
    inputs = PreferenceLogps(*(torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in (
        policy_chosen, policy_rejected, reference_chosen, reference_rejected)))
    n_pairs = int(inputs.policy_chosen_logps.shape[0])
    if n_pairs == 0:
        return {"pair_accuracy": np.nan, "pair_ties": np.nan, "margin": np.nan, "dpo_loss": np.nan, "n_pairs": 0}
    chosen, rejected = compute_log_ratios(inputs)
    margins = chosen - rejected
    rewards = summarize_rewards(beta * chosen, beta * rejected, chosen, rejected)
    return {
        "pair_accuracy": float(rewards["rewards/accuracy_delta"]),
        "pair_ties": float((margins == 0).double().mean()),
        "margin": float(margins.mean()),
        "dpo_loss": float(compute_pair_losses(margins, beta).mean()),
        "n_pairs": n_pairs,
    }


def validation_prompts(prompts: Sequence[str], fraction: float) -> set[str]:
    """The round(fraction x n) distinct prompts with the smallest sha256 of their text: the sampled
    prompts held out for selection.  No seed: a prompt is on the same side in every run, for every
    model and every shift level, and the split does not depend on the other prompts' order."""
    distinct = sorted(set(prompts), key=lambda p: (hashlib.sha256(p.encode()).hexdigest(), p))
    return set(distinct[: round(fraction * len(distinct))])


def weighted_prompt_metrics(level_prompts: Sequence[str], per_prompt: pd.DataFrame, columns: Sequence[str]) -> dict:
    """Average per-prompt sample means (`per_prompt`: index = prompt text, one column per metric) over
    a level's rows (`level_prompts`: the prompt of every row of the shifted split; repeats count).

    Returns {column: sum_rows mean(prompt of row) / #rows with a sampled prompt} (NaN when no row's
    prompt was sampled), plus n_prompts, the distinct sampled prompts among the rows.
    """
    counts = collections.Counter(p for p in level_prompts if p in per_prompt.index)
    total = sum(counts.values())
    out: dict[str, Any] = {"n_prompts": len(counts)}
    for column in columns:
        weighted = sum(n * per_prompt.at[p, column] for p, n in counts.items())
        out[column] = float(weighted / total) if total else float("nan")
    return out


# [3] The stage -----------------------------------------------------------------------------------


def _check_inputs(cfg: EvaluateConfig) -> tuple[list[tuple[str, str]], dict]:
    checkpoints = parse_checkpoints(cfg.checkpoints)
    manifest = schema.read_manifest(cfg.data)
    if manifest.get("format") != "pairs":
        raise UserError(f"dataset '{cfg.data}' has format {manifest.get('format')!r}; evaluate needs pairs")
    schema.split_dir(cfg.data, cfg.split)
    vocab = model_lib.load_model_config(cfg.reference, "--reference").vocab_size
    for trial_id, path in checkpoints:
        other = model_lib.load_model_config(path, f"--checkpoint {trial_id}").vocab_size
        if other != vocab:
            raise UserError(f"checkpoint '{path}' has vocabulary {other} but the reference has {vocab}")
    return checkpoints, manifest


def reward_columns(levels: Sequence[tuple[str, float, str]], with_reward: bool) -> tuple[dict, dict]:
    """Which reward each level reads: the configured one, or the world mixture at the level's alpha.
    Returns keys (sample column -> None = the configured reward, or the mixture's `score` keyword
    arguments) and by_level ((shift, spec) -> sample column)."""
    keys: dict[str, Optional[dict]] = {"reward_base": None}
    by_level = {}
    for i, (name, _, text) in enumerate(levels):
        by_level[(name, text)] = "reward_base"
        if name == "mixture" and with_reward:
            p = shifts.parse_shift(text).params
            keys[f"reward_{i}"] = {"alpha": p["alpha"], "form": p["form"], "components": (p["r1"], p["r2"])}
            by_level[(name, text)] = f"reward_{i}"
    return keys, by_level


def compute_pair_logps(ds, models: list[tuple[str, str]], cfg: EvaluateConfig, gpu: bool):
    """[a] Add `<prefix>_chosen_logps` / `<prefix>_rejected_logps` (float64) for every (prefix, model
    path), with the reference stage's actor: one concatenated forward per `cfg.batch_size` pairs."""
    for chunk in _chunks(models, cfg.models_per_actor):
        say("evaluate", f"log-probs of the eval pairs under {len(chunk)} model(s): {', '.join(p for p, _ in chunk)}")
        ds = ds.map_batches(model_lib.PairLogps,
                            fn_constructor_kwargs={"models": chunk, "batch_size": cfg.batch_size, "use_gpu": gpu},
                            batch_size=cfg.batch_size, batch_format="pyarrow",
                            **actor_pool(cfg.concurrency, gpu=gpu)).materialize()
    return ds


def shift_pair_rows(ds, levels, columns: list[str], seed: int) -> dict[tuple[str, str], pd.DataFrame]:
    """[b] Each level's rows (shift applied to the rows carrying the log-probs), `columns` only."""
    out = {}
    say("evaluate", f"{len(levels)} shift level(s): {', '.join(sorted({name for name, _, _ in levels}))}")
    for name, _, text in levels:
        shifted = shifts.apply_shifts(ds, [text], seed=seed) if text else ds
        out[(name, text)] = shifted.select_columns(columns).to_pandas()
    return out


def sample_checkpoints(ds, checkpoints, cfg: EvaluateConfig, gpu: bool, tokenizer: str, reward_keys: dict,
                       with_reward: bool) -> pd.DataFrame:
    """[c] samples_per_prompt samples per sampled prompt per checkpoint, with KL and reward columns."""
    import ray

    prompt_table = ds.select_columns(["prompt", "prompt_input_ids"]).to_pandas().drop_duplicates("prompt")
    if cfg.generation.num_prompts:
        prompt_table = prompt_table.head(cfg.generation.num_prompts)
    n = cfg.generation.samples_per_prompt
    frames = []
    for chunk in _chunks(list(checkpoints), cfg.models_per_actor):
        items = [{"model_index": m, "prompt_index": i, "sample_index": j, "prompt": row.prompt,
                  "prompt_input_ids": [int(t) for t in row.prompt_input_ids]}
                 for m in range(len(chunk)) for i, row in enumerate(prompt_table.itertuples(index=False))
                 for j in range(n)]
        say("evaluate", f"sampling {len(prompt_table)} prompts x {n} from {', '.join(t for t, _ in chunk)}")
        gen = ray.data.from_items(items).map_batches(
            SampleResponses, batch_size=cfg.generation.batch_size,
            fn_constructor_kwargs={"policies": [path for _, path in chunk], "reference_path": cfg.reference,
                                   "tokenizer_path": tokenizer, "max_new_tokens": cfg.generation.max_new_tokens,
                                   "seed": cfg.generation.seed, "use_gpu": gpu,
                                   "reward": cfg.reward if with_reward else "", "reward_keys": reward_keys},
            **actor_pool(cfg.concurrency, gpu=gpu))
        frame = gen.to_pandas()
        frame.insert(0, "trial_id", [chunk[m][0] for m in frame.pop("model_index")])
        frames.append(frame)
    samples = pd.concat(frames, ignore_index=True)
    held_out = validation_prompts(prompt_table["prompt"], cfg.generation.validation_fraction)
    samples["prompt_set"] = np.where(samples["prompt"].isin(held_out), "validation", "test")
    return samples


def summarise_levels(checkpoints, levels, level_rows, samples: Optional[pd.DataFrame], level_reward: dict,
                     beta: float) -> pd.DataFrame:
    """[d] One row per checkpoint x level (RESULT_COLUMNS): generative metrics on the test prompts, and
    on the validation prompts (val_*) when the samples' `prompt_set` names some."""
    rows = []
    for i, (trial_id, path) in enumerate(checkpoints):
        if samples is not None:
            mine = samples[samples["trial_id"] == trial_id]
            metric_cols = ["kl", "kl_mc"] + [c for c in mine.columns if c.startswith("reward_")]
            held_out = mine["prompt_set"] == "validation"
            per_prompt = mine[~held_out].groupby("prompt")[metric_cols].mean()
            val_prompt = mine[held_out].groupby("prompt")[metric_cols].mean() if held_out.any() else None
            mine = mine[~held_out]
        for name, level, text in levels:
            table = level_rows[(name, text)]
            row = {"trial_id": trial_id, "checkpoint": path, "shift": name, "level": level, "spec": text}
            row |= pair_metrics(table[f"ckpt{i}_chosen_logps"], table[f"ckpt{i}_rejected_logps"],
                                table["ref_chosen_logps"], table["ref_rejected_logps"], beta)
            if samples is not None:
                key = level_reward[(name, text)]
                cols = ["kl", "kl_mc"] + ([key] if key in per_prompt.columns else [])
                gen = weighted_prompt_metrics(table["prompt"], per_prompt, cols)
                row |= {"kl": gen["kl"], "kl_mc": gen["kl_mc"], "n_prompts": gen["n_prompts"],
                        "reward": gen.get(key, float("nan")),
                        "n_samples": int(mine["prompt"].isin(set(table["prompt"])).sum())}
                if val_prompt is not None:
                    val = weighted_prompt_metrics(table["prompt"], val_prompt, cols)
                    row |= {"val_reward": val.get(key, float("nan")), "val_kl": val["kl"],
                            "val_n_prompts": val["n_prompts"]}
            rows.append(row)
    return pd.DataFrame(rows).reindex(columns=list(RESULT_COLUMNS))


def evaluate(cfg: EvaluateConfig) -> pd.DataFrame:
    """Evaluate every checkpoint under every shift level; write the outputs; return the rows."""
    import ray

    from pipelines.evaluate.rewards import RewardFunction
    from pipelines.ray_session import ensure_ray, preserve_order
    from pipelines.timings import Timings

    timings = Timings("evaluate")
    checkpoints, manifest = _check_inputs(cfg)
    reward = RewardFunction(cfg.reward) if cfg.reward and cfg.generation.enabled else None  # fail fast
    world_components = tuple(reward.world.spec["mixture"]["rewards"]) if reward and reward.world else None
    levels = build_grid(cfg.grid, world_components)
    if reward is not None and reward.world is None and any(name == "mixture" for name, _, _ in levels):
        raise UserError(f"reward '{cfg.reward}' cannot score the mixture shift (its levels are the world's "
                        "mixture alpha r1 + (1 - alpha) r2): use --reward world:DIR or generation.enabled=false")
    reward_keys, level_reward = reward_columns(levels, reward is not None)
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_lib.dump(cfg, out_dir / "evaluate_config.yaml")
    data_tokenizer = str(manifest.get("tokenizer", ""))
    tokenizer = cfg.tokenizer or (data_tokenizer if data_tokenizer and Path(data_tokenizer).exists() else cfg.reference)

    with timings.phase("Ray session"):
        ensure_ray()
    gpu = cfg.use_gpu == "true" or (cfg.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
    # A checkpoint that is the reference itself (run's baseline row) reuses the reference's columns.
    same = {i for i, (_, path) in enumerate(checkpoints) if Path(path).resolve() == Path(cfg.reference).resolve()}
    models = [("ref", cfg.reference)] + [(f"ckpt{i}", path) for i, (_, path) in enumerate(checkpoints)
                                         if i not in same]
    with preserve_order():
        with timings.phase("pair log-probs (every model, every pair)"):
            ds = ray.data.read_parquet(schema.split_files(cfg.data, cfg.split))
            if cfg.max_pairs:
                ds = ds.limit(cfg.max_pairs)
            ds = compute_pair_logps(ds, models, cfg, gpu)
            if ds.count() == 0:
                raise UserError(f"dataset '{cfg.data}' split '{cfg.split}' has no rows")
        with timings.phase("shift levels"):
            columns = ["prompt"] + [f"{p}_{s}_logps" for p, _ in models for s in ("chosen", "rejected")]
            level_rows = shift_pair_rows(ds, levels, columns, cfg.shift_seed)
            for table in level_rows.values():
                for i in same:
                    for side in ("chosen", "rejected"):
                        table[f"ckpt{i}_{side}_logps"] = table[f"ref_{side}_logps"]
        samples = None
        if cfg.generation.enabled:
            with timings.phase("sampling and scoring"):
                samples = sample_checkpoints(ds, checkpoints, cfg, gpu, tokenizer, reward_keys, reward is not None)
                with atomic_path(out_dir / "samples.parquet") as tmp:
                    samples.to_parquet(tmp, index=False)
    with timings.phase("summary"):
        result = summarise_levels(checkpoints, levels, level_rows, samples, level_reward, cfg.beta)
        with atomic_path(out_dir / "evaluation.csv") as tmp:
            result.to_csv(tmp, index=False)
    timings.write(out_dir)
    say("evaluate", f"wrote {out_dir / 'evaluation.csv'} ({len(result)} rows)")
    return result


# [4] CLI -----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", action="append", required=True, metavar="[NAME=]PATH",
                        help="policy model dir (repeatable); NAME becomes the trial id")
    parser.add_argument("--reference", required=True, metavar="PATH", help="reference model dir")
    parser.add_argument("--data", required=True, metavar="DIR", help="pairs dataset written by `robust-dpo data`")
    parser.add_argument("--output", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--grid", action="append", default=None, metavar="SPEC",
                        help="shift spec or grid, e.g. mixture:alpha=0:1:11 or label_flip:eps=0:0.4:5 (repeatable)")
    parser.add_argument("--reward", default=None, metavar="SPEC",
                        help="world:DIR[:NAME], hf:PATH or module:function (default: no reward)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. generation.samples_per_prompt=8 beta=0.05")


CONFIG = EvaluateConfig  # the keys `--help` lists


def build_config(args: argparse.Namespace) -> EvaluateConfig:
    """The flags and the `key=value` overrides (a flag and an override of one key is an error)."""
    flags = {"checkpoints": args.checkpoint, "reference": args.reference, "data": args.data, "output": args.output,
             "grid": args.grid, "reward": args.reward}
    return config_lib.load(EvaluateConfig, None, args.overrides, flags=flags, section="evaluate")


def main(args: argparse.Namespace) -> int:
    result = evaluate(build_config(args))
    with pd.option_context("display.width", 160, "display.max_columns", 12):
        print(result[["trial_id", "shift", "level", "reward", "kl", "pair_accuracy"]].to_string(index=False),
              file=console.out())
    return 0
