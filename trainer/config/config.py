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
import os
from collections.abc import Iterable
from typing import Any

import yaml
from frcnn.runtime.errors import ConfigError

from .compat import RENAMED, upgrade_version
from .yaml_loading import BASE_KEY, PythonTag, check_loaded, load_yaml_with_base

# BASE_KEY, PythonTag, load_yaml_with_base, check_loaded live in yaml_loading.py; importable from here as before.
__all__ = ["BASE_KEY", "CfgNode", "PythonTag", "check_loaded", "load_yaml_with_base"]

_VALID_TYPES = (tuple, list, str, int, float, bool, type(None))



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
        loaded = upgrade_version(loaded, filename, self.get("VERSION", 2))
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
            if full_key in RENAMED:
                raise ConfigError(
                    f"config key {full_key!r} was renamed to {RENAMED[full_key]!r} (detectron2 config "
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
    if full_key in RENAMED:
        return ConfigError(f"{where}config key {full_key!r} was renamed to {RENAMED[full_key]!r} "
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
