"""frcnn::BatchedNMS — per-image greedy NMS where boxes of different groups never suppress each other.

Contract (docs/ops.md has the full text):

- inputs: ``boxes`` [B, N, 4] float (x1, y1, x2, y2), ``scores`` [B, N] float, ``groups`` [B, N] int32.
- attributes: ``iou_threshold`` (suppress when IoU > threshold, strictly; every face compares the float32
  IoU with :func:`float32_at_most` of it, which equals torchvision's float32-vs-double comparison), ``score_threshold`` (a candidate
  needs score > threshold), ``max_output`` K, and the optional ``max_candidates`` (int >= 1, default
  :data:`DEFAULT_MAX_CANDIDATES` = 4096): the GPU kernel's candidate cap.
- outputs: ``num`` [B] int32 (kept boxes per image, <= K), ``indices`` [B, K] int32 into N, sorted by score
  descending (ties: lower index first), padded with -1.
- IoU uses width = x2 - x1 (no +1); a zero-area box has IoU 0 with everything (it suppresses nothing and
  is suppressed by nothing).
- torchvision ``batched_nms`` semantics; detectron2 calls it for RPN (groups = level) and the box head
  (groups = class).
- ``max_candidates``: the torch op and the ONNX function body are exact for any N and ignore it. The
  Triton kernel behind the TensorRT plugin runs NMS on the top ``C = kernel_candidate_cap(max_candidates)``
  candidates by score (``max_candidates`` rounded up to a power of two >= 64); it is exact whenever the
  candidates with score > score_threshold number at most ``max_candidates`` (and more generally whenever
  K boxes are kept among the top C). Beyond that it keeps the top-C candidates and drops the rest.
"""

import struct

OP_NAME = "BatchedNMS"
TORCH_OP = "frcnn::batched_nms"

DEFAULT_MAX_CANDIDATES = 4096
"""Default of the ``max_candidates`` attribute (the box head's; the RPN passes its own bound)."""

KERNEL_MIN_CANDIDATES = 64
"""Smallest candidate cap of the Triton kernel (its NMS tile, ``triton_kernel.TILE``)."""


def kernel_candidate_cap(max_candidates: int) -> int:
    """The kernel's compile-time cap for an attribute value: the smallest power of two >= max_candidates
    and >= :data:`KERNEL_MIN_CANDIDATES` (4819 -> 8192, 4096 -> 4096, 1 -> 64). ValueError below 1."""
    if max_candidates < 1:
        raise ValueError(f"{OP_NAME}: max_candidates must be >= 1, got {max_candidates}")
    return max(KERNEL_MIN_CANDIDATES, 1 << (int(max_candidates) - 1).bit_length())


def float32_at_most(value: float) -> float:
    """Largest float32 <= ``value`` (0.3 -> 0.29999998, 0.5 -> 0.5).

    torchvision compares the float32 IoU with a *double* threshold; ONNX, TensorRT and the Triton kernel
    compare in float32. ``iou > float32_at_most(t)`` in float32 equals ``double(iou) > t`` for every float32
    ``iou`` (whereas float32(0.3) = 0.30000001 would keep an IoU of exactly that value).
    """
    bits = struct.unpack("<i", struct.pack("<f", value))[0]
    f = struct.unpack("<f", struct.pack("<i", bits))[0]
    if f > value:  # rounded up: step one float32 towards -inf
        bits += -1 if bits >= 0 else 1  # sign-magnitude: negative floats grow in magnitude
        f = struct.unpack("<f", struct.pack("<i", bits))[0]
    return f


__all__ = ["DEFAULT_MAX_CANDIDATES", "KERNEL_MIN_CANDIDATES", "OP_NAME", "TORCH_OP", "float32_at_most",
           "kernel_candidate_cap"]  # fmt: skip
