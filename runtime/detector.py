"""The camera-side detector: verified bundle → engine → index search → score + map.

    det = Detector.open("bottle.edgecore", backend="openvino", precision="int8")
    result = det.detect("frame.png")      # path, bytes, or H×W×3 uint8 array
    result.score, result.normalized_score, result.is_anomalous, result.map, result.map_original

It reuses the host's ONE preprocessing and ONE scoring implementation, so the
only places camera and workstation can differ are the engine and the index —
which is what the fidelity tests measure. A Detector is safe to share between
threads: the engine hands each caller its own infer request, and the index and
scoring are read-only.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np

from edgecore.runtime.backends import Backend, backend_entry, open_backend
from edgecore.runtime.bundle import (
    VerifiedBundle, check_engine_io, check_neighbour_table, read_manifest, unpack_archive, verify_bundle,
)
from edgecore.runtime.anomaly_bank import open_anomaly_bank
from edgecore.runtime.errors import BundleError, NonFiniteError
from edgecore.runtime.index import SEARCH_MODES, QuantizedIndex, SearchPlacement
from edgecore.runtime.preprocess import PreprocessConfig
from edgecore.runtime.roi import load_roi
from edgecore.runtime.scorer import Decision, Detection, ImageScorer, PatchScorer

__all__ = ["Detection", "Detector", "describe_index", "open_index"]


def limit_blas_threads(count: int) -> None:
    """Process-wide cap on numpy's BLAS threads (threadpoolctl); a no-op without it."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return
    threadpool_limits(limits=count, user_api="blas")


def open_index(directory: Path, description: dict, search: str | None,
               placement: SearchPlacement | None = None) -> QuantizedIndex:
    """Load the bundle's index; ``search`` overrides its mode where the files allow it
    (exact and compiled search need only the vectors; hnsw and coarse need the graph stored at export,
    which an int8 index declares as its ``fallback``). An explicit mode is never replaced; without one, an
    int8 index may run its stored graph on a CPU without an int8 dot product (``index.replaced`` says why).
    ``placement``: the backend and device a search on an inference engine (``compiled``) runs on."""
    if search is not None and search not in SEARCH_MODES:
        raise ValueError(f"search must be one of {', '.join(SEARCH_MODES)}, got {search!r}")
    description = dict(description)
    if search and search != description.get("mode"):
        if SEARCH_MODES[search].graph_arrays and description.get("fallback") != search:
            raise BundleError(f"{directory}: this bundle's index has no {search} graph; re-export with --search {search}")
        description["mode"] = search
        description.pop("fallback", None)  # the override is the mode now; a stored graph is read as its own
    return QuantizedIndex.load(directory, description, automatic=search is None, placement=placement)


def describe_index(index: QuantizedIndex) -> str:
    return index.describe()


class Detector(ImageScorer):
    """A bundle opened for scoring: the compiled engine plus the shared :class:`PatchScorer`.

    Build one with :meth:`Detector.open`; score with :meth:`detect` (one frame) or
    :meth:`score_crops` (a batch of preprocessed crops, as ``evaluate`` does).
    """

    def __init__(self, bundle: VerifiedBundle, engine: Backend, search_mode: str | None = None,
                 search_placement: SearchPlacement | None = None) -> None:
        manifest = bundle.manifest
        self.bundle = bundle
        self.manifest = manifest
        self.engine = engine
        self.preprocess_config = PreprocessConfig.from_dict(manifest["preprocess"])
        self.grid = tuple(manifest["features"]["grid"])
        self.blur_sigma = float(manifest["scoring"]["blur_sigma"])
        # An engine compiled with `--refit-threshold` carries its own decision boundary.
        decision = manifest["engines"].get(engine.info.engine_key or "", {}).get("threshold", manifest["threshold"])
        self.decision = Decision.from_config(decision)
        self.index = open_index(bundle.path / manifest["index"]["dir"], manifest["index"], search_mode, search_placement)
        table_path = bundle.path / manifest["neighbour_table"]["file"]
        try:
            self.neighbour_table = np.load(table_path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise BundleError(f"{table_path}: unreadable neighbour table: {exc}") from exc
        check_neighbour_table(self.neighbour_table, manifest, self.index.size, self.index.dim, table_path)
        check_engine_io(manifest, getattr(engine, "input_shape", None), getattr(engine, "output_shape", None),
                        engine.info.source)
        self.scorer = PatchScorer(
            self.index, self.index.points, self.neighbour_table, self.grid, self.preprocess_config.input_hw, self.blur_sigma,
            roi=load_roi(bundle.path, manifest.get("roi")), anomaly=open_anomaly_bank(bundle.path, manifest),
        )

    @classmethod
    def open(
        cls,
        bundle: str | Path,
        backend: str = "openvino",
        device: str | None = None,
        precision: str | None = None,
        search: str | None = None,
        verify: bool = True,
        blas_threads: int | None = 1,
        **engine_options,
    ) -> "Detector":
        """Open a bundle directory or a packed archive (unpacked into a private temp dir).

        Args:
            bundle: bundle directory or ``.edgecore.tar`` archive.
            backend: a name from :data:`edgecore.runtime.backends.BACKENDS` (``openvino``, ``tensorrt``).
            device: backend device (default: the backend's, e.g. ``CPU``).
            precision: engine precision (default: the best compiled engine this CPU can run, else ONNX).
            search: a mode of :data:`~edgecore.runtime.index.SEARCH_MODES` (default: the bundle's choice);
                ``compiled`` runs on the engine's own backend and device (an Intel GPU, a Jetson's CUDA device).
            verify: check every file's size and sha256 first.

        Returns:
            an open Detector; use it as a context manager or call :meth:`close`.

        ``blas_threads`` caps numpy's BLAS pool for the whole process (None leaves it): the
        engine owns the cores, and idle BLAS threads spin on them — measured on 2 cores,
        Lite0 int8 end to end p50 84 ms with 1 BLAS thread vs 154 ms with 2.
        """
        if blas_threads is not None:
            limit_blas_threads(blas_threads)
        path = Path(bundle)
        scratch = None
        try:
            if path.is_file():
                scratch = Path(tempfile.mkdtemp(prefix="edgecore-bundle-"))
                path = unpack_archive(path, scratch)  # inside the try: a refused archive leaves no scratch
            verified = verify_bundle(path) if verify else VerifiedBundle(path, read_manifest(path))
            device = device or backend_entry(backend).default_device  # one device for the engine and the search
            engine = open_backend(backend, verified, device=device, precision=precision, **engine_options)
            detector = cls(verified, engine, search_mode=search, search_placement=SearchPlacement(backend, device))
        except BaseException:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
        detector._scratch = scratch
        return detector

    _scratch: Path | None = None

    def close(self) -> None:
        self.engine.close()
        if self._scratch:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- scoring ---------------------------------------------------------
    def embed(self, crops: np.ndarray) -> np.ndarray:
        """Run the engine on any number of crops, padding the last batch to the graph's static size."""
        batch = self.engine.batch
        parts = []
        for start in range(0, len(crops), batch):
            chunk = crops[start : start + batch]
            if len(chunk) < batch:
                pad = np.zeros((batch - len(chunk), *chunk.shape[1:]), dtype=np.uint8)
                parts.append(self.engine.infer(np.concatenate([chunk, pad]))[: len(chunk)])
            else:
                parts.append(self.engine.infer(chunk))
        features = parts[0] if len(parts) == 1 else np.concatenate(parts)  # one batch: no second 3 MB copy
        if not np.isfinite(features).all():  # a NaN distance would read as "normal": never score it
            raise NonFiniteError(
                f"the engine ({self.engine.info.source}) returned NaN or infinite features; refusing to score"
            )
        return features
