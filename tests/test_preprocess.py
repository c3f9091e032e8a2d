"""Pre/post-processing: detectron2 resize arithmetic, Pillow pixels, batching, postprocess, bad input."""

import subprocess
import sys

import numpy as np
import pytest
from frcnn.runtime.errors import UserError
from frcnn.runtime.postprocess import detector_postprocess, postprocess_batch, unpad
from frcnn.runtime.preprocess import (
    MAX_IMAGE_SIDE,
    Preprocessor,
    batch_images,
    resize_image,
    resize_shortest_edge_size,
    validate_image,
)
from PIL import Image


@pytest.mark.parametrize(
    "hw, expected",
    [
        ((480, 640), (800, 1067)),  # 640 * 800/480 = 1066.67
        ((640, 480), (1067, 800)),  # portrait
        ((500, 500), (800, 800)),
        ((1000, 4000), (333, 1333)),  # max-size branch: 800 * 1333/3200 = 333.25
        ((4000, 1000), (1333, 333)),
        ((600, 1000), (800, 1333)),  # 1333.33 > 1333: 800 * 1333/1333.33 = 799.8 -> 800
        ((1, 1), (800, 800)),
        ((10000, 10000), (800, 800)),
        ((427, 640), (800, 1199)),  # 640 * 800/427 = 1199.06
    ],
)
def test_resize_shortest_edge_size(hw, expected):
    assert resize_shortest_edge_size(hw[0], hw[1], 800, 1333) == expected


def test_resize_shortest_edge_no_resize():
    assert resize_shortest_edge_size(123, 45, 0, 1333) == (123, 45)


def _bilinear_half_pixel(img: np.ndarray, newh: int, neww: int) -> np.ndarray:
    """Independent float reference: half-pixel bilinear with edge clamping (upscaling only)."""

    def coords(n_out, n_in):
        x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        x = np.clip(x, 0, n_in - 1)
        x0 = np.floor(x).astype(int)
        x1 = np.minimum(x0 + 1, n_in - 1)
        return x0, x1, x - x0

    y0, y1, fy = coords(newh, img.shape[0])
    x0, x1, fx = coords(neww, img.shape[1])
    f = img.astype(np.float64)
    rows = f[y0] * (1 - fy)[:, None, None] + f[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


def test_resize_pixels_match_pillow_and_reference():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    out = resize_image(img, 40, 53)
    assert out.shape == (40, 53, 3) and out.dtype == np.uint8
    direct = np.asarray(Image.fromarray(img).resize((53, 40), Image.BILINEAR))
    np.testing.assert_array_equal(out, direct)
    # Pillow works in 8-bit fixed point with a rounded intermediate: within 1 of the float reference.
    ref = _bilinear_half_pixel(img, 40, 53)
    assert np.abs(out.astype(np.float64) - ref).max() <= 1.0 + 1e-9


def test_resize_downscale_is_antialiased_like_pillow():
    # A 1-pixel checkerboard downscaled 4x: Pillow's bilinear widens its support (antialias) -> ~uniform grey.
    img = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)[:, :, None].repeat(3, 2)
    out = resize_image(img, 16, 16)
    assert np.abs(out[2:-2, 2:-2].astype(int) - 128).max() <= 2


def test_batch_images_pads_to_multiple_of_32():
    a = np.full((800, 1067, 3), 7, np.uint8)
    b = np.full((333, 1333, 3), 9, np.uint8)
    b[0, 0] = (1, 2, 3)
    batch, sizes = batch_images([a, b])
    assert batch.shape == (2, 3, 800, 1344) and batch.dtype == np.uint8
    np.testing.assert_array_equal(sizes, [[800, 1067], [333, 1333]])
    assert sizes.dtype == np.int32
    assert (batch[0, :, :, :1067] == 7).all() and (batch[0, :, :, 1067:] == 0).all()
    assert (batch[1, :, 333:, :] == 0).all() and (batch[1, :, :333, 1333:] == 0).all()
    np.testing.assert_array_equal(batch[1, :, 0, 0], [1, 2, 3])  # HWC -> CHW keeps the channel order
    batch1, _ = batch_images([np.zeros((33, 1, 3), np.uint8)])
    assert batch1.shape == (1, 3, 64, 32)
    with pytest.raises(UserError, match="no images"):
        batch_images([])


def test_preprocessor_end_to_end():
    rng = np.random.default_rng(1)
    img1 = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    img2 = rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)
    pre = Preprocessor(short_edge=80, max_size=100)
    out = pre([img1, img2])
    np.testing.assert_array_equal(out["original_sizes"], [[48, 64], [64, 40]])
    np.testing.assert_array_equal(out["image_sizes"], [[75, 100], [100, 63]])  # 80*100/128 = 62.5 -> 63
    assert out["images"].shape == (2, 3, 128, 128)
    expect = np.asarray(Image.fromarray(img2).resize((63, 100), Image.BILINEAR)).transpose(2, 0, 1)
    np.testing.assert_array_equal(out["images"][1, :, :100, :63], expect)


def test_rgb_input_is_flipped_to_bgr():
    img = np.zeros((4, 5, 3), np.uint8)
    img[..., 0] = 10  # R
    img[..., 2] = 30  # B
    bgr = validate_image(img, "RGB")
    assert bgr.flags.c_contiguous
    np.testing.assert_array_equal(bgr[0, 0], [30, 0, 10])
    np.testing.assert_array_equal(validate_image(img, "BGR")[0, 0], [10, 0, 30])
    np.testing.assert_array_equal(validate_image(img, "RGB", model_format="RGB")[0, 0], [10, 0, 30])


def test_documented_conversions():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    out = validate_image(gray)
    assert out.shape == (3, 4, 3) and (out == gray[:, :, None]).all()
    assert validate_image(gray[:, :, None]).shape == (3, 4, 3)
    base = np.arange(2 * 6 * 3, dtype=np.uint8).reshape(2, 6, 3)
    strided = base[:, ::2]
    out = validate_image(strided)
    assert out.flags.c_contiguous and np.array_equal(out, strided)
    one = Preprocessor()([np.full((1, 1, 3), 200, np.uint8)])
    np.testing.assert_array_equal(one["image_sizes"], [[800, 800]])
    assert (one["images"][0] == 200).all()


def test_huge_image_is_resized():
    big = np.zeros((10000, 10000, 3), np.uint8)  # lazily allocated zeros
    big[5000:5100, 5000:5100] = 255
    out = Preprocessor()([big])
    np.testing.assert_array_equal(out["image_sizes"], [[800, 800]])
    assert out["images"].shape == (1, 3, 800, 800) and out["images"][0, :, 404, 404].tolist() == [255] * 3


@pytest.mark.parametrize(
    "img, pattern",
    [
        (np.zeros((4, 4, 3), np.float32), "dtype float32.*uint8"),
        (np.full((4, 4, 3), np.nan, np.float64), "dtype float64 and contains NaN"),
        (np.zeros((4, 4, 3), np.uint16), "dtype uint16"),
        (np.zeros((4, 4, 3), bool), "dtype bool"),
        (np.zeros((4, 4, 4), np.uint8), "3 channels.*alpha"),
        (np.zeros((4, 4, 2), np.uint8), r"3 channels.*\(4, 4, 2\)"),
        (np.zeros((3, 40, 50), np.uint8), "channels-first"),
        (np.zeros((1, 4, 4, 3), np.uint8), r"shape \(1, 4, 4, 3\)"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((4, 0), np.uint8), "empty"),
        (np.zeros((MAX_IMAGE_SIDE + 1, 1, 3), np.uint8), "larger than the supported"),
        ([[1, 2, 3]], "numpy array.*list"),
    ],
)
def test_bad_input_is_a_user_error(img, pattern):
    with pytest.raises(UserError, match=pattern):
        Preprocessor()([img])


def test_bad_arguments():
    with pytest.raises(UserError, match="input_format"):
        Preprocessor(input_format="RGBA")
    with pytest.raises(UserError, match="list of images"):
        Preprocessor()(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(UserError, match="aspect ratio"):
        Preprocessor()([np.zeros((1, 20000, 3), np.uint8)])  # 1 * 1333/20000 rounds to 0 rows


def test_detector_postprocess_hand_computed():
    boxes = np.array(
        [
            [10, 20, 110, 60],  # inside
            [-5, 790, 1100, 810],  # clipped on every side
            [1070, 5, 1080, 15],  # entirely right of the image: zero width after clipping -> dropped
            [30, 30, 30, 50],  # zero width -> dropped
        ],
        np.float32,
    )
    scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
    classes = np.array([1, 2, 3, 4], np.int32)
    b, s, c = detector_postprocess(boxes, scores, classes, (800, 1067), (480, 640))
    sx, sy = np.float32(640 / 1067), np.float32(480 / 800)
    expected = np.array(
        [
            [np.float32(10) * sx, np.float32(20) * sy, np.float32(110) * sx, np.float32(60) * sy],
            [0, np.float32(790) * sy, 640, 480],
        ],
        np.float32,
    )
    np.testing.assert_array_equal(b, expected)
    np.testing.assert_allclose(b[0], [5.9981256, 12, 65.9793814, 36], rtol=1e-6)
    np.testing.assert_array_equal(s, scores[:2])
    np.testing.assert_array_equal(c, [1, 2])
    assert b.dtype == np.float32 and c.dtype == np.int64


def test_unpad_and_postprocess_batch():
    outputs = {
        "num_detections": np.array([1, 0], np.int32),
        "boxes": np.array([[[0, 0, 8, 8], [0, 0, 0, 0]], [[0, 0, 0, 0]] * 2], np.float32),
        "scores": np.array([[0.5, 0], [0, 0]], np.float32),
        "classes": np.array([[3, -1], [-1, -1]], np.int32),
    }
    res = postprocess_batch(outputs, np.array([[16, 16], [16, 16]]), np.array([[32, 64], [8, 8]]))
    np.testing.assert_array_equal(res[0][0], [[0, 0, 32, 16]])
    np.testing.assert_array_equal(res[0][2], [3])
    assert res[1][0].shape == (0, 4) and res[1][1].shape == (0,)
    with pytest.raises(UserError, match="num_detections 3"):
        unpad(3, outputs["boxes"][0], outputs["scores"][0], outputs["classes"][0])


def test_runtime_processing_never_imports_torch():
    code = (
        "import sys, numpy as np\n"
        "import frcnn.runtime.preprocess as pre, frcnn.runtime.postprocess as post\n"
        "pre.Preprocessor()([np.zeros((10, 12, 3), np.uint8)])\n"
        "post.detector_postprocess(np.zeros((1, 4), np.float32), np.zeros(1), np.zeros(1), (8, 8), (4, 4))\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
