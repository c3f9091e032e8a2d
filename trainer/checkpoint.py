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
module, with a hint for the usual causes (class count, ResNet depth).
"""

from __future__ import annotations

import collections
import dataclasses
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

logger = logging.getLogger(__name__)

_TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickled object of torch's pre-1.6 format
# Keys that older detectron2 checkpoints hold but that are not learned parameters of this model.
_IGNORABLE = re.compile(r"(^|\.)(pixel_mean|pixel_std)$|anchor_generator\.cell_anchors\.")


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
