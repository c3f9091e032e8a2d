"""COCO instances JSON + image folder -> detectron2-style dataset dicts, with input validation.

One record per image (detectron2 ``load_coco_json`` layout, boxes already converted)::

    {"file_name": str (image_root joined), "height": int, "width": int, "image_id": int,
     "annotations": [{"bbox": np.float32[4] XYXY_ABS, "category_id": int (contiguous 0..K-1),
                      "iscrowd": int}, ...]}

COCO ``bbox`` is XYWH; it is converted to XYXY in float32 (``x2 = x + w`` rounded to float32, the same
arithmetic as detectron2's ``BoxMode.convert`` on a list). COCO category ids (any integers) map to
contiguous ids in sorted-id order; class names follow the same order (detectron2 ``thing_classes``).

Bad input never crashes deep in the training loop: structural problems raise :class:`UserError` naming the
file, the record and the fix; fixable problems are repaired and counted (:class:`LoadStats`) and reported
once as a :class:`DatasetWarning`:

- a box reaching outside its image is clipped to the image;
- a box with zero or negative width/height (after clipping) is dropped;
- an image without annotations is kept (evaluation needs it); :func:`filter_images_without_annotations`
  removes it (and crowd-only images) for training, like detectron2 ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from frcnn.runtime.errors import UserError
from frcnn.runtime.image_io import ImageError, probe_image

__all__ = [
    "DatasetMeta",
    "DatasetWarning",
    "LoadStats",
    "dataset_paths",
    "filter_images_without_annotations",
    "load_coco_json",
    "load_coco_split",
    "probe_image",
    "read_coco_json",
]


class DatasetWarning(UserWarning):
    """A dataset problem that was repaired (clipped / dropped) and counted; the message says how many."""


@dataclass
class LoadStats:
    """What loading found and repaired (counts over the whole file)."""

    images: int = 0
    annotations: int = 0  # annotations kept
    crowd: int = 0  # kept, flagged iscrowd=1 (ignored by training, honoured by evaluation)
    clipped_boxes: int = 0  # boxes reaching outside their image, clipped
    dropped_degenerate: int = 0  # boxes with width or height <= 0 (before or after clipping), dropped
    images_without_annotations: int = 0


@dataclass(frozen=True)
class DatasetMeta:
    """Class names and the contiguous <-> COCO category id maps of one dataset.

    ``thing_dataset_ids[i]`` is the COCO category id of contiguous class ``i``; ``thing_classes[i]`` its name.
    """

    thing_classes: tuple[str, ...]
    thing_dataset_ids: tuple[int, ...]
    json_file: str = ""
    image_root: str = ""
    stats: LoadStats = field(default_factory=LoadStats, compare=False)

    @property
    def num_classes(self) -> int:
        return len(self.thing_classes)

    @property
    def dataset_id_to_contiguous_id(self) -> dict[int, int]:
        return {cid: i for i, cid in enumerate(self.thing_dataset_ids)}

    def to_contiguous(self, dataset_id: int) -> int:
        """COCO category id -> contiguous id 0..K-1 (KeyError for an unknown id)."""
        return self.dataset_id_to_contiguous_id[int(dataset_id)]

    def to_dataset_id(self, contiguous_id: int) -> int:
        """Contiguous id 0..K-1 -> COCO category id."""
        return self.thing_dataset_ids[int(contiguous_id)]


def dataset_paths(data_dir: str | os.PathLike[str], split: str) -> tuple[str, str]:
    """``DIR`` (as written by ``frcnn data synth``) -> (``DIR/annotations/instances_<split>.json``, ``DIR/<split>``)."""
    data_dir = os.fspath(data_dir)
    return (os.path.join(data_dir, "annotations", f"instances_{split}.json"), os.path.join(data_dir, split))


def load_coco_split(
    data_dir: str | os.PathLike[str], split: str, *, check_files: bool = True
) -> tuple[list[dict[str, Any]], DatasetMeta]:
    """:func:`load_coco_json` on the ``split`` of a dataset folder laid out like COCO / ``frcnn data synth``."""
    json_file, image_root = dataset_paths(data_dir, split)
    return load_coco_json(json_file, image_root, check_files=check_files)


def load_dataset(data_dir: str | os.PathLike[str], split: str) -> tuple[list[dict[str, Any]], DatasetMeta]:
    """:func:`load_coco_split` of an existing folder; a missing folder is a UserError naming the fix."""
    folder = os.fspath(data_dir)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"--data {folder} is a file; pass the dataset folder (annotations/instances_{split}.json "
                        f"and {split}/ inside)")
    if not os.path.isdir(folder):
        raise UserError(f"dataset folder {folder} does not exist. Pass a folder with annotations/"
                        f"instances_{split}.json and {split}/ (e.g. made by `frcnn data synth {folder}`).")
    return load_coco_split(data_dir, split)


def load_coco_json(
    json_file: str | os.PathLike[str], image_root: str | os.PathLike[str], *, check_files: bool = True
) -> tuple[list[dict[str, Any]], DatasetMeta]:
    """Load a COCO instances file into dataset dicts (layout in the module docstring) and its :class:`DatasetMeta`.

    Raises UserError for a missing / malformed file, an unknown category id, an annotation of an unknown
    image, an empty dataset, and (``check_files``) image files that do not exist. Clipped and dropped boxes
    are counted in ``meta.stats`` and reported as one :class:`DatasetWarning`.
    """
    json_file, image_root = os.fspath(json_file), os.fspath(image_root)
    data = read_coco_json(json_file)
    meta = _parse_categories(data, json_file, image_root)
    id_map = meta.dataset_id_to_contiguous_id
    records, by_id = _parse_images(data, json_file, image_root)
    stats = meta.stats
    stats.images = len(records)
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise UserError(f"{json_file}: 'annotations' must be a list, got {type(anns).__name__}.")
    for index, ann in enumerate(anns):
        where = _where_ann(json_file, index, ann)
        if not isinstance(ann, dict):
            raise UserError(f"{where}: must be an object, got {type(ann).__name__}.")
        image_id: Any = ann.get("image_id")
        record = by_id.get(int(image_id)) if _is_int(image_id) else None
        if record is None:
            raise UserError(
                f"{where}: image_id={ann.get('image_id')!r} is not in 'images'. Fix the id or add the image."
            )
        obj = _parse_annotation(ann, where, record, id_map, stats)
        if obj is not None:
            record["annotations"].append(obj)
    stats.images_without_annotations = sum(1 for r in records if not r["annotations"])
    stats.annotations = sum(len(r["annotations"]) for r in records)
    stats.crowd = sum(a["iscrowd"] for r in records for a in r["annotations"])
    if check_files:
        _check_files(records, json_file, image_root)
    _warn_repairs(json_file, stats)
    return records, meta


def filter_images_without_annotations(dataset_dicts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop images with no non-crowd annotation (detectron2 ``filter_images_with_only_crowd_annotations``).

    Used for training when ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``; raises UserError if nothing is left.
    """
    kept = [d for d in dataset_dicts if any(a.get("iscrowd", 0) == 0 for a in d["annotations"])]
    removed = len(dataset_dicts) - len(kept)
    if removed:
        warnings.warn(
            DatasetWarning(
                f"{removed} of {len(dataset_dicts)} images have no (non-crowd) annotation and are "
                "left out of training (DATALOADER.FILTER_EMPTY_ANNOTATIONS)."
            ),
            stacklevel=2,
        )
    if not kept:
        raise UserError(
            f"none of the {len(dataset_dicts)} images has a non-crowd annotation: there is nothing to train on. "
            "Check the 'annotations' of the dataset (or its category ids)."
        )
    return kept


# ---------------------------------------------------------------------------------------------------------


def read_coco_json(json_file: str) -> dict[str, Any]:
    """Parse a COCO JSON file; UserError naming the file (and line/column for a syntax error) when unusable."""
    if not os.path.isfile(json_file):
        raise UserError(
            f"annotation file {json_file} does not exist. Pass the COCO instances JSON "
            "(for a dataset folder: DIR/annotations/instances_<split>.json)."
        )
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{json_file} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno} "
            f"(character {exc.pos}). Fix the file or regenerate it."
        ) from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{json_file} is not UTF-8 text ({exc}); is it really a COCO JSON file?") from exc
    if not isinstance(data, dict):
        raise UserError(
            f"{json_file}: top level must be a JSON object with 'images', 'annotations' and "
            f"'categories', got {type(data).__name__}."
        )
    for key in ("images", "categories"):
        if key not in data:
            raise UserError(
                f"{json_file}: missing key '{key}'; a COCO instances file needs 'images', "
                "'annotations' and 'categories'."
            )
    return data


def _parse_categories(data: dict[str, Any], json_file: str, image_root: str) -> DatasetMeta:
    cats = data["categories"]
    if not isinstance(cats, list) or not cats:
        raise UserError(f"{json_file}: 'categories' must be a non-empty list of {{'id', 'name'}} objects.")
    seen: dict[int, str] = {}
    for index, cat in enumerate(cats):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise UserError(
                f"{json_file}: categories[{index}] must have an integer 'id' and a string 'name', "
                f"got {cat!r}."
            )
        if cat["id"] in seen:
            raise UserError(f"{json_file}: category id {cat['id']} appears twice in 'categories'.")
        seen[int(cat["id"])] = cat["name"]
    ids = tuple(sorted(seen))
    return DatasetMeta(tuple(seen[i] for i in ids), ids, json_file, image_root)


def _parse_images(
    data: dict[str, Any], json_file: str, image_root: str
) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
    images = data["images"]
    if not isinstance(images, list):
        raise UserError(f"{json_file}: 'images' must be a list, got {type(images).__name__}.")
    if not images:
        raise UserError(
            f"{json_file}: the dataset is empty ('images' is an empty list). Point to a file "
            "with images, e.g. one written by `frcnn data synth`."
        )
    records: list[dict[str, Any]] = []
    by_id: dict[int, dict[str, Any]] = {}
    for index, img in enumerate(images):
        ok = isinstance(img, dict) and _is_int(img.get("id")) and isinstance(img.get("file_name"), str)
        ok = ok and _is_int(img.get("height")) and _is_int(img.get("width"))
        if not ok or img["height"] <= 0 or img["width"] <= 0:
            raise UserError(
                f"{json_file}: images[{index}] must have integer 'id', positive integer 'height' "
                f"and 'width' and a string 'file_name', got {img!r}."
            )
        if img["id"] in by_id:
            raise UserError(f"{json_file}: images[{index}] repeats image id {img['id']}; ids must be unique.")
        record: dict[str, Any] = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "height": int(img["height"]),
            "width": int(img["width"]),
            "image_id": int(img["id"]),
            "annotations": [],
        }
        records.append(record)
        by_id[record["image_id"]] = record
    return records, by_id


def _parse_annotation(
    ann: dict[str, Any], where: str, record: dict[str, Any], id_map: dict[int, int], stats: LoadStats
) -> dict[str, Any] | None:
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise UserError(f"{where}: 'bbox' must be 4 numbers [x, y, width, height], got {bbox!r}.")
    cat = ann.get("category_id")
    if not _is_int(cat) or cat not in id_map:
        raise UserError(
            f"{where} (image {record['file_name']!r}): category_id={cat!r} is not one of the ids in "
            f"'categories' {sorted(id_map)}. Fix the annotation or add the category."
        )
    iscrowd = ann.get("iscrowd", 0)
    if iscrowd not in (0, 1):
        raise UserError(f"{where}: 'iscrowd' must be 0 or 1, got {iscrowd!r}.")
    xywh = np.asarray(bbox, dtype=np.float32)
    if not np.all(np.isfinite(xywh)):
        raise UserError(f"{where}: 'bbox' {bbox!r} has a non-finite value.")
    xyxy = np.concatenate([xywh[:2], xywh[:2] + xywh[2:]]).astype(np.float32)
    if xyxy[2] <= xyxy[0] or xyxy[3] <= xyxy[1]:
        stats.dropped_degenerate += 1
        return None
    w, h = float(record["width"]), float(record["height"])
    clipped = np.clip(xyxy, 0.0, np.array([w, h, w, h], dtype=np.float32)).astype(np.float32)
    if not np.array_equal(clipped, xyxy):
        stats.clipped_boxes += 1
    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:  # entirely outside the image
        stats.dropped_degenerate += 1
        return None
    out = {"bbox": clipped, "category_id": id_map[int(cat)], "iscrowd": int(iscrowd)}
    if "segmentation" in ann and not iscrowd:  # instance masks (Mask R-CNN); crowd regions are never trained
        from .masks import check_segmentation

        check_segmentation(ann["segmentation"], int(record["height"]), int(record["width"]), where)
        out["segmentation"] = ann["segmentation"]
    return out


def _check_files(records: list[dict[str, Any]], json_file: str, image_root: str) -> None:
    if not os.path.isdir(image_root):
        raise UserError(
            f"image folder {image_root} (for {json_file}) does not exist. Pass the folder that "
            "holds the images named in the JSON 'file_name' fields."
        )
    missing = [r["file_name"] for r in records if not os.path.isfile(r["file_name"])]
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise UserError(
            f"{len(missing)} of {len(records)} image files named in {json_file} are missing: "
            f"{shown}. Fix the image folder ({image_root}) or remove those images from the JSON."
        )
    bad = []  # header only (format, mode, frames, size limit, oriented size): before any DataLoader worker
    for r in records:
        try:
            w, h = probe_image(r["file_name"], oriented=True)
        except ImageError as exc:
            bad.append(str(exc))
            continue
        if (w, h) != (r["width"], r["height"]):
            bad.append(f"{r['file_name']} is {w}x{h} (WxH) but {json_file} says {r['width']}x{r['height']}")
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise UserError(
            f"{len(bad)} of {len(records)} images named in {json_file} cannot be used: {shown}. Replace those "
            "files, fix 'width'/'height' in the JSON, or remove the images from it."
        )


def _warn_repairs(json_file: str, stats: LoadStats) -> None:
    parts = []
    if stats.clipped_boxes:
        parts.append(f"{stats.clipped_boxes} boxes reaching outside their image were clipped to it")
    if stats.dropped_degenerate:
        parts.append(f"{stats.dropped_degenerate} boxes with zero or negative width/height were dropped")
    if parts:
        warnings.warn(DatasetWarning(f"{json_file}: " + "; ".join(parts) + "."), stacklevel=3)


def _where_ann(json_file: str, index: int, ann: Any) -> str:
    ident = f" (id {ann.get('id')})" if isinstance(ann, dict) and "id" in ann else ""
    return f"{json_file}: annotations[{index}]{ident}"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
