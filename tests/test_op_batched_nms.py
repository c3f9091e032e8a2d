"""frcnn::batched_nms (torch face) against a brute-force NumPy greedy NMS on hypothesis-generated cases."""

from __future__ import annotations

import math

import frcnn.plugins.batched_nms.torch_op as nms_mod
import numpy as np
import pytest
import torch
from frcnn.plugins.batched_nms.torch_op import batched_nms
from hypothesis import given, settings
from hypothesis import strategies as st


def _reference_nms(boxes, scores, groups, iou_threshold, score_threshold, max_output) -> list[int]:
    """Greedy NMS the textbook way: float32 IoU (torchvision's formula), double threshold compare,
    candidates score > float32(score_threshold), sorted by (-score, index)."""
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float32)
    cand = [i for i in range(len(scores)) if scores[i] > np.float32(score_threshold)]
    cand.sort(key=lambda i: (-scores[i], i))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep: list[int] = []
    for j in cand:
        if len(keep) == max_output:
            break
        k = np.array([i for i in keep if groups[i] == groups[j]], dtype=np.int64)
        if k.size:
            w = np.maximum(
                np.float32(0), np.minimum(boxes[k, 2], boxes[j, 2]) - np.maximum(boxes[k, 0], boxes[j, 0])
            )
            h = np.maximum(
                np.float32(0), np.minimum(boxes[k, 3], boxes[j, 3]) - np.maximum(boxes[k, 1], boxes[j, 1])
            )
            inter = w * h
            with np.errstate(divide="ignore", invalid="ignore"):
                iou = inter / (area[k] + area[j] - inter)
            if np.any(iou.astype(np.float64) > iou_threshold):
                continue
        keep.append(j)
    return keep


def _check(boxes, scores, groups, iou_threshold, score_threshold, max_output):
    """Run the op on a batch and compare every image with the reference; returns kept counts."""
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32))
    s = torch.as_tensor(np.asarray(scores, dtype=np.float32))
    g = torch.as_tensor(np.asarray(groups, dtype=np.int32))
    num, idx = batched_nms(b, s, g, iou_threshold, score_threshold, max_output)
    assert num.dtype == torch.int32 and idx.dtype == torch.int32
    assert idx.shape == (b.shape[0], max_output)
    counts = []
    for i in range(b.shape[0]):
        expected = _reference_nms(
            b[i].numpy(), s[i].numpy(), g[i].numpy(), iou_threshold, score_threshold, max_output
        )
        n = int(num[i])
        assert idx[i, :n].tolist() == expected
        assert (idx[i, n:] == -1).all()
        counts.append(n)
    return counts


@st.composite
def nms_cases(draw):
    """Case parameters from hypothesis, box contents from a NumPy generator seeded by hypothesis (fast)."""
    batch = draw(st.integers(1, 2))
    n = draw(st.integers(0, 48))
    grid = draw(st.booleans())  # integer grid -> duplicates, ties, zero-area boxes, NaN / -inf scores
    duplicates = draw(st.booleans())
    num_groups = draw(st.sampled_from([1, 2, 5, 64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if grid:
        xywh = rng.integers(0, 7, (batch, n, 4)).astype(np.float32)
        scores = rng.choice(np.array([-math.inf, 0.0, 0.1, 0.5, 0.5, 0.9, math.nan], np.float32), (batch, n))
    else:
        xywh = rng.uniform(0, 50, (batch, n, 4)).astype(np.float32)
        xywh[..., 2:] *= rng.random((batch, n, 1)) > 0.1  # some zero-area boxes
        scores = np.stack([rng.permutation(n) for _ in range(batch)]).astype(np.float32).reshape(
            batch, n
        ) / max(n, 1)
    if duplicates and n:
        xywh = np.take_along_axis(xywh, rng.integers(0, n, (batch, n, 1)), axis=1)
    boxes = np.concatenate([xywh[..., :2], xywh[..., :2] + xywh[..., 2:]], -1)
    groups = rng.integers(0, num_groups, (batch, n)).astype(np.int32)
    iou = draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]))
    score_threshold = draw(st.sampled_from([-math.inf, 0.0, 0.05, 0.5]))
    max_output = draw(st.integers(0, 40))
    return boxes, scores, groups, iou, score_threshold, max_output


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(nms_cases(), st.sampled_from([5, 256]))
def test_matches_bruteforce_greedy_nms(case, chunk):
    """Chunk 5 makes the chunk-to-chunk suppression and in-chunk fixed point run on small cases."""
    old = nms_mod.CHUNK
    nms_mod.CHUNK = chunk
    try:
        _check(*case)
    finally:
        nms_mod.CHUNK = old


def test_large_images_beyond_chunk_and_max_output():
    rng = np.random.default_rng(0)
    n = 1500
    xy = rng.uniform(0, 120, (2, n, 2))
    wh = rng.uniform(5, 80, (2, n, 2))
    boxes = np.concatenate([xy, xy + wh], -1)
    scores = rng.random((2, n))
    groups = np.stack([rng.integers(0, 5, n), rng.integers(0, 80, n)])
    counts = _check(boxes, scores, groups, 0.5, 0.05, 1000)
    assert counts[0] < 1000 and counts[0] != counts[1]
    # max_candidates is the GPU kernel's cap: the torch op is exact for any N and ignores it.
    args = (torch.as_tensor(boxes, dtype=torch.float32), torch.as_tensor(scores, dtype=torch.float32),
            torch.as_tensor(groups, dtype=torch.int32), 0.5, 0.05, 1000)
    default = batched_nms(*args)
    for cap in (1, 64, 8192):
        assert all(torch.equal(a, b) for a, b in zip(batched_nms(*args, max_candidates=cap), default))
    assert _check(boxes, scores, groups, 0.7, -math.inf, 100) == [100, 100]


def test_n_zero_and_k_zero():
    num, idx = batched_nms(
        torch.zeros(3, 0, 4), torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.int32), 0.5, 0.0, 4
    )
    assert num.tolist() == [0, 0, 0] and idx.tolist() == [[-1] * 4] * 3
    num, idx = batched_nms(
        torch.rand(1, 5, 4), torch.rand(1, 5), torch.zeros(1, 5, dtype=torch.int32), 0.5, 0.0, 0
    )
    assert num.tolist() == [0] and idx.shape == (1, 0)


def test_threshold_semantics_hand_computed():
    # IoU of [0,0,10,1] and [0,0,1,1] is 1 / 10 = float32(0.1) = 0.10000000149 > 0.1 (double): suppressed,
    # like torchvision's C++ kernel (a float32 comparison would keep it).
    boxes = torch.tensor([[[0.0, 0.0, 10.0, 1.0], [0.0, 0.0, 1.0, 1.0], [20.0, 20.0, 20.0, 30.0]]])
    groups = torch.zeros(1, 3, dtype=torch.int32)
    num, idx = batched_nms(boxes, torch.tensor([[0.9, 0.8, 0.7]]), groups, 0.1, -math.inf, 10)
    assert idx[0, : int(num[0])].tolist() == [0, 2]
    # Same group, same box: suppressed; other group: kept. Zero-area box: never suppressed.
    boxes = torch.tensor(
        [
            [
                [0.0, 0.0, 4.0, 4.0],
                [0.0, 0.0, 4.0, 4.0],
                [0.0, 0.0, 4.0, 4.0],
                [1.0, 1.0, 1.0, 3.0],
                [1.0, 1.0, 1.0, 3.0],
            ]
        ]
    )
    num, idx = batched_nms(
        boxes, torch.tensor([[0.5, 0.5, 0.5, 0.4, 0.6]]), torch.tensor([[0, 0, 1, 0, 0]]), 0.5, -math.inf, 10
    )
    assert idx[0, : int(num[0])].tolist() == [4, 0, 2, 3]
    # score > threshold in float32 (as detectron2's `scores > thresh`): float32(0.05) is not > 0.05.
    scores = torch.tensor([[np.float32(0.05), 0.06, -math.inf, math.nan, 0.01]], dtype=torch.float32)
    boxes = torch.arange(20, dtype=torch.float32).view(1, 5, 4) * torch.tensor([1.0, 1.0, 2.0, 2.0])
    num, idx = batched_nms(boxes, scores, torch.arange(5).view(1, 5), 0.5, 0.05, 10)
    assert idx[0, : int(num[0])].tolist() == [1]
    num, idx = batched_nms(boxes, scores, torch.arange(5).view(1, 5), 0.5, -math.inf, 10)
    assert idx[0, : int(num[0])].tolist() == [1, 0, 4]


def test_opcheck_fake_registration():
    boxes = torch.rand(2, 6, 4) * 10
    boxes[..., 2:] += boxes[..., :2]
    torch.library.opcheck(
        torch.ops.frcnn.batched_nms.default,
        (boxes, torch.rand(2, 6), torch.zeros(2, 6, dtype=torch.int32), 0.5, 0.0, 4, 8192),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match=r"\[B, N, 4\]"):
        batched_nms(torch.zeros(5, 4), torch.zeros(5), torch.zeros(5), 0.5, 0.0, 3)
    with pytest.raises(ValueError, match="scores"):
        batched_nms(torch.zeros(1, 5, 4), torch.zeros(1, 4), torch.zeros(1, 5), 0.5, 0.0, 3)
    with pytest.raises(ValueError, match="max_candidates must be >= 1"):
        batched_nms(torch.zeros(1, 5, 4), torch.zeros(1, 5), torch.zeros(1, 5), 0.5, 0.0, 3, max_candidates=0)
