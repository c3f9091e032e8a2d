"""detectron2 ``config/compat.py``: read VERSION 1 config files by renaming their keys to VERSION 2.

``upgrade_version`` applies detectron2's v1 -> v2 renames (and its anchor-key moves) to a loaded, possibly
partial config dict; ``RENAMED`` (old -> new full key) lets the merge name the new key when a user writes an
old one; ``get_key`` reads a dotted key from nested dicts.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from frcnn.runtime.errors import ConfigError

__all__ = ["RENAMED", "get_key", "upgrade_version"]

_logger = logging.getLogger(__name__)

# detectron2 config/compat.py: (old name, new name) for upgrading VERSION 1 files to VERSION 2.
_RENAMED_V1_TO_V2 = (
    ("MODEL.RPN_HEAD.NAME", "MODEL.RPN.HEAD_NAME"),
    ("MODEL.WEIGHT", "MODEL.WEIGHTS"),
    ("MODEL.PANOPTIC_FPN.SEMANTIC_LOSS_SCALE", "MODEL.SEM_SEG_HEAD.LOSS_WEIGHT"),
    ("MODEL.PANOPTIC_FPN.RPN_LOSS_SCALE", "MODEL.RPN.LOSS_WEIGHT"),
    ("MODEL.PANOPTIC_FPN.INSTANCE_LOSS_SCALE", "MODEL.PANOPTIC_FPN.INSTANCE_LOSS_WEIGHT"),
    ("MODEL.PANOPTIC_FPN.COMBINE_ON", "MODEL.PANOPTIC_FPN.COMBINE.ENABLED"),
    ("MODEL.PANOPTIC_FPN.COMBINE_OVERLAP_THRESHOLD", "MODEL.PANOPTIC_FPN.COMBINE.OVERLAP_THRESH"),
    ("MODEL.PANOPTIC_FPN.COMBINE_STUFF_AREA_LIMIT", "MODEL.PANOPTIC_FPN.COMBINE.STUFF_AREA_LIMIT"),
    (
        "MODEL.PANOPTIC_FPN.COMBINE_INSTANCES_CONFIDENCE_THRESHOLD",
        "MODEL.PANOPTIC_FPN.COMBINE.INSTANCES_CONFIDENCE_THRESH",
    ),
    ("MODEL.ROI_HEADS.SCORE_THRESH", "MODEL.ROI_HEADS.SCORE_THRESH_TEST"),
    ("MODEL.ROI_HEADS.NMS", "MODEL.ROI_HEADS.NMS_THRESH_TEST"),
    ("MODEL.RETINANET.INFERENCE_SCORE_THRESHOLD", "MODEL.RETINANET.SCORE_THRESH_TEST"),
    ("MODEL.RETINANET.INFERENCE_TOPK_CANDIDATES", "MODEL.RETINANET.TOPK_CANDIDATES_TEST"),
    ("MODEL.RETINANET.INFERENCE_NMS_THRESHOLD", "MODEL.RETINANET.NMS_THRESH_TEST"),
    ("TEST.DETECTIONS_PER_IMG", "TEST.DETECTIONS_PER_IMAGE"),
    ("TEST.AUG_ON", "TEST.AUG.ENABLED"),
    ("TEST.AUG_MIN_SIZES", "TEST.AUG.MIN_SIZES"),
    ("TEST.AUG_MAX_SIZE", "TEST.AUG.MAX_SIZE"),
    ("TEST.AUG_FLIP", "TEST.AUG.FLIP"),
)
RENAMED = dict(_RENAMED_V1_TO_V2)


def upgrade_version(cfg: dict, filename: str, current: int) -> dict:
    """Apply detectron2's v1 -> v2 key renames to a loaded (partial) config; reject unknown versions."""
    version = cfg.get("VERSION")
    if version is None:
        version = 1 if (_has(cfg, "MODEL.WEIGHT") or _has(cfg, "TEST.AUG_ON")) else current
    if not isinstance(version, int) or version > current or version < 1:
        raise ConfigError(f"config file {filename!r} has VERSION {version!r}; this reader understands "
                          f"detectron2 config versions 1..{current}")
    if version == current:
        return cfg
    _logger.warning("Loading an old v%s config file %r by upgrading it to v%s.", version, filename, current)
    cfg = copy.deepcopy(cfg)
    for old, new in _RENAMED_V1_TO_V2:
        _rename(cfg, old, new)
    retinanet = get_key(cfg, "MODEL.META_ARCHITECTURE") == "RetinaNet"
    family, other = ("MODEL.RETINANET", "MODEL.RPN") if retinanet else ("MODEL.RPN", "MODEL.RETINANET")
    _rename(cfg, f"{family}.ANCHOR_ASPECT_RATIOS", "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")
    _rename(cfg, f"{family}.ANCHOR_SIZES", "MODEL.ANCHOR_GENERATOR.SIZES")
    for dropped in (f"{other}.ANCHOR_SIZES", f"{other}.ANCHOR_ASPECT_RATIOS", "MODEL.RETINANET.ANCHOR_STRIDES"):
        _pop(cfg, dropped)
    cfg["VERSION"] = current
    return cfg


def _has(cfg: dict, name: str) -> bool:
    return get_key(cfg, name, _MISSING) is not _MISSING


_MISSING = object()


def get_key(cfg: dict, name: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _pop(cfg: dict, name: str) -> Any:
    *parents, last = name.split(".")
    node = get_key(cfg, ".".join(parents)) if parents else cfg
    if not isinstance(node, dict) or last not in node:
        return _MISSING
    value = node.pop(last)
    if parents and not node:  # drop emptied parents, as detectron2's _rename does
        _pop(cfg, ".".join(parents))
    return value


def _rename(cfg: dict, old: str, new: str) -> None:
    value = _pop(cfg, old)
    if value is _MISSING:
        return
    node = cfg
    *parents, last = new.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
