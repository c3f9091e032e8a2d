"""Opt-in shape bucketing (frcnn.runtime.shape_buckets): the ladder, the padding, the Detector hook, and
exactness to the PyTorch model on the *padded* input (the only exactness bucketing keeps)."""

from __future__ import annotations

import numpy as np
import pytest
from frcnn.runtime.errors import UserError
from frcnn.runtime.shape_buckets import default_sides, pad_to_bucket, resolve_sides
from test_runtime import exported_small  # noqa: F401  (session fixture: the small exported model)


def test_default_ladder_for_detectron2_resize() -> None:
    # 1333 * k / 8 rounded up to 32 (k = 1..8) plus the short edge 800 (hand-computed).
    assert default_sides(800, 1333, 32) == (192, 352, 512, 672, 800, 864, 1024, 1184, 1344)
    assert default_sides(64, 128, 32) == (32, 64, 96, 128)


@pytest.mark.parametrize(("hw", "want"), [((800, 1088), (800, 1184)), ((768, 1344), (800, 1344)),
                                          ((800, 800), (800, 800)), ((96, 32), (192, 192))])
def test_pad_to_bucket_keeps_pixels_and_zero_fills(hw: tuple[int, int], want: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (2, 3, *hw), dtype=np.uint8)
    out = pad_to_bucket(images, default_sides(800, 1333, 32))
    assert out.shape == (2, 3, *want)
    np.testing.assert_array_equal(out[:, :, :hw[0], :hw[1]], images)
    assert int(out.sum(dtype=np.int64)) == int(images.sum(dtype=np.int64))  # everything else is zero
    if hw == want:
        assert out is images


def test_bad_bucket_settings_are_user_errors() -> None:
    assert resolve_sides(False, 800, 1333, 32) == ()
    assert resolve_sides([1344, 800, 800], 800, 1333, 32) == (800, 1344)
    with pytest.raises(UserError, match="positive multiples of 32"):
        resolve_sides([800, 1000, 1344], 800, 1333, 32)
    with pytest.raises(UserError, match="add 1344 to the list"):
        resolve_sides([800, 1088], 800, 1333, 32)
    with pytest.raises(UserError, match="True or a list of sides"):
        resolve_sides("big", 800, 1333, 32)
    with pytest.raises(UserError, match="larger than the largest shape bucket 1344"):
        pad_to_bucket(np.zeros((1, 3, 800, 1376), np.uint8), default_sides(800, 1333, 32))


def test_detector_pads_the_feed_and_keeps_sizes(tmp_path) -> None:
    """Stand-in detector of test_runtime (resize 64 / 128, min padded side 65 -> 96): with the ladder [128]
    every feed is 128 x 128; image_sizes and the boxes (a function of image_sizes only) are unchanged, while
    the mean-pixel scores see the extra zeros (the padded area is not neutral for every model)."""
    from frcnn.runtime import Detector
    from test_runtime import make_fake_detector

    path = make_fake_detector(tmp_path / "fake.onnx")
    plain = Detector(path, providers=["cpu"], intra_op_threads=1)
    bucketed = Detector(path, providers=["cpu"], intra_op_threads=1, shape_buckets=[128])
    assert Detector(path, providers=["cpu"], shape_buckets=True).shape_sides == (32, 64, 96, 128)
    image = np.full((50, 70, 3), 120, np.uint8)  # resized 64 x 90 -> padded 64 x 96 -> min side 96 x 96
    feed_a, _ = plain.preprocess([image])
    feed_b, _ = bucketed.preprocess([image])
    assert feed_a["images"].shape == (1, 3, 96, 96) and feed_b["images"].shape == (1, 3, 128, 128)
    np.testing.assert_array_equal(feed_a["image_sizes"], [[64, 90]])
    np.testing.assert_array_equal(feed_b["image_sizes"], feed_a["image_sizes"])
    np.testing.assert_array_equal(feed_b["images"][:, :, :96, :96], feed_a["images"])
    a, b = plain(image), bucketed(image)
    assert 0 < len(b) < len(a)  # lower scores: fewer pass the model's 0.05 threshold
    np.testing.assert_array_equal(b.boxes, a.boxes[:len(b)])
    assert b.scores[0] == pytest.approx(a.scores[0] * (96 * 96) / (128 * 128), rel=1e-5)
    with pytest.raises(UserError, match="positive multiples of 32"):
        Detector(path, providers=["cpu"], shape_buckets=[50, 128])


@pytest.mark.slow
def test_real_model_is_exact_to_pytorch_on_the_padded_input(exported_small) -> None:  # noqa: F811
    """Small R18 export (random lively weights): the bucketed ORT run equals the PyTorch model fed the same
    padded tensor (the parity tolerance of tests/test_runtime.py), i.e. bucketing keeps exactness only on the
    padded input."""
    import torch
    from frcnn.export.polygraphy_runners import compare_detections
    from frcnn.runtime import Detector
    from model_utils import random_images

    onnx_path, _cfg, model = exported_small
    det = Detector(onnx_path, providers=["cpu"], intra_op_threads=1, shape_buckets=[160, 320, 640, 1024])
    feed, _ = det.preprocess(random_images([(150, 200)], 11))
    assert feed["images"].shape[2:] == (320, 640)  # resized 320 x 427 -> 320 x 448 -> bucket 320 x 640
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in model(torch.from_numpy(feed["images"]),
                                               torch.from_numpy(feed["image_sizes"])).items()}
    report = compare_detections(ref, det.backend.infer(feed), min_iou=0.999, score_atol=1e-4)
    assert report and report.matched == int(ref["num_detections"].sum()) > 0, str(report)
