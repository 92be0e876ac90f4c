#!/usr/bin/env bash
# The GPU pass in one command: build, check, GPU tests, compute-sanitizer, benchmarks; the results into OUT_DIR.
#   usage: bash benchmarks/gpu_check.sh OUT_DIR
#
# The default profile (PROFILE=quick) fits one device lease: each step runs under `timeout` with its bound
# (seconds, below), and the pass under BUDGET_S=500: a step starts only while 20 s of the budget are left, its
# bound cut to what is left, so the pass ends within 9 minutes of a bare machine's start, the build included
# (run it under `timeout 540`). Steps run in this order (most wanted first: what the budget cuts is at the
# end); one that fails or times out does not stop the next, and a benchmark stopped by its bound saves the rows
# it has measured:
#   build              200  pip install -e . with the CUDA extension for sm_90 only (TORCH_CUDA_ARCH_LIST=9.0,
#                           MAX_JOBS=16, --no-deps --no-build-isolation --no-index), then linattn._C must load;
#                           its cuDNN conv graph needs the cudnn-frontend headers, which the device image lacks
#                           (no internet there): run `bash third_party/get_cudnn_frontend.sh` before the lease
#                           and carry the git-ignored third_party/cudnn_frontend (gpu.txt says if it is here)
#   info                30  python -m linattn info
#   cudnn               30  four convs forced onto the cuDNN graph against the float64 reference, in a process of
#                           its own; where it fails, LINATTN_CUDNN=0 for every later step (gpu.txt says so)
#   precompile          60  python -m linattn tune --compile-only: every Triton configuration the E2E_MODELS' calls
#                           launch at B16 and 1 in bf16 (measured dispatch's candidates too) compiled at once,
#                           one process per core, into Triton's cache: the first H100 pass's optimized L0 did not
#                           finish its first call in 90 s, compiling kernel after kernel
#   tune                60  only where the package ships no dispatch table for this GPU (an H200: the shipped one
#                           is the H100's): python -m linattn tune measures the first model's calls at B16 and 1
#                           (L0: about 75 choices, 30-40 s on an H100), which bench-e2e's warm-up would otherwise
#                           do inside its own bound
#   pytest             140  the GPU tests: those parametrized on CUDA but the 108 small depthwise compiles of
#                           test_cuda_dw3_kernel_every_gpu_config (-k "cuda and not every_gpu_config"; PYTEST_ARGS
#                           replaces it, its words as the shell splits them), with pytest-timeout (60 s a test,
#                           thread method: a test hung in a CUDA call ends its worker) and pytest-xdist (all cores
#                           but two) when installed; stopped by SIGINT at its bound; verbose, so each failure is
#                           named as it happens (the sixth H100 pass: 240 tests in 76 s on 14 workers with the
#                           kernels compiled, past 106 s on a bare machine; the ninth pass's 290 reached 100% at its
#                           110 s bound; 310 now)
#   bench-e2e-l0       150  python -m linattn bench: eager, compile, linattn, linattn-graph at B16 bf16 (img_s),
#                           each with its batch-1 latency (lat_b1_ms) and host time (host_b1_ms); no max-autotune
#                           (the sixth H100 pass's L0 took 127 s, measured dispatch timing 146 choices)
#   check              120  python -m linattn check: every op on every backend against the reference (a bare
#                           machine compiles every kernel here: 17 s on the sixth pass's warm machine, about 90 s
#                           on its bare one)
#   bench-host          60  benchmarks/bench_host.py: one B1 conv_bn_act call's host time at each layer of its path
#                           (module, functional, body, forced backends, Triton's launcher, its bare launch, cuDNN's
#                           op) against eager's ops, under inference mode as bench-e2e; module-grad: the eval module
#                           with autograd on. Where the no-graph batch-1 forward's host time goes
#   bench-conv-bn-act   40  eager against the triton, cuda and auto conv paths at eight shapes (one of each kind
#                           and model, L0's stride-2 depthwise, and L0's MBConv depthwise -> 1x1 pair fused), B16,
#                           bf16, replayed as CUDA graphs: the kernels' time, not the host's (22 s on the ninth
#                           pass, seven shapes)
#   bench-lite-mla      40  the LiteMLA op benchmarks at every LiteMLA stage, B16, bf16, forward, eager against
#                           the triton and cuda backends, replayed as CUDA graphs (the compile providers are in
#                           the end-to-end steps); bench-multiscale and bench-linear-attention the same. Ahead
#                           of XL1 (11 s on the seventh pass, which had no budget left for it after XL1)
#   bench-multiscale    40  the context op alone (and multiscale_aggregate) at every LiteMLA stage: its share of
#                           the memory floor (issue 14), ahead of XL1 too (17 s on the fifth pass)
#   ncu                 90  Nsight Compute (--set detailed) on the kernels of the LiteMLA stages' and three convs'
#                           calls (depthwise of stride 1 and 2, dense 3x3), Triton and cuDNN (NCU_ARGS:
#                           profile_kernels.py's options): results/ncu.ncu-rep, and its details page in logs/ncu.log
#   bench-e2e-xl1      225  as l0 without compile (E2E_MODELS: the first model runs before check with compile, the
#                           rest here without it)
#   kernels             40  benchmarks/profile_kernels.py: the profiler's per-kernel view (time, registers,
#                           shared memory, occupancy, bandwidth over the call's span) of the conv and LiteMLA
#                           benchmarks' headline shapes, eager, triton and cuda
#   e2e-l0-host-aware  150  bench-e2e-l0's linattn providers again under LINATTN_HOST_AWARE=1 (measured dispatch
#                           weighs each conv's host time too, linattn/_tune.py), rows in results/host_aware/
#   sanitizer-memcheck  60  compute-sanitizer --tool memcheck over `check`, PyTorch's caching allocator off
#   bench-linear-attention  40
#   bench-upsample-sum      the neck merge (l0, xl1), as the other op benchmarks
# Opt-in (named in STEPS, or PROFILE=full): sanitizer-racecheck, sanitizer-initcheck.
# Opt-in (named in STEPS): every-gpu-config (140 s): test_cuda_dw3_kernel_every_gpu_config, which the quick profile's
#   pytest leaves out.
# Opt-in (named in STEPS): sanitizer-csrc-memcheck, sanitizer-csrc-racecheck (60 s each): the two tools over `check`'s
#   attention ops on the cuda backend only (csrc's kernels, the tensor-core context among them); STEPS=sanitizer-csrc
#
# PROFILE=full: no total budget, 600 s bounds (split it over calls with STEPS): the whole test suite, every
# sanitizer tool, the op benchmarks on every shape at B16 and 1 with compile and compile-max-autotune (at B16),
# the end-to-end benchmark on xl1, l0, squeezesam and vitt with every provider.
# PROFILE=smoke: the same steps at CPU scale, without build and sanitizer (--quick benchmarks): checks this
# script on a machine without a GPU. DRY_RUN=1 writes each step's command to its log instead of running it.
#
# STEPS="check pytest" runs only the named steps (a name, or the start of one: "sanitizer", "bench-e2e"); a
# bare machine has no extension: name build too. BUDGET_S (0: none), BOUND_<STEP> (e.g. BOUND_PYTEST=120,
# BOUND_BENCH_E2E_XL1=150), PYTEST_ARGS, PYTEST_WORKERS (0: no xdist), PYTEST_TIMEOUT, E2E_MODELS (default
# "l0 xl1"), E2E_BENCH_ARGS, KERNELS_ARGS, LITE_MLA_BENCH_ARGS, MULTISCALE_BENCH_ARGS,
# LINEAR_ATTENTION_BENCH_ARGS, UPSAMPLE_SUM_BENCH_ARGS, CONV_BENCH_ARGS, NCU_ARGS and HOST_AWARE_BENCH_ARGS (each
# replaces that benchmark's options), TORCH_CUDA_ARCH_LIST, MAX_JOBS, PYTHON (python3), WORK_DIR (default a fresh
# /tmp/gpu_check.*).
#
# Needs on the machine: torch, triton, numpy, pip, setuptools, wheel, nvcc, pytest (and compute-sanitizer); the
# rest is optional (tqdm: progress bars, matplotlib: plots, timm: some tests, pytest-timeout, pytest-xdist).
# gpu.txt lists what is missing. OUT_DIR receives at most 8 files (5): gpu_check.tar.gz (the work folder: every
# log, result file, plot, pytest.xml), summary.txt (the step table and the headline numbers), results.jsonl
# (every benchmark row of this pass, each with its results_file and run), gpu.txt (GPU, driver, versions,
# missing packages) and e2e.png. The step table and headline numbers are printed last. They are written however the
# pass ends: a TERM or INT (the outer `timeout`) stops the running step and writes them. Measured dispatch's table
# (LINATTN_CACHE_DIR, default ~/.cache/linattn: kept for a second call on the warm machine) is copied into the tar's
# dispatch_table/, to ship for a GPU that has none.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
PROFILE=${PROFILE:-quick}
DRY_RUN=${DRY_RUN:-0}
WORK=${WORK_DIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
LOGS=$WORK/logs
RESULTS=$WORK/results
mkdir -p "$LOGS" "$RESULTS" || exit 2
: > "$WORK/steps.tsv"
START=$SECONDS
KILL_AFTER=10 # seconds between timeout's TERM (benchmarks then save the rows they have) and KILL
MIN_STEP_S=20 # a step does not start with less of the budget left

case $PROFILE in
    quick) BUDGET_S=${BUDGET_S:-500} ;;
    full | smoke) BUDGET_S=${BUDGET_S:-0} ;;
    *)
        echo "PROFILE must be quick, full or smoke, not $PROFILE" >&2
        exit 2
        ;;
esac

export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
export LINATTN_CACHE_DIR=${LINATTN_CACHE_DIR:-$HOME/.cache/linattn}
# every benchmark row of this pass carries this id (its `run` column); plots draw the rows of the latest run
export LINATTN_BENCH_RUN=${LINATTN_BENCH_RUN:-gpu_check-$(date -u +%Y%m%dT%H%M%SZ)}
export TQDM_MININTERVAL=${TQDM_MININTERVAL:-5} # progress bars in log files: a line every 5 s, not every case

selected() { # selected NAME OPTIONAL: named in STEPS (or a prefix of NAME is), or STEPS unset and not optional
    if [[ -z ${STEPS:-} ]]; then
        [[ $2 == 0 ]]
        return
    fi
    local want
    for want in $STEPS; do [[ $1 == "$want"* ]] && return 0; done
    return 1
}

record() { # record NAME STATUS RC SECONDS BOUND
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/steps.tsv"
}

step() { # step NAME BOUND_S OPTIONAL CMD...: run CMD under timeout, log to WORK/logs/NAME.log
    local name=$1 bound=$2 optional=$3
    shift 3
    selected "$name" "$optional" || return 0
    local var=BOUND_${name//-/_}
    var=${var^^}
    bound=${!var:-$bound}
    if ((BUDGET_S > 0)); then
        local left=$((BUDGET_S - (SECONDS - START) - KILL_AFTER))
        if ((left < MIN_STEP_S)); then
            echo "== $name: skipped, ${left}s of the ${BUDGET_S}s budget left"
            record "$name" "no-time" - 0 "$bound"
            return 0
        fi
        ((bound > left)) && bound=$left
    fi
    local log=$LOGS/$name.log t0=$SECONDS rc
    echo "== $name (at most ${bound}s): $*"
    if [[ $DRY_RUN == 1 ]]; then
        echo "dry run: $*" > "$log"
        rc=0
    else
        # pytest stopped by SIGINT still prints its summary (-rfEs: the failures) and writes pytest.xml; the
        # benchmarks save the rows they have on SIGTERM (the third H100 pass's pytest log named no test)
        local sig=TERM
        [[ $name == pytest || $name == every-gpu-config ]] && sig=INT
        # in the background, waited for: a signal to this script runs its trap now, not when the step ends
        timeout --signal="$sig" --kill-after="$KILL_AFTER" "$bound" "$@" > "$log" 2>&1 &
        RUNNING=$! RUNNING_NAME=$name RUNNING_T0=$t0
        wait "$RUNNING"
        rc=$?
        RUNNING=
    fi
    local status=ok
    ((rc != 0)) && status=FAIL
    ((rc == 124 || rc == 137)) && status=TIMEOUT
    # compute-sanitizer refuses the GPU under some sandboxes (gVisor): say so rather than FAIL
    [[ $name == sanitizer-* && $rc != 0 ]] && grep -q "Device not supported" "$log" && status=UNSUPPORTED
    record "$name" "$status" "$rc" "$((SECONDS - t0))" "$bound"
    tail -n 3 "$log" | cut -c 1-200
}

bench_args() { # bench_args VAR DEFAULT...: the options of a benchmark, VAR's words when VAR is set
    if [[ -n ${!1+set} ]]; then
        read -r -a ARGS <<< "${!1}"
    else
        ARGS=("${@:2}")
    fi
}

# ---- the machine: GPU, driver, versions, packages (always; written to gpu.txt) ----
{
    echo "gpu_check.sh PROFILE=$PROFILE BUDGET_S=$BUDGET_S STEPS=${STEPS:-<default>} $(date -u +%FT%TZ)"
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>&1
    timeout 20 nvidia-smi 2>&1 | head -n 20
    timeout 20 nvcc --version 2>&1 | tail -n 2
    command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
    echo "cpus: $(nproc); kernel: $(uname -r)"
    echo "cudnn-frontend headers: $(cat third_party/cudnn_frontend/VERSION 2> /dev/null ||
        echo "not in third_party/cudnn_frontend (the build takes an installed nvidia-cudnn-frontend, else fails)")"
    timeout 60 "$PY" - << 'EOF'
import importlib, platform
print("python", platform.python_version())
try:
    import torch
    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "CUDA", torch.version.cuda, "cudnn", torch.backends.cudnn.version(),
          "device:", torch.cuda.get_device_name() if cuda else "none")
except Exception as err:
    print("torch: cannot import:", err)
# linattn needs torch, triton (GPU kernels) and numpy (models); the benchmarks tqdm (optional: plain lines
# without it) and matplotlib (plots, optional); the tests pytest, timm (some skip without), pytest-timeout
# and pytest-xdist (optional here).
missing = []
for name in ("triton", "numpy", "tqdm", "matplotlib", "pytest", "timm", "pytest_timeout", "xdist"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as err:
        missing.append(f"{name} ({type(err).__name__})")
print("missing:", ", ".join(missing) or "none")
EOF
} > "$WORK/gpu.txt" 2>&1
grep -E "^(torch|missing)" "$WORK/gpu.txt"

# ---- per-profile arguments ----
has() { "$PY" -c "import $1" > /dev/null 2>&1; }
# -v: each test's outcome on its own line as it ends, so a pass cut off by its bound still names its failures (the
# ninth pass's summary never printed: its workers hung at exit in inductor's compile-worker shutdown, which one
# compile thread, in process, does not start)
PYTEST=(env TORCHINDUCTOR_COMPILE_THREADS=1 "$PY" -m pytest -v -rfEs -p no:cacheprovider)
has pytest_timeout && PYTEST+=(--timeout "${PYTEST_TIMEOUT:-60}" --timeout-method=thread) # per test
WORKERS=${PYTEST_WORKERS:-$(($(nproc) > 3 ? $(nproc) - 2 : 1))} # two cores left for the GPU's feeders
has xdist && ((WORKERS > 0)) && PYTEST+=(-n "$WORKERS")
E2E_MODELS=${E2E_MODELS:-l0 xl1}
CONV_SHAPES=(sq.enc128.c2 sq.up64 l0.s3.mb.dw3 l0.s4.down.dw3 l0.s3.mb.pw_proj l0.s3.mb.sep xl1.s3.fmb.conv3 xl1.s4.mb.dw3)
OPS=(--dtype bf16 --batch 16 --providers eager triton cuda auto)
case $PROFILE in
    quick)
        B_BUILD=200 B_PRE=60 B_CHECK=120 B_PYTEST=140 B_SAN=60 B_E2E=150 B_BENCH=40 # XL models: 1.5 x B_E2E
        PRE=(--batch 16 1 --dtype bf16)
        PYTEST_SEL=(-k "cuda and not every_gpu_config")
        # 25 ops and host functions in each profile: the eighth pass's top 10 of L0's batch-1 host time (8.18 ms)
        # covered 4.6 ms of it
        E2E=(--batch 16 --dtype bf16 --providers eager compile linattn linattn-graph --top-ops 25)
        # the later models without torch.compile (the seventh pass's XL1 took 86 s with it, past what the budget
        # had left; the first model has the compile comparison)
        E2E_REST=(--batch 16 --dtype bf16 --providers eager linattn linattn-graph --top-ops 25)
        # the op benchmarks replayed as CUDA graphs: the kernels' time (the first H100 pass timed launches, host-bound
        # where the op is small: its Triton 1x1 conv ran 0.16 ms against eager's 0.045); the end-to-end steps time
        # both (linattn, linattn-graph)
        LIN=("${OPS[@]}" --no-backward --cuda-graph) MS=("${OPS[@]}" --cuda-graph) MLA=("${OPS[@]}" --cuda-graph)
        CONV=(--dtype bf16 --batch 16 --providers eager eager-folded triton cuda auto --cuda-graph
            --shapes "${CONV_SHAPES[@]}")
        KERNELS=(--conv-shapes "${CONV_SHAPES[@]}") # the conv benchmark's shapes, profiled
        NCU=(--stages l xl-s4 --conv-shapes l0.s3.mb.dw3 l0.s4.down.dw3 xl1.s3.fmb.conv3 --providers triton cuda)
        HOST_AWARE=(--batch 16 --dtype bf16 --providers linattn linattn-graph --top-ops 25)
        UPS=(--dtype bf16 --batch 16 --providers eager compile triton auto --cuda-graph)
        ;;
    full) # every shape at B16 and 1; compile-max-autotune re-tunes every shape: at B16 only
        B_BUILD=600 B_PRE=600 B_CHECK=600 B_PYTEST=600 B_SAN=600 B_E2E=600 B_BENCH=600
        PRE=(--batch 16 1 --dtype bf16)
        PYTEST_SEL=()
        E2E=() # every provider, compile-max-autotune included
        E2E_REST=()
        ALL=(eager compile compile-max-autotune triton cuda auto)
        LIN=(--batch 16 1 --max-autotune-batch 16 --providers "${ALL[@]}") # fp32, fp16, bf16; fwd and fwd+bwd
        MS=(--dtype bf16 --batch 16 1 --max-autotune-batch 16 --providers "${ALL[@]}")
        MLA=("${MS[@]}")
        CONV=(--dtype bf16 --batch 16 1 --max-autotune-batch 16 --providers eager eager-folded "${ALL[@]:1}")
        E2E_MODELS=${E2E_MODELS_FULL:-xl1 l0 squeezesam vitt}
        KERNELS=()
        NCU=()
        HOST_AWARE=(--batch 16 --dtype bf16 --providers eager linattn linattn-graph)
        UPS=(--dtype bf16 --batch 16 1 --layout channels_last nchw --backward --providers "${ALL[@]}")
        ;;
    smoke)
        B_BUILD=600 B_PRE=300 B_CHECK=300 B_PYTEST=300 B_SAN=300 B_E2E=300 B_BENCH=300
        PRE=(--batch 1 --dtype bf16 --arch 90) # no GPU: compiles for an H100 all the same
        PYTEST_SEL=(-k "cuda and not every_gpu_config")
        E2E=(--quick --providers eager linattn)
        E2E_REST=("${E2E[@]}")
        LIN=(--quick) MS=(--quick) MLA=(--quick) CONV=(--quick) KERNELS=(--quick) NCU=(--quick) UPS=(--quick)
        HOST_AWARE=(--quick --providers eager linattn)
        ;;
esac
# PYTEST_ARGS as the shell splits it (quotes kept: PYTEST_ARGS='-k "cuda and conv"')
[[ -n ${PYTEST_ARGS+set} ]] && eval "PYTEST_SEL=($PYTEST_ARGS)"
NO_GPU_STEP=0
[[ $PROFILE == smoke ]] && NO_GPU_STEP=1 # build and sanitizer need a GPU: opt-in only

# ---- OUT: at most 8 files; everything else in the tar. However the pass ends ----
RUNNING=''
finish() {
    trap - EXIT INT TERM
    [[ -d $LINATTN_CACHE_DIR ]] && mkdir -p "$WORK/dispatch_table" && cp "$LINATTN_CACHE_DIR"/*.json "$WORK/dispatch_table/" 2> /dev/null
    if ! timeout 60 "$PY" benchmarks/gpu_summary.py "$WORK" "$((SECONDS - START))" > /dev/null 2> "$LOGS/summary.err"; then
        { echo "gpu_summary.py failed (logs/summary.err); the steps:" && cat "$WORK/steps.tsv"; } > "$WORK/summary.txt"
    fi
    cp "$WORK/gpu.txt" "$WORK/summary.txt" "$OUT/"
    [[ -f $WORK/results.jsonl ]] && cp "$WORK/results.jsonl" "$OUT/"
    for png in "$RESULTS"/e2e*.png; do
        [[ -f $png ]] && cp "$png" "$OUT/e2e.png" && break
    done
    tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" . || echo "tar failed"
    echo "OUT: $(cd "$OUT" && echo *) (work folder $WORK)"
    cat "$WORK/summary.txt"
}
stopped() { # a signal: the running step stopped (its rows saved on TERM), recorded, then the files written
    if [[ -n $RUNNING ]]; then
        kill -TERM "$RUNNING" 2> /dev/null
        wait "$RUNNING"
        record "$RUNNING_NAME" STOPPED "$1" "$((SECONDS - RUNNING_T0))" -
    fi
    echo "== stopped by signal $1: the steps after ${RUNNING_NAME:-it} did not run"
    finish
    exit 143
}
trap 'stopped TERM' TERM
trap 'stopped INT' INT
trap finish EXIT

# ---- the steps ----
LOADS='from linattn._extension import load_extension; ext, why = load_extension(); assert ext, why; print("_C loads")'
# shellcheck disable=SC2016 # "$1" and "$2" are bash -c's own arguments
step build "$B_BUILD" "$NO_GPU_STEP" env LINATTN_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" \
    MAX_JOBS="${MAX_JOBS:-16}" bash -c '"$1" -m pip install -v --no-deps --no-build-isolation --no-index -e . &&
    "$1" -c "$2"' build "$PY" "$LOADS"
# the cuDNN conv graph in a process of its own, before any step that may reach it: the first H100 pass's graph
# segfaulted the process at its first call, and every later step that ran a conv died with it. Where this probe
# fails, LINATTN_CUDNN=0 turns the graph off for the rest of the pass (the cuda backend then takes no conv), and
# gpu.txt says so.
CUDNN_PROBE='
import torch, linattn
from linattn import reference
from linattn._backend import Unsupported
torch.manual_seed(0)
x = torch.randn(2, 32, 17, 19, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
for cout, k, groups in ((64, 3, 1), (64, 1, 1), (32, 3, 32), (64, 3, 2)):
    w = torch.randn(cout, 32 // groups, k, k, device="cuda", dtype=x.dtype) / (32 // groups * k * k) ** 0.5
    b = torch.randn(cout, device="cuda", dtype=x.dtype)
    try:
        with linattn.backend("cuda"):
            y = linattn.conv_bn_act(x, w, b, padding=k // 2, groups=groups, act="gelu_tanh")
    except Unsupported as err:  # declined (cuDNN 9.19 has no fused depthwise engine on sm_90): not a failure
        assert groups > 1, err
        print(f"cuDNN graph {cout}x{32 // groups}x{k}x{k} groups {groups}: declined ({str(err)[:120]})")
        continue
    ref = reference.conv_bn_act(x.double(), w.double(), b.double(), padding=k // 2, groups=groups, act="gelu_tanh")
    err = ((y.double() - ref).norm() / ref.norm()).item()
    print(f"cuDNN graph {cout}x{32 // groups}x{k}x{k} groups {groups}: relative error {err:.1e}")
    assert err < 2e-2, err
'
step info 30 0 "$PY" -m linattn info
step cudnn 30 "$NO_GPU_STEP" "$PY" -c "$CUDNN_PROBE"
if selected cudnn "$NO_GPU_STEP" && [[ $(tail -n 1 "$WORK/steps.tsv" | cut -f 2) != ok ]]; then
    export LINATTN_CUDNN=0
    echo "cuDNN graph probe did not pass (logs/cudnn.log): LINATTN_CUDNN=0 for the steps after it" | tee -a "$WORK/gpu.txt"
fi
# every Triton configuration of the end-to-end models' calls compiled at once (one process per core) into
# Triton's cache, before the steps whose first calls would compile them one call at a time
read -r -a PRE_MODELS <<< "$E2E_MODELS"
SHIPPED='import torch; from linattn import _tune; print((_tune.SHIPPED / _tune.table_name(torch.cuda.get_device_name())).exists())'
step precompile "$B_PRE" 0 "$PY" -m linattn tune --compile-only --model "${PRE_MODELS[@]}" "${PRE[@]}"
if [[ $PROFILE != smoke && $(timeout 60 "$PY" -c "$SHIPPED" 2> /dev/null) == False ]]; then
    echo "no shipped dispatch table for this GPU: the tune step measures ${PRE_MODELS[0]}'s calls" | tee -a "$WORK/gpu.txt"
    step tune "$B_PRE" 0 "$PY" -m linattn tune --model "${PRE_MODELS[0]}" "${PRE[@]}"
fi
step pytest "$B_PYTEST" 0 "${PYTEST[@]}" --junitxml="$LOGS/pytest.xml" "${PYTEST_SEL[@]}"
step every-gpu-config "$B_PYTEST" 1 "${PYTEST[@]}" --junitxml="$LOGS/every-gpu-config.xml" -k "cuda and every_gpu_config"

e2e() { # e2e MODEL DEFAULT...: the end-to-end benchmark of one model, DEFAULT its options unless E2E_BENCH_ARGS
    bench_args E2E_BENCH_ARGS "${@:2}"
    local bound=$B_E2E
    [[ $1 == xl* ]] && bound=$((B_E2E * 3 / 2)) # 1024x1024 input: longer to compile and time
    step "bench-e2e-$1" "$bound" 0 "$PY" -m linattn bench --model "$1" --out "$RESULTS" "${ARGS[@]}"
}
bench() { # bench NAME ARGS_VAR SCRIPT DEFAULT...: one op benchmark
    bench_args "$2" "${@:4}"
    step "bench-$1" "$B_BENCH" 0 "$PY" "benchmarks/$3" --out "$RESULTS" "${ARGS[@]}"
}
read -r -a MODELS <<< "$E2E_MODELS"
e2e "${MODELS[0]}" "${E2E[@]}" # the GPU tests and the first model, then check and the conv kernels, then the rest
step check "$B_CHECK" 0 "$PY" -m linattn check
step bench-host 60 0 "$PY" benchmarks/bench_host.py --out "$RESULTS"
bench conv-bn-act CONV_BENCH_ARGS bench_conv_bn_act.py "${CONV[@]}"
bench lite-mla LITE_MLA_BENCH_ARGS bench_lite_mla.py "${MLA[@]}"
bench multiscale MULTISCALE_BENCH_ARGS bench_multiscale.py "${MS[@]}"
# Nsight Compute on the kernels of one call per case (profile_kernels.py --bare: the third call, in an NVTX range):
# throughput, memory, occupancy and warp stalls, which the profiler's times cannot give (the eighth pass's L0
# context kernel: 8% of copy bandwidth at 12% occupancy, latency- or cache-bound: this says which)
bench_args NCU_ARGS "${NCU[@]}"
# shellcheck disable=SC2016 # "$1" and "${@:2}" are bash -c's own arguments
step ncu 90 "$NO_GPU_STEP" bash -c 'ncu --nvtx --nvtx-include linattn-profiled/ --set detailed --target-processes all \
    -f -o "$1/ncu" "${@:2}" && ncu --import "$1/ncu.ncu-rep" --page details' ncu "$RESULTS" \
    "$PY" benchmarks/profile_kernels.py --bare "${ARGS[@]}"
for model in "${MODELS[@]:1}"; do e2e "$model" "${E2E_REST[@]}"; done
bench_args KERNELS_ARGS "${KERNELS[@]}"
step kernels "$B_BENCH" 0 "$PY" benchmarks/profile_kernels.py --out "$RESULTS" "${ARGS[@]}"
# measured dispatch weighing the host's time of each conv too (LINATTN_HOST_AWARE=1, an experiment): L0 again,
# its rows in results/host_aware/, against bench-e2e-l0's (the eighth pass: batch 1 host-bound, 18% behind eager).
# After the op benchmarks: the ninth pass ran it before them, its bound cut to the 54 s left, and it timed out
# with no row while they (50 s together) had no time
bench_args HOST_AWARE_BENCH_ARGS "${HOST_AWARE[@]}"
step e2e-l0-host-aware "$B_E2E" 0 env LINATTN_HOST_AWARE=1 "$PY" -m linattn bench --model l0 \
    --out "$RESULTS/host_aware" "${ARGS[@]}"
for tool in memcheck racecheck initcheck; do
    optional=$NO_GPU_STEP
    [[ $tool != memcheck && $PROFILE != full ]] && optional=1
    # without PyTorch's caching allocator every tensor is its own allocation: memcheck sees every overrun
    step "sanitizer-$tool" "$B_SAN" "$optional" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" -m linattn check
done
# the hand-written CUDA kernels alone (csrc/: shared-memory tiles reused between barriers), opt-in: check's attention
# ops on the cuda backend, the tensor-core context among them (its fp16/bf16 case at head dim 32)
for tool in memcheck racecheck; do
    step "sanitizer-csrc-$tool" "$B_SAN" 1 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
        --error-exitcode 1 "$PY" -m linattn check --backend cuda --op relu_linear_attention lite_mla_attention \
        multiscale_aggregate lite_mla_context
done
bench linear-attention LINEAR_ATTENTION_BENCH_ARGS bench_linear_attention.py "${LIN[@]}"
bench upsample-sum UPSAMPLE_SUM_BENCH_ARGS bench_upsample_sum.py "${UPS[@]}"

finish
