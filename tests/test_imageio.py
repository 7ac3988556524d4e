"""load_image / load_mask / image_size: mode conversion, orientation, errors, arrays."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgecore.runtime.errors import DatasetError, ImageError
from edgecore.runtime.imageio import image_size, load_image, load_mask


def _save(tmp_path: Path, img: Image.Image, name: str, **kwargs: object) -> Path:
    path = tmp_path / name
    img.save(path, **kwargs)
    return path


def _palette(colors: list[tuple[int, int, int]]) -> list[int]:
    flat = [c for rgb in colors for c in rgb]
    return flat + [0] * (768 - len(flat))


# --------------------------------------------------------------------------- modes


def _mode_1() -> Image.Image:
    img = Image.new("1", (3, 2), 0)
    img.putpixel((1, 0), 1)
    return img


def _mode_p(transparency: int | bytes | None) -> Image.Image:
    img = Image.new("P", (3, 2), 0)
    img.putpalette(_palette([(10, 20, 30), (200, 100, 50)]))
    img.putpixel((1, 0), 1)
    if transparency is not None:
        img.info["transparency"] = transparency  # covers the pixel we check
    return img


# (image, file name, expected RGB at x=1, y=0, expected RGB at x=0, y=0)
MODE_CASES = {
    "1": (_mode_1, "a.png", (255, 255, 255), (0, 0, 0)),
    "L": (lambda: _with_pixel(Image.new("L", (3, 2), 7), 200), "a.png", (200,) * 3, (7,) * 3),
    "LA": (lambda: _with_pixel(Image.new("LA", (3, 2), (7, 255)), (90, 0)), "a.png", (90,) * 3, (7,) * 3),
    "P": (lambda: _mode_p(None), "a.png", (200, 100, 50), (10, 20, 30)),
    "P+transparent-index": (lambda: _mode_p(1), "a.png", (200, 100, 50), (10, 20, 30)),
    "P+alpha-table": (lambda: _mode_p(b"\xff\x80"), "a.png", (200, 100, 50), (10, 20, 30)),
    "RGBA": (lambda: _with_pixel(Image.new("RGBA", (3, 2), (1, 2, 3, 255)), (9, 8, 7, 0)), "a.png", (9, 8, 7), (1, 2, 3)),
    "CMYK": (lambda: _with_pixel(Image.new("CMYK", (3, 2), (0, 0, 0, 0)), (0, 255, 255, 0)), "a.tif", (255, 0, 0), (255, 255, 255)),
    "I;16": (lambda: _with_pixel(Image.new("I;16", (3, 2), 257 * 10), 65535), "a.png", (255,) * 3, (10,) * 3),
    "I;16B": (lambda: _with_pixel(Image.new("I;16B", (3, 2), 0), 257 * 100 + 128), "a.tif", (100,) * 3, (0,) * 3),
    "I": (lambda: _with_pixel(Image.new("I", (3, 2), 70000), 257 * 42), "a.tif", (42,) * 3, (255,) * 3),
    "F": (lambda: _with_pixel(Image.new("F", (3, 2), -5.0), 300.0), "a.tif", (255,) * 3, (0,) * 3),
    "F-mid": (lambda: _with_pixel(Image.new("F", (3, 2), 12.4), 99.6), "a.tif", (100,) * 3, (12,) * 3),
}


def _with_pixel(img: Image.Image, value: object) -> Image.Image:
    img.putpixel((1, 0), value)
    return img


@pytest.mark.parametrize("case", list(MODE_CASES))
def test_every_mode_becomes_uint8_rgb(tmp_path: Path, case: str) -> None:
    make, name, at_1_0, at_0_0 = MODE_CASES[case]
    img = make()
    path = _save(tmp_path, img, name)
    with Image.open(path) as stored:
        assert stored.mode == img.mode  # the file really stores that mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. Pillow's "palette transparency" warning
        rgb = load_image(path)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3) and rgb.flags["C_CONTIGUOUS"]
    assert tuple(rgb[0, 1]) == at_1_0
    assert tuple(rgb[0, 0]) == at_0_0


def test_exif_orientation_6_rotates(tmp_path: Path) -> None:
    img = Image.new("RGB", (3, 2), (0, 0, 0))  # 3 wide, 2 high
    img.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(tmp_path, img, "rot.png", exif=exif)
    rgb = load_image(path)
    assert rgb.shape == (3, 2, 3)  # now 2 wide, 3 high
    assert tuple(rgb[0, 1]) == (255, 0, 0)  # top-left went to top-right
    assert rgb[:, :, 0].sum() == 255
    assert image_size(path) == (2, 3)  # header size, as stored


def test_exif_orientation_3_rotates_jpeg(tmp_path: Path) -> None:
    img = Image.new("RGB", (32, 16), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 8, 8))  # bright top-left block
    exif = Image.Exif()
    exif[0x0112] = 3  # 180 degrees
    rgb = load_image(_save(tmp_path, img, "rot.jpg", exif=exif, quality=95))
    assert rgb.shape == (16, 32, 3)
    assert rgb[12, 28].mean() > 200 and rgb[4, 4].mean() < 50


def test_bytes_and_memoryview_input() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (5, 6, 7)).save(buf, format="PNG")
    for source in (buf.getvalue(), bytearray(buf.getvalue()), memoryview(buf.getvalue())):
        rgb = load_image(source)
        assert rgb.shape == (3, 4, 3) and tuple(rgb[2, 3]) == (5, 6, 7)


def test_image_size_reads_header(tmp_path: Path) -> None:
    assert image_size(_save(tmp_path, Image.new("L", (7, 5)), "a.png")) == (5, 7)


# --------------------------------------------------------------------------- file errors


def _valid_png(tmp_path: Path, size: int = 64) -> Path:
    noise = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return _save(tmp_path, Image.fromarray(noise), "valid.png")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(ImageError, match=r"nope\.png: file not found"):
        load_image(path)


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.png: empty file"):
        load_image(path)


def test_text_file_with_png_extension(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageError, match=r"notes\.png: not an image"):
        load_image(path)


def test_truncated_png(tmp_path: Path) -> None:
    data = _valid_png(tmp_path).read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.png: (truncated|corrupt)") as info:
        load_image(path)
    assert not isinstance(info.value.__cause__, ImageError)  # it came from the decoder


def test_empty_and_garbage_bytes() -> None:
    with pytest.raises(ImageError, match="<bytes>: empty"):
        load_image(b"")
    with pytest.raises(ImageError, match="<bytes>: not an image"):
        load_image(b"\x00garbage" * 10)


def test_folder_is_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="is a folder"):
        load_image(tmp_path)


def test_too_many_pixels_is_refused_before_decoding(tmp_path: Path) -> None:
    path = _valid_png(tmp_path, size=8)
    with pytest.raises(ImageError, match=r"valid\.png: image too large: 8x8 .*64 pixels.*limit of 63 pixels"):
        load_image(path, max_pixels=63)
    assert load_image(path, max_pixels=64).shape == (8, 8, 3)


def test_pillow_decompression_bomb_becomes_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Over twice Pillow's own limit, Pillow raises in Image.open, before our check.
    path = _valid_png(tmp_path, size=8)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)
    with pytest.raises(ImageError, match=r"valid\.png: image too large") as info:
        load_image(path, max_pixels=10**6)
    assert isinstance(info.value.__cause__, Image.DecompressionBombError)
    # Between Pillow's limit and twice it, Pillow only warns: our max_pixels decides.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)
    assert load_image(path, max_pixels=10**6).shape == (8, 8, 3)


def test_unsupported_source_type() -> None:
    with pytest.raises(ImageError, match="int"):
        load_image(42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- masks


def test_load_mask_bool_and_size_check(tmp_path: Path) -> None:
    mask = Image.new("L", (4, 3), 0)
    mask.putpixel((2, 1), 255)
    path = _save(tmp_path, mask, "m_mask.png")
    out = load_mask(path, (3, 4))
    assert out.dtype == bool and out.shape == (3, 4) and out.sum() == 1 and out[1, 2]
    with pytest.raises(DatasetError, match=r"m_mask\.png.*3x4 \(HxW\).*5x5"):
        load_mask(path, (5, 5))


def test_load_mask_16bit_small_values_are_defect(tmp_path: Path) -> None:
    mask = Image.new("I;16", (2, 2), 0)
    mask.putpixel((0, 0), 1)  # would round to 0 if scaled to 8 bit first
    assert load_mask(_save(tmp_path, mask, "m.png"), None).sum() == 1


def test_load_mask_decoding_errors_are_image_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"gone_mask\.png: file not found"):
        load_mask(tmp_path / "gone_mask.png", (2, 2))


# --------------------------------------------------------------------------- arrays


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((2, 3), 9, np.uint8), (9, 9, 9)),
        (np.full((2, 3, 1), 9, np.uint8), (9, 9, 9)),
        (np.full((2, 3, 3), 9, np.uint8), (9, 9, 9)),
        (np.dstack([np.full((2, 3, 3), 9, np.uint8), np.zeros((2, 3), np.uint8)]), (9, 9, 9)),
        (np.full((2, 3, 3), 65535, np.uint16), (255, 255, 255)),
        (np.full((2, 3), 257 * 3, np.uint16), (3, 3, 3)),
        (np.full((2, 3, 3), 0.5, np.float32), (128, 128, 128)),
        (np.full((2, 3, 4), 1.0 + 5e-7, np.float64), (255, 255, 255)),
        (np.full((2, 3), -5e-7, np.float64), (0, 0, 0)),
    ],
    ids=["u8-HW", "u8-HW1", "u8-HW3", "u8-HW4", "u16-HW3", "u16-HW", "f32-half", "f64-tolerance-high", "f64-tolerance-low"],
)
def test_array_inputs(array: np.ndarray, expected: tuple[int, int, int]) -> None:
    rgb = load_image(array)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3) and rgb.flags["C_CONTIGUOUS"]
    assert {tuple(p) for p in rgb.reshape(-1, 3)} == {expected}


def test_array_output_never_aliases_input() -> None:
    source = np.zeros((2, 3, 3), np.uint8)
    rgb = load_image(source)
    assert not np.shares_memory(rgb, source)
    rgb[0, 0, 0] = 255
    assert source[0, 0, 0] == 0
    fortran = np.asfortranarray(np.arange(18, dtype=np.uint8).reshape(2, 3, 3))
    out = load_image(fortran)
    assert out.flags["C_CONTIGUOUS"] and np.array_equal(out, fortran)


@pytest.mark.parametrize(
    ("array", "pattern"),
    [
        (np.array([[0.1, np.nan]], np.float32), "NaN"),
        (np.array([[0.1, np.inf]], np.float64), "NaN or infinity"),
        (np.array([[0.0, 1.5]], np.float32), r"outside \[0, 1\]"),
        (np.array([[-0.01, 0.5]], np.float64), r"outside \[0, 1\]"),
        (np.array([[0.0, 255.0]], np.float32), "divide by 255"),
        (np.zeros((2, 2, 2, 3), np.uint8), r"shape \(2, 2, 2, 3\).*wrong shape"),
        (np.zeros(5, np.uint8), r"shape \(5,\).*wrong shape"),
        (np.zeros((2, 2, 2), np.uint8), r"shape \(2, 2, 2\).*wrong shape"),
        (np.zeros((2, 2, 3), np.int64), "dtype int64.*unsupported dtype"),
        (np.zeros((2, 2, 3), bool), "dtype bool.*unsupported dtype"),
        (np.zeros((0, 4, 3), np.uint8), r"shape \(0, 4, 3\).*empty"),
    ],
    ids=["nan", "inf", "float-above-1", "float-below-0", "float-0-255", "ndim-4", "ndim-1", "2-channels", "int64", "bool", "empty"],
)
def test_rejected_arrays(array: np.ndarray, pattern: str) -> None:
    with pytest.raises(ImageError, match=pattern) as info:
        load_image(array)
    assert "accepted:" in str(info.value)
