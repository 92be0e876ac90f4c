#!/bin/bash
# the fifth device call: the lite_mla_context sweep beside the build, then TMA and cuda-backward diagnostics, the fixed GPU tests
OUT=$1
export PYTHONUNBUFFERED=1
T0=$SECONDS
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/install.log 2>&1; echo "python install rc=$? $((SECONDS-T0)) s"
(LINATTN_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=8 timeout 150 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/build.log 2>&1; echo "build rc=$? $((SECONDS-T0)) s" >> $OUT/build.log) &
WORKERS=10 SWEEP_OUT=$OUT/sweep.json timeout 150 python3 .diag/ctx_sweep.py > $OUT/sweep.log 2>&1; echo "sweep rc=$? $((SECONDS-T0)) s"
grep -A4 "^==" $OUT/sweep.log | cut -c1-180
timeout 30 python3 .diag/tma2.py > $OUT/tma2.log 2>&1; echo "tma2 rc=$? $((SECONDS-T0)) s"; cut -c1-230 $OUT/tma2.log
wait; tail -1 $OUT/build.log
timeout 30 python3 .diag/bwd.py > $OUT/bwd.log 2>&1; echo "bwd rc=$? $((SECONDS-T0)) s"; cut -c1-200 $OUT/bwd.log
timeout -s INT -k 5 45 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -n 14 --timeout 40 -k "cuda and (strided_views or cuda_backward or parity_with_timm or lite_mla_context)" tests/ > $OUT/pytest.log 2>&1; echo "pytest rc=$? $((SECONDS-T0)) s"
grep -E "^(FAILED|ERROR)" $OUT/pytest.log | cut -c1-200; tail -2 $OUT/pytest.log
