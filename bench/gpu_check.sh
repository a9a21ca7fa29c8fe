#!/usr/bin/env bash
# GPU check (not part of CI), one GPU, no internet: GPT-2 Large from its config, a few SFT and DPO
# steps in bf16 under ZeRO-2, interrupted by SIGUSR2, resumed; prints step times and peak memory.
# On a machine without trl/datasets/deepspeed, install them first (wheels, see README).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] && python=.venv/bin/python
exec "$python" bench/gpu_check.py --out "${1:-/tmp/slurm-dpo-gpu-check}" "${@:2}"
