"""frcnn.runtime.masks: detectron2's paste_masks_in_image in numpy, against two independent references:

1. a per-pixel pure-Python reading of detectron2's documented semantics (pixel centre normalised to the box,
   grid_sample bilinear with zero padding and align_corners=False, threshold >= 0.5, whole image);
2. detectron2's own implementation path, ``_do_paste_mask`` with torch.nn.functional.grid_sample (copied
   below from detectron2/layers/mask_ops.py), both its CPU (window) and GPU (whole image) variants.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from frcnn.runtime.masks import (
    detector_postprocess_masks,
    masks_to_rle,
    paste_mask_probs,
    paste_masks_in_image,
)
from frcnn.runtime.postprocess import detector_postprocess


def _reference_value(mask: np.ndarray, box, y: int, x: int) -> float:
    """detectron2 paste semantics for one pixel, in float64 Python arithmetic (of the float32 box)."""
    x0, y0, x1, y1 = (float(np.float32(v)) for v in box)
    size = mask.shape[0]
    gx = (x + 0.5 - x0) / (x1 - x0) * 2 - 1
    gy = (y + 0.5 - y0) / (y1 - y0) * 2 - 1
    ix, iy = ((gx + 1) * size - 1) / 2, ((gy + 1) * size - 1) / 2
    value = 0.0
    for cy in (math.floor(iy), math.floor(iy) + 1):
        for cx in (math.floor(ix), math.floor(ix) + 1):
            if 0 <= cy < size and 0 <= cx < size:
                value += (1 - abs(ix - cx)) * (1 - abs(iy - cy)) * float(mask[cy, cx])
    return value


def _reference_paste(mask: np.ndarray, box, hw) -> np.ndarray:
    return np.array([[_reference_value(mask, box, y, x) for x in range(hw[1])] for y in range(hw[0])])


def _d2_do_paste_mask(masks, boxes, img_h: int, img_w: int, skip_empty: bool):
    """detectron2.layers.mask_ops._do_paste_mask (verbatim apart from the jit guards)."""
    device = masks.device
    if skip_empty:
        x0_int, y0_int = torch.clamp(boxes.min(dim=0).values.floor()[:2] - 1, min=0).to(dtype=torch.int32)
        x1_int = torch.clamp(boxes[:, 2].max().ceil() + 1, max=img_w).to(dtype=torch.int32)
        y1_int = torch.clamp(boxes[:, 3].max().ceil() + 1, max=img_h).to(dtype=torch.int32)
    else:
        x0_int, y0_int = 0, 0
        x1_int, y1_int = img_w, img_h
    x0, y0, x1, y1 = torch.split(boxes, 1, dim=1)
    n = masks.shape[0]
    img_y = torch.arange(y0_int, y1_int, device=device, dtype=torch.float32) + 0.5
    img_x = torch.arange(x0_int, x1_int, device=device, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    gx = img_x[:, None, :].expand(n, img_y.size(1), img_x.size(1))
    gy = img_y[:, :, None].expand(n, img_y.size(1), img_x.size(1))
    grid = torch.stack([gx, gy], dim=3)
    img_masks = F.grid_sample(masks, grid.to(masks.dtype), align_corners=False)
    if skip_empty:
        return img_masks[:, 0], (slice(y0_int, y1_int), slice(x0_int, x1_int))
    return img_masks[:, 0], ()


def _d2_paste_masks_in_image(masks: np.ndarray, boxes: np.ndarray, hw, cpu_path: bool) -> tuple:
    """detectron2 paste_masks_in_image: CPU path (one box at a time, window) or GPU path (whole image)."""
    m, b = torch.from_numpy(masks).float(), torch.from_numpy(boxes).float()
    out = torch.zeros(len(m), *hw, dtype=torch.bool)
    probs = torch.zeros(len(m), *hw)
    for i in range(len(m)):
        chunk, where = _d2_do_paste_mask(m[i : i + 1, None], b[i : i + 1], hw[0], hw[1], skip_empty=cpu_path)
        out[(slice(i, i + 1), *where)] = chunk >= 0.5
        probs[(slice(i, i + 1), *where)] = chunk
    return out.numpy(), probs.numpy()


HAND_CASES = [  # (box x0, y0, x1, y1) on a 24 x 32 image, what it exercises
    ((3.0, 4.0, 19.0, 16.0), "integer box inside the image"),
    ((5.3, 2.7, 27.9, 21.2), "fractional box inside"),
    ((-6.5, -3.2, 10.4, 9.9), "partly outside: top-left"),
    ((20.2, 14.6, 40.0, 30.0), "partly outside: bottom-right"),
    ((10.2, 7.1, 10.7, 7.9), "under one pixel"),
    ((12.0, 3.0, 12.6, 20.0), "under one pixel wide, tall"),
    ((40.0, 2.0, 50.0, 9.0), "entirely outside"),
]
HW = (24, 32)


def _mask(seed: int, size: int = 28) -> np.ndarray:
    """Smooth probabilities with values on both sides of 0.5 (a blob)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    cy, cx = rng.uniform(0.3, 0.7, 2)
    return (1 / (1 + np.exp(-(3 - 20 * ((yy - cy) ** 2 + (xx - cx) ** 2)) * 2))).astype(np.float32)


def _assert_binary_equal(got: np.ndarray, ref_probs: np.ndarray) -> None:
    """Binary masks equal the reference's ``>= 0.5`` except where it is within float32 rounding of 0.5."""
    decided = np.abs(ref_probs - 0.5) > 1e-5
    assert np.array_equal(got[decided], ref_probs[decided] >= 0.5)
    assert (~decided).sum() <= 2


@pytest.mark.parametrize("box, what", HAND_CASES, ids=[c[1] for c in HAND_CASES])
def test_paste_equals_python_reference(box, what) -> None:
    mask = _mask(hash(what) % 1000)
    ref = _reference_paste(mask, box, HW)
    values, (rows, cols) = paste_mask_probs(mask, box, HW)
    full = np.zeros(HW, np.float32)
    full[rows, cols] = values
    # Inside the window the probabilities are the reference's; outside it the reference is below 0.5.
    np.testing.assert_allclose(full[rows, cols], ref[rows, cols], rtol=0, atol=1e-5)  # float32 coordinates
    _assert_binary_equal(paste_masks_in_image(mask[None], np.array([box]), HW)[0], ref)
    if what == "entirely outside":
        assert not paste_masks_in_image(mask[None], np.array([box]), HW).any()
    elif what.startswith("under one pixel"):
        assert 0 < ref.max() and (ref > 0).sum() <= 3 * 24  # only the pixels next to the box


def test_all_ones_mask_covers_exactly_the_pixel_centres_in_the_box() -> None:
    # Hand-computed: along an axis a centre inside the box weighs >= 0.75 (half a cell from the edge at
    # worst, 28 cells on 16 px), outside <= 0.25; the product of the two axes is >= 0.5625 inside.
    got = paste_masks_in_image(np.ones((1, 28, 28), np.float32), np.array([[3.0, 4.0, 19.0, 16.0]]), HW)[0]
    want = np.zeros(HW, bool)
    want[4:16, 3:19] = True
    assert np.array_equal(got, want)


def test_paste_equals_detectron2_grid_sample_path_cpu_and_gpu_variants() -> None:
    rng = np.random.default_rng(3)
    n = 12
    # Boxes partly outside the image, and three under one pixel (detectron2's window code needs every box
    # to reach into the image, as after detector_postprocess's clip).
    x0, y0 = rng.uniform(-10, 40, n), rng.uniform(-10, 30, n)
    x0[:3], y0[:3] = rng.uniform(0, 50, 3), rng.uniform(0, 35, 3)
    sizes = np.concatenate([rng.uniform(0.2, 0.9, (3, 2)), rng.uniform(12, 45, (n - 3, 2))])
    boxes = np.stack([x0, y0, x0 + sizes[:, 0], y0 + sizes[:, 1]], 1).astype(np.float32)
    masks = np.stack([_mask(i) for i in range(n)])
    hw = (40, 56)
    got = paste_masks_in_image(masks, boxes, hw)
    for cpu_path in (True, False):
        d2, d2_probs = _d2_paste_masks_in_image(masks, boxes, hw, cpu_path)
        _assert_binary_equal(got, d2_probs)
        assert (got != d2).sum() <= 2
    _, d2_cpu = _d2_paste_masks_in_image(masks, boxes, hw, True)
    for i in range(n):
        values, (rows, cols) = paste_mask_probs(masks[i], boxes[i], hw)
        np.testing.assert_allclose(values, d2_cpu[i, rows, cols], rtol=0, atol=2e-6)
    assert got.sum() > 500  # the random boxes do cover pixels


def test_detector_postprocess_masks_follow_detector_postprocess_rows() -> None:
    boxes = np.array([[10, 10, 60, 50], [200, 5, 260, 40], [30, 20, 31, 80]], np.float32)  # row 1 is off-image
    probs = np.stack([_mask(i) for i in range(3)])
    resized, original = (100, 150), (200, 300)
    final, _, _ = detector_postprocess(boxes, np.ones(3), np.zeros(3), resized, original)
    got = detector_postprocess_masks(probs, boxes, resized, original)
    assert len(final) == 2 and got.shape == (2, 200, 300)  # the box beyond the image is dropped
    for k, row in enumerate((0, 2)):
        assert np.array_equal(got[k], paste_masks_in_image(probs[row : row + 1], final[k : k + 1], original)[0])
    assert got[0].any() and got[1].any()


def test_masks_to_rle_round_trips_through_pycocotools() -> None:
    from pycocotools import mask as mask_util

    masks = paste_masks_in_image(np.stack([_mask(1), _mask(2)]), np.array([[2, 3, 20, 15], [0, 0, 32, 24.0]]), HW)
    rles = masks_to_rle(masks)
    assert [r["size"] for r in rles] == [list(HW)] * 2 and all(isinstance(r["counts"], str) for r in rles)
    decoded = mask_util.decode([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    assert np.array_equal(decoded.transpose(2, 0, 1).astype(bool), masks)
    assert list(mask_util.area([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])) == [
        int(masks[0].sum()), int(masks[1].sum())]
    assert masks_to_rle(np.zeros((0, 4, 5), bool)) == []


def test_infer_draws_masks_half_transparent() -> None:
    from frcnn.runtime.infer_cli import MASK_ALPHA, PALETTE, draw_detections

    rgb = np.full((40, 60, 3), 100, np.uint8)
    masks = np.zeros((1, 40, 60), bool)
    masks[0, 10:30, 20:40] = True
    drawn = np.asarray(draw_detections(rgb, np.array([[5.0, 5.0, 55.0, 35.0]]), ["x"], np.array([2]), masks))
    color = np.array(PALETTE[2], np.float64)
    want = np.rint(MASK_ALPHA * color + (1 - MASK_ALPHA) * 100)
    assert np.array_equal(drawn[15:25, 25:35].reshape(-1, 3), np.broadcast_to(want, (100, 3)))
    assert (drawn[36:, :] == 100).all()  # below the box: untouched
    plain = np.asarray(draw_detections(rgb, np.array([[5.0, 5.0, 55.0, 35.0]]), ["x"], np.array([2])))
    assert (plain[15:25, 25:35] == 100).all()
