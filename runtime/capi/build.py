"""Build libedgecore.so, the C API of the edgecore runtime, with cffi's embedding mode.

    python -m edgecore.runtime.capi.build --out DIR [--prefix PREFIX]

``--out DIR`` leaves ``libedgecore.so`` and ``edgecore.h`` in DIR; ``--prefix``
installs ``include/edgecore.h``, ``lib/libedgecore.so`` and
``lib/pkgconfig/edgecore.pc`` under PREFIX (either option, or both).

How the pieces fit (cffi's embedding mode):

* The exported functions are the small C wrappers in ``C_SOURCE``. They check
  NULL pointers, start Python once (``ec__start_python``: PyConfig, as the
  building interpreter, no signal handlers, failure = an error code instead of
  an abort), then call a Python "twin" declared with ``embedding_api``.
* A twin returns ``DONE | status``: cffi makes a Python-implemented function
  return zeros when its own start-up fails, and 0 is EC_OK, so a wrapper only
  trusts a result that carries the DONE bit.
* ``ec_last_error`` and its buffer are plain C (``__thread``): thread-local by
  construction and usable even when Python never started.
* The init code (frozen into the .so, run on the first call into Python) adds
  the builder's site-packages, then binds the twins from
  :mod:`edgecore.runtime.capi`. If that import fails, every call returns
  EC_ERR_RUNTIME and ``ec_last_error`` says why.
* A linker version script exports only ``ec_*``; the twins stay internal.
"""
from __future__ import annotations

import argparse
import re
import shutil
import site
import sys
import sysconfig
import tempfile
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "edgecore.h"
LIBRARY = "libedgecore.so"

# Python implementations (the "twins" of the public C functions). They go through
# embedding_api, so cffi defines them as C functions that run Python; the linker
# version script keeps them out of the library's exported symbols.
EMBEDDING_API = """
const char *_ec_py_version(void);
int _ec_py_open(const char *, const char *, const char *, const char *, uintptr_t *);
int _ec_py_map_size(uintptr_t, int *, int *);
int _ec_py_detect(uintptr_t, const uint8_t *, int, int, int, int, ec_result_t *, float *, size_t);
int _ec_py_close(uintptr_t);
"""

# Plain C helpers the Python side calls through `lib`.
HELPERS_CDEF = """
#define EC__DONE 256
void _ec_set_error(const char *message);
"""

# Only the header's functions are exported.
VERSION_SCRIPT = "{ global: ec_*; local: *; };\n"

C_SOURCE = r"""
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include "edgecore.h"

#define EC__DONE 256  /* set by every Python twin that really ran: see edgecore.runtime.capi */
#define EC__PROGRAM %(program)s  /* the interpreter that built the library */

static __thread char ec__error[1024];
static pthread_once_t ec__python_once = PTHREAD_ONCE_INIT;
static char ec__python_failure[768];  /* written once, under ec__python_once */

/* Called from Python (through `lib`) and from the wrappers; the buffer is per thread. */
static void _ec_set_error(const char *message) {
    snprintf(ec__error, sizeof ec__error, "%%s", message ? message : "");
}

/* The Python twins; cffi defines them further down this file (embedding_api). */
const char *_ec_py_version(void);
int _ec_py_open(const char *, const char *, const char *, const char *, uintptr_t *);
int _ec_py_map_size(uintptr_t, int *, int *);
int _ec_py_detect(uintptr_t, const uint8_t *, int, int, int, int, ec_result_t *, float *, size_t);
int _ec_py_close(uintptr_t);

/* Start CPython ourselves, before cffi would (its Py_InitializeEx(0) is then a no-op):
   - as the building interpreter (program_name = its executable), so the standard library
     and site-packages are that interpreter's (or its venv's), not those of whichever
     "python3" comes first on PATH, which is what a bare Py_InitializeEx picks;
   - with PyConfig, so a broken installation is an error code, not a Py_FatalError abort;
   - without Python's signal handlers (the host program keeps SIGINT). */
static void ec__start_python(void) {
    PyConfig config;
    PyStatus status;
    if (Py_IsInitialized())
        return;  /* loaded into a process that already runs Python */
    PyConfig_InitPythonConfig(&config);  /* honours PYTHONHOME / PYTHONPATH */
    config.install_signal_handlers = 0;
    config.parse_argv = 0;
    status = PyConfig_SetBytesString(&config, &config.program_name, EC__PROGRAM);
    if (!PyStatus_Exception(status))
        status = Py_InitializeFromConfig(&config);
    PyConfig_Clear(&config);
    if (PyStatus_Exception(status)) {
        snprintf(ec__python_failure, sizeof ec__python_failure,
                 "edgecore: the embedded Python (%%s) failed to start: %%s%%s%%s; check PYTHONHOME/PYTHONPATH "
                 "(see edgecore's capi/README.md)", EC__PROGRAM, status.func ? status.func : "",
                 status.func ? ": " : "", status.err_msg ? status.err_msg : "unknown error");
        return;
    }
    PyEval_SaveThread();  /* release the GIL: cffi takes it on every call */
}

static ec_status_t ec__fail(ec_status_t status, const char *message) {
    _ec_set_error(message);
    return status;
}

/* 1 if Python runs; otherwise sets this thread's error and returns 0. */
static int ec__python_ready(void) {
    pthread_once(&ec__python_once, ec__start_python);
    if (ec__python_failure[0] == '\0')
        return 1;
    _ec_set_error(ec__python_failure);
    return 0;
}

/* A twin returns DONE | status; cffi returns 0 from it if its own start-up failed. */
static ec_status_t ec__finish(int result) {
    if (result & EC__DONE)
        return (ec_status_t)(result & ~EC__DONE);
    return ec__fail(EC_ERR_RUNTIME, "edgecore: the embedded Python runtime failed to initialise "
                                    "(details on stderr)");
}

EC_API const char *ec_last_error(void) { return ec__error; }

EC_API const char *ec_status_string(ec_status_t status) {
    switch (status) {
    case EC_OK: return "EC_OK";
    case EC_ERR_NULL_ARGUMENT: return "EC_ERR_NULL_ARGUMENT";
    case EC_ERR_INVALID_ARGUMENT: return "EC_ERR_INVALID_ARGUMENT";
    case EC_ERR_BUFFER_TOO_SMALL: return "EC_ERR_BUFFER_TOO_SMALL";
    case EC_ERR_BUNDLE: return "EC_ERR_BUNDLE";
    case EC_ERR_IMAGE: return "EC_ERR_IMAGE";
    case EC_ERR_RUNTIME: return "EC_ERR_RUNTIME";
    case EC_ERR_INVALID_HANDLE: return "EC_ERR_INVALID_HANDLE";
    case EC_ERR_NONFINITE: return "EC_ERR_NONFINITE";
    }
    return "EC_ERR_UNKNOWN";
}

EC_API const char *ec_version(void) {
    const char *version = NULL;
    pthread_once(&ec__python_once, ec__start_python);  /* not ec__python_ready: keep the error */
    if (ec__python_failure[0] == '\0')
        version = _ec_py_version();
    return version ? version : "unknown";
}

EC_API ec_status_t ec_open(const char *bundle_path, const char *backend, const char *device,
                           const char *precision, ec_detector_t **out) {
    uintptr_t id = 0;
    ec_status_t status;
    ec__error[0] = '\0';
    if (out == NULL)
        return ec__fail(EC_ERR_NULL_ARGUMENT, "ec_open: out is NULL");
    *out = NULL;
    if (bundle_path == NULL)
        return ec__fail(EC_ERR_NULL_ARGUMENT, "ec_open: bundle_path is NULL");
    if (!ec__python_ready())
        return EC_ERR_RUNTIME;
    status = ec__finish(_ec_py_open(bundle_path, backend, device, precision, &id));
    if (status == EC_OK)
        *out = (ec_detector_t *)id;
    return status;
}

EC_API ec_status_t ec_map_size(const ec_detector_t *detector, int *width, int *height) {
    int w = 0, h = 0;
    ec_status_t status;
    ec__error[0] = '\0';
    if (detector == NULL || width == NULL || height == NULL)
        return ec__fail(EC_ERR_NULL_ARGUMENT, "ec_map_size: detector, width and height must not be NULL");
    if (!ec__python_ready())
        return EC_ERR_RUNTIME;
    status = ec__finish(_ec_py_map_size((uintptr_t)detector, &w, &h));
    if (status == EC_OK) {
        *width = w;
        *height = h;
    }
    return status;
}

EC_API ec_status_t ec_detect(ec_detector_t *detector, const uint8_t *pixels, int width, int height,
                             int stride_bytes, ec_pixel_format_t format, ec_result_t *out,
                             float *map, size_t map_capacity) {
    ec_result_t result = {0.0, 0.0, 0};
    ec_status_t status;
    ec__error[0] = '\0';
    if (detector == NULL)
        return ec__fail(EC_ERR_NULL_ARGUMENT, "ec_detect: detector is NULL");
    if (pixels == NULL)
        return ec__fail(EC_ERR_NULL_ARGUMENT, "ec_detect: pixels is NULL");
    if (out == NULL)
        return ec__fail(EC_ERR_NULL_ARGUMENT, "ec_detect: out is NULL");
    if (map == NULL && map_capacity != 0)
        return ec__fail(EC_ERR_NULL_ARGUMENT, "ec_detect: map is NULL but map_capacity is not 0");
    if (!ec__python_ready())
        return EC_ERR_RUNTIME;
    status = ec__finish(_ec_py_detect((uintptr_t)detector, pixels, width, height, stride_bytes,
                                      (int)format, &result, map, map_capacity));
    if (status == EC_OK)
        *out = result;
    return status;
}

EC_API void ec_close(ec_detector_t *detector) {
    ec__error[0] = '\0';
    if (detector != NULL && ec__python_ready())
        (void)ec__finish(_ec_py_close((uintptr_t)detector));
}
"""

INIT_CODE = """
import site, sys
for _directory in {site_dirs!r}:  # the builder's site-packages (venvs included)
    if _directory not in sys.path:
        site.addsitedir(_directory)
from {module} import ffi, lib
try:
    from edgecore.runtime.capi import install
    install(ffi, lib)
except BaseException as _exc:
    _message = ("edgecore: cannot load the edgecore runtime in the embedded Python "
                f"({{type(_exc).__name__}}: {{_exc}}); sys.prefix={{sys.prefix}}; "
                "set PYTHONPATH/PYTHONHOME (see edgecore's capi/README.md)").encode("utf-8", "replace")[:1000]

    def _unavailable(*args):
        lib._ec_set_error(_message)
        return lib.EC__DONE | lib.EC_ERR_RUNTIME

    for _name in ("_ec_py_open", "_ec_py_map_size", "_ec_py_detect", "_ec_py_close"):
        ffi.def_extern(name=_name)(_unavailable)
    ffi.def_extern(name="_ec_py_version")(lambda: ffi.NULL)
"""


def header_declarations(header: str) -> str:
    """The cffi-parsable part of edgecore.h: between the cffi-begin and cffi-end markers."""
    match = re.search(r"/\* cffi-begin.*?\*/(.*)/\* cffi-end \*/", header, re.S)
    if match is None:
        raise RuntimeError(f"{HEADER}: cffi-begin / cffi-end markers not found")
    return match.group(1)


def site_dirs() -> list[str]:
    """Where the builder's Python finds edgecore and its dependencies.

    The library starts Python as the building interpreter, which normally yields
    these already; adding them again (a no-op then) keeps edgecore importable
    when that executable is gone at run time and Python falls back to libpython's
    compiled-in prefix. PYTHONPATH still adds to it at run time.
    """
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and Path(site.getusersitepackages()).is_dir():
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def c_string(text: str) -> str:
    """A C string literal (json's escapes are valid C for these paths)."""
    import json

    return json.dumps(text)


def make_ffibuilder(version_script: Path, module: str = "_edgecore_cffi") -> FFI:
    ffibuilder = FFI()
    ffibuilder.cdef(header_declarations(HEADER.read_text()))
    ffibuilder.cdef(HELPERS_CDEF)
    ffibuilder.embedding_api(EMBEDDING_API)
    ffibuilder.set_source(
        module,
        C_SOURCE % {"program": c_string(sys.executable)},
        include_dirs=[str(HERE)],
        extra_compile_args=["-O2", "-fvisibility=hidden", "-pthread"],
        extra_link_args=["-pthread", f"-Wl,--version-script={version_script}"],
    )
    ffibuilder.embedding_init_code(INIT_CODE.format(site_dirs=site_dirs(), module=module))
    return ffibuilder


def build(out_dir: str | Path, verbose: bool = False) -> Path:
    """Compile libedgecore.so into out_dir (with a copy of edgecore.h next to it)."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgecore-capi-") as scratch:
        version_script = Path(scratch) / "exports.map"
        version_script.write_text(VERSION_SCRIPT)
        ffibuilder = make_ffibuilder(version_script)
        built = Path(ffibuilder.compile(tmpdir=scratch, target="libedgecore.*", verbose=verbose))
        library = out_dir / LIBRARY
        shutil.copy2(built, library)
    shutil.copy2(HEADER, out_dir / HEADER.name)
    return library


def pkg_config(prefix: Path) -> str:
    import edgecore

    return (
        f"prefix={prefix}\n"
        "includedir=${prefix}/include\n"
        "libdir=${prefix}/lib\n\n"
        "Name: edgecore\n"
        "Description: edgecore runtime C API (PatchCore anomaly detection, embeds CPython "
        f"{sys.version_info.major}.{sys.version_info.minor})\n"
        f"Version: {edgecore.__version__}\n"
        "Cflags: -I${includedir}\n"
        "Libs: -L${libdir} -ledgecore\n"
    )


def install(library: Path, prefix: str | Path) -> dict[str, Path]:
    """Lay out include/, lib/ and lib/pkgconfig/ under prefix."""
    prefix = Path(prefix).resolve()
    paths = {
        "header": prefix / "include" / HEADER.name,
        "library": prefix / "lib" / LIBRARY,
        "pkgconfig": prefix / "lib" / "pkgconfig" / "edgecore.pc",
    }
    for path in paths.values():
        path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(HEADER, paths["header"])
    shutil.copy2(library, paths["library"])
    paths["pkgconfig"].write_text(pkg_config(prefix))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgecore.runtime.capi.build", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="directory that receives libedgecore.so and edgecore.h")
    parser.add_argument("--prefix", type=Path, help="install include/, lib/ and lib/pkgconfig/edgecore.pc here")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    if args.out is None and args.prefix is None:
        parser.error("give --out DIR and/or --prefix PREFIX")
    with tempfile.TemporaryDirectory(prefix="edgecore-capi-out-") as scratch:
        library = build(args.out or scratch, verbose=args.verbose)
        print(f"built {library} (CPython {sysconfig.get_python_version()}, {sysconfig.get_config_var('LIBDIR')})")
        if args.prefix is not None:
            paths = install(library, args.prefix)
            print(f"installed {paths['header']}, {paths['library']}, {paths['pkgconfig']}")
            print(f"use: PKG_CONFIG_PATH={paths['pkgconfig'].parent} pkg-config --cflags --libs edgecore")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
