#!/usr/bin/env bash
# Wall-clock of the default job (issue 5's <= 10 min target on a 2-core CPU machine).
#   bash benchmarks/time_run.sh [OUTPUT_DIR]
# Starts from an empty output directory so nothing is resumed, prints the elapsed seconds last.
set -euo pipefail
out="${1:-$(mktemp -d)/default}"
rm -rf "$out"
start=$(date +%s)
robust-dpo run --output "$out"
end=$(date +%s)
echo "robust-dpo run --output $out: $((end - start)) s on $(nproc) cores"
