"""BatchedNMS Triton kernel (Triton interpreter, CPU tensors) == torch reference op == NumPy greedy NMS.

The kernel runs in a child process started with ``TRITON_INTERPRET=1`` (this file is also the child's
script): the interpreter must be chosen before the kernel module is imported, which a shared pytest process
cannot guarantee (other tests may import the kernels for PTX compilation). Caps are tiny (64..256) because
the interpreter is slow; the code path is the same as for the default cap.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from interpreter_utils import run_kernels_in_interpreter


def _boxes(rng: np.random.Generator, b: int, n: int, extent: float = 100.0, size: float = 40.0) -> np.ndarray:
    xy = rng.random((b, n, 2), dtype=np.float32) * extent
    wh = rng.random((b, n, 2), dtype=np.float32) * size
    return np.concatenate([xy, xy + wh], -1).astype(np.float32)


def _cases() -> dict[str, dict]:
    """name -> inputs and attributes (iou, score threshold, K, cap)."""
    rng = np.random.default_rng(0)
    cases: dict[str, dict] = {}

    def add(name, boxes, scores, groups, iou, thr, k, cap):
        cases[name] = {"boxes": boxes, "scores": scores.astype(np.float32),
                       "groups": groups.astype(np.int32), "iou": iou, "thr": thr, "k": k, "cap": cap}

    b = _boxes(rng, 2, 200)
    add("random", b, rng.random((2, 200)), rng.integers(0, 3, (2, 200)), 0.5, 0.05, 50, 256)
    add("empty", np.zeros((2, 0, 4), np.float32), np.zeros((2, 0)), np.zeros((2, 0)), 0.5, 0.05, 10, 64)
    add("below_threshold", b[:, :40], rng.random((2, 40)) * 0.05, np.zeros((2, 40)), 0.5, 0.05, 10, 64)
    same = np.tile(np.array([[[10, 10, 50, 60]]], np.float32), (1, 70, 1))
    add("all_suppressed", same, rng.random((1, 70)), np.zeros((1, 70)), 0.5, float("-inf"), 20, 128)
    clustered = _boxes(rng, 1, 300, extent=30.0, size=30.0)
    add("many_groups", clustered, rng.random((1, 300)), rng.integers(0, 100, (1, 300)), 0.3, 0.0, 300, 512)
    ties = np.round(rng.random((2, 150)) * 4) / 4  # 5 distinct scores: tie-break by index
    ties[0, :10] = -0.0
    ties[0, 10:20] = 0.0
    add("ties_zero_signs", _boxes(rng, 2, 150), ties, rng.integers(0, 2, (2, 150)), 0.6, float("-inf"), 150, 256)
    odd = rng.random((1, 120))
    odd[0, ::7] = np.nan
    odd[0, 3::11] = -np.inf
    degenerate = _boxes(rng, 1, 120)
    degenerate[0, ::5, 2:] = degenerate[0, ::5, :2]  # zero-area boxes
    add("nan_inf_zero_area", degenerate, odd, rng.integers(0, 4, (1, 120)), 0.7, float("-inf"), 120, 128)
    add("early_stop", _boxes(rng, 2, 180), rng.random((2, 180)), np.zeros((2, 180)), 0.5, 0.0, 5, 256)
    big = _boxes(rng, 2, 700, extent=200.0)
    add("above_cap", big, rng.random((2, 700)), rng.integers(0, 5, (2, 700)), 0.5, 0.1, 100, 128)
    return cases


def _worker(path_in: str, path_out: str) -> None:
    import torch
    from frcnn.plugins.batched_nms.triton_kernel import batched_nms_triton

    data = np.load(path_in, allow_pickle=True)["cases"].item()
    out = {}
    for name, c in data.items():
        num, idx = batched_nms_triton(torch.from_numpy(c["boxes"]), torch.from_numpy(c["scores"]),
                                      torch.from_numpy(c["groups"]), c["iou"], c["thr"], c["k"], c["cap"])
        out[name] = (num.numpy(), idx.numpy())
    np.savez(path_out, results=np.array(out, dtype=object))


@pytest.fixture(scope="module")
def kernel_results(tmp_path_factory) -> dict:
    return run_kernels_in_interpreter(__file__, _cases(), tmp_path_factory.mktemp("nms"))


def _numpy_nms(boxes, scores, groups, iou_t, thr, k):
    """Independent greedy NMS (torchvision order of float ops, threshold compared in double)."""
    b, n = scores.shape
    num, out = np.zeros(b, np.int32), -np.ones((b, k), np.int32)
    for i in range(b):
        s = scores[i]
        with np.errstate(invalid="ignore"):
            cand = np.nonzero(s > np.float32(thr))[0]
        order = cand[np.argsort(-s[cand], kind="stable")]
        bx = boxes[i]
        area = (bx[:, 2] - bx[:, 0]) * (bx[:, 3] - bx[:, 1])
        removed, keep = np.zeros(n, bool), []
        for j in order:
            if removed[j]:
                continue
            keep.append(j)
            w = np.maximum(np.minimum(bx[j, 2], bx[:, 2]) - np.maximum(bx[j, 0], bx[:, 0]), np.float32(0))
            h = np.maximum(np.minimum(bx[j, 3], bx[:, 3]) - np.maximum(bx[j, 1], bx[:, 1]), np.float32(0))
            inter = w * h
            with np.errstate(all="ignore"):
                iou = inter / (area[j] + area - inter)
            removed |= (iou.astype(np.float64) > iou_t) & (groups[i] == groups[i][j])
        keep = keep[:k]
        num[i], out[i, : len(keep)] = len(keep), keep
    return num, out


def _top_cap_only(scores: np.ndarray, thr: float, cap: int) -> np.ndarray:
    """Scores with every candidate outside the top ``cap`` (score desc, index asc) set to NaN (excluded)."""
    out = scores.copy()
    for i in range(scores.shape[0]):
        s = np.where(scores[i] > np.float32(thr), scores[i], -np.inf)
        order = np.lexsort((np.arange(s.size), -s))
        out[i, order[cap:]] = np.nan
    return out


@pytest.mark.parametrize("name", list(_cases()))
def test_kernel_equals_references(kernel_results, name):
    import torch
    from frcnn.plugins.batched_nms.torch_op import batched_nms

    c = _cases()[name]
    scores = c["scores"]
    if name == "above_cap":  # the kernel's contract above the cap: NMS of the top-cap candidates
        assert (scores > c["thr"]).sum(1).min() > c["cap"]
        scores = _top_cap_only(scores, c["thr"], c["cap"])
    num, idx = kernel_results[name]
    ref_num, ref_idx = batched_nms(torch.from_numpy(c["boxes"]), torch.from_numpy(scores),
                                   torch.from_numpy(c["groups"]), c["iou"], c["thr"], c["k"])
    np_num, np_idx = _numpy_nms(c["boxes"], scores, c["groups"], c["iou"], c["thr"], c["k"])
    np.testing.assert_array_equal(ref_num.numpy(), np_num)
    np.testing.assert_array_equal(ref_idx.numpy(), np_idx)
    np.testing.assert_array_equal(num, np_num)
    np.testing.assert_array_equal(idx, np_idx)
    assert idx.dtype == np.int32 and num.dtype == np.int32


def test_cases_exercise_their_edge(kernel_results):
    """The edge cases really are edge cases (guards against a generator change hollowing them out)."""
    r = kernel_results
    assert (r["empty"][0] == 0).all() and (r["empty"][1] == -1).all()
    assert (r["below_threshold"][0] == 0).all()
    assert r["all_suppressed"][0].tolist() == [1]
    assert (r["early_stop"][0] == 5).all()
    n, _ = r["many_groups"]
    assert 100 < n[0] < 300  # suppression happened, but only within groups
    assert (r["above_cap"][0] == 100).all()


def test_float32_at_most():
    from frcnn.plugins.batched_nms.triton_kernel import float32_at_most

    for v in (0.3, 0.5, 0.7, -0.1, 1e-50, -1e-50, 1.0):
        f = float32_at_most(v)
        assert f <= v and float(np.float32(f)) == f
        assert float(np.nextafter(np.float32(f), np.float32(np.inf))) > v


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
