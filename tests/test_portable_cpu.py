"""Everything the camera loads runs on an AVX2-only x86-64: the camera runtime under ``qemu-x86_64 -cpu Haswell``.

qemu-user (Debian's ``qemu-user``) emulates a Haswell CPU: CPUID reports no AVX-512 and an AVX-512
instruction is an illegal instruction (SIGILL). A real bundle is opened with every index mode the
exporter may choose (numpy, hnswlib, OpenVINO's CPU plugin all load) and scores the same frames as the
native run. Fails on a hnswlib built with ``-march=native`` on an AVX-512 machine; see ``.ci/install``.
The native int8 kernel (``runtime/native``, 'int8' mode and coarse mode's candidates) picks its AVX2 path
there and returns the same candidates as the AVX-512/AMX path natively (exact int32 dots on every path).
An automatic int8 bundle opened without a mode runs int8 natively and, on the AVX2-only CPU, its stored
fallback instead, same scores: an hnsw graph (older exports; tests/test_search_fallback_cpu.py) or coarse's
projection with the graph's candidates (now; tests/test_coarse_fallback.py).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgecore.export.bundle import export_bundle
from edgecore.runtime.index import FULL_D_PATHS

QEMU = shutil.which("qemu-x86_64")
pytestmark = pytest.mark.skipif(
    QEMU is None or platform.machine() != "x86_64",
    reason="needs qemu-x86_64 (Debian qemu-user, installed by .ci/install) on an x86-64 host",
)

# Runs in the child: open each (bundle, search mode), score the frames, report the scores and the CPU it saw.
CHILD = r"""
import json, sys
from numpy._core._multiarray_umath import __cpu_features__ as cpu
from edgecore.runtime import native
from edgecore.runtime.detector import Detector
runs, frames = json.loads(sys.argv[1]), sys.argv[2:]
report = {"avx512f": bool(cpu["AVX512F"]), "avx2": bool(cpu["AVX2"]), "native_isa": native.kernel().isa, "runs": {}}
for bundle, search in runs:  # "auto…": the bundle's own choice (no --search)
    with Detector.open(bundle, precision="fp32", search=None if search.startswith("auto") else search) as detector:
        report["runs"][search] = {"mode": detector.index.mode, "scores": [detector.detect(f).score for f in frames]}
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def bundles(fitted_model_dir, tmp_path_factory) -> dict[str, Path]:
    """One bundle per graph-carrying mode; exact search runs on any bundle (it needs only the vectors)."""
    root = tmp_path_factory.mktemp("portable")
    return {mode: export_bundle(fitted_model_dir, root / f"{mode}.edgecore", search=mode) for mode in ("hnsw", "coarse")}


def _run(command: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    assert completed.returncode == 0, f"exit {completed.returncode} (-4 is SIGILL): {completed.stderr[-2000:]}"
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_camera_runtime_on_haswell_gives_the_native_scores(bundles, int8_fallback_bundle, int8_coarse_fallback_bundle,
                                                          synthetic_category):
    runs = json.dumps([[str(bundles["coarse"]), "exact"], [str(bundles["hnsw"]), "hnsw"], [str(bundles["coarse"]), "coarse"],
                       [str(bundles["coarse"]), "int8"], [str(int8_fallback_bundle), "auto"],
                       [str(int8_coarse_fallback_bundle), "auto-coarse"]])
    frames = [str(p) for p in sorted((synthetic_category / "test").rglob("*.png"))[:3]]
    native = _run([sys.executable, "-c", CHILD, runs, *frames])
    emulated = _run([QEMU, "-cpu", "Haswell", sys.executable, "-c", CHILD, runs, *frames])
    assert emulated["avx2"] and not emulated["avx512f"], emulated  # the emulated CPU really lacks AVX-512
    assert emulated["native_isa"] == "avx2", emulated["native_isa"]  # the kernel's AVX2 path, no AVX-512/AMX
    for search in ("exact", "hnsw", "coarse", "int8"):
        assert native["runs"][search]["mode"] == emulated["runs"][search]["mode"] == search
        # Same bundle, same frames: only the engine's kernels differ (AVX2 vs AVX-512 rounding).
        np.testing.assert_allclose(emulated["runs"][search]["scores"], native["runs"][search]["scores"], rtol=1e-4)
    # the int8 kernel's candidates are the exact int8 search's: its scores are exact mode's on both CPUs
    for run in (native, emulated):
        np.testing.assert_allclose(run["runs"]["int8"]["scores"], run["runs"]["exact"]["scores"], rtol=1e-5)
    # the automatic int8 bundle: the kernel where it has a dot product, the stored graph on the AVX2-only CPU
    assert native["runs"]["auto"]["mode"] == ("int8" if native["native_isa"] not in ("avx2", "scalar") else "hnsw")
    assert emulated["runs"]["auto"]["mode"] == "hnsw"
    np.testing.assert_allclose(emulated["runs"]["auto"]["scores"], native["runs"]["auto"]["scores"], rtol=1e-4)
    # its coarse-fallback successor: int8 only with AMX / AVX-512 VNNI, the projection everywhere else (the
    # graph's candidates on the AVX2-only CPU); the certified maxima give the same image scores
    assert native["runs"]["auto-coarse"]["mode"] == ("int8" if native["native_isa"] in FULL_D_PATHS else "coarse")
    assert emulated["runs"]["auto-coarse"]["mode"] == "coarse"
    np.testing.assert_allclose(emulated["runs"]["auto-coarse"]["scores"], native["runs"]["auto-coarse"]["scores"], rtol=1e-4)
