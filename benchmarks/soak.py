"""Soak test: N frames through ONE Detector, resident memory (RSS) sampled every K frames.

A camera runs for months; a few KB lost per frame is an out-of-memory reboot a
week later. This pushes frames (paths, encoded bytes and decoded arrays in turn,
plus a bad frame every ``--bad-every`` that must raise ImageError) through one
Detector, reads RSS from /proc/self/statm every ``--every`` frames, and reports
the growth from the end of the warm-up to the end of the run, and the trend
(least-squares slope). Every distinct frame must also keep its first score for
the whole run (a drifting score would be a state leak of another kind).

    python benchmarks/soak.py --bundle part.edgecore --frames 10000
    python benchmarks/soak.py --frames 10000      # no bundle: fits + exports the synthetic one first (host extras)

Exit status 1 when the growth exceeds --max-growth-mb (default 5) or a frame
misbehaved. Linux only (/proc).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MB = 2**20


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (pages → bytes)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def analyse(samples: list[tuple[int, int]], warmup: int) -> dict:
    """Growth and trend of RSS after the warm-up. ``samples``: (frames done, RSS bytes)."""
    after = [(f, r) for f, r in samples if f >= warmup] or samples[-1:]
    frames = np.array([f for f, _ in after], dtype=np.float64)
    rss = np.array([r for _, r in after], dtype=np.float64) / MB
    slope = float(np.polyfit(frames / 1000.0, rss, 1)[0]) if len(after) >= 2 else 0.0
    return {
        "rss_start_mb": round(samples[0][1] / MB, 2),
        "rss_after_warmup_mb": round(float(rss[0]), 2),
        "rss_end_mb": round(float(rss[-1]), 2),
        "rss_peak_mb": round(max(r for _, r in samples) / MB, 2),
        "growth_mb": float(rss[-1] - rss[0]),
        "slope_mb_per_1k_frames": slope,
    }


def synthetic_frames(size: int, root: Path) -> list[Path]:
    """A few synthetic frames (normal and defective) at the bundle's resize size (torch-free)."""
    from edgecore.data.synthetic import make_synthetic_dataset

    category = make_synthetic_dataset(root, n_train=1, n_test_good=4, n_test_per_defect=2, size=max(64, size), seed=1)
    return sorted((category / "test").rglob("*.png"))


def build_synthetic_bundle(root: Path, log) -> Path:
    """Fit + export the small synthetic Lite0 model (128 → 112 px), as the test suite does."""
    from edgecore.data.datasets import ImageStream, train_samples
    from edgecore.data.synthetic import make_synthetic_dataset
    from edgecore.export.bundle import export_bundle
    from edgecore.model import FitConfig, fit
    from edgecore.runtime.preprocess import PreprocessConfig

    log("soak: no --bundle given; fitting and exporting the synthetic model")
    category = make_synthetic_dataset(root / "data", n_train=16, n_test_good=1, n_test_per_defect=0, size=128, seed=0)
    images = [rgb for _, rgb in ImageStream(train_samples(category))]
    config = FitConfig(backbone="efficientnet_lite0", device="cpu", preprocess=PreprocessConfig(128, 112), val_ratio=0.25)
    model = fit(images, config).save(root / "model")
    return export_bundle(model, root / "synthetic.edgecore")


def bad_frames() -> list[object]:
    """Inputs that must raise ImageError (and must not leak when they do)."""
    return [
        b"",
        b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
        np.full((32, 32, 3), np.nan, np.float32),
        np.zeros((4, 32, 32, 3), np.uint8),
        b"not an image at all",
    ]


def run_soak(detector, paths: list[Path], frames: int, every: int, warmup: int, bad_every: int, log) -> dict:
    from edgecore.runtime.errors import ImageError
    from edgecore.runtime.imageio import load_image

    encoded = [p.read_bytes() for p in paths]
    arrays = [load_image(p) for p in paths]
    bad = bad_frames()
    first_score: dict[int, float] = {}
    samples = [(0, rss_bytes())]
    expected_errors = unexpected_errors = mismatches = 0
    first_problem = None
    start = time.perf_counter()
    for n in range(1, frames + 1):
        if bad_every and n % bad_every == 0:
            try:
                detector.detect(bad[(n // bad_every) % len(bad)])
                unexpected_errors += 1
                first_problem = first_problem or f"frame {n}: a bad input was accepted"
            except ImageError:
                expected_errors += 1
            except Exception as exc:  # anything else is a bug: count it, keep soaking
                unexpected_errors += 1
                first_problem = first_problem or f"frame {n}: {type(exc).__name__}: {exc}"
        else:
            i = n % len(paths)
            source = (paths[i], encoded[i], arrays[i])[n % 3]
            try:
                score = detector.detect(source).score
            except Exception as exc:
                unexpected_errors += 1
                first_problem = first_problem or f"frame {n}: {type(exc).__name__}: {exc}"
            else:
                if first_score.setdefault(i, score) != score:
                    mismatches += 1
                    first_problem = first_problem or f"frame {n}: score {score} != first {first_score[i]}"
        if n % every == 0 or n == frames:
            samples.append((n, rss_bytes()))
            if n % (every * 4) == 0 or n == frames:
                rate = n / (time.perf_counter() - start)
                log(f"soak: {n}/{frames} frames, RSS {samples[-1][1] / MB:.1f} MB, {rate:.1f} frames/s")
    elapsed = time.perf_counter() - start
    return {
        "frames": frames,
        "every": every,
        "warmup": warmup,
        "seconds": round(elapsed, 1),
        "frames_per_second": round(frames / elapsed, 2),
        "errors_expected": expected_errors,
        "errors_unexpected": unexpected_errors,
        "score_mismatches": mismatches,
        "first_problem": first_problem,
        "samples": samples,
        **analyse(samples, warmup),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, help="bundle directory or archive (default: build the synthetic one)")
    parser.add_argument("--images", type=Path, help="folder of frames (default: synthetic frames)")
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=500, help="sample RSS every N frames")
    parser.add_argument("--warmup", type=int, default=1000, help="frames before the growth baseline")
    parser.add_argument("--bad-every", type=int, default=50, help="every Nth frame is a bad input (0 = none)")
    parser.add_argument("--precision", default=None, help="engine precision (default: the bundle's best)")
    parser.add_argument("--max-growth-mb", type=float, default=5.0)
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    if args.every < 1 or args.frames < 1 or not 0 <= args.warmup <= args.frames:
        parser.error("need --frames >= 1, --every >= 1 and 0 <= --warmup <= --frames")

    from edgecore.runtime.detector import Detector

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="edgecore-soak-") as scratch:
        bundle = args.bundle or build_synthetic_bundle(Path(scratch), log)
        with Detector.open(bundle, precision=args.precision) as detector:
            if args.images:
                from edgecore.data.datasets import list_images

                paths = list_images(args.images)
            else:
                paths = synthetic_frames(detector.preprocess_config.resize, Path(scratch) / "frames")
            report = run_soak(detector, paths, args.frames, args.every, args.warmup, args.bad_every, log)
            info = detector.engine.info
            report["engine"] = f"{info.backend} {info.executed_precision} ({info.source})"
            report["index"] = f"{detector.index.dtype} {detector.index.mode} {detector.index.size}x{detector.index.dim}"
    report.update(bundle=str(args.bundle or "synthetic"), python=platform.python_version(), machine=platform.machine())
    report["passed"] = (
        report["growth_mb"] <= args.max_growth_mb and report["errors_unexpected"] == 0 and report["score_mismatches"] == 0
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
