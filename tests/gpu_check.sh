#!/usr/bin/env bash
# The checks that need a GPU, in one short run (under 8 minutes on one recent GPU) for a machine with CUDA:
#   1. the tests marked gpu (tests/test_gpu.py): ORT CUDA provider really active, IOBinding, CUDA parity with TF32
#      off, calibration on CUDA against CPU, torchrun --nproc-per-node 1 with nccl through snapshots (and two GPUs
#      against one process, when there are two);
#   2. tests/benchmarks/bench_calibrate.py on CUDA (ema and exact);
#   3. tests/benchmarks/bench_export.py on CUDA (wall and latency; peers and the stability part left out);
#   4. bnport demo scored on CUDA (the ORT CUDA provider with IOBinding, end to end);
#   5. tests/benchmarks/bench_precision.py on CUDA (FP16 and INT8 latency and cosine against float32).
# Usage, from anywhere: bash tests/gpu_check.sh   (PYTHON=... picks the interpreter; default: python)
# Prints the date and device first, so the figures can be recorded as they are; exit status 0 only when every part
# ran and passed.
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
    || echo "(no nvidia-smi)"
if ! "$PY" -c "from bnport.runtime.device import cuda_works; ok, why = cuda_works(); print('torch CUDA:', why)
raise SystemExit(0 if ok else 1)"; then
    echo "gpu_check: torch cannot use CUDA here; nothing run"
    exit 2
fi
"$PY" -c "import torch, onnxruntime as ort
print('torch', torch.__version__, '| onnxruntime', ort.__version__, ort.get_available_providers())"

echo "== 1. tests marked gpu"
# -rs lists skips: on a CUDA machine only the two-GPU test may skip (when there is one GPU)
timeout 240 "$PY" -m pytest -q -rs -m gpu tests/test_gpu.py || status=1

echo "== 2. bench_calibrate on CUDA"
for mode in ema exact; do
    timeout 60 "$PY" tests/benchmarks/bench_calibrate.py --device cuda --mode "$mode" --batches 40 --batch-size 64 \
        || status=1
done

echo "== 3. bench_export on CUDA"
if "$PY" tests/benchmarks/bench_export.py --help | grep -q -- "--device"; then
    timeout 150 "$PY" tests/benchmarks/bench_export.py --device cuda --skip-peers --skip-stability || status=1
else
    echo "bench_export.py has no --device option yet: not run on CUDA"
    status=1
fi

echo "== 4. bnport demo with scoring on CUDA (ORT CUDA provider, IOBinding)"
demo_out="$(mktemp -d)"
timeout 180 "$PY" -m bnport demo --out "$demo_out/demo" --device cuda | tail -25 || status=1
grep -q CUDAExecutionProvider "$demo_out/demo/score/table.txt" || { echo "scoring did not run on CUDA"; status=1; }
rm -rf "$demo_out"

echo "== 5. bench_precision on CUDA (FP16 and INT8 latency against float32)"
timeout 150 "$PY" tests/benchmarks/bench_precision.py --device cuda --models iresnet50 || status=1

if [ "$status" -eq 0 ]; then
    echo "== gpu_check: all parts ran and passed"
else
    echo "== gpu_check: FAILED or incomplete (see above)"
fi
exit "$status"
