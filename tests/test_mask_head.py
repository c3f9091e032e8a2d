"""Mask R-CNN's mask branch: detectron2 checkpoint layout, init, head arithmetic and inference wiring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from frcnn.runtime.errors import CheckpointError
from frcnn.trainer.checkpoint import load_into_model
from frcnn.trainer.config import get_cfg, model_zoo_config
from frcnn.trainer.modeling import build_model
from frcnn.trainer.modeling.mask_head import mask_rcnn_inference
from model_utils import lively_model, random_images


def detectron2_mask_head_keys(num_conv: int = 4, conv_dim: int = 256, in_channels: int = 256,
                              num_classes: int = 80) -> dict[str, tuple[int, ...]]:
    """detectron2's MaskRCNNConvUpsampleHead state-dict keys by its naming rules: mask_fcn{k} (3x3 convs with
    bias, no norm), deconv (ConvTranspose2d weight [in, out, 2, 2]), predictor (1x1 conv to K)."""
    keys: dict[str, tuple[int, ...]] = {}
    channels = in_channels
    for k in range(1, num_conv + 1):
        keys[f"roi_heads.mask_head.mask_fcn{k}.weight"] = (conv_dim, channels, 3, 3)
        keys[f"roi_heads.mask_head.mask_fcn{k}.bias"] = (conv_dim,)
        channels = conv_dim
    keys["roi_heads.mask_head.deconv.weight"] = (channels, conv_dim, 2, 2)
    keys["roi_heads.mask_head.deconv.bias"] = (conv_dim,)
    keys["roi_heads.mask_head.predictor.weight"] = (num_classes, conv_dim, 1, 1)
    keys["roi_heads.mask_head.predictor.bias"] = (num_classes,)
    return keys


def _cfg(name: str, *overrides: str):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config(name))
    cfg.merge_from_list(list(overrides))
    return cfg


@pytest.fixture(scope="module")
def r50_mask_model():
    torch.manual_seed(0)
    return build_model(_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))


def test_mask_rcnn_r50_fpn_state_dict_equals_detectron2(r50_mask_model, d2_key_shapes: dict[str, tuple[int, ...]]) -> None:
    expected = dict(d2_key_shapes)
    mask_keys = detectron2_mask_head_keys()
    # The list, spelled out: the rules above must produce exactly these.
    assert mask_keys["roi_heads.mask_head.mask_fcn4.weight"] == (256, 256, 3, 3)
    assert mask_keys["roi_heads.mask_head.deconv.weight"] == (256, 256, 2, 2)
    assert mask_keys["roi_heads.mask_head.predictor.weight"] == (80, 256, 1, 1)
    assert len(mask_keys) == 12 and not set(mask_keys) & set(expected)
    got = {k: tuple(v.shape) for k, v in r50_mask_model.state_dict().items()}
    assert got == {**expected, **mask_keys}


def test_mask_head_init_is_detectron2s(r50_mask_model) -> None:
    head = r50_mask_model.roi_heads.mask_head
    for k in range(1, 5):  # c2_msra_fill: kaiming normal, fan_out = 256 * 3 * 3, relu gain; bias 0
        conv = getattr(head, f"mask_fcn{k}")
        assert abs(float(conv.weight.detach().std()) - math.sqrt(2 / (256 * 9))) < 0.003
        assert conv.bias.abs().sum() == 0 and conv.norm is None
    # ConvTranspose2d weight [in, out, 2, 2]: torch's fan_out is dim 0 * 4 (detectron2 calls the same init)
    assert abs(float(head.deconv.weight.detach().std()) - math.sqrt(2 / (256 * 4))) < 0.003
    assert head.deconv.bias.abs().sum() == 0
    assert abs(float(head.predictor.weight.detach().std()) - 0.001) < 1e-4 and head.predictor.bias.abs().sum() == 0
    assert [n for n, _ in head.named_children()] == [
        "mask_fcn1", "mask_fcn2", "mask_fcn3", "mask_fcn4", "deconv", "deconv_relu", "predictor"]
    pooler = r50_mask_model.roi_heads.mask_pooler
    assert (pooler.output_size, pooler.sampling_ratio, pooler.min_level, pooler.max_level) == (14, 0, 2, 5)
    assert r50_mask_model.roi_heads.mask_in_features == ["p2", "p3", "p4", "p5"]


def test_box_checkpoint_into_mask_config_names_the_mask_keys(r50_mask_model) -> None:
    state = {k: v for k, v in r50_mask_model.state_dict().items() if not k.startswith("roi_heads.mask_head.")}
    with pytest.raises(CheckpointError) as info:
        load_into_model(r50_mask_model, state, path="model_final_280758.pkl")
    text = str(info.value)
    assert "roi_heads.mask_head: 12 missing keys (mask_fcn1.weight" in text
    assert "no mask head (a Faster R-CNN checkpoint)" in text and "MODEL.MASK_ON False" in text
    assert text.count("\n") == 0  # one paragraph


def test_mask_checkpoint_into_box_config_suggests_mask_on(r50_mask_model) -> None:
    torch.manual_seed(0)
    box = build_model(_cfg("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"))
    with pytest.raises(CheckpointError, match=r"12 unexpected keys.*set MODEL.MASK_ON True"):
        load_into_model(box, r50_mask_model.state_dict(), path="mask.pkl")
    assert not hasattr(box.roi_heads, "mask_head")


def _head_reference(head, x: torch.Tensor) -> torch.Tensor:
    """The head as plain functional ops (detectron2's layer list)."""
    for k in range(1, 5):
        conv = getattr(head, f"mask_fcn{k}")
        x = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))
    x = F.relu(F.conv_transpose2d(x, head.deconv.weight, head.deconv.bias, stride=2))
    return F.conv2d(x, head.predictor.weight, head.predictor.bias)


def test_mask_head_forward_equals_functional_reference(r50_mask_model) -> None:
    head = r50_mask_model.roi_heads.mask_head
    torch.manual_seed(1)
    x = torch.randn(3, 256, 14, 14)
    with torch.no_grad():
        got, want = head(x), _head_reference(head, x)
    assert got.shape == (3, 80, 28, 28)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_mask_rcnn_inference_picks_the_class_channel() -> None:
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 4, 5, 5)
    classes = torch.tensor([[2, 0, -1], [3, -1, -1]], dtype=torch.int32)
    got = mask_rcnn_inference(logits, classes)
    assert got.shape == (2, 3, 5, 5)
    for b in range(2):
        for t in range(3):
            c = int(classes[b, t])
            want = torch.sigmoid(logits[b, t, c]) if c >= 0 else torch.zeros(5, 5)
            torch.testing.assert_close(got[b, t], want, rtol=0, atol=1e-7)  # sigmoid: 1 ulp
    agnostic = mask_rcnn_inference(logits[:, :, :1], classes)  # CLS_AGNOSTIC_MASK: channel 0
    torch.testing.assert_close(agnostic[1, 0], torch.sigmoid(logits[1, 0, 0]), rtol=0, atol=1e-7)


@pytest.fixture(scope="module")
def small_mask_model():
    cfg, model = lively_model("frcnn-small-R18.yaml", "MODEL.MASK_ON", "True", "MODEL.ROI_MASK_HEAD.CONV_DIM", "64")
    with torch.no_grad():
        model.roi_heads.mask_head.predictor.weight.normal_(std=0.05)  # probabilities away from 0.5
    return cfg, model


def test_model_masks_are_the_mask_head_on_the_final_detections(small_mask_model) -> None:
    from frcnn.plugins.roi_align_v2.torch_op import roi_align_v2

    _, model = small_mask_model
    shapes = [(160, 224), (128, 192)]
    imgs = random_images(shapes, 5)
    images = torch.zeros(2, 3, 160, 224, dtype=torch.uint8)
    for i, img in enumerate(imgs):
        images[i, :, : img.shape[0], : img.shape[1]] = torch.from_numpy(img).permute(2, 0, 1)
    sizes = torch.tensor(shapes, dtype=torch.int32)
    seen = {}
    hook = model.roi_heads.register_forward_pre_hook(lambda m, args: seen.update(features=args[0]))
    with torch.no_grad():
        out = model(images, sizes)
    hook.remove()
    features = seen["features"]
    masks, num = out["masks"], out["num_detections"]
    assert masks.shape == (2, 100, 28, 28) and masks.dtype == torch.float32
    assert int(num.min()) > 3, "the lively model must detect something in both images"
    head = model.roi_heads.mask_head
    feats = [features[f] for f in ("p2", "p3", "p4", "p5")]
    for b in range(2):
        n = int(num[b])
        assert masks[b, n:].abs().sum() == 0  # padding rows
        for t in (0, n // 2, n - 1):  # one detection at a time, alone in its batch
            box = out["boxes"][b, t].view(1, 1, 4)
            pooled = roi_align_v2(box, [f[b : b + 1] for f in feats], output_size=14, sampling_ratio=0,
                                  aligned=True, canonical_box_size=224.0, canonical_level=4, min_level=2)
            with torch.no_grad():
                logits = _head_reference(head, pooled[0])
            want = torch.sigmoid(logits[0, int(out["classes"][b, t])])
            torch.testing.assert_close(masks[b, t], want, rtol=0, atol=1e-5)
    assert 0.01 < float(masks[0, :n].std())  # not a constant


def test_predictor_returns_pasted_masks_in_original_pixels(small_mask_model) -> None:
    import numpy as np
    from frcnn.runtime.masks import paste_masks_in_image
    from frcnn.trainer import Predictor

    cfg, model = small_mask_model
    cfg = cfg.clone()
    cfg.merge_from_list(["INPUT.MIN_SIZE_TEST", "160"])
    predictor = Predictor(cfg)
    predictor.model.load_state_dict(model.state_dict())
    (image,) = random_images([(120, 168)], 7)  # resized to 160 x 224
    dets = predictor(image)
    masks, boxes = dets["masks"], dets["boxes"]
    n = len(boxes)
    assert n > 3 and masks.shape == (n, 120, 168) and masks.dtype == bool
    with torch.no_grad():
        raw = predictor.model(torch.from_numpy(predictor_input(image)), torch.tensor([[160, 224]], dtype=torch.int32))
    # Same rows as the boxes (nothing dropped for this image): paste of the raw probabilities on the final boxes.
    assert int(raw["num_detections"][0]) == n
    want = paste_masks_in_image(raw["masks"][0, :n].numpy(), boxes, (120, 168))
    assert np.array_equal(masks, want) and masks.any(axis=(1, 2)).sum() > 0
    ys, xs = np.mgrid[0:120, 0:168] + 0.5
    for k in range(n):  # a pixel is in a mask only if its centre is in the box (threshold 0.5 semantics)
        x0, y0, x1, y1 = boxes[k]
        inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
        assert not (masks[k] & ~inside).any()


def predictor_input(image):
    """The Predictor's own resize of a 120 x 168 image to 160 x 224 (uint8 [1, 3, 160, 224])."""
    from frcnn.runtime.preprocess import batch_images, resize_image

    batch, _ = batch_images([resize_image(image, 160, 224)])
    return batch
