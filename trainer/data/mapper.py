"""DatasetMapper: one dataset dict -> the model's input (image read, resized, flipped; boxes moved with it).

Reproduces detectron2's ``DatasetMapper`` for boxes-only detection:

- ``read_image(file, "BGR")``: :mod:`frcnn.runtime.image_io` (Pillow, EXIF orientation, documented mode
  conversions), channels reversed.
- ``ResizeShortestEdge(MIN_SIZE_TRAIN, MAX_SIZE_TRAIN, MIN_SIZE_TRAIN_SAMPLING)`` then ``RandomFlip`` (p=0.5,
  ``INPUT.RANDOM_FLIP``) for training; ``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`` for testing.
  Sizes use ``frcnn.runtime.preprocess`` (the same arithmetic and Pillow bilinear as the deployed runtime).
- Boxes (float32 XYXY from :mod:`.coco`) go through the transforms in float64 like detectron2's
  ``transform_instance_annotations``: each transform maps the 4 corners and takes their min/max, then the
  box is clipped to the new image, cast to float32, and boxes with width or height <= 1e-5 are dropped
  (``filter_empty_instances``). Crowd annotations are dropped (detectron2 trains on ``iscrowd == 0`` only).

Randomness comes from the ``rng`` argument (a ``numpy.random.Generator``), so the loader can make every
sample reproducible from (seed, rank, sample number) whatever the number of worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from frcnn.runtime import image_io
from frcnn.runtime.errors import UserError
from frcnn.runtime.preprocess import resize_image, resize_shortest_edge_size

__all__ = ["DatasetMapper", "read_image", "transform_boxes"]

_FLIPS = ("horizontal", "vertical", "none")


def read_image(file_name: str, image_format: str = "BGR") -> np.ndarray:
    """Read an image file -> uint8 [H, W, 3] in ``image_format`` ("BGR" or "RGB"), EXIF orientation applied.

    :func:`frcnn.runtime.image_io.read_image` (the project's one reader: Pillow modes, size limit, errors).
    """
    if image_format not in ("BGR", "RGB"):
        raise UserError(
            f"INPUT.FORMAT {image_format!r} is not supported; use 'BGR' (detectron2's default) or 'RGB'."
        )
    return image_io.read_image(file_name, image_format)


def transform_boxes(
    boxes_xyxy: np.ndarray, hw: tuple[int, int], new_hw: tuple[int, int], flip: str = "none"
) -> np.ndarray:
    """Boxes [M, 4] XYXY in an image of size ``hw`` -> float32 [M, 4] after resize to ``new_hw`` and flip.

    Same float64 arithmetic as detectron2 ``ResizeTransform`` then ``HFlipTransform``/``VFlipTransform``
    ``apply_box``, followed by ``clip(min=0)`` and ``minimum(box, (W, H, W, H))`` of the new image.
    """
    (h, w), (nh, nw) = hw, new_hw
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    corners = b[:, [0, 1, 2, 1, 0, 3, 2, 3]].reshape(-1, 2).copy()  # the 4 corners of every box
    corners[:, 0] = corners[:, 0] * (nw * 1.0 / w)
    corners[:, 1] = corners[:, 1] * (nh * 1.0 / h)
    out = _corners_to_boxes(corners)
    if flip != "none":
        axis, size = (0, nw) if flip == "horizontal" else (1, nh)
        corners = out[:, [0, 1, 2, 1, 0, 3, 2, 3]].reshape(-1, 2).copy()
        corners[:, axis] = size - corners[:, axis]
        out = _corners_to_boxes(corners)
    out = np.minimum(out.clip(min=0), np.array([nw, nh, nw, nh], dtype=np.float64))
    return out.astype(np.float32)


def _corners_to_boxes(corners: np.ndarray) -> np.ndarray:
    c = corners.reshape(-1, 4, 2)
    return np.concatenate([c.min(axis=1), c.max(axis=1)], axis=1)


class DatasetMapper:
    """Callable: dataset dict (see :mod:`.coco`) -> model input dict.

    Output keys: ``image`` uint8 Tensor[3, H, W] (BGR, resized), ``image_size`` (H, W), ``file_name``,
    ``image_id``, ``height``, ``width`` (original size, for scaling predictions back) and, when training,
    ``gt_boxes`` float32 Tensor[M, 4] (XYXY, resized-image pixels) and ``gt_classes`` int64 Tensor[M]
    (+ ``gt_masks`` bool Tensor[M, H, W] with ``mask_on``: :mod:`.masks`, resized NEAREST and flipped too).
    """

    def __init__(
        self,
        is_train: bool,
        *,
        min_size: Sequence[int] | int,
        max_size: int,
        sample_style: str = "choice",
        random_flip: str = "horizontal",
        image_format: str = "BGR",
        mask_on: bool = False,
    ) -> None:
        self.is_train = is_train
        self.mask_on = bool(mask_on)
        self.min_size = (int(min_size),) if isinstance(min_size, int) else tuple(int(s) for s in min_size)
        self.max_size = int(max_size)
        self.sample_style = sample_style
        self.random_flip = random_flip if is_train else "none"
        self.image_format = image_format
        if not self.min_size or min(self.min_size) <= 0 or self.max_size <= 0:
            raise UserError(
                f"INPUT.MIN_SIZE_* {self.min_size} and INPUT.MAX_SIZE_* {self.max_size} must be "
                "positive (e.g. MIN_SIZE_TRAIN (640, 672, 704, 736, 768, 800), MAX_SIZE_TRAIN 1333)."
            )
        if sample_style not in ("choice", "range") or (sample_style == "range" and len(self.min_size) != 2):
            raise UserError(
                f"INPUT.MIN_SIZE_TRAIN_SAMPLING {sample_style!r} with MIN_SIZE_TRAIN {self.min_size}: "
                "use 'choice' (any list) or 'range' (exactly two sizes: low, high)."
            )
        if random_flip not in _FLIPS:
            raise UserError(f"INPUT.RANDOM_FLIP {random_flip!r} is not one of {_FLIPS}.")

    @classmethod
    def from_config(cls, cfg: Any, is_train: bool = True) -> DatasetMapper:
        """Arguments from INPUT.* keys (detectron2 ``build_augmentation``)."""
        if is_train:
            return cls(
                True,
                min_size=tuple(cfg.INPUT.MIN_SIZE_TRAIN),
                max_size=cfg.INPUT.MAX_SIZE_TRAIN,
                sample_style=cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING,
                random_flip=cfg.INPUT.RANDOM_FLIP,
                image_format=cfg.INPUT.FORMAT,
                mask_on=cfg.MODEL.MASK_ON,
            )
        return cls(
            False,
            min_size=cfg.INPUT.MIN_SIZE_TEST,
            max_size=cfg.INPUT.MAX_SIZE_TEST,
            image_format=cfg.INPUT.FORMAT,
        )

    def _sample(self, rng: np.random.Generator) -> tuple[int, str]:
        """Draw (short edge, flip) in detectron2's order: resize size first, then the flip coin."""
        if self.sample_style == "range":
            short = int(rng.integers(self.min_size[0], self.min_size[1] + 1))
        else:
            short = int(self.min_size[int(rng.integers(len(self.min_size)))])
        flip = "none"
        if self.random_flip != "none" and rng.random() < 0.5:
            flip = self.random_flip
        return short, flip

    def __call__(
        self, dataset_dict: dict[str, Any], rng: np.random.Generator | None = None
    ) -> dict[str, Any]:
        rng = np.random.default_rng() if rng is None else rng
        image = read_image(dataset_dict["file_name"], self.image_format)
        h, w = image.shape[:2]
        exp = (dataset_dict.get("height", h), dataset_dict.get("width", w))
        if (h, w) != exp:
            raise UserError(
                f"image {dataset_dict['file_name']} is {w}x{h} (WxH) but the dataset says "
                f"{exp[1]}x{exp[0]}. Fix 'width'/'height' in the JSON or replace the image."
            )
        short, flip = self._sample(rng) if self.is_train else (self.min_size[0], "none")
        nh, nw = resize_shortest_edge_size(h, w, short, self.max_size)
        if (nh, nw) != (h, w):
            image = resize_image(image, nh, nw)
        if flip == "horizontal":
            image = image[:, ::-1]
        elif flip == "vertical":
            image = image[::-1]
        out = {
            "file_name": dataset_dict["file_name"],
            "image_id": dataset_dict["image_id"],
            "height": h,
            "width": w,
            "image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
            "image_size": (nh, nw),
        }
        if self.is_train:
            annos = [a for a in dataset_dict.get("annotations", []) if a.get("iscrowd", 0) == 0]
            boxes, classes, keep = self._targets(annos, (h, w), (nh, nw), flip)
            out["gt_boxes"], out["gt_classes"] = torch.from_numpy(boxes), torch.from_numpy(classes)
            if self.mask_on:
                out["gt_masks"] = self._masks([a for a, k in zip(annos, keep) if k], dataset_dict, (nh, nw), flip)
        return out

    @staticmethod
    def _targets(
        annos: list[dict[str, Any]], hw: tuple[int, int], new_hw: tuple[int, int], flip: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not annos:
            return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), np.zeros((0,), bool)
        boxes = transform_boxes(np.stack([np.asarray(a["bbox"]) for a in annos]), hw, new_hw, flip)
        classes = np.array([a["category_id"] for a in annos], dtype=np.int64)
        keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)
        return boxes[keep], classes[keep], keep

    @staticmethod
    def _masks(annos: list[dict[str, Any]], dataset_dict: dict[str, Any], new_hw: tuple[int, int],
               flip: str) -> torch.Tensor:  # fmt: skip
        """bool Tensor[M, new_h, new_w]: each annotation's segmentation decoded, resized and flipped."""
        from .masks import segmentation_to_mask, transform_mask

        h, w = int(dataset_dict["height"]), int(dataset_dict["width"])
        masks = []
        for a in annos:
            if "segmentation" not in a:
                raise UserError(f"image {dataset_dict['file_name']}: an annotation has no 'segmentation'; "
                                "MODEL.MASK_ON training needs a mask for every non-crowd instance.")
            masks.append(transform_mask(segmentation_to_mask(a["segmentation"], h, w), new_hw, flip))
        out = np.stack(masks) if masks else np.zeros((0, *new_hw), bool)
        return torch.from_numpy(out)
