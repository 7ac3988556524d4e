"""The ONE scorer both sides use: search → Eq. 7 score + map → the ONE decision rule.

:class:`PatchCoreModel` (host, torch features) and :class:`Detector` (camera,
compiled engine) differ only in how they embed a crop; everything after that —
the nearest-neighbour search, the image score, the map, the threshold and the
verdict — is this module, so the two cannot drift apart.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edgecore.runtime.imageio import ImageSource, load_image
from edgecore.runtime.preprocess import PreprocessConfig, crop_map_to_original, preprocess
from edgecore.runtime.scoring import Normalization, Scores, score_patches, search_patches
from edgecore.runtime.tiles import cut_tiles, stitch_scores


@dataclass(frozen=True)
class Decision:
    """The stored threshold and the one rule that turns a score into a verdict.

    The threshold is stored once (``value``); the normalisation reuses it, so 0.5
    after normalising is exactly the decision boundary.
    """

    threshold: float
    normalization: Normalization

    @classmethod
    def from_config(cls, config: dict) -> "Decision":
        """Args: config: a ``threshold`` section (model config or bundle manifest). Returns: the Decision."""
        value = float(config["value"])
        norm = config["normalization"]
        return cls(value, Normalization(threshold=value, min=float(norm["min"]), max=float(norm["max"])))

    def is_anomalous(self, score):
        """``score >= threshold``, written fail-closed: a NaN score is never "normal"."""
        return np.logical_not(np.asarray(score, dtype=np.float64) < self.threshold)

    def normalize(self, raw):
        return self.normalization(raw)


@dataclass
class Detection:
    """One scored frame.

    ``map_original`` (the map on the frame's own H×W pixels) is made on first access, not in
    :meth:`ImageScorer.detect`: the verdict never needs it, and resampling a 224² map up to a
    900×900 frame costs more (≈3 ms; 14 ms at 1080p) than the rest of scoring together."""

    score: float
    normalized_score: float
    is_anomalous: bool
    map: np.ndarray  # map_h×map_w raw patch-distance map (the graph input's geometry; tiled: the canvas)
    frame_hw: tuple[int, int]  # (H, W) of the original frame
    preprocess_config: PreprocessConfig  # how the frame was placed on the map (to map it back)
    timings_ms: dict[str, float] = field(default_factory=dict)
    _map_original: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def map_original(self) -> np.ndarray:
        """H×W float32 map on the original frame (:func:`crop_map_to_original`), computed once."""
        if self._map_original is None:
            self._map_original = crop_map_to_original(self.map, self.frame_hw, self.preprocess_config)
        return self._map_original

    def to_json(self) -> dict:
        return {
            "score": self.score,
            "normalized_score": self.normalized_score,
            "is_anomalous": self.is_anomalous,
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }


class PatchScorer:
    """Nearest-neighbour search plus Eq. 7 scoring against one coreset.

    ``search`` is any object with ``search(queries, k) -> (distances, ids)`` (the
    host's exact search, the camera's quantized index); ``support_vectors[ids]``
    gives the coreset rows Eq. 7 compares against.
    """

    def __init__(
        self, search, support_vectors, neighbour_table: np.ndarray, grid, crop, blur_sigma: float, anomaly=None,
        roi=None,
    ) -> None:
        self.search = search
        self.roi = roi  # a RoiMask (edgecore.runtime.roi): only its patches are searched and scored; None: all
        self.anomaly = anomaly  # an AnomalyBank (labelled defects) sharpens the distances; None: plain PatchCore
        self.support_vectors = support_vectors
        self.neighbour_table = neighbour_table
        self.grid = tuple(grid)
        self.crop = (int(crop), int(crop)) if np.isscalar(crop) else (int(crop[0]), int(crop[1]))  # map (H, W)
        self.blur_sigma = float(blur_sigma)

    def search_patches(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """N×P×D → (N×P distances, N×P coreset ids); with an ROI only its patches are searched
        (the others read 0 / id 0 and are never scored)."""
        queries = features if self.roi is None else features[:, self.roi.flat]
        distances, nn_index = search_patches(queries, self.search)
        if self.anomaly is not None:
            distances = self.anomaly.sharpen(distances, queries)
        if self.roi is None:
            return distances, nn_index
        full_distances = np.zeros(features.shape[:2], distances.dtype)
        full_index = np.zeros(features.shape[:2], nn_index.dtype)
        full_distances[:, self.roi.flat], full_index[:, self.roi.flat] = distances, nn_index
        return full_distances, full_index

    def score_search(self, patch_scores: np.ndarray, nn_index: np.ndarray, features: np.ndarray) -> Scores:
        return score_patches(
            patch_scores, nn_index, features, self.support_vectors, self.neighbour_table, self.grid, self.crop,
            self.blur_sigma, roi=self.roi,
        )

    def score_features(self, features: np.ndarray) -> Scores:
        """N×P×D patch embeddings → Scores (image scores, patch distances, crop-size maps)."""
        return self.score_search(*self.search_patches(features), features)


class ImageScorer:
    """What host model and camera detector share; a subclass provides ``embed`` and sets
    ``preprocess_config``, ``scorer`` (:class:`PatchScorer`) and ``decision`` (:class:`Decision`)."""

    preprocess_config: PreprocessConfig
    scorer: PatchScorer
    decision: Decision

    def embed(self, crops: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def threshold(self) -> float:
        return self.decision.threshold

    @property
    def normalization(self) -> Normalization:
        return self.decision.normalization

    def score_features(self, features: np.ndarray) -> Scores:
        """Embeddings of graph inputs (all tiles of each frame, in order) → per-frame Scores."""
        return stitch_scores(self.scorer.score_features(features), self.preprocess_config)

    def score_crops(self, crops: np.ndarray, batch_size: int = 16) -> Scores:
        """Args: crops: N×map_h×map_w×3 uint8 (from :func:`preprocess`; tiled here). Returns: their Scores."""
        config = self.preprocess_config  # cut_tiles: one graph input per tile (identity unless tiled)
        return Scores.concatenate([
            self.score_features(self.embed(cut_tiles(crops[i : i + batch_size], config)))
            for i in range(0, len(crops), batch_size)
        ])

    def detect(self, image: ImageSource) -> Detection:
        """Score one frame.

        Args:
            image: a path, the bytes of an encoded file, or an H×W×3 uint8 RGB array — the
                fastest entry point for a camera that hands raw frames: nothing is decoded and,
                for a C-contiguous uint8 RGB array, nothing is copied ("decode" is then the
                validation alone).

        Returns:
            a :class:`Detection`: score, normalised score, verdict, crop and full-size
            maps, and per-stage timings in ms.
        """
        t0 = time.perf_counter()
        rgb = load_image(image, copy=False)  # read, never written: the caller's array needs no copy
        if self.scorer.roi is not None:  # an ROI drawn on another frame geometry would inspect the wrong region
            self.scorer.roi.check_frame(*rgb.shape[:2])
        t1 = time.perf_counter()
        crop = preprocess(rgb, self.preprocess_config)
        t2 = time.perf_counter()
        features = self.embed(cut_tiles(crop[None], self.preprocess_config))  # one forward per tile
        t3 = time.perf_counter()
        patch_scores, nn_index = self.scorer.search_patches(features)
        t4 = time.perf_counter()
        scores = stitch_scores(self.scorer.score_search(patch_scores, nn_index, features), self.preprocess_config)
        score, crop_map = float(scores.image[0]), scores.maps[0]
        t5 = time.perf_counter()
        return Detection(
            score=score,
            normalized_score=float(self.decision.normalize(score)),
            is_anomalous=bool(self.decision.is_anomalous(score)),
            map=crop_map,
            frame_hw=(int(rgb.shape[0]), int(rgb.shape[1])),
            preprocess_config=self.preprocess_config,
            timings_ms={
                "decode": (t1 - t0) * 1e3,
                "preprocess": (t2 - t1) * 1e3,
                "engine": (t3 - t2) * 1e3,
                "search": (t4 - t3) * 1e3,
                "scoring_map": (t5 - t4) * 1e3,
                "total": (t5 - t0) * 1e3,
            },
        )
