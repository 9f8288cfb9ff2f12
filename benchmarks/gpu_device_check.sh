#!/usr/bin/env bash
# The GPU checks of a lent device machine (issue #10), as one command: the Triton kernels' tests and the tiny
# packed models on CUDA (pytest -m gpu plus the kernel files, whose CPU-tensor tests run on CUDA there), then
# benchmarks/gpu_kernels.py. Uses the machine's own python3/torch/triton; the C++ CPU extension is not built.
# Logs and the JSON go to $OUT (the device tool's folder), else to ./gpu-out.
set -o pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
export MOEQUANT_NO_EXT=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/env.txt"
python3 -c "import sys, torch, triton, transformers; print(sys.version.split()[0], torch.__version__, triton.__version__, transformers.__version__)" | tee -a "$out/env.txt"
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/gpu_kernels.py --sweep --json "$out/gpu_kernels.json" 2>&1 | tee "$out/bench.log"
echo "bench rc=$?"
# -k: the sm_90 ahead-of-time compile checks are CI's (no GPU needed); here the kernels compile for real
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -v -p no:cacheprovider -m "gpu or not slow" --timeout 120 \
    --durations=10 -k "not compile_for_sm90" tests/nn/test_cuda_models.py tests/kernels/test_triton_uniform.py \
    tests/kernels/test_triton_trellis.py tests/kernels/test_triton_trellis_grouped.py > "$out/pytest.log" 2>&1
rc=$?
echo "pytest rc=$rc"
grep -E "FAILED|ERROR|passed|failed" "$out/pytest.log" | tail -30
exit $rc
