"""Build libedgecore.so, the C API of the edgecore runtime, with cffi's embedding mode.

    python -m edgecore.runtime.capi.build --out DIR [--prefix PREFIX]

``--out DIR`` leaves ``libedgecore.so`` and ``edgecore.h`` in DIR; ``--prefix``
installs ``include/edgecore.h``, ``lib/libedgecore.so`` and
``lib/pkgconfig/edgecore.pc`` under PREFIX (either option, or both).

How the pieces fit (cffi's embedding mode):

* ``embedding_api`` declares what the library exports and implements in
  Python. Only ``ec_close`` is there: it returns ``void``, so it is the one
  entry point for which cffi's "Python failed to start → return zeros" rule is
  harmless. Every function returning a status is a small C wrapper (below) that
  checks NULL pointers, calls a ``static extern "Python"`` twin and only trusts
  a result carrying the DONE bit — a zeroed result would otherwise read EC_OK.
* ``ec_last_error`` and the message buffer are plain C (``__thread``), so they
  are thread-local by construction and work even when Python did not start.
* The init code (frozen into the .so, run on the first call) makes the
  builder's site-packages importable, then binds the Python implementations
  from :mod:`edgecore.runtime.capi`. If that import fails, every call reports
  the reason through ``ec_last_error`` instead of a bare stderr dump.
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

# Internal, not exported: the C wrappers below call these Python twins.
INTERNAL_CDEF = """
#define EC__DONE 256
extern "Python" const char *_ec_py_version(void);
extern "Python" int _ec_py_open(const char *, const char *, const char *, const char *, uintptr_t *);
extern "Python" int _ec_py_map_size(uintptr_t, int *, int *);
extern "Python" int _ec_py_detect(uintptr_t, const uint8_t *, int, int, int, int, ec_result_t *, float *, size_t);
void _ec_set_error(const char *message);
"""

EMBEDDING_API = "void ec_close(ec_detector_t *detector);"

C_SOURCE = r"""
#include <stdio.h>
#include "edgecore.h"

#define EC__DONE 256  /* set by every Python twin that really ran: see edgecore.runtime.capi */

static __thread char ec__error[1024];

/* Called from Python (through `lib`) and from the wrappers; the buffer is per thread. */
static void _ec_set_error(const char *message) {
    snprintf(ec__error, sizeof ec__error, "%s", message ? message : "");
}

/* The extern "Python" twins: cffi defines them further down this file. */
static const char *_ec_py_version(void);
static int _ec_py_open(const char *, const char *, const char *, const char *, uintptr_t *);
static int _ec_py_map_size(uintptr_t, int *, int *);
static int _ec_py_detect(uintptr_t, const uint8_t *, int, int, int, int, ec_result_t *, float *, size_t);

static ec_status_t ec__fail(ec_status_t status, const char *message) {
    _ec_set_error(message);
    return status;
}

/* A twin returns DONE | status; 0 means cffi could not run Python at all. */
static ec_status_t ec__finish(int result) {
    if (result & EC__DONE)
        return (ec_status_t)(result & ~EC__DONE);
    return ec__fail(EC_ERR_RUNTIME,
                    "edgecore: the embedded Python runtime failed to start (details on stderr; "
                    "check PYTHONHOME/PYTHONPATH, see edgecore's capi/README.md)");
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
    }
    return "EC_ERR_UNKNOWN";
}

EC_API const char *ec_version(void) {
    const char *version = _ec_py_version();
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
    status = ec__finish(_ec_py_detect((uintptr_t)detector, pixels, width, height, stride_bytes,
                                      (int)format, &result, map, map_capacity));
    if (status == EC_OK)
        *out = result;
    return status;
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

    for _name in ("_ec_py_open", "_ec_py_map_size", "_ec_py_detect"):
        ffi.def_extern(name=_name)(_unavailable)
    ffi.def_extern(name="_ec_py_version")(lambda: ffi.NULL)
    ffi.def_extern(name="ec_close")(lambda handle: None)
"""


def header_declarations(header: str) -> str:
    """The cffi-parsable part of edgecore.h: between the cffi-begin and cffi-end markers."""
    match = re.search(r"/\* cffi-begin.*?\*/(.*)/\* cffi-end \*/", header, re.S)
    if match is None:
        raise RuntimeError(f"{HEADER}: cffi-begin / cffi-end markers not found")
    return match.group(1)


def site_dirs() -> list[str]:
    """Where the builder's Python finds edgecore and its dependencies.

    The embedded interpreter starts from libpython's own prefix and would miss a
    virtualenv's (or the user's) site-packages; baking them in makes the library
    see what the building interpreter saw. PYTHONPATH still adds to it at run time.
    """
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and Path(site.getusersitepackages()).is_dir():
        dirs.append(site.getusersitepackages())
    return [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def make_ffibuilder(module: str = "_edgecore_cffi") -> FFI:
    ffibuilder = FFI()
    ffibuilder.cdef(header_declarations(HEADER.read_text()))
    ffibuilder.cdef(INTERNAL_CDEF)
    ffibuilder.embedding_api(EMBEDDING_API)
    ffibuilder.set_source(
        module,
        C_SOURCE,
        include_dirs=[str(HERE)],
        # Export only the EC_API / CFFI_DLLEXPORT functions (and cffi's module init).
        extra_compile_args=["-O2", "-fvisibility=hidden"],
    )
    ffibuilder.embedding_init_code(INIT_CODE.format(site_dirs=site_dirs(), module=module))
    return ffibuilder


def build(out_dir: str | Path, verbose: bool = False) -> Path:
    """Compile libedgecore.so into out_dir (with a copy of edgecore.h next to it)."""
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgecore-capi-") as scratch:
        built = Path(make_ffibuilder().compile(tmpdir=scratch, target="libedgecore.*", verbose=verbose))
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
