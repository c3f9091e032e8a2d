"""frcnn.runtime.image_io: the documented conversions (docs/runtime.md table), issue 9 item 1's 16-bit PNG
reproduction against a NumPy reference, exact (full) decoding, and Pillow's bomb limit replaced by ours."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from bad_input_utils import fake_model_file, noise_png
from frcnn.runtime import image_io
from frcnn.runtime.cli import main
from frcnn.runtime.image_io import read_image
from PIL import Image


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fake_model_file(tmp_path_factory)


def test_png16_reproduction_is_scaled_not_white(model: str, tmp_path: Path) -> None:
    a = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256) * 3  # issue 9, item 1, verbatim
    Image.fromarray(a).save(tmp_path / "png16.png")
    ref = np.floor(a.astype(np.float64) / 257 + 0.5).astype(np.uint8)  # round(v / 257)
    rgb = read_image(tmp_path / "png16.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (256, 256, 3)
    np.testing.assert_array_equal(rgb, np.repeat(ref[:, :, None], 3, axis=2))
    assert rgb.min() == 0 and rgb.max() == 255 and 100 < rgb.mean() < 160  # not all-white
    from frcnn.trainer.data.mapper import read_image as trainer_read

    np.testing.assert_array_equal(trainer_read(str(tmp_path / "png16.png")), rgb)  # the trainer reads the same
    assert main(["infer", model, str(tmp_path / "png16.png"), "--output", str(tmp_path / "out")]) == 0
    with Image.open(tmp_path / "out" / "png16.png") as drawn:
        assert np.asarray(drawn.convert("RGB")).mean() < 200


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGBA", "CMYK", "YCbCr", "I;16"])
def test_modes_follow_the_documented_table(mode: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    if mode == "I;16":
        values = rng.integers(0, 65536, (12, 10), dtype=np.uint16)
        image = Image.fromarray(values)  # mode I;16
        expected = np.repeat(np.floor(values / 257 + 0.5).astype(np.uint8)[:, :, None], 3, axis=2)
        path = tmp_path / "x.tif"
    else:
        image = rgb.convert(mode) if mode not in ("P", "PA") else rgb.convert("RGB").quantize(16)
        if mode == "PA":
            image = image.convert("PA")
        path = tmp_path / ("x.tif" if mode in ("CMYK", "YCbCr", "PA") else "x.png")
        expected = None
    if mode == "YCbCr":
        path = tmp_path / "x.jpg"
    image.save(path)
    got = read_image(path)
    with Image.open(path) as f:
        if expected is None:  # alpha dropped, colours as stored: Pillow's convert("RGB")
            expected = np.asarray(f.convert("RGB"))
    assert got.dtype == np.uint8 and got.shape == (12, 10, 3) and got.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(got, expected)
    if mode == "RGBA":
        np.testing.assert_array_equal(got, np.asarray(image)[:, :, :3])  # alpha dropped, not composited


def test_exif_on_16_bit_and_mpo_first_frame(tmp_path: Path) -> None:
    a = np.arange(6, dtype=np.uint16).reshape(2, 3) * 10000
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(a).save(tmp_path / "e16.png", exif=exif)
    expected = np.floor(np.rot90(a, -1) / 257 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(read_image(tmp_path / "e16.png")[:, :, 1], expected)
    photo = np.random.default_rng(4).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "p.jpg", format="MPO", save_all=True,
                                append_images=[Image.new("RGB", (16, 16), "white")])  # fmt: skip
    with Image.open(tmp_path / "p.jpg") as f:
        assert f.format == "MPO" and f.n_frames == 2
        first = np.asarray(f.convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "p.jpg"), first)


def test_normal_images_are_decoded_in_full_not_drafted(tmp_path: Path) -> None:
    """Exactness: a large JPEG is decoded at full resolution (no Image.draft), bit-identical to plain Pillow."""
    rng = np.random.default_rng(2)
    Image.fromarray(rng.integers(0, 256, (1600, 2400, 3), dtype=np.uint8)).save(tmp_path / "big.jpg", quality=90)
    with Image.open(tmp_path / "big.jpg") as f:
        ref = np.asarray(f.convert("RGB"))
    np.testing.assert_array_equal(read_image(tmp_path / "big.jpg"), ref)
    np.testing.assert_array_equal(read_image(tmp_path / "big.jpg", "BGR"), ref[:, :, ::-1])


def test_pillow_bomb_limit_is_replaced_by_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's limit (~179 MP) no longer refuses what ours allows; Pillow's global is left as it was."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 64x64 = 4096 > 2 * 100: Pillow alone would refuse
    noise_png(tmp_path / "n.png")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "n.png")
    assert read_image(tmp_path / "n.png").shape == (64, 64, 3)
    ims = [Image.fromarray(np.full((64, 64, 3), (40 * i, 0, 0), np.uint8)) for i in range(3)]
    ims[0].save(tmp_path / "one.gif")
    ims[0].save(tmp_path / "three.gif", save_all=True, append_images=ims[1:])  # frames are checked after open
    np.testing.assert_array_equal(read_image(tmp_path / "one.gif"), np.asarray(ims[0]))
    with pytest.raises(image_io.ImageError, match="3 frames"):
        read_image(tmp_path / "three.gif")
    assert Image.MAX_IMAGE_PIXELS == 100
    monkeypatch.setenv("FRCNN_MAX_IMAGE_SIDE", "64")
    assert image_io.probe_image(tmp_path / "n.png") == (64, 64)  # the limit is inclusive


def test_bytes_calibration_and_server_requests_decode_like_files(tmp_path: Path) -> None:
    """Every other image path reads through the one reader: 16-bit gray is round(v / 257), not white."""
    from frcnn.export.calibration import read_image as calibration_read
    from frcnn.runtime.serving.requests import RequestError
    from frcnn.runtime.serving.requests import decode_image as request_decode

    a = np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21
    Image.fromarray(a).save(tmp_path / "g16.png")
    expected = np.repeat(((a.astype(np.int64) * 2 + 257) // 514).astype(np.uint8)[:, :, None], 3, axis=2)
    data = (tmp_path / "g16.png").read_bytes()
    np.testing.assert_array_equal(image_io.decode_image(data), expected)
    np.testing.assert_array_equal(image_io.decode_image(data, "BGR"), expected[:, :, ::-1])
    np.testing.assert_array_equal(calibration_read(str(tmp_path / "g16.png")), expected)
    np.testing.assert_array_equal(request_decode(data), expected)
    with pytest.raises(image_io.ImageError, match="empty"):
        image_io.decode_image(b"")
    with pytest.raises(RequestError, match="not a readable image"):
        request_decode(b"GIF89a broken")
    Image.fromarray(np.zeros((2, 3), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(RequestError, match="mode 'F'"):
        request_decode((tmp_path / "f.tiff").read_bytes())
