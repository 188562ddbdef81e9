"""Start (or join) the Ray session every stage shares.

On a cluster `RAY_ADDRESS` (or `ray.init(address="auto")` under `ray job submit`) connects to it; on
a laptop a local session is started with `num_cpus` logical CPUs.  Logical CPUs may exceed physical
cores: Ray Train controllers, Tune trial drivers and Data operators each hold a CPU slot while mostly
waiting, and RAY_NOTES.md 5.3 saw sweeps stall with too few slots on 2 cores.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from pipelines import console


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Ray Train's controller polls its workers every 2 s by default, so a fit spends up to 2 s noticing
    # that its workers started and again that they finished: at 0.25 s a 30-second trial on the
    # embedded world is 2.5 s shorter (benchmarks/RESULTS.md, issue 14).  A user's value wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    if not os.environ.get("RAY_ADDRESS"):
        # A local session: no spot preemption to watch for and no Prometheus to feed.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    # Quiet, offline-friendly defaults: no dashboard, no usage stats.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Workers' output reaches this console only with --verbose (progress comes back through the
    # stages' own channels); Ray keeps it in its session folder, linked from <output>/logs/.
    log_to_driver = console.verbose()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=log_to_driver)
    else:
        ray.init(
            num_cpus=num_cpus or max(8, 2 * (os.cpu_count() or 2)),
            include_dashboard=False,
            log_to_driver=log_to_driver,
            configure_logging=True,
            logging_level="WARNING",
            **_own_api_server(),
        )
    from ray.data import DataContext

    data_context = DataContext.get_current()  # Ray Data's progress bars and "Starting execution" lines
    data_context.enable_progress_bars = console.verbose()
    data_context.print_on_execution_start = console.verbose()
    console.quiet_ray(os.environ.get("ROBUST_DPO_LOG_DIR") or Path(tempfile.gettempdir()) / "robust-dpo-logs")


_API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
_OWNED_ENV = "ROBUST_DPO_OWN_API_SERVER"  # the value a robust-dpo process set (inherited by its children)


def _own_api_server() -> dict:
    """Each local session is addressed explicitly, so two commands on one machine never cross.

    A local session is the command's own Ray (two commands with different --output each start one).
    Ray's processes that look a session up without an address (Ray Train's placement-group cleaner
    asks the state API) would otherwise see every session on the machine and stop with "Found
    multiple active Ray instances".  So the session's API server gets a port chosen here, and
    RAY_API_SERVER_ADDRESS names it before `ray.init` (Ray's processes inherit it).  A value the user
    set is kept; one an earlier session of robust-dpo set (this process's or a parent's) is replaced."""
    current = os.environ.get(_API_SERVER_ENV)
    if current and current != os.environ.get(_OWNED_ENV):
        return {}
    port = _free_port()
    os.environ[_API_SERVER_ENV] = os.environ[_OWNED_ENV] = f"http://127.0.0.1:{port}"
    return {"dashboard_host": "127.0.0.1", "dashboard_port": port}


# Ports Ray itself takes by default (GCS, dashboard, client server, the dashboard agent's HTTP
# server) and its default worker-port range: a port the OS hands out must be none of them, or
# `ray.init` refuses it ("a port number 52365 that is used by other components": seen in the kill drill).
_RAY_PORTS = {6379, 8265, 10001, 52365, *range(10002, 20000)}


def _free_port() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port not in _RAY_PORTS:
            return port


@contextlib.contextmanager
def preserve_order() -> Iterator[None]:
    """Ray Data's `preserve_order` for the datasets built inside the block, restored afterwards.

    Blocks then leave each operator in input order, which keeps error lines in file order and the
    first N rows the first N.  It is not a row-order guarantee through every operator (an actor
    pool feeding a write has been seen to swap blocks): stages that must put values back on their
    rows carry the row's address instead (row_order.py)."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    previous, options.preserve_order = options.preserve_order, True
    try:
        yield
    finally:
        options.preserve_order = previous


def actor_pool(concurrency: int, *, gpu: bool = False) -> dict:
    """`map_batches` keyword arguments for a callable class on a pool of up to `concurrency` actors,
    each holding one CPU, and one GPU with `gpu`: the one way every stage sizes its actor pools.

    The pool starts with one actor and Ray Data adds actors while batches queue, so a small input
    (the embedded world's 256 eval pairs: one batch) does not pay for actors it cannot use; each
    actor start is a process that loads a tokenizer or models (seconds)."""
    from ray.data import ActorPoolStrategy

    return {"compute": ActorPoolStrategy(min_size=1, max_size=concurrency), "num_cpus": 1,
            "num_gpus": 1 if gpu else 0}
