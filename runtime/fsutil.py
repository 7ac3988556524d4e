"""Atomic writes: an interrupted fit/export/compile never leaves a half artifact.

Everything is written into a temporary sibling and renamed into place, so the
destination is either the old complete artifact or the new complete one.

Staging layout and crash leftovers. ``atomic_directory(DEST)`` stages in
``.DEST.XXXXXXXX.partial/content/``; the commit renames ``content`` onto
``DEST``. A process killed (SIGKILL, power loss) before the commit leaves the
``.partial`` folder behind; its top level never holds an artifact (no
manifest.json / config.json), so nothing that looks for a complete model or
bundle mistakes it for one. Replacing an existing ``DEST`` swaps the two
folders in ONE ``renameat2(RENAME_EXCHANGE)`` on Linux, so ``DEST`` always
exists; elsewhere it falls back to two renames (``DEST`` is briefly absent and
the old one waits inside the staging folder).

:func:`atomic_write_bytes` stages its file the same way, in
``.NAME.XXXXXXXX.partial/NAME``. While a writer is alive it holds an ``flock``
on its ``.partial`` folder. After each successful commit, leftovers
of the same destination whose lock is free (their writer is dead: the kernel
drops a killed process's locks) are removed. An empty leftover is left alone
for a minute: it may belong to a writer that has just created it and not yet
taken the lock (a writer puts a note in its folder right after locking it).
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:  # POSIX only; without it stale leftovers are simply never removed
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

PARTIAL_SUFFIX = ".partial"
_CONTENT = "content"  # the staged artifact inside a .partial folder
_NOTE = "README.partial"  # what the folder is, for an operator who finds one
_FRESH_S = 60.0  # an empty leftover younger than this may be a writer that is just starting


@contextmanager
def atomic_directory(destination: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temp dir; on success it replaces ``destination`` in one rename."""
    destination = Path(destination)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} already exists")
    destination.parent.mkdir(parents=True, exist_ok=True)
    root, lock = _partial_root(destination)
    try:
        staging = root / _CONTENT
        staging.mkdir()
        with _named(destination):
            yield staging
            _fsync_tree(staging)
        if os.path.lexists(destination):
            if not _exchange(staging, destination):
                os.replace(destination, root / "old")  # fallback: DEST is absent until the next rename
                os.replace(staging, destination)
        else:
            os.replace(staging, destination)
        _fsync_dir(destination.parent)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the staging on failure, the old artifact on success
        _unlock(lock)
    remove_stale_partials(destination)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write a file via a temp sibling + fsync + rename.

    The temp file lives inside a locked ``.NAME.XXXXXXXX.partial`` folder, like
    :func:`atomic_directory`'s staging, so a leftover is a folder that never looks
    like the finished file and is removed by the next successful write.
    """
    path = Path(path)
    root, lock = _partial_root(path)
    try:
        tmp = root / path.name
        with _named(path), open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        _unlock(lock)
    remove_stale_partials(path)


def sha256_file(path: str | Path) -> str:
    """Streaming sha256 of a file (artifacts can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def remove_stale_partials(destination: str | Path) -> list[Path]:
    """Remove the leftovers of writers of ``destination`` that died; return what was removed.

    Only ``.NAME.XXXXXXXX.partial`` entries next to ``destination`` (exactly what
    :func:`atomic_directory` / :func:`atomic_write_bytes` create for that name)
    whose lock can be taken are touched; a live writer keeps its lock, so its
    staging is never removed under it.
    """
    destination = Path(destination)
    pattern = re.compile(re.escape(f".{destination.name}.") + r"[a-z0-9_]{8}" + re.escape(PARTIAL_SUFFIX) + r"\Z")
    return remove_stale_staging(destination.parent, pattern)


def remove_stale_staging(parent: str | Path, pattern: re.Pattern[str]) -> list[Path]:
    """Remove entries of ``parent`` named by ``pattern`` whose writer died; return what was removed.

    An entry counts as dead when its flock can be taken (the kernel drops a killed
    process's locks) and it is not an empty one younger than a minute (a writer
    that has created it and not yet locked it). Links are never followed.
    """
    removed: list[Path] = []
    if fcntl is None:
        return removed
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for entry in entries:
        if not pattern.match(entry.name) or entry.is_symlink():
            continue
        path = Path(entry.path)
        lock = _lock(path, blocking=False)
        if lock is None:
            continue  # a live writer (or a file system without locks): leave it
        try:
            is_dir = entry.is_dir(follow_symlinks=False)
            info = os.stat(path, follow_symlinks=False)
            empty = not any(path.iterdir()) if is_dir else info.st_size == 0
            if empty and time.time() - info.st_mtime < _FRESH_S:
                continue
            if is_dir:
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            continue
        finally:
            _unlock(lock)
    return removed


def locked_staging(parent: str | Path, prefix: str, suffix: str = "", note: str = "") -> tuple[Path, int | None]:
    """Create a fresh folder ``PREFIX + 8 chars + SUFFIX`` in ``parent`` and hold its flock.

    Returns (folder, lock descriptor for :func:`release`). A note is written right
    after locking, so a leftover is never empty (see :func:`remove_stale_staging`).
    """
    root = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    lock = _lock(root)
    try:
        (root / _NOTE).write_text(
            (note or "Incomplete write") + f" by process {os.getpid()}. Never a finished artifact;\n"
            "safe to delete once that process is gone (the next successful run does it).\n"
        )
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        _unlock(lock)
        raise
    return root, lock


def release(lock: int | None) -> None:
    """Drop a lock taken by :func:`locked_staging`."""
    _unlock(lock)


# --- helpers -------------------------------------------------------------------
@contextmanager
def _named(destination: Path) -> Iterator[None]:
    """Give a nameless OSError (``write``/``fsync`` on a full disk: errno 28 and no file)
    the artifact it was writing, so the user reads ``DEST: No space left on device``."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(destination)) from exc
        raise
    except Exception as exc:
        # Writers in other languages lose errno on the way (safetensors: "I/O error: No space
        # left on device (os error 28)", OpenVINO: "basic_ios::clear: iostream error"): if the
        # file system is full right now, that is what went wrong.
        if _disk_full(destination.parent):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(destination)) from exc
        raise


_FULL_BYTES = 1 << 20  # less free space than this, after a failed write, means "disk full"


def _disk_full(directory: Path) -> bool:
    try:
        return shutil.disk_usage(directory).free < _FULL_BYTES
    except OSError:
        return False


def _partial_root(destination: Path) -> tuple[Path, int | None]:
    """Create and lock ``.NAME.XXXXXXXX.partial`` next to ``destination``.

    The note written after taking the lock makes a dead writer's leftover non-empty
    at every later moment (even right after its commit), so cleanup can tell it
    from a writer that has only just created its folder.
    """
    return locked_staging(
        destination.parent, f".{destination.name}.", PARTIAL_SUFFIX, note=f"Incomplete write of {destination.name}"
    )


def _flock(fd: int, blocking: bool = True) -> bool:
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError:
        return False


def _lock(path: Path, blocking: bool = True) -> int | None:
    """An open descriptor holding an exclusive flock on ``path``, or None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    if _flock(fd, blocking):
        return fd
    os.close(fd)
    return None


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing drops the flock


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None
if sys.platform.startswith("linux"):
    try:
        _renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
        _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        _renameat2.restype = ctypes.c_int
    except (OSError, AttributeError):  # no renameat2 in this libc (glibc < 2.28, some musl)
        _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # old kernel or a file system without exchange: use the fallback
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable (power loss); best effort where directories cannot be fsynced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
