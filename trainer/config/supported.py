"""check_supported: refuse every config setting that would change detectron2's semantics but is not built.

The config accepts all of detectron2's keys (so detectron2's own YAML files load unchanged), but this product
builds one network: detectron2's Faster R-CNN with a ResNet-FPN backbone (Base-RCNN-FPN), optionally with
Mask R-CNN's mask head (MODEL.MASK_ON, inference and export). A setting that selects something else (a
keypoint head, deformable convs, another anchor generator, ...) must not be
silently ignored, so ``check_supported`` raises one ``ConfigError`` that lists every such setting, each with
its key, its value and what to do.

Keys that are accepted although nothing reads them, and why that is not "silently wrong":
- ROI_MASK_HEAD.* with MASK_ON False: detectron2 reads them only when MASK_ON is True (Base-RCNN-FPN.yaml
  sets them even for box-only models; detectron2 ignores them just the same). With MASK_ON True they are
  checked; INPUT.MASK_FORMAT is read by mask training, which needs 'bitmask'.
- ROI_KEYPOINT_HEAD.*, SEM_SEG_HEAD.*, PANOPTIC_FPN.*, TEST.KEYPOINT_OKS_SIGMAS: detectron2 itself reads
  them only when KEYPOINT_ON is True or META_ARCHITECTURE is PanopticFPN, and those are rejected here.
- RETINANET.*, ROI_BOX_CASCADE_HEAD.*: read only by the RetinaNet meta-architecture and the cascade ROI
  heads, both rejected here.
- ROI_BOX_HEAD.CONV_DIM / NORM: used only by conv layers, and NUM_CONV must be 0.
- ROI_BOX_HEAD.FED_LOSS_*: used only with USE_FED_LOSS, which is rejected.
- RESNETS.DEFORM_MODULATED / DEFORM_NUM_GROUPS: used only by deformable stages, which are rejected.
- ANCHOR_GENERATOR.ANGLES: used only by the rotated anchor generator; anything but the default is rejected
  anyway so that a rotated-box config never passes.
- DATASETS.PROPOSAL_FILES_* / PRECOMPUTED_PROPOSAL_TOPK_*: used only with LOAD_PROPOSALS, rejected.
- MODEL.DEVICE, CUDNN_BENCHMARK, FLOAT32_PRECISION, VIS_PERIOD, GLOBAL.HACK, TEST.PRECISE_BN.* (there is no
  BatchNorm to recompute: FrozenBN is required) and TEST.EXPECTED_RESULTS do not change what is computed.

Settings read only by training are checked when ``training=True`` (the trainer passes it); inference and
export accept a config whatever its training-only settings, because they do not change the network.
"""

from __future__ import annotations

import math
from typing import Any

from frcnn.runtime.errors import ConfigError

from .config import CfgNode

RPN_IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
ROI_IN_FEATURES = ["p2", "p3", "p4", "p5"]
RESNET_STAGES = ["res2", "res3", "res4", "res5"]
RESNET_DEPTHS = (18, 34, 50, 101, 152)


def check_supported(cfg: CfgNode, training: bool = False) -> None:
    """Raise ConfigError naming every setting of ``cfg`` that this product does not implement.

    Args:
        cfg: a full config (``get_cfg()`` merged with a file / overrides).
        training: also check the settings that only training reads (data augmentation, sampler, solver).
    """
    problems: list[str] = []
    _check_meta(cfg, problems)
    _check_backbone(cfg, problems)
    _check_rpn(cfg, problems)
    _check_box_head(cfg, problems)
    _check_mask_head(cfg, problems)
    _check_input_and_test(cfg, problems)
    if training:
        _check_training(cfg, problems)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(
            "the config uses settings that frcnn does not implement (it builds detectron2's Faster R-CNN "
            f"with a ResNet-FPN backbone, Base-RCNN-FPN):\n{lines}\n"
            "Change these keys in the config file (`frcnn train` also takes KEY VALUE overrides) or start from "
            "a packaged config, e.g. COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml."
        )


def _expect(problems: list[str], key: str, value: Any, allowed: tuple | list, why: str = "") -> None:
    """Record a problem when ``value`` (of config key ``key``) is not one of ``allowed``."""
    if value in allowed:
        return
    options = " or ".join(repr(a) for a in allowed)
    problems.append(f"{key} = {value!r}: only {options} is supported{': ' + why if why else ''}")


def _check_meta(cfg: CfgNode, problems: list[str]) -> None:
    m = cfg.MODEL
    _expect(problems, "MODEL.META_ARCHITECTURE", m.META_ARCHITECTURE, ("GeneralizedRCNN",))
    _expect(problems, "MODEL.MASK_ON", m.MASK_ON, (False, True))
    _expect(problems, "MODEL.KEYPOINT_ON", m.KEYPOINT_ON, (False,), "there is no keypoint head")
    _expect(problems, "MODEL.LOAD_PROPOSALS", m.LOAD_PROPOSALS, (False,), "proposals come from the RPN")
    _expect(problems, "MODEL.PROPOSAL_GENERATOR.NAME", m.PROPOSAL_GENERATOR.NAME, ("RPN",))
    _expect(problems, "MODEL.ROI_HEADS.NAME", m.ROI_HEADS.NAME, ("StandardROIHeads",))
    _expect(problems, "MODEL.ROI_HEADS.IN_FEATURES", list(m.ROI_HEADS.IN_FEATURES), (ROI_IN_FEATURES,))
    if len(m.PIXEL_MEAN) != 3 or len(m.PIXEL_STD) != 3:
        problems.append(f"MODEL.PIXEL_MEAN / PIXEL_STD = {m.PIXEL_MEAN!r} / {m.PIXEL_STD!r}: 3 values each "
                        f"are needed (3-channel images)")
    elif any(s == 0 for s in m.PIXEL_STD):
        problems.append(f"MODEL.PIXEL_STD = {m.PIXEL_STD!r}: values must be non-zero")
    if m.ROI_HEADS.NUM_CLASSES < 1:
        problems.append(f"MODEL.ROI_HEADS.NUM_CLASSES = {m.ROI_HEADS.NUM_CLASSES!r}: must be >= 1")


def _check_backbone(cfg: CfgNode, problems: list[str]) -> None:
    m, r = cfg.MODEL, cfg.MODEL.RESNETS
    _expect(problems, "MODEL.BACKBONE.NAME", m.BACKBONE.NAME, ("build_resnet_fpn_backbone",))
    _expect(problems, "MODEL.RESNETS.DEPTH", r.DEPTH, RESNET_DEPTHS)
    _expect(problems, "MODEL.RESNETS.NORM", r.NORM, ("FrozenBN", "BN", "GN"),
            "FrozenBN (detectron2's model zoo), BN (trainable, for training from scratch) and GN are built; "
            "at inference BN is the same per-channel affine as FrozenBN")
    if any(r.DEFORM_ON_PER_STAGE):
        problems.append(f"MODEL.RESNETS.DEFORM_ON_PER_STAGE = {r.DEFORM_ON_PER_STAGE!r}: deformable "
                        f"convolutions are not implemented; use [False, False, False, False]")
    _expect(problems, "MODEL.RESNETS.RES5_DILATION", r.RES5_DILATION, (1,), "dilated res5 (DC5) is not built")
    _expect(problems, "MODEL.RESNETS.NUM_GROUPS", r.NUM_GROUPS, (1,), "ResNeXt is not built")
    if r.DEPTH in (18, 34):
        _expect(problems, "MODEL.RESNETS.RES2_OUT_CHANNELS", r.RES2_OUT_CHANNELS, (64,),
                f"ResNet-{r.DEPTH} uses basic blocks whose res2 width is 64 (as detectron2 requires)")
    _expect(problems, "MODEL.RESNETS.OUT_FEATURES", list(r.OUT_FEATURES), (RESNET_STAGES,))
    _expect(problems, "MODEL.FPN.IN_FEATURES", list(m.FPN.IN_FEATURES), (RESNET_STAGES,))
    _expect(problems, "MODEL.FPN.NORM", m.FPN.NORM, ("",), "FPN convs have no normalization")
    _expect(problems, "MODEL.FPN.FUSE_TYPE", m.FPN.FUSE_TYPE, ("sum",))
    if not 0 <= m.BACKBONE.FREEZE_AT <= 5:
        problems.append(f"MODEL.BACKBONE.FREEZE_AT = {m.BACKBONE.FREEZE_AT!r}: must be in 0..5")


def _check_rpn(cfg: CfgNode, problems: list[str]) -> None:
    m, a = cfg.MODEL, cfg.MODEL.ANCHOR_GENERATOR
    _expect(problems, "MODEL.RPN.HEAD_NAME", m.RPN.HEAD_NAME, ("StandardRPNHead",))
    _expect(problems, "MODEL.RPN.IN_FEATURES", list(m.RPN.IN_FEATURES), (RPN_IN_FEATURES,))
    _expect(problems, "MODEL.RPN.CONV_DIMS", list(m.RPN.CONV_DIMS), ([-1], [m.FPN.OUT_CHANNELS]),
            "the RPN head has one 3x3 conv as wide as the FPN")
    _expect(problems, "MODEL.RPN.BBOX_REG_LOSS_TYPE", m.RPN.BBOX_REG_LOSS_TYPE, ("smooth_l1",),
            "smooth L1 (plain L1 with SMOOTH_L1_BETA 0.0)")
    _expect(problems, "MODEL.ANCHOR_GENERATOR.NAME", a.NAME, ("DefaultAnchorGenerator",))
    _expect(problems, "MODEL.ANCHOR_GENERATOR.ANGLES", _as_lists(a.ANGLES), ([[-90, 0, 90]],),
            "angles belong to the rotated anchor generator")
    levels = len(RPN_IN_FEATURES)
    sizes, ratios = list(a.SIZES), list(a.ASPECT_RATIOS)
    if len(sizes) not in (1, levels) or len(ratios) not in (1, levels):
        problems.append(f"MODEL.ANCHOR_GENERATOR.SIZES = {sizes!r} (ASPECT_RATIOS = {ratios!r}): give one "
                        f"list for all {levels} levels or one list per level")
    elif len({len(sizes[i % len(sizes)]) * len(ratios[i % len(ratios)]) for i in range(levels)}) != 1:
        problems.append(f"MODEL.ANCHOR_GENERATOR.SIZES = {sizes!r} (ASPECT_RATIOS = {ratios!r}): every "
                        f"level needs the same number of anchors (the RPN head is shared)")
    if not 0.0 <= a.OFFSET < 1.0:
        problems.append(f"MODEL.ANCHOR_GENERATOR.OFFSET = {a.OFFSET!r}: must be in [0, 1)")
    if len(m.RPN.BBOX_REG_WEIGHTS) != 4:
        problems.append(f"MODEL.RPN.BBOX_REG_WEIGHTS = {m.RPN.BBOX_REG_WEIGHTS!r}: 4 weights are needed")


def _check_box_head(cfg: CfgNode, problems: list[str]) -> None:
    h = cfg.MODEL.ROI_BOX_HEAD
    _expect(problems, "MODEL.ROI_BOX_HEAD.NAME", h.NAME, ("FastRCNNConvFCHead",))
    _expect(problems, "MODEL.ROI_BOX_HEAD.NUM_CONV", h.NUM_CONV, (0,), "the box head has FC layers only")
    if h.NUM_FC < 1:
        problems.append(f"MODEL.ROI_BOX_HEAD.NUM_FC = {h.NUM_FC!r}: at least one FC layer is built "
                        f"(detectron2's FPN configs use 2)")
    _expect(problems, "MODEL.ROI_BOX_HEAD.POOLER_TYPE", h.POOLER_TYPE, ("ROIAlignV2",))
    if h.POOLER_RESOLUTION < 1 or h.POOLER_SAMPLING_RATIO < 0:
        problems.append(f"MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION / POOLER_SAMPLING_RATIO = "
                        f"{h.POOLER_RESOLUTION!r} / {h.POOLER_SAMPLING_RATIO!r}: need >= 1 / >= 0")
    _expect(problems, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", h.CLS_AGNOSTIC_BBOX_REG, (False,),
            "box regression is class-specific")
    _expect(problems, "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", h.BBOX_REG_LOSS_TYPE, ("smooth_l1",),
            "smooth L1 (plain L1 with SMOOTH_L1_BETA 0.0)")
    _expect(problems, "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", h.USE_SIGMOID_CE, (False,),
            "scores are a softmax over classes + background")
    _expect(problems, "MODEL.ROI_BOX_HEAD.USE_FED_LOSS", h.USE_FED_LOSS, (False,))
    _expect(problems, "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES", h.TRAIN_ON_PRED_BOXES, (False,))
    if len(h.BBOX_REG_WEIGHTS) != 4:
        problems.append(f"MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = {h.BBOX_REG_WEIGHTS!r}: 4 weights are needed")


def _check_mask_head(cfg: CfgNode, problems: list[str]) -> None:
    if not cfg.MODEL.MASK_ON:
        return
    h = cfg.MODEL.ROI_MASK_HEAD
    _expect(problems, "MODEL.ROI_MASK_HEAD.NAME", h.NAME, ("MaskRCNNConvUpsampleHead",))
    _expect(problems, "MODEL.ROI_MASK_HEAD.POOLER_TYPE", h.POOLER_TYPE, ("ROIAlignV2",))
    _expect(problems, "MODEL.ROI_MASK_HEAD.NORM", h.NORM, ("",), "the mask head convs have no normalization")
    if h.POOLER_RESOLUTION < 1 or h.POOLER_SAMPLING_RATIO < 0 or h.NUM_CONV < 0 or h.CONV_DIM < 1:
        problems.append(f"MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION / POOLER_SAMPLING_RATIO / NUM_CONV / CONV_DIM = "
                        f"{h.POOLER_RESOLUTION!r} / {h.POOLER_SAMPLING_RATIO!r} / {h.NUM_CONV!r} / {h.CONV_DIM!r}: "
                        f"need >= 1 / >= 0 / >= 0 / >= 1")


def _check_input_and_test(cfg: CfgNode, problems: list[str]) -> None:
    _expect(problems, "INPUT.FORMAT", cfg.INPUT.FORMAT, ("BGR", "RGB"))
    _expect(problems, "TEST.AUG.ENABLED", cfg.TEST.AUG.ENABLED, (False,), "test-time augmentation is not built")
    if cfg.TEST.DETECTIONS_PER_IMAGE < 1:
        problems.append(f"TEST.DETECTIONS_PER_IMAGE = {cfg.TEST.DETECTIONS_PER_IMAGE!r}: must be >= 1")
    if cfg.INPUT.MIN_SIZE_TEST < 1 or cfg.INPUT.MAX_SIZE_TEST < cfg.INPUT.MIN_SIZE_TEST:
        problems.append(f"INPUT.MIN_SIZE_TEST / MAX_SIZE_TEST = {cfg.INPUT.MIN_SIZE_TEST!r} / "
                        f"{cfg.INPUT.MAX_SIZE_TEST!r}: need 1 <= MIN_SIZE_TEST <= MAX_SIZE_TEST (a resize "
                        f"to a fixed shortest edge is always applied)")


def _check_training(cfg: CfgNode, problems: list[str]) -> None:
    """Training-only features that the trainer does not implement (relax here when it does)."""
    if cfg.MODEL.MASK_ON:
        _expect(problems, "INPUT.MASK_FORMAT", cfg.INPUT.MASK_FORMAT, ("bitmask",),
                "mask targets are detectron2's bitmask ones (ROIAlign of the decoded mask); detectron2's "
                "'polygon' targets rasterise polygons per box instead and are not built")
    _expect(problems, "INPUT.MIN_SIZE_TRAIN_SAMPLING", cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING, ("choice",))
    _expect(problems, "INPUT.RANDOM_FLIP", cfg.INPUT.RANDOM_FLIP, ("horizontal", "none"))
    _expect(problems, "INPUT.CROP.ENABLED", cfg.INPUT.CROP.ENABLED, (False,), "random crop is not built")
    _expect(problems, "DATALOADER.SAMPLER_TRAIN", cfg.DATALOADER.SAMPLER_TRAIN, ("TrainingSampler",))
    _expect(problems, "MODEL.RPN.BOUNDARY_THRESH", cfg.MODEL.RPN.BOUNDARY_THRESH, (-1,),
            "anchors outside the image are not pruned")
    s = cfg.SOLVER
    _expect(problems, "SOLVER.LR_SCHEDULER_NAME", s.LR_SCHEDULER_NAME, ("WarmupMultiStepLR",))
    _expect(problems, "SOLVER.WARMUP_METHOD", s.WARMUP_METHOD, ("linear", "constant"))
    _expect(problems, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", s.CLIP_GRADIENTS.CLIP_TYPE, ("value", "norm"))
    _expect(problems, "SOLVER.REFERENCE_WORLD_SIZE", s.REFERENCE_WORLD_SIZE, (0,),
            "batch size and learning rate are not rescaled automatically")
    # Steps beyond MAX_ITER are never reached (detectron2 ignores them with a warning): allowed.
    if list(s.STEPS) != sorted(s.STEPS):
        problems.append(f"SOLVER.STEPS = {s.STEPS!r}: must be increasing")
    _check_solver_numbers(cfg, problems)


def _check_solver_numbers(cfg: CfgNode, problems: list[str]) -> None:
    """Numbers that would make training meaningless (NaN learning rate, no iterations, empty batches)."""
    s = cfg.SOLVER
    for key, low, low_ok in (("BASE_LR", 0.0, False), ("MOMENTUM", 0.0, True), ("WEIGHT_DECAY", 0.0, True),
                             ("GAMMA", 0.0, False), ("WARMUP_FACTOR", 0.0, False)):  # fmt: skip
        value = s[key]
        if value is None or not math.isfinite(float(value)) or (float(value) < low if low_ok else float(value) <= low):
            problems.append(f"SOLVER.{key} = {value!r}: must be a finite number {'>=' if low_ok else '>'} {low}")
    for key, low in (("MAX_ITER", 1), ("IMS_PER_BATCH", 1), ("WARMUP_ITERS", 0)):
        if s[key] is None or int(s[key]) < low:
            problems.append(f"SOLVER.{key} = {s[key]!r}: must be an integer >= {low}")
    if any(int(step) < 0 for step in s.STEPS):
        problems.append(f"SOLVER.STEPS = {s.STEPS!r}: iterations must be >= 0")
    sizes = list(cfg.INPUT.MIN_SIZE_TRAIN) if isinstance(cfg.INPUT.MIN_SIZE_TRAIN, (list, tuple)) else [
        cfg.INPUT.MIN_SIZE_TRAIN]  # fmt: skip
    if not sizes or any(int(v) < 1 for v in sizes) or int(cfg.INPUT.MAX_SIZE_TRAIN) < 1:
        problems.append(f"INPUT.MIN_SIZE_TRAIN / MAX_SIZE_TRAIN = {cfg.INPUT.MIN_SIZE_TRAIN!r} / "
                        f"{cfg.INPUT.MAX_SIZE_TRAIN!r}: image sides must be >= 1")  # fmt: skip
    if int(cfg.DATALOADER.NUM_WORKERS) < 0:
        problems.append(f"DATALOADER.NUM_WORKERS = {cfg.DATALOADER.NUM_WORKERS!r}: must be >= 0")


def _as_lists(value: Any) -> Any:
    """Nested tuples -> nested lists, so that YAML lists and Python tuples compare equal."""
    if isinstance(value, (list, tuple)):
        return [_as_lists(v) for v in value]
    return value
