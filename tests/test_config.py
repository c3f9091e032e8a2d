"""Config system: detectron2's defaults, YAML with _BASE_, typed overrides, errors, packaged configs."""

import os
import pickle

import pytest
import yaml
from frcnn.runtime.errors import ConfigError
from frcnn.trainer.config import CfgNode, available_configs, check_supported, get_cfg, model_zoo_config

# Values read from detectron2's detectron2/config/defaults.py (main branch), key by key.
DETECTRON2_DEFAULTS = {
    "VERSION": 2,
    "MODEL.LOAD_PROPOSALS": False, "MODEL.MASK_ON": False, "MODEL.KEYPOINT_ON": False,
    "MODEL.DEVICE": "cuda", "MODEL.META_ARCHITECTURE": "GeneralizedRCNN", "MODEL.WEIGHTS": "",
    "MODEL.PIXEL_MEAN": [103.530, 116.280, 123.675], "MODEL.PIXEL_STD": [1.0, 1.0, 1.0],
    "INPUT.MIN_SIZE_TRAIN": (800,), "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice", "INPUT.MAX_SIZE_TRAIN": 1333,
    "INPUT.MIN_SIZE_TEST": 800, "INPUT.MAX_SIZE_TEST": 1333, "INPUT.RANDOM_FLIP": "horizontal",
    "INPUT.CROP.ENABLED": False, "INPUT.CROP.TYPE": "relative_range", "INPUT.CROP.SIZE": [0.9, 0.9],
    "INPUT.FORMAT": "BGR", "INPUT.MASK_FORMAT": "polygon",
    "DATASETS.TRAIN": (), "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN": 2000,
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST": 1000,
    "DATALOADER.NUM_WORKERS": 4, "DATALOADER.ASPECT_RATIO_GROUPING": True,
    "DATALOADER.SAMPLER_TRAIN": "TrainingSampler", "DATALOADER.REPEAT_THRESHOLD": 0.0,
    "DATALOADER.REPEAT_SQRT": True, "DATALOADER.FILTER_EMPTY_ANNOTATIONS": True,
    "MODEL.BACKBONE.NAME": "build_resnet_backbone", "MODEL.BACKBONE.FREEZE_AT": 2,
    "MODEL.FPN.IN_FEATURES": [], "MODEL.FPN.OUT_CHANNELS": 256, "MODEL.FPN.NORM": "",
    "MODEL.FPN.FUSE_TYPE": "sum",
    "MODEL.PROPOSAL_GENERATOR.NAME": "RPN", "MODEL.PROPOSAL_GENERATOR.MIN_SIZE": 0,
    "MODEL.ANCHOR_GENERATOR.NAME": "DefaultAnchorGenerator",
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32, 64, 128, 256, 512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.ANCHOR_GENERATOR.ANGLES": [[-90, 0, 90]], "MODEL.ANCHOR_GENERATOR.OFFSET": 0.0,
    "MODEL.RPN.HEAD_NAME": "StandardRPNHead", "MODEL.RPN.IN_FEATURES": ["res4"],
    "MODEL.RPN.BOUNDARY_THRESH": -1, "MODEL.RPN.IOU_THRESHOLDS": [0.3, 0.7], "MODEL.RPN.IOU_LABELS": [0, -1, 1],
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 256, "MODEL.RPN.POSITIVE_FRACTION": 0.5,
    "MODEL.RPN.BBOX_REG_LOSS_TYPE": "smooth_l1", "MODEL.RPN.BBOX_REG_LOSS_WEIGHT": 1.0,
    "MODEL.RPN.BBOX_REG_WEIGHTS": (1.0, 1.0, 1.0, 1.0), "MODEL.RPN.SMOOTH_L1_BETA": 0.0,
    "MODEL.RPN.LOSS_WEIGHT": 1.0, "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 12000, "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 2000, "MODEL.RPN.POST_NMS_TOPK_TEST": 1000, "MODEL.RPN.NMS_THRESH": 0.7,
    "MODEL.RPN.CONV_DIMS": [-1],
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeads", "MODEL.ROI_HEADS.NUM_CLASSES": 80,
    "MODEL.ROI_HEADS.IN_FEATURES": ["res4"], "MODEL.ROI_HEADS.IOU_THRESHOLDS": [0.5],
    "MODEL.ROI_HEADS.IOU_LABELS": [0, 1], "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 512,
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": 0.25, "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.05,
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": 0.5, "MODEL.ROI_HEADS.PROPOSAL_APPEND_GT": True,
    "MODEL.ROI_BOX_HEAD.NAME": "", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": "smooth_l1",
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": 1.0, "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": (10.0, 10.0, 5.0, 5.0),
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 0.0, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 14,
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": 0, "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "ROIAlignV2",
    "MODEL.ROI_BOX_HEAD.NUM_FC": 0, "MODEL.ROI_BOX_HEAD.FC_DIM": 1024, "MODEL.ROI_BOX_HEAD.NUM_CONV": 0,
    "MODEL.ROI_BOX_HEAD.CONV_DIM": 256, "MODEL.ROI_BOX_HEAD.NORM": "",
    "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG": False, "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES": False,
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS": False, "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE": False,
    "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER": 0.5, "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES": 50,
    "MODEL.ROI_BOX_CASCADE_HEAD.IOUS": (0.5, 0.6, 0.7),
    "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NUM_CONV": 0,
    "MODEL.ROI_KEYPOINT_HEAD.CONV_DIMS": (512,) * 8, "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS": 17,
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": 54, "MODEL.SEM_SEG_HEAD.NORM": "GN",
    "MODEL.PANOPTIC_FPN.COMBINE.ENABLED": True, "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT": 4096,
    "MODEL.RETINANET.IN_FEATURES": ["p3", "p4", "p5", "p6", "p7"], "MODEL.RETINANET.SMOOTH_L1_LOSS_BETA": 0.1,
    "MODEL.RESNETS.DEPTH": 50, "MODEL.RESNETS.OUT_FEATURES": ["res4"], "MODEL.RESNETS.NUM_GROUPS": 1,
    "MODEL.RESNETS.NORM": "FrozenBN", "MODEL.RESNETS.WIDTH_PER_GROUP": 64, "MODEL.RESNETS.STRIDE_IN_1X1": True,
    "MODEL.RESNETS.RES5_DILATION": 1, "MODEL.RESNETS.RES2_OUT_CHANNELS": 256,
    "MODEL.RESNETS.STEM_OUT_CHANNELS": 64, "MODEL.RESNETS.DEFORM_ON_PER_STAGE": [False] * 4,
    "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR", "SOLVER.MAX_ITER": 40000, "SOLVER.BASE_LR": 0.001,
    "SOLVER.BASE_LR_END": 0.0, "SOLVER.MOMENTUM": 0.9, "SOLVER.NESTEROV": False, "SOLVER.WEIGHT_DECAY": 0.0001,
    "SOLVER.WEIGHT_DECAY_NORM": 0.0, "SOLVER.GAMMA": 0.1, "SOLVER.STEPS": (30000,), "SOLVER.NUM_DECAYS": 3,
    "SOLVER.WARMUP_FACTOR": 0.001, "SOLVER.WARMUP_ITERS": 1000, "SOLVER.WARMUP_METHOD": "linear",
    "SOLVER.RESCALE_INTERVAL": False, "SOLVER.CHECKPOINT_PERIOD": 5000, "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.REFERENCE_WORLD_SIZE": 0, "SOLVER.BIAS_LR_FACTOR": 1.0, "SOLVER.WEIGHT_DECAY_BIAS": None,
    "SOLVER.CLIP_GRADIENTS.ENABLED": False, "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": "value",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": 1.0, "SOLVER.CLIP_GRADIENTS.NORM_TYPE": 2.0, "SOLVER.AMP.ENABLED": False,
    "TEST.EXPECTED_RESULTS": [], "TEST.EVAL_PERIOD": 0, "TEST.KEYPOINT_OKS_SIGMAS": [],
    "TEST.DETECTIONS_PER_IMAGE": 100, "TEST.AUG.ENABLED": False,
    "TEST.AUG.MIN_SIZES": (400, 500, 600, 700, 800, 900, 1000, 1100, 1200), "TEST.AUG.MAX_SIZE": 4000,
    "TEST.AUG.FLIP": True, "TEST.PRECISE_BN.ENABLED": False, "TEST.PRECISE_BN.NUM_ITER": 200,
    "OUTPUT_DIR": "./output", "SEED": -1, "CUDNN_BENCHMARK": False, "FLOAT32_PRECISION": "", "VIS_PERIOD": 0,
    "GLOBAL.HACK": 1.0,
}

# detectron2's configs/Base-RCNN-FPN.yaml, verbatim.
D2_BASE_RCNN_FPN = """\
MODEL:
  META_ARCHITECTURE: "GeneralizedRCNN"
  BACKBONE:
    NAME: "build_resnet_fpn_backbone"
  RESNETS:
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
  FPN:
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
  ANCHOR_GENERATOR:
    SIZES: [[32], [64], [128], [256], [512]]  # One size for each in feature map
    ASPECT_RATIOS: [[0.5, 1.0, 2.0]]  # Three aspect ratios (same for all in feature maps)
  RPN:
    IN_FEATURES: ["p2", "p3", "p4", "p5", "p6"]
    PRE_NMS_TOPK_TRAIN: 2000  # Per FPN level
    PRE_NMS_TOPK_TEST: 1000  # Per FPN level
    # Detectron1 uses 2000 proposals per-batch,
    # (See "modeling/rpn/rpn_outputs.py" for details of this legacy issue)
    # which is approximately 1000 proposals per-image since the default batch size for FPN is 2.
    POST_NMS_TOPK_TRAIN: 1000
    POST_NMS_TOPK_TEST: 1000
  ROI_HEADS:
    NAME: "StandardROIHeads"
    IN_FEATURES: ["p2", "p3", "p4", "p5"]
  ROI_BOX_HEAD:
    NAME: "FastRCNNConvFCHead"
    NUM_FC: 2
    POOLER_RESOLUTION: 7
  ROI_MASK_HEAD:
    NAME: "MaskRCNNConvUpsampleHead"
    NUM_CONV: 4
    POOLER_RESOLUTION: 14
DATASETS:
  TRAIN: ("coco_2017_train",)
  TEST: ("coco_2017_val",)
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.02
  STEPS: (60000, 80000)
  MAX_ITER: 90000
INPUT:
  MIN_SIZE_TRAIN: (640, 672, 704, 736, 768, 800)
VERSION: 2
"""

# detectron2's configs/COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml and mask_rcnn_R_50_FPN_3x.yaml, verbatim.
D2_R50_FPN_3X = """\
_BASE_: "../Base-RCNN-FPN.yaml"
MODEL:
  WEIGHTS: "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
  MASK_ON: False
  RESNETS:
    DEPTH: 50
SOLVER:
  STEPS: (210000, 250000)
  MAX_ITER: 270000
"""
D2_MASK_R50_FPN_3X = D2_R50_FPN_3X.replace("MASK_ON: False", "MASK_ON: True")


def _get(cfg, full_key):
    node = cfg
    for part in full_key.split("."):
        node = node[part]
    return node


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


@pytest.fixture
def d2_tree(tmp_path):
    """detectron2's config layout: configs/Base-RCNN-FPN.yaml, configs/COCO-Detection/*.yaml."""
    _write(tmp_path / "configs" / "Base-RCNN-FPN.yaml", D2_BASE_RCNN_FPN)
    r50 = _write(tmp_path / "configs" / "COCO-Detection" / "faster_rcnn_R_50_FPN_3x.yaml", D2_R50_FPN_3X)
    mask = _write(tmp_path / "configs" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_3x.yaml",
                  D2_MASK_R50_FPN_3X)
    return r50, mask


# ---- defaults ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", sorted(DETECTRON2_DEFAULTS))
def test_default_equals_detectron2(key):
    value = _get(get_cfg(), key)
    expected = DETECTRON2_DEFAULTS[key]
    assert value == expected and type(value) is type(expected), (key, value)


def test_get_cfg_returns_independent_copies():
    a, b = get_cfg(), get_cfg()
    a.MODEL.RESNETS.DEPTH = 101
    a.MODEL.PIXEL_MEAN[0] = 0.0
    assert b.MODEL.RESNETS.DEPTH == 50 and b.MODEL.PIXEL_MEAN[0] == 103.53


# ---- YAML + _BASE_ ----------------------------------------------------------------------------------------
def test_detectron2_yaml_chain_loads_unchanged(d2_tree):
    r50, _ = d2_tree
    cfg = get_cfg()
    cfg.merge_from_file(r50)
    assert cfg.MODEL.BACKBONE.NAME == "build_resnet_fpn_backbone"
    assert cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[32], [64], [128], [256], [512]]
    assert cfg.MODEL.RPN.PRE_NMS_TOPK_TEST == 1000 and cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN == 1000
    assert cfg.MODEL.ROI_BOX_HEAD.NUM_FC == 2 and cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION == 7
    assert cfg.MODEL.ROI_MASK_HEAD.NUM_CONV == 4  # set by the base file, harmless with MASK_ON False
    assert cfg.SOLVER.STEPS == (210000, 250000) and cfg.SOLVER.MAX_ITER == 270000  # child wins
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.DATASETS.TRAIN == ("coco_2017_train",)
    assert cfg.INPUT.MIN_SIZE_TRAIN == (640, 672, 704, 736, 768, 800)  # YAML string -> tuple, like yacs
    assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    check_supported(cfg, training=True)


def test_packaged_configs_equal_detectron2_files(d2_tree):
    r50, _ = d2_tree
    ours, theirs = get_cfg(), get_cfg()
    ours.merge_from_file(model_zoo_config("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"))
    theirs.merge_from_file(r50)
    assert ours == theirs


def test_base_list_nested_relative_and_precedence(tmp_path):
    _write(tmp_path / "a" / "one.yaml", "MODEL:\n  RESNETS:\n    DEPTH: 101\nSOLVER:\n  BASE_LR: 0.5\n")
    _write(tmp_path / "b" / "two.yaml", "_BASE_: ../a/one.yaml\nSOLVER:\n  BASE_LR: 0.25\n  MAX_ITER: 7\n")
    _write(tmp_path / "c" / "three.yaml", "SOLVER:\n  MAX_ITER: 9\n")
    leaf = _write(tmp_path / "leaf" / "leaf.yaml",
                  "_BASE_: ['../b/two.yaml', '../c/three.yaml']\nSOLVER:\n  GAMMA: 0.5\n")
    cfg = get_cfg()
    cfg.merge_from_file(leaf)
    assert cfg.MODEL.RESNETS.DEPTH == 101  # from a base of a base, path relative to b/two.yaml
    assert cfg.SOLVER.BASE_LR == 0.25  # two.yaml overrides its base
    assert cfg.SOLVER.MAX_ITER == 9  # later base in the list wins
    assert cfg.SOLVER.GAMMA == 0.5


def test_base_errors(tmp_path):
    missing = _write(tmp_path / "m.yaml", "_BASE_: nope.yaml\n")
    with pytest.raises(ConfigError, match="nope.yaml.*does not exist.*m.yaml"):
        get_cfg().merge_from_file(missing)
    loop = _write(tmp_path / "x.yaml", "_BASE_: y.yaml\n")
    _write(tmp_path / "y.yaml", "_BASE_: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        get_cfg().merge_from_file(loop)
    with pytest.raises(ConfigError, match="does not exist"):
        get_cfg().merge_from_file(tmp_path / "absent.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    evil = _write(tmp_path / "evil.yaml", "SEED: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match=r"evil.yaml.*SEED uses the YAML tag !!python/object/apply:os.getcwd"):
        get_cfg().merge_from_file(evil)  # refused, never evaluated
    bad = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        get_cfg().merge_from_file(bad)


def test_unknown_key_in_file_names_file_and_suggests(tmp_path):
    typo = _write(tmp_path / "typo.yaml", "MODEL:\n  ROI_HEADS:\n    NUM_CLASS: 3\n")
    with pytest.raises(ConfigError) as info:
        get_cfg().merge_from_file(typo)
    msg = str(info.value)
    assert "typo.yaml" in msg and "MODEL.ROI_HEADS.NUM_CLASS" in msg and "MODEL.ROI_HEADS.NUM_CLASSES" in msg


def test_type_mismatch_in_file(tmp_path):
    bad = _write(tmp_path / "bad.yaml", "MODEL:\n  RESNETS:\n    DEPTH: fifty\n")
    with pytest.raises(ConfigError, match="bad.yaml.*MODEL.RESNETS.DEPTH.*int.*'fifty'"):
        get_cfg().merge_from_file(bad)


def test_version1_file_is_upgraded(tmp_path):
    old = _write(tmp_path / "v1.yaml", "MODEL:\n  WEIGHT: w.pkl\n  RPN:\n    ANCHOR_SIZES: [[16, 32]]\n"
                                       "  RPN_HEAD:\n    NAME: StandardRPNHead\nTEST:\n  AUG_ON: True\n"
                                       "  DETECTIONS_PER_IMG: 50\n")
    cfg = get_cfg()
    cfg.merge_from_file(old)
    assert cfg.MODEL.WEIGHTS == "w.pkl" and cfg.MODEL.ANCHOR_GENERATOR.SIZES == [[16, 32]]
    assert cfg.MODEL.RPN.HEAD_NAME == "StandardRPNHead"
    assert cfg.TEST.AUG.ENABLED is True and cfg.TEST.DETECTIONS_PER_IMAGE == 50 and cfg.VERSION == 2
    future = _write(tmp_path / "v3.yaml", "VERSION: 3\n")
    with pytest.raises(ConfigError, match="VERSION 3"):
        get_cfg().merge_from_file(future)


# ---- merge_from_list ----------------------------------------------------------------------------------------
def test_merge_from_list_parses_literals_and_coerces():
    cfg = get_cfg()
    cfg.merge_from_list([
        "MODEL.ROI_HEADS.NUM_CLASSES", "3",
        "SOLVER.STEPS", "(1000, 1300)",
        "INPUT.MIN_SIZE_TRAIN", "[320, 352]",  # list -> tuple like the default
        "MODEL.PIXEL_MEAN", "(1, 2, 3)",  # tuple -> list
        "SOLVER.BASE_LR", "1",  # int -> float
        "INPUT.FORMAT", "RGB",  # not a literal: stays a string
        "MODEL.WEIGHTS", "1.0",  # a string key keeps the text
        "SOLVER.WEIGHT_DECAY_BIAS", "0.001",  # None default accepts a value
        "MODEL.MASK_ON", "False",
    ])
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 3 and type(cfg.MODEL.ROI_HEADS.NUM_CLASSES) is int
    assert cfg.SOLVER.STEPS == (1000, 1300)
    assert cfg.INPUT.MIN_SIZE_TRAIN == (320, 352) and type(cfg.INPUT.MIN_SIZE_TRAIN) is tuple
    assert cfg.MODEL.PIXEL_MEAN == [1, 2, 3] and type(cfg.MODEL.PIXEL_MEAN) is list
    assert cfg.SOLVER.BASE_LR == 1.0 and type(cfg.SOLVER.BASE_LR) is float
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.WEIGHTS == "1.0" and cfg.SOLVER.WEIGHT_DECAY_BIAS == 0.001
    assert cfg.MODEL.MASK_ON is False


@pytest.mark.parametrize("pair, pattern", [
    (["MODEL.RESNETS.DEPTH", "abc"], r"MODEL.RESNETS.DEPTH: expected int .*50.*got str 'abc'"),
    (["MODEL.RESNETS.DEPTH", "50.0"], r"MODEL.RESNETS.DEPTH: expected int"),  # no float -> int
    (["MODEL.MASK_ON", "1"], r"MODEL.MASK_ON: expected bool"),
    (["SOLVER.STEPS", "100"], r"SOLVER.STEPS: expected tuple"),
    (["MODEL.RESNETS", "3"], r"MODEL.RESNETS must be a mapping of sub-keys"),
    (["MODEL.RESNETS.DEPHT", "3"], r"unknown config key MODEL.RESNETS.DEPHT; did you mean MODEL.RESNETS.DEPTH"),
    (["MODLE.WEIGHTS", "x"], r"unknown config key MODLE.WEIGHTS; did you mean MODEL.WEIGHTS"),
    (["MODEL.WEIGHT", "x"], r"renamed to 'MODEL.WEIGHTS'"),
    (["MODEL.WEIGHTS.X", "x"], r"unknown config key MODEL.WEIGHTS.X"),
    (["MODEL.WEIGHTS"], r"KEY VALUE pairs"),
])
def test_merge_from_list_errors(pair, pattern):
    cfg = get_cfg()
    with pytest.raises(ConfigError, match=pattern):
        cfg.merge_from_list(pair)


def test_merge_from_other_cfg_checks_keys_and_types():
    cfg = get_cfg()
    cfg.merge_from_other_cfg({"MODEL": {"RPN": {"NMS_THRESH": 0.6}}})
    assert cfg.MODEL.RPN.NMS_THRESH == 0.6 and cfg.MODEL.RPN.PRE_NMS_TOPK_TEST == 6000
    with pytest.raises(ConfigError, match="MODEL.RPN.NMS_THRES;"):
        cfg.merge_from_other_cfg(CfgNode({"MODEL": {"RPN": {"NMS_THRES": 0.6}}}))


# ---- freeze / clone / dump ------------------------------------------------------------------------------------
def test_freeze_defrost_clone_pickle():
    cfg = get_cfg()
    cfg.freeze()
    assert cfg.is_frozen() and cfg.MODEL.RPN.is_frozen()
    with pytest.raises(AttributeError, match="frozen"):
        cfg.MODEL.RPN.NMS_THRESH = 0.1
    with pytest.raises(AttributeError, match="frozen"):
        cfg.merge_from_list(["SEED", "1"])
    clone = cfg.clone()
    assert clone == cfg and clone.is_frozen() and clone is not cfg
    restored = pickle.loads(pickle.dumps(cfg))
    assert restored == cfg and restored.MODEL.is_frozen()
    clone.defrost()
    clone.SEED = 7
    assert cfg.SEED == -1 and clone.SEED == 7
    with pytest.raises(AttributeError):
        _ = cfg.NOT_A_KEY


def test_dump_round_trips(tmp_path):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config("frcnn-small-R18.yaml"))
    cfg.merge_from_list(["MODEL.WEIGHTS", "1.0", "OUTPUT_DIR", "True", "SOLVER.WEIGHT_DECAY_BIAS", "0.5",
                         "SOLVER.CLIP_GRADIENTS.NORM_TYPE", ".inf"])
    assert cfg.SOLVER.CLIP_GRADIENTS.NORM_TYPE == float("inf")
    text = cfg.dump()
    assert "!!" not in text  # plain YAML, no Python tags
    path = _write(tmp_path / "dumped.yaml", text)
    again = get_cfg()
    again.merge_from_file(path)
    assert again == cfg
    assert yaml.safe_load(text)["MODEL"]["RESNETS"]["DEPTH"] == 18


# ---- packaged configs and check_supported -------------------------------------------------------------------
def test_model_zoo_config_lists_names_on_error():
    with pytest.raises(ConfigError, match="faster_rcnn_R_50_FPN_3x.yaml"):
        model_zoo_config("COCO-Detection/faster_rcnn_R_50_FPN_9x.yaml")


@pytest.mark.parametrize("name", available_configs())
def test_every_packaged_config_loads_and_is_supported(name):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config(name))
    if name == "Base-RCNN-FPN.yaml":
        assert cfg.MODEL.RESNETS.DEPTH == 50
    check_supported(cfg, training=not cfg.MODEL.MASK_ON)  # mask training needs INPUT.MASK_FORMAT bitmask


def test_packaged_config_values():
    expected = {
        "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml": (50, (60000, 80000), 90000, "MSRA/R-50.pkl"),
        "COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml": (50, (210000, 250000), 270000, "MSRA/R-50.pkl"),
        "COCO-Detection/faster_rcnn_R_101_FPN_1x.yaml": (101, (60000, 80000), 90000, "MSRA/R-101.pkl"),
        "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml": (101, (210000, 250000), 270000, "MSRA/R-101.pkl"),
    }
    for name, (depth, steps, max_iter, weights) in expected.items():
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo_config(name))
        assert (cfg.MODEL.RESNETS.DEPTH, cfg.SOLVER.STEPS, cfg.SOLVER.MAX_ITER) == (depth, steps, max_iter)
        assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/" + weights
    small = get_cfg()
    small.merge_from_file(model_zoo_config("frcnn-small-R18.yaml"))
    assert small.MODEL.RESNETS.DEPTH == 18 and small.MODEL.RESNETS.RES2_OUT_CHANNELS == 64
    assert small.MODEL.ROI_HEADS.NUM_CLASSES == 3 and small.MODEL.WEIGHTS == ""
    assert (small.INPUT.MIN_SIZE_TEST, small.INPUT.MAX_SIZE_TEST) == (320, 512)
    assert small.MODEL.RPN.PRE_NMS_TOPK_TEST == 1000 and small.MODEL.RPN.NMS_THRESH == 0.7


def test_detectron2_mask_rcnn_loads_and_equals_packaged(d2_tree):
    _, mask = d2_tree
    cfg, ours = get_cfg(), get_cfg()
    cfg.merge_from_file(mask)  # detectron2's own file loads unchanged
    ours.merge_from_file(model_zoo_config("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    assert ours == cfg and cfg.MODEL.MASK_ON is True and cfg.MODEL.ROI_MASK_HEAD.NUM_CONV == 4
    check_supported(cfg)  # inference and export build the mask head
    with pytest.raises(ConfigError, match=r"INPUT.MASK_FORMAT = 'polygon': only 'bitmask' is supported"):
        check_supported(cfg, training=True)
    cfg.merge_from_list(["INPUT.MASK_FORMAT", "bitmask"])
    check_supported(cfg, training=True)


@pytest.mark.parametrize("name, depth, iters", [("mask_rcnn_R_50_FPN_1x.yaml", 50, 90000),
                                                ("mask_rcnn_R_50_FPN_3x.yaml", 50, 270000),
                                                ("mask_rcnn_R_101_FPN_3x.yaml", 101, 270000)])
def test_packaged_mask_configs(name, depth, iters):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config("COCO-InstanceSegmentation/" + name))
    assert cfg.MODEL.MASK_ON is True and cfg.MODEL.RESNETS.DEPTH == depth and cfg.SOLVER.MAX_ITER == iters
    assert cfg.MODEL.WEIGHTS == f"detectron2://ImageNetPretrained/MSRA/R-{depth}.pkl"
    check_supported(cfg)


@pytest.mark.parametrize("key, value", [
    ("MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNPointRendHead"), ("MODEL.ROI_MASK_HEAD.POOLER_TYPE", "ROIAlign"),
    ("MODEL.ROI_MASK_HEAD.NORM", "GN"),
])
def test_mask_head_settings_checked_only_with_mask_on(key, value):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"))
    parent, leaf = key.rsplit(".", 1)
    _get(cfg, parent)[leaf] = value
    check_supported(cfg)  # detectron2 ignores ROI_MASK_HEAD.* without MASK_ON
    cfg.MODEL.MASK_ON = True
    with pytest.raises(ConfigError) as info:
        check_supported(cfg)
    assert f"{key} = {value!r}" in str(info.value)


UNSUPPORTED = [
    ("MODEL.META_ARCHITECTURE", "RetinaNet"), ("MODEL.KEYPOINT_ON", True),
    ("MODEL.LOAD_PROPOSALS", True), ("MODEL.PROPOSAL_GENERATOR.NAME", "RRPN"),
    ("MODEL.RPN.HEAD_NAME", "Custom"), ("MODEL.ROI_HEADS.NAME", "CascadeROIHeads"),
    ("MODEL.ROI_BOX_HEAD.NAME", "Other"), ("MODEL.ROI_BOX_HEAD.NUM_CONV", 4),
    ("MODEL.ROI_BOX_HEAD.POOLER_TYPE", "ROIAlign"), ("MODEL.BACKBONE.NAME", "build_resnet_backbone"),
    ("MODEL.RESNETS.NORM", "SyncBN"), ("MODEL.RESNETS.NORM", ""),
    ("MODEL.RESNETS.DEFORM_ON_PER_STAGE", [False, True, True, True]), ("MODEL.RESNETS.RES5_DILATION", 2),
    ("MODEL.RESNETS.NUM_GROUPS", 32), ("MODEL.RESNETS.DEPTH", 200), ("MODEL.FPN.NORM", "GN"),
    ("MODEL.FPN.FUSE_TYPE", "avg"), ("MODEL.ANCHOR_GENERATOR.NAME", "RotatedAnchorGenerator"),
    ("MODEL.ANCHOR_GENERATOR.ANGLES", [[0]]), ("MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", True),
    ("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "giou"), ("MODEL.RPN.BBOX_REG_LOSS_TYPE", "giou"),
    ("MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", True),
    ("INPUT.FORMAT", "L"), ("TEST.AUG.ENABLED", True), ("MODEL.RPN.IN_FEATURES", ["p2", "p3", "p4", "p5"]),
    ("MODEL.ROI_HEADS.IN_FEATURES", ["p2", "p3", "p4", "p5", "p6"]), ("MODEL.RPN.CONV_DIMS", [256, 256]),
    ("MODEL.ROI_BOX_HEAD.NUM_FC", 0), ("MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64, 128]]),
    ("MODEL.ANCHOR_GENERATOR.SIZES", [[32], [64], [128], [256], [512, 1024]]),
]


@pytest.mark.parametrize("key, value", UNSUPPORTED)
def test_check_supported_rejects_with_key_named(key, value):
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"))
    parent, leaf = key.rsplit(".", 1)
    _get(cfg, parent)[leaf] = value
    with pytest.raises(ConfigError) as info:
        check_supported(cfg)
    assert f"{key} = {value!r}" in str(info.value)


def test_check_supported_lists_every_problem_and_allows_offset():
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"))
    cfg.merge_from_list(["MODEL.ANCHOR_GENERATOR.OFFSET", "0.5", "MODEL.RETINANET.NUM_CONVS", "2"])
    check_supported(cfg)  # used / ignored-with-reason settings pass
    cfg.merge_from_list(["MODEL.KEYPOINT_ON", "True", "MODEL.RESNETS.NORM", "SyncBN"])
    with pytest.raises(ConfigError) as info:
        check_supported(cfg)
    assert "MODEL.KEYPOINT_ON = True" in str(info.value) and "MODEL.RESNETS.NORM = 'SyncBN'" in str(info.value)


def test_default_config_is_rejected_and_training_checks_are_opt_in():
    with pytest.raises(ConfigError, match="MODEL.BACKBONE.NAME = 'build_resnet_backbone'"):
        check_supported(get_cfg())  # detectron2's bare defaults are the C4 model
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config("frcnn-small-R18.yaml"))
    cfg.merge_from_list(["INPUT.CROP.ENABLED", "True", "SOLVER.LR_SCHEDULER_NAME", "WarmupCosineLR"])
    check_supported(cfg)  # inference does not depend on them
    with pytest.raises(ConfigError, match="INPUT.CROP.ENABLED = True(.|\n)*SOLVER.LR_SCHEDULER_NAME"):
        check_supported(cfg, training=True)
    cfg.merge_from_list(["MODEL.RESNETS.RES2_OUT_CHANNELS", "256"])
    with pytest.raises(ConfigError, match="RES2_OUT_CHANNELS = 256"):
        check_supported(cfg)
