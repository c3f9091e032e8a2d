"""frcnn::roi_align_v2 (torch face) against ONNX Runtime's RoiAlign, a NumPy loop reference and hand cases."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from frcnn.plugins.roi_align_v2.torch_op import assign_box_levels, roi_align_v2
from onnx import TensorProto, helper

LEVELS = (2, 3, 4, 5)


def _features(batch: int, channels: int, height: int, width: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, channels, math.ceil(height / 2**lv), math.ceil(width / 2**lv), generator=g).to(
            dtype
        )
        for lv in LEVELS
    ]


def _boxes(batch: int, num: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Boxes of every level (sqrt(area) 8 .. 700 px), some partly or fully outside the image."""
    g = torch.Generator().manual_seed(seed)
    size = torch.exp(torch.empty(batch, num).uniform_(math.log(8), math.log(700), generator=g))
    ratio = torch.exp(torch.empty(batch, num).uniform_(-1.0, 1.0, generator=g))
    w, h = size * ratio.sqrt(), size / ratio.sqrt()
    cx = torch.rand(batch, num, generator=g) * (width + 200) - 100
    cy = torch.rand(batch, num, generator=g) * (height + 200) - 100
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def _ort_roi_align(
    feature: np.ndarray, rois: np.ndarray, batch_index: np.ndarray, scale: float
) -> np.ndarray:
    """ONNX Runtime's standard RoiAlign-16 (half_pixel = ROIAlignV2's aligned=True, avg, adaptive sampling)."""
    node = helper.make_node(
        "RoiAlign",
        ["X", "rois", "batch_indices"],
        ["Y"],
        coordinate_transformation_mode="half_pixel",
        mode="avg",
        output_height=7,
        output_width=7,
        sampling_ratio=0,
        spatial_scale=scale,
    )
    graph = helper.make_graph(
        [node],
        "roi_align",
        [
            helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", "c", "h", "w"]),
            helper.make_tensor_value_info("rois", TensorProto.FLOAT, ["r", 4]),
            helper.make_tensor_value_info("batch_indices", TensorProto.INT64, ["r"]),
        ],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["r", "c", 7, 7])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": feature, "rois": rois, "batch_indices": batch_index})[0]


def _numpy_roi_align(feature: np.ndarray, box: np.ndarray, scale: float, out: int, ratio: int, aligned: bool):
    """detectron2 ROIAlign (CPU kernel, T = float) of one box on one [C, H, W] map, written with plain loops."""
    f32 = np.float32
    c, height, width = feature.shape
    offset = f32(0.5 if aligned else 0.0)
    x1, y1, x2, y2 = (f32(v) * f32(scale) - offset for v in box)
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = max(roi_w, f32(1.0)), max(roi_h, f32(1.0))
    bin_w, bin_h = roi_w / f32(out), roi_h / f32(out)
    grid_h = ratio if ratio > 0 else int(np.ceil(roi_h / f32(out)))
    grid_w = ratio if ratio > 0 else int(np.ceil(roi_w / f32(out)))
    count = max(grid_h * grid_w, 1)

    def bilinear(y: np.float32, x: np.float32) -> np.ndarray:
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return np.zeros(c)
        y, x = max(y, f32(0.0)), max(x, f32(0.0))
        y_low, x_low = int(y), int(x)
        if y_low >= height - 1:
            y_low = y_high = height - 1
            y = f32(y_low)
        else:
            y_high = y_low + 1
        if x_low >= width - 1:
            x_low = x_high = width - 1
            x = f32(x_low)
        else:
            x_high = x_low + 1
        ly, lx = y - f32(y_low), x - f32(x_low)
        hy, hx = f32(1.0) - ly, f32(1.0) - lx
        return (
            hy * hx * feature[:, y_low, x_low]
            + hy * lx * feature[:, y_low, x_high]
            + ly * hx * feature[:, y_high, x_low]
            + ly * lx * feature[:, y_high, x_high]
        )

    result = np.zeros((c, out, out))
    for ph in range(out):
        for pw in range(out):
            acc = np.zeros(c)
            for iy in range(grid_h):
                y = y1 + f32(ph) * bin_h + f32(iy + 0.5) * bin_h / f32(grid_h)
                for ix in range(grid_w):
                    acc += bilinear(y, x1 + f32(pw) * bin_w + f32(ix + 0.5) * bin_w / f32(grid_w))
            result[:, ph, pw] = acc / count
    return result


def test_matches_onnxruntime_roialign_per_level():
    feats = _features(2, 8, 320, 416)
    rois = _boxes(2, 60, 320, 416)
    rois[0, :4] = torch.tensor([[0, 0, 0, 0], [50, 50, 50, 80], [90, 90, 80, 70], [-300, -300, -200, -250]])
    out = roi_align_v2(rois, feats)
    assert out.shape == (2, 60, 8, 7, 7) and out.dtype == torch.float32
    level = assign_box_levels(rois, 2, 5).view(-1)
    flat_rois, flat_out = rois.view(-1, 4), out.view(120, 8, 7, 7)
    batch_index = torch.arange(2).repeat_interleave(60)
    for lv in range(4):
        sel = level == lv
        assert sel.sum() >= 3, "test boxes must cover every level"
        ref = _ort_roi_align(
            feats[lv].numpy(), flat_rois[sel].numpy(), batch_index[sel].numpy(), 2.0 ** -LEVELS[lv]
        )
        np.testing.assert_allclose(flat_out[sel].numpy(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ratio,aligned", [(0, True), (2, True), (0, False)])
def test_matches_numpy_reference(ratio: int, aligned: bool):
    feats = _features(2, 3, 256, 288, seed=1)
    rois = _boxes(2, 10, 256, 288, seed=2)
    degenerate = [
        [10, 10, 10, 40],
        [30, 30, 20, 60],
        [20, 20, 19, 19],
        [-90, -50, -40, -20],
        [250, 5, 600, 400],
    ]
    rois[1, :5] = torch.tensor(degenerate, dtype=torch.float32)
    out = roi_align_v2(rois, feats, sampling_ratio=ratio, aligned=aligned).double().numpy()
    level = assign_box_levels(rois, 2, 5)
    for b in range(2):
        for r in range(10):
            lv = int(level[b, r])
            ref = _numpy_roi_align(
                feats[lv][b].double().numpy(), rois[b, r].numpy(), 2.0 ** -LEVELS[lv], 7, ratio, aligned
            )
            np.testing.assert_allclose(out[b, r], ref, rtol=0, atol=1e-5, err_msg=f"box {b},{r} level {lv}")


def test_level_assignment_hand_computed():
    # sqrt(area) -> floor(4 + log2(s / 224 + 1e-8)) clamped to [2, 5], minus 2.
    expected = {8: 0, 111: 0, 112: 1, 150: 1, 223: 1, 224: 2, 300: 2, 447: 2, 448: 3, 449: 3, 5000: 3}
    boxes = torch.tensor([[10.0, 20.0, 10.0 + s, 20.0 + s] for s in expected])
    assert assign_box_levels(boxes, 2, 5).tolist() == list(expected.values())
    # Non-square boxes of area 112^2 / 224^2 / 448^2, zero / negative area -> min level.
    other = torch.tensor(
        [
            [0, 0, 56, 224],
            [0, 0, 896, 56],
            [0, 0, 112, 1792],
            [5, 5, 5, 50],
            [10, 10, 0, 50],
            [0.0, 0.0, 1.0, 1.0],
        ]
    )
    assert assign_box_levels(other, 2, 5).tolist() == [1, 2, 3, 0, 0, 0]
    assert assign_box_levels(other, 3, 4, 224.0, 4).tolist() == [0, 1, 1, 0, 0, 0]
    assert assign_box_levels(boxes.view(1, -1, 4), 2, 5).shape == (1, len(expected))


def test_fp16_features():
    feats = _features(1, 16, 256, 320, seed=3)
    rois = _boxes(1, 40, 256, 320, seed=4)
    ref = roi_align_v2(rois, [f.half().float() for f in feats])
    out = roi_align_v2(rois, [f.half() for f in feats])
    assert out.dtype == torch.float16 and out.shape == ref.shape
    scale = ref.abs().max().item()
    assert (out.float() - ref).abs().max().item() <= 1e-2 * scale
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-3 * scale)


def test_zero_rois_and_empty_boxes():
    feats = _features(2, 4, 64, 64)
    out = roi_align_v2(torch.zeros(2, 0, 4), feats)
    assert out.shape == (2, 0, 4, 7, 7)
    padding = torch.zeros(2, 3, 4)  # padding rows of a fixed-size proposal tensor
    padding[1, 2] = torch.tensor([-500.0, -500.0, -400.0, -450.0])  # fully outside the image
    assert torch.count_nonzero(roi_align_v2(padding, feats)) == 0


def test_box_pools_from_its_own_image():
    feats = _features(2, 4, 128, 128)
    box = torch.tensor([[[8.0, 8.0, 60.0, 60.0]]])
    both = roi_align_v2(box.expand(2, 1, 4).contiguous(), feats)
    single = roi_align_v2(box, [f[1:] for f in feats])
    torch.testing.assert_close(both[1], single[0], rtol=0, atol=0)
    assert not torch.allclose(both[0], both[1])


def test_gradient_float64():
    g = torch.Generator().manual_seed(5)
    feats = [
        torch.randn(2, 2, s, s + 1, dtype=torch.float64, generator=g, requires_grad=True)
        for s in (8, 4, 2, 1)
    ]
    rois = torch.tensor(
        [
            [[3.0, 2.0, 20.0, 27.0], [0.0, 0.0, 50.0, 30.0], [-5.0, 10.0, 45.0, 37.0]],
            [[10.0, 10.0, 11.0, 12.0], [2.0, 4.0, 30.0, 22.0], [0.0, 0.0, 0.0, 0.0]],
        ]
    )
    levels = assign_box_levels(rois, 2, 5, canonical_box_size=32.0)
    assert len(set(levels.view(-1).tolist())) >= 3

    def fn(*fs):
        return roi_align_v2(rois, list(fs), output_size=3, canonical_box_size=32.0)

    assert torch.autograd.gradcheck(fn, tuple(feats), eps=1e-6, atol=1e-8, fast_mode=True)


def test_gradient_fp32_matches_float64():
    """The fp32 backward (W^T @ grad in float32) equals the gradchecked float64 one."""
    feats = _features(1, 3, 64, 64, seed=7)
    rois = _boxes(1, 12, 64, 64, seed=8)
    grads = []
    for dtype in (torch.float32, torch.float64):
        fs = [f.detach().to(dtype).requires_grad_() for f in feats]
        out = roi_align_v2(rois, fs)
        (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).view_as(out)).sum().backward()
        grads.append([f.grad for f in fs])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for g32, g64 in zip(*grads):
        assert g32.dtype == torch.float32
        torch.testing.assert_close(g32.double(), g64, rtol=1e-5, atol=1e-5)


def test_opcheck_fake_and_autograd_registration():
    feats = [f.requires_grad_() for f in _features(1, 2, 64, 64)]
    rois = _boxes(1, 5, 64, 64)
    torch.library.opcheck(
        torch.ops.frcnn.roi_align_v2.default,
        (rois, feats, 7, 0, True, 224.0, 4, 2),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_bad_input_is_rejected():
    feats = _features(1, 2, 32, 32)
    with pytest.raises(ValueError, match=r"\[B, R, 4\]"):
        roi_align_v2(torch.zeros(3, 4), feats)
    with pytest.raises(ValueError, match="batch"):
        roi_align_v2(torch.zeros(2, 1, 4), feats)
