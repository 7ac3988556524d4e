"""Tiled inspection (#15.1b): geometry, stitching, a corner defect found by tiles, camera = host, fail closed."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgecore.runtime.preprocess import PreprocessConfig, crop_map_to_original, preprocess
from edgecore.runtime.scoring import Scores
from edgecore.runtime.tiles import cut_tiles, stitch_scores, tile_boxes

TILE = PreprocessConfig(aspect="tile", input_size=(64, 64), tiles=(2, 3), tile_overlap=(16, 16))


def test_tiles_cover_the_canvas_and_stitch_back_by_max():
    assert TILE.map_hw == (112, 160) and TILE.tile_count == 6
    canvas = np.arange(112 * 160, dtype=np.int64).reshape(1, 112, 160)
    tiles = cut_tiles(canvas, TILE)
    assert tiles.shape == (6, 64, 64)
    assert tiles[4, 0, 0] == canvas[0, 48, 48] and tiles[5, -1, -1] == canvas[0, -1, -1]  # row-major, last at the corner
    maps = np.zeros((12, 64, 64), np.float32)  # two frames
    maps[2, 10, 60] = 5.0  # tile (0, 2) of frame 0; a lower value of the overlapping tile (0, 1) must not win
    maps[1, 10, 60 + 48 - 96 + 48] = 1.0
    stitched = stitch_scores(Scores(np.arange(12.0), np.zeros((12, 4)), maps), TILE)
    assert stitched.image.tolist() == [5.0, 11.0] and stitched.patches.shape == (2, 24)
    assert stitched.maps.shape == (2, 112, 160) and stitched.maps[0, 10, 96 + 60] == 5.0
    assert stitched.maps[0].max() == 5.0 and np.isfinite(stitched.maps).all()  # every canvas pixel is covered


def test_frame_mapping_and_config_round_trip():
    frame = np.full((560, 800, 3), 90, np.uint8)
    assert preprocess(frame, TILE).shape == (112, 160, 3)
    rh, rw, top, left = TILE.placement(560, 800)  # pad rule onto the canvas: 112x160 exactly (same aspect)
    assert (rh, rw, top, left) == (112, 160, 0, 0)
    boxes = tile_boxes(TILE, 560, 800)
    assert boxes[0] == (0.0, 0.0, 320.0, 320.0) and boxes[-1] == (480.0, 240.0, 800.0, 560.0)
    full = crop_map_to_original(np.ones((112, 160), np.float32), (560, 800), TILE)
    assert full.shape == (560, 800)
    assert PreprocessConfig.from_dict(TILE.to_dict()) == TILE and TILE.to_dict()["canvas_size"] == [112, 160]
    for bad in ({"aspect": "pad", "tiles": (2, 2)}, {"aspect": "tile", "tiles": (2, 2), "tile_overlap": (40, 0)},
                {"aspect": "tile", "tiles": (0, 2)}, {"aspect": "tile"}):
        with pytest.raises(ValueError):
            PreprocessConfig(input_size=(64, 64), **bad)


def test_auto_tiles_only_very_large_frames():
    from edgecore.aspect import choose_preprocess, resolve_preprocess

    large = choose_preprocess([(2000, 3000)] * 3, crop=224)
    assert large.config.aspect == "tile" and large.config.input_hw == (224, 224) and large.config.tile_count <= 6
    assert large.config.tiles == (2, 3) and "tiles" in large.reason
    assert choose_preprocess([(900, 900)]).config == PreprocessConfig()  # bottle: unchanged
    assert choose_preprocess([(1250, 500)]).config.aspect == "pad"  # the tall parts: unchanged
    config, record = resolve_preprocess("tile", "64x64", 256, 224, [], "2x3", 0.25)
    assert config == TILE and record["mode"] == "tile"
    with pytest.raises(ValueError, match="--tile-grid goes with"):
        resolve_preprocess("pad", None, 256, 224, [], "2x2")


# --- a large frame with a small defect near a corner -----------------------------------
SIZE, DEFECT = 448, (slice(12, 26), slice(418, 432))  # inside the margin a 128/112 center crop cuts away


def _frame(rng: np.random.Generator, defect: bool) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    base = 120 + 30 * np.sin(xx / 9.0 + rng.uniform(0, 0.3)) * np.cos(yy / 13.0)
    rgb = np.clip(base[..., None] + rng.normal(0, 4, (SIZE, SIZE, 3)), 0, 255)
    if defect:
        rgb[DEFECT] = 250.0
    return rgb.astype(np.uint8)


@pytest.fixture(scope="module")
def corner_set():
    rng = np.random.default_rng(0)
    return [_frame(rng, False) for _ in range(8)], [_frame(rng, False) for _ in range(3)], _frame(rng, True)


def _fit(train, preprocess_config):
    from edgecore.model import FitConfig, fit

    return fit(iter(train), FitConfig(random_init=True, device="cpu", val_ratio=0.25, embed_dim=64,
                                      preprocess=preprocess_config))


CORNER_TILES = PreprocessConfig(aspect="tile", input_size=(96, 96), tiles=(3, 3), tile_overlap=(24, 24))


@pytest.fixture(scope="module")
def tile_model(corner_set):
    return _fit(corner_set[0], CORNER_TILES)


def test_tiles_find_a_corner_defect_that_squash_misses(corner_set, tile_model):
    _, good, bad = corner_set
    squash = _fit(corner_set[0], PreprocessConfig(128, 112))

    def margin(model) -> float:  # the defect's score over the highest normal score
        return model.detect(bad).score / max(model.detect(frame).score for frame in good)

    tiled, squashed = margin(tile_model), margin(squash)
    assert tiled > 1.2 and tiled > squashed + 0.15, (tiled, squashed)
    detection = tile_model.detect(bad)
    assert detection.map.shape == CORNER_TILES.map_hw and detection.map_original.shape == (SIZE, SIZE)
    y, x = np.unravel_index(np.argmax(detection.map_original), detection.map_original.shape)
    assert y < 80 and x > SIZE - 80, (y, x)  # the stitched map peaks at the corner defect


@pytest.fixture(scope="module")
def tile_bundle(tile_model, tmp_path_factory) -> Path:
    from edgecore.export.bundle import export_bundle

    model_dir = tile_model.save(tmp_path_factory.mktemp("tile-model") / "model")
    return export_bundle(model_dir, tmp_path_factory.mktemp("tile-bundle") / "tile.edgecore", index_dtype="fp32",
                         search="exact")


def test_fp32_engine_reproduces_the_host_on_tiles(corner_set, tile_model, tile_bundle):
    from edgecore.runtime.detector import Detector

    manifest = json.loads((tile_bundle / "manifest.json").read_text())
    assert manifest["graph"]["input"]["shape"][1:] == [96, 96, 3] and manifest["preprocess"]["tiles"] == [3, 3]
    with Detector.open(tile_bundle, precision="fp32") as detector:
        for frame in [*corner_set[1], corner_set[2]]:
            host, camera = tile_model.detect(frame), detector.detect(frame)
            assert abs(host.score - camera.score) <= 1e-3 * max(1.0, abs(host.score))
            assert camera.map.shape == CORNER_TILES.map_hw and host.is_anomalous == camera.is_anomalous
            np.testing.assert_allclose(camera.map, host.map, rtol=1e-3, atol=1e-3 * float(host.map.max()))


@pytest.mark.parametrize("tamper", [
    {"canvas_size": [200, 200]},  # not what 3x3 tiles of 96 overlapping by 24 cover
    {"tiles": [3, 2]},
    {"tile_overlap": [60, 24]},  # overlap over half a tile
    {"tiles": None},
    {"aspect": "pad"},  # tile fields on a non-tile bundle
    {"input_size": [64, 64], "resize": 64, "crop": 64},  # tiles no longer match the graph input
])
def test_manifest_tampering_with_the_tiling_is_refused(tile_bundle, tmp_path, tamper):
    from edgecore.runtime.bundle import validate_manifest
    from edgecore.runtime.errors import BundleError

    manifest = json.loads((tile_bundle / "manifest.json").read_text())
    validate_manifest(manifest, "manifest.json")  # the untouched one is fine
    manifest["preprocess"].update(tamper)
    with pytest.raises(BundleError):
        validate_manifest(manifest, "manifest.json")
