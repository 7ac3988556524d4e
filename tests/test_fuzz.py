"""Property + fuzz (issue 12): any single-field manifest change opens and scores identically or is
refused with BundleError — never a crash, hang or non-finite result; a bounded fuzz run of
Detector.open + detect over mutated bundles and frames finds nothing.

Opens run in a worker subprocess (benchmarks/fuzz_detector.py --worker): a native crash in a
library would end pytest itself, so it is recorded as a finding instead. Hypothesis is
derandomized and bounded (the long run is ``python benchmarks/fuzz_detector.py``, see
docs/RELIABILITY.md).
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("fuzz_detector", REPO / "benchmarks" / "fuzz_detector.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fuzz = _fuzz_module()


@pytest.fixture(scope="module")
def hnsw_bundle(fitted_model_dir, tmp_path_factory) -> Path:
    """The synthetic model with an HNSW index: the graph fields (entry point, levels, links) are
    the ones whose trust once crashed the process."""
    from edgecore.export.bundle import export_bundle

    return export_bundle(fitted_model_dir, tmp_path_factory.mktemp("fuzz") / "hnsw.edgecore", search="hnsw")


@pytest.fixture(scope="module")
def frames(synthetic_category) -> list[Path]:
    return [sorted((synthetic_category / "test" / kind).glob("*.png"))[0] for kind in ("good", "scratch")]


@pytest.fixture(scope="module")
def worker():
    process = fuzz.Worker(timeout_s=120)
    yield process
    process.close()


@pytest.fixture(scope="module")
def subject(hnsw_bundle, frames, worker):
    baseline = worker.run(hnsw_bundle, [str(f) for f in frames])
    assert baseline["open"] == "ok", baseline
    assert all(f["kind"] == "ok" and f["finite"] for f in baseline["frames"]), baseline
    manifest = json.loads((hnsw_bundle / fuzz.MANIFEST).read_text())
    return hnsw_bundle, [str(f) for f in frames], baseline["frames"], manifest, fuzz.leaf_paths(manifest)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)


@settings(
    max_examples=50, derandomize=True, deadline=None, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_any_single_field_change_scores_identically_or_is_refused(subject, worker, tmp_path_factory, data):
    bundle, frame_paths, baseline, manifest, paths = subject
    path = data.draw(st.sampled_from(paths), label="field")
    old = manifest
    for key in path:
        old = old[key]
    new = data.draw(st.sampled_from(fuzz.replacements(old)) | _json_values, label="value")
    target = fuzz.linked_copy(bundle, tmp_path_factory.mktemp("case") / bundle.name)
    (target / fuzz.MANIFEST).write_text(json.dumps(fuzz.apply(manifest, path, new)))
    answer = worker.run(target, frame_paths)
    outcome = fuzz.classify(answer, baseline, "manifest", path)
    assert outcome not in fuzz.FINDINGS, f"{'.'.join(map(str, path))} = {new!r}: {outcome}: {answer}"
    if not fuzz.is_legit(path):  # only scoring parameters may change a score
        assert outcome in ("same", "refused"), (path, new, answer)


def test_bounded_fuzz_of_bundles_and_frames_finds_nothing(exported_bundle, frames):
    report = fuzz.run(exported_bundle, frames, seconds=20, seed=12, case_timeout=120, max_cases=40, log=lambda m: None)
    assert report.executions >= 10  # the run really ran cases
    assert sum(report.outcomes.get(k, 0) for k in ("refused", "frame-refused")) > 0  # and mutations bit
    assert not report.findings, json.dumps(report.findings, indent=2)


def test_the_classifier_flags_each_contract_violation():
    """The fuzz verdicts must be able to fail: each violation is named, each allowed outcome is not."""
    base = [{"kind": "ok", "score": 1.0, "map": "m", "finite": True}]
    ok = {"open": "ok", "frames": base}
    assert fuzz.classify(ok, base, "manifest", ("backbone", "name")) == "same"
    assert fuzz.classify({"open": "crash"}, base, "manifest") == "crash"
    assert fuzz.classify({"open": "hang"}, base, "manifest") == "hang"
    assert fuzz.classify({"open": "KeyError"}, base, "manifest") == "unexpected"
    assert fuzz.classify({"open": "BundleError"}, base, "manifest") == "refused"
    nan = {"open": "ok", "frames": [{"kind": "ok", "score": float("nan"), "map": "m", "finite": False}]}
    assert fuzz.classify(nan, base, "manifest") == "nonfinite"
    moved = {"open": "ok", "frames": [{"kind": "ok", "score": 2.0, "map": "m", "finite": True}]}
    assert fuzz.classify(moved, base, "manifest", ("index", "size")) == "silently-different"
    assert fuzz.classify(moved, base, "manifest", ("preprocess", "resize")) == "changed-legit"
