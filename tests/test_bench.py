"""`edgecore bench`: per-stage percentiles, comparison mode, PASS/FAIL and --strict, camera emulation."""
import json
import platform

from typer.testing import CliRunner

from edgecore.cli import app
from edgecore.runtime.bench import percentiles

runner = CliRunner()


def test_percentiles_on_known_values():
    stats = percentiles(list(range(1, 101)))
    assert stats["p50"] == 50.5 and stats["max"] == 100 and abs(stats["p99"] - 99.01) < 1e-9


def test_bench_compares_interleaved_configs_and_reports_everything(exported_bundle, tmp_path):
    out, md = tmp_path / "b.json", tmp_path / "b.md"
    result = runner.invoke(
        app,
        ["bench", str(exported_bundle), "--precision", "fp32", "--precision", "bf16", "--iterations", "4", "--warmup", "1",
         "--json", str(out), "--markdown", str(md), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [run["config"] for run in report["runs"]] == ["openvino/fp32/auto", "openvino/bf16/auto"]
    for run in report["runs"]:
        stages = run["stages_ms"]
        assert set(stages) == {"decode", "preprocess", "engine", "search", "scoring_map", "total"}
        assert stages["total"]["p50"] <= stages["total"]["p99"] <= stages["total"]["max"]
        assert stages["total"]["p50"] >= stages["engine"]["p50"]
        assert run["engine"]["executed_precision"] in ("fp32", "bf16")
        assert run["sizes"]["index_bytes"] > 0 and run["pass"] == (stages["total"]["p99"] <= 200.0)
    assert report["runs"][0]["ratio_p50_vs_first"] == 1.0
    assert report["peak_rss_mb"] > 0 and report["environment"]["cpu_count"] >= 1
    assert "| openvino/fp32/auto |" in md.read_text()


def test_strict_exits_1_when_the_target_is_missed(exported_bundle):
    result = runner.invoke(
        app, ["bench", str(exported_bundle), "--iterations", "2", "--warmup", "1", "--target-ms", "0.001", "--strict", "--quiet"]
    )
    assert result.exit_code == 1 and "FAIL" in result.stdout


def test_camera_emulation_runs_capped_and_labelled(exported_bundle, tmp_path):
    out = tmp_path / "cam.json"
    result = runner.invoke(
        app, ["bench", str(exported_bundle), "--iterations", "2", "--warmup", "1", "--emulate-camera", "--json", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    camera = json.loads(out.read_text())["camera_estimate"]
    assert "estimate" in camera["estimate"]
    run = camera["runs"][0]
    assert run["engine"]["threads"] == 1
    assert camera["environment"]["onednn_max_cpu_isa"] == "AVX2"
    assert "kernels at AVX2 or below" in run["isa_cap_honoured"]
    if platform.machine().lower() in ("x86_64", "amd64"):  # the native int8 search is capped like the engine
        assert camera["native_search_isa"] == "avx2", camera["native_search_isa"]
        assert "search on its avx2 path with 1 thread" in camera["estimate"]


def test_interval_paces_the_frames_like_a_camera(exported_bundle, tmp_path, monkeypatch):
    """--interval-ms 150: each timed frame starts 150 ms after the one before, the process idling in between
    (back to back there is no wait at all); the report says how the frames came."""
    import time

    from edgecore.runtime import bench as bench_mod

    waits: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(bench_mod.time, "sleep", lambda seconds: (waits.append(seconds), real_sleep(seconds)))
    out, md = tmp_path / "paced.json", tmp_path / "paced.md"
    result = runner.invoke(app, ["bench", str(exported_bundle), "--iterations", "4", "--warmup", "0", "--interval-ms",
                                 "150", "--json", str(out), "--markdown", str(md), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    frame_ms = report["runs"][0]["stages_ms"]["total"]["max"]
    assert report["interval_ms"] == 150.0 and "one every 150 ms" in md.read_text()
    assert len(waits) == 4 and waits[0] <= 0.001  # the first frame is due at once, each later one 150 ms on
    assert all(abs(w - (0.150 - frame_ms / 1e3)) < 0.05 for w in waits[1:]), (waits, frame_ms)
    assert runner.invoke(app, ["bench", str(exported_bundle), "--interval-ms", "-1", "--quiet"]).exit_code != 0
