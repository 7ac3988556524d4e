#!/usr/bin/env bash
# edgecore vs anomalib PatchCore, side by side (see benchmarks/PEERS.md).
#
#   bash benchmarks/peers/run_anomalib_peer.sh [anomalib_peer.py options]
#   e.g. bash benchmarks/peers/run_anomalib_peer.sh --anomalib-coreset-steps 400 --extra-projection-dims anomalib
#
# 1. Creates anomalib's OWN virtual environment (default /tmp/anomalib-venv) with
#    --system-site-packages, so it reuses the torch/torchvision/OpenVINO/NNCF/ONNX already
#    installed for the project instead of downloading ~5 GB, and installs the pinned
#    anomalib + its remaining dependencies into the venv only. pip in a venv never removes
#    packages outside it ("Not uninstalling X ... outside environment"); the script checks
#    that `pip freeze` of the project's interpreter is byte-identical before and after.
# 2. Runs benchmarks/peers/anomalib_peer.py with the PROJECT's python (edgecore steps),
#    which runs every anomalib step with the venv's python (anomalib_side.py).
#
# Environment: PYTHON (project interpreter, default: python3 on PATH), ANOMALIB_VENV,
# ANOMALIB_VERSION (default 2.7.0), PEER_WORK (scratch, default /tmp/peer/run),
# PEER_DATA (default ../shared/data/mvtec_bottle next to the repo). Offline apart from PyPI
# for the venv; nothing is downloaded at run time (random-init backbones, local data).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${ANOMALIB_VENV:-/tmp/anomalib-venv}"
VERSION="${ANOMALIB_VERSION:-2.7.0}"
WORK="${PEER_WORK:-/tmp/peer/run}"
DATA="${PEER_DATA:-$REPO/../shared/data/mvtec_bottle}"

mkdir -p "$WORK"
"$PYTHON" -m pip freeze 2>/dev/null | sort > "$WORK/project_freeze_before.txt"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[peer] creating $VENV (system site packages: reuses the project's torch/OpenVINO)" >&2
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
if ! "$VENV/bin/python" -c "import anomalib, sys; sys.exit(anomalib.__version__ != '$VERSION')" 2>/dev/null; then
    echo "[peer] installing anomalib[openvino]==$VERSION into $VENV" >&2
    # [openvino] pulls nncf/onnx/onnxscript/openvino: all satisfied by the project's copies.
    # torch/torchvision are NOT extras here: anomalib 2.x leaves them to the user, the venv sees the project's.
    "$VENV/bin/python" -m pip install --disable-pip-version-check "anomalib[openvino]==$VERSION" \
        > "$WORK/pip_install_anomalib.log" 2>&1 || { tail -30 "$WORK/pip_install_anomalib.log" >&2; exit 1; }
fi

"$PYTHON" -m pip freeze 2>/dev/null | sort > "$WORK/project_freeze_after.txt"
if ! diff -q "$WORK/project_freeze_before.txt" "$WORK/project_freeze_after.txt" >/dev/null; then
    echo "[peer] ERROR: the project's environment changed while installing anomalib:" >&2
    diff "$WORK/project_freeze_before.txt" "$WORK/project_freeze_after.txt" >&2 || true
    exit 1
fi
"$VENV/bin/python" -c "import anomalib, torch, openvino; print('[peer] venv: anomalib', anomalib.__version__, '| torch', torch.__version__, 'from', torch.__file__, '| openvino', openvino.__version__)" >&2

exec "$PYTHON" "$HERE/anomalib_peer.py" --venv "$VENV" --work "$WORK" --data "$DATA" "$@"
