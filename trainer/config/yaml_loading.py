"""Read a detectron2 config YAML with its ``_BASE_`` chain into a plain dict, safely.

``load_yaml_with_base`` follows ``_BASE_`` (relative to the including file, cycles refused) and merges the
files (the including file's values win); ``!!python/...`` tags load as inert ``PythonTag`` markers that
``check_loaded`` refuses with the key that holds them, so nothing in a config file is ever executed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import yaml
from frcnn.runtime.errors import ConfigError

from .compat import get_key

__all__ = ["BASE_KEY", "PythonTag", "check_loaded", "load_yaml_with_base"]

BASE_KEY = "_BASE_"


def load_yaml_with_base(filename: str, _chain: tuple[str, ...] = ()) -> dict:
    """Load a YAML file (safe loader) and resolve its ``_BASE_`` chain into one nested dict."""
    real = os.path.realpath(filename)
    if real in _chain:
        raise ConfigError(f"config file {filename!r}: _BASE_ cycle: {' -> '.join(_chain + (real,))}")
    cfg = _read_yaml(filename, _chain)
    if BASE_KEY not in cfg:
        return cfg
    bases = cfg.pop(BASE_KEY)
    bases = bases if isinstance(bases, list) else [bases]
    merged: dict = {}
    for base in bases:
        if not isinstance(base, str):
            raise ConfigError(f"config file {filename!r}: {BASE_KEY} must be a path string, got {base!r}")
        if base.startswith(("http://", "https://")):
            raise ConfigError(f"config file {filename!r}: {BASE_KEY} {base!r} is a URL; download it and "
                              f"name a local file instead")
        base = os.path.expanduser(base)
        if not os.path.isabs(base):
            base = os.path.join(os.path.dirname(filename), base)
        _merge_dicts(load_yaml_with_base(base, _chain + (real,)), merged, base)
    _merge_dicts(cfg, merged, filename)
    return merged


class PythonTag:
    """A ``!!python/...`` YAML value (e.g. Base-RetinaNet.yaml's ``!!python/object/apply:eval``): never run."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __repr__(self) -> str:
        return f"!!{self.tag.removeprefix('tag:yaml.org,2002:')}"


class _TagTolerantLoader(yaml.SafeLoader):
    """The safe loader, except that ``!!python/...`` values load as inert :class:`PythonTag` markers, so that
    a file using them can be refused for what it is (an unsupported model, a key to write out literally)."""


_TagTolerantLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda _loader, suffix, _node:
                                         PythonTag("python/" + suffix))  # fmt: skip


def _read_yaml(filename: str, chain: tuple[str, ...]) -> dict:
    """One YAML file -> dict; ConfigError naming the file and the fix for anything a config cannot be."""
    hint = f" (named as _BASE_ in {chain[-1]!r})" if chain else ""
    if os.path.isdir(filename):
        raise ConfigError(f"config file {filename!r}{hint} is a directory; pass a YAML file such as "
                          f"{os.path.join(filename, 'config.yaml')!r}")  # fmt: skip
    if not os.path.isfile(filename):
        raise ConfigError(f"config file {filename!r} does not exist{hint}; check the path")
    try:
        with open(filename, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {filename!r}{hint}: {exc.strerror or exc}") from None
    if b"\0" in raw[:8192]:
        raise ConfigError(f"config file {filename!r}{hint} is a binary file, not YAML text (a checkpoint or "
                          "an image?); pass the YAML config")  # fmt: skip
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {filename!r}{hint} is not UTF-8 text (byte {exc.start}: "
                          f"{raw[exc.start:exc.start + 1]!r}); save it as UTF-8") from None  # fmt: skip
    try:
        cfg = yaml.load(text, Loader=_TagTolerantLoader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {filename!r}{hint} is not valid YAML: {exc}") from None
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"config file {filename!r}{hint} must hold a mapping of KEY: value lines, got a "
                          f"{type(cfg).__name__}")  # fmt: skip
    _check_keys(cfg, filename, "")
    return cfg


def _check_keys(node: dict, filename: str, prefix: str) -> None:
    for key, value in node.items():
        if not isinstance(key, str):
            raise ConfigError(f"config file {filename!r}: key {prefix}{key!r} is a {type(key).__name__}; config "
                              "keys are names such as SOLVER or BASE_LR")  # fmt: skip
        if isinstance(value, dict):
            _check_keys(value, filename, f"{prefix}{key}.")


def check_loaded(cfg: dict, filename: str) -> None:
    """Refuse a loaded file for a model frcnn does not build (by META_ARCHITECTURE, before any key is
    checked) and values a safe loader does not evaluate (``!!python/...``), naming the key."""
    arch = get_key(cfg, "MODEL.META_ARCHITECTURE")
    if arch is not None and arch != "GeneralizedRCNN":
        raise ConfigError(f"config file {filename!r} is for the model MODEL.META_ARCHITECTURE {arch!r}, which "
                          "frcnn does not build: it supports detectron2's Faster R-CNN (GeneralizedRCNN with "
                          "a ResNet-FPN backbone); start from e.g. COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml")
    for key, value in _leaves(cfg):
        if isinstance(value, PythonTag):
            raise ConfigError(f"config file {filename!r}: {key} uses the YAML tag {value!r}, which frcnn does "
                              "not evaluate (it would run code); write the value out literally")


def _leaves(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _leaves(value, prefix)
    else:
        yield prefix.rstrip("."), node


def _merge_dicts(a: dict, b: dict, filename: str) -> None:
    """Merge plain dict ``a`` into ``b`` (values of ``a`` win), like detectron2's load_yaml_with_base."""
    for key, value in a.items():
        if isinstance(value, dict) and key in b:
            if not isinstance(b[key], dict):
                raise ConfigError(f"config file {filename!r}: key {key!r} is a mapping here but a value in "
                                  f"its {BASE_KEY}")
            _merge_dicts(value, b[key], filename)
        else:
            b[key] = value
