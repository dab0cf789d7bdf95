#!/usr/bin/env bash
# The prepared one-command device run, from the repository root:
#
#     bash benchmarks/gpu_run.sh [gpu_bench options, e.g. --budget 240 --only graphs]
#
# Writes under $OUT (default benchmarks/results):
#   env.txt         date, nvidia-smi, python / torch / CUDA / transformers / triton versions,
#                   nproc, /proc/meminfo, free disk
#   log.txt         everything the bench prints (per-row lines, then the table)
#   gpu_bench.json  every row so far, rewritten after each; "complete": true at the end
#   gpu_bench.md    the same as tables
#
# The bench's budget (default 420 s) counts from this script's start, so env.txt's seconds are
# included. Exit status: the bench's (0 done, 3 stopped at the budget with the rows so far on
# disk, 2 no CUDA device).
set -u
start=$(date +%s)
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
{
  echo "== date"; date -u
  echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi not found"
  echo "== versions"
  python - <<'EOF' 2>&1
import platform
import torch
print("python", platform.python_version())
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
for name in ("transformers", "triton", "numpy", "safetensors"):
    try:
        print(name, __import__(name).__version__)
    except Exception as error:  # a missing package is worth a line, not a failed run
        print(name, "not importable:", type(error).__name__)
EOF
  echo "== nproc"; nproc
  echo "== /proc/meminfo"; cat /proc/meminfo
  echo "== disk"; df -h . /tmp 2>&1
} > "$OUT/env.txt"
python -m benchmarks.gpu_bench --out "$OUT" --since "$start" "$@" 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
