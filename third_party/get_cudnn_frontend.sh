#!/usr/bin/env bash
# The cudnn-frontend headers (header-only C++) into third_party/cudnn_frontend/include, for building linattn._C
# where the nvidia-cudnn-frontend package is not installed: setup.py looks there before the installed package.
# They come from the PyPI wheel (pip download, nothing is installed; the folder is git-ignored). The GPU pass
# carries the folder to a machine without internet (benchmarks/gpu_check.sh).
#   usage: bash third_party/get_cudnn_frontend.sh [VERSION]     (default 1.32.0, the version tested)
set -euo pipefail
cd "$(dirname "$0")"
VERSION=${1:-${CUDNN_FRONTEND_VERSION:-1.32.0}}
PY=${PYTHON:-python3}
DEST=cudnn_frontend
if [[ -f $DEST/include/cudnn_frontend.h && -f $DEST/VERSION && $(cat "$DEST/VERSION") == "$VERSION" ]]; then
    echo "cudnn-frontend $VERSION headers already in third_party/$DEST/include"
    exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --quiet --no-deps --dest "$TMP" "nvidia-cudnn-frontend==$VERSION"
WHEEL=$(ls "$TMP"/nvidia_cudnn_frontend-*.whl)
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" - "$WHEEL" "$DEST" << 'PYEOF'
import sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("include/")]
    z.extractall(dest, names)
print(f"{len(names)} headers from {wheel.rsplit('/', 1)[-1]}")
PYEOF
echo "$VERSION" > "$DEST/VERSION"
[[ -f $DEST/include/cudnn_frontend.h ]] || { echo "no include/cudnn_frontend.h in the wheel" >&2; exit 1; }
echo "cudnn-frontend $VERSION headers in third_party/$DEST/include"
