#!/usr/bin/env bash
# The checks that need a GPU, in one run of at most 8 minutes (the timeouts add up to 470 s) on one recent GPU, for a machine with CUDA; each part has
# its own timeout, so one that hangs cannot eat the others' time:
#   1. the tests marked gpu (tests/test_gpu.py): ORT CUDA provider really active, each session use's provider options,
#      IOBinding, CUDA parity with TF32 off, calibration on CUDA against CPU, torchrun with nccl through snapshots;
#   2. tests/benchmarks/bench_calibrate.py on CUDA, ema and exact, at 40 and 160 batches (goals: ema >= 0.90, exact
#      >= 0.85 of the raw forward at both);
#   3. tests/benchmarks/bench_score.py on CUDA, 5 iresnet50 files (goal: bnport / floor <= 1.10; session start-up on
#      its own line);
#   4. tests/benchmarks/bench_export.py on CUDA (wall and latency; peers and the stability part left out);
#   5. bnport demo scored on CUDA (the ORT CUDA provider with IOBinding, end to end);
#   6. tests/benchmarks/bench_precision.py on CUDA (FP16 and INT8 latency and cosine against float32, no cuDNN error;
#      INT8 on the CUDA provider said to be slow unless TensorRT loads).
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
timeout 100 "$PY" -m pytest -q -rs -m gpu tests/test_gpu.py || status=1

echo "== 2. bench_calibrate on CUDA"
for mode in ema exact; do
    timeout 45 "$PY" tests/benchmarks/bench_calibrate.py --device cuda --mode "$mode" --batches 40,160 \
        --batch-size 64 --repeats 2 || status=1
done

echo "== 3. bench_score on CUDA (5 iresnet50 files)"
timeout 70 "$PY" tests/benchmarks/bench_score.py --device cuda --model iresnet50 --models 5 --pairs 1500 \
    --snapshots 0 || status=1

echo "== 4. bench_export on CUDA"
timeout 50 "$PY" tests/benchmarks/bench_export.py --device cuda --skip-peers --skip-stability || status=1

echo "== 5. bnport demo with scoring on CUDA (ORT CUDA provider, IOBinding)"
demo_out="$(mktemp -d)"
timeout 70 "$PY" -m bnport demo --out "$demo_out/demo" --device cuda | tail -25 || status=1
grep -q CUDAExecutionProvider "$demo_out/demo/score/table.txt" || { echo "scoring did not run on CUDA"; status=1; }
rm -rf "$demo_out"

echo "== 6. bench_precision on CUDA (FP16 and INT8 latency against float32)"
precision_log="$(mktemp)"
timeout 90 "$PY" tests/benchmarks/bench_precision.py --device cuda --models iresnet50 2>&1 | tee "$precision_log" \
    || status=1
cudnn_errors=$(grep -c "cudnn_frontend.*Error" "$precision_log")
echo "cuDNN frontend errors while timing FP16/INT8: $cudnn_errors"
[ "$cudnn_errors" -eq 0 ] || status=1
rm -f "$precision_log"

if [ "$status" -eq 0 ]; then
    echo "== gpu_check: all parts ran and passed"
else
    echo "== gpu_check: FAILED or incomplete (see above)"
fi
exit "$status"
