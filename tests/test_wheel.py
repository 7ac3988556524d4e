"""The camera install from the built wheel, end to end: `python -m build`, a fresh venv, an offline install
of edgecore[runtime] with no compiler on PATH, then the README's camera steps (unpack, verify, bench, infer).

The camera's dependencies come from the wheelhouse `.ci/install` fills (`.cache/wheelhouse`); no network.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WHEELHOUSE = ROOT / ".cache" / "wheelhouse"
CAMERA_DEPS = ("numpy", "pillow", "deflate", "typer", "rich", "openvino", "hnswlib", "threadpoolctl")


def _wheelhouse_ready() -> bool:
    names = {p.name.split("-")[0].lower() for p in WHEELHOUSE.glob("*.whl")}
    return all(dep in names for dep in CAMERA_DEPS)


@pytest.fixture(scope="module")
def camera_venv(tmp_path_factory):
    if not _wheelhouse_ready():
        pytest.skip(f"no camera wheelhouse at {WHEELHOUSE} (bash .ci/install fills it; the install step may download)")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"  # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(work / "dist"), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (work / "dist").glob("edgecore-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    env = {"PATH": str(venv / "bin"), "HOME": str(work), "LANG": "C.UTF-8", "EDGECORE_CACHE": str(work / "cache")}
    for compiler in ("cc", "gcc", "g++", "c++", "clang"):
        assert shutil.which(compiler, path=env["PATH"]) is None  # nothing can be compiled during the install
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--no-index",
         "--find-links", str(WHEELHOUSE), "--no-cache-dir", f"{wheel}[runtime]"],
        capture_output=True, text=True, timeout=600, env={**env, "PATH": env["PATH"]},
    )
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    return venv, env, work


def _run(venv: Path, env: dict, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "edgecore"), *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def test_wheel_installs_offline_and_runs_the_camera_workflow(camera_venv, exported_bundle, synthetic_category):
    from edgecore.export.bundle import pack_bundle
    from edgecore.runtime.detector import Detector

    venv, env, work = camera_venv
    python = str(venv / "bin" / "python")
    probe = subprocess.run([python, "-c", "import edgecore, importlib.util as u; print(edgecore.__file__); "
                            "print(u.find_spec('torch') is None)"], capture_output=True, text=True, env=env, cwd=work)
    location, no_torch = probe.stdout.split()
    assert str(venv) in location and no_torch == "True"  # the wheel's copy, in a venv without torch
    fast_png = subprocess.run([python, "-c", "from edgecore.runtime import png; print(png._unfilter() is not None and png._libdeflate is not None)"],
                              capture_output=True, text=True, env=env, cwd=work)
    assert fast_png.stdout.strip() == "True", fast_png.stderr  # the wheel carries the PNG unfilter; libdeflate is installed

    archive = pack_bundle(exported_bundle, work / "part.edgecore.tar")
    camera = work / "camera"
    unpacked = _run(venv, env, "unpack", str(archive), "-o", str(camera), cwd=work)
    assert unpacked.returncode == 0, unpacked.stderr
    bundle = Path(json.loads(unpacked.stdout)["bundle"])
    verified = _run(venv, env, "verify", str(bundle), cwd=work)
    assert verified.returncode == 0 and json.loads(verified.stdout)["ok"] is True, verified.stderr
    bench = _run(venv, env, "bench", str(bundle), "--iterations", "3", "--warmup", "1", "--quiet", "--strict",
                 "--target-ms", "100000", cwd=work)
    assert bench.returncode == 0 and bench.stdout.startswith("PASS: total p99"), bench.stdout + bench.stderr
    frames = synthetic_category / "test" / "spot"
    infer = _run(venv, env, "infer", str(bundle), str(frames), "-o", str(work / "out"), cwd=work)
    assert infer.returncode == 0, infer.stderr
    assert "engine: openvino" in infer.stderr
    rows = [json.loads(line) for line in (work / "out" / "results.jsonl").read_text().splitlines()]
    with Detector.open(exported_bundle) as detector:  # this checkout's runtime: the same scores, bit for bit
        expected = {str(p): detector.detect(p).score for p in sorted(frames.iterdir())}
    assert {r["image"]: r["score"] for r in rows} == pytest.approx(expected, rel=1e-6)
    assert all(Path(r["overlay"]).is_file() for r in rows)

    host_only = _run(venv, env, "fit", str(synthetic_category), "-o", str(work / "model"), cwd=work)
    assert host_only.returncode == 2 and 'pip install "edgecore[host]"' in host_only.stderr
    assert "Traceback" not in host_only.stderr and len(host_only.stderr.strip().splitlines()) == 1
    listed = _run(venv, env, "--help", cwd=work).stdout
    assert "infer" in listed and " fit " not in listed  # a camera install lists only what runs there
