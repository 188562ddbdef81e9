"""Report runs where users already track them: TensorBoard, MLflow, Weights & Biases (any subset).

    robust-dpo train ... tracking=tensorboard,mlflow mlflow.tracking_uri=sqlite:///runs/mlflow.db
    robust-dpo tune  ... tracking=mlflow,wandb wandb.project=robust wandb.mode=offline

- `train`: rank 0 of the Ray Train run logs every row it reports (the rows of metrics.csv, at their
  `step`) and the run's hyperparameters (Ray's pattern for experiment tracking in Train: the
  tracking client lives in the rank-0 worker).  A resumed run continues the same MLflow / W&B run
  (their ids are kept in `<output>/tracking.json`).
- `tune` / `run`: Ray Tune's own logger callbacks (`MLflowLoggerCallback`, `WandbLoggerCallback`,
  `TBXLoggerCallback`): one tracked run per trial with its config and every result it reported
  (the training rows rank 0 reported, then the trial's `reward` / `kl`).  After the report,
  pareto.png, robustness.png and report.md are logged as artifacts of one more run named
  `<sweep>-report` (TensorBoard: the PNGs as images, report.md as text).
- The libraries are optional extras (`pip install -e '.[tracking]'`); asking for a backend whose
  package is missing is a one-line error before any work starts.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from pipelines.errors import UserError

BACKENDS = {"tensorboard": "tensorboardX", "mlflow": "mlflow", "wandb": "wandb"}  # name -> module it needs
STATE_FILE = "tracking.json"


@dataclass(frozen=True, kw_only=True)
class MlflowConfig:
    tracking_uri: str = ""  # MLflow store: "" = sqlite:///<output>/mlflow.db; or sqlite:///..., http://host:5000, databricks
    experiment: str = "robust-dpo"  # MLflow experiment name


@dataclass(frozen=True, kw_only=True)
class WandbConfig:
    project: str = "robust-dpo"  # W&B project
    entity: str = ""  # W&B entity (team or user); "" = your default
    mode: Literal["", "online", "offline", "disabled"] = ""  # "" = W&B's own default (WANDB_MODE, else online)
    dir: str = ""  # where W&B writes its local files; "" = <output>


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    """The tracking keys every stage that trains shares (`tracking`, `mlflow.*`, `wandb.*`)."""

    backends: list[str] = field(default_factory=list)  # any of tensorboard, mlflow, wandb; empty = no tracking
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        check_names(self.backends)


def check_names(backends: Sequence[str]) -> None:
    """FieldError naming the `tracking` key for a backend that is not one of BACKENDS."""
    from pipelines.config import FieldError

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise FieldError("tracking", f"has an unknown backend {unknown[0]!r}; valid: {', '.join(BACKENDS)}")


class TrackedConfig:
    """The `tracking`, `mlflow` and `wandb` keys' check and TrackingConfig, for a stage config that has them
    (a base without fields, so the stage's keys keep their order)."""

    def __post_init__(self):
        check_names(self.tracking)

    def tracking_config(self) -> TrackingConfig:
        return TrackingConfig(backends=list(self.tracking), mlflow=self.mlflow, wandb=self.wandb)


def check_backends(cfg: TrackingConfig) -> None:
    """Every asked-for backend's package is importable (UserError naming the extra otherwise)."""
    for name in cfg.backends:
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise UserError(f"tracking={name} needs the {BACKENDS[name]!r} package: pip install -e '.[tracking]'")


def mlflow_uri(cfg: TrackingConfig, output_dir: Path) -> str:
    return cfg.mlflow.tracking_uri or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def numeric(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row (what every backend can plot)."""
    return {key: float(value) for key, value in row.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def _mlflow_run(client, cfg: TrackingConfig, run_name: str) -> str:
    """A new run in cfg.mlflow.experiment (created if missing); its id."""
    experiment = client.get_experiment_by_name(cfg.mlflow.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.mlflow.experiment)
    return client.create_run(experiment_id, run_name=run_name).info.run_id


def _mlflow_params(params: Mapping[str, Any]):
    from mlflow.entities import Param

    return [Param(k, str(v)[:6000]) for k, v in params.items()]


def _wandb_init(cfg: TrackingConfig, output_dir: Path, run_name: str, **kwargs):
    import wandb

    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity or None, name=run_name,
                      dir=cfg.wandb.dir or str(output_dir), mode=cfg.wandb.mode or None, **kwargs)


# [1] Train: rank 0 logs each reported row ---------------------------------------------------------


class RunTracker:
    """The tracking clients of one training run (opened in the rank-0 worker).  `output_dir` (the
    run's --output) holds the TensorBoard files, tracking.json and the default MLflow store; `params`
    (flat key -> value) are recorded once, when the tracked run is created."""

    def __init__(self, cfg: TrackingConfig, output_dir: str | Path, run_name: str, params: Mapping[str, Any]):
        self.output_dir = Path(output_dir)
        state_path = self.output_dir / STATE_FILE
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        self.tb = self.mlflow = self.mlflow_run = self.wandb_run = None
        if "tensorboard" in cfg.backends:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.output_dir / "tensorboard"))
        if "mlflow" in cfg.backends:
            from mlflow.tracking import MlflowClient

            self.mlflow = MlflowClient(mlflow_uri(cfg, self.output_dir))
            run_id = state.get("mlflow_run_id")
            if run_id is None:
                run_id = _mlflow_run(self.mlflow, cfg, run_name)
                self.mlflow.log_batch(run_id, params=_mlflow_params(params))
            self.mlflow_run = run_id
            state["mlflow_run_id"] = run_id
        if "wandb" in cfg.backends:
            run_id = state.get("wandb_run_id") or uuid.uuid4().hex[:8]
            self.wandb_run = _wandb_init(cfg, self.output_dir, run_name, id=run_id, resume="allow", config=dict(params))
            state["wandb_run_id"] = run_id
        self.output_dir.mkdir(parents=True, exist_ok=True)
        state_path.write_text(json.dumps(state, indent=2))

    def log(self, row: Mapping[str, Any], step: int) -> None:
        values = numeric(row)
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, global_step=step)
            self.tb.flush()
        if self.mlflow is not None:
            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            self.mlflow.log_batch(self.mlflow_run, metrics=[Metric(k, v, stamp, step) for k, v in values.items()])
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self, finished: bool = True) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None and finished:
            self.mlflow.set_terminated(self.mlflow_run)
        if self.wandb_run is not None:
            self.wandb_run.finish()


# [2] Tune: Ray's logger callbacks, then the report's artifacts ------------------------------------


def tune_callbacks(cfg: TrackingConfig, output_dir: Path) -> list:
    """Ray Tune logger callbacks for the asked-for backends (one tracked run per trial)."""
    callbacks = []
    if "mlflow" in cfg.backends:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=mlflow_uri(cfg, output_dir),
                                              experiment_name=cfg.mlflow.experiment, save_artifact=False))
    if "wandb" in cfg.backends:
        from ray.air.integrations.wandb import WandbLoggerCallback

        kwargs = {"mode": cfg.wandb.mode} if cfg.wandb.mode else {}
        callbacks.append(WandbLoggerCallback(project=cfg.wandb.project, entity=cfg.wandb.entity or None,
                                             dir=cfg.wandb.dir or str(output_dir), **kwargs))
    if "tensorboard" in cfg.backends:
        from ray.tune.logger import TBXLoggerCallback

        callbacks.append(TBXLoggerCallback())
    return callbacks


def log_report(cfg: TrackingConfig, output_dir: Path, name: str, files: Iterable[Path],
               summary: Mapping[str, Any] | None = None) -> None:
    """Log the report's files (PNGs, report.md) as artifacts of one run named `<name>-report`."""
    files = [Path(f) for f in files if Path(f).is_file()]
    if not cfg.backends or not files:
        return
    run_name = f"{name}-report"
    if "mlflow" in cfg.backends:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(mlflow_uri(cfg, output_dir))
        run_id = _mlflow_run(client, cfg, run_name)
        for f in files:
            client.log_artifact(run_id, str(f))
        if summary:
            client.log_batch(run_id, params=_mlflow_params(summary))
        client.set_terminated(run_id)
    if "tensorboard" in cfg.backends:
        import numpy as np
        from tensorboardX import SummaryWriter

        writer = SummaryWriter(str(output_dir / "tensorboard" / run_name))
        for f in files:
            if f.suffix == ".png":
                import matplotlib.image

                image = matplotlib.image.imread(str(f))[..., :3]
                writer.add_image(f.stem, np.transpose(image, (2, 0, 1)), global_step=0)
            else:
                writer.add_text(f.name, f.read_text(), global_step=0)
        writer.close()
    if "wandb" in cfg.backends:
        import wandb

        run = _wandb_init(cfg, output_dir, run_name, config=dict(summary or {}))
        artifact = wandb.Artifact(run_name.replace("/", "_"), type="report")
        for f in files:
            artifact.add_file(str(f))
        run.log_artifact(artifact)
        run.log({f.stem: wandb.Image(str(f)) for f in files if f.suffix == ".png"})
        run.finish()

