"""Compare a checkpoint's state dict with a model's, key by key and shape by shape, and word the outcome.

``compare_state`` sorts every key into loaded / missing / unexpected / shape-mismatched / ignored (old
checkpoints' ``pixel_mean`` / ``pixel_std`` / ``cell_anchors`` entries); ``format_report`` writes one paragraph
grouped by module, with a hint for the usual causes (class count, ResNet depth). Used by
``frcnn.trainer.checkpoint.load_into_model``.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Any

import torch

__all__ = ["LoadReport", "compare_state", "format_report"]

# Keys that older detectron2 checkpoints hold but that are not learned parameters of this model.
_IGNORABLE = re.compile(r"(^|\.)(pixel_mean|pixel_std)$|anchor_generator\.cell_anchors\.")


@dataclasses.dataclass
class LoadReport:
    """Outcome of comparing a checkpoint with a model (keys are model state-dict names)."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # (key, shape in file, shape in model)
    ignored: list[str]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


_BLOCK = re.compile(r"^(res\d)\.(\d+)\.")
_DEPTHS: dict[tuple[Any, ...], int] = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50,
           (3, 4, 23, 3, True): 101, (3, 8, 36, 3, True): 152}  # fmt: skip


def _resnet_depth(keys: list[str]) -> int | None:
    """ResNet depth implied by the ``backbone.bottom_up.resN.<block>`` keys, or None."""
    blocks: dict[str, set[int]] = collections.defaultdict(set)
    bottleneck = False
    for key in keys:
        m = _BLOCK.match(key.removeprefix("backbone.bottom_up."))
        if key.startswith("backbone.bottom_up.") and m:
            blocks[m.group(1)].add(int(m.group(2)))
            bottleneck |= ".conv3." in key
    counts = tuple(len(blocks[f"res{i}"]) for i in range(2, 6))
    return _DEPTHS.get((*counts, bottleneck))


def _ranges(numbers: set[int]) -> str:
    nums, parts, start = sorted(numbers), [], None
    for i, n in enumerate(nums):
        start = n if start is None else start
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            parts.append(f"{start}" if start == n else f"{start}..{n}")
            start = None
    return ",".join(parts)


def _describe(names: list[str]) -> str:
    """Short description of module-relative names: block ranges ('res4.6..22') and up to 3 other names."""
    blocks: dict[str, set[int]] = collections.defaultdict(set)
    others = []
    for name in names:
        m = _BLOCK.match(name)
        if m:
            blocks[m.group(1)].add(int(m.group(2)))
        else:
            others.append(name)
    parts = [f"{stage}.{_ranges(b)}" for stage, b in sorted(blocks.items())]
    parts += others[:3] + ([f"{len(others) - 3} more"] if len(others) > 3 else [])
    return ", ".join(parts)


def _group(keys: list[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for key in keys:
        parts = key.split(".")
        n = 2 if len(parts) > 2 else 1
        groups[".".join(parts[:n])].append(".".join(parts[n:]))
    return groups


def _hints(report: LoadReport, file_keys: list[str], model_keys: list[str]) -> list[str]:
    hints = []
    for key, file_shape, _ in report.mismatched:
        if key.endswith("box_predictor.cls_score.weight") and file_shape:
            n = file_shape[0] - 1
            hints.append(f"the checkpoint was trained for {n} classes; set MODEL.ROI_HEADS.NUM_CLASSES to {n} in "
                         "the config")
    mask = "roi_heads.mask_head."
    if report.missing and all(k.startswith(mask) for k in report.missing):
        hints.append("the checkpoint has no mask head (a Faster R-CNN checkpoint); use it with a box config "
                     "(MODEL.MASK_ON False) or load a Mask R-CNN checkpoint")
    if report.unexpected and all(k.startswith(mask) for k in report.unexpected):
        hints.append("the checkpoint is a Mask R-CNN; set MODEL.MASK_ON True (or use a COCO-InstanceSegmentation "
                     "config) to run its masks")
    file_depth, model_depth = _resnet_depth(file_keys), _resnet_depth(model_keys)
    if file_depth and model_depth and file_depth != model_depth:
        hints.append(
            f"the checkpoint is a ResNet-{file_depth} and the model a ResNet-{model_depth}; "
            f"set MODEL.RESNETS.DEPTH to {file_depth} in the config (or use the matching config)"
        )
    return hints


def format_report(report: LoadReport, path: str, file_keys: list[str], model_keys: list[str]) -> str:
    """One paragraph: the file, each kind of problem grouped by module prefix, then hints."""
    sections = []
    for kind, keys in (("missing", report.missing), ("unexpected", report.unexpected)):
        for group, names in sorted(_group(keys).items()):
            sections.append(f"{group}: {len(names)} {kind} key{'s' * (len(names) > 1)} ({_describe(names)})")
    shapes = {k: (f, m) for k, f, m in report.mismatched}
    for group, names in sorted(_group(list(shapes)).items()):
        items = [f"{n} {tuple(shapes[f'{group}.{n}'][0])} in file vs {tuple(shapes[f'{group}.{n}'][1])} in model"
                 for n in names[:3]]  # fmt: skip
        more = f", {len(names) - 3} more" if len(names) > 3 else ""
        sections.append(
            f"{group}: {len(names)} shape mismatch{'es' * (len(names) > 1)} ({'; '.join(items)}{more})"
        )
    text = f"Checkpoint '{path}' does not match the model: " + "; ".join(sections) + "."
    hints = _hints(report, file_keys, model_keys)
    if hints:
        text += " Likely cause: " + "; ".join(hints) + "."
    elif report.missing and not report.loaded:
        text += " No key matched: this checkpoint is for a different model."
    return text


def compare_state(model_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> LoadReport:
    """Exact key and shape comparison of a checkpoint ``state`` against ``model.state_dict()``."""
    loaded: list[str] = []
    unexpected: list[str] = []
    ignored: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for key, value in state.items():
        if key not in model_state:
            (ignored if _IGNORABLE.search(key) else unexpected).append(key)
        elif tuple(value.shape) != tuple(model_state[key].shape):
            mismatched.append((key, tuple(value.shape), tuple(model_state[key].shape)))
        else:
            loaded.append(key)
    missing = [k for k in model_state if k not in state]
    return LoadReport(loaded, missing, unexpected, mismatched, ignored)
