"""The class names (and COCO category ids) an export writes into the ONNX metadata and the engine sidecar.

Where they come from, first match wins:

1. ``--class-names`` (``export-engine --class-names FILE|a,b,c``): a text file with one name per line (blank
   lines skipped), a ``.json`` file holding a list of strings, or comma-separated names;
2. the checkpoint's ``class_names`` (and ``category_ids``), stored by ``frcnn train`` from the dataset's
   categories (older files: ``thing_classes``);
3. COCO's 80 names for an 80-class model without stored names (detectron2's model zoo);
4. ``class_0 .. class_<K-1>``.

A list whose length differs from MODEL.ROI_HEADS.NUM_CLASSES is refused naming both numbers.
"""

from __future__ import annotations

import json
import os
from typing import Any

from frcnn.runtime.errors import UserError

__all__ = ["parse_class_names", "resolve_class_names"]


def parse_class_names(value: str) -> list[str]:
    """``--class-names`` text -> names (see the module docstring); UserError for an unusable value."""
    if os.path.isdir(value):
        raise UserError(f"--class-names {value} is a directory; pass a text file (one name per line) or a,b,c")
    if os.path.isfile(value):
        try:
            with open(value, encoding="utf-8-sig") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--class-names {value}: cannot read it as UTF-8 text ({exc})") from None
        if value.lower().endswith(".json"):
            try:
                names = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"--class-names {value} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                                'write a list such as ["cat", "dog"]') from None  # fmt: skip
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise UserError(f'--class-names {value} must hold a JSON list of strings, e.g. ["cat", "dog"]')
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
        where = f"--class-names {value}"
    else:
        if value.lower().endswith((".txt", ".json")) or os.sep in value:
            raise UserError(f"--class-names {value}: no such file; pass an existing file or names as a,b,c")
        names = [n.strip() for n in value.split(",")]
        where = f"--class-names {value!r}"
    names = [n.strip() for n in names]
    if not names or any(not n for n in names):
        raise UserError(f"{where}: every class needs a non-empty name (got {names!r})")
    return names


def resolve_class_names(num_classes: int, meta: dict[str, Any], override: str | None = None,
                        checkpoint: str = "the checkpoint") -> tuple[list[str], list[int] | None, str]:
    """(names, category ids or None, where they came from) for a model of ``num_classes`` classes."""
    if override is not None:
        names = parse_class_names(override)
        if len(names) != num_classes:
            raise UserError(f"--class-names gives {len(names)} names but the model has {num_classes} classes "
                            "(MODEL.ROI_HEADS.NUM_CLASSES); give exactly one name per class")  # fmt: skip
        return names, None, "--class-names"
    for key in ("class_names", "thing_classes"):
        stored = meta.get(key)
        if stored is None:
            continue
        if not isinstance(stored, (list, tuple)) or not all(isinstance(n, str) and n for n in stored):
            raise UserError(f"{checkpoint} stores '{key}' that is not a list of names; pass --class-names a,b,c")
        if len(stored) != num_classes:
            raise UserError(f"{checkpoint} stores {len(stored)} class names but the config has "
                            f"MODEL.ROI_HEADS.NUM_CLASSES {num_classes}; pass the --config it was trained with, "
                            f"or --class-names with {num_classes} names")  # fmt: skip
        ids = meta.get("category_ids")
        ok_ids = isinstance(ids, (list, tuple)) and len(ids) == num_classes and all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids)  # fmt: skip
        return list(stored), [int(i) for i in ids] if ok_ids else None, f"stored in {checkpoint}"
    if num_classes == 80:
        from frcnn.export.coco_names import COCO_CLASSES

        return list(COCO_CLASSES), None, "COCO (80 classes, none stored in the checkpoint)"
    return [f"class_{i}" for i in range(num_classes)], None, "none stored: class_<k>"
