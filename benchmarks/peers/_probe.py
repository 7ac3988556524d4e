"""Measurement helpers shared by the two peer sides (the project's python and anomalib's venv).

Plain stdlib, imported by file location: each side runs as a script from this folder.
"""
from __future__ import annotations

import json
import resource
import sys


def emit(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def vm_hwm_mib() -> float:
    """Peak RSS of this process's own address space (/proc/self/status VmHWM).

    ru_maxrss can carry the spawning parent's peak across fork/vfork + exec on Linux
    (exec folds the old mm's high-water mark into the signal struct's maxrss), so a
    small child of a big parent reports the parent's number; VmHWM starts fresh at exec.
    """
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")
