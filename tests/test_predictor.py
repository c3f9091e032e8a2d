"""Predictor: detectron2 DefaultPredictor behaviour on R50-FPN (issue 2 acceptance) and checkpoint loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from frcnn.runtime.errors import UserError
from frcnn.trainer import Predictor
from frcnn.trainer.checkpoint import save_checkpoint
from model_utils import lively_model, random_images


@pytest.fixture(scope="module")
def r50_predictor():
    cfg, model = lively_model("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml", calib_hw=(256, 320))
    predictor = Predictor(cfg)
    predictor.model.load_state_dict(model.state_dict())
    return predictor


def test_r50_fpn_on_480x640_is_sane_and_deterministic(r50_predictor: Predictor) -> None:
    (image,) = random_images([(480, 640)], seed=5)
    torch.set_num_threads(2)
    first = r50_predictor(image)
    second = r50_predictor(image)
    n = len(first["scores"])
    assert 0 < n <= 100, n
    boxes = first["boxes"]
    assert boxes.dtype == np.float32 and boxes.shape == (n, 4)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 640).all() and (boxes[:, 3] <= 480).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert ((first["scores"] > 0.05) & (first["scores"] <= 1.0)).all()
    assert ((first["classes"] >= 0) & (first["classes"] < 80)).all()
    for key in ("boxes", "scores", "classes"):
        assert np.array_equal(first[key], second[key]), key  # bit-identical


def test_predictor_scales_boxes_back_to_the_original_image(r50_predictor: Predictor) -> None:
    # The model sees the 800x1067 resize; detections come back in 480x640 pixels: running the model by hand
    # on the resized image and scaling by 640/1067, 480/800 gives the same boxes.
    from frcnn.runtime.preprocess import batch_images, resize_image

    (image,) = random_images([(480, 640)], seed=5)
    resized = resize_image(image, 800, 1067)
    batch, sizes = batch_images([resized])
    with torch.inference_mode():
        out = r50_predictor.model(torch.from_numpy(batch), torch.from_numpy(sizes))
    n = int(out["num_detections"][0])
    raw = out["boxes"][0, :n].numpy()
    got = r50_predictor(image)
    keep = (raw[:, 2] > raw[:, 0]) & (raw[:, 3] > raw[:, 1])
    expect = raw[keep] * np.array([640 / 1067, 480 / 800, 640 / 1067, 480 / 800], dtype=np.float32)
    np.testing.assert_allclose(got["boxes"], np.minimum(expect, [640, 480, 640, 480]), rtol=0, atol=1e-3)


def test_predictor_loads_a_saved_checkpoint(tmp_path) -> None:
    cfg, model = lively_model()
    path = tmp_path / "model.pth"
    save_checkpoint(path, model)
    predictor = Predictor(cfg, path)
    (image,) = random_images([(200, 260)], seed=1)
    ours = predictor(image)
    reference = Predictor(cfg)
    reference.model.load_state_dict(model.state_dict())
    theirs = reference(image)
    assert len(ours["scores"]) > 0
    for key in ours:
        assert np.array_equal(ours[key], theirs[key])


def test_predictor_rejects_bad_images(r50_predictor: Predictor) -> None:
    with pytest.raises(UserError, match="uint8"):
        r50_predictor(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(UserError):
        r50_predictor(np.zeros((0, 10, 3), np.uint8))
