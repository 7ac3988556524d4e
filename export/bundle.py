"""`edgecore export` and `edgecore pack`: model directory → verifiable camera bundle.

Bundle layout::

    NAME.edgecore/
      manifest.json     format + version, preprocessing, backbone (+ weights sha256), layers,
                        grid, embed dim, scoring, thresholds, graph I/O, index parameters,
                        quantization, engines, and every file with size + sha256
      model.onnx        backbone + patch pooling + reduction, uint8 NHWC in, N×P×D out
      index/            the quantized coreset index (its own format, see manifest.index)
      neighbours.npy    M×b int32: Eq. 7 support set of every coreset point
      anomaly_bank.npy  (after `edgecore label`) K×D float32 labelled-defect patches (manifest.labelled)
      roi.npy           (fit --roi) grid h×w uint8 0/1: the inspected patches (manifest.roi)
      engines/…         compiled engines, added later by `edgecore compile`
"""
from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import numpy as np
import onnx

import edgecore
from edgecore.export.index_build import build_index
from edgecore.export.onnx_export import INPUT_NAME, OPSET, OUTPUT_NAME, export_onnx, torch_reference
from edgecore.export.validation import VALIDATION_FILE, validation_crops
from edgecore.model import PatchCoreModel
from edgecore.runtime.bundle import (
    ARCHIVE_SUFFIX, FORMAT, FORMAT_VERSION, MANIFEST, bundle_lock, contract_fields, file_entry, verify_bundle,
)
from edgecore.runtime.errors import BundleError
from edgecore.runtime.roi import ROI_FILE
from edgecore.runtime.fsutil import atomic_directory, atomic_write_bytes, write_json

GRAPH_FILE = "model.onnx"
INDEX_DIR = "index"
NEIGHBOURS_FILE = "neighbours.npy"
THRESHOLD_FIELDS = ("value", "mode", "false_alarm_rate", "normalization", "empirical", "gaussian_tail",
                    "from_held_out_normals", "validation_scores")


def export_bundle(
    model_dir: str | Path,
    output: str | Path,
    index_dtype: str = "int8",
    search: str | None = None,
    batch: int = 1,
    log=lambda message: None,
) -> Path:
    """Write the bundle atomically; an interrupted export leaves no bundle that looks complete."""
    output = Path(output)
    model = PatchCoreModel.load(model_dir, device="cpu")
    config = model.config
    crop = model.preprocess_config.input_hw
    timings: dict[str, float] = {}
    validation, validation_note = validation_crops(model, log)
    if validation is None:
        log(f"export: no validation images stored ({validation_note}); compile keeps the fp32 threshold")

    start = time.perf_counter()
    log("export: tracing the feature module to ONNX (opset %d, static shapes)" % OPSET)
    graph = export_onnx(model.features, crop, batch=batch)
    timings["onnx_s"] = time.perf_counter() - start

    start = time.perf_counter()
    log(f"export: building the {index_dtype} coreset index")
    grid = config["features"]["grid"]
    # HNSW certification re-checks each image's worst patches: it needs the per-image query count.
    # With an ROI only its patches are queried, so that is the per-image block.
    per_image = grid[0] * grid[1] if model.roi is None else len(model.roi.flat)
    index = build_index(model.memory_bank, dtype=index_dtype, mode=search, patches_per_image=per_image)
    timings["index_s"] = time.perf_counter() - start

    embed_dim = config["features"]["embed_dim"]
    with bundle_lock(output, log=log), atomic_directory(output) as staging:
        onnx.save(graph, str(staging / GRAPH_FILE))
        (staging / INDEX_DIR).mkdir()
        index_description = index.save(staging / INDEX_DIR)
        np.save(staging / NEIGHBOURS_FILE, model.neighbour_table.astype(np.int32), allow_pickle=False)
        labelled = config.get("labelled")  # labelled defects (edgecore.labelled): the anomaly bank travels too
        if labelled is not None:
            np.save(staging / labelled["file"], model.anomaly_bank.astype(np.float32), allow_pickle=False)
        if model.roi is not None:
            model.roi.save(staging)
        if validation is not None:
            (staging / VALIDATION_FILE).parent.mkdir()
            np.save(staging / VALIDATION_FILE, validation, allow_pickle=False)
        files = [GRAPH_FILE, NEIGHBOURS_FILE] + ([VALIDATION_FILE] if validation is not None else []) + (
            [ROI_FILE] if model.roi is not None else []) + ([labelled["file"]] if labelled is not None else []) + sorted(
            p.relative_to(staging).as_posix() for p in (staging / INDEX_DIR).rglob("*") if p.is_file()
        )
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "edgecore_version": edgecore.__version__,
            "preprocess": config["preprocess"],
            "backbone": {k: config["backbone"][k] for k in ("name", "layers", "mean", "std", "weights_sha256", "weights_source")},
            "features": {"grid": grid, "embed_dim": embed_dim},
            "scoring": config["scoring"],
            # The held-out normals' scores travel along: `edgecore threshold` re-derives the boundary from them.
            "threshold": {k: config["threshold"][k] for k in THRESHOLD_FIELDS if k in config["threshold"]},
            "graph": {
                "file": GRAPH_FILE,
                "opset": OPSET,
                "batch": batch,
                "input": {"name": INPUT_NAME, "shape": [batch, *crop, 3], **contract_fields("graph.input")},
                "output": {"name": OUTPUT_NAME, "shape": [batch, grid[0] * grid[1], embed_dim], **contract_fields("graph.output")},
                "ops": sorted({node.op_type for node in graph.graph.node}),
            },
            "index": {"dir": INDEX_DIR, **index_description},
            "neighbour_table": {"file": NEIGHBOURS_FILE, "shape": list(model.neighbour_table.shape)},
            "coreset": {k: config["coreset"][k] for k in ("size", "ratio", "projection_dim", "seed")}
            | ({"denoise": config["coreset"]["denoise"]} if "denoise" in config["coreset"] else {})  # fit --denoise
            | ({"augment": config["coreset"]["augment"]} if "augment" in config["coreset"] else {}),  # fit --augment
            **({"roi": model.roi.to_manifest()} if model.roi is not None else {}),
            **({"labelled": labelled} if labelled is not None else {}),
            "engines": {},
            # The held-out images behind threshold.validation_scores: compile re-fits the threshold on its engine.
            **({"validation": {"file": VALIDATION_FILE, "images": int(len(validation)), "note": validation_note}}
               if validation is not None else {}),
            "export": {"timings_s": {k: round(v, 3) for k, v in timings.items()}},
            "files": {name: file_entry(staging, name) for name in files},
        }
        write_json(staging / MANIFEST, manifest)
        verify_bundle(staging)
    return output


def pack_bundle(bundle: str | Path, archive: str | Path | None = None) -> Path:
    """One reproducible tar (sorted, fixed mtime/owner) to copy onto a camera; verified first."""
    verified = verify_bundle(bundle)
    bundle = verified.path
    archive = Path(archive) if archive else bundle.with_name(bundle.name.removesuffix(".edgecore") + ARCHIVE_SUFFIX)
    names = [MANIFEST, *sorted(verified.manifest["files"])]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            data = (bundle / name).read_bytes()
            info = tarfile.TarInfo(f"{bundle.name}/{name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    if archive.exists() and archive.is_dir():
        raise BundleError(f"{archive}: is a directory")
    atomic_write_bytes(archive, buffer.getvalue())
    return archive
