"""A lost node (issue 12 item 1): a local multi-node Ray cluster (Ray's own `ray.cluster_utils.Cluster`,
as Ray's tests do), a node removed mid-run and a replacement added; the run must finish from its last
checkpoint with the final metrics of an uninterrupted run.  Run by tests/pipelines/test_node_loss.py:

    python tests/pipelines/node_loss.py OUT_DIR     # prints one JSON line: what happened, per scenario

The cluster: a head with 1 CPU and the trial-driver resource (cluster.yaml's head) and two worker
nodes of 1 CPU each.  The node removed is a worker node that holds a training worker (GCS's
placement-group table says which); it is killed without warning (raylet and every process on it)
and a new 1-CPU node is added.

  train  `train` with 2 workers and train.max_failures=1, 8 steps with a checkpoint each, the node
         lost once Ray Train has recorded 2 checkpoints (its snapshot; a checkpoint on disk is
         recorded at the controller's next poll): the worker group restarts from the latest.
  tune   `tune` over two trials (dpo, kldpo), one worker each, one at a time (so the one training
         node is the running trial's; the trial drivers fill the head), the node lost once the
         first trial has finished and the second has 2 recorded checkpoints: that trial resumes from
         its checkpoint (Ray Train's worker restart, train.max_failures=1; or Tune's trial restart,
         search.max_failures=1, whose new driver resumes the trial's own checkpoint); the first trial
         is untouched.  The uninterrupted sweep runs its two trials at once (the same numbers).
Each is compared with the same command run uninterrupted on the same cluster.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path


def _a_training_node(nodes: list) -> int:
    """The index in `nodes` of a worker node that holds a training worker's bundle (Ray Train's
    placement group; GCS's placement-group table, no dashboard needed)."""
    import ray

    used = set()
    for group in ray.util.placement_group_table().values():
        if group["state"] == "CREATED":
            used |= set(group["bundles_to_node_id"].values())
    return next(i for i, node in enumerate(nodes) if node.node_id in used)


def _lose_a_node_during(run, cluster, nodes: list, ready, events: list):
    """`run()` in a thread while this (main) thread waits for `ready()`, removes a node of `nodes`
    that runs a training worker (its raylet and every process on it killed) and puts a new node in
    its place (Ray's Node registers signal
    handlers: main thread only); returns what `run()` returned."""
    box = {}

    def target():
        try:
            box["result"] = run()
        except BaseException as error:  # noqa: BLE001 - re-raised below, in the main thread
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    while not ready() and thread.is_alive() and time.monotonic() - started < 600:
        time.sleep(0.05)
    if thread.is_alive():
        index = _a_training_node(nodes)
        events.append({"removed_at_seconds": round(time.monotonic() - started, 1), "node": index})
        cluster.remove_node(nodes[index], allow_graceful=False)
        nodes[index] = cluster.add_node(num_cpus=1)
        events.append({"replacement_added": True})
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def main(out: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from pipelines import config, tune
    from pipelines.train import TrainConfig, train

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny model helper
    from toy_checkpoints import save_tiny_model_and_tokenizer
    from train_datasets import write_pairs_dataset

    out.mkdir(parents=True, exist_ok=True)
    model = save_tiny_model_and_tokenizer(out / "model", [f"w{i}" for i in range(40)], seed=0)
    dataset = write_pairs_dataset(out / "data", {"train": 32, "eval": 6})
    # As ensure_ray does for a session it starts: Ray Train's controller polls its workers every
    # 0.25 s, not 2 s (set before the nodes start: their processes inherit it).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {tune.DRIVER_RESOURCE: 1}})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    common = [f"model.path={model}", f"data.path={dataset}", "train.lr=0.02", "train.batch_size=8",
              "train.micro_batch_size=4", "train.max_steps=8", "train.checkpoint_every=1", "train.seed=2",
              "train.keep_checkpoints=8", "objective.beta=0.5"]
    results = {}

    def train_cfg(name, *extra):
        return config.load(TrainConfig, None, [*common, f"output={out / name}", "objective.name=kldpo",
                                               "objective.tau=0.5", "train.num_workers=2", *extra])

    started = time.monotonic()
    plain = train(train_cfg("train_plain"))
    events: list = []
    lost = _lose_a_node_during(lambda: train(train_cfg("train_lost", "train.max_failures=1")), cluster, workers,
                               lambda: _registered(out / "train_lost") >= 2, events)
    results["train"] = {
        "events": events, "seconds": round(time.monotonic() - started, 1),
        "metrics_equal": plain.metrics_dataframe.drop(columns=["tokens_per_s"]).equals(
            lost.metrics_dataframe.drop(columns=["tokens_per_s"])),
        "final_loss": [float(plain.metrics["loss"]), float(lost.metrics["loss"])],
        "steps": [int(plain.metrics["step"]), int(lost.metrics["step"])],
        "worker_starts": [_worker_starts(out / "train_plain"), _worker_starts(out / "train_lost")],
    }

    def tune_cfg(name, *extra):
        keys = [*common, "train.num_workers=1", "search.objectives=dpo,kldpo", "train.max_failures=1",
                "search.max_failures=1", "trial_eval.reward=pipelines.evaluate.rewards:word_count",
                "trial_eval.num_prompts=4", *extra]
        return config.load(tune.TuneConfig, None, keys, flags={"output": str(out / name)})

    started = time.monotonic()
    plain_trials = tune.tune(tune_cfg("tune_plain", "search.max_concurrent_trials=2"))
    events = []
    lost_trials = _lose_a_node_during(lambda: tune.tune(tune_cfg("tune_lost", "search.max_concurrent_trials=1")),
                                      cluster, workers, lambda: _second_trial_has_a_checkpoint(out / "tune_lost"), events)
    compared = [c for c in plain_trials.columns if c not in ("final_model", "train_seconds", "sampling_seconds",
                                                            "tokens_per_s")]
    results["tune"] = {
        "events": events, "seconds": round(time.monotonic() - started, 1),
        "finished": [len(plain_trials), len(lost_trials)],
        "failed": [len(plain_trials.attrs["failed"]), len(lost_trials.attrs["failed"])],
        "trials_equal": plain_trials[compared].reset_index(drop=True).equals(
            lost_trials[compared].reset_index(drop=True)),
        "pareto_equal": _same_csv(out / "tune_plain" / "pareto.csv", out / "tune_lost" / "pareto.csv", compared),
        "worker_starts": {p.name: _worker_starts(p) for p in sorted((out / "tune_lost" / "trials").iterdir())},
    }
    ray.shutdown()
    cluster.shutdown()
    return results


def _registered(run: Path) -> int:
    """How many checkpoints Ray Train has recorded for `run` (its checkpoint manager's snapshot): a
    checkpoint on disk is not yet one a restart restores until the controller has recorded it."""
    try:
        snapshot = json.loads((run / "checkpoints" / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    return len(snapshot.get("checkpoint_results") or [])


def _second_trial_has_a_checkpoint(sweep: Path) -> bool:
    """One trial finished and the other has 2 recorded checkpoints: with one trial at a time, the
    only node training is the running trial's."""
    trials = [p for p in (sweep / "trials").glob("*") if p.is_dir()]
    done = [p for p in trials if (p / "trial_result.json").exists()]
    return bool(done) and any(_registered(p) >= 2 for p in trials if p not in done)


def _worker_starts(run: Path) -> int:
    """How many worker groups wrote the run's checkpoints: each checkpoint records its rank-0 worker's
    start time (all are kept: train.keep_checkpoints=8), so 1 = never restarted."""
    from pipelines.train import state as train_state

    return len({train_state.read_train_state(p.parent)["timings"]["created_at"]
                for p in run.glob("checkpoints/checkpoint_*/train_state.json")})


def _same_csv(a: Path, b: Path, columns: list[str]) -> bool:
    import pandas as pd

    x, y = pd.read_csv(a), pd.read_csv(b)
    keep = [c for c in x.columns if c in columns or c == "on_front"]
    return x[keep].equals(y[keep])


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
