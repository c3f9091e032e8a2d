"""Read and write detectron2 checkpoints without executing pickled code.

Formats (detected from the file's bytes, not its suffix):
- detectron2 ``.pth``: ``torch.save({"model": state_dict, ...})`` (zip, torch >= 1.6, or the legacy pickle
  format). Read with ``torch.load(weights_only=True)``; numpy arrays inside are allowed, nothing else.
- model-zoo ``.pkl``: a plain pickle of ``{"model": {name: np.ndarray}, "__author__": ...}`` (or a bare
  ``{name: array}``), often written by Python 2. Read with a restricted unpickler that only rebuilds numpy
  arrays, dtypes, scalars and ``OrderedDict``; any other global (``os.system``, ...) is refused with a
  ``CheckpointError`` naming it. Python 2 strings are decoded as latin1, as detectron2 does.
- Caffe2 / Detectron1 ImageNet ``.pkl`` (``res2_0_branch2a_w`` style names, maybe under ``"blobs"``): the
  ResNet trunk names are renamed like detectron2's ``convert_basic_c2_names`` and prefixed with
  ``backbone.bottom_up.``; ``fc1000_*`` and ``*_momentum`` blobs are dropped; FrozenBN layers without
  statistics get ``running_mean = 0`` and ``running_var = 1`` (what detectron2's FrozenBatchNorm2d fills in for
  version-less state dicts). Only the trunk exists in such files: load them with ``strict=False``.

``load_into_model`` compares keys and shapes exactly and reports every problem in one paragraph, grouped by
module, with a hint for the usual causes (class count, ResNet depth): trainer/checkpoint_report.py.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import re
from typing import Any

import numpy as np
import torch
from frcnn.runtime.errors import CheckpointError
from frcnn.runtime.fileio import atomic_writer
from torch import nn

from .checkpoint_report import LoadReport, compare_state, format_report

logger = logging.getLogger(__name__)

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickled object of torch's pre-1.6 format


def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` restricted to latin1 (how protocol-2 pickles store ``bytes``)."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused global _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own _reconstruct, whichever module it is
    scalar = np.float32(0).__reduce__()[0]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = reconstruct
        allowed[(mod, "scalar")] = scalar
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name}") from None


def _torch_safe_numpy_globals() -> list[Any]:
    out = [np.ndarray, np.dtype, np.ndarray.__reduce__(np.zeros(1))[0], np.float32(0).__reduce__()[0]]
    out += [type(np.dtype(t)) for t in "?bBhHiIlLqQefdgFD"]
    return out


def _refused(path: str, err: Exception) -> CheckpointError:
    match = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f"the global '{match.group(1)}'" if match else "an object that is not tensors/arrays"
    return CheckpointError(
        f"Refusing to load checkpoint '{path}': its pickle references {what}, which could run code when "
        "loaded; only tensors, numpy arrays and plain containers are accepted. If you trust the file, "
        "re-save its state dict with torch.save({'model': state_dict}, path)."
    )


def _read_torch(path: str) -> Any:
    try:
        with torch.serialization.safe_globals(_torch_safe_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err):
            raise _refused(path, err) from None
        raise CheckpointError(
            f"Checkpoint '{path}' is corrupted ({err}); re-download or re-save it."
        ) from None
    except Exception as err:  # noqa: BLE001 - a damaged zip fails in many ways (OSError, RuntimeError...)
        first_line = (str(err).splitlines() or [""])[0]
        raise CheckpointError(
            f"Checkpoint '{path}' is truncated or corrupted (torch.load: {type(err).__name__}: {first_line}); "
            "re-download or re-save it."
        ) from None


def _read_pickle(path: str, data: bytes) -> Any:
    try:
        unpickler = _RestrictedUnpickler(io.BytesIO(data), encoding="latin1")
        obj = unpickler.load()
    except pickle.UnpicklingError as err:
        if str(err).startswith("GLOBAL "):
            raise _refused(path, err) from None
        raise CheckpointError(
            f"Checkpoint '{path}' is truncated or corrupted (unpickling: {err}); re-download or re-save it."
        ) from None
    except Exception as err:  # noqa: BLE001 - a damaged pickle fails in many ways (EOFError, ValueError...)
        raise CheckpointError(
            f"Checkpoint '{path}' is truncated or corrupted (unpickling: {type(err).__name__}: {err}); "
            "re-download or re-save it."
        ) from None
    if isinstance(obj, int) and obj == _TORCH_LEGACY_MAGIC:
        return _read_torch(path)
    return obj


def _read_file(path: str) -> Any:
    if os.path.isdir(path):
        raise CheckpointError(f"Checkpoint '{path}' is a directory; pass the checkpoint file inside it, e.g. "
                              f"'{os.path.join(path, 'model_final.pth')}'.")  # fmt: skip
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise CheckpointError(f"Cannot read checkpoint '{path}': {err.strerror or err}.") from None
    if not data:
        raise CheckpointError(f"Checkpoint '{path}' is empty (0 bytes); re-download or re-save it.")
    if data[:4] == b"PK\x03\x04":
        return _read_torch(path)
    if data[:1] == b"\x80" or data[:1] in (b"(", b"}", b"]"):
        return _read_pickle(path, data)
    raise CheckpointError(
        f"'{path}' is not a checkpoint: it is neither a torch.save zip nor a pickle (starts with "
        f"{data[:8]!r}); pass a detectron2 .pth or model-zoo .pkl file."
    )


def _c2_rename(name: str) -> str:
    """One Caffe2 ResNet trunk name -> detectron2 name (convert_basic_c2_names rules, trunk only)."""
    k = name.replace("_", ".")
    k = re.sub(r"\.b$", ".bias", k)
    k = re.sub(r"\.w$", ".weight", k)
    k = re.sub(r"bn\.s$", "norm.weight", k)
    k = re.sub(r"bn\.bias$", "norm.bias", k)
    k = re.sub(r"bn\.rm$", "norm.running_mean", k)
    k = re.sub(r"bn\.riv$", "norm.running_var", k)
    k = re.sub(r"^res\.conv1\.norm\.", "conv1.norm.", k)
    k = re.sub(r"^conv1\.", "stem.conv1.", k)
    for c2, d2 in ((".branch1.", ".shortcut."), (".branch2a.", ".conv1."), (".branch2b.", ".conv2."),
                   (".branch2c.", ".conv3.")):  # fmt: skip
        k = k.replace(c2, d2)
    return "backbone.bottom_up." + k


def convert_c2_names(blobs: dict[str, Any]) -> dict[str, Any]:
    """Caffe2 / Detectron1 ResNet ImageNet blobs -> detectron2 state-dict names (trunk only, see module doc)."""
    out = {}
    for name, value in blobs.items():
        if name.endswith("_momentum") or name.startswith("fc1000") or name == "lr":
            continue
        out[_c2_rename(name)] = value
    for key in [k for k in out if k.endswith(".norm.weight")]:
        prefix = key[: -len("weight")]
        size = np.shape(out[key])[0]
        out.setdefault(prefix + "running_mean", np.zeros(size, np.float32))
        out.setdefault(prefix + "running_var", np.ones(size, np.float32))
    return out


def _is_c2_names(keys: list[str]) -> bool:
    return bool(keys) and all("." not in k for k in keys) and any(k.endswith("_w") for k in keys)


def _to_tensor(path: str, key: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "biuf":
        array = np.asarray(value)
        return torch.from_numpy(np.array(array, dtype=array.dtype.newbyteorder("=")))  # native byte order
    raise CheckpointError(
        f"Checkpoint '{path}' entry '{key}' is a {type(value).__name__} "
        f"{getattr(value, 'dtype', '')}, not a numeric tensor or array; this is not a model state dict."
    )


def load_checkpoint_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint file without executing code.

    Returns:
        state_dict: parameter name -> CPU tensor (numpy arrays converted; a DDP ``module.`` prefix stripped;
            Caffe2 names converted, see the module docstring).
        meta: the file's other top-level entries (``__author__``, ``iteration``, ``optimizer`` ...).
    Raises:
        CheckpointError: missing/empty/truncated/corrupted file, not a checkpoint, or a pickle that references
            anything but tensors/arrays/containers (nothing from such a file is executed).
    """
    path = os.fspath(path)
    data = _read_file(path)
    if not isinstance(data, dict):
        raise CheckpointError(
            f"Checkpoint '{path}' holds a {type(data).__name__}, not a dict; expected {{'model': state_dict}} "
            "or a state dict."
        )
    if "blobs" in data and isinstance(data["blobs"], dict):  # Detectron1 detection models
        sd, meta = data["blobs"], {k: v for k, v in data.items() if k != "blobs"}
    elif "model" in data and isinstance(data["model"], dict):
        sd, meta = data["model"], {k: v for k, v in data.items() if k != "model"}
    else:
        sd, meta = data, {}
    keys = [str(k) for k in sd]
    if _is_c2_names(keys):
        logger.info("'%s' uses Caffe2 names (e.g. %s): converting the ResNet trunk names", path, keys[0])
        sd = convert_c2_names(sd)
        meta["converted_from_c2"] = True
    if sd and all(str(k).startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return {str(k): _to_tensor(path, str(k), v) for k, v in sd.items()}, meta


def load_into_model(
    model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True, path: str = "<state dict>",
    fix: str | None = None,
) -> LoadReport:
    """Copy ``state`` into ``model`` (parameters and persistent buffers, dtype cast to the model's).

    strict=True: any missing / unexpected / shape-mismatched key raises one ``CheckpointError`` paragraph and
    nothing is loaded; it ends with ``fix`` (a command-line tool passes its own advice) or, by default, the
    API's (``strict=False``). strict=False: the report is logged as a warning and every matching key is loaded.
    ``pixel_mean`` / ``pixel_std`` / ``cell_anchors`` entries of old checkpoints are ignored (logged).
    """
    model_state = model.state_dict()
    report = compare_state(model_state, state)
    if report.ignored:
        logger.info("'%s': ignored non-parameter entries %s", path, ", ".join(report.ignored))
    if not report.ok:
        message = format_report(report, path, list(state), list(model_state))
        if strict:
            raise CheckpointError(message + " " + (fix or "Pass strict=False to load the matching weights only."))
        logger.warning("%s Loading the %d matching keys only (strict=False).", message, len(report.loaded))
    with torch.no_grad():
        for key in report.loaded:
            model_state[key].copy_(state[key])
    return report


def load_checkpoint(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> dict[str, Any]:
    """``load_checkpoint_state`` + ``load_into_model``; returns the file's meta entries."""
    state, meta = load_checkpoint_state(path)
    load_into_model(model, state, strict=strict, path=os.fspath(path))
    return meta


def save_checkpoint(
    path: str | os.PathLike, model_or_state: nn.Module | dict[str, Any], **extra: Any
) -> None:
    """Write ``{"model": state_dict, **extra}`` atomically (temp file in the same folder, then os.replace).

    ``.pkl`` suffix: a plain pickle of numpy arrays ``{"model": {k: ndarray}, "__author__": "frcnn-deploy",
    **extra}`` (detectron2 model-zoo format; extras must be plain Python values). Otherwise ``torch.save``.
    On any failure the destination is left untouched and no temp file remains.
    """
    path = os.fspath(path)
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else dict(model_or_state)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with atomic_writer(path, "wb", fsync=True) as f:
            if path.endswith(".pkl"):
                arrays = {k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
                          for k, v in state.items()}  # fmt: skip
                pickle.dump({"model": arrays, "__author__": "frcnn-deploy", **extra}, f, protocol=4)
            else:
                torch.save({"model": state, **extra}, f)
    except OSError as err:
        raise CheckpointError(
            f"Cannot write checkpoint '{path}': {err.strerror or err} ({folder})."
        ) from None
