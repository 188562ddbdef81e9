#!/usr/bin/env bash
# Wall-clock of one default-world trial as a user types it (issue 14): `robust-dpo train` of dpo
# with `robust-dpo run`'s trial settings (32 steps of 64 pairs) on the world and data of a finished
# run, from a fresh output folder; prints the stage's timings.json phases, then the elapsed seconds.
#   bash benchmarks/time_train.sh RUN_DIR [OUTPUT_DIR]
set -euo pipefail
run="${1:?usage: time_train.sh RUN_DIR [OUTPUT_DIR] (RUN_DIR: the --output of a finished robust-dpo run)}"
out="${2:-$(mktemp -d)/train}"
rm -rf "$out"
start=$(date +%s.%N)
robust-dpo train --output "$out" model.path="$run/world/reference_model" data.path="$run/data" \
  objective.name=dpo objective.beta=0.1 train.lr=2e-3 train.batch_size=64 train.micro_batch_size=64 \
  train.epochs=2 train.checkpoint_every=16 train.warmup_steps=2 train.max_grad_norm=1.0
end=$(date +%s.%N)
python - "$out" <<'PY'
import sys
from pathlib import Path

from pipelines import timings

report = timings.read(Path(sys.argv[1]))
print(f"train stage: {report['total_seconds']:.1f} s inside the stage")
for name, seconds in report["phases"].items():
    print(f"  {name:<48} {seconds:6.1f} s")
PY
python -c "print(f'robust-dpo train --output $out: {$end - $start:.1f} s wall on $(nproc) cores')"
