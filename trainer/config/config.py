"""CfgNode: a yacs/fvcore/detectron2-compatible config tree.

A CfgNode is a ``dict`` whose keys are also attributes (``cfg.MODEL.RESNETS.DEPTH``). It reproduces the
behaviour of detectron2's ``CfgNode`` (yacs + fvcore + detectron2 additions) that config files rely on:

- ``merge_from_file``: YAML (safe loader only) with ``_BASE_`` inheritance. A relative ``_BASE_`` path is
  resolved against the directory of the file that names it; ``_BASE_`` may be a list of files.
- Values that are strings are parsed as Python literals (``ast.literal_eval``) exactly like yacs, so
  ``STEPS: (60000, 80000)`` in YAML and ``"SOLVER.STEPS" "(60000, 80000)"`` on a command line both give a
  tuple; a string that is not a literal (``"BGR"``) stays a string.
- A new value must have the type of the value it replaces. Allowed conversions: list <-> tuple, int -> float,
  anything <-> None. Anything else is an error naming the key, both types and both values.
- Unknown keys are errors naming the key and suggesting the closest existing keys (difflib).
- detectron2 config versions: VERSION 2 is current; a VERSION 1 file (or one without VERSION that uses the
  v1 names MODEL.WEIGHT / TEST.AUG_ON, as detectron2 guesses) has its renamed keys upgraded, as
  detectron2's ``config/compat.py`` does.

Errors caused by the user's file or override are ``frcnn.runtime.errors.ConfigError``.
"""

from __future__ import annotations

import ast
import copy
import difflib
import logging
import os
from collections.abc import Iterable
from typing import Any

import yaml
from frcnn.runtime.errors import ConfigError

BASE_KEY = "_BASE_"
_VALID_TYPES = (tuple, list, str, int, float, bool, type(None))
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
_RENAMED = dict(_RENAMED_V1_TO_V2)


class CfgNode(dict):
    """A config tree node: a dict with attribute access, typed merging, freezing and YAML round trips."""

    def __init__(self, init_dict: dict | None = None, new_allowed: bool = False) -> None:
        super().__init__()
        self.__dict__["_frozen"] = False
        self.__dict__["_new_allowed"] = new_allowed
        for key, value in (init_dict or {}).items():
            self[key] = CfgNode(value, new_allowed) if isinstance(value, dict) else value

    # ---- attribute access -------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            raise AttributeError(f"config keys must not start with '_' (got {name!r})")
        self[name] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise AttributeError(
                f"Attempted to set {key!r} to {value!r}, but the CfgNode is frozen; call cfg.defrost() first"
            )
        if not isinstance(value, (CfgNode, *_VALID_TYPES)):
            raise ConfigError(f"config key {key!r}: value {value!r} has type {type(value).__name__}, "
                              f"which a config cannot hold (use one of tuple, list, str, int, float, bool, None)")
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        if self.is_frozen():
            raise AttributeError(f"Attempted to delete {key!r}, but the CfgNode is frozen")
        super().__delitem__(key)

    def __reduce__(self) -> tuple:
        # Rebuild through the constructor, so that pickling / deepcopy never writes into a frozen node.
        return (_rebuild, (type(self), dict(self), self.is_frozen(), self.__dict__["_new_allowed"]))

    def __str__(self) -> str:
        return self.dump()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"

    # ---- freezing -----------------------------------------------------------------------------------
    def freeze(self) -> None:
        """Make this node and all its children immutable."""
        self._set_frozen(True)

    def defrost(self) -> None:
        """Make this node and all its children mutable."""
        self._set_frozen(False)

    def is_frozen(self) -> bool:
        return bool(self.__dict__["_frozen"])

    def _set_frozen(self, frozen: bool) -> None:
        self.__dict__["_frozen"] = frozen
        for value in self.values():
            if isinstance(value, CfgNode):
                value._set_frozen(frozen)

    def is_new_allowed(self) -> bool:
        return bool(self.__dict__["_new_allowed"])

    def clone(self) -> CfgNode:
        """A deep copy (keeps the frozen state)."""
        return copy.deepcopy(self)

    # ---- merging ------------------------------------------------------------------------------------
    def merge_from_file(self, cfg_filename: str | os.PathLike) -> None:
        """Merge a YAML config file (and its ``_BASE_`` chain) into this config."""
        filename = os.fspath(cfg_filename)
        loaded = load_yaml_with_base(filename)
        check_loaded(loaded, filename)
        loaded = _upgrade_version(loaded, filename, self.get("VERSION", 2))
        self._assert_mutable("merge_from_file")
        _merge_a_into_b(CfgNode(loaded, new_allowed=True), self, self, [], source=filename)

    def merge_from_other_cfg(self, cfg_other: dict) -> None:
        """Merge another config tree (a CfgNode or a nested dict) into this config."""
        self._assert_mutable("merge_from_other_cfg")
        other = cfg_other if isinstance(cfg_other, CfgNode) else CfgNode(cfg_other, new_allowed=True)
        _merge_a_into_b(other, self, self, [], source=None)

    def merge_from_list(self, cfg_list: list[str] | tuple[str, ...]) -> None:
        """Merge ``["FULL.KEY", "value", ...]`` pairs; values are parsed with ``ast.literal_eval``."""
        self._assert_mutable("merge_from_list")
        if len(cfg_list) % 2 != 0:
            raise ConfigError(
                f"config overrides must be KEY VALUE pairs, got an odd number of items: {list(cfg_list)}"
            )
        for full_key, raw in zip(cfg_list[0::2], cfg_list[1::2]):
            if full_key in _RENAMED:
                raise ConfigError(
                    f"config key {full_key!r} was renamed to {_RENAMED[full_key]!r} (detectron2 config "
                    f"VERSION 2); use the new name"
                )
            node = self
            key_list = full_key.split(".")
            for depth, subkey in enumerate(key_list):
                if not isinstance(node, CfgNode) or subkey not in node:
                    raise _unknown_key_error(full_key, self, source=None)
                if depth < len(key_list) - 1:
                    node = node[subkey]
            subkey = key_list[-1]
            value = _decode_value(raw, node[subkey])
            node[subkey] = _check_and_coerce(value, node[subkey], full_key, source=None)

    def _assert_mutable(self, what: str) -> None:
        if self.is_frozen():
            raise AttributeError(f"cannot {what}: the CfgNode is frozen; call cfg.defrost() first")

    # ---- dumping ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A plain nested dict (tuples kept), e.g. for JSON metadata."""
        return {k: v.to_dict() if isinstance(v, CfgNode) else v for k, v in self.items()}

    def dump(self, **kwargs: Any) -> str:
        """The config as a YAML string (safe dumper). Loading it with merge_from_file gives this config."""

        def plain(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        kwargs.setdefault("sort_keys", True)
        kwargs.setdefault("default_flow_style", False)
        return yaml.safe_dump(plain(self), **kwargs)


def _rebuild(cls: type, items: dict, frozen: bool, new_allowed: bool) -> CfgNode:
    node = cls(items, new_allowed=new_allowed)
    if frozen:
        node.freeze()
    return node


# ---- YAML loading with _BASE_ -------------------------------------------------------------------------
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
    arch = _get(cfg, "MODEL.META_ARCHITECTURE")
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


def _upgrade_version(cfg: dict, filename: str, current: int) -> dict:
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
    retinanet = _get(cfg, "MODEL.META_ARCHITECTURE") == "RetinaNet"
    family, other = ("MODEL.RETINANET", "MODEL.RPN") if retinanet else ("MODEL.RPN", "MODEL.RETINANET")
    _rename(cfg, f"{family}.ANCHOR_ASPECT_RATIOS", "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS")
    _rename(cfg, f"{family}.ANCHOR_SIZES", "MODEL.ANCHOR_GENERATOR.SIZES")
    for dropped in (f"{other}.ANCHOR_SIZES", f"{other}.ANCHOR_ASPECT_RATIOS", "MODEL.RETINANET.ANCHOR_STRIDES"):
        _pop(cfg, dropped)
    cfg["VERSION"] = current
    return cfg


def _has(cfg: dict, name: str) -> bool:
    return _get(cfg, name, _MISSING) is not _MISSING


_MISSING = object()


def _get(cfg: dict, name: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _pop(cfg: dict, name: str) -> Any:
    *parents, last = name.split(".")
    node = _get(cfg, ".".join(parents)) if parents else cfg
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


# ---- typed merge ----------------------------------------------------------------------------------------
def _decode_value(value: Any, original: Any = None) -> Any:
    """yacs' _decode_cfg_value: dicts become CfgNodes; strings are parsed as Python literals if possible.

    Deviations from yacs: when the key holds a string and the text parses to a non-string literal ("1.0",
    "True"), the text itself is kept, so that dump() always round-trips; a float key accepts "inf" / ".inf".
    """
    if isinstance(value, dict):
        return CfgNode(value, new_allowed=True)
    if not isinstance(value, str):
        return value
    if isinstance(original, float) and value.strip().lower().lstrip("+-") in ("inf", ".inf", "nan", ".nan"):
        return float(value.strip().lower().replace(".", ""))  # YAML's .inf spelling, as detectron2 suggests
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value
    return value if isinstance(original, str) and not isinstance(parsed, str) else parsed


def _check_and_coerce(replacement: Any, original: Any, full_key: str, source: str | None) -> Any:
    """Return ``replacement`` converted to the type of ``original`` or raise a ConfigError."""
    r_type, o_type = type(replacement), type(original)
    if isinstance(replacement, (list, tuple)) and isinstance(original, (list, tuple)):
        return _like_sequence(replacement, original)
    if r_type is o_type:
        return replacement
    if (replacement is None or original is None) and not isinstance(original, CfgNode):
        return replacement  # yacs: None may replace, or be replaced by, any plain value
    if isinstance(original, CfgNode) and isinstance(replacement, CfgNode):
        return replacement
    if o_type is float and r_type is int:
        return float(replacement)
    where = f"config file {source!r}: " if source else ""
    if isinstance(original, CfgNode) or isinstance(replacement, CfgNode):
        kind = "a mapping of sub-keys" if isinstance(original, CfgNode) else f"a {o_type.__name__} value"
        raise ConfigError(f"{where}config key {full_key} must be {kind} (e.g. {_example(original, full_key)}), "
                          f"got {_short(replacement)}")
    raise ConfigError(
        f"{where}type mismatch for config key {full_key}: expected {o_type.__name__} like the default "
        f"{original!r}, got {r_type.__name__} {replacement!r}"
    )


def _short(value: Any) -> str:
    text = f"{type(value).__name__} {value!r}" if not isinstance(value, CfgNode) else "a mapping"
    return text if len(text) <= 80 else text[:77] + "..."


def _example(original: Any, full_key: str) -> str:
    if isinstance(original, CfgNode) and original:
        first = next(iter(original))
        return f"{full_key}.{first}"
    return f"{full_key} {original!r}"


def _like_sequence(replacement: list | tuple, original: list | tuple) -> list | tuple:
    """list <-> tuple to the container type of ``original``, nested sequences included (YAML has no tuples)."""
    inner = original[0] if len(original) else None
    if isinstance(inner, (list, tuple)):
        items = [_like_sequence(r, inner) if isinstance(r, (list, tuple)) else r for r in replacement]
    else:
        items = list(replacement)
    return type(original)(items)


def _all_keys(node: CfgNode, prefix: str = "") -> Iterable[str]:
    for key, value in node.items():
        yield prefix + key
        if isinstance(value, CfgNode):
            yield from _all_keys(value, prefix + key + ".")


def _unknown_key_error(full_key: str, root: CfgNode, source: str | None) -> ConfigError:
    where = f"config file {source!r}: " if source else ""
    if full_key in _RENAMED:
        return ConfigError(f"{where}config key {full_key!r} was renamed to {_RENAMED[full_key]!r} "
                           f"(detectron2 config VERSION 2); use the new name or set VERSION: 1")
    close = difflib.get_close_matches(full_key, list(_all_keys(root)), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; it is not a detectron2 config key"
    return ConfigError(
        f"{where}unknown config key {full_key}{hint} (keys of detectron2 projects that extend the config, "
        f"e.g. PointRend or DensePose, are not supported)"
    )


def _merge_a_into_b(a: CfgNode, b: CfgNode, root: CfgNode, key_list: list[str], source: str | None) -> None:
    """Merge ``a`` into ``b`` recursively, type-checking every value against the existing one."""
    for key, raw in a.items():
        full_key = ".".join(key_list + [key])
        value = _decode_value(copy.deepcopy(raw), b.get(key))
        if key in b:
            value = _check_and_coerce(value, b[key], full_key, source)
            if isinstance(value, CfgNode) and isinstance(b[key], CfgNode):
                _merge_a_into_b(value, b[key], root, key_list + [key], source)
            else:
                b[key] = value
        elif b.is_new_allowed():
            b[key] = value
        else:
            raise _unknown_key_error(full_key, root, source)
