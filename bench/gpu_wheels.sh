#!/usr/bin/env bash
# Fetch, on a machine with PyPI access, the wheels a bare GPU machine (Python 3.12, torch and
# transformers preinstalled, no internet) needs to run bench/ and the pipeline: into .whl/ (git-ignored).
# Versions are the ones this project is tested with on the CPU (.venv), so both run the same code.
#   bash bench/gpu_wheels.sh            # then carry .whl/ and install it there (bench/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || { echo "no .venv: run 'bash .ci/setup' first" >&2; exit 1; }
version() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }

pure=(trl datasets dill multiprocess transformers submitit vaderSentiment)
specs=()
for name in "${pure[@]}"; do specs+=("$name==$(version "$name")"); done
rm -rf .whl && mkdir -p .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${specs[@]}"
# DeepSpeed ships only a source distribution: build a pure-Python wheel (ops JIT-built on first use).
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
ls -1 .whl
du -sh .whl
