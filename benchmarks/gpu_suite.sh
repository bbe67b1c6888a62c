#!/usr/bin/env bash
# GPU readiness suite: the two GPU numbers to check on a new machine or cluster node.
#
#   bash benchmarks/gpu_suite.sh [OUTPUT_DIR]          # default OUTPUT_DIR: runs/gpu_suite
#
# 1. benchmarks/mimic_overhead.py: one training step of ViT-B-32 at a per-GPU batch of 256 in
#    bf16 autocast on one GPU, plain vs with exact mimic scores + re-weighting vs the torch.func
#    per-sample-gradient baseline          -> OUTPUT_DIR/mimic_overhead.json
# 2. benchmarks/train_throughput.py: samples/s of plain torchrun DDP vs raymimic on Ray Train
#    (plain and with Grad-Mimic), one worker per GPU, 256 per GPU, bf16 -> OUTPUT_DIR/train_throughput.json
#
# Also writes nvidia-smi.txt and environment.json. Environment overrides: PYTHON (interpreter,
# default python, else python3), MODEL (ViT-B-32), BATCH (per-GPU batch, 256), WORKERS (GPUs used by the
# throughput run, default all visible), STEPS/WARMUP_STEPS (20/10), REPEATS (10).
# Exits non-zero with a message when no usable NVIDIA GPU is present. Needs Ray (the throughput run);
# on one bare GPU machine without Ray, run benchmarks/gpu_check.py instead (docs/cluster.md).
set -euo pipefail

OUT="${1:-runs/gpu_suite}"
PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
MODEL="${MODEL:-ViT-B-32}"
BATCH="${BATCH:-256}"
STEPS="${STEPS:-20}"
WARMUP_STEPS="${WARMUP_STEPS:-10}"
REPEATS="${REPEATS:-10}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

fail() {
  echo "gpu_suite.sh: $*" >&2
  exit 1
}

# -- is there a GPU, and can PyTorch use it? -----------------------------------------------
command -v nvidia-smi >/dev/null 2>&1 || fail "no GPU: nvidia-smi is not installed (run this suite on a machine with an NVIDIA GPU)"
nvidia-smi -L >/dev/null 2>&1 || fail "no GPU: nvidia-smi fails (no NVIDIA GPU or driver on this machine): $(nvidia-smi -L 2>&1 | head -1)"
NGPU="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null)" \
  || fail "cannot import torch with $PYTHON (activate the project's environment or set PYTHON)"
[ "$NGPU" -ge 1 ] \
  || fail "torch.cuda.is_available() is False although nvidia-smi sees a GPU (CPU-only PyTorch build or a driver/CUDA mismatch)"
WORKERS="${WORKERS:-$NGPU}"
[ "$WORKERS" -le "$NGPU" ] || fail "WORKERS=$WORKERS but PyTorch sees only $NGPU GPU(s)"

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$REPO"
export RAY_USAGE_STATS_ENABLED="${RAY_USAGE_STATS_ENABLED:-0}"

nvidia-smi >"$OUT/nvidia-smi.txt"
"$PYTHON" - "$OUT/environment.json" <<'EOF'
import json, platform, sys

import torch

info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "bf16_supported": torch.cuda.is_bf16_supported()}
try:
    import ray
    info["ray"] = ray.__version__
except ImportError:
    pass
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=2)
print("environment:", info)
EOF

echo "== mimic overhead: $MODEL, batch $BATCH, bf16, 1 GPU"
"$PYTHON" benchmarks/mimic_overhead.py --models "$MODEL" --batch "$BATCH" --device cuda --precision bf16 \
  --repeats "$REPEATS" --json "$OUT/mimic_overhead.json"

echo "== training throughput: $MODEL, $WORKERS GPU worker(s) x $BATCH, bf16"
"$PYTHON" benchmarks/train_throughput.py --gpu --precision bf16 --model "$MODEL" --workers "$WORKERS" \
  --global-batch "$((BATCH * WORKERS))" --steps "$STEPS" --warmup-steps "$WARMUP_STEPS" --threads 4 \
  --json "$OUT/train_throughput.json"

echo "gpu suite done: $OUT/mimic_overhead.json $OUT/train_throughput.json"
