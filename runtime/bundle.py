"""The bundle: everything the camera needs, verifiable on the camera (torch-free).

A bundle is a directory ``NAME.edgecore/`` with ``manifest.json`` listing every
other file with its size and sha256, plus the model parameters the runtime
needs (preprocessing, grid, scoring, threshold, index). ``verify_bundle``
checks schema, version, sizes and hashes; ``unpack_archive`` refuses anything
that could write outside its destination, or more than the archive's own
manifest declares (and a global cap), before writing a byte. Every writer of a
bundle (export, compile, threshold re-fit) holds :func:`bundle_lock`.
"""
from __future__ import annotations

import json
import lzma
import math
import os
import re
import shutil
import stat
import tarfile
import tempfile
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgecore.runtime.errors import BundleError
from edgecore.runtime.roi import validate_roi_section
from edgecore.runtime.fsutil import (
    atomic_directory, locked_staging, release, remove_stale_staging, sha256_file, write_json,
)

try:  # POSIX; without it writers are not serialised (documented in RELIABILITY.md)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

FORMAT = "edgecore-bundle"
FORMAT_VERSION = "1.0"  # major.minor: a newer major is refused, a newer minor is read
MANIFEST = "manifest.json"
ARCHIVE_SUFFIX = ".edgecore.tar"

#: Most bytes an archive may unpack to (sum of its members' declared sizes), unless the
#: caller passes another cap or sets EDGECORE_MAX_UNPACK_BYTES. The largest real bundle
#: (WRN50, three engines) is ~1 GB.
MAX_UNPACK_BYTES = 8 << 30
MAX_ARCHIVE_MEMBERS = 10_000
MAX_MANIFEST_BYTES = 16 << 20
#: Largest preprocess.resize: the resized frame is resize² × 3 bytes (4096 → 48 MB).
MAX_RESIZE = 4096
#: Seconds a second writer waits for a bundle's lock before giving up (EDGECORE_LOCK_TIMEOUT).
LOCK_TIMEOUT_S = 900.0
_UNPACK_PREFIX = ".unpack."
_UNPACK_STAGING = re.compile(re.escape(_UNPACK_PREFIX) + r"[a-z0-9_]{8}\Z")


def file_entry(root: Path, relative: str) -> dict:
    path = root / relative
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


# --- schema ---------------------------------------------------------------
def _require(data: dict, key: str, kind: type | tuple[type, ...], where: str) -> object:
    if not isinstance(data, dict) or key not in data:
        raise BundleError(f"{where}: missing field {key!r}")
    value = data[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise BundleError(f"{where}.{key}: expected a number, got {value!r}")
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise BundleError(f"{where}.{key}: expected {expected}, got {type(value).__name__}")
    return value


def _positive(value: float, where: str) -> None:
    if not value > 0:
        raise BundleError(f"{where}: must be > 0, got {value!r}")


def _finite(value: float, where: str) -> None:
    # json.loads accepts NaN / Infinity; a NaN threshold would call every frame normal.
    if not math.isfinite(value):
        raise BundleError(f"{where}: must be a finite number, got {value!r}")


# Engine entry fields that name a file inside the bundle (OpenVINO IR, TensorRT plan and caches).
ENGINE_FILE_FIELDS = ("xml", "bin", "plan", "timing_cache", "calibration_cache")


def validate_manifest(manifest: object, where: str = MANIFEST) -> dict:
    """Check types and ranges of every field the runtime relies on."""
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: must be a JSON object")
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{where}: not an edgecore bundle manifest (format={manifest.get('format')!r})")
    version = _require(manifest, "format_version", str, where)
    try:
        major, minor = (int(part) for part in version.split("."))
    except ValueError:
        raise BundleError(f"{where}: format_version {version!r} is not MAJOR.MINOR") from None
    supported_major = int(FORMAT_VERSION.split(".")[0])
    if major > supported_major:
        raise BundleError(
            f"{where}: bundle format {version} is newer than this runtime reads ({FORMAT_VERSION}); "
            "upgrade edgecore on the camera"
        )
    if major < supported_major:
        raise BundleError(f"{where}: bundle format {version} is too old; re-export it with this edgecore")

    pre = _require(manifest, "preprocess", dict, where)
    for key in ("resize", "crop"):
        _positive(_require(pre, key, int, f"{where}.preprocess"), f"{where}.preprocess.{key}")
    if pre["crop"] > pre["resize"]:
        raise BundleError(f"{where}.preprocess: crop {pre['crop']} > resize {pre['resize']}")
    if pre["crop"] < 32 or pre["resize"] > MAX_RESIZE:
        raise BundleError(
            f"{where}.preprocess: need 32 <= crop <= resize <= {MAX_RESIZE}, got crop {pre['crop']}, "
            f"resize {pre['resize']}"
        )
    in_h, in_w = _validate_aspect(pre, where)
    _validate_resample(pre, where)
    feats = _require(manifest, "features", dict, where)
    grid = _require(feats, "grid", list, f"{where}.features")
    if len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid):
        raise BundleError(f"{where}.features.grid: expected two positive integers, got {grid!r}")
    # A CNN feature map has the input's shape (up to one cell): a square crop gives a square grid.
    if in_h == in_w and grid[0] != grid[1]:
        raise BundleError(f"{where}.features.grid: {grid!r} is not square, but the {in_h}-px crop is")
    if abs(grid[0] * in_w - grid[1] * in_h) > max(in_h, in_w):
        raise BundleError(f"{where}.features.grid: {grid!r} does not have the shape of the {in_h}×{in_w} input")
    _positive(_require(feats, "embed_dim", int, f"{where}.features"), f"{where}.features.embed_dim")
    scoring = _require(manifest, "scoring", dict, where)
    _positive(_require(scoring, "num_neighbors", int, f"{where}.scoring"), f"{where}.scoring.num_neighbors")
    sigma = _require(scoring, "blur_sigma", (int, float), f"{where}.scoring")
    if not 0 <= sigma <= 64:
        raise BundleError(f"{where}.scoring.blur_sigma: must be in [0, 64], got {sigma!r}")
    _validate_threshold(_require(manifest, "threshold", dict, where), f"{where}.threshold")
    graph = _require(manifest, "graph", dict, where)
    _safe_relative(_require(graph, "file", str, f"{where}.graph"), f"{where}.graph.file")
    _positive(_require(graph, "batch", int, f"{where}.graph"), f"{where}.graph.batch")
    index = _require(manifest, "index", dict, where)
    _safe_relative(_require(index, "dir", str, f"{where}.index"), f"{where}.index.dir")
    for key, entry in _require(index, "files", dict, f"{where}.index").items():
        _safe_relative(_require(entry, "file", str, f"{where}.index.files[{key!r}]"), f"{where}.index.files[{key!r}]")
    table = _require(manifest, "neighbour_table", dict, where)
    _safe_relative(_require(table, "file", str, f"{where}.neighbour_table"), f"{where}.neighbour_table.file")
    _validate_graph_io(manifest, where)
    coreset = manifest.get("coreset")
    if isinstance(coreset, dict) and "denoise" in coreset:  # fit --denoise: the training images left out
        from edgecore.runtime.denoise_record import validate_denoise_record

        validate_denoise_record(coreset["denoise"], f"{where}.coreset.denoise")
    if isinstance(coreset, dict) and "augment" in coreset:  # fit --augment: rotations/flips in the bank
        from edgecore.runtime.augment_record import validate_augment_record

        validate_augment_record(coreset["augment"], f"{where}.coreset.augment")
    validate_roi_section(manifest, where)
    if "labelled" in manifest:  # labelled defects: the anomaly bank's file, [K, embed_dim] shape and weight
        from edgecore.runtime.anomaly_bank import validate_labelled_section

        validate_labelled_section(manifest["labelled"], feats["embed_dim"], f"{where}.labelled")
        _safe_relative(manifest["labelled"]["file"], f"{where}.labelled.file")
    engines = manifest.get("engines", {})
    if not isinstance(engines, dict):
        raise BundleError(f"{where}.engines: expected an object")
    for key, entry in engines.items():
        if not isinstance(entry, dict):
            raise BundleError(f"{where}.engines[{key!r}]: expected an object, got {type(entry).__name__}")
        for field in ENGINE_FILE_FIELDS:
            if field in entry:
                _safe_relative(_require(entry, field, str, f"{where}.engines[{key!r}]"), f"{where}.engines[{key!r}].{field}")
        if "threshold" in entry:  # an engine-specific decision boundary (compile --refit-threshold)
            _validate_threshold(_require(entry, "threshold", dict, f"{where}.engines[{key!r}]"), f"{where}.engines[{key!r}].threshold")
    files = _require(manifest, "files", dict, where)
    for name, entry in files.items():
        _safe_relative(name, f"{where}.files")
        size = _require(entry, "size", int, f"{where}.files[{name!r}]")
        if size < 0:
            raise BundleError(f"{where}.files[{name!r}].size: negative")
        digest = _require(entry, "sha256", str, f"{where}.files[{name!r}]")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise BundleError(f"{where}.files[{name!r}].sha256: not a sha256 hex digest")
    return manifest


# Fields that describe what the runtime does; it does exactly one thing, so any other value is a
# bundle this runtime would mis-score (optional: absent in hand-written manifests).
CONTRACT_FIELDS = (
    ("preprocess", "interpolation", "bilinear-antialias"),
    ("preprocess", "layout", "HWC-RGB-uint8"),
    ("scoring", "distance", "l2"),
    ("graph.input", "dtype", "uint8"),
    ("graph.input", "layout", "NHWC-RGB"),
    ("graph.output", "dtype", "float32"),
)


def contract_fields(section: str) -> dict[str, str]:
    """The fixed values a manifest ``section`` must carry: the writer fills them from here and
    ``validate_manifest`` checks them against the same table (one schema for both sides)."""
    return {key: value for sec, key, value in CONTRACT_FIELDS if sec == section}


def input_hw(pre: dict) -> tuple[int, int]:
    """(height, width) of the graph input a manifest's ``preprocess`` section describes."""
    if pre.get("aspect", "squash") != "squash":
        return int(pre["input_size"][0]), int(pre["input_size"][1])
    return int(pre["crop"]), int(pre["crop"])


def map_hw(pre: dict) -> tuple[int, int]:
    """(height, width) of the preprocessed frame and its maps: the graph input, or a tile bundle's canvas."""
    if pre.get("aspect") == "tile":
        return int(pre["canvas_size"][0]), int(pre["canvas_size"][1])
    return input_hw(pre)


def _validate_tiles(pre: dict, where: str) -> None:
    """tile bundles: tiles/tile_overlap give an R×C grid of graph inputs whose union is exactly canvas_size."""
    from edgecore.runtime.tiles import canvas_size, check_tiling

    tiles, overlap, canvas = pre.get("tiles"), pre.get("tile_overlap"), pre.get("canvas_size")
    for key, value in (("tiles", tiles), ("tile_overlap", overlap), ("canvas_size", canvas)):
        if not (_int_list(value) and len(value) == 2):
            raise BundleError(f"{where}.preprocess.{key}: expected [rows, cols] integers, got {value!r}")
    try:
        check_tiling(tuple(pre["input_size"]), tuple(tiles), tuple(overlap))
    except ValueError as exc:
        raise BundleError(f"{where}.preprocess: {exc}") from None
    expected = list(canvas_size(tuple(pre["input_size"]), tuple(tiles), tuple(overlap)))
    if canvas != expected or max(canvas) > MAX_RESIZE:
        raise BundleError(
            f"{where}.preprocess.canvas_size: {canvas} disagrees with {tiles} tiles of the graph input "
            f"{pre['input_size']} overlapping by {overlap} ({expected}, at most {MAX_RESIZE})"
        )


def _validate_resample(pre: dict, where: str) -> None:
    """preprocess.resample: a version this runtime implements (absent: v1, every bundle before v2).
    An unknown one would give the engine other pixels than the model was fitted on: refused."""
    from edgecore.runtime.preprocess import RESAMPLERS

    if "resample" in pre and pre["resample"] not in RESAMPLERS:
        raise BundleError(
            f"{where}.preprocess.resample: {pre['resample']!r}, but this runtime implements only "
            f"{', '.join(RESAMPLERS)}; refused (upgrade edgecore on the camera)"
        )


def _validate_aspect(pre: dict, where: str) -> tuple[int, int]:
    """pad/crop/tile bundles: a known mode and an input_size whose long/short side are resize/crop."""
    aspect = pre.get("aspect", "squash")
    if aspect not in ("squash", "pad", "crop", "tile"):
        raise BundleError(f"{where}.preprocess.aspect: {aspect!r} is not squash, pad, crop or tile")
    if aspect != "tile" and any(key in pre for key in ("tiles", "tile_overlap", "canvas_size")):
        raise BundleError(f"{where}.preprocess: tiles / tile_overlap / canvas_size need aspect 'tile', not {aspect!r}")
    if aspect != "squash":
        size = pre.get("input_size")
        if not (_int_list(size) and len(size) == 2 and min(size) >= 32 and max(size) <= MAX_RESIZE):
            raise BundleError(f"{where}.preprocess.input_size: expected [height, width] in 32..{MAX_RESIZE}, got {size!r}")
        if (max(size), min(size)) != (pre["resize"], pre["crop"]):
            raise BundleError(
                f"{where}.preprocess: input_size {size} disagrees with resize {pre['resize']} / crop {pre['crop']}"
            )
    if aspect == "tile":
        _validate_tiles(pre, where)
    return input_hw(pre)


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _validate_graph_io(manifest: dict, where: str) -> None:
    """The graph's declared input/output shapes must agree with batch, crop, grid and embed_dim.

    (The real graph is checked against the same numbers when an engine opens it.)
    """
    graph, (in_h, in_w) = manifest["graph"], input_hw(manifest["preprocess"])
    grid, dim = manifest["features"]["grid"], manifest["features"]["embed_dim"]
    expected = {
        "input": [graph["batch"], in_h, in_w, 3],
        "output": [graph["batch"], grid[0] * grid[1], dim],
    }
    for key, shape in expected.items():
        if key not in graph:
            continue  # optional: older bundles
        entry = graph[key]
        declared = entry.get("shape") if isinstance(entry, dict) else None
        if not _int_list(declared) or declared != shape:
            raise BundleError(
                f"{where}.graph.{key}.shape: {declared!r} disagrees with batch/crop/grid/embed_dim ({shape})"
            )
    for section, key, value in CONTRACT_FIELDS:
        entry = manifest.get(section, {}) if section != "graph.input" else graph.get("input", {})
        if section == "graph.output":
            entry = graph.get("output", {})
        if isinstance(entry, dict) and key in entry and entry[key] != value:
            raise BundleError(
                f"{where}.{section}.{key}: {entry[key]!r}, but this runtime implements only {value!r}; refused"
            )
    table = manifest["neighbour_table"]
    if "shape" in table:
        shape = table["shape"]
        if not _int_list(shape) or len(shape) != 2 or min(shape) < 1:
            raise BundleError(f"{where}.neighbour_table.shape: expected [rows, columns] >= 1, got {shape!r}")


def _validate_threshold(threshold: dict, where: str) -> None:
    _finite(_require(threshold, "value", (int, float), where), f"{where}.value")
    norm = _require(threshold, "normalization", dict, where)
    for key in ("threshold", "min", "max"):
        _finite(_require(norm, key, (int, float), f"{where}.normalization"), f"{where}.normalization.{key}")


def _safe_relative(name: str, where: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if (
        not name or not path.parts or path.is_absolute() or ".." in path.parts or "\\" in name
        or name.startswith("~") or "\x00" in name
    ):
        raise BundleError(f"{where}: unsafe path {name!r}")
    return path


# --- fields against the arrays and the graph (checked when a Detector opens) -------
def check_engine_io(
    manifest: dict, input_shape: tuple[int, ...] | None, output_shape: tuple[int, ...] | None, source: str
) -> None:
    """The compiled graph's real input/output shapes must be what batch, crop, grid and embed_dim say.

    A crop, batch or grid that disagrees with the graph would fail (or silently
    mis-map patches) on every frame; refuse it once, at open. None = not known
    (a dynamic shape or a backend that does not say): not checked.
    """
    (in_h, in_w), batch = input_hw(manifest["preprocess"]), manifest["graph"]["batch"]
    grid, dim = manifest["features"]["grid"], manifest["features"]["embed_dim"]
    expected = {
        "input": (input_shape, (batch, in_h, in_w, 3),
                  "graph.batch, preprocess." + ("input_size" if "input_size" in manifest["preprocess"] else "crop")),
        "output": (output_shape, (batch, grid[0] * grid[1], dim), "graph.batch, features.grid, features.embed_dim"),
    }
    for what, (real, wanted, fields) in expected.items():
        if real is not None and tuple(real) != wanted:
            raise BundleError(
                f"{MANIFEST}: {fields} say the graph's {what} is {list(wanted)}, but {source} has {list(real)}"
            )


def check_neighbour_table(table: object, manifest: dict, index_size: int, index_dim: int, path: Path) -> None:
    """Eq. 7's support sets: integer ids inside the coreset, each row starting with its own id.

    An id out of range would raise (or, negative, silently wrap to another point) on
    the frames that hit it; refuse the table at open instead.
    """
    import numpy as np

    dim = manifest["features"]["embed_dim"]
    coreset = manifest.get("coreset")
    if isinstance(coreset, dict) and "size" in coreset and coreset["size"] != index_size:
        raise BundleError(f"{MANIFEST}: coreset.size {coreset['size']!r} but the index holds {index_size} points")
    if index_dim != dim:
        raise BundleError(f"{MANIFEST}: features.embed_dim {dim} but the index holds {index_dim}-d vectors")
    if not isinstance(table, np.ndarray) or table.dtype.kind not in "iu" or table.ndim != 2:
        kind = f"{table.dtype} {table.shape}" if isinstance(table, np.ndarray) else type(table).__name__
        raise BundleError(f"{path}: expected a 2-D integer array of coreset ids, got {kind}")
    columns = min(manifest["scoring"]["num_neighbors"], index_size)
    if table.shape != (index_size, columns):
        raise BundleError(
            f"{path}: shape {table.shape}, expected {(index_size, columns)} (index size x scoring.num_neighbors)"
        )
    declared = manifest["neighbour_table"].get("shape")
    if declared is not None and tuple(declared) != table.shape:
        raise BundleError(f"{MANIFEST}: neighbour_table.shape {declared} but {path} is {list(table.shape)}")
    if table.size and (int(table.min()) < 0 or int(table.max()) >= index_size):
        raise BundleError(
            f"{path}: ids must lie in [0, {index_size}), found [{int(table.min())}, {int(table.max())}]"
        )
    if table.size and not np.array_equal(table[:, 0], np.arange(index_size)):
        raise BundleError(f"{path}: row i must start with coreset point i (Eq. 7's own match); it does not")


# --- reading & verifying ----------------------------------------------------
def read_manifest(bundle: str | Path) -> dict:
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a bundle directory")
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise BundleError(f"{path}: not a regular file (a link, folder or device); refused")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing; {bundle} is not a complete bundle") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise BundleError(f"{path}: not valid JSON: nested too deeply") from None
    except OSError as exc:
        raise BundleError(f"{path}: cannot read it: {exc.strerror or exc}") from None
    return validate_manifest(data, str(path))


@dataclass(frozen=True)
class VerifiedBundle:
    path: Path
    manifest: dict


def verify_bundle(bundle: str | Path) -> VerifiedBundle:
    """Schema, version, then every listed file's size and sha256; unlisted files are errors too,
    and so is any file the runtime would open (graph, table, index, engines) that is not listed."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    listed = manifest["files"]
    for name, entry in sorted(listed.items()):
        path = bundle / name
        parent = bundle
        for part in PurePosixPath(name).parts[:-1]:
            parent = parent / part
            if parent.is_symlink():
                raise BundleError(f"{bundle / name}: listed in the manifest, but {parent} is a symbolic link; refused")
        if path.is_symlink() or not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing (or not a regular file)")
        size = path.stat().st_size
        if size != entry["size"]:
            raise BundleError(f"{path}: size {size} bytes, manifest says {entry['size']} (truncated or replaced)")
        if sha256_file(path) != entry["sha256"]:
            raise BundleError(f"{path}: sha256 mismatch (file corrupted or modified)")
    for path in sorted(bundle.rglob("*")):
        relative = path.relative_to(bundle).as_posix()
        if path.is_dir() and not path.is_symlink():
            continue
        if relative != MANIFEST and relative not in listed:
            raise BundleError(f"{path}: not listed in the manifest (unexpected file in the bundle)")
    # Every file the runtime opens must be one of the verified ones (never a path outside the bundle).
    referenced = {"graph": manifest["graph"]["file"], "neighbour_table": manifest["neighbour_table"]["file"]}
    if "roi" in manifest:
        referenced["roi"] = manifest["roi"]["file"]
    if "labelled" in manifest:
        referenced["labelled"] = manifest["labelled"]["file"]
    index = manifest["index"]
    for key, entry in index["files"].items():
        referenced[f"index.files[{key!r}]"] = f"{index['dir']}/{entry['file']}"
    for key, entry in manifest.get("engines", {}).items():
        for field in ENGINE_FILE_FIELDS:
            if field in entry:
                referenced[f"engines[{key!r}].{field}"] = entry[field]
    for what, name in referenced.items():
        if PurePosixPath(name).as_posix() not in listed:
            raise BundleError(f"{bundle / MANIFEST}: {what} file {name!r} is not listed in files")
    return VerifiedBundle(bundle, manifest)


# --- archives -------------------------------------------------------------
def unpack_archive(archive: str | Path, destination: str | Path, max_bytes: int | None = None) -> Path:
    """Extract a packed bundle safely: regular files and folders only, nothing outside ``destination``.

    Returns the bundle directory inside ``destination``. Before a byte is written
    the member headers are read and refused if they hold more than
    ``max_bytes`` (default :data:`MAX_UNPACK_BYTES` or EDGECORE_MAX_UNPACK_BYTES),
    more than the free space, or anything the archive's own manifest does not
    declare with exactly that size: a tar bomb costs CPU, never disk. Extraction
    goes into a locked ``.unpack.*`` staging sibling, so a refused archive leaves
    nothing behind and a killed one leaves a folder the next unpack removes.
    """
    archive, destination = Path(archive), Path(destination)
    limit = _unpack_limit(max_bytes)
    try:
        tar = tarfile.open(archive, "r:*")
    except FileNotFoundError:
        raise BundleError(f"{archive}: archive not found") from None
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"{archive}: not a readable bundle archive: {exc}") from None
    try:
        destination.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(destination, _UNPACK_STAGING)  # left by a killed unpack
    except OSError as exc:
        tar.close()
        raise BundleError(f"{destination}: cannot unpack into it: {exc.strerror or exc}") from None
    staging = lock = None
    try:
        with tar:
            members, root = _checked_members(tar, archive, limit)
            _check_against_manifest(tar, members, root, archive)
            try:
                _check_free_space(destination, sum(m.size for m in members), archive)
                staging, lock = locked_staging(destination, _UNPACK_PREFIX, note=f"Incomplete unpack of {archive.name}")
            except OSError as exc:
                raise BundleError(f"{destination}: cannot unpack into it: {exc.strerror or exc}") from None
            for member in members:
                target = staging / member.name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                if source is None:
                    raise BundleError(f"{archive}: cannot read member {member.name!r}")
                with source, open(target, "xb") as out:
                    _copy_exactly(source, out, member.size)
                os.chmod(target, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        final = destination / root
        if final.exists():
            raise BundleError(f"{final}: already exists; remove it or unpack elsewhere")
        os.replace(staging / root, final)
        return final
    except OSError as exc:
        if exc.errno is not None and exc.filename is not None:  # disk full, permissions: name the place
            raise BundleError(f"{exc.filename}: cannot write it: {exc.strerror}") from None
        raise BundleError(f"{archive}: damaged archive: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
        # EOFError / zlib.error / LZMAError: a truncated or damaged compressed archive.
        raise BundleError(f"{archive}: damaged archive: {exc}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        release(lock)


def _unpack_limit(max_bytes: int | None) -> int:
    if max_bytes is not None:
        return int(max_bytes)
    text = os.environ.get("EDGECORE_MAX_UNPACK_BYTES")
    if not text:
        return MAX_UNPACK_BYTES
    try:
        return int(text)
    except ValueError:
        raise BundleError(f"EDGECORE_MAX_UNPACK_BYTES={text!r}: not a number of bytes") from None


def _checked_members(tar: tarfile.TarFile, archive: Path, limit: int) -> tuple[list[tarfile.TarInfo], str]:
    """Read the member headers (no data is written), stopping as soon as a cap is passed."""
    members: list[tarfile.TarInfo] = []
    roots: set[str] = set()
    total = 0
    for member in tar:
        if not (member.isdir() and not PurePosixPath(member.name).parts):  # a bare "." folder carries nothing
            members.append(member)
        if len(members) > MAX_ARCHIVE_MEMBERS:
            raise BundleError(f"{archive}: more than {MAX_ARCHIVE_MEMBERS} members; not a bundle archive")
        total += max(member.size, 0)
        if total > limit:
            raise BundleError(
                f"{archive}: unpacks to more than {limit:,} bytes (the cap; set EDGECORE_MAX_UNPACK_BYTES "
                "to raise it); refused before writing anything"
            )
    _check_archive_end(tar, archive)
    for member in members:
        path = _safe_relative(member.name, f"{archive}: member")
        if not (member.isfile() or member.isdir()):
            raise BundleError(f"{archive}: member {member.name!r} is a link or device; refused")
        if member.issparse():  # may expand to any size on disk
            raise BundleError(f"{archive}: member {member.name!r} is a sparse file; refused")
        if len(path.parts) == 1 and not member.isdir():
            raise BundleError(f"{archive}: top-level member {member.name!r} is a file; expected one bundle folder")
        roots.add(path.parts[0])
    if len(roots) != 1:
        raise BundleError(f"{archive}: expected one top-level bundle folder, found {sorted(roots)}")
    files = [PurePosixPath(m.name) for m in members if m.isfile()]
    if len(set(files)) != len(files):
        twice = sorted(p.as_posix() for p, n in Counter(files).items() if n > 1)
        raise BundleError(f"{archive}: damaged archive: member(s) {twice} appear more than once")
    folders = {parent for m in members for parent in PurePosixPath(m.name).parents}
    clash = sorted(p.as_posix() for p in set(files) & folders)
    if clash:
        raise BundleError(f"{archive}: damaged archive: {clash} is both a file and a folder")
    return members, next(iter(roots))


def _check_archive_end(tar: tarfile.TarFile, archive: Path) -> None:
    """tarfile stops quietly where a cut archive ends; a whole one ends in two zero blocks plus
    zero padding, a whole number of 512-byte blocks in all (at most 1 MiB of it is read)."""
    tar.fileobj.seek(tar.offset)  # where reading headers stopped
    tail = tar.fileobj.read(1 << 20)
    if len(tail) < 1024 or tail.count(0) != len(tail) or (tar.offset + len(tail)) % tarfile.BLOCKSIZE:
        raise BundleError(f"{archive}: damaged archive: truncated or trailing data after the last member")


def _check_against_manifest(tar: tarfile.TarFile, members: list[tarfile.TarInfo], root: str, archive: Path) -> None:
    """Every file member must be the manifest or a file it lists, with exactly the declared size."""
    by_name = {PurePosixPath(m.name).as_posix(): m for m in members if m.isfile()}
    entry = by_name.get(f"{root}/{MANIFEST}")
    if entry is None:
        raise BundleError(f"{archive}: no {root}/{MANIFEST}; not a bundle archive")
    if entry.size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{archive}: {MANIFEST} is {entry.size:,} bytes (at most {MAX_MANIFEST_BYTES:,}); refused")
    source = tar.extractfile(entry)
    if source is None:
        raise BundleError(f"{archive}: cannot read {MANIFEST}")
    try:
        manifest = json.loads(source.read(entry.size).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{archive}: {MANIFEST} is not valid JSON: {exc}") from None
    except RecursionError:
        raise BundleError(f"{archive}: {MANIFEST} is not valid JSON: nested too deeply") from None
    listed = validate_manifest(manifest, f"{archive}: {MANIFEST}")["files"]
    for name, member in sorted(by_name.items()):
        relative = name[len(root) + 1 :]
        if relative == MANIFEST:
            continue
        if relative not in listed:
            raise BundleError(f"{archive}: member {name!r} is not listed in its manifest; refused before unpacking")
        if member.size != listed[relative]["size"]:
            raise BundleError(
                f"{archive}: member {name!r} is {member.size:,} bytes, its manifest says {listed[relative]['size']:,}; "
                "refused before unpacking"
            )


def _check_free_space(destination: Path, needed: int, archive: Path) -> None:
    free = shutil.disk_usage(destination).free
    if needed > free:
        raise BundleError(f"{destination}: {archive.name} needs {needed:,} bytes, only {free:,} are free")


def _copy_exactly(source, out, size: int) -> None:
    """Copy at most ``size`` bytes (the header's size, already checked against the caps)."""
    left = size
    while left > 0:
        block = source.read(min(left, 1 << 20))
        if not block:
            raise EOFError("member data ends early")
        out.write(block)
        left -= len(block)


def verify_path(path: str | Path) -> VerifiedBundle:
    """Verify a bundle directory, or an archive (unpacked into a temp dir that is then removed)."""
    path = Path(path)
    if path.is_dir():
        return verify_bundle(path)
    with tempfile.TemporaryDirectory(prefix="edgecore-verify-") as scratch:
        bundle = unpack_archive(path, scratch)
        verified = verify_bundle(bundle)
        return VerifiedBundle(path, verified.manifest)


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem or no hard links: copy
        shutil.copy2(source, target)


_held_locks: dict[tuple[str, int], int] = {}  # (lock path, thread) -> depth: re-entrant per thread
_held_guard = threading.Lock()


def lock_path(bundle: str | Path) -> Path:
    """``.NAME.lock`` next to the bundle: outside it (a bundle holds only listed files) and
    kept across the directory swaps of a rewrite. It exists while a writer works (a killed
    writer's file is harmless: its lock died with it)."""
    bundle = Path(bundle)
    return bundle.parent / f".{bundle.name}.lock"


@contextmanager
def bundle_lock(
    bundle: str | Path, timeout: float | None = None, log: Callable[[str], None] | None = None
) -> Iterator[None]:
    """Hold the exclusive writer lock of ``bundle`` (an ``fcntl.flock`` on its lock file).

    A second writer (another process or thread) says once that it waits, then
    waits up to ``timeout`` seconds (default EDGECORE_LOCK_TIMEOUT or
    :data:`LOCK_TIMEOUT_S`) and gives up with a BundleError naming the holder's
    pid. Re-entrant within one thread (compile → add engine → re-fit).
    """
    path = lock_path(bundle)
    key = (str(path.absolute()), threading.get_ident())
    with _held_guard:
        depth = _held_locks.get(key, 0)
        if depth:
            _held_locks[key] = depth + 1
    if depth:
        try:
            yield
        finally:
            with _held_guard:
                _held_locks[key] -= 1
        return
    if fcntl is None:  # pragma: no cover - Windows: no serialisation
        yield
        return
    fd = _acquire(path, bundle, _lock_timeout(timeout), log or _stderr)
    with _held_guard:
        _held_locks[key] = 1
    try:
        yield
    finally:
        with _held_guard:
            _held_locks.pop(key, None)
        try:
            os.unlink(path)  # while still locked: a waiter re-checks the inode and retries
        except OSError:
            pass
        os.close(fd)  # drops the flock


def _acquire(path: Path, bundle: str | Path, wait: float, log: Callable[[str], None]) -> int:
    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise BundleError(f"{path}: cannot create the bundle's lock file: {exc.strerror or exc}") from None
        if _try_flock(fd):
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:  # still the file at this name (not one a finisher removed)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
            os.close(fd)
            continue
        holder = _lock_holder(fd)
        os.close(fd)
        if not said:
            log(f"waiting for another writer of {bundle} ({holder}) to finish (up to {wait:g} s)")
            said = True
        if time.monotonic() >= deadline:
            raise BundleError(
                f"{bundle}: another process ({holder}) is writing this bundle; gave up after {wait:g} s "
                f"(lock {path}); retry when it has finished"
            )
        time.sleep(0.2)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _lock_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "pid unknown"


def _lock_timeout(timeout: float | None) -> float:
    if timeout is not None:
        return float(timeout)
    text = os.environ.get("EDGECORE_LOCK_TIMEOUT")
    try:
        return float(text) if text else LOCK_TIMEOUT_S
    except ValueError:
        raise BundleError(f"EDGECORE_LOCK_TIMEOUT={text!r}: not a number of seconds") from None


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def rewrite_bundle(bundle: str | Path, change, keep=lambda name: True) -> dict:
    """Apply ``change(staging, manifest) -> manifest`` to a bundle atomically; returns the new manifest.

    The bundle is rebuilt in a staging sibling with hard links to the kept files
    (cheap: files are never modified in place), ``change`` may add files and edit
    the manifest there, listed files are re-hashed, the result verified, and the
    staging dir swapped in by one rename. A crash at any point leaves the old
    bundle or the new one, never a mix — the manifest included.
    """
    with bundle_lock(bundle):  # verify-then-swap is one step: a concurrent writer's change is never lost
        return _rewrite_locked(Path(bundle), change, keep)


def _rewrite_locked(bundle: Path, change, keep) -> dict:
    verified = verify_bundle(bundle)
    bundle, manifest = verified.path, json.loads(json.dumps(verified.manifest))
    with atomic_directory(bundle) as staging:
        for name in manifest["files"]:
            if keep(name):
                _link_or_copy(bundle / name, staging / name)
        manifest["files"] = {n: e for n, e in manifest["files"].items() if keep(n)}
        manifest = change(staging, manifest)
        for path in sorted(staging.rglob("*")):
            relative = path.relative_to(staging).as_posix()
            if path.is_file() and relative != MANIFEST and relative not in manifest["files"]:
                manifest["files"][relative] = file_entry(staging, relative)
        manifest["files"] = dict(sorted(manifest["files"].items()))
        write_json(staging / MANIFEST, manifest)
        verify_bundle(staging)
    return manifest


def add_engine(bundle: str | Path, key: str, write_engine, description: dict) -> dict:
    """Add (or replace) ``engines/<key>/`` atomically; returns the new manifest.

    ``write_engine(engine_dir) -> dict`` writes the files and returns extra fields
    (paths relative to the bundle) for the manifest entry.
    """
    prefix = f"engines/{key}/"

    def change(staging: Path, manifest: dict) -> dict:
        engine_dir = staging / "engines" / key
        engine_dir.mkdir(parents=True)
        extra = write_engine(engine_dir)
        engines = {k: v for k, v in manifest.get("engines", {}).items() if k != key}
        engines[key] = {**description, **extra}
        manifest["engines"] = dict(sorted(engines.items()))
        return manifest

    return rewrite_bundle(bundle, change, keep=lambda name: not name.startswith(prefix))
