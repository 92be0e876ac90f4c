#!/bin/bash
# one device call: the TMA diagnostic beside the build, then the GPU tests with their failures listed
OUT=$1
export PYTHONUNBUFFERED=1
LINATTN_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . > $OUT/build.log 2>&1; echo build rc=$?
timeout 60 python3 .diag/tma.py 2>&1 | tee $OUT/tma.log | cut -c1-400
timeout -s INT -k 10 ${PYT:-130} python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -n 14 --timeout 60 -k cuda tests/ > $OUT/pytest.log 2>&1; echo pytest rc=$?
grep -E "^(FAILED|ERROR)" $OUT/pytest.log | cut -c1-220
tail -3 $OUT/pytest.log
