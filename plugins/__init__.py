"""Custom ops of the exported detector, one folder per op with all its faces side by side.

Each op folder holds: the contract (its ``__init__``: names, attributes, defaults), the torch face
(``torch_op``: ``torch.library.custom_op`` + ``register_fake``; the PyTorch model calls it), the ONNX face
(schema + function body in standard ops, so ONNX Runtime runs the exported file), the Triton kernel and the
TensorRT plugin registration.

Importing ``frcnn.plugins`` or an op folder never imports torch, triton or tensorrt: those faces are
imported explicitly by whoever needs them.
"""

DOMAIN = "frcnn"
"""ONNX node domain and TensorRT plugin namespace of every custom op."""

PLUGIN_VERSION = "1"

KERNEL_COMPILE_OPTIONS: dict[str, bool] = {"enable_fp_fusion": False}
"""Triton compile options of every kernel, in the JIT launchers and in the ahead-of-time PTX alike: no mul+add
contraction into FMA, so sample positions and weights round as in the CPU references. Measured on an H200
(bench/gpu_check.py, 2026-12-04): with contraction the fp32 ROIAlignV2 kernel differed from the torch
reference by 3.6e-5 on N(0, 1) feature maps (one ulp of a ~300 px coordinate times the map's gradient)."""

__all__ = ["DOMAIN", "KERNEL_COMPILE_OPTIONS", "PLUGIN_VERSION"]
