"""Network after the backbone + build_model: detectron2 keys, anchors, box transform, proposal selection and
detection post-processing against independent NumPy references, and whole-model sanity/determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from frcnn.trainer.config import get_cfg, model_zoo_config
from frcnn.trainer.modeling import (
    Box2BoxTransform,
    DefaultAnchorGenerator,
    build_model,
    fast_rcnn_inference,
    find_top_rpn_proposals,
    generate_cell_anchors,
)
from frcnn.trainer.modeling.layers import FrozenBatchNorm2d

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# Independent NumPy references (detectron2 semantics, written from its source, one image at a time)
# ---------------------------------------------------------------------------------------------------------
def np_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of box a [4] with boxes b [N, 4], width = x2 - x1; 0 where the union is 0."""
    iw = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def np_batched_nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, thresh: float) -> list[int]:
    """Greedy NMS per group; order by score descending (ties: lower index first); suppress IoU > thresh."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    for i in order:
        same = [k for k in keep if groups[k] == groups[i]]
        if same and (np_iou(boxes[i].astype(np.float64), boxes[same].astype(np.float64)) > thresh).any():
            continue
        keep.append(int(i))
    return keep


def np_apply_deltas(deltas: np.ndarray, boxes: np.ndarray, weights) -> np.ndarray:
    """Box2BoxTransform.apply_deltas for deltas [N, 4*k], boxes [N, 4], float32 throughout."""
    deltas = deltas.astype(np.float32)
    boxes = boxes.astype(np.float32)
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    cx = boxes[:, 0] + np.float32(0.5) * w
    cy = boxes[:, 1] + np.float32(0.5) * h
    wx, wy, ww, wh = (np.float32(v) for v in weights)
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = np.minimum(deltas[:, 2::4] / ww, np.float32(math.log(1000.0 / 16)))
    dh = np.minimum(deltas[:, 3::4] / wh, np.float32(math.log(1000.0 / 16)))
    pcx, pcy = dx * w[:, None] + cx[:, None], dy * h[:, None] + cy[:, None]
    pw, ph = np.exp(dw) * w[:, None], np.exp(dh) * h[:, None]
    out = np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=-1)
    return out.reshape(deltas.shape).astype(np.float32)


def np_clip(boxes: np.ndarray, h: float, w: float) -> np.ndarray:
    out = boxes.copy()
    out[..., 0::2] = np.clip(out[..., 0::2], 0, w)
    out[..., 1::2] = np.clip(out[..., 1::2], 0, h)
    return out


def np_rpn_proposals(anchors, logits, deltas, hw, pre_topk, post_topk, nms_thresh):
    """detectron2 find_top_rpn_proposals for ONE image: anchors[l] [N_l,4], logits[l] [N_l], deltas[l] [N_l,4]."""
    boxes, scores, levels = [], [], []
    for lvl, (a, s, d) in enumerate(zip(anchors, logits, deltas)):
        decoded = np_apply_deltas(d, a, (1, 1, 1, 1))
        k = min(pre_topk, len(s))
        idx = np.argsort(-np.where(np.isnan(s), np.inf, s), kind="stable")[:k]  # torch.topk ranks NaN first
        boxes.append(decoded[idx])
        scores.append(s[idx])
        levels.append(np.full(k, lvl))
    boxes, scores, levels = np.concatenate(boxes), np.concatenate(scores), np.concatenate(levels)
    finite = np.isfinite(boxes).all(1) & np.isfinite(scores)
    boxes, scores, levels = boxes[finite], scores[finite], levels[finite]
    boxes = np_clip(boxes, *hw)
    nonempty = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
    boxes, scores, levels = boxes[nonempty], scores[nonempty], levels[nonempty]
    keep = np_batched_nms(boxes, scores, levels, nms_thresh)[:post_topk]
    return boxes[keep], scores[keep]


def np_fast_rcnn_single(boxes, probs, hw, score_thresh, nms_thresh, topk):
    """detectron2 fast_rcnn_inference_single_image: boxes [R, K*4] decoded, probs [R, K+1]."""
    valid = np.isfinite(boxes).all(1) & np.isfinite(probs).all(1)
    boxes, probs = boxes[valid], probs[valid]
    scores = probs[:, :-1]
    num_classes = scores.shape[1]
    boxes = np_clip(boxes.reshape(-1, num_classes, 4), *hw)
    r_idx, c_idx = np.nonzero(scores > score_thresh)  # row-major order, like torch nonzero()
    cand_boxes, cand_scores = boxes[r_idx, c_idx], scores[r_idx, c_idx]
    keep = np_batched_nms(cand_boxes, cand_scores, c_idx, nms_thresh)[:topk]
    return cand_boxes[keep], cand_scores[keep], c_idx[keep]


# ---------------------------------------------------------------------------------------------------------
# Configs and model builders
# ---------------------------------------------------------------------------------------------------------
def _cfg(name: str):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config(name))
    return cfg


def _calibrate_frozen_bn(model, images: torch.Tensor, image_sizes: torch.Tensor) -> None:
    """Set every FrozenBN's statistics to its input's batch statistics (unit-scale activations, as with
    trained weights), in one forward pass: each pre-hook runs before its own layer."""

    def set_stats(module, inputs):
        module.running_mean.copy_(inputs[0].mean((0, 2, 3)))
        module.running_var.copy_(inputs[0].var((0, 2, 3)))

    hooks = [
        m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)
    ]
    assert len(hooks) > 10
    with torch.no_grad():
        model.backbone(model.preprocess(images, image_sizes))
    for h in hooks:
        h.remove()


@pytest.fixture(scope="module")
def small_model():
    """frcnn-small-R18 with random weights and calibrated FrozenBN; heads re-initialised wider so that
    scores and proposals spread out."""
    torch.manual_seed(0)
    cfg = _cfg("frcnn-small-R18.yaml")
    cfg.merge_from_list(["MODEL.RESNETS.NORM", "FrozenBN"])  # calibrated below, like a pretrained model
    model = build_model(cfg).eval()
    _calibrate_frozen_bn(model, *_images([(224, 288)], (224, 288), 99))
    with torch.no_grad():
        model.proposal_generator.rpn_head.objectness_logits.weight.normal_(std=0.3)
        model.roi_heads.box_predictor.cls_score.weight.normal_(std=0.3)
        model.roi_heads.box_predictor.bbox_pred.weight.normal_(std=0.05)
    return model


# ---------------------------------------------------------------------------------------------------------
# build_model: detectron2 checkpoint layout
# ---------------------------------------------------------------------------------------------------------
def test_r50_fpn_state_dict_equals_detectron2(d2_key_shapes: dict[str, tuple[int, ...]]) -> None:
    expected = d2_key_shapes
    torch.manual_seed(0)
    model = build_model(_cfg("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(expected) == 295
    assert got == expected
    assert model.training  # like detectron2: the caller switches to eval
    # Non-persistent: present on the module, absent from the checkpoint.
    assert torch.equal(model.pixel_mean.flatten(), torch.tensor([103.53, 116.28, 123.675]))
    head = model.roi_heads.box_predictor
    assert (
        head.cls_score.bias.abs().sum() == 0
        and abs(float(head.cls_score.weight.detach().std()) - 0.01) < 1e-3
    )
    assert abs(float(head.bbox_pred.weight.detach().std()) - 0.001) < 1e-4


# ---------------------------------------------------------------------------------------------------------
# Anchors
# ---------------------------------------------------------------------------------------------------------
WALKTHROUGH_CELL_ANCHORS = {  # printed in the seed walkthrough (x1, y1, x2, y2), P2 .. P6
    32: [[-22.6274, -11.3137, 22.6274, 11.3137], [-16, -16, 16, 16], [-11.3137, -22.6274, 11.3137, 22.6274]],
    64: [[-45.2548, -22.6274, 45.2548, 22.6274], [-32, -32, 32, 32], [-22.6274, -45.2548, 22.6274, 45.2548]],
    128: [[-90.5097, -45.2548, 90.5097, 45.2548], [-64, -64, 64, 64], [-45.2548, -90.5097, 45.2548, 90.5097]],
    256: [
        [-181.0193, -90.5097, 181.0193, 90.5097],
        [-128, -128, 128, 128],
        [-90.5097, -181.0193, 90.5097, 181.0193],
    ],
    512: [
        [-362.0387, -181.0193, 362.0387, 181.0193],
        [-256, -256, 256, 256],
        [-181.0193, -362.0387, 181.0193, 362.0387],
    ],
}


def _r50_anchor_generator() -> DefaultAnchorGenerator:
    cfg = _cfg("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml")
    from frcnn.trainer.modeling.layers import ShapeSpec

    return DefaultAnchorGenerator(
        **DefaultAnchorGenerator.from_config(
            cfg, [ShapeSpec(channels=256, stride=s) for s in (4, 8, 16, 32, 64)]
        )
    )


def test_cell_anchors_equal_walkthrough() -> None:
    gen = _r50_anchor_generator()
    assert gen.num_cell_anchors == [3] * 5
    for cell, size in zip(gen.cell_anchors, (32, 64, 128, 256, 512)):
        np.testing.assert_allclose(cell.numpy(), np.array(WALKTHROUGH_CELL_ANCHORS[size]), atol=6e-5)
    assert gen.state_dict() == {}  # no checkpoint keys


def test_grid_anchors_count_and_order() -> None:
    gen = _r50_anchor_generator()
    shapes = [(200, 320), (100, 160), (50, 80), (25, 40), (13, 20)]  # 800x1280 input
    feats = [torch.zeros(1, 1, h, w) for h, w in shapes]
    anchors = gen(feats)
    assert sum(a.shape[0] for a in anchors) == 255780
    # P6 (stride 64): anchor a at grid (y, x) has index (y*W + x)*A + a and centre (64x, 64y).
    p6, cell = anchors[4], gen.cell_anchors[4]
    for y, x, a in [(0, 0, 0), (5, 5, 1), (12, 19, 2), (3, 17, 0)]:
        shift = torch.tensor([64.0 * x, 64.0 * y, 64.0 * x, 64.0 * y])
        assert torch.equal(p6[(y * 20 + x) * 3 + a], cell[a] + shift)
    # offset 0.5 moves every centre by half a stride
    half = DefaultAnchorGenerator(sizes=[[32]], aspect_ratios=[[1.0]], strides=[4], offset=0.5)
    assert half([torch.zeros(1, 1, 2, 3)])[0][4].tolist() == [6 - 16, 6 - 16, 6 + 16, 6 + 16]


def test_generate_cell_anchors_formula() -> None:
    got = generate_cell_anchors([100], [0.25])  # area 1e4, w = sqrt(4e4) = 200, h = 50
    assert got.tolist() == [[-100.0, -25.0, 100.0, 25.0]]


# ---------------------------------------------------------------------------------------------------------
# Box2BoxTransform
# ---------------------------------------------------------------------------------------------------------
def test_box2box_hand_computed_and_round_trip() -> None:
    t = Box2BoxTransform((10.0, 10.0, 5.0, 5.0))
    src = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), w 10, h 20
    tgt = torch.tensor([[2.0, 4.0, 22.0, 24.0]])  # centre (12, 14), w 20, h 20
    deltas = t.get_deltas(src, tgt)
    expected = [10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2.0), 5 * math.log(1.0)]
    np.testing.assert_allclose(deltas[0].numpy(), expected, rtol=1e-6)
    assert torch.allclose(t.apply_deltas(deltas, src), tgt, atol=1e-5)

    g = torch.Generator().manual_seed(0)
    xy = torch.rand(64, 2, generator=g) * 500
    src = torch.cat([xy, xy + 1 + torch.rand(64, 2, generator=g) * 300], dim=1)
    xy = torch.rand(64, 2, generator=g) * 500
    tgt = torch.cat([xy, xy + 1 + torch.rand(64, 2, generator=g) * 300], dim=1)
    for weights in [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]:
        t = Box2BoxTransform(weights)
        assert torch.allclose(t.apply_deltas(t.get_deltas(src, tgt), src), tgt, atol=1e-3)
    with pytest.raises(ValueError, match="positive width"):
        t.get_deltas(torch.tensor([[0.0, 0.0, 0.0, 5.0]]), tgt[:1])


def test_box2box_clamps_dw_dh_and_matches_numpy() -> None:
    t = Box2BoxTransform((1.0, 1.0, 1.0, 1.0))
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    huge = t.apply_deltas(torch.tensor([[0.0, 0.0, 100.0, 100.0]]), box)
    # exp(clamp(100, log(1000/16))) * 16 = 1000, centred on (8, 8)
    np.testing.assert_allclose(huge[0].numpy(), [8 - 500, 8 - 500, 8 + 500, 8 + 500], rtol=1e-5)
    g = torch.Generator().manual_seed(1)
    deltas = torch.randn(50, 12, generator=g) * 2
    xy = torch.rand(50, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + torch.rand(50, 2, generator=g) * 50], dim=1)
    w = (10.0, 10.0, 5.0, 5.0)
    got = Box2BoxTransform(w).apply_deltas(deltas, boxes)
    assert got.shape == (50, 12)
    np.testing.assert_allclose(
        got.numpy(), np_apply_deltas(deltas.numpy(), boxes.numpy(), w), rtol=1e-6, atol=1e-4
    )


# ---------------------------------------------------------------------------------------------------------
# RPN proposal selection vs NumPy (detectron2 find_top_rpn_proposals)
# ---------------------------------------------------------------------------------------------------------
def test_rpn_proposals_equal_numpy_reference() -> None:
    gen = DefaultAnchorGenerator(
        sizes=[[32], [64], [128]], aspect_ratios=[[0.5, 1.0, 2.0]], strides=[8, 16, 32]
    )
    shapes = [(12, 16), (6, 8), (3, 4)]  # canvas 96 x 128
    anchors = gen([torch.zeros(1, 1, h, w) for h, w in shapes])
    g = torch.Generator().manual_seed(3)
    batch = 2
    logits = [torch.randn(batch, a.shape[0], generator=g) * 3 for a in anchors]
    deltas = [torch.randn(batch, a.shape[0], 4, generator=g) * 0.4 for a in anchors]
    logits[0][1, 5] = float("nan")  # detectron2 drops non-finite candidates
    logits[1][0, 7] = 20.0
    deltas[1][0, 7, 0] = float("inf")
    image_sizes = torch.tensor([[96, 128], [61, 77]], dtype=torch.int32)
    pre, post, thresh = 60, 40, 0.7
    props, scores, num = find_top_rpn_proposals(
        anchors, logits, deltas, image_sizes, Box2BoxTransform((1.0, 1.0, 1.0, 1.0)), thresh, pre, post, 0.0
    )
    assert props.shape == (batch, post, 4) and num.dtype == torch.int32
    for b in range(batch):
        ref_boxes, ref_scores = np_rpn_proposals(
            [a.numpy() for a in anchors],
            [x[b].numpy() for x in logits],
            [x[b].numpy() for x in deltas],
            tuple(image_sizes[b].tolist()),
            pre,
            post,
            thresh,
        )
        n = int(num[b])
        assert n == len(ref_boxes) and n > 10
        np.testing.assert_array_equal(scores[b, :n].numpy(), ref_scores)
        np.testing.assert_allclose(props[b, :n].numpy(), ref_boxes, rtol=1e-6, atol=1e-4)
        assert (props[b, n:] == 0).all() and torch.isinf(scores[b, n:]).all()
        h, w = image_sizes[b].tolist()
        assert (props[b, :n, 2] <= w).all() and (props[b, :n, 3] <= h).all()

    # Few candidates: post_nms_topk larger than what survives -> zero padding, num < post.
    props, _, num = find_top_rpn_proposals(
        anchors, logits, deltas, image_sizes, Box2BoxTransform((1.0, 1.0, 1.0, 1.0)), 0.0, 2, 100, 0.0
    )
    assert (num <= 6).all() and (props[:, 6:] == 0).all()


# ---------------------------------------------------------------------------------------------------------
# Box head post-processing vs NumPy (detectron2 fast_rcnn_inference_single_image)
# ---------------------------------------------------------------------------------------------------------
def test_fast_rcnn_inference_equals_numpy_reference() -> None:
    g = torch.Generator().manual_seed(5)
    batch, rows, k = 2, 40, 4
    xy = torch.rand(batch, rows, k, 2, generator=g) * 80
    boxes = torch.cat([xy, xy + torch.rand(batch, rows, k, 2, generator=g) * 40], dim=-1)
    boxes = boxes - 10  # some outside the image: clipped
    probs = torch.softmax(torch.randn(batch, rows, k + 1, generator=g) * 2, dim=-1)
    probs[0, 3, 1] = float("nan")  # a non-finite row is dropped entirely
    num_props = torch.tensor([rows, 25], dtype=torch.int32)  # rows >= 25 of image 1 are padding
    image_sizes = torch.tensor([[90, 100], [70, 60]], dtype=torch.int32)
    out = fast_rcnn_inference(boxes, probs, num_props, image_sizes, 0.05, 0.5, 30)
    for b in range(batch):
        n_rows = int(num_props[b])
        ref = np_fast_rcnn_single(
            boxes[b, :n_rows].reshape(n_rows, -1).numpy(),
            probs[b, :n_rows].numpy(),
            tuple(image_sizes[b].tolist()),
            0.05,
            0.5,
            30,
        )
        n = int(out["num_detections"][b])
        assert n == len(ref[0]) and n > 5
        np.testing.assert_array_equal(out["boxes"][b, :n].numpy(), ref[0])
        np.testing.assert_array_equal(out["scores"][b, :n].numpy(), ref[1])
        np.testing.assert_array_equal(out["classes"][b, :n].numpy(), ref[2])
        assert (out["boxes"][b, n:] == 0).all() and (out["scores"][b, n:] == 0).all()
        assert (out["classes"][b, n:] == -1).all()


# ---------------------------------------------------------------------------------------------------------
# Whole model
# ---------------------------------------------------------------------------------------------------------
def _images(sizes, canvas, seed):
    """uint8 canvas [B, 3, H, W] with random pixels everywhere (also in the padded area)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (len(sizes), 3, *canvas), generator=g, dtype=torch.uint8)
    return images, torch.tensor(sizes, dtype=torch.int32)


def test_preprocess_pads_and_zeroes_after_normalization(small_model) -> None:
    images, sizes = _images([(50, 70), (64, 33)], (64, 70), 0)
    x = small_model.preprocess(images, sizes)
    assert x.shape == (2, 3, 64, 96)
    mean = small_model.pixel_mean
    assert torch.equal(x[0, :, :50, :70], images[0, :, :50, :70].float() - mean)
    assert (x[0, :, 50:] == 0).all() and (x[0, :, :, 70:] == 0).all() and (x[1, :, :, 33:] == 0).all()


def test_model_forward_sanity_and_determinism(small_model) -> None:
    images, sizes = _images([(224, 300)], (224, 300), 1)
    with torch.no_grad():
        out = small_model(images, sizes)
        again = small_model(images, sizes)
    for key in ("num_detections", "boxes", "scores", "classes"):
        assert torch.equal(out[key], again[key]), key
    assert out["boxes"].shape == (1, 100, 4) and out["boxes"].dtype == torch.float32
    assert out["num_detections"].dtype == torch.int32 and out["classes"].dtype == torch.int32
    n = int(out["num_detections"][0])
    assert 0 < n <= 100
    boxes, scores, classes = out["boxes"][0, :n], out["scores"][0, :n], out["classes"][0, :n]
    assert (boxes[:, 0::2] >= 0).all() and (boxes[:, 0::2] <= 300).all()
    assert (boxes[:, 1::2] >= 0).all() and (boxes[:, 1::2] <= 224).all()
    assert (scores > 0.05).all() and (scores <= 1).all() and (scores[:-1] >= scores[1:]).all()
    assert ((classes >= 0) & (classes < 3)).all()
    assert (out["classes"][0, n:] == -1).all() and (out["scores"][0, n:] == 0).all()


def test_batch_equals_single_images(small_model) -> None:
    """Both images pad to the same 224 x 288 canvas alone and in the batch, so results must agree."""
    images, sizes = _images([(224, 288), (200, 260)], (224, 288), 2)
    with torch.no_grad():
        batched = small_model.inference(images, sizes, return_proposals=True)
    for b, (h, w) in enumerate(sizes.tolist()):
        with torch.no_grad():
            alone = small_model.inference(
                images[b : b + 1, :, :h, :w], sizes[b : b + 1], return_proposals=True
            )
        n = int(alone["num_detections"][0])
        assert n > 0 and int(batched["num_detections"][b]) == n
        assert int(batched["num_proposals"][b]) == int(alone["num_proposals"][0])
        torch.testing.assert_close(batched["proposals"][b], alone["proposals"][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(batched["boxes"][b], alone["boxes"][0], atol=1e-4, rtol=0)
        torch.testing.assert_close(batched["scores"][b], alone["scores"][0], atol=1e-4, rtol=0)
        assert torch.equal(batched["classes"][b], alone["classes"][0])
