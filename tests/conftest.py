"""Shared fixtures: a tiny synthetic MVTec-layout dataset and a model fitted on it once."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

SHARED_BOTTLE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mvtec_bottle"


@pytest.fixture(scope="session")
def synthetic_category(tmp_path_factory) -> Path:
    from edgecore.data.synthetic import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    return make_synthetic_dataset(root, n_train=16, n_test_good=4, n_test_per_defect=2, size=128, seed=0)


@pytest.fixture(scope="session")
def fitted_model_dir(synthetic_category, tmp_path_factory) -> Path:
    """Lite0 (real offline weights) on the synthetic set at 128→112 px: ~2 s on 2 cores."""
    from edgecore.data.datasets import ImageStream, train_samples
    from edgecore.model import FitConfig, fit
    from edgecore.runtime.preprocess import PreprocessConfig

    images = [rgb for _, rgb in ImageStream(train_samples(synthetic_category))]
    config = FitConfig(backbone="efficientnet_lite0", device="cpu", preprocess=PreprocessConfig(128, 112), val_ratio=0.25)
    model = fit(images, config)
    return model.save(tmp_path_factory.mktemp("models") / "part")


@pytest.fixture(scope="session")
def bottle() -> Path:
    if not (SHARED_BOTTLE / "train" / "good").is_dir():
        pytest.skip(f"real MVTec bottle data not found at {SHARED_BOTTLE} (only in the project's own checkouts)")
    return SHARED_BOTTLE


@pytest.fixture(autouse=True)
def _random_init_warnings_are_expected():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*RANDOM INITIALISATION.*")
        yield


@pytest.fixture(scope="session")
def exported_bundle(fitted_model_dir, tmp_path_factory) -> Path:
    """The synthetic model exported with defaults (int8 index, auto search). Treat as read-only."""
    from edgecore.export.bundle import export_bundle

    return export_bundle(fitted_model_dir, tmp_path_factory.mktemp("bundles") / "part.edgecore")


@pytest.fixture
def bundle_copy(exported_bundle, tmp_path) -> Path:
    """A private copy a test may tamper with."""
    import shutil

    return Path(shutil.copytree(exported_bundle, tmp_path / exported_bundle.name))


def recompute_hashes(bundle: Path) -> None:
    """Re-list every file's size and sha256 (manifest and index entries): a crafted bundle that
    `verify` passes, so only the runtime's own checks stand between it and a verdict."""
    import json

    from edgecore.runtime.bundle import MANIFEST, file_entry
    from edgecore.runtime.fsutil import sha256_file

    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"] = {name: file_entry(bundle, name) for name in manifest["files"]}
    index = manifest["index"]
    for entry in index.get("files", {}).values():
        path = bundle / index["dir"] / entry["file"]
        if "sha256" in entry:
            entry["sha256"] = sha256_file(path)
        if "bytes" in entry:
            entry["bytes"] = path.stat().st_size
    (bundle / MANIFEST).write_text(json.dumps(manifest))


@pytest.fixture(scope="session")
def nan_graph_bundle(exported_bundle, tmp_path_factory) -> Path:
    """The synthetic bundle with its ONNX output multiplied by NaN (what a broken engine gives),
    hashes recomputed so it verifies. Treat as read-only."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    bundle = Path(shutil.copytree(exported_bundle, tmp_path_factory.mktemp("nan_graph") / exported_bundle.name))
    model = onnx.load(str(bundle / "model.onnx"))
    output = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{o}_raw" if o == output else o for o in node.output]
    model.graph.initializer.append(helper.make_tensor("nan_scale", TensorProto.FLOAT, [], [float("nan")]))
    model.graph.node.append(helper.make_node("Mul", [f"{output}_raw", "nan_scale"], [output]))
    onnx.save(model, str(bundle / "model.onnx"))
    recompute_hashes(bundle)
    return bundle


@pytest.fixture(scope="session")
def capi_programs(tmp_path_factory) -> dict[str, Path]:
    """Build and install the library into a prefix, then compile detect.c and errors_test.c against it
    (once per session: the C API tests and the non-square map test share it)."""
    pytest.importorskip("cffi", reason="cffi is not installed: the C API is built (and runs) with cffi's embedding mode")
    import os
    import shutil
    import subprocess
    import sysconfig

    from edgecore.runtime import capi

    examples = Path(capi.__file__).with_name("examples")
    if shutil.which("gcc") is None:
        pytest.skip("gcc not found: the C API tests compile C programs")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip("this Python has no shared libpython; cffi embedding links against it")
    from edgecore.runtime.capi.build import main

    root = tmp_path_factory.mktemp("capi")
    prefix = root / "prefix"
    assert main(["--out", str(root / "out"), "--prefix", str(prefix)]) == 0
    assert (prefix / "include" / "edgecore.h").is_file() and (prefix / "lib" / "libedgecore.so").is_file()
    pc_dir = prefix / "lib" / "pkgconfig"
    if shutil.which("pkg-config"):
        env = dict(os.environ, PKG_CONFIG_PATH=str(pc_dir))
        flags = subprocess.run(
            ["pkg-config", "--cflags", "--libs", "edgecore"], env=env, check=True, capture_output=True, text=True
        ).stdout.split()
    else:
        flags = [f"-I{prefix / 'include'}", f"-L{prefix / 'lib'}", "-ledgecore"]
    programs = {}
    for name in ("detect", "errors_test"):
        out = root / name
        compiled = subprocess.run(
            ["gcc", "-std=c99", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-O1", str(examples / f"{name}.c"),
             *flags, f"-Wl,-rpath,{prefix / 'lib'}", "-pthread", "-o", str(out)],
            capture_output=True, text=True,
        )
        assert compiled.returncode == 0, compiled.stderr
        assert "warning" not in compiled.stderr, compiled.stderr  # the header must be clean C99
        programs[name] = out
    return programs


# --- the search fidelity contract (shared by the search-mode tests) ---------------------------------
def contract_data(dim: int = 256, block: int = 50, images: int = 40, seed: int = 5) -> dict:
    """CNN-like patch features (clusters in a low-dimensional subspace + isotropic noise): a 3000-point
    coreset and ``images`` blocks of ``block`` query patches, every other image with a few defect patches."""
    import numpy as np

    rng = np.random.default_rng(seed)
    subspace = np.linalg.qr(rng.normal(size=(dim, 24)))[0].T
    centers = rng.normal(0.0, 4.0, (60, 24)) * np.linspace(3.0, 0.5, 24)

    def sample(n: int) -> np.ndarray:
        latent = centers[rng.integers(0, 60, n)] + rng.normal(0.0, 1.0, (n, 24)) * np.linspace(2.0, 0.3, 24)
        return latent @ subspace + rng.normal(0.0, 0.15, (n, dim))

    queries = sample(images * block)
    defect = np.zeros(images * block, bool)
    for image in range(1, images, 2):  # a few strong and weak defect patches per defective image
        rows = image * block + rng.choice(block, 6, replace=False)
        queries[rows] += rng.normal(0.0, rng.uniform(0.3, 1.5), (6, dim))
        defect[rows] = True
    return {"points": sample(3000).astype(np.float32), "queries": queries.astype(np.float32),
            "defect": defect, "labels": (np.arange(images) % 2).astype(int), "block": block, "images": images}


def contract_report(data: dict, distances, indices) -> dict[str, float]:
    """The contract's four numbers against exact fp32 search (patch scores stand in for pixels)."""
    from scipy.stats import spearmanr

    from edgecore.metrics import auroc
    from edgecore.runtime.search import ExactSearch

    shape = (data["images"], data["block"])
    ref_d, ref_i = ExactSearch(data["points"]).search(data["queries"], 1)
    ref_img, img = ref_d[:, 0].reshape(shape).max(1), distances[:, 0].reshape(shape).max(1)
    return {
        "recall": float((indices[:, 0] == ref_i[:, 0]).mean()),
        "spearman": float(spearmanr(ref_img, img).statistic),
        "image_pt": 100 * abs(auroc(ref_img, data["labels"]) - auroc(img, data["labels"])),
        "pixel_pt": 100 * abs(auroc(ref_d[:, 0], data["defect"]) - auroc(distances[:, 0], data["defect"])),
    }


def meets_contract(report: dict[str, float]) -> bool:
    """recall@1 >= 0.99, image-score Spearman >= 0.999, image and pixel AUROC within 0.2 pt."""
    return (report["recall"] >= 0.99 and report["spearman"] >= 0.999
            and report["image_pt"] <= 0.2 and report["pixel_pt"] <= 0.2)


def int8_index_with_fallback(points, fallback, block: int, directory):
    """An int8 index over ``points`` with ``fallback`` (an hnsw or coarse index of them) stored, saved to
    ``directory``: (directory, its description as JSON gives it back)."""
    import json

    from edgecore.export.index_build import build_index

    index = build_index(points, "int8", "int8", patches_per_image=block)
    index.store_fallback(fallback)
    return directory, json.loads(json.dumps(index.save(directory)))


def slow_graph(graph):
    """``graph`` (an hnsw index) searching with a beam over every point, so the int8 scan wins any timing."""
    from edgecore.runtime.index import QuantizedIndex

    slow = QuantizedIndex("int8", graph.arrays, "hnsw", graph.graph, dict(graph.hnsw), choice=dict(graph.choice, reason="r"))
    slow.searcher.params = dict(slow.hnsw, ef_search=graph.size)
    return slow


@pytest.fixture(scope="session")
def int8_fallback_bundle(fitted_model_dir, tmp_path_factory) -> Path:
    """The synthetic model as an automatic export that picked 'int8' stored it before coarse fallbacks (and
    still does where coarse's probe fails): int8 index + the hnsw graph as its CPU fallback. (Its coreset is
    below the exact/graph crossover, so the exporter itself would pick exact: the index is built with
    build_index's two explicit modes and store_fallback, the step _prefer_native takes.) Read-only."""
    return _int8_bundle_with_fallback(fitted_model_dir, tmp_path_factory, "hnsw")


@pytest.fixture(scope="session")
def int8_coarse_fallback_bundle(fitted_model_dir, tmp_path_factory) -> Path:
    """As ``int8_fallback_bundle``, with coarse's projection as the fallback (what automatic exports of
    low-D coresets store now). Read-only."""
    return _int8_bundle_with_fallback(fitted_model_dir, tmp_path_factory, "coarse")


def _int8_bundle_with_fallback(fitted_model_dir, tmp_path_factory, fallback: str) -> Path:
    import json
    import shutil

    from edgecore.export.bundle import export_bundle
    from edgecore.export.index_build import build_index
    from edgecore.model import PatchCoreModel
    from edgecore.runtime.bundle import MANIFEST

    bundle = export_bundle(fitted_model_dir, tmp_path_factory.mktemp(f"fallback_{fallback}") / "part.edgecore",
                           search="int8")
    manifest = json.loads((bundle / MANIFEST).read_text())
    index_dir = bundle / manifest["index"]["dir"]
    per_image = manifest["index"]["search_params"]["certify_block"]
    bank = PatchCoreModel.load(fitted_model_dir, device="cpu").memory_bank
    index = build_index(bank, "int8", "int8", patches_per_image=per_image)
    index.store_fallback(build_index(bank, "int8", fallback, patches_per_image=per_image))
    shutil.rmtree(index_dir)
    index_dir.mkdir()
    description = index.save(index_dir)
    manifest["index"] = {"dir": manifest["index"]["dir"], **description}
    manifest["files"].update({f"{manifest['index']['dir']}/{entry['file']}": {} for entry in description["files"].values()})
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    recompute_hashes(bundle)
    return bundle
