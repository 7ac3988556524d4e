"""`edgecore compile`: add a compiled engine to a bundle (atomically, manifest re-hashed).

OpenVINO: ONNX → IR at the requested precision (INT8 through NNCF on normal
images). Optionally re-fit the decision threshold with the compiled engine on
held-out normal images, so the camera's boundary is computed by the camera's
own numbers; it is stored with the engine and used whenever that engine runs.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import openvino as ov

from edgecore.runtime.backends.openvino import PRECISION_HINTS, PRECISIONS, engine_key, executed_precisions
from edgecore.runtime.bundle import add_engine, bundle_lock, verify_bundle
from edgecore.runtime.preprocess import PreprocessConfig


def compile_openvino(
    bundle: str | Path,
    precision: str,
    calib: str | Path | None = None,
    num_calib: int | None = None,
    max_drop: float | None = None,
    refit: str | Path | None = None,
    portable: bool = False,
    log: Callable[[str], None] = lambda message: None,
) -> dict:
    """Add an OpenVINO engine to a bundle (the host side of the ``openvino`` backend entry).

    Args:
        bundle: bundle directory.
        precision: fp32, fp16, bf16 or int8.
        calib: normal images for INT8 calibration.
        num_calib: how many of them (default 64).
        max_drop: INT8 accuracy-aware mode: largest allowed drop of the embedding cosine.
        refit: held-out normal images; re-fit the threshold with this engine.
        portable: INT8 that every x86 CPU runs (7-bit weights; also without VNNI).
        log: progress lines.

    Returns:
        the rewritten manifest.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"OpenVINO precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "int8" and calib is None:
        raise ValueError("--precision int8 needs --calib DIR (normal images: the train set or a folder)")
    # The whole read → compile → add engine → re-fit is one writer: a second compile of this
    # bundle waits here (and says so) instead of swapping in a manifest without our engine.
    with bundle_lock(bundle, log=log):
        return _compile_locked(bundle, precision, calib, num_calib, max_drop, refit, portable, log)


def _compile_locked(bundle, precision, calib, num_calib, max_drop, refit, portable, log) -> dict:
    from edgecore.calibration.int8 import DEFAULT_NUM_CALIB, calibration_crops, quantize
    from edgecore.runtime.cpu import has_vnni

    verified = verify_bundle(bundle)
    manifest = verified.manifest
    config = PreprocessConfig.from_dict(manifest["preprocess"])
    core = ov.Core()
    model = core.read_model(str(verified.path / manifest["graph"]["file"]))
    description: dict = {"backend": "openvino", "precision": precision, "openvino_version": ov.get_version()}

    if precision == "int8":
        count = num_calib or DEFAULT_NUM_CALIB
        start = time.perf_counter()
        crops = calibration_crops(calib, config, count)
        log(f"compile: NNCF INT8 calibration on {len(crops)} normal images from {calib}")
        vnni = has_vnni() and not portable  # portable: 7-bit weights, correct on CPUs without VNNI too
        model = quantize(model, crops, max_drop=max_drop, vnni=vnni)
        description["requires_vnni"] = vnni
        description["calibration"] = {
            "source": str(calib), "images": int(len(crops)), "preset": "mixed", "head_kept_fp32": True,
            "overflow_fix": not vnni,
            "accuracy_control": {"metric": "embedding cosine", "max_drop": max_drop} if max_drop is not None else None,
            "seconds": round(time.perf_counter() - start, 2),
        }

    def write_engine(engine_dir: Path) -> dict:
        ov.save_model(model, str(engine_dir / "model.xml"), compress_to_fp16=precision == "fp16")
        prefix = engine_dir.relative_to(engine_dir.parents[1]).as_posix()
        return {"xml": f"{prefix}/model.xml", "bin": f"{prefix}/model.bin"}

    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[precision]})
    description["executed_on_this_cpu"] = executed_precisions(compiled)
    manifest = add_engine(verified.path, engine_key(precision), write_engine, description)
    if refit is not None:
        manifest = refit_threshold(verified.path, precision, refit, log)
    return manifest


def refit_threshold(
    bundle: Path, precision: str, normals: str | Path, log: Callable[[str], None]
) -> dict:
    """Score held-out normal images with the compiled engine and store that engine's own threshold.

    Only manifest.json changes; it is rewritten through the same atomic bundle swap as a new engine.
    """
    from edgecore.calibration.threshold import threshold_config
    from edgecore.data.datasets import ImageStream, Sample, list_images
    from edgecore.runtime.bundle import rewrite_bundle
    from edgecore.runtime.detector import Detector
    from edgecore.runtime.preprocess import preprocess

    samples = [Sample(path, 0, "good", None) for path in list_images(normals)]
    with Detector.open(bundle, backend="openvino", precision=precision) as detector:
        crops = np.stack([preprocess(rgb, detector.preprocess_config) for _, rgb in ImageStream(samples)])
        scores = detector.score_crops(crops).image
    log(f"compile: re-fitted the threshold on {len(scores)} normal images with the {precision} engine")

    def change(staging: Path, manifest: dict) -> dict:
        rate = float(manifest["threshold"]["false_alarm_rate"])  # the rate chosen at fit time
        entry = manifest["engines"][engine_key(precision)]
        entry["threshold"] = {**threshold_config(scores, rate, held_out=True), "source": str(normals)}
        return manifest

    return rewrite_bundle(bundle, change)
