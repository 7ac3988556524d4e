"""The camera CLI as a product: what a camera install offers, infer's outputs, bench's honesty."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from edgecore.cli import app
from edgecore.runtime.frames import output_names

runner = CliRunner()
HOST_COMMANDS = ("fit", "predict", "evaluate", "demo", "export", "pack")


def test_camera_app_holds_only_camera_commands():
    from edgecore.runtime.cli import app as camera_app

    names = {c.name or c.callback.__name__.rstrip("_") for c in camera_app.registered_commands}
    assert {"infer", "bench", "verify", "unpack", "compile"} <= names
    assert not names & set(HOST_COMMANDS)
    host_names = {c.name or c.callback.__name__.rstrip("_") for c in app.registered_commands}
    assert names | set(HOST_COMMANDS) <= host_names


def test_host_commands_in_a_camera_install_name_the_extra_in_one_line(exported_bundle, synthetic_category, tmp_path):
    """torch and scipy unimportable, as on a camera: each host command refuses before doing any work."""
    code = f"""
import sys
for name in ('torch', 'torchvision', 'scipy', 'nncf', 'onnx', 'safetensors'):
    sys.modules[name] = None
from edgecore.cli import app
import json
codes = {{}}
for argv in (['fit', {str(synthetic_category)!r}, '-o', {str(tmp_path / 'm')!r}],
             ['predict', 'model', 'x.png', '-o', {str(tmp_path / 'p')!r}],
             ['evaluate', {str(exported_bundle)!r}, {str(synthetic_category)!r}, '-o', {str(tmp_path / 'e')!r}],
             ['demo', '-o', {str(tmp_path / 'd')!r}],
             ['export', 'model', '-o', {str(tmp_path / 'b.edgecore')!r}],
             ['compile', {str(exported_bundle)!r}, '--precision', 'fp32']):
    codes[argv[0]] = app(argv, standalone_mode=False)
print(json.dumps(codes))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    codes = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(codes.values()) == {2}, codes
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == len(codes), result.stderr  # one line per command, no traceback
    assert all("pip install \"edgecore[host]\"" in line and line.startswith("error:") for line in lines)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "e").exists() and not (tmp_path / "m").exists()  # refused before any work


def test_from_edgecore_runtime_import_detector():
    from edgecore.runtime import Decision, Detector
    from edgecore.runtime.detector import Detector as Same

    assert Detector is Same and Decision.__module__ == "edgecore.runtime.scorer"


def test_output_names_are_unique_stable_and_relative(tmp_path):
    for rel in ("good/000.png", "broken/000.png", "broken/000.jpg", "broken/000.jpg.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    images = [tmp_path / r for r in ("good/000.png", "broken/000.png", "broken/000.jpg", "broken/000.jpg.png")]
    names = output_names(images)
    assert names[images[0]] == "good/000.png" and names[images[1]] == "broken/000.png"
    assert len(set(names.values())) == 4  # x.png, x.jpg and a file literally named x.jpg.png all kept
    assert output_names(images) == names  # stable
    assert output_names([images[0]]) == {images[0]: "000.png"}  # one folder: relative to it


def test_infer_writes_one_row_per_image_pointing_at_its_own_overlay(exported_bundle, synthetic_category, tmp_path):
    good, spot = synthetic_category / "test" / "good", synthetic_category / "test" / "spot"
    assert (good / "000.png").is_file() and (spot / "000.png").is_file()  # same names in both folders
    out = tmp_path / "all"
    result = runner.invoke(app, ["infer", str(exported_bundle), str(good), str(spot), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "engine: openvino" in result.stderr and "search" in result.stderr
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and len({r["overlay"] for r in rows}) == 6
    assert all(Path(r["overlay"]).is_file() and r["engine"].startswith("openvino ") for r in rows)
    assert {Path(r["overlay"]).relative_to(out / "overlays").parts[0] for r in rows} == {"good", "spot"}

    anomalous_only = tmp_path / "anomalous"
    runner.invoke(app, ["infer", str(exported_bundle), str(good), str(spot), "-o", str(anomalous_only),
                        "--overlays", "anomalous"])
    rows = [json.loads(x) for x in (anomalous_only / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 6  # results for every frame, overlays only for the flagged ones
    assert all(("overlay" in r) == r["is_anomalous"] for r in rows) and any(r["is_anomalous"] for r in rows)

    none = tmp_path / "none"
    runner.invoke(app, ["infer", str(exported_bundle), str(good), "-o", str(none), "--overlays", "none"])
    assert len((none / "results.jsonl").read_text().splitlines()) == 4 and not (none / "overlays").exists()

    bad = runner.invoke(app, ["infer", str(exported_bundle), str(good), "-o", str(tmp_path / "x"), "--overlays", "some"])
    assert bad.exit_code == 2 and "--overlays must be one of" in bad.output


def test_overlay_shows_verdict_colour_bar_and_dims_the_uninspected_margin(exported_bundle, synthetic_category, tmp_path):
    from edgecore.runtime.overlay import BAR_PX, HEADER_PX

    spot = synthetic_category / "test" / "spot" / "000.png"
    runner.invoke(app, ["infer", str(exported_bundle), str(spot), "-o", str(tmp_path)])
    row = json.loads((tmp_path / "results.jsonl").read_text())
    overlay = np.asarray(Image.open(row["overlay"]).convert("RGB")).astype(int)
    frame = np.asarray(Image.open(spot).convert("RGB")).astype(int)
    height, width = frame.shape[:2]
    assert overlay.shape == (HEADER_PX + height + BAR_PX, width, 3)
    header = overlay[2, width - 2]
    assert (header[0] > 150 and header[1] < 80) == row["is_anomalous"]  # red header = ANOMALOUS, else green
    bar = overlay[HEADER_PX + height + BAR_PX // 2]
    assert bar[2, 2] > bar[2, 0] and bar[-3, 0] > bar[-3, 2]  # blue → red colour bar
    corner = overlay[HEADER_PX + 1 : HEADER_PX + 5, 1:5]  # outside the 112/128 center crop: dimmed
    assert corner.mean() < frame[1:5, 1:5].mean() * 0.7 + 45


def test_bench_rejects_zero_iterations_in_one_line(exported_bundle):
    result = runner.invoke(app, ["bench", str(exported_bundle), "--iterations", "0", "--quiet"])
    assert result.exit_code == 2 and "error: --iterations must be >= 1" in result.output


def test_bench_reports_load_spread_frames_and_the_p99_it_failed_on(exported_bundle, tmp_path):
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", str(exported_bundle), "--precision", "fp32", "--precision", "bf16",
                                 "--iterations", "3", "--warmup", "1", "--target-ms", "0.001", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert len(report["load_before"]) == 3 and len(report["load_after"]) == 3
    assert "under-counted" in report["frames_source"] and isinstance(report["warnings"], list)
    verdict = result.stdout.strip().splitlines()[-1]
    p99 = report["runs"][0]["stages_ms"]["total"]["p99"]
    assert verdict.startswith("FAIL: ") and f"total p99 {p99:.1f} ms > 0 ms" in verdict
    for label in ("openvino/fp32/auto", "openvino/bf16/auto"):  # the table never cuts the config
        assert label in result.stderr and label in verdict
    assert "load" in result.stderr and "under-counted" in result.stderr


def test_bench_on_real_frames_says_so(exported_bundle, synthetic_category, tmp_path):
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench", str(exported_bundle), "--images", str(synthetic_category / "test" / "good"),
                                 "--iterations", "2", "--warmup", "0", "--quiet", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["frames"] == 4 and "given images" in report["frames_source"]


@pytest.mark.parametrize("score, expected", [(0.9, False), (1.0, True), (1.5, True), (float("nan"), True)])
def test_the_one_decision_rule_is_fail_closed(score, expected):
    from edgecore.runtime.scorer import Decision

    decision = Decision.from_config({"value": 1.0, "normalization": {"threshold": 1.0, "min": 0.5, "max": 1.0}})
    assert bool(decision.is_anomalous(score)) is expected


class _Terminal:
    """A stream that says it is a terminal (rich draws a bar on it)."""

    def __init__(self) -> None:
        import io

        self.buffer = io.StringIO()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return self.buffer.write(text)

    def flush(self) -> None:
        pass


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise():
    import io

    from edgecore.progress import step

    plain = io.StringIO()
    with step("fit: features", 3, stream=plain) as advance:
        advance(3)
    lines = plain.getvalue().splitlines()
    assert lines[0] == "fit: features: 3 …" and lines[1].startswith("fit: features: done in ")
    terminal = _Terminal()
    with step("fit: features", 3, stream=terminal) as advance:
        advance(3)
    assert "3/3" in terminal.buffer.getvalue()  # rich's M-of-N column
    silent = io.StringIO()
    with step("x", 1, enabled=False, stream=silent) as advance:
        advance(1)
    assert silent.getvalue() == ""


def test_evaluate_report_has_operating_point_per_defect_errors_and_both_rocs(fitted_model_dir, synthetic_category, tmp_path):
    result = runner.invoke(app, ["evaluate", str(fitted_model_dir), str(synthetic_category), "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "evaluate: scoring: 10 …" in result.stderr  # progress, as plain lines off a terminal
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    per_defect = metrics["per_defect_type"]
    assert set(per_defect) == {"good", "missing", "scratch", "spot"}
    assert sum(entry["images"] for entry in per_defect.values()) == metrics["images"]
    assert per_defect["good"]["flagged"] == metrics["at_threshold"]["fp"] == len(metrics["false_alarms"])
    assert len(metrics["misses"]) == metrics["at_threshold"]["fn"]
    report = (tmp_path / "report.md").read_text()
    assert "## Operating point" in report and "## Per defect type" in report
    assert "## False alarms" in report and "## Misses" in report
    for image, overlay in metrics["error_overlays"].items():
        assert (tmp_path / overlay).is_file() and overlay in report
    assert len(metrics["error_overlays"]) == len(metrics["false_alarms"]) + len(metrics["misses"])
    roc = Image.open(tmp_path / "roc.png")
    assert roc.size == (640, 640)


def test_roc_plot_gets_image_and_pixel_curves_named_once(fitted_model_dir, synthetic_category, tmp_path, monkeypatch):
    import edgecore.evaluation as evaluation
    from edgecore.model import PatchCoreModel

    drawn = {}
    monkeypatch.setattr(evaluation, "save_roc_png", lambda path, curves, title: drawn.update(curves))
    model = PatchCoreModel.load(fitted_model_dir, device="cpu")
    data = evaluation.load_test_set(synthetic_category, model.preprocess_config)
    result, records = evaluation.evaluate(model, data)
    evaluation.write_evaluation(tmp_path, result, records, "t", test_set=data, scorer=model)
    assert set(drawn) == {"image", "pixel"}  # the plot adds "(AUROC x)" itself: once
    fpr, tpr = drawn["pixel"]
    assert fpr[0] == 0.0 and fpr[-1] == 1.0 and len(fpr) <= evaluation.PLOT_POINTS


def test_an_engine_this_cpu_cannot_run_is_named_never_silently_skipped(bundle_copy, synthetic_category, monkeypatch):
    """On a CPU without VNNI the auto choice passes over a VNNI-only engine: infer says so, and the fix it
    suggests is a workstation step (never "recompile here": the camera has no NNCF)."""
    import edgecore.runtime.backends.openvino as ov_backend
    from edgecore.export.compile import compile_openvino
    from edgecore.runtime.bundle import rewrite_bundle
    from edgecore.runtime.detector import Detector
    from edgecore.runtime.errors import BundleError

    compile_openvino(bundle_copy, "bf16")

    def mark_vnni_only(staging, manifest):  # as an INT8 engine compiled without --portable on a VNNI host is marked
        manifest["engines"]["openvino-bf16"]["requires_vnni"] = True
        return manifest

    rewrite_bundle(bundle_copy, mark_vnni_only)
    monkeypatch.setattr(ov_backend, "has_vnni", lambda: False)  # an AVX2-only camera
    result = runner.invoke(app, ["infer", str(bundle_copy), str(synthetic_category / "test" / "good" / "000.png")])
    assert result.exit_code == 0, result.output
    engine = result.stderr.splitlines()[0]
    assert engine.startswith("engine: openvino") and "requested default" in engine
    assert "not runnable on this CPU: openvino-bf16 (" in engine and "no VNNI" in engine
    assert json.loads(result.stdout.splitlines()[-1])["engine"].startswith("openvino ")
    with pytest.raises(BundleError, match="on the workstation.*--portable") as refused:
        Detector.open(bundle_copy, precision="bf16")
    assert "recompile it here" not in str(refused.value)


def test_compile_dispatches_through_the_backend_registry(exported_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as on an Intel camera, even where TensorRT exists
    result = runner.invoke(app, ["compile", str(exported_bundle), "--target", "tensorrt", "--precision", "fp16"])
    assert result.exit_code == 2 and "TensorRT is not installed" in result.output
    result = runner.invoke(app, ["compile", str(exported_bundle), "--target", "onnxruntime", "--precision", "fp32"])
    assert result.exit_code == 2 and "unknown backend 'onnxruntime'; choose openvino or tensorrt" in result.output
