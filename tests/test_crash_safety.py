"""Crash safety: SIGKILL at any moment leaves the old complete artifact (or nothing), never a half one.

Two layers:

* fsutil, deterministically: a small subprocess (no torch) writes an artifact
  through ``atomic_directory`` / ``atomic_write_bytes`` and SIGKILLs itself at
  each step of the protocol (mid-write, staging complete but not renamed, after
  the swap, between the fallback's two renames, during cleanup).
* the real CLIs (fit, export, compile, pack) in a subprocess, killed by the test
  with ``os.kill(pid, SIGKILL)``: the moment their staging appears (the write
  phase), then at 50 % and 85 % of their measured duration; a re-run between
  must succeed despite the leftovers and remove them.

After every kill: the destination is absent, the old artifact byte for byte, or
a complete new one (``verify`` / ``PatchCoreModel.load`` accept it), and every
``.NAME.*.partial`` leftover fails those checks at its top level.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgecore.runtime import fsutil
from edgecore.runtime.bundle import MANIFEST, verify_bundle, verify_path
from edgecore.runtime.errors import BundleError, ModelError

# =========================================================================== fsutil, step by step

# Writes DEST as a tiny "artifact" (config.json + payload + manifest.json written last), dying at POINT.
WRITER = textwrap.dedent(
    """
    import json, os, shutil, signal, sys, time
    from pathlib import Path
    import edgecore.runtime.fsutil as fsutil

    dest, point, version = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def after(module, name, times=1):
        original, calls = getattr(module, name), [0]
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            calls[0] += 1
            if calls[0] == times:
                die()
            return result
        setattr(module, name, wrapper)

    if point == "staged-not-renamed":
        after(fsutil, "_fsync_tree")
    elif point == "after-swap":
        after(fsutil, "_exchange")
    elif point == "fallback-between-renames":
        fsutil._renameat2 = None
        after(os, "replace")
    elif point == "after-rename":
        after(os, "replace")
    elif point == "during-cleanup":
        after(fsutil, "_fsync_dir")
    elif point == "file-written-not-renamed":
        after(os, "fsync")
    elif point == "hang":
        pass

    if point.startswith("file-") or point == "file":
        fsutil.atomic_write_bytes(dest, json.dumps({"version": version}).encode() * 100)
        sys.exit(0)
    with fsutil.atomic_directory(dest) as staging:
        (staging / "config.json").write_text(json.dumps({"version": version}))
        (staging / "payload.bin").write_bytes(os.urandom(100_000))
        if point == "mid-write":
            die()
        if point == "hang":
            print("staging", staging, flush=True)
            time.sleep(60)
        (staging / "manifest.json").write_text(json.dumps({"version": version, "complete": True}))
    """
)


def _writer(dest: Path, point: str, version: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER, str(dest), point, version], capture_output=True, text=True,
                          timeout=60, **kwargs)


def _write(dest: Path, version: str) -> None:
    """The same toy artifact as WRITER, written here (no kill): the 'old' one, and the re-run."""
    with fsutil.atomic_directory(dest) as staging:
        (staging / "config.json").write_text(json.dumps({"version": version}))
        (staging / "payload.bin").write_bytes(os.urandom(100_000))
        (staging / "manifest.json").write_text(json.dumps({"version": version, "complete": True}))


def _artifact_version(path: Path) -> str | None:
    """The version of a COMPLETE toy artifact at ``path``, else None."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    assert manifest["version"] == config["version"] and (path / "payload.bin").stat().st_size == 100_000
    return manifest["version"]


def _partials(dest: Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(dest.parent / f".{glob.escape(dest.name)}.*.partial")))


KILL_POINTS = ["mid-write", "staged-not-renamed", "after-swap", "after-rename", "fallback-between-renames", "during-cleanup"]


def _expected(point: str, with_old: bool) -> tuple[bool, set]:
    """(does the writer die at that point, the states DEST may be in afterwards)."""
    swap = fsutil._renameat2 is not None
    if with_old:
        return {
            "mid-write": (True, {"old"}),
            "staged-not-renamed": (True, {"old"}),
            "after-swap": (True, {"new"} if swap else {"old"}),
            # with the swap there is no os.replace to die after; without it DEST is briefly absent
            "after-rename": (False, {"new"}) if swap else (True, {None}),
            "fallback-between-renames": (True, {None}),
            "during-cleanup": (True, {"new"}),
        }[point]
    return {
        "mid-write": (True, {None}),
        "staged-not-renamed": (True, {None}),
        "after-swap": (False, {"new"}),  # nothing to swap with: one plain rename
        "after-rename": (True, {"new"}),
        "fallback-between-renames": (True, {"new"}),
        "during-cleanup": (True, {"new"}),
    }[point]


@pytest.mark.parametrize("with_old", [True, False], ids=["replacing", "fresh"])
@pytest.mark.parametrize("point", KILL_POINTS)
def test_directory_killed_at_each_step_is_old_new_or_absent(tmp_path, point, with_old):
    dest = tmp_path / "model"
    if with_old:
        _write(dest, "old")
    dies, allowed = _expected(point, with_old)
    result = _writer(dest, point, "new")
    assert result.returncode == (-signal.SIGKILL if dies else 0), result.stderr
    state = _artifact_version(dest) if dest.exists() else None
    assert state in allowed, (point, state)
    assert not dest.exists() or state is not None, f"{dest} exists but is not complete"
    for leftover in _partials(dest):
        assert _artifact_version(leftover) is None, f"{leftover} looks like a complete artifact"
    if dies and point != "mid-write":
        assert _partials(dest), "a kill after staging should leave its (harmless) leftover"
    # a re-run works despite the leftovers and removes those of dead writers
    _write(dest, "rerun")
    assert _artifact_version(dest) == "rerun"
    assert _partials(dest) == []


@pytest.mark.parametrize("with_old", [True, False], ids=["replacing", "fresh"])
def test_file_killed_before_rename_keeps_the_old_file(tmp_path, with_old):
    dest = tmp_path / "a.edgecore.tar"
    if with_old:
        dest.write_bytes(b"old archive")
    result = _writer(dest, "file-written-not-renamed", "new")
    assert result.returncode == -signal.SIGKILL
    assert (dest.read_bytes() == b"old archive") if with_old else not dest.exists()
    assert len(_partials(dest)) == 1  # the complete-but-unrenamed temp file, under a .partial name
    fsutil.atomic_write_bytes(dest, b"rerun")
    assert dest.read_bytes() == b"rerun"
    assert _partials(dest) == []


def test_a_live_writer_keeps_its_staging_while_another_run_cleans_up(tmp_path):
    """Stale-partial cleanup takes each leftover's lock first: a writer that is still running holds
    it, so a concurrent successful run never removes a staging folder in use."""
    dest = tmp_path / "model"
    live = subprocess.Popen([sys.executable, "-c", WRITER, str(dest), "hang", "live"], stdout=subprocess.PIPE, text=True)
    try:
        line = live.stdout.readline()
        assert line.startswith("staging "), line
        staging_root = Path(line.split(" ", 1)[1].strip()).parent
        assert _writer(dest, "mid-write", "dead").returncode == -signal.SIGKILL  # a dead one next to it
        assert len(_partials(dest)) == 2
        _write(dest, "done")
        assert _partials(dest) == [staging_root]  # the dead writer's leftover went, the live one stayed
        assert (staging_root / "content" / "config.json").is_file()
    finally:
        live.kill()
        live.wait()
    assert fsutil.remove_stale_partials(dest) == [staging_root]  # dead now: removable


def test_cleanup_spares_other_names_and_fresh_empty_partials(tmp_path):
    dest = tmp_path / "a"
    other = tmp_path / ".a.b.abcdefgh.partial"  # a staging of destination "a.b", not of "a"
    other.mkdir()
    (other / "x").write_text("1")
    near = tmp_path / ".a.abcdefgh.partial.bak"
    near.mkdir()
    (near / "x").write_text("1")
    fresh_empty = tmp_path / ".a.12345678.partial"
    fresh_empty.mkdir()  # what a writer looks like between mkdtemp and taking its lock
    old_empty = tmp_path / ".a.zzzzzzzz.partial"
    old_empty.mkdir()
    os.utime(old_empty, (time.time() - 3600, time.time() - 3600))
    dead = tmp_path / ".a.deadbeef.partial"
    (dead / "content").mkdir(parents=True)
    removed = fsutil.remove_stale_partials(dest)
    assert sorted(removed) == sorted([old_empty, dead])
    assert other.exists() and near.exists() and fresh_empty.exists()


def test_fallback_without_renameat2_replaces_too(tmp_path, monkeypatch):
    dest = tmp_path / "d"
    with fsutil.atomic_directory(dest) as staging:
        (staging / "f").write_text("old")
    monkeypatch.setattr(fsutil, "_renameat2", None)
    with fsutil.atomic_directory(dest) as staging:
        (staging / "f").write_text("new")
    assert (dest / "f").read_text() == "new"
    assert list(tmp_path.iterdir()) == [dest]


def test_exception_inside_leaves_the_old_artifact_and_no_leftover(tmp_path):
    dest = tmp_path / "d"
    with fsutil.atomic_directory(dest) as staging:
        (staging / "f").write_text("old")
    with pytest.raises(RuntimeError):
        with fsutil.atomic_directory(dest) as staging:
            (staging / "f").write_text("new")
            raise RuntimeError("boom")
    assert (dest / "f").read_text() == "old"
    assert list(tmp_path.iterdir()) == [dest]


def test_killed_manifest_rewrite_leaves_the_old_bundle_verifiable(bundle_copy):
    """Manifest-only changes (the threshold re-fit) go through the atomic bundle swap: a kill while the new
    manifest is staged leaves the old, verifiable bundle, and the next rewrite succeeds."""
    code = f"""
import os, signal
from edgecore.runtime.bundle import rewrite_bundle
def change(staging, manifest):
    manifest["threshold"]["value"] = 1.0
    os.kill(os.getpid(), signal.SIGKILL)
rewrite_bundle({str(bundle_copy)!r}, change)
"""
    before = (bundle_copy / MANIFEST).read_bytes()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    verify_bundle(bundle_copy)
    assert (bundle_copy / MANIFEST).read_bytes() == before
    from edgecore.runtime.bundle import rewrite_bundle

    def change(staging, manifest):
        manifest["threshold"]["value"] = 2.0
        return manifest

    assert rewrite_bundle(bundle_copy, change)["threshold"]["value"] == 2.0
    assert verify_bundle(bundle_copy).manifest["threshold"]["value"] == 2.0


# =========================================================================== the real CLIs


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "edgecore.cli", *map(str, args)]


def _run_timed(command: list[str]) -> float:
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return time.monotonic() - start


def _kill(command: list[str], *, after_s: float | None = None, when: str | None = None) -> bool:
    """Start ``command``; SIGKILL it after ``after_s`` seconds, or as soon as a path matching the glob
    ``when`` appears. Returns whether it was killed (False: it finished first)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - start
            if (after_s is not None and elapsed >= after_s) or (when and glob.glob(when)):
                os.kill(proc.pid, signal.SIGKILL)
                break
            assert elapsed < 300, f"{command} ran for 5 minutes"
            time.sleep(0.002)
    finally:
        if proc.poll() is None and after_s is None and not when:
            proc.kill()
        proc.wait()
    return proc.returncode == -signal.SIGKILL


def _snapshot(path: Path) -> dict[str, bytes] | bytes | None:
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _check_leftovers(dest: Path, looks_complete) -> None:
    for leftover in _partials(dest):
        assert not looks_complete(leftover), f"{leftover}: a staging leftover looks complete"


def _bundle_ok(path: Path) -> bool:
    try:
        verify_path(path)
        return True
    except BundleError:
        return False


def _model_ok(path: Path) -> bool:
    from edgecore.model import PatchCoreModel

    try:
        PatchCoreModel.load(path, device="cpu")
        return True
    except ModelError:
        return False


HALF_AND_LATE = (0.5, 0.85)  # fractions of the re-run's measured duration


def _crash_and_rerun(command: list[str], dest: Path, complete) -> dict:
    """Kill ``command`` when its staging appears, then at 50 % and 85 % of its measured duration;
    check the destination and the leftovers after each kill.

    ``dest`` holds the old artifact before. Returns what happened (for the failure message)."""
    old = _snapshot(dest)
    assert old is not None and complete(dest)
    staging_glob = str(dest.parent / f".{glob.escape(dest.name)}.*.partial")
    log = {}
    log["killed_at_staging"] = _kill(command, when=staging_glob)
    _assert_old_or_new(dest, old, complete)
    _check_leftovers(dest, complete)
    duration = _run_timed(command)  # the re-run: succeeds despite the leftovers, removes the dead ones
    log["duration_s"] = round(duration, 1)
    assert complete(dest)
    assert [p for p in _partials(dest) if p.is_file() or any(p.iterdir())] == []
    for fraction in HALF_AND_LATE:
        old = _snapshot(dest)
        log[f"killed_at_{fraction}"] = _kill(command, after_s=duration * fraction)
        _assert_old_or_new(dest, old, complete)
        _check_leftovers(dest, complete)
    log["leftovers"] = [p.name for p in _partials(dest)]
    print(f"{command[3]}: {log}")  # shown with -s: where the kills landed
    return log


def _assert_old_or_new(dest: Path, old, complete) -> None:
    if fsutil._renameat2 is not None:  # replacing swaps in one step: the destination never disappears
        assert dest.exists(), f"{dest} vanished"
    if dest.exists() and _snapshot(dest) != old:
        assert complete(dest), f"{dest} is neither the old artifact nor a complete new one"


FIT_ARGS = ["--resize", "64", "--crop", "64", "--device", "cpu", "--coreset-ratio", "0.05", "--val-ratio", "0.25"]


def test_fit_killed(synthetic_category, fitted_model_dir, tmp_path):
    dest = Path(shutil.copytree(fitted_model_dir, tmp_path / "model"))
    log = _crash_and_rerun(_cli("fit", synthetic_category, "-o", dest, *FIT_ARGS), dest, _model_ok)
    assert any(v is True for k, v in log.items() if k.startswith("killed")), log  # a kill really happened


def test_export_killed(fitted_model_dir, exported_bundle, tmp_path):
    dest = Path(shutil.copytree(exported_bundle, tmp_path / "part.edgecore"))
    log = _crash_and_rerun(_cli("export", fitted_model_dir, "-o", dest), dest, _bundle_ok)
    assert any(v is True for k, v in log.items() if k.startswith("killed")), log  # a kill really happened


def test_compile_killed(bundle_copy):
    log = _crash_and_rerun(_cli("compile", bundle_copy, "--precision", "fp32"), bundle_copy, _bundle_ok)
    assert "openvino-fp32" in verify_bundle(bundle_copy).manifest["engines"]
    assert any(v is True for k, v in log.items() if k.startswith("killed")), log  # a kill really happened


def test_pack_killed(exported_bundle, tmp_path):
    from edgecore.export.bundle import pack_bundle

    archive = pack_bundle(exported_bundle, tmp_path / "part.edgecore.tar")
    reference = archive.read_bytes()
    command = _cli("pack", exported_bundle, "-o", archive)
    log = _crash_and_rerun(command, archive, _bundle_ok)
    assert any(v is True for k, v in log.items() if k.startswith("killed")), log  # a kill really happened
    assert archive.read_bytes() == reference  # pack is reproducible: old == new, byte for byte
