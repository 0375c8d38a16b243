#!/usr/bin/env bash
# One smoke-and-measure run of every training path on this machine's first GPU (benchmarks/gpu_smoke.py):
# wav2vec2-base-shaped random models, synthetic audio with IEMOCAP's durations (~4,650 utterances), one
# V-FT epoch, 50 TAPT steps, 50 P-TAPT steps (+ steps a/b), k-means K=4,096 on 1M frames, V-FT steps on
# one batch of 64 x 10 s (varied real lengths: the masked attention kernel) without checkpointing (peak
# memory), a 2-process DDP epoch and the DEFAULT config on every visible GPU when two GPUs exist, the
# precision that auto / auto-bf16 resolve to (with the compute capability), and TAPT's peak memory at
# 250 s per step vs 2 x 125 s accumulated. No downloads. Prints a table; writes one JSON (default
# runs/bench/gpu.json); exits 1 when a stage failed. Without a GPU (or with --tiny) every shape is tiny:
# seconds on a CPU (tests/test_benchmarks.py runs it so). Budget: 10 minutes (the `timeout` below, which
# stops the whole process group; the multi-process stages kill their own groups on their timeouts).
#
#   bash benchmarks/gpu.sh [--tiny] [--out FILE] [--workdir DIR] [--only vft tapt ...] [key=value ...]
#   PYTHON=/path/to/python bash benchmarks/gpu.sh     # another interpreter than ./.venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PY" ]; then PY="$(command -v python3)"; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${MMSER_GPU_SMOKE_TIMEOUT:-600}" "$PY" benchmarks/gpu_smoke.py "$@"
