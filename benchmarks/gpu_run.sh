#!/usr/bin/env bash
# One device call for the GPU table (benchmarks/RESULTS.md, "GPU results"): wheels from .whl/ (see
# the runbook there), versions, then the qwen0.5b preset with our levers beside TRL default and our
# objectives beside TRL without gradient checkpointing.  JSON and log land in $OUT (or ./out).
#   bash benchmarks/gpu_run.sh [extra throughput.py flags]
set -uo pipefail
out="${OUT:-out}"
mkdir -p "$out"
site=/tmp/site
wheels=(.whl/trl-*.whl .whl/datasets-*.whl .whl/dill-*.whl .whl/multiprocess-*.whl)
# datasets 5.2 needs pyarrow >= 24; carry its wheel and install it only where the image's is older.
if ! python3 -c "import sys, pyarrow; sys.exit(int(pyarrow.__version__.split('.')[0]) < 24)" 2>/dev/null; then
  wheels+=(.whl/pyarrow-*.whl)
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}" || exit 1
export PYTHONPATH="$site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, transformers, accelerate, trl, pyarrow; print('torch', torch.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'trl', trl.__version__, 'pyarrow', pyarrow.__version__, torch.cuda.get_device_name())" || exit 1
phases="trl,ours:dpo,ours:dpo:plain,ours:dpo:head,ours:dpo:packed;trl_no_gc,ours:dpo,ours:kldpo,ours:radpo1,ours:wdpo,ours:dora"
python3 -m benchmarks.throughput --preset qwen0.5b --phases "$phases" --json --output "$out/qwen05b.json" "$@" \
  > "$out/qwen05b.log" 2>&1
status=$?
grep -v -i "warn" "$out/qwen05b.log" | tail -20
exit $status
