"""Per-frame cost outside the engine and the search (issue #11): preprocessing and scoring + map.

One interleaved run (round-robin, so load drift hits every variant alike) on real frames:

* stages: preprocessing before #11 (the whole frame resized, then cropped) vs ``v1`` (the same
  bytes, only the visible box resized) vs ``v2`` (whole-factor reduction first); scoring + map
  before (the full-resolution map made eagerly) vs now (made on access);
* end to end: ``Detector.detect(rgb_array)`` — the raw-frame entry point, no decode — on each
  bundle given, per-stage p50 and "total excluding decode" against the engine.

``--decode`` times decoding the PNG files themselves: Pillow (``load_image`` before the fast reader) vs
``load_image`` now (``runtime/png.py``: libdeflate + the native unfilter), and the reader's two halves
(the inflate also by the stdlib's zlib, and by zlib-ng where it is installed: the reader's inflater before),
interleaved file by file from bytes in memory (the disk is not measured); every frame is checked equal.

``--fidelity DATA`` instead fits Lite0 twice on an MVTec category (``v1`` and ``v2``) and prints
image / pixel AUROC of each, the check that v2 changes no verdict quality.

    OMP_NUM_THREADS=2 python benchmarks/bench_frame_overhead.py --images ../shared/data/mvtec_bottle/test \\
        --bundle /tmp/pp/bottle.edgecore --bundle /tmp/pp/bottle_v2.edgecore
    OMP_NUM_THREADS=2 python benchmarks/bench_frame_overhead.py --fidelity ../shared/data/mvtec_bottle
    python benchmarks/bench_frame_overhead.py --decode --images ../shared/data/mvtec_bottle/test --frames 40
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from edgecore.runtime.frames import expand_images
from edgecore.runtime.imageio import load_image
from edgecore.runtime.preprocess import PreprocessConfig, _place, crop_map_to_original, preprocess
from edgecore.runtime.scoring import map_operator


EVICT_BYTES = 32 << 20  # touched between timed calls: larger than this VM's L2 + its share of L3


def preprocess_before(rgb: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Preprocessing as it was before #11: the whole frame resized, then placed (v1's bytes)."""
    height, width = rgb.shape[:2]
    rh, rw, _, _ = config.placement(height, width)
    image = Image.fromarray(rgb)
    if (image.width, image.height) != (rw, rh):
        image = image.resize((rw, rh), Image.Resampling.BILINEAR)
    return _place(np.asarray(image, dtype=np.uint8), config, height, width, 0)


def _p50(values: list[float]) -> float:
    return float(np.percentile(values, 50))


def stage_run(detector, frames: list[np.ndarray], rounds: int) -> dict[str, float]:
    """p50 ms of each preprocessing / scoring variant, interleaved frame by frame."""
    config = detector.preprocess_config
    v1, v2 = (PreprocessConfig.from_dict({**config.to_dict(), "resample": r}) for r in ("v1", "v2"))
    crops = [preprocess(rgb, config) for rgb in frames]
    searched = []
    for crop in crops:
        features = detector.embed(crop[None])
        searched.append((*detector.scorer.search_patches(features), features))
    grid, hw, sigma = detector.grid, config.input_hw, detector.blur_sigma
    rows, cols = map_operator(grid[0], hw[0], sigma), map_operator(grid[1], hw[1], sigma)

    def score_before(i: int) -> None:  # pre-#11: einsum map + the full-size map made in detect()
        scores = detector.scorer.score_search(*searched[i])
        patches = searched[i][0].reshape(-1, *grid).astype(np.float32)
        np.einsum("ih,nhw,jw->nij", rows, patches, cols, optimize=True)
        crop_map_to_original(scores.maps[0], frames[i].shape[:2], config)

    variants = {
        "preprocess before #11": lambda i: preprocess_before(frames[i], v1),
        "preprocess v1 (same bytes)": lambda i: preprocess(frames[i], v1),
        "preprocess v2": lambda i: preprocess(frames[i], v2),
        "scoring+map before #11": score_before,
        "scoring+map now": lambda i: detector.scorer.score_search(*searched[i]),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names, evict = list(variants), np.ones(EVICT_BYTES // 8)
    for r in range(rounds):
        for i in range(len(frames)):
            for k in range(len(names)):  # rotated, so no variant is always first on a frame
                name = names[(i + r + k) % len(names)]
                evict += 1.0  # every call starts with the frame out of the caches, as a new frame is
                start = time.perf_counter()
                variants[name](i)
                samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: _p50(values) for name, values in samples.items()}


def detect_run(detectors: dict, frames: list[np.ndarray], rounds: int) -> dict[str, dict[str, float]]:
    """p50 ms per stage of ``detect(rgb_array)`` for each bundle, interleaved frame by frame."""
    stages = ("decode", "preprocess", "engine", "search", "scoring_map", "total")
    samples = {name: {stage: [] for stage in (*stages, "total_excl_decode")} for name in detectors}
    for name, detector in detectors.items():  # warm-up
        for rgb in frames[:3]:
            detector.detect(rgb)
    for _ in range(rounds):
        for rgb in frames:
            for name, detector in detectors.items():
                timings = detector.detect(rgb).timings_ms
                for stage in stages:
                    samples[name][stage].append(timings[stage])
                samples[name]["total_excl_decode"].append(timings["total"] - timings["decode"])
    out = {}
    for name, by_stage in samples.items():
        out[name] = {stage: _p50(values) for stage, values in by_stage.items()}
        out[name]["excl_decode_over_engine"] = out[name]["total_excl_decode"] / out[name]["engine"]
    return out


def decode_run(paths: list[Path], rounds: int) -> dict[str, float]:
    """p50 ms per file of Pillow's decode vs load_image's, and of the fast reader's inflate / unfilter."""
    import zlib

    from edgecore.runtime import png
    from edgecore.runtime.imageio import MAX_PIXELS, _decode, _opener, _pil_to_rgb

    blobs = [p.read_bytes() for p in paths]
    plains = [png.plain_png(b) for b in blobs]
    if any(p is None for p in plains):
        raise SystemExit("--decode needs plain 8-bit PNG frames (runtime/png.py) and the built _pngfilter library")
    for blob in blobs:  # the contract before the clock: the same pixels
        assert np.array_equal(load_image(blob), _decode(*_opener(blob), MAX_PIXELS, _pil_to_rgb))
    streams = [b"".join(p.data[a:b] for a, b in p.idat) for p in plains]
    limits = [p.height * (p.width * p.channels + 1) for p in plains]
    raws = [np.frombuffer(png.inflate(stream, limit), np.uint8) for stream, limit in zip(streams, limits)]

    def unfilter(i: int) -> None:
        plain = plains[i]
        out = np.empty((plain.height, plain.width, plain.channels), np.uint8)
        png._unfilter()(raws[i].ctypes.data, raws[i].size, out.ctypes.data, plain.height, plain.width * plain.channels,
                        plain.channels)

    variants = {
        "pillow": lambda i: _decode(*_opener(blobs[i]), MAX_PIXELS, _pil_to_rgb),
        "load_image (fast reader)": lambda i: load_image(blobs[i]),
        "  inflate (libdeflate)": lambda i: png.inflate(streams[i], limits[i]),
        "  inflate (stdlib zlib)": lambda i: zlib.decompress(streams[i]),
        "  unfilter (native)": unfilter,
    }
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        pass
    else:
        variants["  inflate (zlib-ng)"] = lambda i: zlib_ng.decompress(streams[i])
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for i in range(len(blobs)):
            for k in range(len(names)):
                name = names[(i + r + k) % len(names)]
                start = time.perf_counter()
                variants[name](i)
                samples[name].append((time.perf_counter() - start) * 1e3)
    out = {name: _p50(values) for name, values in samples.items()}
    out["speedup"] = out["pillow"] / out["load_image (fast reader)"]
    return out


def fidelity(data: Path) -> dict[str, dict[str, float]]:
    """Lite0 fitted with v1 and with v2 preprocessing on the same category: AUROC of each."""
    from edgecore.data.datasets import ImageStream, train_samples
    from edgecore.evaluation import evaluate, load_test_set
    from edgecore.model import FitConfig, fit

    images = [rgb for _, rgb in ImageStream(train_samples(data))]
    out = {}
    for version in ("v1", "v2"):
        config = FitConfig(backbone="efficientnet_lite0", device="cpu", preprocess=PreprocessConfig(resample=version))
        model = fit(images, config)
        result, _ = evaluate(model, load_test_set(data, model.preprocess_config))
        out[version] = {key: result[key] for key in ("image_auroc", "pixel_auroc")}
        out[version]["recall_at_threshold"] = result["at_threshold"]["recall"]
        out[version]["fp_at_threshold"] = result["at_threshold"]["fp"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", default=[], help="bundle(s) to run detect() on (repeat)")
    parser.add_argument("--images", type=Path, help="folder of real frames")
    parser.add_argument("--frames", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default=None, help="engine precision (default: the best compiled)")
    parser.add_argument("--frame-size", help="HxW: scale the frames to this size first (e.g. 1080x1920, a camera's)")
    parser.add_argument("--fidelity", type=Path, help="MVTec category: fit v1 and v2, print AUROC")
    parser.add_argument("--decode", action="store_true", help="time PNG decoding: Pillow vs the fast reader")
    args = parser.parse_args()
    report: dict = {"load_before": os.getloadavg()}
    if args.fidelity:
        report["fidelity"] = fidelity(args.fidelity)
    if args.decode or args.bundle:
        folders = sorted(p for p in args.images.iterdir() if p.is_dir()) or [args.images]  # MVTec test/<type>/
        paths = expand_images(folders)
        step = max(1, len(paths) // args.frames)
    if args.decode:
        report["decode_p50_ms"] = decode_run(paths[::step][: args.frames], args.rounds)
    if args.bundle:
        from edgecore.runtime.detector import Detector

        frames = [load_image(p) for p in paths[::step][: args.frames]]
        if args.frame_size:
            height, width = (int(v) for v in args.frame_size.lower().split("x"))
            frames = [np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC)) for rgb in frames]
        report["frame_shape"] = list(frames[0].shape)
        detectors = {Path(b).name: Detector.open(b, precision=args.precision) for b in args.bundle}
        try:
            first = next(iter(detectors.values()))
            report["executed"] = {name: d.engine.info.executed_precision for name, d in detectors.items()}
            report["resample"] = {name: d.preprocess_config.resample for name, d in detectors.items()}
            report["stages_p50_ms"] = stage_run(first, frames, args.rounds)
            report["detect_p50_ms"] = detect_run(detectors, frames, args.rounds)
        finally:
            for detector in detectors.values():
                detector.close()
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
