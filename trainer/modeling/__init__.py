"""The network: detectron2's Faster R-CNN FPN (Base-RCNN-FPN), one definition for training and export.

    from frcnn.trainer.modeling import build_model
    model = build_model(cfg).eval()
    out = model(images, image_sizes)   # see meta_arch.py for the contract

Modules (attribute names = detectron2 checkpoint keys): backbone (resnet.py, fpn.py), proposal_generator
(rpn.py, anchors.py), roi_heads (roi_heads.py); Box2BoxTransform in box_transform.py; building blocks in
layers.py.
"""

from .anchors import DefaultAnchorGenerator, generate_cell_anchors
from .box_transform import Box2BoxTransform
from .fpn import FPN, LastLevelMaxPool, build_backbone, build_resnet_fpn_backbone
from .layers import ShapeSpec
from .meta_arch import GeneralizedRCNN, build_model
from .roi_heads import (
    FastRCNNConvFCHead,
    FastRCNNOutputLayers,
    ROIPooler,
    StandardROIHeads,
    fast_rcnn_inference,
)
from .rpn import RPN, StandardRPNHead, find_top_rpn_proposals

__all__ = [
    "FPN",
    "RPN",
    "Box2BoxTransform",
    "DefaultAnchorGenerator",
    "FastRCNNConvFCHead",
    "FastRCNNOutputLayers",
    "GeneralizedRCNN",
    "LastLevelMaxPool",
    "ROIPooler",
    "ShapeSpec",
    "StandardROIHeads",
    "StandardRPNHead",
    "build_backbone",
    "build_model",
    "build_resnet_fpn_backbone",
    "fast_rcnn_inference",
    "find_top_rpn_proposals",
    "generate_cell_anchors",
]
