"""PatchCore on the workstation: fit a memory bank, score images, save/load a model directory.

The torch part is only :class:`~edgecore.features.PatchCoreFeatures`; search and
scoring are the runtime's numpy implementations, so the camera cannot drift.

Model directory (written atomically)::

    MODEL_DIR/
      config.json               preprocessing, backbone (+ weights sha256), layers, grid,
                                embed dim, coreset, scoring, thresholds, fit timings
      memory_bank.safetensors   memory_bank  M×D float32 (the coreset)
                                neighbour_table  M×b int32 (Eq. 7 support sets)
      roi.npy                   (with `fit --roi`) grid h×w uint8 0/1: inspected patches
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

import edgecore
from edgecore.augment import TRANSFORMS, augment_record, augmented_frames, parse_augment
from edgecore.backbones import Backbone, create_backbone
from edgecore.calibration.threshold import threshold_config
from edgecore.denoise import parse_denoise, screen_validation, select_clean_images
from edgecore.features import PatchCoreFeatures, embed_concurrently, grid_shape, inference_copy
from edgecore.knn import exact_search
from edgecore.labelled import anomaly_scorer
from edgecore.progress import step
from edgecore.runtime.errors import ModelError
from edgecore.runtime.fsutil import atomic_directory, write_json
from edgecore.roi import RoiSource, fit_roi
from edgecore.runtime.preprocess import PreprocessConfig, preprocess
from edgecore.runtime.roi import RoiMask, load_roi
from edgecore.runtime.scorer import Decision, ImageScorer, PatchScorer
from edgecore.runtime.scoring import Scores
from edgecore.runtime.search import neighbour_table
from edgecore.runtime.tiles import cut_tiles
from edgecore.samplers import SAMPLERS, available_samplers, create_sampler

MODEL_FORMAT_VERSION = 1
EMBED_CHUNK = 16  # graph inputs per CPU forward (see PatchCoreModel.embed_inputs)
CONFIG_FILE = "config.json"
BANK_FILE = "memory_bank.safetensors"


@dataclass(frozen=True)
class FitConfig:
    backbone: str = "efficientnet_lite0"
    layers: tuple[str, ...] | None = None
    weights: str | None = None
    random_init: bool = False
    embed_dim: int = 1024
    coreset_ratio: float = 0.1
    sampler: str = "k-center-greedy"
    denoise: str | float = "off"  # off | auto | fraction: drop outlier training images first (edgecore.denoise)
    augment: tuple[str, ...] = ()  # rotations/flips added to the bank (edgecore.augment.TRANSFORMS)
    projection_dim: int = 128
    num_neighbors: int = 9
    blur_sigma: float = 4.0
    val_ratio: float = 0.1
    false_alarm_rate: float = 0.01
    seed: int = 0
    device: str = "auto"
    batch_size: int = 16
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    def __post_init__(self) -> None:
        if not 0.0 < self.coreset_ratio <= 1.0:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
        if not 0.0 <= self.val_ratio < 1.0:
            raise ValueError(f"val_ratio must be in [0, 1), got {self.val_ratio}")
        if not 0.0 <= self.false_alarm_rate < 1.0:
            raise ValueError(f"false_alarm_rate must be in [0, 1), got {self.false_alarm_rate}")
        if self.num_neighbors < 1 or self.embed_dim < 1 or self.batch_size < 1:
            raise ValueError("num_neighbors, embed_dim and batch_size must be >= 1")
        if parse_denoise(self.denoise) != self.denoise:
            raise ValueError(f"denoise must be 'off', 'auto' or a fraction in (0, 0.5), got {self.denoise!r}")
        if parse_augment(self.augment) != tuple(self.augment):
            raise ValueError(f"augment must be distinct names from {', '.join(TRANSFORMS)}, got {self.augment!r}")
        if self.sampler not in SAMPLERS:  # before any feature is extracted
            raise ValueError(f"unknown sampler {self.sampler!r}; available: {', '.join(available_samplers())}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


class PatchCoreModel(ImageScorer):
    """A fitted PatchCore: the torch feature module plus the shared :class:`PatchScorer` and :class:`Decision`.

    ``detect``/``score_crops`` are the camera Detector's very code (:class:`ImageScorer`);
    only ``embed`` differs (torch here, the compiled engine there).
    """

    def __init__(
        self,
        config: dict,
        features: PatchCoreFeatures,
        memory_bank: np.ndarray,
        neighbours: np.ndarray,
        device: torch.device,
        anomaly_bank: np.ndarray | None = None,
        roi: RoiMask | None = None,
    ) -> None:
        self.config = config
        self.roi = roi  # patches outside it are never searched or scored (edgecore.runtime.roi)
        self.features = features.to(device).eval()
        self.device = device
        self.memory_bank = np.ascontiguousarray(memory_bank, dtype=np.float32)
        self.neighbour_table = neighbours
        self.preprocess_config = PreprocessConfig.from_dict(config["preprocess"])
        self.grid = tuple(config["features"]["grid"])
        self.anomaly_bank = anomaly_bank  # labelled defects (edgecore.labelled); None: plain PatchCore
        self.scorer = PatchScorer(
            exact_search(self.memory_bank), self.memory_bank, neighbours, self.grid, self.preprocess_config.input_hw,
            config["scoring"]["blur_sigma"], anomaly=anomaly_scorer(config, anomaly_bank), roi=roi,
        )

    # --- inference ---------------------------------------------------------
    @property
    def decision(self) -> Decision:
        return Decision.from_config(self.config["threshold"])

    @torch.no_grad()
    def embed(self, crops: np.ndarray) -> np.ndarray:
        """N×crop×crop×3 uint8 → N×P×D float32 patch embeddings."""
        tensor = torch.from_numpy(np.ascontiguousarray(crops)).to(self.device)
        return self.features(tensor).float().cpu().numpy()

    def embed_inputs(self, inputs: np.ndarray, batch_size: int = EMBED_CHUNK) -> Iterator[np.ndarray]:
        """Embeddings of N graph inputs (crops, or tiles from ``cut_tiles``), chunk by chunk, in order.

        On the CPU every forward is ``EMBED_CHUNK`` inputs (a short last chunk is padded), run
        several side by side (:func:`~edgecore.features.embed_concurrently`) through the bit-identical
        :func:`~edgecore.features.inference_copy`: oneDNN picks a convolution's blocking by shape and
        thread count, so one shape gives every caller (fit, ``score_crops``, evaluate) the same numbers
        whatever its batching, and on a few shared cores it takes several times less CPU than torch's
        intra-op threads. On a GPU: ``embed`` on ``batch_size`` inputs at a time.
        """
        if self.device.type != "cpu":
            yield from (self.embed(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size))
            return
        fast = getattr(self, "_inference_module", None)
        if fast is None:  # made once: evaluate scores slice by slice
            fast = self._inference_module = inference_copy(self.features)

        def run(chunk: np.ndarray) -> np.ndarray:
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], EMBED_CHUNK - len(chunk), axis=0)])
            with torch.inference_mode():
                return fast(torch.from_numpy(np.ascontiguousarray(padded))).float().numpy()[: len(chunk)]

        chunks = [inputs[i : i + EMBED_CHUNK] for i in range(0, len(inputs), EMBED_CHUNK)]
        yield from embed_concurrently(run, chunks, torch.get_num_threads())

    def score_crops(self, crops: np.ndarray, batch_size: int = 16) -> Scores:
        """:meth:`ImageScorer.score_crops` with the crops embedded by :meth:`embed_inputs` (so fit's
        threshold and any later scoring of the same crops agree to the last bit)."""
        inputs = cut_tiles(crops, self.preprocess_config)
        features = np.concatenate(list(self.embed_inputs(inputs, batch_size)))
        per_frame = self.preprocess_config.tile_count
        return Scores.concatenate([self.score_features(features[i : i + batch_size * per_frame])
                                   for i in range(0, len(features), batch_size * per_frame)])

    # --- persistence -------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        from safetensors.numpy import save_file

        directory = Path(directory)
        with atomic_directory(directory) as staging:
            tensors = {"memory_bank": self.memory_bank, "neighbour_table": self.neighbour_table.astype(np.int32)}
            if self.anomaly_bank is not None:
                tensors["anomaly_bank"] = self.anomaly_bank
            save_file(tensors, str(staging / BANK_FILE))
            if self.roi is not None:
                self.roi.save(staging)
            write_json(staging / CONFIG_FILE, self.config)
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto", weights: str | None = None) -> "PatchCoreModel":
        """Load a model directory written by :meth:`save`.

        Args:
            directory: the model directory.
            device: ``auto``, ``cpu`` or ``cuda``.
            weights: backbone weights file; default: the file the model was fitted with
                (still at its recorded path), else the backbone's offline source.

        Returns:
            the model; its backbone weights are checked against the recorded sha256.
        """
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        directory = Path(directory)
        config = read_model_config(directory)
        try:
            tensors = load_file(str(directory / BANK_FILE))
            bank, table = tensors["memory_bank"], tensors["neighbour_table"]
        except (OSError, SafetensorError, KeyError) as exc:
            raise ModelError(f"{directory / BANK_FILE}: unreadable memory bank: {exc}") from exc
        expected = (config["coreset"]["size"], config["features"]["embed_dim"])
        if bank.shape != expected or table.shape[0] != bank.shape[0]:
            raise ModelError(
                f"{directory / BANK_FILE}: memory bank shape {bank.shape} / neighbour table {table.shape} "
                f"do not match config {expected}"
            )
        features = build_feature_module(config, weights=weights)
        return cls(config, features, bank, table, resolve_device(device), anomaly_bank=tensors.get("anomaly_bank"),
                   roi=load_roi(directory, config.get("roi"), ModelError))


def read_model_config(directory: Path) -> dict:
    import json

    path = directory / CONFIG_FILE
    if not directory.is_dir():
        raise ModelError(f"{directory}: not a model directory (run `edgecore fit` first)")
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: missing; {directory} is not a complete model directory") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: not valid JSON: {exc}") from exc
    version = config.get("format_version") if isinstance(config, dict) else None
    if version != MODEL_FORMAT_VERSION:
        raise ModelError(f"{path}: model format version {version!r}; this edgecore reads {MODEL_FORMAT_VERSION}")
    return config


def build_feature_module(config: dict, weights: str | None = None) -> PatchCoreFeatures:
    """Rebuild the feature module a config describes, and check it is the same backbone."""
    info = config["backbone"]
    random_init = info["weights_source"].startswith("random-init")
    if weights is None and not random_init and Path(info["weights_source"]).is_file():
        weights = info["weights_source"]  # fitted with --weights PATH: reload that very file
    import warnings

    with warnings.catch_warnings():
        if random_init:  # the model was fitted that way on purpose; warned at fit time
            warnings.simplefilter("ignore")
        backbone = create_backbone(
            info["name"],
            layers=info["layers"],
            weights=weights,
            random_init=random_init,
            image_size=PreprocessConfig.from_dict(config["preprocess"]).input_hw,
            seed=info.get("seed", 0),
        )
    if backbone.weights_sha256 != info["weights_sha256"]:
        raise ModelError(
            f"backbone weights differ from the ones this model was fitted with "
            f"(sha256 {backbone.weights_sha256[:12]}… vs {info['weights_sha256'][:12]}… from {info['weights_source']})"
        )
    return PatchCoreFeatures(
        backbone.module, backbone.channels, tuple(info["mean"]), tuple(info["std"]), config["features"]["embed_dim"]
    )


def split_validation(count: int, val_ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic split of the normal training images into (bank, validation) indices."""
    order = np.random.default_rng(seed).permutation(count)
    n_val = int(round(count * val_ratio))
    if val_ratio > 0 and count >= 2:
        n_val = min(max(n_val, 1), count - 1)
    else:
        n_val = 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def base_model_config(config: FitConfig, backbone: Backbone, features: PatchCoreFeatures, grid: tuple[int, int]) -> dict:
    """The config.json fields known before any patch is seen (shared by ``fit`` and the distributed fit)."""
    return {
        "format_version": MODEL_FORMAT_VERSION,
        "edgecore_version": edgecore.__version__,
        "preprocess": config.preprocess.to_dict(),
        "backbone": {
            "name": backbone.spec.name,
            "layers": list(backbone.layers),
            "channels": backbone.channels,
            "strides": backbone.strides,
            "mean": list(backbone.spec.mean),
            "std": list(backbone.spec.std),
            "weights_sha256": backbone.weights_sha256,
            "weights_source": backbone.weights_source,
            "seed": config.seed,
        },
        "features": {"grid": list(grid), "embed_dim": features.embed_dim, "patch_size": 3},
        "scoring": {"num_neighbors": config.num_neighbors, "blur_sigma": config.blur_sigma, "distance": "l2"},
    }


def fit(
    images: Iterable[np.ndarray], config: FitConfig, progress: bool = False, sources: Sequence[str] | None = None,
    roi: RoiSource | None = None,
) -> PatchCoreModel:
    """Fit PatchCore on normal images.

    Args:
        images: decoded normal images (uint8 H×W×3 RGB), any iterable; each is cropped
            as it arrives, so only the small crops stay in memory.
        config: backbone, layers, coreset, threshold and preprocessing choices.
        progress: report each step (a rich bar on a terminal, plain lines otherwise).
        sources: the images' file names, recorded for the held-out split.
        roi: region of interest in the frames' pixels (:mod:`edgecore.roi`); patches outside
            it are left out of the coreset, the score and the map.

    Returns:
        the fitted model with its threshold set; ``model.save(DIR)`` writes it.
    """
    if config.augment and roi is not None:  # the ROI is in the line's frame coordinates, a turned frame is not
        raise ValueError("--augment is not available with --roi")
    all_crops, frame_sizes, turned_crops = [], [], []
    start = time.perf_counter()
    for image in images:
        frame_sizes.append(image.shape[:2])
        all_crops.append(preprocess(image, config.preprocess))
        # --augment: each transform turns the frame, then the one preprocessing (edgecore.augment)
        turned_crops.append([preprocess(f, config.preprocess) for f in augmented_frames(image, config.augment)])
        if progress and len(all_crops) % 200 == 0:  # the image count is only known at the end of the stream
            print(f"fit: images: {len(all_crops)} read ({time.perf_counter() - start:.0f} s)", file=sys.stderr,
                  flush=True)
    if not all_crops:
        raise ValueError("no training images")
    if progress:
        print(f"fit: images: {len(all_crops)} read in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    all_crops = np.stack(all_crops)
    timings: dict[str, float] = {}
    device = resolve_device(config.device)
    backbone = create_backbone(
        config.backbone,
        layers=config.layers,
        weights=config.weights,
        random_init=config.random_init,
        image_size=config.preprocess.input_hw,
        seed=config.seed,
    )
    features = PatchCoreFeatures(backbone.module, backbone.channels, backbone.spec.mean, backbone.spec.std, config.embed_dim)
    grid = grid_shape(features, config.preprocess.input_hw)
    bank_idx, val_idx = split_validation(len(all_crops), config.val_ratio, config.seed)
    roi_mask = fit_roi(roi, frame_sizes, config.preprocess, grid) if roi is not None else None

    model_config = base_model_config(config, backbone, features, grid)
    placeholder_bank = np.zeros((1, features.embed_dim), dtype=np.float32)
    model = PatchCoreModel(model_config, features, placeholder_bank, np.zeros((1, 1), np.int32), device)

    start = time.perf_counter()
    crops = all_crops[bank_idx]
    parts = []
    with step("fit: features", len(crops), progress) as advance:
        # tile mode: every tile of a normal frame goes into the bank (cut_tiles is identity otherwise)
        tiles, inputs = config.preprocess.tile_count, 0
        for part in model.embed_inputs(cut_tiles(crops, config.preprocess), config.batch_size):
            parts.append(part)
            inputs += len(part)
            advance((inputs // tiles) - (inputs - len(part)) // tiles)  # frames completed by this chunk
    train_features = np.concatenate(parts)
    train_features = train_features.reshape(len(crops), -1, train_features.shape[-1])  # per frame: (tiles·P)×D
    timings["features_s"] = time.perf_counter() - start
    denoised = None
    if config.denoise != "off":  # outlier (likely defective) training images leave before the sampler sees them
        start = time.perf_counter()
        denoised = select_clean_images(train_features, config.denoise, [sources[i] for i in bank_idx] if sources
                                       else None, config.seed)
        train_features = train_features[denoised.keep]
        timings["denoise_s"] = time.perf_counter() - start
    bank_all = (train_features if roi_mask is None else train_features[:, roi_mask.flat])  # ROI: before selection
    bank_all = bank_all.reshape(-1, train_features.shape[-1])
    augmented = None
    if config.augment:  # bank images only (after --denoise), never the validation split
        start = time.perf_counter()
        kept = bank_idx[denoised.keep] if denoised else bank_idx
        extra = np.stack([c for i in kept for c in turned_crops[i]])
        parts = list(model.embed_inputs(cut_tiles(extra, config.preprocess), config.batch_size))
        augmented = augment_record(config.augment, len(bank_all), len(bank_all) * (1 + len(config.augment)))
        bank_all = np.concatenate([bank_all, np.concatenate(parts).reshape(-1, bank_all.shape[-1])])
        timings["augment_features_s"] = time.perf_counter() - start
    del turned_crops

    start = time.perf_counter()
    sampler = create_sampler(  # a sampler with steps to show (k-center greedy) reports them itself:
        config.sampler, ratio=config.coreset_ratio, projection_dim=config.projection_dim, seed=config.seed,
        device=device.type, progress=progress,  # no outer step here, rich allows one live bar at a time
    )
    if progress:
        print(f"fit: coreset ({config.sampler}) of {len(bank_all)} patches", file=sys.stderr, flush=True)
    selected = sampler.select(bank_all)
    memory_bank = np.ascontiguousarray(bank_all[selected])
    timings["coreset_s"] = time.perf_counter() - start

    start = time.perf_counter()
    with step(f"fit: neighbour table ({len(memory_bank)} x {config.num_neighbors})", 1, progress):
        table = neighbour_table(memory_bank, config.num_neighbors, search=exact_search(memory_bank))
    timings["neighbour_table_s"] = time.perf_counter() - start

    model_config["coreset"] = {
        "sampler": config.sampler,
        "ratio": config.coreset_ratio,
        "projection_dim": config.projection_dim,
        "seed": config.seed,
        "size": int(memory_bank.shape[0]),
        "bank_patches": int(bank_all.shape[0]),
        "coverage_radius_projected": float(getattr(sampler, "coverage_radius_", float("nan"))),
        **({"denoise": denoised.record} if denoised else {}),
        **({"augment": augmented} if augmented else {}),
    }
    if roi_mask is not None:
        model_config["roi"] = roi_mask.to_manifest()
    model = PatchCoreModel(model_config, features, memory_bank, table, device, roi=roi_mask)

    start = time.perf_counter()
    with step("fit: threshold", max(len(val_idx), 1), progress) as advance:
        if len(val_idx):
            val_scores = model.score_crops(all_crops[val_idx], config.batch_size).image
            advance(len(val_idx))
        else:  # no held-out images: fall back to the training images' own scores (optimistic)
            val_scores = model.score_features(train_features[:64].reshape(-1, grid[0] * grid[1], features.embed_dim)).image
            advance(1)
    timings["threshold_s"] = time.perf_counter() - start
    val_sources = [sources[i] for i in val_idx] if sources else []
    screened: list[dict] = []
    if config.denoise != "off" and len(val_idx):  # a defect held out would set the threshold (edgecore.denoise)
        kept, screened = screen_validation(val_scores, val_sources or None)
        val_scores, val_idx = val_scores[kept], val_idx[kept]
        val_sources = [name for name, keep in zip(val_sources, kept) if keep]
    model.config["threshold"] = threshold_config(val_scores, config.false_alarm_rate, held_out=len(val_idx) > 0)
    model.config["fit"] = {
        "train_images": int(len(bank_idx)),
        "validation_images": int(len(val_idx)),
        "validation_sources": val_sources,
        **({"validation_screened": screened} if config.denoise != "off" else {}),
        "device": device.type,
        "timings": {key: round(value, 3) for key, value in timings.items()},
    }
    return model
