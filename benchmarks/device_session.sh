#!/bin/bash
# One-shot GPU session (run on the lent GPU machine, in the repository root, with .whl/ and .device/ from
# benchmarks/device_prepare.sh carried along). Writes under $OUT (default ./device-out):
#   gpu_info.txt     card, driver, torch / triton / onnxruntime versions
#   gpu_tests.log    the GPU-marked tests
#   gpu_bench.json   benchmarks/bench_gpu.py on the wholeBody 1.5 mm phantom (+ .log)
#   gpu_profile.txt  where one segrt run spends its GPU time (torch.profiler, top kernels)
#   io.json          benchmarks/bench_io.py on the host's cores (ISA-L vs rapidgzip at 2..16 threads) (+ .log)
# Budget: at most 150 + 320 + 90 s (one device call is limited to 600 s; BENCH_ARGS changes the cases).
set -uo pipefail
OUT="${OUT:-./device-out}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_info.txt"
python3 -c "import torch, triton, onnxruntime, platform; print(platform.python_version(), torch.__version__, \
triton.__version__, onnxruntime.__version__)" | tee -a "$OUT/gpu_info.txt"
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a "$OUT/gpu_info.txt"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -p no:cacheprovider -q -rs -m gpu \
    tests/test_backends.py tests/test_gpu_pipeline.py tests/test_triton_kernels.py tests/test_engine_device.py \
    tests/test_volume_read.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout "${BENCH_TIMEOUT:-320}" python3 benchmarks/bench_gpu.py --bundle .device/wholeBody_ct_segmentation \
    --runs 2 --work /tmp/bench-gpu-work --out "$OUT/gpu_bench.json" --profile "$OUT/gpu_profile.txt" \
    ${BENCH_ARGS:---gpu-batch 4 8 16} \
    2>&1 | grep -v -i warn | tee "$OUT/gpu_bench.log" | tail -45
timeout "${IO_TIMEOUT:-90}" python3 benchmarks/bench_io.py --repeats 2 --out "$OUT/io.json" 2>&1 \
    | tee "$OUT/io.log" | tail -22
