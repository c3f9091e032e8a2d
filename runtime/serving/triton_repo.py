"""A Triton Inference Server model repository for a deployed model (``frcnn triton-repo``).

Layout (Triton's model repository docs: ``<model>/config.pbtxt`` + ``<model>/<version>/<file>``)::

    OUT/frcnn/config.pbtxt                 detector: onnxruntime backend (1/model.onnx) or tensorrt (1/model.plan)
    OUT/frcnn_preprocess/config.pbtxt      python backend, 1/model.py: encoded image bytes -> images, sizes
    OUT/frcnn_postprocess/config.pbtxt     python backend, 1/model.py: detector outputs -> original pixels
    OUT/frcnn_image/config.pbtxt           ensemble of the three (1/ is empty, as Triton requires)
    OUT/README.md

Clients send encoded JPEG / PNG bytes to ``frcnn_image`` and get num_detections, boxes (original pixels),
scores, classes and class_names; ``Detector("http://HOST:8000/frcnn")`` uses ``frcnn`` directly. The frcnn
metadata travels as config parameter ``METADATA_PARAMETER``. The python models need ``frcnn-deploy`` (numpy +
Pillow) importable by the server's Python. ONNX: our custom nodes are model-local functions, so no op library;
TensorRT: AOT plugins are inside the engine, so no plugin library, but the engine's TensorRT version must equal
the server's.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np
from frcnn.runtime.backends import ENGINE_SUFFIXES, ONNX_SUFFIXES
from frcnn.runtime.backends.base import OUTPUTS
from frcnn.runtime.backends.triton import DEFAULT_MODEL, METADATA_PARAMETER
from frcnn.runtime.detector import DEFAULT_ONNX_MAX_BATCH, parse_metadata
from frcnn.runtime.engine_sidecar import read_sidecar, sidecar_path
from frcnn.runtime.errors import UserError

PRE_MODEL, POST_MODEL, ENSEMBLE_MODEL = "frcnn_preprocess", "frcnn_postprocess", "frcnn_image"
PYTHON_MODEL_FILE = os.path.join(os.path.dirname(__file__), "triton_python_model.py")
_PB_TYPES = {"uint8": "TYPE_UINT8", "int32": "TYPE_INT32", "float32": "TYPE_FP32", "bytes": "TYPE_STRING"}
#: (name, dtype, dims per request) of the detector's outputs as Triton sees them (batch axis implied).
DETECTOR_OUTPUT_DIMS = {"num_detections": [1], "boxes": [-1, 4], "scores": [-1], "classes": [-1]}
IMAGE_OUTPUTS = [("num_detections", "int32", [1]), ("boxes", "float32", [-1, 4]), ("scores", "float32", [-1]),
                 ("classes", "int32", [-1]), ("class_names", "bytes", [-1])]  # fmt: skip


@dataclass(frozen=True)
class RepoOptions:
    max_batch: int | None = None
    instances: int = 1
    max_queue_delay_us: int = 2000


@dataclass(frozen=True)
class ModelSource:
    """What the generator needs from the model file."""

    path: str
    kind: str  # "onnx" or "engine"
    metadata: dict[str, str]
    max_batch: int
    tensorrt_version: str | None = None


def read_model(path: str) -> ModelSource:
    """Metadata and max batch of an exported ``.onnx`` or a ``.engine`` / ``.plan`` with its ``<path>.json``."""
    suffix = os.path.splitext(path)[1].lower()
    if not os.path.isfile(path):
        raise UserError(f"model file {path!r} not found; export one with `frcnn export`")
    if suffix in ONNX_SUFFIXES:
        try:
            import onnx
        except ImportError as exc:
            raise UserError(f"reading an ONNX model needs onnx (`pip install frcnn-deploy[ort]`): {exc}") from None
        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and others
            raise UserError(f"{path} is not a readable ONNX model ({exc}); re-export it with `frcnn export`") from None
        meta = {p.key: p.value for p in model.metadata_props}
        parse_metadata(meta, path)
        return ModelSource(path, "onnx", meta, _int(meta.get("max_batch")) or DEFAULT_ONNX_MAX_BATCH)
    if suffix in ENGINE_SUFFIXES:
        return _read_engine(path)
    raise UserError(f"{path!r}: name an ONNX model '*.onnx' or a TensorRT engine '*.engine' / '*.plan'")


def _read_engine(path: str) -> ModelSource:
    sidecar = read_sidecar(path)  # the sidecar rule of `frcnn export --engine`, in one place
    try:
        meta = {str(k): str(v) for k, v in sidecar["metadata"].items()}
        max_batch = int(sidecar["profile"]["images"]["max"][0])
        version = str(sidecar["tensorrt_version"])
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise UserError(f"engine {path}: its sidecar {sidecar_path(path)} lacks {type(exc).__name__}: {exc}; "
                        "rebuild the engine with `frcnn export --engine`") from None
    parse_metadata(meta, str(sidecar_path(path)))
    return ModelSource(path, "engine", meta, max_batch, version)


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _q(text: str) -> str:
    """A protobuf text-format string literal."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _tensor(name: str, dtype: str, dims: list[int], extra: str = "") -> str:
    return f"  {{ name: {_q(name)} data_type: {_PB_TYPES[dtype]} dims: {dims}{extra} }}"


def _batching(max_batch: int, delay_us: int, instances: int, kind: str) -> str:
    return (f"max_batch_size: {max_batch}\n"
            f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}\n"
            f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n")  # fmt: skip


def _parameter(key: str, value: str) -> str:
    return f"parameters {{ key: {_q(key)} value: {{ string_value: {_q(value)} }} }}\n"


def detector_config(src: ModelSource, max_batch: int, opts: RepoOptions) -> str:
    """config.pbtxt of the detector (onnxruntime or tensorrt backend)."""
    backend, kind = ("onnxruntime", "KIND_AUTO") if src.kind == "onnx" else ("tensorrt", "KIND_GPU")
    inputs = [_tensor("images", "uint8", [3, -1, -1]), _tensor("image_sizes", "int32", [2])]
    outputs = [_tensor(n, _dtype(OUTPUTS[n]), DETECTOR_OUTPUT_DIMS[n],
                       " reshape: { shape: [ ] }" if n == "num_detections" else "") for n in OUTPUTS]  # fmt: skip
    return (f"name: {_q(DEFAULT_MODEL)}\nbackend: {_q(backend)}\n"
            + _batching(max_batch, opts.max_queue_delay_us, opts.instances, kind)
            + "input [\n" + ",\n".join(inputs) + "\n]\noutput [\n" + ",\n".join(outputs) + "\n]\n"
            + _parameter(METADATA_PARAMETER, json.dumps(src.metadata, sort_keys=True)))  # fmt: skip


def _dtype(np_type: Any) -> str:
    return np.dtype(np_type).name


def python_config(name: str, stage: str, src: ModelSource, max_batch: int, opts: RepoOptions) -> str:
    """config.pbtxt of the pre- or post-processing python model (same model.py, ``stage`` parameter)."""
    sizes = [_tensor("image_sizes", "int32", [2]), _tensor("original_sizes", "int32", [2])]
    if stage == "preprocess":
        inputs = [_tensor("image", "bytes", [1])]
        outputs = [_tensor("images", "uint8", [3, -1, -1]), *sizes]
    else:
        inputs = [_tensor(n, _dtype(OUTPUTS[n]), DETECTOR_OUTPUT_DIMS[n]) for n in OUTPUTS] + sizes
        outputs = [_tensor(n, t, d) for n, t, d in IMAGE_OUTPUTS]
    return (f"name: {_q(name)}\nbackend: \"python\"\n"
            + _batching(max_batch, opts.max_queue_delay_us, opts.instances, "KIND_CPU")
            + "input [\n" + ",\n".join(inputs) + "\n]\noutput [\n" + ",\n".join(outputs) + "\n]\n"
            + _parameter("stage", stage) + _parameter(METADATA_PARAMETER, json.dumps(src.metadata, sort_keys=True)))


def ensemble_config(max_batch: int) -> str:
    """config.pbtxt of the ensemble: image bytes -> preprocess -> detector -> postprocess."""

    def step(model: str, inputs: dict[str, str], outputs: dict[str, str]) -> str:
        maps = [f"input_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in inputs.items()]
        maps += [f"output_map {{ key: {_q(k)} value: {_q(v)} }}" for k, v in outputs.items()]
        return f"  {{ model_name: {_q(model)} model_version: -1\n    " + "\n    ".join(maps) + " }"

    sizes = {"image_sizes": "_image_sizes", "original_sizes": "_original_sizes"}
    detections = {n: f"_{n}" for n in OUTPUTS}
    steps = [step(PRE_MODEL, {"image": "image"}, {"images": "_images", **sizes}),
             step(DEFAULT_MODEL, {"images": "_images", "image_sizes": "_image_sizes"}, detections),
             step(POST_MODEL, {**detections, **sizes}, {n: n for n, _, _ in IMAGE_OUTPUTS})]  # fmt: skip
    return (f"name: {_q(ENSEMBLE_MODEL)}\nplatform: \"ensemble\"\nmax_batch_size: {max_batch}\n"
            + "input [\n" + _tensor("image", "bytes", [1]) + "\n]\noutput [\n"
            + ",\n".join(_tensor(n, t, d) for n, t, d in IMAGE_OUTPUTS) + "\n]\n"
            + "ensemble_scheduling { step [\n" + ",\n".join(steps) + "\n] }\n")  # fmt: skip


def write_repository(src: ModelSource, out: str, opts: RepoOptions) -> list[str]:
    """Write the repository to ``out`` atomically (a temporary folder beside it, renamed at the end).

    ``out`` must not exist or be an empty folder: nothing already there is overwritten, and a failure leaves
    no partial repository. Returns the relative paths written.
    """
    files = repository_files(src, opts)
    out = os.path.abspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"{out} exists and is not an empty folder; name a new folder for the repository "
                        "(nothing was overwritten)")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.", suffix=".tmp")
    try:
        for rel, text in files.items():
            target = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if text is None:
                shutil.copyfile(src.path, target)
            elif not rel.endswith("/"):
                with open(target, "w", encoding="utf-8") as f:
                    f.write(text)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above); os.rename cannot replace it otherwise
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(files)


def repository_files(src: ModelSource, opts: RepoOptions) -> dict[str, str | None]:
    """Relative path -> text of every generated file (None: copy the model; "" for an empty folder marker)."""
    max_batch = opts.max_batch or src.max_batch
    if max_batch > src.max_batch:
        raise UserError(f"--max-batch {max_batch} exceeds the model's max batch {src.max_batch}")
    with open(PYTHON_MODEL_FILE, encoding="utf-8") as f:
        python_model = f.read()
    model_file = "model.onnx" if src.kind == "onnx" else "model.plan"
    return {
        f"{DEFAULT_MODEL}/config.pbtxt": detector_config(src, max_batch, opts),
        f"{DEFAULT_MODEL}/1/{model_file}": None,
        f"{PRE_MODEL}/config.pbtxt": python_config(PRE_MODEL, "preprocess", src, max_batch, opts),
        f"{PRE_MODEL}/1/model.py": python_model,
        f"{POST_MODEL}/config.pbtxt": python_config(POST_MODEL, "postprocess", src, max_batch, opts),
        f"{POST_MODEL}/1/model.py": python_model,
        f"{ENSEMBLE_MODEL}/config.pbtxt": ensemble_config(max_batch),
        f"{ENSEMBLE_MODEL}/1/": "",
        "README.md": repo_readme(src, max_batch),
    }


def repo_readme(src: ModelSource, max_batch: int) -> str:
    trt = (f"\nThe detector is a TensorRT engine built with TensorRT {src.tensorrt_version}: the server's TensorRT "
           "must be exactly this version (pick the tritonserver release that ships it), on the same GPU "
           "architecture. The frcnn plugins are compiled into the engine: no plugin library is needed.\n"
           if src.kind == "engine" else
           "\nThe detector is ONNX; its custom frcnn nodes are model-local ONNX functions that ONNX Runtime "
           "runs without an op library.\n")  # fmt: skip
    return (f"# frcnn model repository (generated by `frcnn triton-repo` from {os.path.basename(src.path)})\n\n"
            "    tritonserver --model-repository=$(pwd)\n\n"
            f"Models: `{DEFAULT_MODEL}` (detector, pre-processed tensors), `{PRE_MODEL}` / `{POST_MODEL}` (python "
            f"backend, need `pip install frcnn-deploy` in the server's Python), `{ENSEMBLE_MODEL}` (ensemble: "
            "send encoded JPEG/PNG bytes as `image`, get num_detections, boxes in original pixels, scores, "
            f"classes, class_names). Dynamic batching up to {max_batch}.\n" + trt
            + "\nClients: `Detector(\"http://HOST:8000/frcnn\")` (frcnn.runtime) or any KServe v2 client.\n")
