"""What each worker reads: the same seeded global batches everywhere, each rank keeping its slice.

Every worker streams the whole (order-preserved, materialised) split through Ray Data with a
per-epoch local shuffle seeded by (seed, epoch), cuts it into global batches of train.batch_size
rows, and keeps micro-step m's rows [(m W + rank) b, (m W + rank + 1) b).  The global batch of
step s is therefore a pure function of (data, seed, s): the same for 1 or N workers, and a restart
at step s skips exactly the s batches already used.  The final partial global batch of an epoch is
not used that epoch (drop_last), like a DistributedSampler with drop_last=True.
"""

from __future__ import annotations

import itertools
from typing import Any, Iterator


def split_global_batch(rows: dict[str, Any], *, rank: int, world_size: int, micro_batch_size: int) -> list[dict]:
    """This rank's micro-batches of one global batch: micro-step m takes rows
    [(m W + rank) b, (m W + rank + 1) b), so micro-step m of all W workers is one contiguous block."""
    steps = len(next(iter(rows.values()))) // (world_size * micro_batch_size)
    starts = [(m * world_size + rank) * micro_batch_size for m in range(steps)]
    return [{k: v[start : start + micro_batch_size] for k, v in rows.items()} for start in starts]


def iter_global_batches(iterator, *, batch_size: int, seed: int, epoch: int, shuffle_buffer: int,
                        skip: int = 0) -> Iterator[dict]:
    """Global batches of one epoch (drop_last: the final partial batch is not used this epoch)."""
    shuffle = {}
    if shuffle_buffer:  # a buffer smaller than a batch could not fill one batch with shuffled rows
        shuffle = {"local_shuffle_buffer_size": max(shuffle_buffer, batch_size),
                   "local_shuffle_seed": seed * 100_003 + epoch}
    batches = iterator.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True, **shuffle)
    return itertools.islice(batches, skip, None)


def iter_eval_micro_batches(iterator, *, rank: int, world_size: int, micro_batch_size: int,
                            max_rows: int = 0) -> Iterator[dict | None]:
    """This rank's eval micro-batches (None where the final block leaves it no rows)."""
    seen = 0
    for block in iterator.iter_batches(batch_size=world_size * micro_batch_size, batch_format="numpy"):
        n = len(next(iter(block.values())))
        if max_rows:
            n = min(n, max_rows - seen)
        if n <= 0:
            return
        seen += n
        start, stop = rank * micro_batch_size, min((rank + 1) * micro_batch_size, n)
        yield {k: v[start:stop] for k, v in block.items()} if start < stop else None
