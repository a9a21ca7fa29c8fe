#!/usr/bin/env bash
# One GPU session's measurements, as a single command on a bare GPU machine (no internet):
# install the carried wheels (.whl/, made by bench/gpu_wheels.sh), record the environment, run
# bench/speed.py with the given arguments, and leave JSON + logs in $OUT (or ./gpu-out).
#   bash bench/gpu_session.sh --only dpo,sft            # first call: training workloads
#   bash bench/gpu_session.sh --only gen,reward,eval    # second call: sampling, reward, eval
#   bash bench/gpu_session.sh whole [--set a.b=v ...]   # the whole experiment (bench/whole_run.py)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, transformers, trl, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'| transformers', transformers.__version__, '| trl', trl.__version__, '| datasets', datasets.__version__)"
  python3 -m pip show pyarrow fsspec 2>/dev/null | grep -E '^(Name|Version)'
} 2>&1 | tee "$out/environment.txt"
if [ "${1:-}" = whole ]; then
  shift
  python3 bench/whole_run.py --run-dir /tmp/whole-run --out "$out/whole_run.json" "$@" 2>&1 | tee "$out/whole_run.log"
  exit "${PIPESTATUS[0]}"
fi
tag=$(echo "$*" | tr -c 'a-z0-9' '_' | sed 's/__*/_/g; s/^_//; s/_$//')
python3 bench/speed.py --out "$out/speed${tag:+_$tag}.json" "$@" 2>&1 | tee "$out/speed${tag:+_$tag}.log"
