"""Bundle: round trip, verification, tampering, safe archives, atomic writes."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from edgecore.cli import app
from edgecore.export.bundle import export_bundle, pack_bundle
from edgecore.runtime.bundle import MANIFEST, read_manifest, unpack_archive, verify_bundle, verify_path
from edgecore.runtime.errors import BundleError

runner = CliRunner()


def test_manifest_records_everything_the_camera_needs(exported_bundle, fitted_model_dir):
    manifest = verify_bundle(exported_bundle).manifest
    config = json.loads((fitted_model_dir / "config.json").read_text())
    assert manifest["preprocess"] == config["preprocess"]
    assert manifest["backbone"]["weights_sha256"] == config["backbone"]["weights_sha256"]
    assert manifest["backbone"]["layers"] == config["backbone"]["layers"]
    assert manifest["features"] == {"grid": config["features"]["grid"], "embed_dim": config["features"]["embed_dim"]}
    assert manifest["scoring"]["num_neighbors"] == config["scoring"]["num_neighbors"]
    assert manifest["threshold"]["normalization"] == config["threshold"]["normalization"]
    assert manifest["graph"]["input"]["dtype"] == "uint8" and manifest["graph"]["batch"] == 1
    assert manifest["index"]["dtype"] == "int8"
    assert set(manifest["files"]) >= {"model.onnx", "neighbours.npy"}
    for name, entry in manifest["files"].items():
        assert (exported_bundle / name).stat().st_size == entry["size"]


def test_export_is_reproducible(fitted_model_dir, exported_bundle, tmp_path):
    again = export_bundle(fitted_model_dir, tmp_path / "again.edgecore")
    first = read_manifest(exported_bundle)["files"]
    second = read_manifest(again)["files"]
    assert {k: v["sha256"] for k, v in first.items() if k != "model.onnx"} == {
        k: v["sha256"] for k, v in second.items() if k != "model.onnx"
    }


def test_flipped_byte_is_named(bundle_copy):
    target = bundle_copy / "neighbours.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="neighbours.npy: sha256 mismatch"):
        verify_bundle(bundle_copy)


def test_truncated_missing_and_extra_files(bundle_copy):
    onnx_path = bundle_copy / "model.onnx"
    original = onnx_path.read_bytes()
    onnx_path.write_bytes(original[:100])
    with pytest.raises(BundleError, match="model.onnx: size 100 bytes"):
        verify_bundle(bundle_copy)
    onnx_path.unlink()
    with pytest.raises(BundleError, match="model.onnx: listed in the manifest but missing"):
        verify_bundle(bundle_copy)
    onnx_path.write_bytes(original)
    (bundle_copy / "payload.sh").write_text("echo hi")
    with pytest.raises(BundleError, match="payload.sh: not listed"):
        verify_bundle(bundle_copy)


@pytest.mark.parametrize(
    "mutate,needle",
    [
        (lambda m: m.update(format_version="2.0"), "newer than this runtime"),
        (lambda m: m.update(format_version="x"), "MAJOR.MINOR"),
        (lambda m: m.update(format="zip"), "not an edgecore bundle"),
        (lambda m: m["preprocess"].update(crop="224"), "preprocess.crop: expected int"),
        (lambda m: m["preprocess"].update(crop=10_000), "crop 10000 > resize"),
        (lambda m: m["features"].update(grid=[0, 28]), "features.grid"),
        (lambda m: m["scoring"].update(num_neighbors=True), "expected a number"),
        (lambda m: m["threshold"].pop("normalization"), "missing field 'normalization'"),
        (lambda m: m["files"].update({"../evil": {"size": 1, "sha256": "0" * 64}}), "unsafe path"),
        (lambda m: m["files"]["model.onnx"].update(sha256="nothex"), "not a sha256"),
    ],
)
def test_bad_manifest_fields_are_named(bundle_copy, mutate, needle):
    manifest = json.loads((bundle_copy / MANIFEST).read_text())
    mutate(manifest)
    (bundle_copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=needle):
        verify_bundle(bundle_copy)


def test_manifest_not_json(bundle_copy):
    (bundle_copy / MANIFEST).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        verify_bundle(bundle_copy)


def test_pack_unpack_round_trip_and_reproducible(exported_bundle, tmp_path):
    archive = pack_bundle(exported_bundle, tmp_path / "a.edgecore.tar")
    again = pack_bundle(exported_bundle, tmp_path / "b.edgecore.tar")
    assert archive.read_bytes() == again.read_bytes()
    unpacked = unpack_archive(archive, tmp_path / "camera")
    assert verify_bundle(unpacked).manifest == read_manifest(exported_bundle)
    assert verify_path(archive).manifest["format"] == "edgecore-bundle"


def _malicious_archive(path, member_name, kind=tarfile.REGTYPE, linkname=""):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo(member_name)
        info.type = kind
        info.linkname = linkname
        data = b"boom"
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return path


@pytest.mark.parametrize(
    "name,kind,linkname,needle",
    [
        ("../escape.txt", tarfile.REGTYPE, "", "unsafe path"),
        ("/etc/evil", tarfile.REGTYPE, "", "unsafe path"),
        ("b.edgecore/link", tarfile.SYMTYPE, "/etc/passwd", "link or device"),
        ("b.edgecore/hard", tarfile.LNKTYPE, "b.edgecore/x", "link or device"),
        ("b.edgecore/dev", tarfile.CHRTYPE, "", "link or device"),
    ],
)
def test_malicious_archives_are_refused_and_write_nothing(tmp_path, name, kind, linkname, needle):
    archive = _malicious_archive(tmp_path / "evil.tar", name, kind, linkname)
    destination = tmp_path / "dest"
    with pytest.raises(BundleError, match=needle):
        unpack_archive(archive, destination)
    assert not (tmp_path / "escape.txt").exists()
    assert list(destination.iterdir()) == []


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(64))
    with pytest.raises(BundleError, match="not a readable bundle archive"):
        unpack_archive(junk, tmp_path / "d")


def test_interrupted_export_leaves_no_bundle(fitted_model_dir, tmp_path, monkeypatch):
    import edgecore.export.bundle as bundle_module

    def explode(*args, **kwargs):
        raise RuntimeError("simulated crash while writing the index")

    monkeypatch.setattr(bundle_module, "build_index", explode)
    with pytest.raises(RuntimeError):
        export_bundle(fitted_model_dir, tmp_path / "x.edgecore")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_pack_verify(fitted_model_dir, tmp_path):
    bundle = tmp_path / "p.edgecore"
    result = runner.invoke(app, ["export", str(fitted_model_dir), "-o", str(bundle), "--index-dtype", "fp16", "--search", "exact"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["index"]["dtype"] == "fp16" and summary["index"]["mode"] == "exact"
    result = runner.invoke(app, ["pack", str(bundle)])
    assert result.exit_code == 0, result.output
    archive = tmp_path / "p.edgecore.tar"
    assert archive.is_file()
    result = runner.invoke(app, ["verify", str(archive)])
    assert result.exit_code == 0 and '"ok": true' in result.stdout
    (bundle / "neighbours.npy").write_bytes(b"x")
    result = runner.invoke(app, ["verify", str(bundle)])
    assert result.exit_code == 2 and "neighbours.npy" in result.output


def test_cli_unpack_verifies_and_removes_a_bad_bundle(exported_bundle, tmp_path):
    archive = pack_bundle(exported_bundle, tmp_path / "u.edgecore.tar")
    result = runner.invoke(app, ["unpack", str(archive), "-o", str(tmp_path / "cam")])
    assert result.exit_code == 0, result.output
    assert verify_bundle(tmp_path / "cam" / exported_bundle.name)
    # an archive whose payload was altered after packing: unpack refuses and leaves nothing
    with tarfile.open(archive) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    bad = tmp_path / "bad.edgecore.tar"
    with tarfile.open(bad, "w") as tar:
        for member, data in members:
            if member.name.endswith("neighbours.npy"):
                data = data[:-1] + bytes([data[-1] ^ 1])
            tar.addfile(member, io.BytesIO(data))
    result = runner.invoke(app, ["unpack", str(bad), "-o", str(tmp_path / "cam2")])
    assert result.exit_code == 2 and "sha256 mismatch" in result.output
    assert list((tmp_path / "cam2").iterdir()) == []
