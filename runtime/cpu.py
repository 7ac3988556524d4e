"""What the CPU can do (Linux /proc/cpuinfo): for reports and for engines tied to an ISA."""
from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, ISA flags); empty flags where /proc/cpuinfo is unavailable."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor(), frozenset()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return model, frozenset(flags)


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below which int8 kernels run without VNNI.
_CAPS_WITHOUT_VNNI = {"SSE41", "AVX", "AVX2", "AVX512_CORE"}


def has_vnni() -> bool:
    """VNNI/AMX multiply int8 without saturating (no 7-bit weight 'overflow fix' needed).

    Honours an ONEDNN_MAX_CPU_ISA cap (camera emulation): capped to AVX2, the
    kernels that run have no VNNI even if the CPU does.
    """
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _CAPS_WITHOUT_VNNI:
        return False
    return bool(cpu_info()[1] & {"avx512_vnni", "avx_vnni", "amx_int8"})


_CAPS_WITH_BF16 = {"AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX"}


def isa_capped_below_bf16() -> bool:
    """True when ONEDNN_MAX_CPU_ISA hides bf16 kernels. OpenVINO picks its default precision
    from the CPU's flags, not from the cap, and then finds no bf16 kernel for some layers."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return bool(cap) and cap not in _CAPS_WITH_BF16
