"""The console every stage shares: its own short lines, progress with an ETA, Ray's logs kept in a file.

- `say(stage, message)` prints `[stage 12s] message` on stdout (errors go to stderr through
  `UserError` / the CLI), the seconds counted from the command's start.
- `Progress(stage, label, total)` is a tqdm bar on a terminal; elsewhere (a pipe, a CI log) it is
  one line per update at most every `min_interval` seconds plus the last one, formatted by
  `tqdm.format_meter` (`trials: 3/7 [00:42<00:56, ...]`), so a log holds a bounded number of lines.
- `own_terminal(log_dir)` (the CLI entry point, unless `--verbose`) moves file descriptors 1 and 2 to
  `log_dir/console.log`, so whatever Ray's C++ core, Tune's tables, library warnings or child
  processes print lands there; the stage's own lines keep the terminal (`out()`, `err()`).
- `quiet_ray(log_dir)` sends what Ray's own loggers print on the driver (Ray Data's execution lines,
  Tune's trial tables, Train's controller lines) to `log_dir/ray.log` instead of the console; with
  `--verbose` nothing is redirected.  Worker stdout is not forwarded to the driver unless verbose
  (`ray_session.ensure_ray(log_to_driver=...)`); Ray keeps the workers' own files in its session
  folder, linked from `log_dir/ray_session`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

_STARTED = time.monotonic()
VERBOSE_ENV = "ROBUST_DPO_VERBOSE"  # set by `--verbose`; read by workers' parents and stages alike
_TERMINAL: dict[str, TextIO] = {}  # the real stdout/stderr once own_terminal() moved fds 1 and 2


def out() -> TextIO:
    """Where the stage's own lines go: the terminal's stdout (also after own_terminal)."""
    return _TERMINAL.get("out", sys.stdout)


def err() -> TextIO:
    """Where error lines go: the terminal's stderr (also after own_terminal)."""
    return _TERMINAL.get("err", sys.stderr)


def own_terminal(log_dir: str | Path) -> None:
    """Send everything else written to file descriptors 1 and 2 (Ray's C++ core, Tune's tables,
    library warnings, child processes) to `log_dir/console.log`; `say`, `Progress`, `out()` and
    `err()` keep writing to the terminal.  Only the CLI entry point calls it, and not with --verbose."""
    if verbose() or _TERMINAL:
        return
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    _TERMINAL["out"] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    _TERMINAL["err"] = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    fd = os.open(Path(log_dir) / "console.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") == "1"


def restart_clock() -> None:
    """Count `say`'s seconds from now (the CLI calls it when a command starts)."""
    global _STARTED
    _STARTED = time.monotonic()


def elapsed() -> float:
    return time.monotonic() - _STARTED


def say(stage: str, message: str, *, stream: TextIO | None = None) -> None:
    """One console line of a stage: `[stage 12s] message`."""
    print(f"[{stage} {elapsed():.0f}s] {message}", file=stream or out(), flush=True)


class Progress:
    """Progress of one phase: a tqdm bar on a terminal, rate-limited plain lines elsewhere.

    `label` is what is counted (`trials`, `steps`), `total` how many (None: unknown); plain lines come
    at most every `min_interval` seconds, and the final one always."""

    def __init__(self, stage: str, label: str, total: int | None, *, min_interval: float = 15.0,
                 stream: TextIO | None = None) -> None:
        from tqdm import tqdm

        self.stage, self.label, self.total = stage, label, total
        self.stream = stream or out()
        self.n, self.started, self.last_line = 0, time.monotonic(), -float("inf")
        self.min_interval = min_interval
        self.postfix = ""
        self._format = tqdm.format_meter
        self.bar = (tqdm(total=total, desc=f"[{stage}] {label}", file=self.stream, leave=True, dynamic_ncols=True)
                    if _isatty(self.stream) else None)

    def update(self, n: int = 1, *, postfix: str = "") -> None:
        """Count `n` more done; `postfix` is a short note (e.g. the running trials' steps)."""
        self.n += n
        self.postfix = postfix or self.postfix
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix_str(postfix)
            return
        now = time.monotonic()
        if now - self.last_line >= self.min_interval or (self.total is not None and self.n >= self.total):
            self._line(now)

    def note(self, postfix: str) -> None:
        """Change the note without counting anything (printed at the next allowed line)."""
        self.update(0, postfix=postfix)

    def _line(self, now: float) -> None:
        self.last_line = now
        meter = self._format(self.n, self.total, now - self.started, prefix=self.label)
        suffix = f" | {self.postfix}" if self.postfix else ""
        say(self.stage, meter + suffix, stream=self.stream)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __reduce__(self):
        # Tune pickles its callbacks with the experiment state; a terminal stream does not pickle,
        # and a restored copy only needs to know what it counts.
        return (Progress, (self.stage, self.label, self.total), None)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def quiet_libraries() -> None:
    """No per-file progress bars from transformers / huggingface_hub (model saves and loads)."""
    if verbose():
        return
    try:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        disable_progress_bars()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


RAY_LOGGERS = ("ray", "ray.data", "ray.tune", "ray.train", "ray.air", "ray.util")


def quiet_ray(log_dir: str | Path | None) -> None:
    """Send Ray's driver-side log output to `log_dir/ray.log` (nothing is changed when verbose)."""
    if verbose() or log_dir is None:
        return
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / "ray.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            if isinstance(old, logging.StreamHandler) and not isinstance(old, logging.FileHandler):
                logger.removeHandler(old)
        if not any(getattr(h, "baseFilename", None) == str(path.resolve()) for h in logger.handlers):
            logger.addHandler(handler)
        logger.propagate = False
    _link_ray_session(log_dir)


def _link_ray_session(log_dir: Path) -> None:
    """`log_dir/ray_session` -> this Ray session's log folder (worker stdout/stderr live there)."""
    try:
        import ray

        if not ray.is_initialized():
            return
        session = Path(ray._private.worker.global_worker.node.get_session_dir_path()) / "logs"
    except Exception:  # noqa: BLE001 - a link is a convenience; never fail a stage over it
        return
    link = log_dir / "ray_session"
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(session, target_is_directory=True)
    except OSError:
        pass
