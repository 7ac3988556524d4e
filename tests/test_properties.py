"""Property-based tests (hypothesis): the manifest parser and archive unpacking on arbitrary input.

* ``validate_manifest`` / ``read_manifest`` / ``verify_bundle``: on any JSON-like value,
  any bytes, and any mutation of a real manifest, they return or raise BundleError,
  never anything else; and what they accept satisfies every invariant the runtime
  relies on.
* ``unpack_archive``: on tar files with random member names, types and sizes (and on
  damaged real archives) it never writes outside the destination, leaves nothing
  behind when it refuses, refuses only with BundleError, and what it accepts holds
  only regular files and folders.

Example counts are moderate (200 per property) so the suite stays fast.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edgecore.runtime.bundle import MANIFEST, ENGINE_FILE_FIELDS, read_manifest, unpack_archive, validate_manifest, verify_bundle
from edgecore.runtime.errors import BundleError

# derandomize: CI must be reproducible; run with --hypothesis-seed=random locally to explore further.
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- JSON-like values

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["edgecore-bundle", "1.0", "2.0", "0.1", "1.x", "", "..", "/etc/passwd", "model.onnx", "0" * 64])
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)


def _safe(name: object) -> bool:
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name or name.startswith("~"):
        return False
    path = PurePosixPath(name)
    return bool(path.parts) and not path.is_absolute() and ".." not in path.parts


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def assert_runtime_invariants(m: dict) -> None:
    """What the Detector and the backends take for granted once a manifest is accepted."""
    assert m["format"] == "edgecore-bundle"
    major, _minor = (int(p) for p in m["format_version"].split("."))
    assert major == 1
    pre = m["preprocess"]
    assert _is_int(pre["resize"]) and _is_int(pre["crop"]) and 0 < pre["crop"] <= pre["resize"]
    grid = m["features"]["grid"]
    assert isinstance(grid, list) and len(grid) == 2 and all(_is_int(g) and g > 0 for g in grid)
    assert _is_int(m["features"]["embed_dim"]) and m["features"]["embed_dim"] > 0
    assert _is_int(m["scoring"]["num_neighbors"]) and m["scoring"]["num_neighbors"] > 0
    assert _is_number(m["scoring"]["blur_sigma"]) and 0 <= m["scoring"]["blur_sigma"] <= 64
    thresholds = [m["threshold"]] + [e["threshold"] for e in m.get("engines", {}).values() if "threshold" in e]
    for t in thresholds:
        values = [t["value"], *(t["normalization"][k] for k in ("threshold", "min", "max"))]
        assert all(_is_number(v) and math.isfinite(v) for v in values)
    assert _safe(m["graph"]["file"]) and _is_int(m["graph"]["batch"]) and m["graph"]["batch"] > 0
    assert _safe(m["index"]["dir"]) and all(_safe(e["file"]) for e in m["index"]["files"].values())
    assert _safe(m["neighbour_table"]["file"])
    for entry in m.get("engines", {}).values():
        assert isinstance(entry, dict)
        assert all(_safe(entry[f]) for f in ENGINE_FILE_FIELDS if f in entry)
    for name, entry in m["files"].items():
        assert _safe(name)
        assert _is_int(entry["size"]) and entry["size"] >= 0
        assert isinstance(entry["sha256"], str) and len(entry["sha256"]) == 64


@SETTINGS
@given(json_values)
def test_validate_manifest_on_any_json_value(value):
    try:
        accepted = validate_manifest(value)
    except BundleError:
        return
    assert_runtime_invariants(accepted)


@SETTINGS
@given(
    st.fixed_dictionaries(
        {"format": st.just("edgecore-bundle"), "format_version": st.sampled_from(["1.0", "1.3"]) | st.text(max_size=5)},
        optional={key: json_values for key in
                  ("preprocess", "features", "scoring", "threshold", "graph", "index", "neighbour_table", "engines", "files")},
    )
)
def test_validate_manifest_on_manifest_shaped_values(value):
    """Past the format check, with the right top-level keys holding arbitrary values."""
    try:
        accepted = validate_manifest(value)
    except BundleError:
        return
    assert_runtime_invariants(accepted)


@SETTINGS
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()))
def test_read_manifest_on_any_bytes(data):
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "b.edgecore"
        bundle.mkdir()
        (bundle / MANIFEST).write_bytes(data)
        try:
            read_manifest(bundle)
        except BundleError:
            return
    pytest.fail(f"accepted {data!r}")  # no short random input is a complete manifest


# --------------------------------------------------------------------------- mutated real manifests


@pytest.fixture(scope="module")
def real_bundle(exported_bundle, tmp_path_factory) -> Path:
    """A private copy of the synthetic bundle whose manifest the tests overwrite (restored after)."""
    return Path(shutil.copytree(exported_bundle, tmp_path_factory.mktemp("prop") / exported_bundle.name))


def _paths(value, prefix=()):
    """Every (path) to a value inside nested dicts/lists, the root excluded."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield prefix + (key,)
            yield from _paths(child, prefix + (key,))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield prefix + (i,)
            yield from _paths(child, prefix + (i,))


def _near(value):
    """Values close to the original: the boundary cases a hand-edit or a bug produces."""
    options = [None, True, False, 0, -1, 1, 2**63, 0.5, float("nan"), float("inf"), "", "x", [], {}, "../x", "/abs"]
    if isinstance(value, bool):
        options += [int(value)]
    elif isinstance(value, int):
        options += [value + 1, value - 1, -value, float(value), str(value)]
    elif isinstance(value, float):
        options += ([int(value)] if math.isfinite(value) else []) + [-value, str(value)]
    elif isinstance(value, str):
        options += [value.upper(), value + "/", "./" + value, value[:-1], "../" + value, value * 2]
    elif isinstance(value, list):
        options += [value[:-1], value + value[-1:], list(reversed(value))]
    elif isinstance(value, dict):
        options += [dict(list(value.items())[:-1])]
    return options


mutation = st.tuples(
    st.integers(min_value=0, max_value=10**6),  # which path
    st.sampled_from(["delete", "near", "arbitrary", "add-key"]),
    st.integers(min_value=0, max_value=10**6),  # which near value
    json_values,
    st.text(max_size=8),
)


def _mutate(manifest: dict, edits) -> dict:
    m = copy.deepcopy(manifest)
    for which, kind, pick, arbitrary, new_key in edits:
        paths = list(_paths(m))
        if not paths:
            break
        path = paths[which % len(paths)]
        parent = m
        for key in path[:-1]:
            parent = parent[key]
        key = path[-1]
        if kind == "delete":
            del parent[key]
        elif kind == "near":
            options = _near(parent[key])
            parent[key] = options[pick % len(options)]
        elif kind == "arbitrary":
            parent[key] = arbitrary
        elif isinstance(parent[key], dict):
            parent[key][new_key] = arbitrary
    return m


@SETTINGS
@given(st.lists(mutation, min_size=1, max_size=3))
def test_mutated_real_manifest_is_validated_or_refused(real_bundle, edits):
    original = json.loads((real_bundle / MANIFEST).read_text())
    mutated = _mutate(original, edits)
    try:
        accepted = validate_manifest(copy.deepcopy(mutated))
    except BundleError:
        accepted = None
    if accepted is not None:
        assert_runtime_invariants(accepted)
    # and the whole verification, on disk, with the mutated manifest
    text = json.dumps(mutated, allow_nan=True)
    try:
        (real_bundle / MANIFEST).write_text(text)
        try:
            verified = verify_bundle(real_bundle)
        except BundleError:
            return
        assert_runtime_invariants(verified.manifest)
        # accepted: every file it lists was hashed, and the runtime's files are among them
        listed = verified.manifest["files"]
        assert {verified.manifest["graph"]["file"], verified.manifest["neighbour_table"]["file"]} <= set(listed)
    finally:
        (real_bundle / MANIFEST).write_text(json.dumps(original, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- archives

KINDS = {"file": tarfile.REGTYPE, "dir": tarfile.DIRTYPE, "sym": tarfile.SYMTYPE, "hard": tarfile.LNKTYPE,
         "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE, "fifo": tarfile.FIFOTYPE, "cont": tarfile.CONTTYPE,
         "sparse": tarfile.GNUTYPE_SPARSE, "old-file": tarfile.AREGTYPE}
segments = st.sampled_from(["b.edgecore", "b.edgecore", "index", "x.npy", "..", ".", "", "~", "a\\b", " ", "é", "{OUT}"])
member_names = st.lists(segments, min_size=1, max_size=4).map("/".join) | st.sampled_from(
    ["/{OUT}/escape", "/", "./", "b.edgecore/", "../escape", "b.edgecore/../../escape", "{OUT}"]
) | st.text(max_size=12)
members = st.lists(
    st.tuples(member_names, st.sampled_from(list(KINDS)), st.binary(max_size=48), member_names),
    max_size=6,
)


def _snapshot(root: Path, skip: Path) -> dict[str, object]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            continue
        for name in dirnames + filenames:
            path = here / name
            if path == skip:
                continue
            key = path.relative_to(root).as_posix()
            out[key] = os.readlink(path) if path.is_symlink() else (path.read_bytes() if path.is_file() else "dir")
    return out


def _write_tar(path: Path, entries, out_dir: Path, fmt) -> bool:
    try:
        with tarfile.open(path, "w", format=fmt) as tar:
            for name, kind, data, link in entries:
                info = tarfile.TarInfo(name.replace("{OUT}", str(out_dir).lstrip("/") if not name.startswith("/") else str(out_dir)))
                info.type = KINDS[kind]
                if kind in ("sym", "hard"):
                    info.linkname = link.replace("{OUT}", str(out_dir))
                if kind in ("file", "cont", "sparse", "old-file"):
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                else:
                    tar.addfile(info)
    except (ValueError, UnicodeError, tarfile.TarError):
        return False  # tarfile itself cannot write that header: not an archive anyone can make
    return True


@SETTINGS
@given(members, st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
def test_unpack_random_archives_never_escapes(entries, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dest = root / "sandbox" / "dest"
        dest.mkdir(parents=True)
        (root / "sandbox" / "sentinel.txt").write_text("keep")
        archive = root / "a.tar"
        assume(_write_tar(archive, entries, root / "sandbox", fmt))
        before = _snapshot(root, dest)
        try:
            bundle = unpack_archive(archive, dest)
        except BundleError:
            assert list(dest.iterdir()) == [], "a refused archive left something behind"
            bundle = None
        after = _snapshot(root, dest)
        assert after == before, "something outside the destination changed"
        if bundle is not None:
            assert bundle.parent == dest and [p.name for p in dest.iterdir()] == [bundle.name]
            assert bundle.is_dir() and not bundle.is_symlink()
            for path in bundle.rglob("*"):
                assert not path.is_symlink() and (path.is_file() or path.is_dir()), path


@pytest.fixture(scope="module")
def packed(exported_bundle, tmp_path_factory) -> bytes:
    from edgecore.export.bundle import pack_bundle

    return pack_bundle(exported_bundle, tmp_path_factory.mktemp("packed") / "p.edgecore.tar").read_bytes()


@SETTINGS
@given(st.lists(st.tuples(st.floats(min_value=0, max_value=1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=4),
       st.none() | st.floats(min_value=0, max_value=1))
def test_damaged_real_archive_is_refused_or_caught_by_verify(packed, flips, cut_at):
    data = bytearray(packed)
    for where, xor in flips:
        data[int(where * len(data))] ^= xor
    if cut_at is not None:
        data = data[: int(cut_at * len(data))]
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "damaged.tar"
        archive.write_bytes(bytes(data))
        dest = Path(tmp) / "dest"
        try:
            bundle = unpack_archive(archive, dest)
        except BundleError:
            assert not dest.exists() or list(dest.iterdir()) == []
            return
        assert bundle.parent == dest
        try:
            verified = verify_bundle(bundle)
        except BundleError:
            return
        # accepted after damage: only possible when every flip hit bytes the bundle does not depend on
        assert verified.manifest["format"] == "edgecore-bundle"
