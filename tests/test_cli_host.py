"""fit / predict / evaluate / demo through the real CLI, and their bad-input errors."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgecore.cli import app
from edgecore.model import PatchCoreModel

runner = CliRunner()


def test_fit_writes_a_complete_model_directory(synthetic_category, tmp_path):
    out = tmp_path / "model"
    result = runner.invoke(
        app,
        ["fit", str(synthetic_category), "-o", str(out), "--resize", "128", "--crop", "112", "--device", "cpu",
         "--coreset-ratio", "0.05", "--num-neighbors", "3"],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    config = json.loads((out / "config.json").read_text())
    assert config["backbone"]["name"] == "efficientnet_lite0"
    assert len(config["backbone"]["weights_sha256"]) == 64
    assert config["preprocess"]["resize"] == 128 and config["preprocess"]["crop"] == 112
    assert config["features"]["grid"] == [14, 14]
    assert config["coreset"]["size"] == summary["coreset_size"]
    assert config["scoring"]["num_neighbors"] == 3
    model = PatchCoreModel.load(out, device="cpu")
    assert model.neighbour_table.shape == (config["coreset"]["size"], 3)
    assert not list(tmp_path.glob(".model.*"))  # no staging leftovers


def test_predict_scores_defects_above_normals(fitted_model_dir, synthetic_category, tmp_path):
    images = [synthetic_category / "test" / "good", synthetic_category / "test" / "spot"]
    result = runner.invoke(app, ["predict", str(fitted_model_dir), *map(str, images), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    good = [r["score"] for r in rows if "/good/" in r["image"]]
    spot = [r["score"] for r in rows if "/spot/" in r["image"]]
    assert min(spot) > max(good)
    assert all(r["is_anomalous"] == (r["normalized_score"] >= 0.5) for r in rows)
    overlay = tmp_path / "overlays" / "good" / "000.jpg"  # named by relative path: good/000 and spot/000 both kept
    assert overlay.is_file() and (tmp_path / "overlays" / "spot" / "000.jpg").is_file()
    from PIL import Image

    assert Image.open(overlay).width == 128  # the original width (small frames are not scaled)


def test_evaluate_reports_metrics_and_roc(fitted_model_dir, synthetic_category, tmp_path):
    result = runner.invoke(app, ["evaluate", str(fitted_model_dir), str(synthetic_category), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["images"] == 10 and metrics["anomalous_images"] == 6
    assert metrics["image_auroc"] >= 0.9
    assert metrics["pixel_auroc"] >= 0.9
    assert 0.0 < metrics["aupro"] <= 1.0
    assert (tmp_path / "roc.png").stat().st_size > 1000
    assert "image_auroc" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["fit", "{missing}", "-o", "{tmp}/m"], "not found"),
        (["fit", "{empty}", "-o", "{tmp}/m"], "no images"),
        (["predict", "{tmp}", "{empty}", "-o", "{tmp}/o"], "config.json"),
        (["evaluate", "{tmp}/nope", "{empty}", "-o", "{tmp}/o"], "not a model directory"),
        (["fit", "{empty}", "-o", "{tmp}/m", "--coreset-ratio", "1.5"], "coreset_ratio"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, args, needle):
    empty = tmp_path / "empty"
    empty.mkdir()
    subs = {"missing": str(tmp_path / "missing"), "empty": str(empty), "tmp": str(tmp_path)}
    result = runner.invoke(app, [a.format(**subs) for a in args])
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and needle in result.output
    assert not (tmp_path / "m").exists()


def test_fit_names_a_corrupt_file_or_skips_it(synthetic_category, tmp_path):
    import shutil

    data = tmp_path / "normals"
    shutil.copytree(synthetic_category / "train" / "good", data)
    (data / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    result = runner.invoke(app, ["fit", str(data), "-o", str(tmp_path / "m"), "--resize", "64", "--crop", "64"])
    assert result.exit_code == 2 and "zz_broken.png" in result.output
    assert not (tmp_path / "m").exists()
    result = runner.invoke(
        app, ["fit", str(data), "-o", str(tmp_path / "m"), "--resize", "64", "--crop", "64", "--skip-bad"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout[result.stdout.index("{"):])["skipped_files"] == 1


def test_model_weights_mismatch_is_refused(fitted_model_dir, tmp_path):
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(fitted_model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["backbone"]["weights_sha256"] = "0" * 64
    (copy / "config.json").write_text(json.dumps(config))
    from edgecore.runtime.errors import ModelError

    with pytest.raises(ModelError, match="weights differ"):
        PatchCoreModel.load(copy, device="cpu")


def test_demo_quick_runs_end_to_end(tmp_path):
    result = runner.invoke(app, ["demo", "-o", str(tmp_path / "demo"), "--quick"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["image_auroc"] >= 0.9
    assert (tmp_path / "demo" / "report" / "report.md").is_file()
