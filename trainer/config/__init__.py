"""detectron2-style configuration: ``get_cfg()`` (detectron2's keys and defaults), ``CfgNode`` (YAML with
``_BASE_``, ``KEY VALUE`` overrides), ``check_supported`` and the packaged model-zoo configs.

    from frcnn.trainer.config import get_cfg, model_zoo_config, check_supported
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo_config("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml"))
    cfg.merge_from_list(["MODEL.ROI_HEADS.NUM_CLASSES", "3"])
    check_supported(cfg)

Packaged configs (``configs/``): detectron2's Base-RCNN-FPN.yaml and COCO-Detection/faster_rcnn_R_{50,101}_
FPN_{1x,3x}.yaml with the same content as detectron2's files (detectron2 ships no R_101_FPN_1x; ours is
R_101_FPN_3x with the 1x schedule of R_50_FPN_1x), plus frcnn-small-R18.yaml, a CPU-sized ResNet-18 model,
and frcnn-demo-R18.yaml, its `frcnn demo` variant (192 px images, anchors 16..256 px, FPN 64 channels).
"""

from __future__ import annotations

import os

from frcnn.runtime.errors import ConfigError

from .config import CfgNode
from .defaults import get_cfg
from .supported import check_supported

__all__ = ["CfgNode", "available_configs", "check_supported", "get_cfg", "model_zoo_config"]

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def available_configs() -> list[str]:
    """Names (paths relative to the packaged configs folder, '/'-separated) of all packaged configs."""
    names = []
    for dirpath, _, filenames in os.walk(CONFIGS_DIR):
        for filename in filenames:
            if filename.endswith(".yaml"):
                rel = os.path.relpath(os.path.join(dirpath, filename), CONFIGS_DIR)
                names.append(rel.replace(os.sep, "/"))
    return sorted(names)


def model_zoo_config(name: str) -> str:
    """Path of a packaged config, e.g. ``model_zoo_config("COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml")``.

    Raises ConfigError listing the available names when ``name`` is not packaged.
    """
    names = available_configs()
    if name not in names:
        raise ConfigError(f"no packaged config named {name!r}; available: {', '.join(names)}")
    return os.path.join(CONFIGS_DIR, *name.split("/"))
