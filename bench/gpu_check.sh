#!/usr/bin/env bash
# The GPU check in one command, for a lent GPU machine (bench/README.md, "The GPU check").
# Installs the wheels carried in .whl/ (DeepSpeed, rwkv, flash-linear-attention and the
# dependencies the machine lacks) into /tmp/site, then runs bench/gpu_check.py, which writes
# gpu_check.log, gpu_check.json and bench_gpu.json to $OUT (default out/gpu_check).
# Extra arguments go to gpu_check.py (e.g. --steps build,tests --budget 300).
set -u
cd "$(dirname "$0")/.."
out="${OUT:-out/gpu_check}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "error: installing .whl/*.whl failed (see above)"; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
exec python3 bench/gpu_check.py --out "$out" "$@"
