#!/usr/bin/env bash
# one-off: cuDNN graph segfault diagnosis, then the GPU pass without cuDNN, all within ~400 s
OUT=$1
STEPS=build bash benchmarks/gpu_check.sh /tmp/build_out > $OUT/build_console.log 2>&1
tail -3 $OUT/build_console.log
{
for args in "pw bf16" "dw bf16" "pw_noact fp32"; do
    echo "=== $args (frontend log)"
    CUDNN_FRONTEND_LOG_INFO=1 CUDNN_FRONTEND_LOG_FILE=stderr timeout 25 python3 -X faulthandler benchmarks/results/gpu/2026-11-26-h100/pass2/cudnn_diag.py $args > /tmp/d.log 2>&1
    echo "rc=$?"
    tail -c 5000 /tmp/d.log
done
echo "=== pw bf16 under cuda-gdb"
timeout 60 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt --args python3 benchmarks/results/gpu/2026-11-26-h100/pass2/cudnn_diag.py pw bf16 2>&1 | grep -v "^\[New Thread\|^\[Thread\|^\[Detaching" | tail -c 20000
} > $OUT/diag.log 2>&1
grep -E "^===|check ->|run ok|rc=|Segmentation|^#[0-9]" $OUT/diag.log | cut -c 1-250 | head -50
echo "diag done at ${SECONDS}s"
LINATTN_CUDNN=0 STEPS="check bench-e2e bench-lite bench-conv" BUDGET_S=$((395 - SECONDS)) bash benchmarks/gpu_check.sh $OUT
