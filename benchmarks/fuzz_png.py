"""Fuzz the fast PNG reader against Pillow for longer than the test suite does (tests/test_png.py).

    python benchmarks/fuzz_png.py --seconds 300 [--seed 0] [--data ../shared/data/mvtec_bottle]

Mutations of real frames (every 20th bottle test PNG, when the data is there) and of written PNGs of every
colour type and filter: each decodes to Pillow's pixels or is refused with an ImageError, never another
exception, a crash or different pixels; the one designed difference (a stream that ends rows early is refused
where Pillow fills them black) is counted apart. Both decode modes and three block sizes are drawn per case.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tests_png():
    spec = importlib.util.spec_from_file_location("test_png", REPO / "tests" / "test_png.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mvtec_bottle")
    args = parser.parse_args()
    cases = _tests_png()
    from edgecore.runtime import png

    libdeflate = png._libdeflate

    seeds = cases.fuzz_seeds() + [p.read_bytes() for p in sorted((args.data / "test").rglob("*.png"))[::20]]
    rng = random.Random(args.seed)
    totals = {"cases": 0, "equal": 0, "short_stream": 0, "findings": []}
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        png._libdeflate = rng.choice([libdeflate, None])  # libdeflate, or the stdlib zlib fallback
        counts = cases.fuzz_cases(seeds, 20, rng.randrange(1 << 30))
        for key in ("cases", "equal", "short_stream"):
            totals[key] += counts[key]
        totals["findings"] += counts["findings"]
    print(json.dumps({**totals, "seeds": len(seeds), "seconds": args.seconds}, indent=2))
    sys.exit(1 if totals["findings"] else 0)


if __name__ == "__main__":
    main()
