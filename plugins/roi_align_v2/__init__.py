"""frcnn::ROIAlignV2 — multi-level ROIAlign with detectron2's ``ROIAlignV2`` semantics (aligned=True).

Contract (docs/ops.md has the full text):

- inputs: ``rois`` [B, R, 4] float (x1, y1, x2, y2 in input-image pixels), then one feature map per level,
  ``p2`` .. ``p5`` [B, C, H_l, W_l] (fp32 or fp16; all levels the same dtype).
- output: [B, R, C, output_size, output_size], dtype of the features.
- level of a box: ``floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8))`` clamped to
  [min_level, min_level + num_levels - 1]; spatial scale of level l is ``1 / 2**l``.
- aligned: box coordinates * scale - 0.5; ROI width/height not clamped to >= 1; sampling_ratio 0 means
  ``ceil(roi_size / output_size)`` per ROI and axis; a sample outside [-1, size] contributes 0, a coordinate
  in [-1, 0] clamps to 0; each bin is the mean of its samples.
"""

OP_NAME = "ROIAlignV2"
TORCH_OP = "frcnn::roi_align_v2"

DEFAULTS: dict[str, int | float] = {
    "output_size": 7,
    "sampling_ratio": 0,
    "aligned": 1,
    "canonical_box_size": 224.0,
    "canonical_level": 4,
    "min_level": 2,
    "max_level": 5,
}

__all__ = ["DEFAULTS", "OP_NAME", "TORCH_OP"]
