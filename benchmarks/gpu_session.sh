#!/usr/bin/env bash
# The GPU checks in one command, for a machine with an NVIDIA GPU and a Python that has torch, timm and
# transformers (this checkout's src/ is put on the path; nothing is downloaded):
#
#     bash benchmarks/gpu_session.sh OUT_DIR            # at most about 9 minutes, by the limits below
#
# 1. gpu_check.py's CLI paths (in the background) and its per-model check, side by side: neither is timed;
# 2. then bench_gpu.py alone on the GPU, with the levers of our training step.
# Logs and JSON land in OUT_DIR as they are written, so a run cut short still leaves what it had.
# pycocotools (the detection task's metrics) is installed from .whl/ when that folder holds its wheel.
# A dry run of the script itself on the CPU: DEVICE=cpu BENCH_ARGS="--pairs cvt_13 --batch 2 --rounds 2" (the
# limits PATHS_LIMIT, MODELS_LIMIT, BENCH_LIMIT in seconds).
set -uo pipefail
out=${1:?usage: gpu_session.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --target /tmp/hz-site .whl/*.whl && export PYTHONPATH=/tmp/hz-site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
# the console script, where pip can install the checkout without a network; `python -m hybridzoo` otherwise
$py -m pip install -q --no-index --no-deps --no-build-isolation -e . >"$out/pip.log" 2>&1 || echo "note: no console script"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.used --format=csv,noheader || true
(timeout "${PATHS_LIMIT:-300}" $py benchmarks/gpu_check.py --device "${DEVICE:-cuda}" --sections paths --out "$out/paths.json" >"$out/paths.log" 2>&1
 echo "paths exit $?" >>"$out/paths.log") &
timeout "${MODELS_LIMIT:-200}" $py benchmarks/gpu_check.py --device "${DEVICE:-cuda}" --sections models --out "$out/models.json" 2>&1 \
    | tee "$out/models.log" | grep -v "^ok "
echo "models exit ${PIPESTATUS[0]} (124: cut at MODELS_LIMIT; $(grep -c '^ok ' "$out/models.log") models ok)"
wait
cat "$out/paths.log"
timeout "${BENCH_LIMIT:-240}" $py benchmarks/bench_gpu.py --device "${DEVICE:-cuda}" --round-seconds 0.25 ${BENCH_ARGS:-} \
    --out "$out/bench_gpu.json" 2>&1 \
    | tee "$out/bench_gpu.log"
echo "bench exit ${PIPESTATUS[0]} (124: cut at BENCH_LIMIT)"
