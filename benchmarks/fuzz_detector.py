"""Fuzz ``Detector.open`` + ``detect`` over mutated bundles and frames (issue 12).

    python benchmarks/fuzz_detector.py BUNDLE FRAME [FRAME ...] --seconds 600 [--seed 0] [--json OUT]

Every case is one mutation of a real bundle or frame, run in a worker subprocess
(``--worker``) so that a native crash (SIGSEGV in a library) is recorded as a
finding instead of ending the run, and a case that takes longer than
``--case-timeout`` counts as a hang:

* ``manifest``: one field of manifest.json replaced (a number nudged, zeroed,
  negated, made huge, NaN or infinite; a string emptied or made a path; a type
  swapped; the field deleted);
* ``array``: one element, the dtype or the shape of one ``.npy`` file changed,
  every hash then recomputed so ``verify`` passes and only the runtime's own
  checks stand between the crafted array and a verdict;
* ``bytes``: bytes of the ONNX graph flipped (hashes recomputed);
* ``frame``: a frame's bytes flipped, truncated, or its PNG size fields rewritten.

The contract (what counts as a finding): a case either opens and scores the
frames exactly as the original bundle does, or is refused with one BundleError
(ImageError for a frame), never a crash, a hang, an unexpected exception type,
or a non-finite score. Two classes may legitimately score differently and are
counted apart: manifest fields that *are* scoring parameters (``LEGIT_CHANGES``:
the resize, the map blur, the thresholds) and array edits (a changed coreset is
a different model) — those must still give finite scores.

The same code backs the bounded CI runs in ``tests/test_fuzz.py``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import recompute_hashes  # noqa: E402  the one re-hash helper, shared with the tests

MANIFEST = "manifest.json"
# Manifest fields that are scoring parameters: a change may give another finite score.
LEGIT_CHANGES = (("preprocess", "resize"), ("scoring", "blur_sigma"), ("threshold",), ("engines",))
FINDINGS = ("crash", "hang", "nonfinite", "unexpected", "silently-different")


# ----------------------------------------------------------------------------- worker side
def worker() -> None:
    """Read one JSON case per line, answer one JSON line: what opening and scoring gave."""
    from edgecore.runtime.detector import Detector
    from edgecore.runtime.errors import BundleError, ImageError, NonFiniteError

    for line in sys.stdin:
        case = json.loads(line)
        answer: dict = {"open": "ok", "frames": []}
        try:
            detector = Detector.open(case["bundle"])
        except BundleError as exc:
            answer.update(open="BundleError", message=str(exc)[:300])
        except BaseException as exc:  # noqa: BLE001 - everything else is a finding
            answer.update(open=type(exc).__name__, message=str(exc)[:300])
        else:
            with detector:
                for frame in case["frames"]:
                    try:
                        result = detector.detect(frame)
                        digest = hashlib.sha256(np.ascontiguousarray(result.map, np.float32).tobytes()).hexdigest()
                        finite = all(math.isfinite(v) for v in (result.score, result.normalized_score))
                        finite = finite and bool(np.isfinite(result.map).all())
                        answer["frames"].append({"kind": "ok", "score": result.score, "map": digest, "finite": finite})
                    except (ImageError, NonFiniteError, BundleError) as exc:
                        answer["frames"].append({"kind": type(exc).__name__, "message": str(exc)[:200]})
                    except BaseException as exc:  # noqa: BLE001
                        answer["frames"].append({"kind": "unexpected", "message": f"{type(exc).__name__}: {exc}"[:300]})
        sys.stdout.write(json.dumps(answer, allow_nan=True) + "\n")
        sys.stdout.flush()


class Worker:
    """A persistent worker process; restarted after a crash or a hang."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.process: subprocess.Popen | None = None

    def _start(self) -> None:
        env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, env=env,
        )

    def run(self, bundle: Path, frames: list[str]) -> dict:
        if self.process is None or self.process.poll() is not None:
            self._start()
        assert self.process and self.process.stdin and self.process.stdout
        self.process.stdin.write(json.dumps({"bundle": str(bundle), "frames": frames}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], self.timeout_s)
        if not ready:
            self.close()
            return {"open": "hang"}
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            self.process = None
            return {"open": "crash", "message": f"worker died with exit status {code}"}
        return json.loads(line)

    def close(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


# ----------------------------------------------------------------------------- mutations
def leaf_paths(value, prefix: tuple = ()) -> list[tuple]:
    """Every field of a JSON value, as key/index paths (containers included)."""
    paths = [prefix] if prefix else []
    if isinstance(value, dict):
        for key in sorted(value):
            paths += leaf_paths(value[key], prefix + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            paths += leaf_paths(item, prefix + (i,))
    return paths


def replacements(value) -> list:
    """Candidate replacements for one field (plus the sentinel DELETE)."""
    common = [None, True, "x", [], {}, DELETE]
    if isinstance(value, bool):
        return [not value, 0, 1, *common]
    if isinstance(value, int):
        return [value + 1, value - 1, 0, -1, -value, value * 2, 2**31, 2**63, 10**30, float(value), float("nan"), *common]
    if isinstance(value, float):
        return [value * 1.001, -value, 0.0, 1e308, float("nan"), float("inf"), -float("inf"), int(value), *common]
    if isinstance(value, str):
        return ["", "../" + value, "/etc/passwd", value.upper(), value + "x", "~" + value, 1, *common]
    if isinstance(value, list):
        return [value[:-1], value + value[-1:], list(reversed(value)), [], *common[:-2], DELETE]
    return [*common]


DELETE = object()


def apply(manifest: dict, path: tuple, new) -> dict:
    changed = copy.deepcopy(manifest)
    parent = changed
    for key in path[:-1]:
        parent = parent[key]
    if new is DELETE:
        if isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent.pop(path[-1])
    else:
        parent[path[-1]] = new
    return changed


def is_legit(path: tuple) -> bool:
    return any(path[: len(prefix)] == prefix for prefix in LEGIT_CHANGES)


def linked_copy(source: Path, target: Path, writable: set[str] = frozenset()) -> Path:
    """A copy of a bundle made of hard links, except the files that a case will rewrite."""
    for path in source.rglob("*"):
        relative = path.relative_to(source).as_posix()
        out = target / relative
        if path.is_dir():
            out.mkdir(parents=True, exist_ok=True)
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        if relative in writable or relative == MANIFEST:
            shutil.copy2(path, out)
        else:
            os.link(path, out)
    return target


def mutate_array(path: Path, rng: random.Random) -> str:
    array = np.load(path, allow_pickle=False)
    how = rng.choice(["element", "element", "element", "dtype", "shape"])
    if how == "dtype":
        target = rng.choice([np.float32, np.float64, np.int64, np.int8, np.uint8, np.float16])
        np.save(path, array.astype(target), allow_pickle=False)
        return f"dtype {array.dtype}->{np.dtype(target)}"
    if how == "shape" or array.size == 0:
        if array.ndim and array.shape[0] > 1:
            np.save(path, array[: rng.randrange(1, array.shape[0])], allow_pickle=False)
            return "rows cut"
        np.save(path, array.reshape(-1), allow_pickle=False)
        return "flattened"
    flat = array.reshape(-1).copy()
    at = rng.randrange(flat.size)
    if flat.dtype.kind == "f":
        value = rng.choice([np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, float(flat[at]) * -1])
    else:
        info = np.iinfo(flat.dtype)
        value = rng.choice([info.min, info.max, -1, 0, int(flat[at]) + 1, 10**6])
        value = int(np.clip(value, info.min, info.max))
    flat[at] = value
    np.save(path, flat.reshape(array.shape), allow_pickle=False)
    return f"element {at} = {value}"


def mutate_frame(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    how = rng.choice(["flip", "flip", "truncate", "png-size", "png-size"])
    if how == "png-size" and data.startswith(b"\x89PNG"):
        width = rng.choice([0, 1, 2**31 - 1, 80_000_000, 65535, rng.randrange(1, 5000)])
        height = rng.choice([0, 1, 2**31 - 1, 2, rng.randrange(1, 5000)])
        ihdr = struct.pack(">II", width, height) + data[24:29]
        chunk = b"IHDR" + ihdr
        return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk) & 0xFFFFFFFF) + data[33:], (
            f"png size {width}x{height}"
        )
    if how == "truncate":
        cut = rng.randrange(1, len(data))
        return data[:cut], f"truncated at {cut}"
    out = bytearray(data)
    for _ in range(rng.randrange(1, 9)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out), "bytes flipped"


# ----------------------------------------------------------------------------- the run
@dataclass
class Report:
    executions: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    findings: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def to_json(self) -> dict:
        return {"executions": self.executions, "outcomes": dict(sorted(self.outcomes.items())),
                "findings": self.findings, "seconds": round(self.seconds, 1)}


def classify(answer: dict, baseline: list[dict], kind: str, path: tuple = ()) -> str:
    """The outcome of one case; FINDINGS are contract violations."""
    opened = answer.get("open")
    if opened in ("crash", "hang"):
        return opened
    if opened == "BundleError":
        return "refused"
    if opened != "ok":
        return "unexpected"
    frames = answer["frames"]
    if any(f["kind"] == "unexpected" for f in frames):
        return "unexpected"
    if any(f["kind"] == "ok" and not f["finite"] for f in frames):
        return "nonfinite"
    if any(f["kind"] == "NonFiniteError" for f in frames):
        return "nonfinite-refused"  # an error, not a verdict: allowed
    if kind == "frame":
        return "frame-refused" if frames[0]["kind"] == "ImageError" else "frame-scored"
    same = all(
        f["kind"] == b["kind"] and (f["kind"] != "ok" or (f["score"] == b["score"] and f["map"] == b["map"]))
        for f, b in zip(frames, baseline)
    )
    if same:
        return "same"
    if kind == "manifest" and not is_legit(path):
        return "silently-different"
    return "changed-legit" if kind == "manifest" else "changed-model"


def run(bundle: Path, frames: list[Path], seconds: float, seed: int = 0, case_timeout: float = 120.0,
        max_cases: int | None = None, log=print) -> Report:
    """Fuzz for ``seconds`` (or ``max_cases``); returns counts and every finding."""
    rng = random.Random(seed)
    report = Report()
    started = time.monotonic()
    worker_ = Worker(case_timeout)
    manifest = json.loads((bundle / MANIFEST).read_text())
    paths = leaf_paths(manifest)
    arrays = sorted(n for n in manifest["files"] if n.endswith(".npy"))
    graph = manifest["graph"]["file"]
    frame_paths = [str(f) for f in frames]
    frame_bytes = [Path(f).read_bytes() for f in frames]
    scratch = Path(tempfile.mkdtemp(prefix="edgecore-fuzz-"))
    try:
        baseline = worker_.run(bundle, frame_paths)
        assert baseline.get("open") == "ok", f"the unmutated bundle must open: {baseline}"
        baseline_frames = baseline["frames"]
        case_no = 0
        while time.monotonic() - started < seconds and (max_cases is None or case_no < max_cases):
            case_no += 1
            kind = rng.choices(["manifest", "array", "bytes", "frame"], weights=[6, 3, 1, 3])[0]
            target = scratch / f"case{case_no}" / bundle.name
            path: tuple = ()
            if kind == "frame":
                which = rng.randrange(len(frame_bytes))
                data, what = mutate_frame(frame_bytes[which], rng)
                frame_file = scratch / f"case{case_no}.png"
                frame_file.parent.mkdir(parents=True, exist_ok=True)
                frame_file.write_bytes(data)
                answer = worker_.run(bundle, [str(frame_file)])
                description = f"frame {Path(frame_paths[which]).name}: {what}"
            elif kind == "manifest":
                path = rng.choice(paths)
                old = manifest
                for key in path:
                    old = old[key]
                new = rng.choice(replacements(old))
                linked_copy(bundle, target)
                (target / MANIFEST).write_text(json.dumps(apply(manifest, path, new)))
                answer = worker_.run(target, frame_paths)
                description = f"manifest {'.'.join(map(str, path))} = {'<deleted>' if new is DELETE else repr(new)[:60]}"
            elif kind == "array":
                name = rng.choice(arrays)
                linked_copy(bundle, target, writable={name})
                what = mutate_array(target / name, rng)
                recompute_hashes(target)
                answer = worker_.run(target, frame_paths)
                description = f"array {name}: {what}"
            else:
                linked_copy(bundle, target, writable={graph})
                data = bytearray((target / graph).read_bytes())
                for _ in range(rng.randrange(1, 17)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                (target / graph).write_bytes(bytes(data))
                recompute_hashes(target)
                answer = worker_.run(target, frame_paths)
                description = f"bytes of {graph} flipped"
            outcome = classify(answer, baseline_frames, kind, path)
            report.executions += 1
            report.count(outcome)
            if outcome in FINDINGS:
                finding = {"case": case_no, "kind": kind, "what": description, "outcome": outcome,
                           "detail": str(answer)[:400]}
                report.findings.append(finding)
                log(f"FINDING {outcome}: {description}: {finding['detail'][:200]}")
            shutil.rmtree(scratch / f"case{case_no}", ignore_errors=True)
    finally:
        worker_.close()
        shutil.rmtree(scratch, ignore_errors=True)
        report.seconds = time.monotonic() - started
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("bundle", nargs="?", type=Path)
    parser.add_argument("frames", nargs="*", type=Path)
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case-timeout", type=float, default=120.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        worker()
        return 0
    if args.bundle is None or not args.frames:
        parser.error("BUNDLE and at least one FRAME are required")
    report = run(args.bundle, args.frames, args.seconds, args.seed, args.case_timeout)
    result = {**report.to_json(), "seed": args.seed, "bundle": str(args.bundle), "load": os.getloadavg()}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
