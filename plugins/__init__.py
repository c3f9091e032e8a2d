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

__all__ = ["DOMAIN", "PLUGIN_VERSION"]
