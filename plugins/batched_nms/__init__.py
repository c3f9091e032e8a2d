"""frcnn::BatchedNMS — per-image greedy NMS where boxes of different groups never suppress each other.

Contract (docs/ops.md has the full text):

- inputs: ``boxes`` [B, N, 4] float (x1, y1, x2, y2), ``scores`` [B, N] float, ``groups`` [B, N] int32.
- attributes: ``iou_threshold`` (suppress when IoU > threshold, strictly), ``score_threshold`` (a candidate
  needs score > threshold), ``max_output`` K.
- outputs: ``num`` [B] int32 (kept boxes per image, <= K), ``indices`` [B, K] int32 into N, sorted by score
  descending (ties: lower index first), padded with -1.
- IoU uses width = x2 - x1 (no +1); a zero-area box has IoU 0 with everything (it suppresses nothing and
  is suppressed by nothing).
- torchvision ``batched_nms`` semantics; detectron2 calls it for RPN (groups = level) and the box head
  (groups = class).
"""

OP_NAME = "BatchedNMS"
TORCH_OP = "frcnn::batched_nms"

__all__ = ["OP_NAME", "TORCH_OP"]
