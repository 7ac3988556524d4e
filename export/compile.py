"""`edgecore compile`: add a compiled engine to a bundle (atomically, manifest re-hashed).

OpenVINO: ONNX → IR at the requested precision (INT8 through NNCF on normal
images). By default the decision threshold and normalisation are then re-fitted
with the compiled engine on the validation images the bundle carries (or on a
folder given with ``--refit-threshold``), so the camera's boundary is computed by
the camera's own numbers; it is stored with the engine, with the engine-vs-fp32
score shift, and used whenever that engine runs.
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
    keep_threshold: bool = False,
) -> dict:
    """Add an OpenVINO engine to a bundle (the host side of the ``openvino`` backend entry).

    Args:
        bundle: bundle directory.
        precision: fp32, fp16, bf16 or int8.
        calib: normal images for INT8 calibration.
        num_calib: how many of them (default 64).
        max_drop: INT8 accuracy-aware mode: largest allowed drop of the embedding cosine.
        refit: held-out normal images to re-fit the threshold on (default: the bundle's validation images).
        portable: INT8 that every x86 CPU runs (7-bit weights; also without VNNI).
        log: progress lines.
        keep_threshold: keep fit's fp32 threshold for this engine (no re-fit).

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
        return _compile_locked(bundle, precision, calib, num_calib, max_drop, refit, portable, log, keep_threshold)


def _compile_locked(bundle, precision, calib, num_calib, max_drop, refit, portable, log, keep_threshold) -> dict:
    from edgecore.calibration.int8 import (DEFAULT_NUM_CALIB, KEPT_FP32, PORTABLE_KEPT_FP32, calibration_crops,
                                          quantize)
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
            "source": str(calib), "images": int(len(crops)), "preset": "mixed",
            "overflow_fix": not vnni,
            "kept_fp32": list(KEPT_FP32 if vnni else PORTABLE_KEPT_FP32),
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
    if keep_threshold:
        log("compile: --keep-threshold: this engine uses the fp32 threshold from fit")
    elif refit is not None or manifest.get("validation"):
        manifest = refit_threshold(verified.path, precision, refit, log)
    else:
        log("compile: the bundle stores no validation images (re-export it), and no --refit-threshold DIR was "
            "given: this engine uses the fp32 threshold from fit")
    return manifest


def refit_threshold(
    bundle: Path, precision: str, normals: str | Path | None, log: Callable[[str], None]
) -> dict:
    """Score held-out normal images with the compiled engine and store that engine's own threshold.

    Args:
        normals: a folder of held-out normal images; None: the bundle's stored validation images.

    The stored validation images are always scored too (when the bundle has them), to record how
    this engine's scores shift against the fp32 scores of fit. Only manifest.json changes; it is
    rewritten through the same atomic bundle swap as a new engine.
    """
    from edgecore.calibration.threshold import threshold_config
    from edgecore.data.datasets import ImageStream, Sample, list_images
    from edgecore.export.validation import describe_shift, load_validation, score_shift
    from edgecore.runtime.bundle import rewrite_bundle
    from edgecore.runtime.detector import Detector
    from edgecore.runtime.preprocess import preprocess

    with Detector.open(bundle, backend="openvino", precision=precision) as detector:
        stored = load_validation(detector.bundle.path, detector.manifest)
        stored_scores = detector.score_crops(stored).image if stored is not None else None
        if normals is None:
            scores, source = stored_scores, "bundle validation images"
        else:
            samples = [Sample(path, 0, "good", None) for path in list_images(normals)]
            crops = np.stack([preprocess(rgb, detector.preprocess_config) for _, rgb in ImageStream(samples)])
            scores, source = detector.score_crops(crops).image, str(normals)
        fitted = detector.manifest["threshold"]
    rate = float(fitted["false_alarm_rate"])  # the rate chosen at fit time
    threshold = {**threshold_config(scores, rate, held_out=True), "source": source}
    log(f"compile: re-fitted the threshold on {len(scores)} normal images ({source}) with the {precision} engine")
    shift = None
    if stored_scores is not None:
        shift = score_shift(stored_scores, fitted["validation_scores"], fitted["value"], threshold["value"])
        log(describe_shift(shift, precision))

    def change(staging: Path, manifest: dict) -> dict:
        entry = manifest["engines"][engine_key(precision)]
        entry["threshold"] = threshold
        if shift is not None:
            entry["score_shift"] = shift
        return manifest

    return rewrite_bundle(bundle, change)
