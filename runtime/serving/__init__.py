"""Serving on Triton Inference Server (issue 13; the ``serve`` extra).

``serve_cli`` / ``pytriton_server``: ``frcnn serve`` runs a real Triton server around a Detector with PyTriton.
``triton_repo`` / ``triton_repo_cli``: ``frcnn triton-repo`` writes a model repository for a stock tritonserver.
``requests``: per-request checks, image decoding and same-shape grouping shared by both (numpy + Pillow only).
Importing this package imports neither PyTriton nor tritonclient.
"""
