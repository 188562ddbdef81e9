"""Load (issue 12 item 7): `robust-dpo data` on N generated pairs, the driver's peak memory and wall time.

    python -m benchmarks.data_load --workdir runs/load --pairs 200000,20000 --tokenizer runs/w/tokenizer

For each N: a seeded JSONL of N pairs (prompts and responses of 4-24 words from the tokenizer's own
vocabulary, a few malformed rows mixed in so the rejected-row path runs at scale too), then the data
stage as a user runs it (`--on-invalid skip`), its driver process sampled every 0.1 s: VmHWM (the
kernel's peak resident set of that one process; Ray's daemons and workers are other processes), and
the peaks of its private memory (RssAnon) and of the object store's shared pages it has mapped
(RssShmem: blocks the driver reads are mapped from the store, zero-copy, and count in its resident
set while mapped).
The driver's memory must not grow with N: the split is written in source order by streaming sorted
batches (row_order.write_in_source_order), never collected on the driver.  Checked per N: exit 0 and
rows_in == rows_written + rows_rejected, with rows_rejected the number of malformed rows planted.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

BAD_EVERY = 10_000  # one malformed row per this many


def write_pairs(path: Path, n: int, words: list[str], seed: int = 0) -> int:
    """N rows of JSONL; returns how many are malformed (identical responses or broken JSON)."""
    rng = random.Random(seed)
    bad = 0
    with path.open("w") as f:
        for i in range(n):
            if i % BAD_EVERY == BAD_EVERY - 1:
                bad += 1
                f.write('{"prompt": "truncated", "chosen": \n' if bad % 2 else
                        json.dumps({"prompt": "same", "chosen": " a", "rejected": " a"}) + "\n")
                continue
            prompt, chosen, rejected = (" ".join(rng.choices(words, k=rng.randint(4, 24))) for _ in range(3))
            f.write(json.dumps({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}) + "\n")
    return bad


def _memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak resident set), RssAnon (private memory now), RssShmem (shared memory mapped now:
    the object store's pages the process has touched) of process `pid`, in KiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmHWM", "RssAnon", "RssShmem"):
                out[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def measure(workdir: Path, n: int, tokenizer: str) -> dict:
    from transformers import AutoTokenizer

    words = [w for w in AutoTokenizer.from_pretrained(tokenizer).get_vocab() if w.isalnum()][:5000]
    source = workdir / f"pairs_{n}.jsonl"
    bad = write_pairs(source, n, words)
    out = workdir / f"data_{n}"
    shutil.rmtree(out, ignore_errors=True)
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "pipelines", "data", "--dataset", str(source), "--tokenizer",
                                tokenizer, "--output", str(out), "--on-invalid", "skip"], cwd=workdir,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"VmHWM": 0, "RssAnon": 0, "RssShmem": 0}
    while process.poll() is None:
        for name, kib in _memory_kib(process.pid).items():
            peak[name] = max(peak[name], kib)
        time.sleep(0.1)
    seconds = time.monotonic() - started
    log = process.stdout.read()
    stats = json.loads((out / "data_stats.json").read_text()) if process.returncode == 0 else {}
    written = sum(stats.get("rows_written", {}).values())
    return {"pairs": n, "exit": process.returncode, "seconds": round(seconds, 1), "driver_peak_mib": round(peak["VmHWM"] / 1024),
            "driver_private_peak_mib": round(peak["RssAnon"] / 1024),
            "driver_shared_peak_mib": round(peak["RssShmem"] / 1024),
            "rows_in": stats.get("rows_in"), "rows_written": written, "rows_rejected": stats.get("rows_rejected"),
            "planted_bad_rows": bad, "input_mib": round(source.stat().st_size / 2**20, 1),
            "balanced": stats.get("rows_in") == written + stats.get("rows_rejected", -1) == n
            and stats.get("rows_rejected") == bad, "log_tail": log.strip().splitlines()[-3:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--pairs", default="200000,20000", help="comma-separated N")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer folder (e.g. a world's runs/w/tokenizer)")
    args = parser.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = str(Path(args.tokenizer).resolve()) if Path(args.tokenizer).exists() else args.tokenizer
    results = [measure(workdir, int(n), tokenizer) for n in args.pairs.split(",")]
    print(json.dumps(results, indent=2))
    return 0 if all(r["exit"] == 0 and r["balanced"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
