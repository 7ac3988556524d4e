"""Frame sources: a watched folder (exactly once, also across restarts), video/V4L2/RTSP through
OpenCV (reconnect with backoff), GenICam cameras through harvesters. HTTP push lives in http.py.

Each source runs in its own thread and hands frames to ``submit(frame) -> bool`` (the service's
bounded queue; False once the service is stopping). Files and video files wait when the queue is
full (nothing is lost); live streams drop the frame instead (counted), so a slow detector never
lets a camera's stream go stale.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from edgecore.runtime.errors import EdgecoreError
from edgecore.runtime.frames import IMAGE_EXTENSIONS
from edgecore.runtime.fsutil import atomic_write_bytes
from edgecore.runtime.serve.frames import Frame, Result

# Suffixes of the formats load_image accepts (it still checks the bytes against its allow-list).
JOURNAL_NAME = ".edgecore-journal.jsonl"


class SourceError(EdgecoreError):
    """A source that cannot be opened (named, with the reason)."""


class Source:
    name = "source"
    finite = False  # ends by itself (a video file, the folder's backlog is not: it keeps watching)

    def __init__(self, submit: Callable[[Frame, bool], bool], log: Callable[[str], None]) -> None:
        self.submit = submit
        self.log = log
        self.stop_event = threading.Event()
        self.done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_guarded, name=f"source-{self.name}", daemon=True)
        self._thread.start()

    def _run_guarded(self) -> None:
        try:
            self.run()
        except Exception as exc:  # a source failing must not take the service down silently
            self.log(f"error: source {self.name}: {exc}")
        finally:
            self.done.set()

    def run(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread:
            self._thread.join(timeout)


# --- watched folder ------------------------------------------------------------------
class Journal:
    """Which files were scored: one JSON line per file (name, size, mtime), fsynced.

    A file is journaled after its result went to the sinks, so a crash in between scores it
    once more on restart (never zero times); a clean stop never does.
    """

    def __init__(self, path: Path, folder: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.seen: set[tuple[str, int, int]] = set()
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.seen.add((entry["name"], int(entry["size"]), int(entry["mtime_ns"])))
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line after a power cut: that file is scored again
        # Forget files that are gone, so the journal stays as small as the folder.
        present = {key for key in self.seen if _key(folder / key[0]) == key}
        if present != self.seen or not path.exists():
            self.seen = present
            atomic_write_bytes(path, "".join(_line(k) for k in sorted(present)).encode())
        self._handle = open(path, "a", encoding="utf-8")

    def __contains__(self, key: tuple[str, int, int]) -> bool:
        return key in self.seen

    def add(self, key: tuple[str, int, int]) -> None:
        with self._lock:
            self.seen.add(key)
            self._handle.write(_line(key))
            self._handle.flush()
            os.fsync(self._handle.fileno())

    def close(self) -> None:
        with self._lock:
            self._handle.close()


def _line(key: tuple[str, int, int]) -> str:
    return json.dumps({"name": key[0], "size": key[1], "mtime_ns": key[2]}) + "\n"


def _key(path: Path) -> tuple[str, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (path.name, stat.st_size, stat.st_mtime_ns)


class FolderSource(Source):
    """New image files in a folder (watchdog/inotify), each scored exactly once, optionally moved after."""

    name = "watch"
    SETTLE_S = 0.15  # a file without a close event counts as written once its size holds this long

    def __init__(self, folder: Path, submit, log, journal: Path | None = None, move_to: Path | None = None) -> None:
        super().__init__(submit, log)
        self.folder = Path(folder)
        self.move_to = Path(move_to) if move_to else None
        if self.move_to:
            self.move_to.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(journal or self.folder / JOURNAL_NAME, self.folder)
        self._pending: dict[Path, tuple[int, float]] = {}  # written without a close event yet
        self._queued: set[tuple[str, int, int]] = set()  # submitted, result not yet journaled
        self._ready: list[Path] = []  # written and closed: score now
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def _candidate(self, path: Path, settled: bool) -> None:
        if path.parent != self.folder or path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith("."):
            return
        with self._lock:
            if settled:
                self._pending.pop(path, None)
                self._ready.append(path)
            else:
                self._pending[path] = (-1, time.monotonic())
        self._wake.set()

    def run(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        source = self

        class Handler(FileSystemEventHandler):
            def on_closed(self, event):
                if not event.is_directory:
                    source._candidate(Path(event.src_path), settled=True)

            def on_moved(self, event):
                if not event.is_directory:
                    source._candidate(Path(event.dest_path), settled=True)

            def on_created(self, event):
                if not event.is_directory:
                    source._candidate(Path(event.src_path), settled=False)

            def on_modified(self, event):
                if not event.is_directory:
                    source._candidate(Path(event.src_path), settled=False)

        observer = Observer()
        observer.schedule(Handler(), str(self.folder), recursive=False)
        observer.start()  # before the scan: a file arriving in between is seen by one or both (deduplicated)
        try:
            if self.move_to:  # journaled but not moved (stopped in between): move them now
                for path in sorted(self.folder.iterdir()):
                    if _key(path) in self.journal:
                        self._move(path)
            for path in sorted(self.folder.iterdir()):
                if path.is_file():
                    self._candidate(path, settled=False)  # may still be being written: let it settle
            while not self.stop_event.is_set():
                self._wake.wait(self.SETTLE_S / 2)
                self._wake.clear()
                for path in self._take_ready():
                    if self.stop_event.is_set() or not self._offer(path):
                        return  # what is not offered stays unjournaled: the next start scores it
        finally:
            observer.stop()
            observer.join(5)

    def _take_ready(self) -> list[Path]:
        now = time.monotonic()
        with self._lock:
            ready, self._ready = self._ready, []
            for path, (size, since) in list(self._pending.items()):
                key = _key(path)
                if key is None:
                    del self._pending[path]
                elif key[1] != size:
                    self._pending[path] = (key[1], now)
                elif now - since >= self.SETTLE_S:
                    del self._pending[path]
                    ready.append(path)
        return ready

    def _offer(self, path: Path) -> bool:
        key = _key(path)
        if key is None or key in self.journal:
            return True
        with self._lock:
            if key in self._queued:
                return True
            self._queued.add(key)
        frame = Frame(id=f"watch:{path.name}", source=self.name, image=path, name=path.name,
                      on_done=lambda result, key=key, path=path: self._finished(key, path))
        if not self.submit(frame, True):
            with self._lock:
                self._queued.discard(key)
            return False
        return True

    def _finished(self, key: tuple[str, int, int], path: Path) -> None:
        self.journal.add(key)
        with self._lock:
            self._queued.discard(key)
        if self.move_to:
            self._move(path)

    def _move(self, path: Path) -> None:
        target = self.move_to / path.name
        if target.exists():
            target = self.move_to / f"{path.stem}.{time.time_ns()}{path.suffix}"
        try:
            shutil.move(str(path), str(target))
        except OSError as exc:
            self.log(f"warning: could not move {path} to {self.move_to}: {exc}")

    def stop(self) -> None:
        super().stop()
        self._wake.set()

    def close(self) -> None:
        self.journal.close()


# --- video / V4L2 / RTSP ----------------------------------------------------------
class VideoSource(Source):
    """A video file, a V4L2 device (``/dev/video0`` or ``0``) or a stream URL through OpenCV.

    A file is read to its end, waiting for the queue (every frame scored); a device or stream
    drops frames while the queue is full and reconnects with exponential backoff when it breaks.
    """

    BACKOFF_S = (0.25, 8.0)

    def __init__(self, url: str, submit, log, rate: float = 0.0, on_reconnect=lambda: None) -> None:
        super().__init__(submit, log)
        self.url = url
        self.is_file = "://" not in url and not url.isdigit() and not url.startswith("/dev/")
        self.finite = self.is_file
        self.rate = rate
        self.name = "video"
        self.on_reconnect = on_reconnect
        self.frames = 0

    def _open(self):
        import cv2

        capture = cv2.VideoCapture(int(self.url) if self.url.isdigit() else self.url)
        if not capture.isOpened():
            capture.release()
            return None
        return capture

    def run(self) -> None:
        import cv2

        delay = self.BACKOFF_S[0]
        capture = self._open()
        if capture is None and self.is_file:
            raise SourceError(f"--video {self.url}: OpenCV cannot open it (not a video it can decode)")
        period = 1.0 / self.rate if self.rate else 0.0
        next_at = time.perf_counter()
        while not self.stop_event.is_set():
            if capture is None:  # a stream or device that is down: retry with backoff
                if self.stop_event.wait(delay):
                    break
                delay = min(delay * 2, self.BACKOFF_S[1])
                capture = self._open()
                if capture is not None:
                    self.on_reconnect()
                    self.log(f"source video {self.url}: reconnected")
                continue
            ok, bgr = capture.read()
            if not ok:
                capture.release()
                capture = None
                if self.is_file:
                    break  # end of the file
                self.log(f"source video {self.url}: stream lost; reconnecting")
                continue
            delay = self.BACKOFF_S[0]
            if period:
                next_at += period
                pause = next_at - time.perf_counter()
                if pause > 0 and self.stop_event.wait(pause):
                    break
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            frame = Frame(id=f"video:{self.frames:08d}", source=self.name, image=rgb, name=f"{self.frames}")
            self.frames += 1
            if not self.submit(frame, self.is_file) and self.is_file:
                break
        if capture is not None:
            capture.release()


# --- GenICam --------------------------------------------------------------------
def genicam_available(cti: Path | None) -> tuple[bool, str]:
    """(usable, reason): harvesters installed, a GenTL producer given, and a camera behind it."""
    try:
        from harvesters.core import Harvester
    except ImportError:
        return False, 'harvesters is not installed (pip install "edgecore[genicam]")'
    if cti is None or not Path(cti).is_file():
        return False, "no GenTL producer (.cti) file given or found"
    harvester = Harvester()
    try:
        harvester.add_file(str(cti))
        harvester.update()
        if not harvester.device_info_list:
            return False, f"no GenICam camera found through {cti}"
        return True, ""
    finally:
        harvester.reset()


class GenICamSource(Source):
    """The first camera of a GenTL producer, through harvesters (frames dropped when the queue is full)."""

    name = "genicam"

    def __init__(self, cti: Path, submit, log) -> None:
        super().__init__(submit, log)
        usable, reason = genicam_available(cti)
        if not usable:
            raise SourceError(f"--genicam {cti}: {reason}")
        self.cti = Path(cti)

    def run(self) -> None:
        import numpy as np
        from harvesters.core import Harvester

        harvester = Harvester()
        harvester.add_file(str(self.cti))
        harvester.update()
        acquirer = harvester.create(0)
        acquirer.start()
        count = 0
        try:
            while not self.stop_event.is_set():
                with acquirer.fetch(timeout=1.0) as buffer:
                    component = buffer.payload.components[0]
                    channels = max(1, component.data.size // (component.height * component.width))
                    image = np.array(component.data.reshape(component.height, component.width, channels))
                self.submit(Frame(id=f"genicam:{count:08d}", source=self.name, image=image, name=str(count)), False)
                count += 1
        finally:
            acquirer.stop()
            acquirer.destroy()
            harvester.reset()


def finish(result: Result) -> None:
    """Run a frame's completion hook (journal, move) once its result reached the sinks."""
    if result.frame.on_done is not None:
        result.frame.on_done(result)
