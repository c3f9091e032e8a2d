"""``frcnn triton-repo MODEL OUT``: write a model repository that a stock ``tritonserver`` loads.

    frcnn triton-repo model.onnx repo/ --max-batch 8 --instances 2 --max-queue-delay-us 2000
    tritonserver --model-repository=repo/

See :mod:`frcnn.runtime.serving.triton_repo` for the layout. OUT must be new (or an empty folder).
"""

from __future__ import annotations

import argparse

from frcnn.runtime.serving.serve_cli import _non_negative, _positive


def run_triton_repo(args: argparse.Namespace) -> int:
    from frcnn.runtime.serving.triton_repo import RepoOptions, read_model, write_repository

    src = read_model(args.model)
    opts = RepoOptions(max_batch=args.max_batch, instances=args.instances, max_queue_delay_us=args.max_queue_delay_us)
    written = write_repository(src, args.out, opts)
    print(f"wrote Triton model repository {args.out} ({len(written)} entries): "
          f"tritonserver --model-repository={args.out}")  # fmt: skip
    if src.kind == "engine":
        print(f"note: the server's TensorRT must be {src.tensorrt_version}, the version that built the engine")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("triton-repo", help="write a model repository for a stock tritonserver",
                                   description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("model", metavar="MODEL", help="deployed model: .onnx, or .engine / .plan (+ sidecar)")
    parser.add_argument("out", metavar="OUT", help="repository folder to create (must be new or empty)")
    parser.add_argument("--max-batch", type=_positive, default=None,
                        help="dynamic batching limit (default: the model's max batch)")
    parser.add_argument("--instances", type=_positive, default=1, help="instances of each model (default 1)")
    parser.add_argument("--max-queue-delay-us", type=_non_negative, default=2000,
                        help="how long the batcher waits to fill a batch, microseconds (default 2000)")
    parser.set_defaults(func=run_triton_repo)
    return parser
