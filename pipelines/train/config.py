"""Typed, strict configuration of the train stage, and the checks made before any worker starts.

`config.load(TrainConfig, path, overrides, flags={"output": ...})` builds a `TrainConfig` from
dataclass defaults <- YAML <- `key=value` overrides (STYLE.md G6); `build_train_config(values)` is
the same from a mapping (the Ray boundary, tune's trials).  Ranges are checked in each section's
`__post_init__`, cross-section checks against the objective registry in `TrainConfig.__post_init__`.
The `objective` section is open-ended by design: `name` plus that objective's hyperparameters,
validated by `robust_objectives`, so adding an objective touches no pipeline code (G8).
`inspect_dataset(cfg)` and `check_model(cfg)` raise `UserError` (exit 2) before Ray starts a worker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from pipelines import config as config_lib
from pipelines import schema
from pipelines.errors import UserError
from pipelines.paths import InputPath, ModelPath, OutputPath
from pipelines.tracking import MlflowConfig, TrackedConfig, WandbConfig

# Keys a rerun with the same --output may change without invalidating the checkpoints there:
# they change how long or where the run goes, not what a step computes.
RESUMABLE_CHANGES = (
    "train.gradient_checkpointing", "train.max_steps", "train.epochs", "train.max_failures", "train.num_workers",
    "train.use_gpu", "train.cpus_per_worker", "train.checkpoint_every", "train.keep_checkpoints", "train.eval_every",
    "reference.cache_dir", "tracking", "mlflow.tracking_uri", "mlflow.experiment",
    "wandb.project", "wandb.entity", "wandb.mode", "wandb.dir",
)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: ModelPath  # HF causal LM: a local dir (or a cached hub id) loadable with from_pretrained; required
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flex_attention"] = "auto"  # auto = eager for objectives that need double backward (wdpo), else sdpa


@dataclass(frozen=True, kw_only=True)
class TrainDataConfig:
    path: InputPath  # a dataset written by `robust-dpo data` (DIR with manifest.json); required
    train_split: str = "train"  # split folder to train on
    eval_split: str = "auto"  # split for eval metrics; auto = "eval" when present, "none" = no evaluation
    shuffle_buffer: int = 10000  # rows; per-epoch seeded local shuffle buffer, 0 = file order
    max_eval_pairs: int = 0  # pairs (or lists) evaluated per evaluation, 0 = the whole split

    def __post_init__(self):
        config_lib.check(self, ">= 0", "shuffle_buffer", "max_eval_pairs")


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    name: str  # a key of robust_objectives.OBJECTIVES; required
    hyperparameters: dict = field(default_factory=dict)  # resolved: defaults <- user values (beta, tau, ...)
    calibration: str = "calibration"  # DoRA's h~: the dataset column to read (calibration, calibration_oracle) or "one" (h~ = 1: DRO only)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ObjectiveConfig":
        """`config.build` builds the section through here: its keys depend on the objective's name."""
        return resolve_objective_config(values)


@dataclass(frozen=True, kw_only=True)
class TrainLoopConfig:
    lr: float = 1e-6  # peak learning rate, AdamW; 1e-7 .. 1e-3 (toy models like 1e-3)
    batch_size: int = 8  # global pairs (or lists) per optimizer step, summed over workers and micro-steps
    micro_batch_size: int = 4  # pairs per worker per forward; batch_size / (micro_batch_size * num_workers) = accumulation steps
    max_steps: int = 0  # optimizer steps; 0 = train.epochs full passes over the train split
    epochs: int = 1  # passes over the train split when max_steps = 0; 1 .. 100
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = fp32 master weights + bf16 autocast; log-probs always fp32
    num_workers: int = 1  # Ray Train workers (one GPU each when use_gpu); >= 1
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1.0  # logical CPUs reserved per worker
    strategy: Literal["ddp", "fsdp"] = "ddp"  # ddp = replicated model + averaged gradients; fsdp = torch FSDP2 sharding
    seed: int = 0  # seeds LoRA init, data shuffle and per-step RNG
    checkpoint_every: int = 10  # optimizer steps between reports; every report carries a checkpoint
    keep_checkpoints: int = 2  # checkpoints kept on disk (the latest ones); >= 1
    eval_every: int = 0  # optimizer steps between evaluations (done at a report); 0 = at every report
    max_failures: int = 0  # worker-group restarts from the last checkpoint; -1 = unlimited
    warmup_steps: int = 0  # linear warmup from 0 to lr, in optimizer steps
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"  # after warmup; linear/cosine decay to 0 at the last step
    weight_decay: float = 0.0  # AdamW decoupled weight decay; 0 .. 0.1
    max_grad_norm: float = 1.0  # global gradient-norm clip; 0 = no clipping (the norm is still logged)
    packing: bool = True  # rows packed without padding, each pair's prompt once, log-probs from response positions only (pipelines/collate.py); false = the plain padded full-logits path (same log-probs)
    gradient_checkpointing: bool = False  # recompute the policy's layer activations in the backward (HF's, non-reentrant): less memory, about one more forward of time
    global_accumulation: bool = True  # batch-coupled objectives take statistics over the whole optimizer step (all micro-steps), at one extra no-grad forward per micro-step

    def __post_init__(self):
        config_lib.check(self, ">= 1", "batch_size", "micro_batch_size", "num_workers", "checkpoint_every",
                         "keep_checkpoints", "epochs")
        config_lib.check(self, ">= 0", "max_steps", "eval_every", "warmup_steps", "max_grad_norm", "weight_decay")
        config_lib.check(self, "> 0", "lr")
        per_step = self.micro_batch_size * self.num_workers
        if self.batch_size % per_step:
            raise config_lib.FieldError(
                "batch_size", f"= {self.batch_size} is not a multiple of micro_batch_size x num_workers = "
                f"{self.micro_batch_size} x {self.num_workers} = {per_step}")


@dataclass(frozen=True, kw_only=True)
class TrainLoraConfig:
    r: int = 0  # LoRA rank; 0 = full fine-tuning, 8 .. 64 typical
    alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the LoRA branch; 0 .. 0.1
    target_modules: list[str] = field(default_factory=list)  # module names; empty = peft's default for the architecture

    def __post_init__(self):
        config_lib.check(self, ">= 0", "r")


@dataclass(frozen=True, kw_only=True)
class ReferenceConfig:
    mode: Literal["live", "precomputed"] = "live"  # live = reference forward each step; precomputed = cached columns from `robust-dpo reference`
    cache_dir: OutputPath = ""  # precomputed cache root; "" = $ROBUST_DPO_CACHE or ~/.cache/robust-dpo/reference
    batch_size: int = 16  # pairs per forward in the precompute actors
    concurrency: int = 1  # precompute actors (one GPU each when train.use_gpu)

    def __post_init__(self):
        config_lib.check(self, ">= 1", "batch_size", "concurrency")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(TrackedConfig):
    """The whole train stage: sections model, data, objective, train, lora, reference."""

    model: ModelConfig
    data: TrainDataConfig
    objective: ObjectiveConfig
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    lora: TrainLoraConfig = field(default_factory=TrainLoraConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    output: OutputPath = ""  # run directory (the CLI's --output); checkpoints, metrics.csv, final_model go here
    tracking: list[str] = field(default_factory=list)  # report to any of tensorboard, mlflow, wandb (rank 0; pipelines/tracking.py)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        """Cross-section checks against the objective registry (ranges are the sections' own)."""
        import robust_objectives as ro

        super().__post_init__()
        t, name = self.train, self.objective.name
        spec = ro.get_spec(name)
        if self.reference.mode == "precomputed" and spec.token_level:
            raise UserError(
                f"objective {name!r} is token-level: it needs the reference's full-vocabulary distribution at "
                "every response position, which is not stored by the precompute; use reference.mode=live"
            )
        attn = self.model.attn_implementation
        if spec.needs_embeddings and attn not in ("auto", "eager"):
            raise UserError(
                f"objective {name!r} differentiates twice through attention; model.attn_implementation="
                f"{attn!r} has no double backward, use 'eager' (or 'auto')"
            )
        if t.packing and not spec.needs_embeddings and attn not in ("auto", "sdpa", "eager"):
            raise UserError(
                f"train.packing=true needs model.attn_implementation sdpa or eager (packed rows take a 4D "
                f"block mask); {attn!r} does not, set train.packing=false"
            )
        if spec.needs_embeddings and t.gradient_checkpointing:
            raise UserError(
                f"objective {name!r} differentiates twice through the model, which gradient checkpointing's "
                "recomputation does not support; set train.gradient_checkpointing=false"
            )
        if spec.needs_embeddings and t.strategy == "fsdp":
            raise UserError(
                f"objective {name!r} needs a double backward through the input embeddings, which FSDP's "
                "sharded parameters do not support here; use train.strategy=ddp"
            )


# [1] Building the config -------------------------------------------------------------------------


def resolve_objective_config(values: Mapping[str, Any] | None) -> ObjectiveConfig:
    """The objective section from e.g. {"name": "kldpo", "beta": 0.1, "tau": 0.5}: defaults filled in,
    values coerced to the default's type.  The registry makes the checks; this re-words its errors as
    UserErrors naming the config key (and the valid names / hyperparameters)."""
    import robust_objectives as ro  # torch, which `robust-dpo train --help` need not load

    values = dict(values or {})
    if "hyperparameters" in values and isinstance(values["hyperparameters"], Mapping):
        values = {**values.pop("hyperparameters"), **values}  # accept asdict()'s nested form too
    name = values.pop("name", None)
    if name is None:
        raise UserError(f"config key 'objective.name' is required; valid names: {', '.join(sorted(ro.OBJECTIVES))}")
    calibration = values.pop("calibration", ObjectiveConfig.calibration)
    if not isinstance(calibration, str) or not calibration:
        raise UserError(f"config key 'objective.calibration': expected a column name or 'one', got {calibration!r}")
    try:
        if calibration != ObjectiveConfig.calibration and not ro.get_spec(name).needs_calibration:
            raise UserError(f"config key 'objective.calibration': objective {name!r} takes no calibration "
                            f"(only {', '.join(sorted(ro.NEEDS_CALIBRATION))} do)")
        defaults = ro.objective_hyperparameters(name)
        coerced = {
            key: config_lib.coerce(value, type(defaults[key]), f"objective.{key}")
            if defaults.get(key) is not None else value
            for key, value in values.items()
        }
        resolved = ro.validate_hyperparameters(name, coerced)
    except ro.UnknownObjectiveError as error:
        raise UserError(
            f"config key 'objective.name': unknown objective {error.name!r}; valid names: {', '.join(error.valid)}"
        ) from error
    except ro.UnknownHyperparameterError as error:
        key = error.unknown[0]
        raise UserError(
            f"config key 'objective.{key}': objective {name!r} has no hyperparameter {key!r}; "
            f"valid: {', '.join(error.valid) or '(none)'}"
        ) from error
    except ValueError as error:
        raise UserError(f"config key 'objective': {error}") from error
    return ObjectiveConfig(name=name, hyperparameters=resolved, calibration=calibration)


def build_train_config(values: Mapping[str, Any]) -> TrainConfig:
    """The typed config from the user-facing nested mapping (`train_config_to_dict`), strictly."""
    return config_lib.build(TrainConfig, values)


def train_config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The user-facing nested dict: the objective section flattened to {name, beta, ...}.

    `build_train_config(train_config_to_dict(cfg)) == cfg`; this dict is what crosses the Ray
    boundary as `train_loop_config` and what is written to DIR/config.yaml.
    """
    import robust_objectives as ro

    out = dataclasses.asdict(cfg)
    out["objective"] = {"name": cfg.objective.name, **cfg.objective.hyperparameters}
    if ro.get_spec(cfg.objective.name).needs_calibration:
        out["objective"]["calibration"] = cfg.objective.calibration
    return out


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (for comparing a rerun's config with the saved one)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


# [2] What the objective decides: attention kernel and batch layout -------------------------------


def attention_implementation(cfg: TrainConfig) -> str:
    """The attention kernel to load the model with: "auto" is SDPA, except eager (matmul + softmax) for
    objectives that need input embeddings (WDPO differentiates its penalty again, and PyTorch's fused
    SDPA kernels have no double backward)."""
    import robust_objectives as ro

    if cfg.model.attn_implementation != "auto":
        return cfg.model.attn_implementation
    return "eager" if ro.get_spec(cfg.objective.name).needs_embeddings else "sdpa"


def batch_layout(cfg: TrainConfig) -> tuple[str, bool]:
    """(layout, response_head) of the micro-batches (pipelines/collate.py): padded rows and full logits
    when train.packing=false; else the prompt shared across each pair's (or list's) responses, except
    for objectives that need the input embeddings (wdpo), whose penalty is defined on the two rows as
    separate inputs: their rows are packed unshared (each its own copy of the prompt)."""
    import robust_objectives as ro

    if not cfg.train.packing:
        return "padded", False
    if ro.get_spec(cfg.objective.name).needs_embeddings:
        return "packed", True
    return "shared", True


# [3] Checks against the data and the model (driver side, before workers start) -----------------


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """What the driver learned about the dataset: enough to plan steps and validate columns."""

    format: str  # "pairs" or "listwise"
    steps_per_epoch: int  # full global batches (train.batch_size rows) in the train split
    eval_split: str | None  # the resolved eval split, None = no evaluation
    columns: tuple[str, ...]  # columns of the train split


def count_split(directory: Path) -> tuple[int, tuple[str, ...]]:
    """Rows and column names (the last file's) of a split folder of parquet files, from footers only."""
    import pyarrow.parquet as pq

    files = sorted(directory.rglob("*.parquet"))
    if not files:
        raise UserError(f"split folder '{directory}' holds no parquet files")
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files), tuple(pq.read_schema(files[-1]).names)


def inspect_dataset(cfg: TrainConfig) -> DatasetInfo:
    """Check `data.path` is a robust-dpo dataset fit for the objective; count its rows."""
    import robust_objectives as ro

    manifest = schema.read_manifest(cfg.data.path)
    name = cfg.objective.name
    spec = ro.get_spec(name)
    fmt = manifest.get("format")
    if spec.listwise and fmt != "listwise":
        raise UserError(f"objective {name!r} is listwise but dataset '{cfg.data.path}' has format {fmt!r}")
    if not spec.listwise and fmt != "pairs":
        raise UserError(
            f"objective {name!r} takes pairs but dataset '{cfg.data.path}' has format {fmt!r}; "
            "use dpo_pl or dora_pl for listwise data"
        )
    train_rows, columns = count_split(schema.split_dir(cfg.data.path, cfg.data.train_split))
    needed = schema.LIST_TOKEN_COLUMNS + ("scores",) if fmt == "listwise" else schema.PAIR_TOKEN_COLUMNS
    missing = [c for c in needed if c not in columns]
    if missing:
        raise UserError(f"dataset '{cfg.data.path}' split '{cfg.data.train_split}' lacks column(s) {missing}")
    source = cfg.objective.calibration
    if spec.needs_calibration and source != "one" and source not in columns:
        others = ", ".join(c for c in columns if "calibration" in c) or "none"
        raise UserError(
            f"objective {name!r} needs a '{source}' column (DoRA's h~, objective.calibration); dataset "
            f"'{cfg.data.path}' has none (its calibration columns: {others}; objective.calibration=one sets h~ = 1)"
        )
    eval_split: str | None
    if cfg.data.eval_split == "none":
        eval_split = None
    elif cfg.data.eval_split == "auto":
        eval_split = "eval" if "eval" in manifest["splits"] else None
    else:
        schema.split_dir(cfg.data.path, cfg.data.eval_split)  # UserError naming the splits
        eval_split = cfg.data.eval_split
    if eval_split:
        count_split(Path(cfg.data.path) / eval_split)  # UserError if it holds no parquet files
    steps_per_epoch = train_rows // cfg.train.batch_size
    if steps_per_epoch == 0:
        raise UserError(
            f"dataset '{cfg.data.path}' split '{cfg.data.train_split}' has {train_rows} rows, fewer than "
            f"train.batch_size={cfg.train.batch_size}"
        )
    return DatasetInfo(format=fmt, steps_per_epoch=steps_per_epoch, eval_split=eval_split, columns=columns)


def check_model(cfg: TrainConfig) -> None:
    """Load the model's config (not its weights) and check it is a causal LM; UserError otherwise."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from pipelines import model as model_lib  # imports torch, which `train --help` does without

    path = cfg.model.path
    model_config = model_lib.load_model_config(path, "config key 'model.path'")
    if model_config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(
            f"config key 'model.path': '{path}' is a {model_config.model_type!r} model, not a causal LM"
        )


def total_steps(cfg: TrainConfig, info: DatasetInfo) -> int:
    """Optimizer steps of the whole run: max_steps, or epochs x full global batches per epoch."""
    return cfg.train.max_steps or cfg.train.epochs * info.steps_per_epoch

