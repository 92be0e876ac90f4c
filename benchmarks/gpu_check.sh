#!/usr/bin/env bash
# The whole GPU pass in one command: build, GPU tests (triton and cuda backends), compute-sanitizer
# over every kernel, benchmarks. Everything it produces goes into OUT_DIR; a summary is printed last.
# usage: bash benchmarks/gpu_check.sh OUT_DIR
# STEPS="build pytest bench-lite-mla" runs only the named steps (a step's name, or the start of one, e.g.
# "sanitizer" or "bench"), so a pass can be split over calls with a time limit; build runs whenever named.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
status=()
selected() {  # selected NAME: is NAME (or a prefix of it) in STEPS, or is STEPS unset
    [[ -z ${STEPS:-} ]] && return 0
    local want
    for want in $STEPS; do [[ $1 == "$want"* ]] && return 0; done
    return 1
}
step() {  # step NAME CMD...: run, log to OUT/NAME.log, remember the exit code
    local name=$1; shift
    selected "$name" || return 0
    echo "== $name: $*"
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    status+=("$name=$rc")
    tail -n 5 "$OUT/$name.log"
}

export LINATTN_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
step build python -m pip install --no-deps --no-build-isolation -e .
step info python -m linattn info
step check python -m linattn check
step pytest python -m pytest -rs --junitxml="$OUT/pytest.xml"
# small shapes on every backend: what `check` runs, under the sanitizer's tools
for tool in memcheck racecheck initcheck; do
    step "sanitizer-$tool" compute-sanitizer --tool "$tool" --error-exitcode 1 python -m linattn check
done
# max-autotune re-tunes every shape and dtype: keep it for a longer run (BENCH_ARGS="" runs every provider)
step bench-linear-attention python benchmarks/bench_linear_attention.py --out "$OUT/results" ${BENCH_ARGS---providers eager compile triton cuda}
# LiteMLA ops and block over every LiteMLA of DESIGN.md 5 at B=16 and B=1, bf16, forward (their GPU defaults).
# compile-max-autotune re-tunes every shape (tens of seconds each): only at B=16, so its speedup column is empty
# at B=1. MLA_BENCH_ARGS replaces these options in both (e.g. MLA_BENCH_ARGS="--dtype fp16 bf16 --batch 16").
MLA_DEFAULT="--dtype bf16 --batch 16 1 --max-autotune-batch 16 --providers eager compile compile-max-autotune triton cuda"
step bench-multiscale python benchmarks/bench_multiscale.py --out "$OUT/results" ${MLA_BENCH_ARGS-$MLA_DEFAULT}
step bench-lite-mla python benchmarks/bench_lite_mla.py --out "$OUT/results" ${MLA_BENCH_ARGS-$MLA_DEFAULT}
# conv + BN + act (linattn.conv_bn_act, linattn.upsample_block) over every conv shape of SqueezeSAM, EfficientViT-SAM
# L0 and XL1 (89 shapes) at B=16 and B=1, bf16, forward. compile-max-autotune re-tunes every shape: only at
# B=16 (its speedup column is empty at B=1). CONV_BENCH_ARGS replaces these options (e.g.
# CONV_BENCH_ARGS="--models squeezesam --dtype fp16 bf16 --batch 16", or "--shapes l0.s3 sq.up8 --providers eager triton").
CONV_DEFAULT="--dtype bf16 --batch 16 1 --max-autotune-batch 16 --providers eager eager-folded compile compile-max-autotune triton cuda"
step bench-conv-bn-act python benchmarks/bench_conv_bn_act.py --out "$OUT/results" ${CONV_BENCH_ARGS-$CONV_DEFAULT}
# the end-to-end encoders (python -m linattn bench: xl1, l0, squeezesam, efficientsam-vitt at B=16 in bf16, every
# provider). compile-max-autotune of a whole encoder takes minutes: under a per-call time limit split it by model,
# e.g. STEPS=bench-e2e E2E_BENCH_ARGS="--model xl1", then "--model l0 squeezesam vitt".
step bench-e2e python -m linattn bench --out "$OUT/results" ${E2E_BENCH_ARGS-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv" 2>&1
echo "summary: ${status[*]}" | tee "$OUT/summary.txt"
