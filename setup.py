"""Builds the native int8 search kernel and PNG unfilter (edgecore.runtime.native); metadata: pyproject.toml.

Plain C loaded with ctypes (no Python C-API). Compiled for the baseline ISA only: the AVX2 / AVX-VNNI /
AVX-512 VNNI / NEON paths are per-function targets chosen at run time, so a wheel built on a workstation
runs on an AVX2-only or aarch64 camera. Never add -march here. -ffp-contract=off keeps every path's key
arithmetic identical (no fused multiply-add on one path and not another). Optional: without a compiler
the package installs and the search falls back to numpy/hnswlib with a warning.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "edgecore.runtime.native._int8search",
            sources=["runtime/native/int8search.c"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-std=gnu11"],
            extra_link_args=["-pthread"],
            libraries=["m"],
            optional=True,
        ),
        Extension(  # PNG row reconstruction for edgecore.runtime.png (portable C; AVX2 chosen at run time)
            "edgecore.runtime.native._pngfilter",
            sources=["runtime/native/pngfilter.c"],
            extra_compile_args=["-O2", "-std=gnu11"],  # -O3 if-converts the Paeth rows worse: 3.4 vs 2.6 ms
            optional=True,
        ),
        Extension(  # resample v2's box reduction and bilinear passes (plain C, vectorised by -O3)
            "edgecore.runtime.native._resample",
            sources=["runtime/native/reduce.c"],
            extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off"],  # Pillow's coefficients, no FMA
            libraries=["m"],
            optional=True,
        ),
    ]
)
