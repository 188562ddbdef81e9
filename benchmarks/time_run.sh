#!/usr/bin/env bash
# Wall-clock of the default job from scratch, and where it went (issue 14).
#   bash benchmarks/time_run.sh [OUTPUT_DIR]
# Starts from an empty output directory so nothing is resumed; prints the run's timings.json as a
# table (the chain's phases, then one trial's phases averaged over the sweep), then the elapsed
# seconds last.
set -euo pipefail
out="${1:-$(mktemp -d)/default}"
rm -rf "$out"
start=$(date +%s)
robust-dpo run --output "$out"
end=$(date +%s)
python - "$out" <<'PY'
import json, sys
from pathlib import Path

from pipelines import timings

report = timings.read(Path(sys.argv[1]))
print(timings.markdown(report))
for name in ("world", "data", "evaluation"):
    child = timings.read(Path(sys.argv[1]) / name)
    if child:
        print(f"{name}: " + ", ".join(f"{k} {v:.1f} s" for k, v in child["phases"].items()))
PY
echo "robust-dpo run --output $out: $((end - start)) s on $(nproc) cores"
