"""The bundle: everything the camera needs, verifiable on the camera (torch-free).

A bundle is a directory ``NAME.edgecore/`` with ``manifest.json`` listing every
other file with its size and sha256, plus the model parameters the runtime
needs (preprocessing, grid, scoring, threshold, index). ``verify_bundle``
checks schema, version, sizes and hashes; ``unpack_archive`` refuses anything
that could write outside its destination.
"""
from __future__ import annotations

import json
import lzma
import math
import os
import shutil
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from edgecore.runtime.errors import BundleError
from edgecore.runtime.fsutil import sha256_file

FORMAT = "edgecore-bundle"
FORMAT_VERSION = "1.0"  # major.minor: a newer major is refused, a newer minor is read
MANIFEST = "manifest.json"
ARCHIVE_SUFFIX = ".edgecore.tar"


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
    feats = _require(manifest, "features", dict, where)
    grid = _require(feats, "grid", list, f"{where}.features")
    if len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid):
        raise BundleError(f"{where}.features.grid: expected two positive integers, got {grid!r}")
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
def unpack_archive(archive: str | Path, destination: str | Path) -> Path:
    """Extract a packed bundle safely: regular files and folders only, nothing outside ``destination``.

    Returns the bundle directory inside ``destination``. Extraction goes into a
    temporary sibling first, so a refused archive leaves nothing behind.
    """
    archive, destination = Path(archive), Path(destination)
    try:
        tar = tarfile.open(archive, "r:*")
    except FileNotFoundError:
        raise BundleError(f"{archive}: archive not found") from None
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"{archive}: not a readable bundle archive: {exc}") from None
    try:
        destination.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unpack.", dir=destination))
    except OSError as exc:
        tar.close()
        raise BundleError(f"{destination}: cannot unpack into it: {exc.strerror or exc}") from None
    try:
        with tar:
            # A bare "." folder entry (tar -C DIR -cf x.tar .) carries nothing: skip it.
            members = [m for m in tar.getmembers() if not (m.isdir() and not PurePosixPath(m.name).parts)]
            roots = set()
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
                    shutil.copyfileobj(source, out)
                os.chmod(target, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        (root,) = roots
        final = destination / root
        if final.exists():
            raise BundleError(f"{final}: already exists; remove it or unpack elsewhere")
        os.replace(staging / root, final)
        return final
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError) as exc:
        # EOFError / zlib.error / LZMAError: a truncated or damaged compressed archive.
        raise BundleError(f"{archive}: damaged archive: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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


def rewrite_bundle(bundle: str | Path, change, keep=lambda name: True) -> dict:
    """Apply ``change(staging, manifest) -> manifest`` to a bundle atomically; returns the new manifest.

    The bundle is rebuilt in a staging sibling with hard links to the kept files
    (cheap: files are never modified in place), ``change`` may add files and edit
    the manifest there, listed files are re-hashed, the result verified, and the
    staging dir swapped in by one rename. A crash at any point leaves the old
    bundle or the new one, never a mix — the manifest included.
    """
    from edgecore.runtime.fsutil import atomic_directory, write_json

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
