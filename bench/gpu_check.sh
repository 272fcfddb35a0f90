#!/usr/bin/env bash
# `make gpu-check`: on a machine with a CUDA GPU, the `gpu` tests and the GPU lines of the
# benchmarks, in under 8 minutes, then one summary. Each step has its own time limit, so one
# that hangs cannot eat the others' time; a step that fails is reported, not hidden.
set -u
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=$(mktemp -d)
summary=()
step() {  # step NAME LIMIT_S COMMAND...: run it, keep its output, record its exit status
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    summary+=("$name: exit $rc in $((SECONDS - t0))s")
}
echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi: not found"
$PY -c "import torch, onnxruntime as ort; print('torch', torch.__version__, 'cuda', torch.cuda.is_available()); print('onnxruntime', ort.__version__, ort.get_available_providers())"
step gpu-tests 300 $PY -m pytest -m gpu -rs -q -p no:cacheprovider
step learner-cuda 90 $PY bench/bench_learner.py --device cuda
step engine-cuda 90 $PY bench/bench_engine.py --skip-vectorbt --pairs 100 --repeats 3 --bt-sample 1
echo
echo "== summary"
grep -hE "^[0-9]+ (passed|failed|skipped)|passed|failed" "$OUT/gpu-tests.log" | tail -n 1
grep -h "GPU env steps/s" "$OUT/learner-cuda.log" || echo "learner: no GPU figure printed"
grep -h "torch_cuda" "$OUT/engine-cuda.log" || echo "engine: no torch_cuda line printed"
printf '%s\n' "${summary[@]}"
